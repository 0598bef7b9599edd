-- sql/definitions/40_publish.sql: the current definition of these objects (docs/schema.md).
--
-- Publishing from SQL: rule_nats_publish (now, through NATS), rule_nats_try_publish,
-- rule_nats_publish_on_commit and rule_nats_enqueue_row_event (through the outbox, after commit), the
-- table trigger, and the PL/Python functions that run plpython/pgnats.py (30_pgnats.sql).
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

-- A new GD key: a session that loaded the module of 0006 loads this one.
CREATE OR REPLACE FUNCTION rule_nats__load()
RETURNS void LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $py$
if "pgnats_publisher7" not in GD:
    import types
    src = plpy.execute("SELECT public.rule_nats__pgnats_source() AS s")[0]["s"]
    mod = types.ModuleType("pgnats")
    exec(compile(src, "pgnats.py", "exec"), mod.__dict__)
    GD["pgnats7"] = mod
    GD["pgnats_publisher7"] = mod.Publisher(plpy)
$py$;
REVOKE ALL ON FUNCTION rule_nats__load() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__load() TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats__load() IS 'Internal: loads the embedded pgnats module into this session (once).';

CREATE OR REPLACE FUNCTION rule_nats__flush_history()
RETURNS trigger LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $py$
pub = GD.get("pgnats_publisher7")
if pub is not None:
    pub.flush_history()
return None
$py$;
ALTER FUNCTION rule_nats__flush_history() OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats__flush_history() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats__flush_history() IS 'Internal deferred trigger: writes the publish history rows of the committing transaction.';

CREATE OR REPLACE FUNCTION rule_nats__config_invalidate()
RETURNS trigger LANGUAGE plpython3u
AS $py$
pub = GD.get("pgnats_publisher7")
if pub is not None:
    pub.invalidate()
$py$;
REVOKE ALL ON FUNCTION rule_nats__config_invalidate() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats__config_invalidate() IS 'Internal trigger: makes this session re-read rule_nats_config on its next publish.';

CREATE OR REPLACE FUNCTION rule_nats_try_publish(
    subject     text,
    payload     jsonb,
    headers     jsonb DEFAULT NULL,
    msg_id      text  DEFAULT NULL,
    config_name text  DEFAULT 'default'
) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb;
BEGIN
    IF subject IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_try_publish', 'subject', 'e.g. rule_nats_try_publish(''webhooks.orders'', ''{"id": 1}'')');
    ELSIF payload IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_try_publish', 'payload', 'Publish a JSON value, e.g. ''{}'' or ''null''::jsonb.');
    ELSIF config_name IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_try_publish', 'config_name', 'Leave it out for the default configuration.');
    ELSIF headers IS NOT NULL AND jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'rule_nats_try_publish: headers must be a JSON object, not %', jsonb_typeof(headers)
            USING ERRCODE = '22023', HINT = 'e.g. ''{"X-Request-Id": "abc"}''';
    END IF;
    r := public.rule_nats__publish(subject, payload, headers, msg_id, config_name, 'try');
    IF r ? 'raise' THEN
        PERFORM public.rule_nats__raise('rule_nats_try_publish', r);
    END IF;
    RETURN r - 'sqlstate';
