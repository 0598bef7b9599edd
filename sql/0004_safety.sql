-- 0004_safety: signing-secret management, SSRF allow-lists, payload limits, per-endpoint
-- concurrency and rate limits, circuit breaker state and endpoint disabling.

-- ---------------------------------------------------------------------------
-- rule_nats_delivery_settings: one row of delivery rules for every endpoint.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_delivery_settings (
    settings_id                boolean     PRIMARY KEY DEFAULT true,
    allow_networks             cidr[]      NOT NULL DEFAULT '{}',
    https_only                 boolean     NOT NULL DEFAULT false,
    max_payload_bytes          integer     NOT NULL DEFAULT 1048576,
    updated_at                 timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT "rule_nats_delivery_settings holds one row" CHECK (settings_id),
    CONSTRAINT "max_payload_bytes: 1 to 67108864" CHECK (max_payload_bytes BETWEEN 1 AND 67108864)
);
COMMENT ON TABLE rule_nats_delivery_settings IS
    'Delivery rules for all endpoints (one row). Per-endpoint settings in rule_webhooks add to them.';
COMMENT ON COLUMN rule_nats_delivery_settings.allow_networks IS
    'Networks the worker may deliver to although they are loopback, private, link-local or otherwise blocked '
    '(e.g. {10.20.0.0/16}). Added to WEBHOOK_ALLOW_NETWORKS and to each endpoint''s own list.';
COMMENT ON COLUMN rule_nats_delivery_settings.https_only IS 'true: refuse http:// targets for every endpoint.';
COMMENT ON COLUMN rule_nats_delivery_settings.max_payload_bytes IS
    'Messages larger than this are dead-lettered (reason payload_too_large) instead of delivered.';
INSERT INTO rule_nats_delivery_settings DEFAULT VALUES;

CREATE TRIGGER rule_nats_delivery_settings_touch BEFORE UPDATE ON rule_nats_delivery_settings
    FOR EACH ROW EXECUTE FUNCTION rule_nats_touch_updated_at();
CREATE TRIGGER rule_nats_delivery_settings_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_nats_delivery_settings
    FOR EACH STATEMENT EXECUTE FUNCTION rule_nats_notify_config_change();

-- ---------------------------------------------------------------------------
-- Per-endpoint policy.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_webhooks
    ADD COLUMN allow_networks            cidr[]      NOT NULL DEFAULT '{}',
    ADD COLUMN https_only                boolean     NOT NULL DEFAULT false,
    ADD COLUMN max_concurrency           integer,
    ADD COLUMN rate_limit_per_second     numeric,
    ADD COLUMN circuit_failure_threshold integer     NOT NULL DEFAULT 5,
    ADD COLUMN circuit_open_seconds      numeric     NOT NULL DEFAULT 30,
    ADD COLUMN disable_after_seconds     numeric     DEFAULT 432000,
    ADD COLUMN disabled_at               timestamptz,
    ADD COLUMN disabled_reason           text,
    ADD CONSTRAINT "max_concurrency must be >= 1"
        CHECK (max_concurrency IS NULL OR max_concurrency >= 1),
    ADD CONSTRAINT "rate_limit_per_second: > 0 and <= 100000"
        CHECK (rate_limit_per_second IS NULL OR (rate_limit_per_second > 0 AND rate_limit_per_second <= 100000)),
    ADD CONSTRAINT "circuit_failure_threshold must be >= 1"
        CHECK (circuit_failure_threshold >= 1),
    ADD CONSTRAINT "circuit_open_seconds: > 0 and <= 3600"
        CHECK (circuit_open_seconds > 0 AND circuit_open_seconds <= 3600),
    ADD CONSTRAINT "disable_after_seconds must be > 0"
        CHECK (disable_after_seconds IS NULL OR disable_after_seconds > 0);
COMMENT ON COLUMN rule_webhooks.allow_networks IS
    'Blocked networks this endpoint may nevertheless reach (e.g. {10.1.2.0/24} for an internal service).';
COMMENT ON COLUMN rule_webhooks.https_only IS 'true: refuse to deliver to this endpoint over plain http.';
COMMENT ON COLUMN rule_webhooks.max_concurrency IS 'At most this many requests in flight to the endpoint (NULL: no limit); live sidecars split it.';
COMMENT ON COLUMN rule_webhooks.rate_limit_per_second IS
    'At most this many requests per second to the endpoint (NULL: no limit); live sidecars split it. Messages over '
    'the limit wait in rule_nats_retries without using up an attempt.';
