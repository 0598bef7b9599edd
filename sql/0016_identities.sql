-- 0016_identities: identities no one can claim, no NATS control headers from SQL, a monitor that sees
-- origins only, and helpers that cannot be decided by the caller's search_path (issue 19, defects
-- 2, 3, 8, 11; defect 7 is the sidecar's).
--
--  * Ids the project generates carry 128 random bits: outbox-<installation>-<outbox_id>-<32 hex> and
--    replay-<installation>-<dead_letter_id>-<n>-<32 hex>. Before, outbox-<installation>-<n> was
--    predictable: a publisher that published the next id first made JetStream drop the trigger's
--    event as a duplicate, and the relay marked it published.
--  * Callers' message ids (msg_id, message_id, a Nats-Msg-Id header) must not start with outbox-,
--    replay- or stream- (the shapes the project generates, case-insensitive): 22023 with a HINT.
--  * No Nats-* header from SQL but Nats-Msg-Id: Nats-Rollup purged a stream, Nats-Expected-*,
--    Nats-TTL and the rest are instructions to JetStream. rule_nats_publish_on_commit, the outbox (a
--    CHECK) and replays refuse or drop them; plpython/pgnats.py and the relay apply the same rule.
--  * rule_nats_redact_url keeps scheme, host and port only: every view the monitor reads shows an
--    endpoint's origin, not the secret in a Slack- or Discord-style path.
--  * SET search_path = pg_catalog, pg_temp on every function a CHECK, a generated column or a
--    definer function calls: an operator in the writer's schema no longer decides a CHECK.
--
-- Redefined here (CREATE OR REPLACE, same signatures): rule_nats_redact_url, rule_nats__check_publish,
-- rule_nats_publish_on_commit, rule_nats_enqueue_row_event, rule_nats_replay_dead_letter,
-- rule_webhook_publish_nats, rule_nats_hist_add; rule_nats__pgnats_source (the embedded module). Altered: the
-- search_path of the functions listed at the end, a CHECK added to rule_nats_outbox.

