-- sql/definitions/80_compat.sql: the current definition of these objects (docs/schema.md).
--
-- The rule-engine-postgres API, working (docs/migrating-from-rule-engine-postgres.md):
-- its functions and the triggers that keep its columns and ours in step.
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

CREATE OR REPLACE FUNCTION rule_nats__config_compat() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The original's milliseconds and this project's seconds name the same settings: the one the
    -- statement wrote wins, the other follows.
    IF TG_OP = 'INSERT' THEN
        IF NEW.connection_timeout_ms IS NOT NULL THEN
            NEW.connect_timeout_seconds := NEW.connection_timeout_ms / 1000.0;
        END IF;
        IF NEW.reconnect_delay_ms IS NOT NULL THEN
            NEW.reconnect_wait_seconds := NEW.reconnect_delay_ms / 1000.0;
        END IF;
    ELSE
        IF NEW.connection_timeout_ms IS DISTINCT FROM OLD.connection_timeout_ms AND NEW.connection_timeout_ms IS NOT NULL THEN
            NEW.connect_timeout_seconds := NEW.connection_timeout_ms / 1000.0;
        END IF;
        IF NEW.reconnect_delay_ms IS DISTINCT FROM OLD.reconnect_delay_ms AND NEW.reconnect_delay_ms IS NOT NULL THEN
            NEW.reconnect_wait_seconds := NEW.reconnect_delay_ms / 1000.0;
        END IF;
    END IF;
    NEW.connection_timeout_ms := least(round(NEW.connect_timeout_seconds * 1000), 2147483647);
    NEW.reconnect_delay_ms := least(round(NEW.reconnect_wait_seconds * 1000), 2147483647);
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION rule_nats__config_compat() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats__config_compat() IS 'Trigger: keeps connection_timeout_ms/reconnect_delay_ms and their seconds columns in step.';

CREATE OR REPLACE FUNCTION rule_nats__config_ref_compat() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    by_id text;
BEGIN
    -- config_id (the original's reference) and config_name (this project's) name the same row.
    IF NEW.config_id IS NOT NULL AND (TG_OP = 'INSERT' OR NEW.config_id IS DISTINCT FROM OLD.config_id) THEN
        SELECT c.config_name INTO by_id FROM public.rule_nats_config c WHERE c.config_id = NEW.config_id;
        IF by_id IS NULL THEN
            RAISE EXCEPTION 'no rule_nats_config row with config_id %', NEW.config_id
                USING ERRCODE = '23503', HINT = 'See SELECT config_id, config_name FROM rule_nats_config.';
        END IF;
        NEW.config_name := by_id;
    ELSE
        NEW.config_id := (SELECT c.config_id FROM public.rule_nats_config c WHERE c.config_name = NEW.config_name);
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION rule_nats__config_ref_compat() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats__config_ref_compat() IS 'Trigger: keeps rule_nats_streams.config_id and config_name in step.';

CREATE OR REPLACE FUNCTION rule_nats__webhook_compat() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    by_id text;
    ins boolean := TG_OP = 'INSERT';