COMMENT ON COLUMN rule_webhooks.circuit_failure_threshold IS
    'Consecutive failed attempts (timeouts, connection errors, 5xx, 429) that open the circuit: deliveries pause.';
COMMENT ON COLUMN rule_webhooks.circuit_open_seconds IS
    'How long an open circuit pauses deliveries before one probe request; doubles after each failed probe (up to 16x).';
COMMENT ON COLUMN rule_webhooks.disable_after_seconds IS
    'After failing without a single success for this long, the endpoint is disabled (NULL: never). HTTP 410 disables at once.';
COMMENT ON COLUMN rule_webhooks.disabled_at IS 'When the worker disabled the endpoint (HTTP 410 or continuous failure).';
COMMENT ON COLUMN rule_webhooks.disabled_reason IS 'Why the endpoint was disabled. rule_nats_endpoint_enable() clears it.';

-- Held deliveries are released per webhook when the endpoint is enabled again.
ALTER TABLE rule_nats_retries ADD COLUMN webhook_id integer;
COMMENT ON COLUMN rule_nats_retries.webhook_id IS 'Webhook the message is for, when it names one.';
CREATE INDEX rule_nats_retries_webhook_idx ON rule_nats_retries (webhook_id) WHERE webhook_id IS NOT NULL;

-- Headers the worker dropped from a message, and similar remarks on an attempt.
ALTER TABLE rule_nats_delivery_attempts ADD COLUMN notes text;
COMMENT ON COLUMN rule_nats_delivery_attempts.notes IS
    'Remarks on the attempt that are not errors, e.g. headers dropped from the message (Host, Connection, webhook-*).';

-- ---------------------------------------------------------------------------
-- rule_nats_endpoint_state: circuit breaker state per endpoint, written by the sidecars.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_endpoint_state (
    webhook_id                 integer     PRIMARY KEY REFERENCES rule_webhooks (webhook_id) ON DELETE CASCADE,
    circuit                    text        NOT NULL DEFAULT 'closed',
    consecutive_failures       integer     NOT NULL DEFAULT 0,
    failing_since              timestamptz,
    open_until                 timestamptz,
    backoff_until              timestamptz,
    last_status                integer,
    last_error                 text,
    last_success_at            timestamptz,
    last_failure_at            timestamptz,
    worker_name                text,
    updated_at                 timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT "circuit: closed, open or half_open" CHECK (circuit IN ('closed', 'open', 'half_open'))
);
COMMENT ON TABLE rule_nats_endpoint_state IS
    'Health of each endpoint as the sidecars see it: circuit breaker, failure streak, endpoint-wide backoff (429/503). '
    'Each sidecar keeps its own breaker; this row is the latest any of them reported.';

-- NOTIFY rule_nats_endpoint_health when a circuit opens or closes.
CREATE FUNCTION rule_nats_endpoint_state_notify()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.circuit IS DISTINCT FROM OLD.circuit THEN
        PERFORM pg_notify('rule_nats_endpoint_health',
                          json_build_object('webhook_id', NEW.webhook_id, 'event', 'circuit_' || NEW.circuit,
                                            'consecutive_failures', NEW.consecutive_failures)::text);
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION rule_nats_endpoint_state_notify() IS
    'Row trigger: NOTIFY rule_nats_endpoint_health with {"webhook_id","event":"circuit_<state>"} when a circuit changes.';
CREATE TRIGGER rule_nats_endpoint_state_notify AFTER INSERT OR UPDATE ON rule_nats_endpoint_state
    FOR EACH ROW EXECUTE FUNCTION rule_nats_endpoint_state_notify();

-- Enabling an endpoint (by rule_nats_endpoint_enable() or a plain UPDATE) releases what it held and
-- forgets the failure streak that disabled it.
CREATE FUNCTION rule_nats_webhook_enabled()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF NEW.enabled AND NOT OLD.enabled THEN
        NEW.disabled_at := NULL;
        NEW.disabled_reason := NULL;
        UPDATE public.rule_nats_retries SET next_attempt_at = now()
         WHERE webhook_id = NEW.webhook_id AND next_attempt_at > now()
           AND (leased_until IS NULL OR leased_until < now());
        UPDATE public.rule_nats_endpoint_state
           SET circuit = 'closed', consecutive_failures = 0, failing_since = NULL, open_until = NULL,
               backoff_until = NULL, updated_at = now()
         WHERE webhook_id = NEW.webhook_id;
        PERFORM pg_notify('rule_nats_endpoint_health',
                          json_build_object('webhook_id', NEW.webhook_id, 'event', 'enabled')::text);
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION rule_nats_webhook_enabled() IS
    'Row trigger: when a webhook is enabled again, clear disabled_*, close its circuit, release its held deliveries.';