END
$$;
ALTER FUNCTION rule_nats_try_publish(text, jsonb, jsonb, text, text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_try_publish(text, jsonb, jsonb, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_try_publish(text, jsonb, jsonb, text, text) TO rule_nats_publisher, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_try_publish(text, jsonb, jsonb, text, text) IS
    'Like rule_nats_publish, but never raises for a failed publish: returns {"ok": false, "error", "reason", "hint"} '
    '(also for a subject no registered stream captures). Invalid arguments (NULL, subject, headers, msg_id, a '
    'reserved subject) still raise. Its history row, failure or not, is written when the caller''s transaction commits.';

CREATE OR REPLACE FUNCTION rule_nats_publish(
    subject     text,
    payload     jsonb,
    headers     jsonb DEFAULT NULL,
    msg_id      text  DEFAULT NULL,
    config_name text  DEFAULT 'default'
) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb;
BEGIN
    IF subject IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish', 'subject', 'e.g. rule_nats_publish(''webhooks.orders'', ''{"id": 1}'')');
    ELSIF payload IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish', 'payload', 'Publish a JSON value, e.g. ''{}'' or ''null''::jsonb.');
    ELSIF config_name IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish', 'config_name', 'Leave it out for the default configuration.');
    ELSIF headers IS NOT NULL AND jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'rule_nats_publish: headers must be a JSON object, not %', jsonb_typeof(headers)
            USING ERRCODE = '22023', HINT = 'e.g. ''{"X-Request-Id": "abc"}''';
    END IF;
    r := public.rule_nats__publish(subject, payload, headers, msg_id, config_name, 'raise');
    IF NOT (r ->> 'ok')::boolean THEN
        PERFORM public.rule_nats__raise('rule_nats_publish', r);
    END IF;
    RETURN r - 'ok';
END
$$;
ALTER FUNCTION rule_nats_publish(text, jsonb, jsonb, text, text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_publish(text, jsonb, jsonb, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_publish(text, jsonb, jsonb, text, text) TO rule_nats_publisher, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_publish(text, jsonb, jsonb, text, text) IS
    'Publishes payload to JetStream on subject and waits for the stream''s acknowledgement: returns '
    '{stream, seq, duplicate, latency_ms}. msg_id becomes the Nats-Msg-Id header (de-duplicated within the '
    'stream''s duplicate window). Errors raise with a HINT; every call is recorded in rule_nats_publish_history '
    '(failures in a separate transaction, so they survive the rollback). Not transactional: use '
    'rule_nats_publish_on_commit for publish-after-commit.';

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
ALTER FUNCTION rule_nats_publish_on_commit(text, jsonb, jsonb, text, text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_publish_on_commit(text, jsonb, jsonb, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_publish_on_commit(text, jsonb, jsonb, text, text) TO rule_nats_publisher, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_publish_on_commit(text, jsonb, jsonb, text, text) IS
    'Queues a publish in the outbox inside the current transaction and returns the outbox_id; the sidecar '
    'publishes it after COMMIT (nothing is published on ROLLBACK). Same arguments as rule_nats_publish.';

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
ALTER FUNCTION rule_webhook_publish_nats(integer, jsonb, text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_webhook_publish_nats(integer, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_webhook_publish_nats(integer, jsonb, text) TO rule_nats_publisher, rule_nats_admin;
COMMENT ON FUNCTION rule_webhook_publish_nats(integer, jsonb, text) IS
    'Publish {"webhook_url", "webhook_id", "data", "event_id", "timestamp"} to the webhook''s nats_subject (at once; '
    'after COMMIT for publish_mode outbox). Returns the original''s {success, webhook_name, subject, stream, sequence, '
    'duplicate, latency_ms} and this project''s {seq, mode, event_id} (outbox: outbox_id, sequence NULL).';

CREATE OR REPLACE FUNCTION rule_nats_health_check(config_name text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $py$
import json
if config_name is None:
    return json.dumps({"config_name": None, "config": None, "ok": False, "success": False, "connected": False,
                       "reason": "no_config", "error": "config_name is NULL: leave it out for the default configuration"})
if "pgnats_publisher7" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
pub = GD["pgnats_publisher7"]
out = pub.health(config_name)
js = plpy.execute(plpy.prepare(
    "SELECT coalesce(jetstream_enabled, true) AS js FROM public.rule_nats_config WHERE config_name = $1", ["text"]),
    [config_name])
ok = bool(out.get("ok"))
cached = pub.clients.get(config_name)
client = cached[1] if cached is not None else None
# The original reported its connection pool. Here a session has one connection per configuration:
# the same keys, describing that connection.
out.update({
    "success": ok, "config": config_name, "connected": ok,
    "jetstream_enabled": bool(js[0]["js"]) if js else False,
    "pool_stats": {
        "total_connections": 1 if client is not None else 0,
        "healthy_connections": 1 if ok else 0,
        "health_percentage": 100.0 if ok else 0.0,
        "requests_served": int(getattr(client, "counter", 0) or 0),
    },
})
if not ok:
    out["message"] = out.get("error")
return json.dumps(out)
$py$;
ALTER FUNCTION rule_nats_health_check(text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_health_check(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_health_check(text) TO rule_nats_admin, rule_nats_monitor, rule_nats_publisher;
COMMENT ON FUNCTION rule_nats_health_check(text) IS
    'Connects and reports: the original''s {success, config, connected, pool_stats, jetstream_enabled} (pool_stats '
    'describes this session''s one connection) and this project''s {ok, connected_url, server_version, rtt_ms, jetstream_account, ...}.';

CREATE OR REPLACE FUNCTION rule_nats_table_trigger()
RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Trigger arguments are strings: '' and NULL (written unquoted, it arrives as 'null') mean none.
    v_subject text := CASE WHEN lower(coalesce(TG_ARGV[0], '')) IN ('', 'null') THEN NULL ELSE TG_ARGV[0] END;
    v_webhook text := CASE WHEN lower(coalesce(TG_ARGV[1], '')) IN ('', 'null') THEN NULL ELSE TG_ARGV[1] END;
BEGIN
    IF TG_LEVEL <> 'ROW' THEN
        RAISE EXCEPTION 'rule_nats_table_trigger must be a FOR EACH ROW trigger' USING ERRCODE = '22023';
    END IF;
    IF v_webhook IS NULL AND v_subject IS NULL THEN
        RAISE EXCEPTION 'rule_nats_table_trigger: a subject or a webhook name is required'
            USING ERRCODE = '22023',
                  HINT = 'CREATE TRIGGER ... EXECUTE FUNCTION rule_nats_table_trigger(''subject'', ''webhook name or null'')';
    END IF;
    PERFORM public.rule_nats_enqueue_row_event(v_subject, v_webhook, jsonb_build_object(
        'operation', TG_OP,
        'schema', TG_TABLE_SCHEMA,
        'table', TG_TABLE_NAME,
        'old', CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END,
        'new', CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN to_jsonb(NEW) END));
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_table_trigger() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_table_trigger() TO rule_nats_publisher, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_table_trigger() IS
    'Row trigger (AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE FUNCTION rule_nats_table_trigger(''subject'', ''webhook name'')): '
    'each row change becomes an outbox event {"operation","schema","table","old","new"}, published after commit. '
    'With a webhook name the event is wrapped in that webhook''s envelope (subject NULL or '''' = the webhook''s nats_subject). '
    'Runs as the role that writes the table, which needs rule_nats_publisher.';

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
REVOKE ALL ON FUNCTION rule_nats__check_publish(text, text, text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__check_publish(text, text, text, jsonb, text) TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats__check_publish(text, text, text, jsonb, text) IS
    'Internal: raises (SQLSTATE 22023, with a hint) unless subject, headers and message id may be published to. '
    'The publish functions call it only when their own fast checks fail, to say why.';

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
ALTER FUNCTION rule_nats_enqueue_row_event(text, text, jsonb) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_enqueue_row_event(text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_enqueue_row_event(text, text, jsonb) TO rule_nats_publisher, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_enqueue_row_event(text, text, jsonb) IS
    'Queues one row event in the outbox (called by rule_nats_table_trigger as the writer of the table, who needs '
    'rule_nats_publisher). With a webhook name the event is wrapped in that webhook''s envelope. Returns the outbox_id.';

CREATE OR REPLACE FUNCTION rule_nats__raise(p_function text, p_failure jsonb)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_message text := p_function || ': ' || coalesce(p_failure ->> 'error', 'failed');
    v_state text := coalesce(p_failure ->> 'sqlstate', '58000');
    v_hint text := p_failure ->> 'hint';
    v_detail text := CASE WHEN p_failure ? 'reason' THEN 'reason: ' || (p_failure ->> 'reason') END;
BEGIN
    -- RAISE refuses NULL options: one statement per combination that occurs.
    IF v_hint IS NOT NULL AND v_detail IS NOT NULL THEN
        RAISE EXCEPTION USING MESSAGE = v_message, ERRCODE = v_state, HINT = v_hint, DETAIL = v_detail;
    ELSIF v_hint IS NOT NULL THEN
        RAISE EXCEPTION USING MESSAGE = v_message, ERRCODE = v_state, HINT = v_hint;
    ELSIF v_detail IS NOT NULL THEN
        RAISE EXCEPTION USING MESSAGE = v_message, ERRCODE = v_state, DETAIL = v_detail;
    ELSE
        RAISE EXCEPTION USING MESSAGE = v_message, ERRCODE = v_state;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION rule_nats__raise(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__raise(text, jsonb) TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats__raise(text, jsonb) IS
    'Internal: raises {"error", "sqlstate", "hint", "reason"} as "<function>: <error>" with that SQLSTATE, HINT and '
    'DETAIL (reason: ...).';

CREATE OR REPLACE FUNCTION rule_nats__null_argument(p_function text, p_argument text, p_hint text)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION '%: % must not be NULL', p_function, p_argument USING ERRCODE = '22004', HINT = p_hint;
END
$$;
REVOKE ALL ON FUNCTION rule_nats__null_argument(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__null_argument(text, text, text) TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats__null_argument(text, text, text) IS 'Internal: raises "<function>: <argument> must not be NULL" (22004).';

CREATE OR REPLACE FUNCTION rule_nats__publish(
    p_subject text, p_payload jsonb, p_headers jsonb, p_msg_id text, p_config_name text, p_mode text
) RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $py$
# p_mode: 'raise' (rule_nats_publish: a failure is recorded in its own transaction, the caller
# raises it) or 'try' (rule_nats_try_publish: recorded with the caller's transaction).
if "pgnats_publisher7" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
mod, pub = GD["pgnats7"], GD["pgnats_publisher7"]
import json
result, err, latency, hdrs = pub.publish(p_subject, p_payload, p_headers, p_msg_id, p_config_name)
if err is None:
    pub.record(p_config_name, None, p_subject, p_payload, hdrs, p_msg_id, result, None, latency)
    return json.dumps(dict(result, ok=True, latency_ms=round(latency, 3)))
info = mod.error_info(err, latency)
if p_mode == "try":
    if err.reason in mod.INVALID_ARGUMENT_REASONS and err.reason != "unregistered_subject":
        info["raise"] = True  # the caller's mistake, not a failed publish: an ERROR
    else:
        pub.record(p_config_name, None, p_subject, p_payload, hdrs, p_msg_id, None, str(err), latency)
    return json.dumps(info)
pub.record_failure(p_config_name, None, p_subject, p_payload, hdrs, p_msg_id, err, latency)
return json.dumps(info)
$py$;
REVOKE ALL ON FUNCTION rule_nats__publish(text, jsonb, jsonb, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__publish(text, jsonb, jsonb, text, text, text) TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats__publish(text, jsonb, jsonb, text, text, text) IS
    'Internal: the PL/Python half of rule_nats_publish and rule_nats_try_publish; returns the acknowledgement or '
    '{"ok": false, "error", "reason", "hint", "sqlstate"}.';

CREATE OR REPLACE FUNCTION rule_nats__webhook_publish(p_webhook_id integer, p_payload jsonb, p_message_id text)
RETURNS jsonb
LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $py$
if "pgnats_publisher7" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
mod, pub = GD["pgnats7"], GD["pgnats_publisher7"]
import json
plan = GD.get("pgnats_webhook_plan_v7")
if plan is None:
    plan = GD["pgnats_webhook_plan_v7"] = plpy.prepare(
        "SELECT webhook_id, url, nats_subject, config_name, publish_mode, enabled, disabled_reason "
        "FROM public.rule_webhooks WHERE webhook_id = $1",
        ["int4"])
rows = plpy.execute(plan, [p_webhook_id])
if not rows:
    return json.dumps({"ok": False, "error": "no webhook with webhook_id %s" % p_webhook_id, "sqlstate": "42704",
                       "hint": "See SELECT webhook_id, webhook_name FROM rule_webhooks."})
w = rows[0]
# Disabled by a DBA: refused. Disabled by the worker (HTTP 410, days of failure; disabled_reason is set):
# accepted and held with the endpoint's other messages, so a remote endpoint cannot break local writes.
if not w["enabled"] and w["disabled_reason"] is None:
    return json.dumps({"ok": False, "error": "webhook %s is disabled" % p_webhook_id, "sqlstate": "55000",
                       "hint": "UPDATE rule_webhooks SET enabled = true WHERE webhook_id = %s" % p_webhook_id})
event_id = p_message_id or mod.new_event_id()
try:
    mod.validate_message_id(event_id)
    mod.validate_subject(w["nats_subject"])
    if w["publish_mode"] == "outbox":
        pub.client(w["config_name"])
        pub.check_registered(w["config_name"], w["nats_subject"])
except mod.NatsError as exc:
    return json.dumps(mod.error_info(exc))
envelope = mod.build_envelope(w["url"], p_payload, webhook_id=p_webhook_id, event_id=event_id)
if w["publish_mode"] == "outbox":
    oplan = GD.get("pgnats_outbox_plan")
    if oplan is None:
        oplan = GD["pgnats_outbox_plan"] = plpy.prepare(
            "INSERT INTO public.rule_nats_outbox (config_name, webhook_id, subject, payload, message_id) "
            "VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING outbox_id", ["text", "int4", "text", "text", "text"])
    oid = plpy.execute(oplan, [w["config_name"], p_webhook_id, w["nats_subject"], envelope, event_id])[0]["outbox_id"]
    return json.dumps({"ok": True, "mode": "outbox", "outbox_id": oid, "event_id": event_id})
result, err, latency, _ = pub.publish(w["nats_subject"], envelope, None, event_id, w["config_name"])
if err is None:
    pub.record(w["config_name"], p_webhook_id, w["nats_subject"], envelope, None, event_id, result, None, latency)
    return json.dumps(dict(result, ok=True, mode="immediate", event_id=event_id, latency_ms=round(latency, 3)))
pub.record_failure(w["config_name"], p_webhook_id, w["nats_subject"], envelope, None, event_id, err, latency)
return json.dumps(mod.error_info(err, latency))
$py$;
REVOKE ALL ON FUNCTION rule_nats__webhook_publish(integer, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__webhook_publish(integer, jsonb, text) TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats__webhook_publish(integer, jsonb, text) IS
    'Internal: the PL/Python half of rule_webhook_publish_nats; returns the result or a failure description.';

CREATE OR REPLACE FUNCTION rule_nats_outbox_retry(p_outbox_id bigint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE public.rule_nats_outbox
       SET status = 'pending', next_attempt_at = '-infinity', error_message = NULL
     WHERE status = 'failed' AND (p_outbox_id IS NULL OR outbox_id = p_outbox_id);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
ALTER FUNCTION rule_nats_outbox_retry(bigint) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_outbox_retry(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_outbox_retry(bigint) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_outbox_retry(bigint) IS
    'Puts failed outbox rows (one by outbox_id, or all) back to pending, e.g. after registering the stream that '
    'was missing; the relay publishes them again with the same message id. Returns how many. To drop them instead: '
    'DELETE FROM rule_nats_outbox WHERE status = ''failed''.';

-- What rule_nats_publish_on_commit checks on every call, in one body: a function with SET costs a
-- search_path switch per call (3-12 us), and five of them doubled what a publish costs. The same
-- rules as rule_nats_valid_subject, rule_nats_subject_reserved, rule_nats_valid_message_id,
-- rule_nats_message_id_reserved and rule_nats_valid_nats_headers (test_identities_sql.py checks
-- that they agree); rule_nats__check_publish says which one failed.
CREATE OR REPLACE FUNCTION rule_nats__publish_args_valid(p_subject text, p_headers jsonb, p_msg_id text)
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

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('40_publish.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