BEGIN
    -- A webhook the original way, without a subject: rule_webhook_enable_nats's default subject.
    IF NEW.nats_subject IS NULL THEN
        NEW.nats_subject := 'webhooks.' || NEW.webhook_name;
    END IF;
    IF NEW.method IS NOT NULL THEN
        NEW.method := upper(NEW.method);
    END IF;
    IF NEW.nats_config_id IS NOT NULL AND (ins OR NEW.nats_config_id IS DISTINCT FROM OLD.nats_config_id) THEN
        SELECT c.config_name INTO by_id FROM public.rule_nats_config c WHERE c.config_id = NEW.nats_config_id;
        IF by_id IS NULL THEN
            RAISE EXCEPTION 'no rule_nats_config row with config_id %', NEW.nats_config_id
                USING ERRCODE = '23503', HINT = 'See SELECT config_id, config_name FROM rule_nats_config.';
        END IF;
        NEW.config_name := by_id;
    ELSE
        NEW.nats_config_id := (SELECT c.config_id FROM public.rule_nats_config c WHERE c.config_name = NEW.config_name);
    END IF;
    -- Milliseconds (the original) and seconds (this project): the one written wins.
    IF NEW.timeout_ms IS NOT NULL AND (ins OR NEW.timeout_ms IS DISTINCT FROM OLD.timeout_ms) THEN
        NEW.timeout_seconds := NEW.timeout_ms / 1000.0;
    END IF;
    -- least(): a value the CHECKs would refuse (one from before them) must not make every update fail.
    NEW.timeout_ms := least(round(NEW.timeout_seconds * 1000), 2147483647);
    IF NEW.retry_delay_ms IS NOT NULL AND (ins OR NEW.retry_delay_ms IS DISTINCT FROM OLD.retry_delay_ms) THEN
        NEW.retry_initial_seconds := greatest(NEW.retry_delay_ms, 1) / 1000.0;
    ELSIF NEW.retry_delay_ms IS NULL OR NEW.retry_initial_seconds IS DISTINCT FROM OLD.retry_initial_seconds THEN
        NEW.retry_delay_ms := least(round(NEW.retry_initial_seconds * 1000), 2147483647);
    END IF;
    -- max_retries counts the retries, retry_max_attempts every attempt; retry_enabled false: one attempt.
    IF NEW.max_retries IS NOT NULL AND (ins OR NEW.max_retries IS DISTINCT FROM OLD.max_retries
                                        OR NEW.retry_enabled IS DISTINCT FROM OLD.retry_enabled) THEN
        NEW.retry_max_attempts := NEW.max_retries + 1;
    ELSIF NOT ins AND NEW.retry_max_attempts IS DISTINCT FROM OLD.retry_max_attempts
          OR NEW.max_retries IS NULL THEN
        NEW.max_retries := NEW.retry_max_attempts - 1;
    END IF;
    IF NOT NEW.retry_enabled THEN
        NEW.retry_max_attempts := 1;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION rule_nats__webhook_compat() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats__webhook_compat() IS
    'Trigger: the original''s webhook columns (nats_config_id, timeout_ms, max_retries, retry_delay_ms, retry_enabled) '
    'in step with this project''s; default nats_subject webhooks.<webhook_name>; method in capitals.';