CREATE TRIGGER rule_webhooks_enabled BEFORE UPDATE OF enabled ON rule_webhooks
    FOR EACH ROW EXECUTE FUNCTION rule_nats_webhook_enabled();

CREATE FUNCTION rule_nats_endpoint_disable(p_webhook_id integer, p_reason text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_found boolean;
BEGIN
    UPDATE public.rule_webhooks
       SET enabled = false, disabled_at = now(), disabled_reason = left(p_reason, 500)
     WHERE webhook_id = p_webhook_id AND enabled
    RETURNING true INTO v_found;
    IF v_found THEN
        PERFORM pg_notify('rule_nats_endpoint_health',
                          json_build_object('webhook_id', p_webhook_id, 'event', 'disabled',
                                            'reason', left(p_reason, 500))::text);
    END IF;
    RETURN coalesce(v_found, false);
END
$$;
COMMENT ON FUNCTION rule_nats_endpoint_disable(integer, text) IS
    'Disables an endpoint and records why (called by the sidecar on HTTP 410 or after disable_after_seconds of '
    'failure). Its deliveries are held, not dropped. NOTIFY rule_nats_endpoint_health. Returns false if it was '
    'already disabled.';

CREATE FUNCTION rule_nats_endpoint_enable(p_webhook_id integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_found boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.rule_webhooks WHERE webhook_id = p_webhook_id) THEN
        RAISE EXCEPTION 'webhook % does not exist', p_webhook_id
            USING ERRCODE = 'no_data_found', HINT = 'SELECT webhook_id, webhook_name FROM rule_webhooks;';
    END IF;
    UPDATE public.rule_webhooks SET enabled = true WHERE webhook_id = p_webhook_id AND NOT enabled
    RETURNING true INTO v_found;
    RETURN coalesce(v_found, false);
END
$$;
COMMENT ON FUNCTION rule_nats_endpoint_enable(integer) IS
    'Re-enables a disabled endpoint: clears disabled_at/disabled_reason, closes its circuit and makes its held '
    'deliveries due now. Returns false if it was enabled already.';

-- ---------------------------------------------------------------------------
-- A webhook the worker disabled still takes events (held until it is enabled again): an endpoint
-- answering 410 must not make the application's transactions fail.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION rule_webhook_publish_nats(
    webhook_id integer,
    payload    jsonb,
    message_id text DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $py$
if "pgnats_publisher" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
mod, pub = GD["pgnats"], GD["pgnats_publisher"]
import json
plan = GD.get("pgnats_webhook_plan_v4")
if plan is None:
    plan = GD["pgnats_webhook_plan_v4"] = plpy.prepare(
        "SELECT webhook_id, url, nats_subject, config_name, publish_mode, enabled, disabled_reason "
        "FROM public.rule_webhooks WHERE webhook_id = $1",
        ["int4"])
rows = plpy.execute(plan, [webhook_id])
if not rows:
    plpy.error("rule_webhook_publish_nats: no webhook with webhook_id %s" % webhook_id,
               hint="See SELECT webhook_id, webhook_name FROM rule_webhooks.", sqlstate="22023")
w = rows[0]
# Disabled by a DBA: refused. Disabled by the worker (HTTP 410, days of failure; disabled_reason is set):
# accepted and held with the endpoint's other messages, so a remote endpoint cannot break local writes.
if not w["enabled"] and w["disabled_reason"] is None:
    plpy.error("rule_webhook_publish_nats: webhook %s is disabled" % webhook_id,
               hint="UPDATE rule_webhooks SET enabled = true WHERE webhook_id = %s" % webhook_id, sqlstate="55000")
event_id = message_id or mod.new_event_id()
envelope = mod.build_envelope(w["url"], payload, webhook_id=webhook_id, event_id=event_id)
if w["publish_mode"] == "outbox":
    oplan = GD.get("pgnats_outbox_plan")
    if oplan is None:
        oplan = GD["pgnats_outbox_plan"] = plpy.prepare(
            "INSERT INTO public.rule_nats_outbox (config_name, webhook_id, subject, payload, message_id) "
            "VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING outbox_id", ["text", "int4", "text", "text", "text"])
    oid = plpy.execute(oplan, [w["config_name"], webhook_id, w["nats_subject"], envelope, event_id])[0]["outbox_id"]
    return json.dumps({"mode": "outbox", "outbox_id": oid, "event_id": event_id})
result, err, latency, _ = pub.publish(w["nats_subject"], envelope, None, event_id, w["config_name"])
if err is None:
    pub.record(w["config_name"], webhook_id, w["nats_subject"], envelope, None, event_id, result, None, latency)
    return json.dumps(dict(result, mode="immediate", event_id=event_id, latency_ms=round(latency, 3)))
pub.fail("rule_webhook_publish_nats", err, w["config_name"], webhook_id, w["nats_subject"], envelope, None,
         event_id, latency)
$py$;
COMMENT ON FUNCTION rule_webhook_publish_nats(integer, jsonb, text) IS
    'Publishes payload for a registered webhook: the envelope {"webhook_url", "data", "headers", "webhook_id", '
    '"event_id", "timestamp"} goes to the webhook''s nats_subject, immediately or through the outbox (publish_mode). '
    'message_id becomes the event id and Nats-Msg-Id (a uuid when NULL). No secret is put into the message. '
    'Refused for a webhook a DBA disabled; accepted (and held) for one the worker disabled (disabled_reason set).';

-- ---------------------------------------------------------------------------
-- Signing secrets: create, rotate, revoke. Only rule_nats_admin may call these; the secret is
-- returned once to the caller and otherwise readable only by the admin and worker roles.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_private.random_secret()
RETURNS text LANGUAGE plpython3u VOLATILE
AS $$
import base64
import secrets
return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
$$;
REVOKE ALL ON FUNCTION rule_nats_private.random_secret() FROM PUBLIC;

CREATE FUNCTION rule_webhook_secret_create(
    p_webhook_id integer,
    p_secret     text DEFAULT NULL,
    p_expires_at timestamptz DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_secret text := coalesce(p_secret, rule_nats_private.random_secret());
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.rule_webhooks WHERE webhook_id = p_webhook_id) THEN
        RAISE EXCEPTION 'webhook % does not exist', p_webhook_id
            USING ERRCODE = 'no_data_found', HINT = 'SELECT webhook_id, webhook_name FROM rule_webhooks;';
    END IF;
    INSERT INTO public.rule_webhook_secrets (webhook_id, secret, expires_at)
    VALUES (p_webhook_id, v_secret, p_expires_at);
    RETURN v_secret;
END
$$;
COMMENT ON FUNCTION rule_webhook_secret_create(integer, text, timestamptz) IS
    'Adds a signing secret to a webhook and returns it (generated: whsec_ + 32 random bytes, unless given). '
    'Every unexpired secret signs each delivery.';

CREATE FUNCTION rule_webhook_secret_rotate(
    p_webhook_id integer,
    p_overlap    interval DEFAULT '24 hours',
    p_secret     text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_secret text;
BEGIN
    IF p_overlap < interval '0' THEN
        RAISE EXCEPTION 'overlap must not be negative'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'e.g. interval ''24 hours''';
    END IF;
    v_secret := rule_webhook_secret_create(p_webhook_id, p_secret);
    UPDATE public.rule_webhook_secrets
       SET expires_at = now() + p_overlap
     WHERE webhook_id = p_webhook_id AND secret <> v_secret
       AND (expires_at IS NULL OR expires_at > now() + p_overlap);
    RETURN v_secret;
END
$$;
COMMENT ON FUNCTION rule_webhook_secret_rotate(integer, interval, text) IS
    'Adds a new signing secret and lets the current ones expire after p_overlap: during the overlap every delivery '
    'carries both signatures, so receivers can switch without downtime. Returns the new secret.';

CREATE FUNCTION rule_webhook_secret_revoke(p_webhook_id integer, p_secret_id bigint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE public.rule_webhook_secrets
       SET expires_at = now()
     WHERE webhook_id = p_webhook_id AND (p_secret_id IS NULL OR secret_id = p_secret_id)
       AND (expires_at IS NULL OR expires_at > now());
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION rule_webhook_secret_revoke(integer, bigint) IS
    'Expires a webhook''s signing secrets now (one by secret_id, or all). Returns how many were revoked.';

-- ---------------------------------------------------------------------------
-- nats_endpoint_health: one row per endpoint; static headers (they may hold credentials) are not shown.
-- ---------------------------------------------------------------------------
CREATE VIEW nats_endpoint_health AS
SELECT w.webhook_id,
       w.webhook_name,
       w.url,
       CASE WHEN NOT w.enabled THEN 'disabled'
            WHEN s.circuit = 'open' THEN 'open'
            WHEN s.circuit = 'half_open' THEN 'half_open'
            WHEN s.backoff_until > now() THEN 'backing_off'
            WHEN s.consecutive_failures > 0 THEN 'failing'
            ELSE 'healthy' END                                AS status,
       w.enabled,
       w.disabled_at,
       w.disabled_reason,
       coalesce(s.circuit, 'closed')                          AS circuit,
       coalesce(s.consecutive_failures, 0)                    AS consecutive_failures,
       s.failing_since,
       s.open_until,
       s.backoff_until,
       s.last_status,
       s.last_error,
       s.last_success_at,
       s.last_failure_at,
       a.attempts_1h,
       a.failures_1h,
       round(100.0 * (a.attempts_1h - a.failures_1h) / nullif(a.attempts_1h, 0), 2) AS success_rate_1h,
       w.max_concurrency,
       w.rate_limit_per_second,
       (SELECT count(*) FROM rule_nats_retries r WHERE r.webhook_id = w.webhook_id) AS waiting,
       s.updated_at                                           AS state_updated_at
  FROM rule_webhooks w
  LEFT JOIN rule_nats_endpoint_state s USING (webhook_id)
  LEFT JOIN (
        -- one pass over the last hour for all endpoints (rule_nats_delivery_attempts_time_idx)
        SELECT da.webhook_id,
               count(*)                                       AS attempts_1h,
               count(*) FILTER (WHERE da.outcome <> 'delivered') AS failures_1h
          FROM rule_nats_delivery_attempts da
         WHERE da.attempted_at > now() - interval '1 hour' AND da.webhook_id IS NOT NULL
         GROUP BY da.webhook_id) a ON a.webhook_id = w.webhook_id;
COMMENT ON VIEW nats_endpoint_health IS
    'Per endpoint: healthy | failing | backing_off | open | half_open | disabled, the failure streak, last success '
    'and failure, attempts and success rate over the last hour, limits, deliveries waiting.';

-- ---------------------------------------------------------------------------
-- Privileges.
-- ---------------------------------------------------------------------------
REVOKE ALL ON FUNCTION rule_nats_endpoint_state_notify(), rule_nats_webhook_enabled(),
    rule_nats_endpoint_disable(integer, text), rule_nats_endpoint_enable(integer),
    rule_webhook_secret_create(integer, text, timestamptz), rule_webhook_secret_rotate(integer, interval, text),
    rule_webhook_secret_revoke(integer, bigint) FROM PUBLIC;

GRANT SELECT, UPDATE ON rule_nats_delivery_settings TO rule_nats_admin;
GRANT SELECT, DELETE ON rule_nats_endpoint_state TO rule_nats_admin;
GRANT SELECT ON nats_endpoint_health TO rule_nats_admin;
GRANT EXECUTE ON FUNCTION rule_nats_endpoint_enable(integer), rule_nats_endpoint_disable(integer, text),
    rule_webhook_secret_create(integer, text, timestamptz), rule_webhook_secret_rotate(integer, interval, text),
    rule_webhook_secret_revoke(integer, bigint) TO rule_nats_admin;

GRANT SELECT ON rule_nats_delivery_settings, rule_nats_endpoint_state, nats_endpoint_health TO rule_nats_monitor;
GRANT SELECT (allow_networks, https_only, max_concurrency, rate_limit_per_second, circuit_failure_threshold,
              circuit_open_seconds, disable_after_seconds, disabled_at, disabled_reason)
    ON rule_webhooks TO rule_nats_monitor;

GRANT SELECT ON rule_nats_delivery_settings TO rule_nats_worker;
GRANT SELECT, INSERT, UPDATE ON rule_nats_endpoint_state TO rule_nats_worker;
GRANT EXECUTE ON FUNCTION rule_nats_endpoint_disable(integer, text) TO rule_nats_worker;

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (4, 'safety');
