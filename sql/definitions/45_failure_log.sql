-- sql/definitions/45_failure_log.sql: the current definition of these objects (docs/schema.md).
--
-- The failure log: a failed rule_nats_publish() is recorded despite the caller's rollback,
-- through a loopback dblink connection as this installation's failure-writer role
-- (docs/security.md, "Failure log").
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

CREATE OR REPLACE FUNCTION rule_nats__record_failure_autonomously(
    p_config_name text, p_webhook_id integer, p_subject text, p_payload jsonb, p_headers jsonb,
    p_message_id text, p_error text, p_latency_ms double precision
) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_had text[] := coalesce(rule_nats_private.dblink_get_connections(), '{}');
    v_conn text;
BEGIN
    v_conn := rule_nats_private.failure_log_connection();
    IF v_conn IS NULL THEN
        RETURN false;
    END IF;
    PERFORM 1 FROM rule_nats_private.dblink(v_conn, format(
        'SELECT public.rule_nats__insert_failure(%L, %L, %L, %L, %L, %L, %L, %L)',
        p_config_name, p_webhook_id, p_subject, p_payload, p_headers, p_message_id, p_error, p_latency_ms))
        AS t(inserted text);
    -- A connection opened for this one write is closed again: application sessions that failed
    -- once must not hold the role's few connections (its limit) while other failures wait.
    IF NOT v_conn = ANY (v_had) THEN
        PERFORM rule_nats_private.dblink_disconnect(v_conn);
    END IF;
    PERFORM setval('rule_nats_private.failure_log_ok_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN true;
EXCEPTION WHEN OTHERS THEN
    BEGIN
        IF v_conn IS NOT NULL AND NOT v_conn = ANY (v_had)
           AND v_conn = ANY (coalesce(rule_nats_private.dblink_get_connections(), '{}')) THEN
            PERFORM rule_nats_private.dblink_disconnect(v_conn);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        NULL;  -- the WARNING below is what matters
    END;
    -- Marked outside the transaction (a sequence is not rolled back): nats_failure_log_status.
    PERFORM setval('rule_nats_private.failure_log_failed_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    PERFORM nextval('rule_nats_private.failure_log_failures');
    RAISE WARNING 'rule_nats: could not record the failed publish in the failure log: %', SQLERRM
        USING HINT = 'SELECT * FROM nats_failure_log_status; SELECT rule_nats_failure_log_check(); a superuser '
                     'checks rule_nats_private.failure_log and pg_hba.conf (docs/security.md).';
    -- NULL, not false: the failure log is enabled but could not record it (PL/Python says so).
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION rule_nats__record_failure_autonomously(text, integer, text, jsonb, jsonb, text, text, double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__record_failure_autonomously(text, integer, text, jsonb, jsonb, text, text, double precision) TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats__record_failure_autonomously(text, integer, text, jsonb, jsonb, text, text, double precision) IS
    'Internal: writes a failed-publish history row in a separate transaction through the failure log '
    '(rule_nats_private.failure_log); false when it is not enabled.';

CREATE OR REPLACE FUNCTION rule_nats__insert_failure(
    p_config_name text, p_webhook_id integer, p_subject text, p_payload jsonb, p_headers jsonb,
    p_message_id text, p_error text, p_latency_ms double precision
) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO public.rule_nats_publish_history (config_name, webhook_id, subject, payload, headers, message_id,
                                                  success, error_message, latency_ms, triggered_by)
    VALUES (p_config_name, p_webhook_id, p_subject, p_payload, p_headers, p_message_id, false, p_error,
            p_latency_ms, 'sql')
$$;
ALTER FUNCTION rule_nats__insert_failure(text, integer, text, jsonb, jsonb, text, text, double precision) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats__insert_failure(text, integer, text, jsonb, jsonb, text, text, double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__insert_failure(text, integer, text, jsonb, jsonb, text, text, double precision) TO rule_nats_failure_writer;
COMMENT ON FUNCTION rule_nats__insert_failure(text, integer, text, jsonb, jsonb, text, text, double precision) IS
    'Internal: the only thing rule_nats_failure_writer may do: insert a failed-publish history row.';

CREATE OR REPLACE FUNCTION rule_nats_private.enable_failure_log(
    p_password text, p_conninfo text DEFAULT NULL, p_connection_limit integer DEFAULT 20
) RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_role name := public.rule_nats_role('failure_writer');
BEGIN
    IF p_password IS NULL THEN
        EXECUTE format('ALTER ROLE %I NOLOGIN PASSWORD NULL', v_role);
        UPDATE rule_nats_private.failure_log SET conninfo = NULL, updated_at = now();
        RETURN;
    END IF;
    IF p_connection_limit IS NULL OR p_connection_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'the failure log''s connection limit must be 1 to 1000, not %', p_connection_limit
            USING ERRCODE = '22023', HINT = 'A failed publish, or a check, holds one connection while it writes or checks.';
    END IF;
    -- The installation's own role: enabling it here changes no other database's failure log. A
    -- session's kept connection (the check's) ends after 10 s idle and is opened again when needed.
    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L CONNECTION LIMIT %s', v_role, p_password, p_connection_limit);
    EXECUTE format('ALTER ROLE %I SET idle_session_timeout = %L', v_role, '10s');
    UPDATE rule_nats_private.failure_log
       SET conninfo = coalesce(p_conninfo, format('host=127.0.0.1 port=%s', current_setting('port')))
                      || ' password=''' || replace(replace(p_password, '\', '\\'), '''', '\''') || '''',
           updated_at = now();
END
$$;
REVOKE ALL ON FUNCTION rule_nats_private.enable_failure_log(text, text, integer) FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_private.enable_failure_log(text, text, integer) IS
    'Superusers only: lets this installation''s failure-writer role (rule_nats_role(''failure_writer'')) log in with this '
    'password, at most p_connection_limit sessions at once, and records how to reach the server (default host=127.0.0.1 '
    'and this server''s port; any authentication method works, trust included). NULL disables.';

CREATE OR REPLACE FUNCTION rule_nats_failure_log_check()
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_detail text;
    v_conn text;
    v_now bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    v_ok bigint;
    v_failed bigint;
    v_changed bigint;
BEGIN
    IF (SELECT conninfo FROM rule_nats_private.failure_log) IS NULL THEN
        RETURN 'not enabled: a failed publish from SQL is recorded only if its transaction commits; a superuser '
               'enables the failure log with SELECT rule_nats_private.enable_failure_log(''password'')';
    END IF;
    IF to_regprocedure('rule_nats_private.dblink_connect_u(text,text)') IS NULL THEN
        RETURN 'dblink is not installed in schema rule_nats_private';
    END IF;
    -- A success less than 5 s ago (a check or a write through the failure log), after the last
    -- failure and after the failure log last changed, answers for this check: a caller that
    -- checks in a loop opens at most one backend per 5 s, whichever session it uses.
    SELECT last_value INTO v_ok FROM rule_nats_private.failure_log_ok_at;
    SELECT last_value INTO v_failed FROM rule_nats_private.failure_log_failed_at;
    SELECT (extract(epoch FROM updated_at) * 1000)::bigint INTO v_changed FROM rule_nats_private.failure_log;
    IF v_ok > v_now - 5000 AND v_ok >= v_failed AND v_ok >= coalesce(v_changed, 0) THEN
        RETURN NULL;
    END IF;
    -- Connect, SELECT 1, disconnect: the caller (a read-only monitor, say) holds none of the
    -- role's few connections once the call returns, so failed publishes still find one.
    v_conn := rule_nats_private.failure_log_connection();
    PERFORM 1 FROM rule_nats_private.dblink(v_conn, 'SELECT 1') AS t(one integer);
    PERFORM rule_nats_private.dblink_disconnect(v_conn);
    PERFORM setval('rule_nats_private.failure_log_ok_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
    BEGIN
        FOREACH v_conn IN ARRAY coalesce(rule_nats_private.dblink_get_connections(), '{}') LOOP
            IF v_conn LIKE 'rule\_nats\_failure\_log\_%' THEN
                PERFORM rule_nats_private.dblink_disconnect(v_conn);
            END IF;
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        NULL;  -- the answer below is what matters
    END;
    PERFORM setval('rule_nats_private.failure_log_failed_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN SQLERRM || coalesce(': ' || nullif(v_detail, ''), '');
END
$$;
ALTER FUNCTION rule_nats_failure_log_check() OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_failure_log_check() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_failure_log_check() TO rule_nats_monitor, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_failure_log_check() IS
    'Connects through the failure log as a failed publish would: NULL when it works, else why (the server''s words, '
    'without the password). nats_failure_log_status shows the result.';

CREATE OR REPLACE FUNCTION rule_nats_private.failure_log_connection()
RETURNS text LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c_name text;
    v_conninfo text;
    v_old text;
BEGIN
    SELECT conninfo INTO v_conninfo FROM rule_nats_private.failure_log;
    -- The connection is named after what it was opened with: once a superuser changes the
    -- failure log (or disables it), the session's old connection is closed, not used.
    c_name := 'rule_nats_failure_log_' || md5(coalesce(v_conninfo, '') || public.rule_nats_role('failure_writer'));
    FOREACH v_old IN ARRAY coalesce(rule_nats_private.dblink_get_connections(), '{}') LOOP
        IF v_old LIKE 'rule\_nats\_failure\_log\_%' AND (v_old <> c_name OR v_conninfo IS NULL) THEN
            PERFORM rule_nats_private.dblink_disconnect(v_old);
        END IF;
    END LOOP;
    IF v_conninfo IS NULL OR to_regprocedure('rule_nats_private.dblink_connect_u(text,text)') IS NULL THEN
        RETURN NULL;
    END IF;
    IF c_name = ANY (coalesce(rule_nats_private.dblink_get_connections(), '{}')) THEN
        BEGIN
            -- The session's connection may have ended (idle_session_timeout, a restart).
            PERFORM 1 FROM rule_nats_private.dblink(c_name, 'SELECT 1') AS t(one integer);
            RETURN c_name;
        EXCEPTION WHEN OTHERS THEN
            PERFORM rule_nats_private.dblink_disconnect(c_name);
        END;
    END IF;
    -- libpq takes the last value of a repeated keyword: the login and the database are ours.
    PERFORM rule_nats_private.dblink_connect_u(c_name, 'connect_timeout=5 ' || v_conninfo
        || ' user=''' || replace(public.rule_nats_role('failure_writer'), '''', '\''')
        || ''' application_name=rule_nats_failure_log dbname='''
        || replace(replace(current_database(), '\', '\\'), '''', '\''') || '''');
    RETURN c_name;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_private.failure_log_connection() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_private.failure_log_connection() TO rule_nats_definer;
COMMENT ON FUNCTION rule_nats_private.failure_log_connection() IS
    'Internal: the name of this session''s dblink connection through the failure log, opened (or checked) for its caller, '
    'which closes it when done (NULL when the failure log is not enabled); raises when it cannot connect.';

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('45_failure_log.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