CREATE OR REPLACE FUNCTION rule_nats_configure(
    p_config_name       text    DEFAULT 'default',
    p_nats_url          text    DEFAULT 'nats://localhost:4222',
    p_auth_type         text    DEFAULT 'none',
    p_jetstream_enabled boolean DEFAULT true,
    p_stream_name       text    DEFAULT 'WEBHOOKS',
    p_subject_prefix    text    DEFAULT 'webhooks'
) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_nats_url IS NULL OR p_nats_url = '' THEN
        RAISE EXCEPTION 'rule_nats_configure: p_nats_url is empty' USING ERRCODE = '22023',
            HINT = 'Give the server, e.g. nats://nats-1:4222.';
    END IF;
    INSERT INTO public.rule_nats_config AS c
           (config_name, nats_url, auth_type, jetstream_enabled, stream_name, subject_prefix)
    VALUES (p_config_name, p_nats_url, p_auth_type, p_jetstream_enabled, p_stream_name, p_subject_prefix)
    ON CONFLICT (config_name) DO UPDATE SET
        nats_url = EXCLUDED.nats_url, auth_type = EXCLUDED.auth_type,
        jetstream_enabled = EXCLUDED.jetstream_enabled, stream_name = EXCLUDED.stream_name,
        subject_prefix = EXCLUDED.subject_prefix;
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_configure(text, text, text, boolean, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_configure(text, text, text, boolean, text, text) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_configure(text, text, text, boolean, text, text) IS
    'As in rule-engine-postgres: create or change a NATS connection (rule_nats_config). Credentials go in their columns (auth_token, nats_user, ...).';

CREATE OR REPLACE FUNCTION rule_nats_stream_create(
    p_stream_name      text,
    p_subjects         text[],
    p_config_name      text   DEFAULT 'default',
    p_description      text   DEFAULT NULL,
    p_retention_policy text   DEFAULT 'limits',
    p_max_age_seconds  bigint DEFAULT 604800
) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id integer;
BEGIN
    IF p_stream_name IS NULL OR p_stream_name = '' THEN
        RAISE EXCEPTION 'rule_nats_stream_create: p_stream_name is empty' USING ERRCODE = '22023',
            HINT = 'Name the stream, e.g. WEBHOOKS.';
    END IF;
    IF p_subjects IS NULL OR cardinality(p_subjects) = 0 THEN
        RAISE EXCEPTION 'rule_nats_stream_create: p_subjects is empty' USING ERRCODE = '22023',
            HINT = 'Give the subjects it captures, e.g. ARRAY[''webhooks.>''].';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM public.rule_nats_config WHERE config_name = p_config_name) THEN
        RAISE EXCEPTION 'NATS config % not found', p_config_name USING ERRCODE = '42704',
            HINT = 'See SELECT config_name FROM rule_nats_config, or rule_nats_configure(...).';
    END IF;
    INSERT INTO public.rule_nats_streams (config_name, stream_name, subjects, description, retention_policy, max_age_seconds)
    VALUES (p_config_name, p_stream_name, p_subjects, p_description, p_retention_policy, p_max_age_seconds)
    RETURNING stream_id INTO v_id;
    RETURN v_id;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_stream_create(text, text[], text, text, text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_stream_create(text, text[], text, text, text, bigint) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_stream_create(text, text[], text, text, text, bigint) IS
    'As in rule-engine-postgres: register a stream (rule_nats_streams); the sidecar creates it in JetStream.';

CREATE OR REPLACE FUNCTION rule_webhook_enable_nats(
    p_webhook_id   integer,
    p_nats_subject text DEFAULT NULL,
    p_publish_mode text DEFAULT 'both',
    p_config_name  text DEFAULT 'default'
) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.rule_nats_config WHERE config_name = p_config_name AND coalesce(enabled, true)) THEN
        RAISE EXCEPTION 'NATS config % not found or disabled', p_config_name USING ERRCODE = '42704',
            HINT = 'See SELECT config_name, enabled FROM rule_nats_config.';
    END IF;
    SELECT webhook_name INTO v_name FROM public.rule_webhooks WHERE webhook_id = p_webhook_id;
    IF v_name IS NULL THEN
        RAISE EXCEPTION 'Webhook % not found', p_webhook_id USING ERRCODE = '42704',
            HINT = 'See SELECT webhook_id, webhook_name FROM rule_webhooks.';
    END IF;
    UPDATE public.rule_webhooks
       SET nats_enabled = true, nats_subject = coalesce(p_nats_subject, 'webhooks.' || v_name),
           config_name = p_config_name, nats_config_id = NULL, publish_mode = p_publish_mode
     WHERE webhook_id = p_webhook_id;
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION rule_webhook_enable_nats(integer, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_webhook_enable_nats(integer, text, text, text) TO rule_nats_admin;
COMMENT ON FUNCTION rule_webhook_enable_nats(integer, text, text, text) IS
    'As in rule-engine-postgres: publish this webhook through NATS (default subject webhooks.<webhook_name>).';

CREATE OR REPLACE FUNCTION rule_webhook_disable_nats(p_webhook_id integer) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE public.rule_webhooks SET nats_enabled = false, publish_mode = 'queue' WHERE webhook_id = p_webhook_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Webhook % not found', p_webhook_id USING ERRCODE = '42704',
            HINT = 'See SELECT webhook_id, webhook_name FROM rule_webhooks.';
    END IF;
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION rule_webhook_disable_nats(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_webhook_disable_nats(integer) TO rule_nats_admin;
COMMENT ON FUNCTION rule_webhook_disable_nats(integer) IS
    'As in rule-engine-postgres: nats_enabled false, publish_mode queue. rule_webhook_publish_nats then refuses it and routing by subject skips it.';

CREATE OR REPLACE FUNCTION rule_nats_stats(p_webhook_id integer DEFAULT NULL, p_hours integer DEFAULT 24) RETURNS json
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT json_build_object(
        'total_published', count(*),
        'successful', count(*) FILTER (WHERE success),
        'failed', count(*) FILTER (WHERE NOT success),
        'success_rate_pct', round(100.0 * count(*) FILTER (WHERE success) / NULLIF(count(*), 0), 2),
        'avg_latency_ms', round(avg(latency_ms), 2),
        'min_latency_ms', min(latency_ms),
        'max_latency_ms', max(latency_ms),
        'p50_latency_ms', percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
        'p95_latency_ms', percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms),
        'p99_latency_ms', percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms),
        'unique_subjects', count(DISTINCT subject),
        'time_range_hours', p_hours,
        'period_start', min(published_at),
        'period_end', max(published_at))
      FROM public.rule_nats_publish_history
     WHERE (p_webhook_id IS NULL OR webhook_id = p_webhook_id)
       AND published_at >= now() - make_interval(hours => p_hours)