-- ---------------------------------------------------------------------------
-- The rules (the same in plpython/pgnats.py and sidecar/validation.py; tests/security/cases.py).
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_message_id_reserved(p_id text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT p_id OPERATOR(pg_catalog.~*) '^(outbox|replay|stream)-' $$;
COMMENT ON FUNCTION rule_nats_message_id_reserved(text) IS
    'True when a caller''s message id has the shape of an id the project generates (outbox-, replay- or stream-, '
    'any case): such ids are refused, so that no caller can claim the identity of a generated message.';

CREATE FUNCTION rule_nats_nats_header_allowed(p_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.lower(p_name) OPERATOR(pg_catalog.!~~) 'nats-%'
        OR pg_catalog.lower(p_name) OPERATOR(pg_catalog.=) 'nats-msg-id'
$$;
COMMENT ON FUNCTION rule_nats_nats_header_allowed(text) IS
    'True unless the header name starts with Nats- (any case) and is not Nats-Msg-Id: the other Nats-* headers '
    '(Nats-Rollup, Nats-Expected-*, Nats-TTL, ...) are instructions to JetStream and cannot be sent from SQL.';

-- One SQL body without calls to the other rule functions: each of them pins its search_path now,
-- which PostgreSQL pays for per call (nested, 150 us a publish with one header instead of 10).
-- The same rules as rule_nats_valid_headers, rule_nats_nats_header_allowed, rule_nats_valid_message_id
-- and rule_nats_message_id_reserved; tests/security/test_identities_sql.py checks that they agree.
CREATE FUNCTION rule_nats_valid_nats_headers(p_headers jsonb)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_headers IS NULL
        OR (jsonb_typeof(p_headers) = 'object'
            AND coalesce((
                SELECT bool_and(
                           length(h.k) BETWEEN 1 AND 256 AND h.k ~ '^[-!#$%&''*+.^_`|~0-9A-Za-z]+$'
                           AND (lower(h.k) NOT LIKE 'nats-%'
                                OR (lower(h.k) = 'nats-msg-id' AND jsonb_typeof(h.v) = 'string'
                                    AND length(h.v #>> '{}') BETWEEN 1 AND 256
                                    AND (h.v #>> '{}') !~ '[\x01-\x1f\x7f]'
                                    AND (h.v #>> '{}') !~ '^ ' AND (h.v #>> '{}') !~ ' $'
                                    AND (h.v #>> '{}') !~* '^(outbox|replay|stream)-'))
                           AND coalesce((
                               SELECT bool_and(jsonb_typeof(e) IN ('string', 'number')
                                               AND length(e #>> '{}') <= 8192 AND (e #>> '{}') !~ '[\r\n]')
                                 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(h.v) = 'array' THEN h.v
                                                                ELSE jsonb_build_array(h.v) END) AS e), true))
                  FROM jsonb_each(p_headers) AS h(k, v)), true))
$$;
COMMENT ON FUNCTION rule_nats_valid_nats_headers(jsonb) IS
    'True when NULL or valid headers (rule_nats_valid_headers) to publish to NATS from SQL: no Nats-* header but '
    'Nats-Msg-Id, whose value is a message id a caller may use (not outbox-, replay- or stream-).';

CREATE FUNCTION rule_nats_nats_headers_allowed(p_headers jsonb)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- rule_nats_nats_header_allowed for every key, as one jsonpath expression: it runs in the CHECK
    -- of every outbox row, and a query over jsonb_object_keys would start an executor per row.
    RETURN jsonb_typeof(p_headers) <> 'object'
        OR NOT jsonb_path_exists(p_headers,
               '$.keyvalue() ? (@.key like_regex "^nats-" flag "i" && !(@.key like_regex "^nats-msg-id$" flag "i"))');
END
$$;
COMMENT ON FUNCTION rule_nats_nats_headers_allowed(jsonb) IS
    'True unless the JSON object has a Nats-* key other than Nats-Msg-Id (the CHECK of rule_nats_outbox.headers).';

-- The relay refuses such rows too (they may predate this CHECK): NOT VALID leaves old rows to it.
ALTER TABLE rule_nats_outbox ADD CONSTRAINT "headers: no Nats-* header but Nats-Msg-Id"
    CHECK (headers IS NULL OR rule_nats_nats_headers_allowed(headers)) NOT VALID;

-- What rule_nats_publish_on_commit checks on every call, in one body: a function with SET costs a
-- search_path switch per call (3-12 us), and five of them doubled what a publish costs. The same
-- rules as rule_nats_valid_subject, rule_nats_subject_reserved, rule_nats_valid_message_id,
-- rule_nats_message_id_reserved and rule_nats_valid_nats_headers (test_identities_sql.py checks
-- that they agree); rule_nats__check_publish says which one failed.
CREATE FUNCTION rule_nats__publish_args_valid(p_subject text, p_headers jsonb, p_msg_id text)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- plpgsql, not SQL: with SET the function cannot be inlined, and a SQL function then starts an
    -- executor per call (20 us); plpgsql evaluates these as simple expressions, and runs the query
    -- over the headers only when there are headers.
    IF NOT (length(p_subject) BETWEEN 1 AND 1024
            AND p_subject !~ '[\x01-\x20\x7f-\x9f]'
            AND p_subject ~ '^([^.*>]+\.)*[^.*>]+$'
            AND p_subject !~ '^(\$|_INBOX(\.|$))') THEN
        RETURN false;
    END IF;
    IF p_msg_id IS NOT NULL
       AND NOT (length(p_msg_id) BETWEEN 1 AND 256 AND p_msg_id !~ '[\x01-\x1f\x7f]'
                AND p_msg_id !~ '^ ' AND p_msg_id !~ ' $' AND p_msg_id !~* '^(outbox|replay|stream)-') THEN
        RETURN false;
    END IF;
    IF p_headers IS NULL THEN
        RETURN true;
    END IF;
    RETURN jsonb_typeof(p_headers) = 'object'
       AND coalesce((
           SELECT bool_and(
                      length(h.k) BETWEEN 1 AND 256 AND h.k ~ '^[-!#$%&''*+.^_`|~0-9A-Za-z]+$'
                      AND (lower(h.k) NOT LIKE 'nats-%'
                           OR (lower(h.k) = 'nats-msg-id' AND jsonb_typeof(h.v) = 'string'
                               AND length(h.v #>> '{}') BETWEEN 1 AND 256
                               AND (h.v #>> '{}') !~ '[\x01-\x1f\x7f]'
                               AND (h.v #>> '{}') !~ '^ ' AND (h.v #>> '{}') !~ ' $'
                               AND (h.v #>> '{}') !~* '^(outbox|replay|stream)-'))
                      AND coalesce((
                          SELECT bool_and(jsonb_typeof(e) IN ('string', 'number')
                                          AND length(e #>> '{}') <= 8192 AND (e #>> '{}') !~ '[\r\n]')
                            FROM jsonb_array_elements(CASE WHEN jsonb_typeof(h.v) = 'array' THEN h.v
                                                           ELSE jsonb_build_array(h.v) END) AS e), true))
             FROM jsonb_each(p_headers) AS h(k, v)), true);
END
$$;
COMMENT ON FUNCTION rule_nats__publish_args_valid(text, jsonb, text) IS
    'Internal: true when subject, headers and caller''s message id may be published from SQL (the fast check of '
    'rule_nats_publish_on_commit; rule_nats__check_publish says why not).';

-- ---------------------------------------------------------------------------
-- The monitor sees an endpoint's origin: scheme, host and port.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION rule_nats_redact_url(p_url text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p_url OPERATOR(pg_catalog.~) '^[A-Za-z][A-Za-z0-9+.-]*://'
                THEN pg_catalog.regexp_replace(p_url, '^([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/?#]*@)?([^/?#@]*).*$', '\1\2')
                ELSE '***' END
$$;
COMMENT ON FUNCTION rule_nats_redact_url(text) IS
    'The origin of a URL (scheme://host[:port]), without userinfo, path, query or fragment: Slack- and Discord-style '
    'webhook URLs carry their secret in the path. What the monitoring views show; *** for text that is no URL.';

-- ---------------------------------------------------------------------------
-- Publishing from SQL: the checks that say why.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION rule_nats__check_publish(
    p_function text, p_config_name text, p_subject text, p_headers jsonb, p_msg_id text
) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
BEGIN
    IF p_subject IS NULL OR NOT public.rule_nats_valid_subject(p_subject, false) THEN
        RAISE EXCEPTION '%: invalid subject %', p_function, coalesce(quote_literal(p_subject), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'Subjects are dot-separated tokens without spaces, e.g. webhooks.orders.created; no * or > when publishing.';
    END IF;
    IF public.rule_nats_subject_reserved(p_subject) THEN
        RAISE EXCEPTION '%: subject % is reserved for NATS itself', p_function, quote_literal(p_subject)
            USING ERRCODE = '22023',
                  HINT = 'Subjects starting with $ ($JS, $KV, $O, $SYS, ...) or _INBOX cannot be published to from SQL.';
    END IF;
    IF p_headers IS NOT NULL AND NOT coalesce(public.rule_nats_valid_headers(p_headers), false) THEN
        RAISE EXCEPTION '%: invalid headers', p_function
            USING ERRCODE = '22023',
                  HINT = 'Headers are a JSON object: names are HTTP tokens, values strings or numbers without CR or LF.';
    END IF;
    IF p_headers IS NOT NULL THEN
        SELECT k INTO v_name FROM jsonb_object_keys(p_headers) AS k
         WHERE NOT public.rule_nats_nats_header_allowed(k) ORDER BY k LIMIT 1;
        IF v_name IS NOT NULL THEN
            RAISE EXCEPTION '%: header % is a NATS control header', p_function, quote_literal(v_name)
                USING ERRCODE = '22023',
                      HINT = 'Nats-* headers other than Nats-Msg-Id (Nats-Rollup, Nats-Expected-*, Nats-TTL, ...) are '
                             'instructions to JetStream and cannot be sent from SQL; use a name of your own, e.g. X-...';
        END IF;
        IF NOT coalesce(public.rule_nats_valid_nats_headers(p_headers), false) THEN
            RAISE EXCEPTION '%: invalid Nats-Msg-Id header', p_function
                USING ERRCODE = '22023',
                      HINT = 'A Nats-Msg-Id header is a message id: 1-256 characters without control characters, not '
                             'starting with outbox-, replay- or stream- (the ids this project generates).';
        END IF;
    END IF;
    IF p_msg_id IS NOT NULL AND NOT public.rule_nats_valid_message_id(p_msg_id) THEN
        RAISE EXCEPTION '%: invalid message id %', p_function, quote_literal(left(p_msg_id, 100))
            USING ERRCODE = '22023',
                  HINT = 'Message ids are 1-256 characters without control characters (CR, LF, NUL, tab) or surrounding spaces.';
    END IF;
    IF p_msg_id IS NOT NULL AND public.rule_nats_message_id_reserved(p_msg_id) THEN
        RAISE EXCEPTION '%: message id % has the shape of a generated id', p_function, quote_literal(left(p_msg_id, 100))
            USING ERRCODE = '22023',
                  HINT = 'Ids starting with outbox-, replay- or stream- (any case) are the ones this project generates; '
                         'leave msg_id out to get one, or use an id of your own, e.g. order-42-created.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM public.rule_nats_config c WHERE c.config_name = p_config_name) THEN
        RAISE EXCEPTION '%: no NATS configuration named %', p_function, quote_literal(p_config_name)
            USING ERRCODE = '42704', HINT = 'See SELECT config_name FROM rule_nats_config.';
    END IF;
    IF (SELECT c.publish_registered_subjects_only FROM public.rule_nats_config c WHERE c.config_name = p_config_name)
       AND NOT EXISTS (SELECT 1 FROM public.rule_nats_streams s
                        WHERE s.enabled AND s.config_name = p_config_name AND p_subject ~ s.subjects_pattern) THEN
        RAISE EXCEPTION '%: subject % is not captured by a registered stream of configuration %',
                p_function, quote_literal(p_subject), quote_literal(p_config_name)
            USING ERRCODE = '22023',
                  HINT = 'Register a stream that captures the subject (INSERT INTO rule_nats_streams ...), or an admin '
                         'allows any subject: UPDATE rule_nats_config SET publish_registered_subjects_only = false.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION rule_nats_publish_on_commit(
    subject     text,
    payload     jsonb,
    headers     jsonb DEFAULT NULL,
    msg_id      text  DEFAULT NULL,
    config_name text  DEFAULT 'default'
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
    v_msg_id text := nullif(msg_id, '');
BEGIN
    IF subject IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish_on_commit', 'subject', 'e.g. rule_nats_publish_on_commit(''webhooks.orders'', ''{"id": 1}'')');
    ELSIF payload IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish_on_commit', 'payload', 'Publish a JSON value, e.g. ''{}'' or ''null''::jsonb.');
    ELSIF config_name IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish_on_commit', 'config_name', 'Leave it out for the default configuration.');
    END IF;
    -- The common case costs plain expressions and one INSERT ... SELECT (which also finds the
    -- configuration and the registered stream); rule_nats__check_publish then says what is wrong.
    IF NOT coalesce(public.rule_nats__publish_args_valid(subject, headers, v_msg_id), false) THEN
        PERFORM public.rule_nats__check_publish('rule_nats_publish_on_commit', config_name, subject, headers, v_msg_id);
    END IF;
    v_id := nextval(pg_get_serial_sequence('public.rule_nats_outbox', 'outbox_id'));
    INSERT INTO public.rule_nats_outbox (outbox_id, config_name, subject, payload, headers, message_id)
    SELECT v_id, c.config_name, rule_nats_publish_on_commit.subject, rule_nats_publish_on_commit.payload,
           rule_nats_publish_on_commit.headers,
           coalesce(v_msg_id, format('outbox-%s-%s-%s', (SELECT i.installation_id FROM public.rule_nats_installation i),
                                     v_id, md5(gen_random_uuid()::text || gen_random_uuid()::text)))
      FROM public.rule_nats_config c
     WHERE c.config_name = rule_nats_publish_on_commit.config_name
       AND (NOT c.publish_registered_subjects_only
            OR EXISTS (SELECT 1 FROM public.rule_nats_streams s
                        WHERE s.enabled AND s.config_name = c.config_name
                          AND rule_nats_publish_on_commit.subject ~ s.subjects_pattern));
    IF NOT FOUND THEN
        PERFORM public.rule_nats__check_publish('rule_nats_publish_on_commit', config_name, subject, headers, v_msg_id);
        RAISE EXCEPTION 'rule_nats_publish_on_commit: not queued' USING ERRCODE = '22023';
    END IF;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION rule_nats_enqueue_row_event(p_subject text, p_webhook_name text, p_event jsonb)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_hook record;
    v_id bigint;
    v_event text;
    v_subject text := p_subject;
    v_config text := 'default';
BEGIN
    IF p_webhook_name IS NOT NULL THEN
        SELECT webhook_id, url, nats_subject, config_name, enabled, disabled_reason INTO v_hook
          FROM public.rule_webhooks WHERE webhook_name = p_webhook_name;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'rule_nats_table_trigger: no webhook named %', quote_literal(p_webhook_name)
                USING ERRCODE = '22023', HINT = 'See SELECT webhook_name FROM rule_webhooks.';
        END IF;
        -- The same rule as rule_webhook_publish_nats: a DBA's disable refuses, the worker's holds.
        IF NOT v_hook.enabled AND v_hook.disabled_reason IS NULL THEN
            RAISE EXCEPTION 'rule_nats_table_trigger: webhook % is disabled', quote_literal(p_webhook_name)
                USING ERRCODE = '55000',
                      HINT = format('UPDATE rule_webhooks SET enabled = true WHERE webhook_id = %s; or ALTER TABLE ... '
                                    'DISABLE TRIGGER to stop the events of the table.', v_hook.webhook_id);
        END IF;
        v_subject := coalesce(p_subject, v_hook.nats_subject);
        v_config := v_hook.config_name;
    END IF;
    PERFORM public.rule_nats__check_publish('rule_nats_table_trigger', v_config, v_subject, NULL, NULL);
    v_id := nextval(pg_get_serial_sequence('public.rule_nats_outbox', 'outbox_id'));
    v_event := format('outbox-%s-%s-%s', (SELECT i.installation_id FROM public.rule_nats_installation i), v_id,
                      md5(gen_random_uuid()::text || gen_random_uuid()::text));
    IF p_webhook_name IS NULL THEN
        INSERT INTO public.rule_nats_outbox (outbox_id, subject, payload, message_id)
        VALUES (v_id, v_subject, p_event, v_event);
    ELSE
        INSERT INTO public.rule_nats_outbox (outbox_id, config_name, webhook_id, subject, payload, message_id)
        VALUES (v_id, v_config, v_hook.webhook_id, v_subject,
                jsonb_build_object('webhook_url', v_hook.url, 'data', p_event, 'headers', '{}'::jsonb,
                                   'webhook_id', v_hook.webhook_id, 'event_id', v_event,
                                   'timestamp', floor(extract(epoch FROM clock_timestamp()))::bigint),
                v_event);
    END IF;
    RETURN v_id;
END
$$;

-- A replay sends the dead letter's headers again, but none of the Nats-* ones: a message that
-- reached the stream with Nats-Rollup (from any publisher) must not purge it a second time.
CREATE OR REPLACE FUNCTION rule_nats_replay_dead_letter(p_dead_letter_id bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d public.rule_nats_dead_letters;
    v_outbox bigint;
BEGIN
    SELECT * INTO d FROM public.rule_nats_dead_letters WHERE dead_letter_id = p_dead_letter_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rule_nats_replay_dead_letter: no dead letter %', p_dead_letter_id
            USING ERRCODE = '22023', HINT = 'See SELECT dead_letter_id, reason FROM rule_nats_dead_letters.';
    END IF;
    INSERT INTO public.rule_nats_outbox (config_name, webhook_id, subject, payload_raw, headers, message_id)
    SELECT coalesce((SELECT s.config_name FROM public.rule_nats_streams s WHERE s.stream_name = d.stream_name), 'default'),
           d.webhook_id, d.subject, d.message_raw,
           coalesce((SELECT jsonb_object_agg(h.k, h.v) FROM jsonb_each(d.message_headers) AS h(k, v)
                      WHERE lower(h.k) NOT LIKE 'nats-%'
                        AND lower(h.k) NOT IN ('rule-nats-message-id', 'rule-nats-attempts')), '{}'::jsonb)
               || jsonb_build_object('Rule-Nats-Message-Id', d.message_id, 'Rule-Nats-Attempts', d.attempts::text),
           format('replay-%s-%s-%s-%s', (SELECT i.installation_id FROM public.rule_nats_installation i),
                  d.dead_letter_id, d.replay_count + 1, md5(gen_random_uuid()::text || gen_random_uuid()::text))
    RETURNING outbox_id INTO v_outbox;
    UPDATE public.rule_nats_dead_letters
       SET replayed = true, replayed_at = now(), replay_count = replay_count + 1
     WHERE dead_letter_id = p_dead_letter_id;
    RETURN v_outbox;
END
$$;

CREATE OR REPLACE FUNCTION rule_webhook_publish_nats(
    webhook_id integer,
    payload    jsonb,
    message_id text DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb;
BEGIN
    IF webhook_id IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_webhook_publish_nats', 'webhook_id', 'See SELECT webhook_id, webhook_name FROM rule_webhooks.');
    ELSIF payload IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_webhook_publish_nats', 'payload', 'Publish a JSON value, e.g. ''{}'' or ''null''::jsonb.');
    ELSIF public.rule_nats_message_id_reserved(message_id) THEN
        RAISE EXCEPTION 'rule_webhook_publish_nats: message id % has the shape of a generated id',
                quote_literal(left(message_id, 100))
            USING ERRCODE = '22023',
                  HINT = 'Ids starting with outbox-, replay- or stream- (any case) are the ones this project generates; '
                         'leave message_id out to get one, or use an id of your own, e.g. order-42-created.';
    END IF;
    -- rule_nats__webhook_publish_as (0014): the original's result keys and publish modes.
    r := public.rule_nats__webhook_publish_as(webhook_id, payload, nullif(message_id, ''), NULL);
    IF NOT (r ->> 'ok')::boolean THEN
        PERFORM public.rule_nats__raise('rule_webhook_publish_nats', r);
    END IF;
    RETURN r - 'ok';
END
$$;

COMMENT ON COLUMN rule_nats_outbox.message_id IS
    'Nats-Msg-Id of the message: the caller''s msg_id, or outbox-<installation_id>-<outbox_id>-<128 random bits in '
    'hex>, which no one can guess (rule_nats_installation).';
COMMENT ON COLUMN rule_nats_delivery_attempts.message_id IS
    'Event id of the message, the webhook-id its receiver got: envelope event_id, else the replayed original id, else '
    'Nats-Msg-Id, else (none of them, or not a valid message id) stream-<stream>-<sequence>; stable across retries.';

-- The transition function of rule_nats_hist_agg runs once per attempt row (the rollup): with its
-- search_path pinned, a nested call of rule_nats_latency_bucket (pinned too) doubled what every
-- recorded attempt costs. The same bucket, computed in place.
CREATE OR REPLACE FUNCTION rule_nats_hist_add(p_state bigint[], p_ms double precision)
RETURNS bigint[] LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    i integer;
BEGIN
    IF p_state IS NULL THEN
        p_state := array_fill(0::bigint, ARRAY[72]);
    END IF;
    IF p_ms IS NULL THEN
        RETURN p_state;
    END IF;
    -- = rule_nats_latency_bucket(p_ms)
    i := CASE WHEN p_ms < 0.1 THEN 1 ELSE least(72, 2 + floor(ln(p_ms / 0.1) / ln(1.25))::integer) END;
    p_state[i] := p_state[i] + 1;
    RETURN p_state;
END
$$;

-- BEGIN EMBEDDED plpython/pgnats.py (scripts/embed-plpython writes this block)
CREATE OR REPLACE FUNCTION rule_nats__pgnats_source()
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $pgnats_fn$SELECT $pgnats$"""pgnats: a small NATS JetStream publisher that runs inside PostgreSQL (PL/Python).

Standard library only: PL/Python runs the server's own Python, not the project's
virtualenv. The migrations embed this file; ``rule_nats_publish`` and friends load
it once per database session into PL/Python's ``GD`` and keep one connection per
NATS configuration open for the session.

Layers, from pure to I/O:
  * validation, protocol encoding and parsing, envelope building, header redaction,
    nkey/ed25519 signing: pure functions, unit-tested without servers;
  * ``Client``: a blocking socket client with bounded timeouts (publish with PubAck,
    JetStream API requests, PING round trip), reconnecting on the next call after the
    server went away;
  * ``Publisher``: the glue used by the SQL functions (configuration rows, history rows).
"""

import base64
import contextlib
import hashlib
import json
import os
import re
import select
import socket
import ssl
import time
import uuid

VERSION = "0.1.0"

# Seconds a session trusts its copy of a rule_nats_config row before reading it again.
CONFIG_TTL = 1.0

# How long a request polls for its reply before sleeping in recv().
SPIN_SECONDS = 0.0005

# --------------------------------------------------------------------------------------
# Errors: each carries a stable reason code and a hint for the SQL error.
# --------------------------------------------------------------------------------------


class NatsError(Exception):
    reason = "nats_error"
    hint = None

    def __init__(self, message, hint=None):
        Exception.__init__(self, message)
        if hint is not None:
            self.hint = hint


class InvalidSubject(NatsError):
    reason = "invalid_subject"
    hint = "Subjects are dot-separated tokens without spaces, e.g. webhooks.orders.created; no * or > when publishing."


class InvalidHeader(NatsError):
    reason = "invalid_header"
    hint = "Header names are HTTP tokens; names and values must not contain CR or LF."


class InvalidPayload(NatsError):
    reason = "invalid_payload"


class ConnectFailed(NatsError):
    reason = "nats_unreachable"
    hint = "Check rule_nats_config.nats_url and that nats-server is running; SELECT rule_nats_health_check() tells more."


class AuthFailed(NatsError):
    reason = "nats_auth"
    hint = "Check auth_type and the credentials in rule_nats_config."


class RequestTimeout(NatsError):
    reason = "timeout"
    hint = "JetStream did not answer in time: check the server, or raise rule_nats_config.request_timeout_seconds."


class NoStream(NatsError):
    reason = "no_stream"
    hint = "No JetStream stream captures this subject: add one to rule_nats_streams (the sidecar creates it) or check the subject."


class PayloadTooLarge(NatsError):
    reason = "payload_too_large"
    hint = "Send a smaller payload (e.g. an id the receiver can look up), or raise max_payload on the NATS server."


class ServerError(NatsError):
    reason = "server_error"


class ConfigMissing(NatsError):
    reason = "no_config"
    hint = "Create it: INSERT INTO rule_nats_config (config_name, nats_url) VALUES (...)."


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


class InvalidMessageId(NatsError):
    reason = "invalid_message_id"
    hint = "Message ids are 1-256 characters without control characters (CR, LF, NUL, tab) or surrounding spaces."


class ReservedSubject(NatsError):
    reason = "reserved_subject"
    hint = (
        "Subjects starting with $ ($JS, $KV, $O, $SYS, ...) or _INBOX belong to NATS itself and cannot be "
        "published to from SQL."
    )


class UnregisteredSubject(NatsError):
    reason = "unregistered_subject"
    hint = (
        "Register a stream that captures the subject (INSERT INTO rule_nats_streams ...), or an admin allows "
        "any subject: UPDATE rule_nats_config SET publish_registered_subjects_only = false."
    )


class InvalidUrl(NatsError):
    reason = "invalid_url"
    hint = "Webhook URLs are absolute http(s) URLs without spaces or user:password@ (put credentials in headers)."


# The rules are the ones of tests/security/cases.py, which runs the same table against this
# module, the SQL functions and the sidecar. Every pattern is matched against the whole string
# (fullmatch): "$" would also match before a trailing newline.
_FORBIDDEN_SUBJECT_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f]")
_SUBJ_PART = r"[^.*>]+"
_SUBJECT = re.compile(r"(?:%s\.)*%s" % (_SUBJ_PART, _SUBJ_PART))
_SUBJECT_WILD = re.compile(r"(?:(?:%s|\*)\.)*(?:%s|\*|>)" % (_SUBJ_PART, _SUBJ_PART))
_RESERVED = re.compile(r"\$|_INBOX(?:\.|\Z)")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")
_MESSAGE_ID_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
_WEBHOOK_URL = re.compile(r"[hH][tT][tT][pP][sS]?://[^/?#@]+(?:[/?#].*)?", re.S)
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
_SERVER_URL = re.compile(r"(?:nats|tls)://(?:\[[0-9A-Fa-f:.]+\]|[^/@:\[\]]+)(?::[0-9]{1,5})?/?")


def is_reserved_subject(subject):
    return bool(_RESERVED.match(subject))


def validate_subject(subject, wildcards=False):
    if not isinstance(subject, str) or not subject:
        raise InvalidSubject("invalid subject: it is empty")
    if len(subject) > 1024:
        raise InvalidSubject("invalid subject: longer than 1024 characters")
    if _FORBIDDEN_SUBJECT_CHARS.search(subject):
        raise InvalidSubject(
            "invalid subject %r: spaces and control characters are not allowed" % (subject[:200],)
        )
    pattern = _SUBJECT_WILD if wildcards else _SUBJECT
    if not pattern.fullmatch(subject):
        raise InvalidSubject("invalid subject %r" % (subject[:200],))
    if is_reserved_subject(subject):
        raise ReservedSubject("subject %r is reserved for NATS itself" % (subject[:200],))
    return subject


def subject_matches(pattern, subject):
    """True when the subject filter ``pattern`` (with * and >) captures ``subject``."""
    f, s = pattern.split("."), subject.split(".")
    for i, part in enumerate(f):
        if part == ">":
            return len(s) > i
        if i >= len(s) or (part != "*" and part != s[i]):
            return False
    return len(s) == len(f)


def validate_header_name(name):
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise InvalidHeader("invalid header name %r" % (str(name)[:100],))
    return name


def validate_header_value(value, name="header"):
    if len(value) > 8192:
        raise InvalidHeader("header %s: value longer than 8192 characters" % name)
    if _HEADER_VALUE_FORBIDDEN.search(value):
        raise InvalidHeader("header %s: value contains CR, LF or NUL" % name)
    return value


def validate_message_id(msg_id):
    if not isinstance(msg_id, str) or not 1 <= len(msg_id) <= 256:
        raise InvalidMessageId("invalid message id: it must be 1-256 characters")
    if _MESSAGE_ID_FORBIDDEN.search(msg_id):
        raise InvalidMessageId("invalid message id %r: control characters are not allowed" % (msg_id[:100],))
    if msg_id[0] == " " or msg_id[-1] == " ":
        raise InvalidMessageId("invalid message id %r: leading or trailing space" % (msg_id[:100],))
    return msg_id


def validate_webhook_url(url):
    if (
        not isinstance(url, str)
        or len(url) > 2048
        or _URL_FORBIDDEN.search(url)
        or not _WEBHOOK_URL.fullmatch(url)
    ):
        raise InvalidUrl("invalid webhook URL %r" % (str(url)[:200],))
    return url


def validate_server_url(url):
    if not isinstance(url, str) or _URL_FORBIDDEN.search(url) or not _SERVER_URL.fullmatch(url):
        raise NatsError(
            "invalid NATS server URL", hint="nats://host[:port] or tls://host[:port], no user:password@"
        )
    return url


def normalize_headers(headers):
    """Turn a dict (values: str, numbers or lists of them) into a list of (name, value) pairs."""
    if headers is None:
        return []
    if not isinstance(headers, dict):
        raise InvalidHeader("headers must be a JSON object, got %s" % type(headers).__name__)
    items = []
    for name, value in headers.items():
        validate_header_name(name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
                raise InvalidHeader("header %s: values must be strings or numbers" % name)
            items.append((name, validate_header_value(str(v), name)))
    return items


# Callers' message ids must not have the shape of the ids this project generates (outbox-...,
# replay-..., stream-...), and no Nats-* header but Nats-Msg-Id may come from SQL: the others
# (Nats-Rollup, Nats-Expected-*, Nats-TTL, ...) are instructions to JetStream (issue 19).
_RESERVED_MESSAGE_ID = re.compile(r"(?:outbox|replay|stream)-", re.I)
RESERVED_ID_HINT = (
    "Ids starting with outbox-, replay- or stream- (any case) are the ones this project generates; leave the id "
    "out to get one, or use an id of your own, e.g. order-42-created."
)
NATS_HEADER_HINT = (
    "Nats-* headers other than Nats-Msg-Id (Nats-Rollup, Nats-Expected-*, Nats-TTL, ...) are instructions to "
    "JetStream and cannot be sent from SQL; use a name of your own, e.g. X-..."
)


def validate_caller_message_id(msg_id):
    """A message id a caller chose: a valid message id, not in a generated shape."""
    validate_message_id(msg_id)
    if _RESERVED_MESSAGE_ID.match(msg_id):
        raise InvalidMessageId(
            "message id %r has the shape of a generated id" % (msg_id[:100],), hint=RESERVED_ID_HINT
        )
    return msg_id


def validate_nats_header_name(name):
    """A header name SQL may send to NATS: a valid name, and no Nats-* but Nats-Msg-Id."""
    validate_header_name(name)
    lower = name.lower()
    if lower.startswith("nats-") and lower != "nats-msg-id":
        raise InvalidHeader("header %r is a NATS control header" % (name[:100],), hint=NATS_HEADER_HINT)
    return name


def check_sql_publish(headers, msg_id):
    """What a publish from SQL may not carry: a Nats-* header other than Nats-Msg-Id, or a message
    id (argument or Nats-Msg-Id header) in a generated shape. Raises InvalidHeader/InvalidMessageId."""
    if msg_id:
        validate_caller_message_id(str(msg_id))
    if isinstance(headers, dict):
        for name, value in headers.items():
            validate_nats_header_name(name)
            if name.lower() == "nats-msg-id":
                if not isinstance(value, str):
                    raise InvalidHeader("header Nats-Msg-Id: the value must be a string")
                validate_caller_message_id(value)


_SENSITIVE = re.compile(r"(authorization|cookie|token|secret|password|passwd|api[-_]?key|signature)", re.I)


def redact_headers(headers):
    """Copy of a header dict with secret-looking values masked, for history rows and logs."""
    if not headers:
        return headers
    return {k: ("***" if _SENSITIVE.search(k) else v) for k, v in headers.items()}


# --------------------------------------------------------------------------------------
# Protocol encoding and parsing
# --------------------------------------------------------------------------------------

CRLF = b"\r\n"


def encode_headers(items):
    out = [b"NATS/1.0\r\n"]
    for name, value in items:
        out.append(("%s: %s\r\n" % (name, value)).encode("utf-8"))
    out.append(CRLF)
    return b"".join(out)


def encode_pub(subject, reply, payload, header_items=None):
    """PUB or HPUB frame for one message."""
    reply_part = (" " + reply) if reply else ""
    if header_items:
        hdr = encode_headers(header_items)
        head = "HPUB %s%s %d %d\r\n" % (subject, reply_part, len(hdr), len(hdr) + len(payload))
        return b"".join((head.encode("utf-8"), hdr, payload, CRLF))
    head = "PUB %s%s %d\r\n" % (subject, reply_part, len(payload))
    return b"".join((head.encode("utf-8"), payload, CRLF))


def encode_connect(options):
    return ("CONNECT %s\r\n" % json.dumps(options, separators=(",", ":"))).encode("utf-8")


class ProtocolError(NatsError):
    reason = "protocol_error"


class Parser:
    """Incremental parser of server-to-client operations."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        ops = []
        while True:
            end = self.buf.find(CRLF)
            if end < 0:
                return ops
            line = bytes(self.buf[:end])
            upper = line[:5].upper()
            if upper.startswith(b"MSG ") or upper.startswith(b"HMSG "):
                parts = line.split()
                has_headers = upper.startswith(b"HMSG")
                try:
                    if has_headers:
                        if len(parts) == 6:
                            _, subj, sid, reply, hlen, tlen = parts
                        else:
                            _, subj, sid, hlen, tlen = parts
                            reply = b""
                        hlen, tlen = int(hlen), int(tlen)
                    else:
                        if len(parts) == 5:
                            _, subj, sid, reply, tlen = parts
                        else:
                            _, subj, sid, tlen = parts
                            reply = b""
                        hlen, tlen = 0, int(tlen)
                except ValueError as exc:
                    raise ProtocolError("malformed message line from server: %r" % line[:200]) from exc
                start = end + 2
                if len(self.buf) < start + tlen + 2:
                    return ops  # wait for the whole message
                body = bytes(self.buf[start : start + tlen])
                del self.buf[: start + tlen + 2]
                headers = body[:hlen] if has_headers else None
                ops.append(("MSG", subj.decode(), sid.decode(), reply.decode(), headers, body[hlen:]))
                continue
            del self.buf[: end + 2]
            if upper.startswith(b"PING"):
                ops.append(("PING",))
            elif upper.startswith(b"PONG"):
                ops.append(("PONG",))
            elif upper.startswith(b"+OK"):
                continue
            elif upper.startswith(b"-ERR"):
                ops.append(("ERR", line[4:].strip().strip(b"'").decode("utf-8", "replace")))
            elif upper.startswith(b"INFO"):
                ops.append(("INFO", json.loads(line[5:].decode("utf-8"))))
            elif line:
                raise ProtocolError("unexpected line from server: %r" % line[:200])


def parse_header_block(block):
    """Return (status_code or None, description, {name: value}) of an HMSG header block."""
    if not block:
        return None, "", {}
    lines = block.decode("utf-8", "replace").split("\r\n")
    first = lines[0]
    status, desc = None, ""
    rest = first[len("NATS/1.0") :].strip()
    if rest:
        code, _, desc = rest.partition(" ")
        if code.isdigit():
            status = int(code)
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return status, desc.strip(), headers


def parse_pub_ack(header_block, payload, subject):
    """Turn a JetStream reply into {"stream", "seq", "duplicate"} or raise a NatsError."""
    status, desc, _ = parse_header_block(header_block)
    if status == 503:
        raise NoStream("no JetStream stream captures subject %r (no responders)" % subject)
    if status is not None and status >= 400:
        raise ServerError("NATS answered %d %s for subject %r" % (status, desc, subject))
    try:
        ack = json.loads(payload.decode("utf-8"))
    except ValueError as exc:
        raise ServerError("unreadable JetStream acknowledgement: %r" % payload[:200]) from exc
    err = ack.get("error")
    if err:
        description = err.get("description", "unknown error")
        code = err.get("err_code")
        if "maximum" in description and ("payload" in description or "message size" in description):
            raise PayloadTooLarge("JetStream refused the message: %s" % description)
        raise ServerError("JetStream refused the message: %s (err_code %s)" % (description, code))
    return {
        "stream": ack.get("stream"),
        "seq": ack.get("seq"),
        "duplicate": bool(ack.get("duplicate", False)),
    }


# --------------------------------------------------------------------------------------
# Envelopes: the message format the worker consumes.
# --------------------------------------------------------------------------------------


def new_event_id():
    return str(uuid.uuid4())


def build_envelope(webhook_url, data_json, webhook_id=None, event_id=None, timestamp=None, headers=None):
    """JSON text of {"webhook_url", "data", "headers", "webhook_id", "event_id", "timestamp"}.

    ``data_json`` is JSON text and is spliced in as it is (not decoded and re-encoded), so
    big numbers and key order reach the receiver unchanged. Secrets (signing keys,
    Authorization values) are never put here: the worker looks them up by webhook_id.
    """
    json.loads(data_json)  # refuse non-JSON early, with a clear error
    parts = [
        '{"webhook_url":' + json.dumps(webhook_url),
        '"data":' + data_json,
        '"headers":' + json.dumps(headers or {}, separators=(",", ":")),
        '"webhook_id":' + json.dumps(webhook_id),
        '"event_id":' + json.dumps(event_id or new_event_id()),
        '"timestamp":' + json.dumps(int(timestamp if timestamp is not None else time.time())),
    ]
    return ",".join(parts) + "}"


# --------------------------------------------------------------------------------------
# nkeys and ed25519 (RFC 8032), for auth_type nkey and credentials.
# --------------------------------------------------------------------------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y, sign):
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 == 0:
        return 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if x & 1 != sign:
        x = _P - x
    return x


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)


def _add(p, q):
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s, p):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _compress(p):
    zinv = pow(p[2], _P - 2, _P)
    x, y = p[0] * zinv % _P, p[1] * zinv % _P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def _expand(seed):
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def ed25519_public_key(seed):
    a, _ = _expand(seed)
    return _compress(_mul(a, _G))


def ed25519_sign(seed, message):
    a, prefix = _expand(seed)
    public = _compress(_mul(a, _G))
    r = int.from_bytes(hashlib.sha512(prefix + message).digest(), "little") % _L
    big_r = _compress(_mul(r, _G))
    k = int.from_bytes(hashlib.sha512(big_r + public + message).digest(), "little") % _L
    s = (r + k * a) % _L
    return big_r + int.to_bytes(s, 32, "little")


_PREFIX_SEED = 18 << 3
_PREFIX_USER = 20 << 3


def _crc16(data):
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _b32decode(text):
    return base64.b32decode(text + "=" * (-len(text) % 8))


def _b32encode(raw):
    return base64.b32encode(raw).decode("ascii").rstrip("=")


def decode_user_seed(seed):
    """Return the 32-byte ed25519 seed of an 'SU...' nkey seed, checking prefix and CRC."""
    try:
        raw = _b32decode(seed.strip())
    except (ValueError, TypeError) as exc:
        raise AuthFailed("the nkey seed is not valid base32") from exc
    if len(raw) != 36:
        raise AuthFailed("the nkey seed has the wrong length")
    data, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if _crc16(data) != crc:
        raise AuthFailed("the nkey seed fails its checksum")
    b1, b2 = data[0], data[1]
    if b1 & 0xF8 != _PREFIX_SEED or (((b1 & 7) << 5) | ((b2 & 0xF8) >> 3)) != _PREFIX_USER:
        raise AuthFailed("the nkey seed is not a user seed (SU...)")
    return bytes(data[2:34])


def encode_user_seed(seed32):
    """'SU...' seed text for 32 bytes of key material (used by tests and tooling)."""
    b1 = _PREFIX_SEED | (_PREFIX_USER >> 5)
    b2 = (_PREFIX_USER & 31) << 3
    data = bytes([b1, b2]) + seed32
    return _b32encode(data + _crc16(data).to_bytes(2, "little"))


def user_public_key(seed32):
    data = bytes([_PREFIX_USER]) + ed25519_public_key(seed32)
    return _b32encode(data + _crc16(data).to_bytes(2, "little"))


def sign_nonce(seed_text, nonce):
    """(public 'U...' key, base64url signature of the server nonce)."""
    seed32 = decode_user_seed(seed_text)
    sig = ed25519_sign(seed32, nonce.encode("utf-8"))
    return user_public_key(seed32), base64.urlsafe_b64encode(sig).decode("ascii").rstrip("=")


_CREDS = re.compile(r"-{3,}[^\n]*BEGIN ([A-Z ]+)-{3,}\s*\n(.*?)\n\s*-{3,}[^\n]*END", re.S)


def parse_creds(text):
    """(jwt, seed) from the text of a NATS .creds file."""
    found = {}
    for kind, body in _CREDS.findall(text):
        found.setdefault("jwt" if "JWT" in kind else "seed", body.strip())
    if "jwt" not in found or "seed" not in found:
        raise AuthFailed("the credentials file has no user JWT and nkey seed")
    return found["jwt"], found["seed"]


# --------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------


def parse_server_url(url):
    """(scheme, host, port) of nats://host:port or tls://host:port."""
    m = re.match(r"^(nats|tls)://(?:[^@/]*@)?(\[[^\]]+\]|[^:/]+)(?::(\d+))?/?$", url or "")
    if not m:
        raise ConnectFailed("invalid NATS server URL %r" % (url,))
    host = m.group(2).strip("[]")
    return m.group(1), host, int(m.group(3) or 4222)


class Client:
    """A blocking NATS client: one socket, one reply subscription, bounded timeouts."""

    def __init__(
        self,
        servers,
        user=None,
        password=None,
        token=None,
        creds_file=None,
        nkey_seed=None,
        tls=False,
        tls_ca_file=None,
        tls_cert_file=None,
        tls_key_file=None,
        connect_timeout=2.0,
        name="pgnats",
    ):
        self.servers = list(servers)
        self.user, self.password, self.token = user, password, token
        self.creds_file, self.nkey_seed = creds_file, nkey_seed
        self.tls, self.tls_ca_file = tls, tls_ca_file
        self.tls_cert_file, self.tls_key_file = tls_cert_file, tls_key_file
        self.connect_timeout = connect_timeout
        self.name = name
        self.sock = None
        self.info = {}
        self.parser = None
        self.inbox = None
        self.counter = 0
        self.connected_url = None

    # -- connection ----------------------------------------------------------------

    def connect(self):
        errors = []
        for url in self.servers:
            try:
                self._connect_one(url)
                self.connected_url = url
                return
            except AuthFailed:
                self.close()
                raise
            except (OSError, NatsError) as exc:
                self.close()
                errors.append("%s: %s" % (url, exc))
        raise ConnectFailed("cannot connect to NATS (%s)" % "; ".join(errors))

    def _connect_one(self, url):
        scheme, host, port = parse_server_url(url)
        deadline = time.monotonic() + self.connect_timeout
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.parser = Parser()
        info = None
        while info is None:
            for op in self._read_ops(deadline):
                if op[0] == "INFO":
                    info = op[1]
        self.info = info
        if scheme == "tls" or self.tls or info.get("tls_required"):
            ctx = ssl.create_default_context(cafile=self.tls_ca_file)
            if self.tls_cert_file:
                ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
            self.sock = ctx.wrap_socket(self.sock, server_hostname=host)
        options = {
            "verbose": False,
            "pedantic": False,
            "lang": "python-plpython",
            "version": VERSION,
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "name": self.name,
            "tls_required": bool(scheme == "tls" or self.tls),
        }
        if self.user is not None:
            options["user"], options["pass"] = self.user, self.password or ""
        if self.token is not None:
            options["auth_token"] = self.token
        nonce = info.get("nonce")
        if self.creds_file:
            try:
                with open(self.creds_file, encoding="utf-8") as fh:
                    jwt, seed = parse_creds(fh.read())
            except OSError as exc:
                raise AuthFailed("cannot read the credentials file %s: %s" % (self.creds_file, exc)) from exc
            options["jwt"] = jwt
            if nonce:
                options["sig"] = sign_nonce(seed, nonce)[1]
        elif self.nkey_seed:
            if not nonce:
                raise AuthFailed("the server sent no nonce: it is not configured for nkey authentication")
            options["nkey"], options["sig"] = sign_nonce(self.nkey_seed, nonce)
        self.inbox = "_INBOX." + uuid.uuid4().hex
        self.sock.sendall(encode_connect(options) + ("SUB %s.* 1\r\n" % self.inbox).encode() + b"PING\r\n")
        while True:
            for op in self._read_ops(deadline):
                if op[0] == "PONG":
                    return
                if op[0] == "ERR":
                    msg = op[1]
                    if "authorization" in msg.lower() or "authentication" in msg.lower():
                        raise AuthFailed("NATS refused the credentials: %s" % msg)
                    raise ServerError("NATS refused the connection: %s" % msg)

    def close(self):
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        self.parser = None

    def _read_ops(self, deadline, spin=0.0):
        data = None
        if spin > 0 and not isinstance(self.sock, ssl.SSLSocket):
            # A JetStream ack usually arrives within a few hundred microseconds; polling for it
            # costs less than putting this backend to sleep and waking it up again.
            self.sock.setblocking(False)
            until = time.perf_counter() + spin
            while data is None:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    if time.perf_counter() > until:
                        break
        if data is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout("timed out waiting for NATS")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout as exc:
                raise RequestTimeout("timed out waiting for NATS") from exc
        if not data:
            raise ConnectFailed("NATS closed the connection")
        ops = self.parser.feed(data)
        out = []
        for op in ops:
            if op[0] == "PING":
                self.sock.sendall(b"PONG\r\n")
            else:
                out.append(op)
        return out

    def _drain_idle(self):
        """Handle what arrived while idle (PINGs, -ERR, EOF) so a dead connection is noticed before use."""
        while self.sock is not None:
            ready, _, _ = select.select([self.sock], [], [], 0)
            if not ready:
                return
            try:
                self._read_ops(time.monotonic() + 1.0)
            except NatsError:
                self.close()
                return
            except OSError:
                self.close()
                return

    def ensure_connected(self):
        if self.sock is not None:
            self._drain_idle()
        if self.sock is None:
            self.connect()

    # -- requests ------------------------------------------------------------------

    def request(self, subject, payload, header_items=None, timeout=5.0):
        """Publish with a reply subject and return (header_block, payload) of the reply."""
        self.ensure_connected()
        max_payload = self.info.get("max_payload")
        size = len(payload) + (len(encode_headers(header_items)) if header_items else 0)
        if max_payload and size > max_payload:
            raise PayloadTooLarge(
                "message of %d bytes exceeds the server's max_payload of %d bytes" % (size, max_payload)
            )
        self.counter += 1
        reply = "%s.%d" % (self.inbox, self.counter)
        deadline = time.monotonic() + timeout
        try:
            self.sock.sendall(encode_pub(subject, reply, payload, header_items))
            while True:
                for op in self._read_ops(deadline, SPIN_SECONDS):
                    if op[0] == "MSG" and op[1] == reply:
                        return op[4], op[5]
                    if op[0] == "ERR":
                        raise ServerError("NATS error: %s" % op[1])
        except RequestTimeout:
            # A late reply would be mistaken for the next one's; start clean.
            self.close()
            raise
        except (OSError, ConnectFailed) as exc:
            self.close()
            raise ConnectFailed("lost the connection to NATS during the request: %s" % exc) from exc
        except ProtocolError:
            self.close()
            raise

    def publish(self, subject, payload, headers=None, msg_id=None, timeout=5.0):
        """Publish to JetStream and wait for the PubAck: {"stream", "seq", "duplicate"}."""
        validate_subject(subject)
        items = normalize_headers(headers)
        if msg_id:
            msg_id = validate_message_id(str(msg_id))
            items = [(k, v) for k, v in items if k.lower() != "nats-msg-id"] + [("Nats-Msg-Id", msg_id)]
        hdr, body = self.request(subject, payload, items, timeout)
        return parse_pub_ack(hdr, body, subject)

    def js_api(self, api, body=b"", timeout=5.0):
        hdr, reply = self.request("$JS.API." + api, body, None, timeout)
        status, _desc, _ = parse_header_block(hdr)
        if status == 503:
            raise ServerError("JetStream is not enabled for this account (no responders on $JS.API)")
        return json.loads(reply.decode("utf-8"))

    def rtt(self, timeout=5.0):
        self.ensure_connected()
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        self.sock.sendall(b"PING\r\n")
        while True:
            for op in self._read_ops(deadline):
                if op[0] == "PONG":
                    return (time.perf_counter() - start) * 1000.0


# --------------------------------------------------------------------------------------
# Glue for the SQL functions
# --------------------------------------------------------------------------------------

_CONFIG_SQL = """
SELECT config_name, nats_url, nats_cluster_urls, auth_type, nats_user, nats_password, auth_token,
       auth_credentials_file, auth_nkey_seed, tls_enabled, tls_ca_file, tls_cert_file, tls_key_file,
       connect_timeout_seconds::float8 AS connect_timeout, request_timeout_seconds::float8 AS request_timeout,
       publish_registered_subjects_only AS registered_only, updated_at::text AS version
  FROM public.rule_nats_config WHERE config_name = $1
"""

# The subject filters that SQL publishes may target (publish_registered_subjects_only).
_STREAM_SUBJECTS_SQL = """
SELECT coalesce(array_agg(f), '{}') AS filters
  FROM public.rule_nats_streams s, unnest(s.subjects) AS f
 WHERE s.enabled AND s.config_name = $1
"""

# History rows are collected per transaction and written in one statement when it commits
# (a deferred constraint trigger calls Publisher.flush_history): one INSERT per publish
# cost as much as the JetStream round trip itself.
_HISTORY_SQL = """
INSERT INTO public.rule_nats_publish_history
    (published_at, config_name, webhook_id, subject, payload, headers, message_id, stream_name,
     sequence_number, duplicate, success, error_message, latency_ms, triggered_by)
SELECT to_timestamp(r.at), r.config_name, r.webhook_id, r.subject, r.payload::jsonb, r.headers::jsonb,
       r.message_id, r.stream_name, r.seq, coalesce(r.duplicate, false), r.success, r.error, r.latency_ms,
       r.triggered_by
  FROM unnest($1::float8[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::text[],
              $8::text[], $9::int8[], $10::bool[], $11::bool[], $12::text[], $13::float8[], $14::text[])
       AS r(at, config_name, webhook_id, subject, payload, headers, message_id, stream_name, seq, duplicate,
            success, error, latency_ms, triggered_by)
"""
_FAILURE_SQL = "SELECT public.rule_nats__record_failure_autonomously($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8) AS recorded"


def sqlstate_of(err):
    """The SQLSTATE a failed publish is raised with by the SQL functions (PostgreSQL's classes)."""
    return SQLSTATES.get(err.reason, "58000")


def error_info(err, latency_ms=None):
    """What the SQL wrappers raise (or rule_nats_try_publish returns) for a failed publish."""
    out = {
        "ok": False,
        "error": str(err),
        "reason": err.reason,
        "hint": err.hint,
        "sqlstate": sqlstate_of(err),
    }
    if latency_ms is not None:
        out["latency_ms"] = round(latency_ms, 3)
    return out


# Errors in the caller's arguments: SQLSTATE 22023 (invalid_parameter_value), not a NATS error.
INVALID_ARGUMENT_REASONS = frozenset(
    (
        "invalid_subject",
        "invalid_header",
        "invalid_payload",
        "invalid_message_id",
        "invalid_url",
        "reserved_subject",
        "unregistered_subject",
    )
)

# One SQLSTATE per reason, from PostgreSQL's own classes, so that callers can tell a bad argument
# (22...) from a missing object (42704) from a connection problem (08...) without parsing text.
SQLSTATES = {
    "invalid_subject": "22023",
    "invalid_header": "22023",
    "invalid_payload": "22P02",
    "invalid_message_id": "22023",
    "invalid_url": "22023",
    "reserved_subject": "22023",
    "unregistered_subject": "22023",
    "no_config": "42704",
    "no_stream": "42704",
    "nats_unreachable": "08001",
    "nats_auth": "08004",
    "timeout": "08006",
    "protocol_error": "08P01",
    "payload_too_large": "54000",
    "server_error": "58000",
    "nats_error": "58000",
}
_TXID_SQL = "SELECT txid_current() AS t"
_MARK_SQL = "INSERT INTO rule_nats_private.history_flush (txid) VALUES ($1)"
_UNMARK_SQL = "DELETE FROM rule_nats_private.history_flush WHERE txid = $1"


def client_from_config(row):
    auth = row["auth_type"]
    servers = [row["nats_url"], *(row["nats_cluster_urls"] or [])]
    return Client(
        servers,
        user=row["nats_user"] if auth == "user_password" else None,
        password=row["nats_password"] if auth == "user_password" else None,
        token=row["auth_token"] if auth == "token" else None,
        creds_file=row["auth_credentials_file"] if auth == "credentials" else None,
        nkey_seed=row["auth_nkey_seed"] if auth == "nkey" else None,
        tls=row["tls_enabled"],
        tls_ca_file=row["tls_ca_file"],
        tls_cert_file=row["tls_cert_file"],
        tls_key_file=row["tls_key_file"],
        connect_timeout=row["connect_timeout"],
        name="postgres pid %d" % os.getpid(),
    )


class Publisher:
    """Per-session state kept in GD: prepared plans and one client per configuration."""

    def __init__(self, plpy):
        self.plpy = plpy
        self.config_plan = plpy.prepare(_CONFIG_SQL, ["text"])
        self.history_plan = plpy.prepare(
            _HISTORY_SQL,
            [
                "float8[]",
                "text[]",
                "int4[]",
                "text[]",
                "text[]",
                "text[]",
                "text[]",
                "text[]",
                "int8[]",
                "bool[]",
                "bool[]",
                "text[]",
                "float8[]",
                "text[]",
            ],
        )
        self.txid_plan = plpy.prepare(_TXID_SQL)
        self.streams_plan = plpy.prepare(_STREAM_SUBJECTS_SQL, ["text"])
        self.filters = {}  # config_name -> (filters, checked_at)
        self.warned_unrecorded = False
        self.failure_plan = plpy.prepare(
            _FAILURE_SQL, ["text", "int4", "text", "text", "text", "text", "text", "float8"]
        )
        self.mark_plan = plpy.prepare(_MARK_SQL, ["int8"])
        self.unmark_plan = plpy.prepare(_UNMARK_SQL, ["int8"])
        self.pending = []  # history rows of the current transaction, written at commit
        self.pending_txid = None
        self.clients = {}  # config_name -> (version, Client, request_timeout, checked_at, registered_only)

    def client(self, config_name):
        """The client for a configuration, re-reading the row at most every CONFIG_TTL seconds.

        Reading rule_nats_config on every call cost as much as the rest of the call; a
        change made in this session applies at once (the table's trigger calls
        invalidate()), one made elsewhere within CONFIG_TTL seconds.
        """
        now = time.monotonic()
        cached = self.clients.get(config_name)
        if cached is not None and now - cached[3] < CONFIG_TTL:
            return cached[1], cached[2]
        rows = self.plpy.execute(self.config_plan, [config_name])
        if not rows:
            raise ConfigMissing("no NATS configuration named %r in rule_nats_config" % (config_name,))
        row = rows[0]
        if cached is not None and cached[0] == row["version"]:
            self.clients[config_name] = (cached[0], cached[1], cached[2], now, cached[4])
            return cached[1], cached[2]
        if cached is not None:
            cached[1].close()
        client = client_from_config(row)
        self.clients[config_name] = (
            row["version"],
            client,
            row["request_timeout"],
            now,
            row["registered_only"],
        )
        return client, row["request_timeout"]

    def check_registered(self, config_name, subject):
        """Refuse a subject no enabled registered stream of the configuration captures (unless allowed).

        Read with the configuration (at most every CONFIG_TTL seconds): a publisher may only
        reach the streams a DBA registered, not every stream its NATS account can see.
        """
        if not self.clients[config_name][4]:
            return
        now = time.monotonic()
        cached = self.filters.get(config_name)
        if cached is None or now - cached[1] >= CONFIG_TTL:
            cached = (self.plpy.execute(self.streams_plan, [config_name])[0]["filters"], now)
            self.filters[config_name] = cached
        for pattern in cached[0]:
            if subject_matches(pattern, subject):
                return
        raise UnregisteredSubject(
            "subject %r is not captured by a registered stream of configuration %r"
            % (subject[:200], config_name)
        )

    def invalidate(self):
        """Forget when configurations were last read, so the next call re-reads them."""
        for name, cached in list(self.clients.items()):
            self.clients[name] = (cached[0], cached[1], cached[2], float("-inf"), cached[4])
        self.filters.clear()

    def record(
        self,
        config_name,
        webhook_id,
        subject,
        payload,
        headers,
        msg_id,
        result,
        error,
        latency_ms,
        triggered_by="sql",
    ):
        """Queue a history row; it is written when the transaction commits."""
        txid = self.plpy.execute(self.txid_plan)[0]["t"]
        if txid != self.pending_txid:
            if self.pending:
                # Left over from a transaction that rolled back: its publishes did happen.
                self._write(self.pending)
            self.pending = []
            self.pending_txid = txid
            self.plpy.execute(self.mark_plan, [txid])
        self.pending.append(
            (
                time.time(),
                config_name,
                webhook_id,
                subject,
                payload,
                json.dumps(redact_headers(headers)) if headers else None,
                msg_id,
                result.get("stream") if result else None,
                result.get("seq") if result else None,
                result.get("duplicate") if result else None,
                error is None,
                error,
                latency_ms,
                triggered_by,
            )
        )

    def record_failure(self, config_name, webhook_id, subject, payload, headers, msg_id, err, latency_ms):
        """Record a failed publish in its own transaction: the caller is about to get an error."""
        hdr = json.dumps(redact_headers(headers)) if headers else None
        recorded = False
        try:
            with self.plpy.subtransaction():
                recorded = self.plpy.execute(
                    self.failure_plan,
                    [config_name, webhook_id, subject, payload, hdr, msg_id, str(err), latency_ms],
                )[0]["recorded"]
        except self.plpy.SPIError as exc:
            self.plpy.warning("rule_nats: failure not recorded: %s" % exc)
        if not recorded and not self.warned_unrecorded:
            # Once per session: the failure row of a raising publish dies with the caller's
            # transaction unless a superuser enabled the failure log (docs/security.md).
            self.warned_unrecorded = True
            self.plpy.warning(
                "rule_nats: failed publishes are not recorded in rule_nats_publish_history in this database "
                "(the failure log is not enabled); see docs/security.md"
            )

    def flush_history(self):
        """Write the queued rows (called at commit by the deferred trigger)."""
        rows, self.pending = self.pending, []
        if rows:
            self._write(rows)
        if self.pending_txid is not None:
            self.plpy.execute(self.unmark_plan, [self.pending_txid])

    def _write(self, rows):
        self.plpy.execute(self.history_plan, [list(col) for col in zip(*rows, strict=True)])

    def publish(
        self, subject, payload, headers_json=None, msg_id=None, config_name="default", webhook_id=None
    ):
        """Publish JSON text ``payload``; return (result dict, error NatsError or None, latency_ms, headers)."""
        headers = None
        start = time.perf_counter()
        try:
            if headers_json is not None:
                headers = json.loads(headers_json)
            validate_subject(subject)
            check_sql_publish(headers, msg_id)
            client, timeout = self.client(config_name)
            self.check_registered(config_name, subject)
            result = client.publish(subject, payload.encode("utf-8"), headers, msg_id, timeout)
            return result, None, (time.perf_counter() - start) * 1000.0, headers
        except NatsError as exc:
            return None, exc, (time.perf_counter() - start) * 1000.0, headers

    def health(self, config_name):
        out = {"config_name": config_name}
        try:
            client, timeout = self.client(config_name)
            client.ensure_connected()
            out["connected_url"] = client.connected_url
            out["server_version"] = client.info.get("version")
            out["server_name"] = client.info.get("server_name")
            out["max_payload"] = client.info.get("max_payload")
            out["jetstream"] = bool(client.info.get("jetstream"))
            out["rtt_ms"] = round(client.rtt(timeout), 3)
            account = client.js_api("INFO", b"", timeout)
            if "error" in account:
                out["jetstream_error"] = account["error"].get("description")
            else:
                out["jetstream_account"] = {
                    k: account.get(k) for k in ("memory", "storage", "streams", "consumers", "limits", "api")
                }
            out["ok"] = True
        except NatsError as exc:
            out["ok"] = False
            out["error"] = str(exc)
            out["reason"] = exc.reason
        return out
$pgnats$::text$pgnats_fn$;
COMMENT ON FUNCTION rule_nats__pgnats_source() IS 'Internal: source of the pgnats PL/Python module (plpython/pgnats.py).';
-- END EMBEDDED plpython/pgnats.py

-- ---------------------------------------------------------------------------
-- search_path pinned on every function a CHECK, a generated column or a definer function calls
-- (tests/security/test_search_path_catalog.py finds them in the catalog). SQL functions with a SET
-- clause are no longer inlined: each call costs a function call, the price of not letting the
-- writer's operators decide the registry's CHECKs.
-- ---------------------------------------------------------------------------
DO $pin$
DECLARE
    f regprocedure;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'rule_nats_valid_name(text)',
        'rule_nats_valid_subject(text, boolean)',
        'rule_nats_valid_subjects(text[], boolean)',
        'rule_nats_valid_server_url(text)',
        'rule_nats_valid_server_urls(text[])',
        'rule_nats_subject_reserved(text)',
        'rule_nats_subjects_reserved(text[])',
        'rule_nats_valid_header_name(text)',
        'rule_nats_valid_header_value(text)',
        'rule_nats_valid_headers(jsonb)',
        'rule_nats_valid_message_id(text)',
        'rule_nats_valid_webhook_url(text)',
        'rule_nats_subjects_pattern(text[])',
        'rule_nats_subject_matches(text, text)',
        'rule_nats_subjects_overlap(text, text)',
        'rule_nats_hist_add(bigint[], double precision)',
        'rule_nats_latency_bucket(double precision)',
        'rule_nats_hist_merge(bigint[], bigint[])',
        'rule_nats__null_argument(text, text, text)',
        'rule_nats__raise(text, jsonb)',
        'rule_nats__pgnats_source()',
        'rule_nats_private.random_secret()'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$pin$;

-- The CHECK of every outbox row calls rule_nats_valid_subject: as a SQL function with a SET clause
-- it is no longer inlined and starts an executor per row (rule_nats_publish_on_commit fell from
-- 17,100 to 13,000 rows/s); plpgsql evaluates the same expression as a simple expression. Same
-- rule, same answers (NULL in, NULL out), checked against the shared table of cases.
CREATE OR REPLACE FUNCTION rule_nats_valid_subject(p_subject text, p_allow_wildcards boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN length(p_subject) BETWEEN 1 AND 1024
       AND p_subject !~ '[\x01-\x20\x7f-\x9f]'
       AND CASE WHEN p_allow_wildcards
                THEN p_subject ~ '^(([^.*>]+|\*)\.)*([^.*>]+|\*|>)$'
                ELSE p_subject ~ '^([^.*>]+\.)*[^.*>]+$'
           END;
END
$$;

-- Owner of the redefined definer functions, as in 0006 (CREATE OR REPLACE keeps owner and grants).
ALTER FUNCTION rule_nats_publish_on_commit(text, jsonb, jsonb, text, text) OWNER TO rule_nats_definer;
ALTER FUNCTION rule_nats_enqueue_row_event(text, text, jsonb) OWNER TO rule_nats_definer;
ALTER FUNCTION rule_nats_replay_dead_letter(bigint) OWNER TO rule_nats_definer;
ALTER FUNCTION rule_webhook_publish_nats(integer, jsonb, text) OWNER TO rule_nats_definer;

-- The new rule functions keep the default EXECUTE for everyone, like the other validation helpers.

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (16, 'identities');