$$;
REVOKE ALL ON FUNCTION rule_nats_stats(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_stats(integer, integer) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_stats(integer, integer) IS
    'As in rule-engine-postgres: publish statistics of one webhook (or all) over the last p_hours.';

CREATE OR REPLACE FUNCTION rule_nats_config_info(p_config_name text DEFAULT 'default') RETURNS json
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v json;
BEGIN
    SELECT json_build_object(
        'config_id', config_id, 'config_name', config_name, 'nats_url', nats_url, 'auth_type', auth_type,
        'jetstream_enabled', jetstream_enabled, 'stream_name', stream_name, 'subject_prefix', subject_prefix,
        'max_connections', max_connections, 'connection_timeout_ms', connection_timeout_ms, 'enabled', enabled,
        'created_at', created_at, 'updated_at', updated_at)
      INTO v FROM public.rule_nats_config WHERE config_name = p_config_name;
    IF v IS NULL THEN
        RAISE EXCEPTION 'NATS config % not found', p_config_name USING ERRCODE = '42704',
            HINT = 'See SELECT config_name FROM rule_nats_config.';
    END IF;
    RETURN v;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_config_info(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_config_info(text) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_config_info(text) IS 'As in rule-engine-postgres: a connection''s settings (no credentials).';

CREATE OR REPLACE FUNCTION rule_nats_webhooks_list()
RETURNS TABLE (webhook_id integer, webhook_name text, nats_subject text, publish_mode text, config_name text,
               total_published bigint, success_rate numeric)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT w.webhook_id, w.webhook_name, w.nats_subject, w.publish_mode, w.config_name,
           count(h.publish_id), round(100.0 * count(h.publish_id) FILTER (WHERE h.success) / NULLIF(count(h.publish_id), 0), 2)
      FROM public.rule_webhooks w
      LEFT JOIN public.rule_nats_publish_history h ON h.webhook_id = w.webhook_id
     WHERE w.nats_enabled
     GROUP BY w.webhook_id
     ORDER BY w.webhook_name
$$;
REVOKE ALL ON FUNCTION rule_nats_webhooks_list() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_webhooks_list() TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_webhooks_list() IS 'As in rule-engine-postgres: NATS-enabled webhooks with their publish counts.';

CREATE OR REPLACE FUNCTION rule_nats_cleanup_expired() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM public.rule_nats_publish_history WHERE expires_at < now();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_cleanup_expired() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_cleanup_expired() TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_cleanup_expired() IS 'As in rule-engine-postgres: delete publish history past its expires_at.';

CREATE OR REPLACE FUNCTION rule_nats_cleanup_old_history(p_older_than interval DEFAULT '30 days', p_keep_failed boolean DEFAULT true)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM public.rule_nats_publish_history
     WHERE published_at < now() - p_older_than AND (NOT p_keep_failed OR success);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_cleanup_old_history(interval, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_cleanup_old_history(interval, boolean) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_cleanup_old_history(interval, boolean) IS
    'As in rule-engine-postgres: delete publish history older than p_older_than (keeping failures unless p_keep_failed is false).';

CREATE OR REPLACE FUNCTION rule_nats_init(config_name text) RETURNS jsonb
LANGUAGE plpython3u SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $py$
# The original opened a connection pool here, and publishing needed it. Here every session connects
# on its first publish; this checks the configuration, connects, and makes sure a stream captures
# subject_prefix.> (registered in rule_nats_streams, and created in JetStream at once so that the
# next statement can publish without waiting for the sidecar, which creates it the same way).
import json
if "pgnats_publisher7" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
mod, pub = GD["pgnats7"], GD["pgnats_publisher7"]
rows = plpy.execute(plpy.prepare(
    "SELECT nats_url, coalesce(enabled, true) AS enabled, coalesce(jetstream_enabled, true) AS jetstream_enabled, "
    "coalesce(stream_name, 'WEBHOOKS') AS stream_name, coalesce(subject_prefix, 'webhooks') AS subject_prefix "
    "FROM public.rule_nats_config WHERE config_name = $1", ["text"]), [config_name])
if not rows or not rows[0]["enabled"]:
    plpy.error("rule_nats_init: NATS configuration %r not found or disabled" % (config_name,),
               hint="See SELECT config_name, enabled FROM rule_nats_config.", sqlstate="42704")
cfg = rows[0]
prefix = cfg["subject_prefix"] + ".>"
probe = cfg["subject_prefix"] + ".x"
stream = plpy.execute(plpy.prepare(
    "SELECT stream_name, subjects, description, retention_policy, max_messages, max_bytes, "
    "max_age_seconds::float8 AS max_age, max_message_size, storage_type, discard_policy, replicas, "
    "duplicate_window_seconds::float8 AS dup FROM public.rule_nats_streams "
    "WHERE config_name = $1 AND enabled AND EXISTS (SELECT 1 FROM unnest(subjects) f "
    "WHERE public.rule_nats_subjects_overlap(f, $2)) ORDER BY stream_name = $3 DESC, stream_id LIMIT 1",
    ["text", "text", "text"]), [config_name, prefix, cfg["stream_name"]])
registered = False
if not stream:
    plpy.execute(plpy.prepare(
        "INSERT INTO public.rule_nats_streams (config_name, stream_name, subjects, description) "
        "VALUES ($1, $2, ARRAY[$3], 'registered by rule_nats_init')", ["text", "text", "text"]),
        [config_name, cfg["stream_name"], prefix])
    registered = True
    stream = plpy.execute(plpy.prepare(
        "SELECT stream_name, subjects, description, retention_policy, max_messages, max_bytes, "
        "max_age_seconds::float8 AS max_age, max_message_size, storage_type, discard_policy, replicas, "
        "duplicate_window_seconds::float8 AS dup FROM public.rule_nats_streams WHERE stream_name = $1",
        ["text"]), [cfg["stream_name"]])
s = stream[0]
try:
    client, timeout = pub.client(config_name)
    client.ensure_connected()
    info = client.js_api("STREAM.INFO." + s["stream_name"], b"", timeout)
    created = False
    if "error" in info:
        want = {
            "name": s["stream_name"], "subjects": list(s["subjects"]), "retention": s["retention_policy"],
            "max_msgs": s["max_messages"], "max_bytes": s["max_bytes"],
            "max_age": int(round(s["max_age"] * 1e9)), "max_msg_size": s["max_message_size"],
            "storage": s["storage_type"], "discard": s["discard_policy"], "num_replicas": s["replicas"],
            "duplicate_window": int(round(s["dup"] * 1e9)),
        }
        if s["description"] is not None:
            want["description"] = s["description"]
        made = client.js_api("STREAM.CREATE." + s["stream_name"], json.dumps(want).encode(), timeout)
        if "error" in made:
            raise mod.ServerError("creating stream %s: %s" % (s["stream_name"], made["error"].get("description")))
        created = True
except mod.NatsError as exc:
    plpy.error("rule_nats_init: %s" % (exc,), detail="reason: %s" % (exc.reason,),
               hint=exc.hint or "Check nats_url of rule_nats_config and that nats-server runs with JetStream (-js).",
               sqlstate="08001")
return json.dumps({
    "success": True, "config": config_name,
    "message": "NATS connection initialized for config '%s'" % (config_name,),
    "nats_url": cfg["nats_url"], "jetstream_enabled": cfg["jetstream_enabled"], "stream_name": s["stream_name"],
    "stream_registered": registered, "stream_created": created,
})
$py$;
ALTER FUNCTION rule_nats_init(text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_init(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_init(text) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_init(text) IS
    'As in rule-engine-postgres: check a configuration and connect. Also registers (rule_nats_streams) and creates '
    'the stream that captures subject_prefix.> if none does. Not needed before publishing here (sessions connect on first use).';

CREATE OR REPLACE FUNCTION rule_nats_test_connection(p_config_name text DEFAULT 'default') RETURNS json
LANGUAGE plpython3u SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $py$
import json
rows = plpy.execute(plpy.prepare(
    "SELECT config_name, nats_url, coalesce(jetstream_enabled, true) AS js FROM public.rule_nats_config "
    "WHERE config_name = $1 AND coalesce(enabled, true)", ["text"]), [p_config_name])
if not rows:
    return json.dumps({"success": False, "message": "Configuration not found or disabled"})
if "pgnats_publisher7" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
h = GD["pgnats_publisher7"].health(p_config_name)
r = rows[0]
return json.dumps({
    "success": bool(h.get("ok")),
    "message": ("Connected to %s" % h.get("connected_url")) if h.get("ok") else ("Connection failed: %s" % h.get("error")),
    "config": {"name": r["config_name"], "url": r["nats_url"], "jetstream": r["js"]},
})
$py$;
ALTER FUNCTION rule_nats_test_connection(text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_test_connection(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_test_connection(text) TO rule_nats_admin, rule_nats_monitor;
COMMENT ON FUNCTION rule_nats_test_connection(text) IS
    'As in rule-engine-postgres, but really connects: {success, message, config}.';

CREATE OR REPLACE FUNCTION rule_nats__webhook_publish_as(p_webhook_id integer, p_payload jsonb, p_message_id text, p_mode text)
RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $py$
# p_mode: NULL (as the webhook's publish_mode says: outbox -> after COMMIT, any other -> at once, as
# the original published every NATS-enabled webhook at once), 'immediate' or 'outbox'.
if "pgnats_publisher7" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
mod, pub = GD["pgnats7"], GD["pgnats_publisher7"]
import json
plan = GD.get("pgnats_webhook_plan_v14")
if plan is None:
    plan = GD["pgnats_webhook_plan_v14"] = plpy.prepare(
        "SELECT webhook_id, webhook_name, url, nats_subject, config_name, publish_mode, enabled, disabled_reason, "
        "nats_enabled FROM public.rule_webhooks WHERE webhook_id = $1", ["int4"])
rows = plpy.execute(plan, [p_webhook_id])
if not rows:
    return json.dumps({"ok": False, "success": False, "error": "no webhook with webhook_id %s" % p_webhook_id,
                       "sqlstate": "42704", "hint": "See SELECT webhook_id, webhook_name FROM rule_webhooks."})
if not rows[0]["nats_enabled"]:
    return json.dumps({"ok": False, "success": False, "sqlstate": "42704",
                       "error": "webhook %s: NATS not enabled (nats_enabled is false)" % p_webhook_id,
                       "hint": "SELECT rule_webhook_enable_nats(%s) enables it." % p_webhook_id})
w = rows[0]
if not w["enabled"] and w["disabled_reason"] is None:
    return json.dumps({"ok": False, "success": False, "error": "webhook %s is disabled" % p_webhook_id,
                       "sqlstate": "55000",
                       "hint": "UPDATE rule_webhooks SET enabled = true WHERE webhook_id = %s" % p_webhook_id})
mode = p_mode or ("outbox" if w["publish_mode"] == "outbox" else "immediate")
event_id = p_message_id or mod.new_event_id()
named = {"webhook_name": w["webhook_name"], "subject": w["nats_subject"]}
try:
    # A caller's id may not take the shape of a generated one (0016, issue 19).
    (mod.validate_caller_message_id if p_message_id else mod.validate_message_id)(event_id)
    mod.validate_subject(w["nats_subject"])
    if mode == "outbox":
        pub.client(w["config_name"])
        pub.check_registered(w["config_name"], w["nats_subject"])
except mod.NatsError as exc:
    return json.dumps(dict(mod.error_info(exc), success=False, **named))
envelope = mod.build_envelope(w["url"], p_payload, webhook_id=p_webhook_id, event_id=event_id)
if mode == "outbox":
    oplan = GD.get("pgnats_outbox_plan")
    if oplan is None:
        oplan = GD["pgnats_outbox_plan"] = plpy.prepare(
            "INSERT INTO public.rule_nats_outbox (config_name, webhook_id, subject, payload, message_id) "
            "VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING outbox_id", ["text", "int4", "text", "text", "text"])
    oid = plpy.execute(oplan, [w["config_name"], p_webhook_id, w["nats_subject"], envelope, event_id])[0]["outbox_id"]
    return json.dumps(dict(named, ok=True, success=True, mode="outbox", outbox_id=oid, event_id=event_id,
                           stream=None, sequence=None, duplicate=False, latency_ms=0.0))
result, err, latency, _ = pub.publish(w["nats_subject"], envelope, None, event_id, w["config_name"])
if err is None:
    pub.record(w["config_name"], p_webhook_id, w["nats_subject"], envelope, None, event_id, result, None, latency)
    return json.dumps(dict(result, ok=True, success=True, mode="immediate", event_id=event_id,
                           sequence=result.get("seq"), latency_ms=round(latency, 3), **named))
pub.record_failure(w["config_name"], p_webhook_id, w["nats_subject"], envelope, None, event_id, err, latency)
return json.dumps(dict(mod.error_info(err, latency), success=False, **named))
$py$;
REVOKE ALL ON FUNCTION rule_nats__webhook_publish_as(integer, jsonb, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__webhook_publish_as(integer, jsonb, text, text) TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats__webhook_publish_as(integer, jsonb, text, text) IS
    'Internal: publish a registered webhook''s envelope at once or through the outbox; the result or a failure description.';

CREATE OR REPLACE FUNCTION rule_webhook_call_unified(webhook_id integer, payload jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_mode text;
    v_nats jsonb;
    v_queue jsonb;
    v_event text;
BEGIN
    IF rule_webhook_call_unified.webhook_id IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_webhook_call_unified', 'webhook_id', 'See SELECT webhook_id, webhook_name FROM rule_webhooks.');
    ELSIF rule_webhook_call_unified.payload IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_webhook_call_unified', 'payload', 'Publish a JSON value, e.g. ''{}'' or ''null''::jsonb.');
    END IF;
    SELECT w.publish_mode INTO v_mode FROM public.rule_webhooks w WHERE w.webhook_id = rule_webhook_call_unified.webhook_id;
    IF v_mode IS NULL THEN
        RAISE EXCEPTION 'rule_webhook_call_unified: Webhook % not found', rule_webhook_call_unified.webhook_id
            USING ERRCODE = '42704', HINT = 'See SELECT webhook_id, webhook_name FROM rule_webhooks.';
    END IF;
    IF v_mode IN ('queue', 'outbox') THEN
        -- The original's PostgreSQL queue: here the transactional outbox (published after COMMIT).
        v_queue := public.rule_nats__webhook_publish_as(rule_webhook_call_unified.webhook_id, rule_webhook_call_unified.payload, NULL, 'outbox');
        IF NOT (v_queue ->> 'ok')::boolean THEN
            PERFORM public.rule_nats__raise('rule_webhook_call_unified', v_queue);
        END IF;
        RETURN jsonb_build_object('queue', jsonb_build_object(
            'success', true, 'queue_id', v_queue -> 'outbox_id', 'status', 'pending', 'event_id', v_queue -> 'event_id'));
    END IF;
    v_nats := public.rule_nats__webhook_publish_as(rule_webhook_call_unified.webhook_id, rule_webhook_call_unified.payload, NULL, 'immediate');
    IF v_mode <> 'both' THEN
        IF NOT (v_nats ->> 'ok')::boolean THEN
            PERFORM public.rule_nats__raise('rule_webhook_call_unified', v_nats);
        END IF;
        RETURN jsonb_build_object('nats', v_nats - 'ok');
    END IF;
    -- both: published at once; should NATS not take it now, queued in the outbox (one delivery, not two).
    IF (v_nats ->> 'ok')::boolean THEN
        RETURN jsonb_build_object('nats', v_nats - 'ok',
                                  'queue', jsonb_build_object('success', true, 'queue_id', NULL, 'status', 'not_needed'));
    END IF;
    IF v_nats ->> 'sqlstate' IN ('42704', '55000', '22023') THEN
        PERFORM public.rule_nats__raise('rule_webhook_call_unified', v_nats);  -- the caller's mistake
    END IF;
    v_event := coalesce(v_nats ->> 'event_id', NULL);
    v_queue := public.rule_nats__webhook_publish_as(rule_webhook_call_unified.webhook_id, rule_webhook_call_unified.payload, v_event, 'outbox');
    IF NOT (v_queue ->> 'ok')::boolean THEN
        PERFORM public.rule_nats__raise('rule_webhook_call_unified', v_queue);
    END IF;
    RETURN jsonb_build_object('nats', v_nats - 'ok', 'queue', jsonb_build_object(
        'success', true, 'queue_id', v_queue -> 'outbox_id', 'status', 'pending', 'event_id', v_queue -> 'event_id'));
END
$$;
ALTER FUNCTION rule_webhook_call_unified(integer, jsonb) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_webhook_call_unified(integer, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_webhook_call_unified(integer, jsonb) TO rule_nats_publisher, rule_nats_admin;
COMMENT ON FUNCTION rule_webhook_call_unified(integer, jsonb) IS
    'As in rule-engine-postgres, by publish_mode: queue/outbox -> {"queue": {success, queue_id (the outbox_id), status}} '
    '(published after COMMIT); nats/immediate -> {"nats": <rule_webhook_publish_nats result>}; both -> published at '
    'once, and queued in the outbox only if NATS cannot take it now (delivered once, not twice).';

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('80_compat.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
