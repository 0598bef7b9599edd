-- 0006_security: no path from the publisher, monitor or worker roles to superuser, to JetStream
-- administration, to another role's configuration or to a secret (docs/security.md).
--
--  * SECURITY DEFINER functions belong to rule_nats_definer (NOLOGIN, not a superuser, holding
--    only what they need), pin search_path to pg_catalog, pg_temp and evaluate no code of the
--    caller's: the table trigger now runs as the invoker and hands finished jsonb to
--    rule_nats_enqueue_row_event().
--  * A failed publish is recorded through a loopback connection that logs in as
--    rule_nats_failure_writer, configured once by a superuser (rule_nats_private.failure_log);
--    no session setting chooses a host, port, database or login any more.
--  * Subjects reserved by NATS ($JS., $KV., $SYS., any $..., _INBOX) are refused everywhere, and SQL
--    publishes go only to subjects a registered stream captures (publish_registered_subjects_only).
--  * One set of validation rules (tests/security/cases.py): whole-string, no CR, LF or NUL.
--  * The monitor sees no payloads, no URL query strings and no URL credentials; the worker cannot
--    choose a purge age or change existing configuration.
--
-- 0006 to 0012 come in one release. What a later one of them restates is written only there:
-- the PL/Python module and the publish functions built on it (0007), rule_nats_publish_on_commit
-- (0011), nats_endpoint_health (0009).

-- ---------------------------------------------------------------------------
-- Roles.
-- ---------------------------------------------------------------------------
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rule_nats_definer') THEN
        CREATE ROLE rule_nats_definer NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rule_nats_failure_writer') THEN
        CREATE ROLE rule_nats_failure_writer NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
END
$roles$;
COMMENT ON ROLE rule_nats_definer IS
    'NATS webhook worker: owns the SECURITY DEFINER functions. NOLOGIN, not a superuser, nobody is a member of it.';
COMMENT ON ROLE rule_nats_failure_writer IS
    'NATS webhook worker: the login of the failure log (may only insert failed-publish rows). NOLOGIN until a '
    'superuser runs rule_nats_private.enable_failure_log().';

-- ---------------------------------------------------------------------------
-- Validation rules, the same as plpython/pgnats.py and sidecar/validation.py (tests/security/cases.py).
-- PostgreSQL's $ matches only at the very end (no newline-sensitive mode), and text cannot hold NUL.
-- Not STRICT: PostgreSQL inlines a SQL function into the calling query only when it is not STRICT
-- (or its body is strict), and a CHECK or publish that calls a function it cannot inline pays for
-- a new executor every time (measured: 25 us a call). NULL in gives NULL out all the same.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION rule_nats_valid_subject(p_subject text, p_allow_wildcards boolean DEFAULT false)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT length(p_subject) BETWEEN 1 AND 1024
       AND p_subject !~ '[\x01-\x20\x7f-\x9f]'
       AND CASE WHEN p_allow_wildcards
                THEN p_subject ~ '^(([^.*>]+|\*)\.)*([^.*>]+|\*|>)$'
                ELSE p_subject ~ '^([^.*>]+\.)*[^.*>]+$'
           END
$$;
COMMENT ON FUNCTION rule_nats_valid_subject(text, boolean) IS
    'True when the text is a NATS subject: 1-1024 characters, dot-separated non-empty tokens, no spaces or control '
    'characters. With p_allow_wildcards, a token may be * and the last token may be >. See also rule_nats_subject_reserved.';

CREATE OR REPLACE FUNCTION rule_nats_valid_subjects(p_subjects text[], p_allow_wildcards boolean DEFAULT true)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT cardinality(p_subjects) > 0
       AND coalesce((SELECT bool_and(s IS NOT NULL AND public.rule_nats_valid_subject(s, p_allow_wildcards))
                       FROM unnest(p_subjects) AS s), false)
$$;

CREATE FUNCTION rule_nats_subject_reserved(p_subject text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT p_subject ~ '^(\$|_INBOX(\.|$))' $$;
COMMENT ON FUNCTION rule_nats_subject_reserved(text) IS
    'True when the subject (or filter) belongs to NATS itself: its first token starts with $ ($JS, $KV, $O, $SYS, '
    '$MQTT, $NRG, ...) or is _INBOX. Such subjects are refused for publishing and as stream subjects.';

CREATE FUNCTION rule_nats_subjects_reserved(p_subjects text[])
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT coalesce((SELECT bool_or(public.rule_nats_subject_reserved(s)) FROM unnest(p_subjects) AS s), false) $$;
COMMENT ON FUNCTION rule_nats_subjects_reserved(text[]) IS 'True when any element is a reserved subject.';

-- SQL, not plpgsql: it runs for every SQL publish (publish_registered_subjects_only), and the
-- common filters (exact, prefix.>) need no regular expression.
CREATE FUNCTION rule_nats_subject_matches(p_filter text, p_subject text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN p_filter = p_subject THEN true
        WHEN p_filter = '>' THEN true
        WHEN strpos(p_filter, '*') = 0 AND right(p_filter, 2) = '.>'
            THEN length(p_subject) > length(p_filter) - 1 AND starts_with(p_subject, left(p_filter, -1))
        WHEN strpos(p_filter, '*') = 0 THEN false
        ELSE p_subject ~ ('^' || replace(replace(regexp_replace(p_filter, '([.+?^$(){}|\\[\]])', '\\\1', 'g'),
                                                 '*', '[^.]+'), '>', '.+') || '$')
    END
$$;
COMMENT ON FUNCTION rule_nats_subject_matches(text, text) IS
    'True when the subject filter (tokens, * for one token, > for the rest) captures the subject.';

CREATE FUNCTION rule_nats_valid_header_name(p_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT length(p_name) BETWEEN 1 AND 256 AND p_name ~ '^[-!#$%&''*+.^_`|~0-9A-Za-z]+$' $$;
COMMENT ON FUNCTION rule_nats_valid_header_name(text) IS
    'True when the text is an HTTP token of 1-256 characters (!#$%&''*+-.^_`|~, digits, ASCII letters).';

CREATE FUNCTION rule_nats_valid_header_value(p_value text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT length(p_value) <= 8192 AND p_value !~ '[\r\n]' $$;
COMMENT ON FUNCTION rule_nats_valid_header_value(text) IS 'True when the header value has at most 8192 characters and no CR or LF.';

CREATE FUNCTION rule_nats_valid_headers(p_headers jsonb)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_headers IS NULL
        OR (jsonb_typeof(p_headers) = 'object'
            AND coalesce((
                SELECT bool_and(public.rule_nats_valid_header_name(h.k) AND coalesce((
                           SELECT bool_and(jsonb_typeof(e) IN ('string', 'number')
                                           AND public.rule_nats_valid_header_value(e #>> '{}'))
                             FROM jsonb_array_elements(CASE WHEN jsonb_typeof(h.v) = 'array' THEN h.v
                                                            ELSE jsonb_build_array(h.v) END) AS e), true))
                  FROM jsonb_each(p_headers) AS h(k, v)), true))
$$;
COMMENT ON FUNCTION rule_nats_valid_headers(jsonb) IS
    'True when NULL or a JSON object of valid header names whose values are strings or numbers (or arrays of them) '
    'without CR or LF.';

CREATE FUNCTION rule_nats_valid_message_id(p_id text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT length(p_id) BETWEEN 1 AND 256 AND p_id !~ '[\x01-\x1f\x7f]' AND p_id !~ '^ ' AND p_id !~ ' $' $$;
COMMENT ON FUNCTION rule_nats_valid_message_id(text) IS
    'True when the text can be a message id (Nats-Msg-Id, event_id, webhook-id): 1-256 characters, no control '
    'characters, no leading or trailing space.';

CREATE FUNCTION rule_nats_valid_webhook_url(p_url text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT length(p_url) <= 2048 AND p_url !~ '[\x01-\x20\x7f]' AND p_url ~* '^https?://[^/?#@]+([/?#].*)?$' $$;
COMMENT ON FUNCTION rule_nats_valid_webhook_url(text) IS
    'True when the text is an absolute http(s) URL of at most 2048 characters with a host, no user:password@, '
    'no spaces or control characters.';

CREATE OR REPLACE FUNCTION rule_nats_valid_server_url(p_url text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_url !~ '[\x01-\x20\x7f]'
       AND p_url ~ '^(nats|tls)://(\[[0-9A-Fa-f:.]+\]|[^/@:\[\]]+)(:[0-9]{1,5})?/?$'
$$;
COMMENT ON FUNCTION rule_nats_valid_server_url(text) IS
    'True when the text is a NATS server URL: nats://host[:port] or tls://host[:port], without user:password@ '
    '(credentials go in nats_user/nats_password, auth_token, ...).';

CREATE OR REPLACE FUNCTION rule_nats_valid_server_urls(p_urls text[])
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce((SELECT bool_and(u IS NOT NULL AND public.rule_nats_valid_server_url(u))
                       FROM unnest(p_urls) AS u), true)
$$;

CREATE FUNCTION rule_nats_subjects_pattern(p_filters text[])
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT '^(' || string_agg(replace(replace(regexp_replace(f, '([.+?^$(){}|\\[\]])', '\\\1', 'g'),
                                              '*', '[^.]+'), '>', '.+'), '|') || ')$'
      FROM unnest(p_filters) AS f
$$;
COMMENT ON FUNCTION rule_nats_subjects_pattern(text[]) IS
    'One regular expression that matches exactly the subjects the filters capture (rule_nats_streams.subjects_pattern).';

CREATE FUNCTION rule_nats_redact_url(p_url text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT regexp_replace(regexp_replace(p_url, '^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@', '\1***@'),
                          '[?#].*$', '')
$$;
COMMENT ON FUNCTION rule_nats_redact_url(text) IS
    'The URL without credentials (user:password@ becomes ***@) and without query string or fragment, '
    'which may carry tokens: what monitoring shows.';

-- Called by the rollup triggers with search_path = pg_catalog, pg_temp: qualified.
CREATE OR REPLACE FUNCTION rule_nats_hist_add(p_state bigint[], p_ms double precision)
RETURNS bigint[] LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
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
    i := public.rule_nats_latency_bucket(p_ms);
    p_state[i] := p_state[i] + 1;
    RETURN p_state;
END
$$;

-- ---------------------------------------------------------------------------
-- Configuration: credentials leave the URLs; the publish restriction.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_config
    ADD COLUMN publish_registered_subjects_only boolean NOT NULL DEFAULT true;
COMMENT ON COLUMN rule_nats_config.publish_registered_subjects_only IS
    'When true (the default), rule_nats_publish and the other SQL publish paths accept only subjects captured by an '
    'enabled stream in rule_nats_streams of this configuration, not every subject the NATS account may use. '
    'Only rule_nats_admin may change it.';

-- Credentials written into a URL move to their own columns (which the monitor cannot read).
UPDATE rule_nats_config
   SET auth_type = CASE WHEN auth_type <> 'none' THEN auth_type
                        WHEN substring(nats_url FROM '^[a-z]+://([^/@]*)@') LIKE '%:%' THEN 'user_password'
                        ELSE 'token' END,
       nats_user = CASE WHEN auth_type = 'none' AND substring(nats_url FROM '^[a-z]+://([^/@]*)@') LIKE '%:%'
                        THEN split_part(substring(nats_url FROM '^[a-z]+://([^/@]*)@'), ':', 1) ELSE nats_user END,
       nats_password = CASE WHEN auth_type = 'none' AND substring(nats_url FROM '^[a-z]+://([^/@]*)@') LIKE '%:%'
                            THEN substring(substring(nats_url FROM '^[a-z]+://([^/@]*)@') FROM ':(.*)$')
                            ELSE nats_password END,
       auth_token = CASE WHEN auth_type = 'none' AND substring(nats_url FROM '^[a-z]+://([^/@]*)@') NOT LIKE '%:%'
                         THEN substring(nats_url FROM '^[a-z]+://([^/@]*)@') ELSE auth_token END,
       nats_url = regexp_replace(nats_url, '^([a-z]+://)[^/@]*@', '\1')
 WHERE nats_url ~ '^[a-z]+://[^/@]*@';
UPDATE rule_nats_config
   SET nats_cluster_urls = ARRAY(SELECT regexp_replace(u, '^([a-z]+://)[^/@]*@', '\1') FROM unnest(nats_cluster_urls) AS u)
 WHERE EXISTS (SELECT 1 FROM unnest(nats_cluster_urls) AS u WHERE u ~ '^[a-z]+://[^/@]*@');

ALTER TABLE rule_nats_config
    DROP CONSTRAINT "nats_url must be nats://host[:port] or tls://host[:port]",
    DROP CONSTRAINT "nats_cluster_urls: each must be nats:// or tls:// host[:port]",
    ADD CONSTRAINT "nats_url: nats|tls://host[:port]; credentials in nats_user etc."
        CHECK (rule_nats_valid_server_url(nats_url)),
    ADD CONSTRAINT "nats_cluster_urls: nats|tls://host[:port]; no user:password@"
        CHECK (rule_nats_valid_server_urls(nats_cluster_urls));

-- ---------------------------------------------------------------------------
-- Reserved subjects and injectable values are refused by the tables themselves.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_streams
    ADD CONSTRAINT "subjects: none reserved ($JS., $KV., $SYS., _INBOX, ...)"
        CHECK (NOT rule_nats_subjects_reserved(subjects)),
    -- Every SQL publish asks which stream captures its subject: one cached regular expression per
    -- stream instead of a walk over the filters (that cost more than the rest of a publish).
    ADD COLUMN subjects_pattern text GENERATED ALWAYS AS (rule_nats_subjects_pattern(subjects)) STORED;
COMMENT ON COLUMN rule_nats_streams.subjects_pattern IS
    'Derived from subjects: one regular expression matching the subjects the stream captures.';
ALTER TABLE rule_nats_consumers
    ADD CONSTRAINT "filter_subject: not reserved ($JS., _INBOX, ...)"
        CHECK (filter_subject IS NULL OR NOT rule_nats_subject_reserved(filter_subject));
ALTER TABLE rule_webhooks
    ADD CONSTRAINT "nats_subject: not reserved ($JS., $KV., $SYS., _INBOX, ...)"
        CHECK (NOT rule_nats_subject_reserved(nats_subject)),
    ADD CONSTRAINT "headers: names are HTTP tokens, values without CR/LF"
        CHECK (rule_nats_valid_headers(headers)),
    DROP CONSTRAINT "url: absolute http(s) URL with host, no spaces, no user:pass@",
    ADD CONSTRAINT "url: absolute http(s) URL with host, no spaces, no user:pass@"
        CHECK (rule_nats_valid_webhook_url(url));

-- Outbox rows that would break a rule now are not published: they stay, failed, with the reason.
UPDATE rule_nats_outbox
   SET status = 'failed',
       error_message = 'refused by 0006_security: reserved subject, or invalid headers or message id'
 WHERE status = 'pending'
   AND (rule_nats_subject_reserved(subject) OR NOT rule_nats_valid_headers(headers)
        OR NOT rule_nats_valid_message_id(message_id));
-- Plain expressions, not calls of the SQL functions above: a CHECK that calls SQL functions is
-- inlined again for every single-row INSERT made by a plpgsql function (measured: 100 us a row,
-- three times the cost of rule_nats_publish_on_commit itself). Headers are checked by every
-- function that writes the outbox and again by the relay before it publishes.
ALTER TABLE rule_nats_outbox
    ADD CONSTRAINT "subject: not reserved ($JS., $KV., $SYS., _INBOX, ...)"
        CHECK (subject !~ '^(\$|_INBOX(\.|$))') NOT VALID,
    ADD CONSTRAINT "message_id: 1-256 characters, no control characters"
        CHECK (length(message_id) BETWEEN 1 AND 256 AND message_id !~ '[\x01-\x1f\x7f]' AND message_id !~ '^ | $')
        NOT VALID;

-- ---------------------------------------------------------------------------
-- The failure log: failed publishes recorded in a transaction of their own, so the row survives
-- the error the caller gets. It connects back to this server as rule_nats_failure_writer, with a
-- connection string only a superuser can set; the function forces the login and the database.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_private.failure_log (
    singleton                  boolean     PRIMARY KEY DEFAULT true,
    conninfo                   text,
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT "one row" CHECK (singleton)
);
COMMENT ON TABLE rule_nats_private.failure_log IS
    'How the failure log reaches this server (libpq conninfo with host, port and the password of '
    'rule_nats_failure_writer; user and dbname are forced). NULL: not enabled. Set it with '
    'rule_nats_private.enable_failure_log(); only superusers may change it.';
INSERT INTO rule_nats_private.failure_log (singleton, conninfo) VALUES (true, NULL);

CREATE FUNCTION rule_nats__insert_failure(
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
COMMENT ON FUNCTION rule_nats__insert_failure(text, integer, text, jsonb, jsonb, text, text, double precision) IS
    'Internal: the only thing rule_nats_failure_writer may do: insert a failed-publish history row.';

CREATE OR REPLACE FUNCTION rule_nats__record_failure_autonomously(
    p_config_name text, p_webhook_id integer, p_subject text, p_payload jsonb, p_headers jsonb,
    p_message_id text, p_error text, p_latency_ms double precision
) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_conninfo text;
BEGIN
    SELECT conninfo INTO v_conninfo FROM rule_nats_private.failure_log;
    IF v_conninfo IS NULL OR to_regprocedure('rule_nats_private.dblink_exec(text,text)') IS NULL THEN
        RETURN false;
    END IF;
    -- libpq takes the last value of a repeated keyword: the login and the database are ours.
    v_conninfo := 'connect_timeout=5 ' || v_conninfo
        || ' user=rule_nats_failure_writer application_name=rule_nats_failure_log dbname='''
        || replace(replace(current_database(), '\', '\\'), '''', '\''') || '''';
    PERFORM rule_nats_private.dblink_exec(v_conninfo, format(
        'SELECT public.rule_nats__insert_failure(%L, %L, %L, %L, %L, %L, %L, %L)',
        p_config_name, p_webhook_id, p_subject, p_payload, p_headers, p_message_id, p_error, p_latency_ms));
    RETURN true;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'rule_nats: could not record the failed publish in the failure log: %', SQLERRM
        USING HINT = 'A superuser checks rule_nats_private.failure_log and pg_hba.conf (docs/security.md).';
    RETURN false;
END
$$;
COMMENT ON FUNCTION rule_nats__record_failure_autonomously(text, integer, text, jsonb, jsonb, text, text, double precision) IS
    'Internal: writes a failed-publish history row in a separate transaction through the failure log '
    '(rule_nats_private.failure_log); false when it is not enabled.';

CREATE FUNCTION rule_nats_private.enable_failure_log(p_password text, p_conninfo text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_password IS NULL THEN
        ALTER ROLE rule_nats_failure_writer NOLOGIN PASSWORD NULL;
        UPDATE rule_nats_private.failure_log SET conninfo = NULL, updated_at = now();
        RETURN;
    END IF;
    EXECUTE format('ALTER ROLE rule_nats_failure_writer LOGIN PASSWORD %L', p_password);
    UPDATE rule_nats_private.failure_log
       SET conninfo = coalesce(p_conninfo, format('host=127.0.0.1 port=%s', current_setting('port')))
                      || ' password=''' || replace(replace(p_password, '\', '\\'), '''', '\''') || '''',
           updated_at = now();
END
$$;
COMMENT ON FUNCTION rule_nats_private.enable_failure_log(text, text) IS
    'Superusers only: lets rule_nats_failure_writer log in with this password and records how to reach the server '
    '(default host=127.0.0.1 and this server''s port; pg_hba.conf must ask that role for a password). NULL disables.';
REVOKE ALL ON FUNCTION rule_nats_private.enable_failure_log(text, text) FROM PUBLIC;

-- The restriction reads rule_nats_streams: a change there applies at once in this session too.
CREATE TRIGGER rule_nats_streams_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_nats_streams
    FOR EACH STATEMENT EXECUTE FUNCTION rule_nats__config_invalidate();

-- ---------------------------------------------------------------------------
-- Outbox publishes from SQL: the same checks as rule_nats_publish, in one place.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats__check_publish(
    p_function text, p_config_name text, p_subject text, p_headers jsonb, p_msg_id text
) RETURNS void
LANGUAGE plpgsql
AS $$
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
    IF p_msg_id IS NOT NULL AND NOT public.rule_nats_valid_message_id(p_msg_id) THEN
        RAISE EXCEPTION '%: invalid message id %', p_function, quote_literal(left(p_msg_id, 100))
            USING ERRCODE = '22023',
                  HINT = 'Message ids are 1-256 characters without control characters (CR, LF, NUL, tab) or surrounding spaces.';
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
COMMENT ON FUNCTION rule_nats__check_publish(text, text, text, jsonb, text) IS
    'Internal: raises (SQLSTATE 22023, with a hint) unless subject, headers and message id may be published to. '
    'The publish functions call it only when their own fast checks fail, to say why.';

-- ---------------------------------------------------------------------------
-- Table trigger: runs as the writer of the table (so a cast or function of the writer's types runs
-- with the writer's rights only) and hands finished jsonb to a narrow definer function.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_enqueue_row_event(p_subject text, p_webhook_name text, p_event jsonb)
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
    v_event := format('outbox-%s-%s', current_database(), v_id);
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
COMMENT ON FUNCTION rule_nats_enqueue_row_event(text, text, jsonb) IS
    'Queues one row event in the outbox (called by rule_nats_table_trigger as the writer of the table, who needs '
    'rule_nats_publisher). With a webhook name the event is wrapped in that webhook''s envelope. Returns the outbox_id.';

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
COMMENT ON FUNCTION rule_nats_table_trigger() IS
    'Row trigger (AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE FUNCTION rule_nats_table_trigger(''subject'', ''webhook name'')): '
    'each row change becomes an outbox event {"operation","schema","table","old","new"}, published after commit. '
    'With a webhook name the event is wrapped in that webhook''s envelope (subject NULL or '''' = the webhook''s nats_subject). '
    'Runs as the role that writes the table, which needs rule_nats_publisher.';

-- ---------------------------------------------------------------------------
-- The worker: seeds only what is missing, purges only by the configured retention.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION rule_nats_register_consumer(
    p_stream_name   text,
    p_subject       text,
    p_consumer_name text,
    p_batch_size    integer DEFAULT NULL,
    p_config_name   text DEFAULT 'default'
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id integer;
BEGIN
    INSERT INTO public.rule_nats_streams (stream_name, subjects, config_name, description)
    VALUES (p_stream_name, ARRAY[p_subject], p_config_name, 'Registered from the worker environment')
    ON CONFLICT (stream_name) DO NOTHING;

    INSERT INTO public.rule_nats_consumers (stream_name, consumer_name, filter_subject, queue_group,
                                            batch_size, description)
    VALUES (p_stream_name, p_consumer_name, p_subject, p_consumer_name, coalesce(p_batch_size, 10),
            'Registered from the worker environment')
    ON CONFLICT (stream_name, consumer_name) DO NOTHING
    RETURNING consumer_id INTO v_id;
    IF v_id IS NULL THEN
        SELECT c.consumer_id INTO v_id FROM public.rule_nats_consumers c
         WHERE c.stream_name = p_stream_name AND c.consumer_name = p_consumer_name;
    END IF;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION rule_nats_register_consumer(text, text, text, integer, text) IS
    'Creates the stream and the durable consumer for a worker started with STREAM_NAME/SUBJECT/QUEUE_GROUP when they '
    'are missing; returns consumer_id. Rows that exist are never changed: the registry is the DBA''s.';

CREATE FUNCTION rule_nats_purge_due(p_what text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r public.rule_nats_retention;
    v_days integer;
BEGIN
    SELECT * INTO r FROM public.rule_nats_retention LIMIT 1;
    v_days := CASE p_what
        WHEN 'attempts' THEN r.attempts_days
        WHEN 'publish_history' THEN r.publish_history_days
        WHEN 'dead_letters' THEN r.dead_letters_days
        WHEN 'stats' THEN r.stats_days
        ELSE -1 END;
    IF v_days = -1 THEN
        RAISE EXCEPTION 'unknown history kind %', p_what USING ERRCODE = 'invalid_parameter_value',
            HINT = 'one of: attempts, publish_history, dead_letters, stats';
    END IF;
    IF v_days IS NULL THEN
        RETURN 0;
    END IF;
    RETURN public.rule_nats_purge_batch(p_what, make_interval(days => v_days), r.batch_size);
END
$$;
COMMENT ON FUNCTION rule_nats_purge_due(text) IS
    'Deletes one batch of one kind of history (attempts, publish_history, dead_letters, stats) that is older than '
    'rule_nats_retention says, oldest first; returns how many. What the sidecars call: they cannot choose the age.';

-- Calls its sibling with search_path = pg_catalog, pg_temp: qualified.
CREATE OR REPLACE FUNCTION rule_webhook_secret_rotate(
    p_webhook_id integer,
    p_overlap    interval DEFAULT '24 hours',
    p_secret     text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_secret text;
BEGIN
    IF p_overlap < interval '0' THEN
        RAISE EXCEPTION 'overlap must not be negative'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'e.g. interval ''24 hours''';
    END IF;
    v_secret := public.rule_webhook_secret_create(p_webhook_id, p_secret);
    UPDATE public.rule_webhook_secrets
       SET expires_at = now() + p_overlap
     WHERE webhook_id = p_webhook_id AND secret <> v_secret
       AND (expires_at IS NULL OR expires_at > now() + p_overlap);
    RETURN v_secret;
END
$$;

-- ---------------------------------------------------------------------------
-- Monitoring without secrets: URLs without credentials or query strings.
-- ---------------------------------------------------------------------------
CREATE VIEW nats_webhooks AS
SELECT webhook_id, webhook_name, public.rule_nats_redact_url(url) AS url, method, nats_subject, config_name,
       publish_mode, enabled, disabled_at, disabled_reason, timeout_seconds, retry_max_attempts,
       retry_initial_seconds, retry_max_backoff_seconds, retry_max_age_seconds, allow_networks, https_only,
       max_concurrency, rate_limit_per_second, circuit_failure_threshold, circuit_open_seconds,
       disable_after_seconds, description, created_at, updated_at
  FROM public.rule_webhooks;
COMMENT ON VIEW nats_webhooks IS
    'The registered webhooks as monitoring may see them: no static headers, URLs without credentials or query string.';

CREATE VIEW nats_delivery_attempts AS
SELECT attempt_id, attempted_at, message_id, stream_name, consumer_name, stream_seq, subject, webhook_id,
       public.rule_nats_redact_url(url) AS url, attempt, outcome, http_status, latency_ms, error, response_body,
       next_attempt_at, worker_name, notes
  FROM public.rule_nats_delivery_attempts;
COMMENT ON VIEW nats_delivery_attempts IS
    'rule_nats_delivery_attempts as monitoring may see it: URLs without credentials or query string. '
    'WHERE message_id = ... uses the index of the table.';

CREATE OR REPLACE VIEW nats_recent_failures AS
SELECT f.source, f.failed_at, f.subject, w.webhook_name, f.consumer_name, f.url, f.http_status, f.attempt,
       f.outcome, f.error_message, f.message_id, f.ref_id
  FROM (
    (SELECT CASE WHEN h.triggered_by = 'sql' THEN 'publish' ELSE 'outbox' END AS source,
            h.published_at           AS failed_at,
            h.subject,
            h.webhook_id,
            NULL::text               AS consumer_name,
            NULL::text               AS url,
            NULL::integer            AS http_status,
            NULL::integer            AS attempt,
            NULL::text               AS outcome,
            h.error_message,
            h.message_id,
            h.publish_id             AS ref_id
       FROM public.rule_nats_publish_history h
      WHERE NOT h.success
        AND h.published_at >= now() - interval '24 hours'
      ORDER BY h.published_at DESC
      LIMIT 100)
    UNION ALL
    (SELECT 'delivery',
            a.attempted_at,
            a.subject,
            a.webhook_id,
            a.consumer_name,
            public.rule_nats_redact_url(a.url),
            a.http_status,
            a.attempt,
            a.outcome,
            a.error,
            a.message_id,
            a.attempt_id
       FROM public.rule_nats_delivery_attempts a
      WHERE a.outcome <> 'delivered'
        AND a.attempted_at >= now() - interval '24 hours'
      ORDER BY a.attempted_at DESC
      LIMIT 100)
  ) f
  LEFT JOIN public.rule_webhooks w ON w.webhook_id = f.webhook_id
 ORDER BY f.failed_at DESC
 LIMIT 100;

-- ---------------------------------------------------------------------------
-- Definer functions: owned by rule_nats_definer, search_path pinned. Why each one must be a
-- definer function is in docs/security.md; tests/security/test_definer_catalog.py checks the list.
-- ---------------------------------------------------------------------------
DO $owner$
DECLARE
    f regprocedure;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'rule_nats_register_consumer(text, text, text, integer, text)',
        'rule_nats__flush_history()',
        'rule_nats_try_publish(text, jsonb, jsonb, text, text)',
        'rule_nats_publish(text, jsonb, jsonb, text, text)',
        'rule_nats_publish_on_commit(text, jsonb, jsonb, text, text)',
        'rule_webhook_publish_nats(integer, jsonb, text)',
        'rule_nats_health_check(text)',
        'rule_nats_enqueue_row_event(text, text, jsonb)',
        'rule_nats__insert_failure(text, integer, text, jsonb, jsonb, text, text, double precision)',
        'rule_nats_replay_dead_letter(bigint)',
        'rule_nats_replay_dead_letters(text, integer, timestamptz, timestamptz, boolean, integer)',
        'rule_nats_webhook_enabled()',
        'rule_nats_endpoint_disable(integer, text)',
        'rule_nats_endpoint_enable(integer)',
        'rule_webhook_secret_create(integer, text, timestamptz)',
        'rule_webhook_secret_rotate(integer, interval, text)',
        'rule_webhook_secret_revoke(integer, bigint)',
        'rule_nats_rollup_attempts()',
        'rule_nats_rollup_publishes()',
        'rule_nats_refresh_status()',
        'rule_nats_purge_batch(text, interval, integer)',
        'rule_nats_purge_due(text)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO rule_nats_definer', f);
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$owner$;

-- What those functions need, and nothing else.
GRANT USAGE ON SCHEMA rule_nats_private TO rule_nats_definer;
GRANT SELECT, INSERT, DELETE ON rule_nats_private.history_flush TO rule_nats_definer;
GRANT SELECT ON rule_nats_private.failure_log TO rule_nats_definer;
GRANT EXECUTE ON FUNCTION rule_nats__load(), rule_nats__pgnats_source(),
    rule_nats__record_failure_autonomously(text, integer, text, jsonb, jsonb, text, text, double precision),
    rule_nats__check_publish(text, text, text, jsonb, text),
    rule_nats_private.random_secret() TO rule_nats_definer;
GRANT SELECT ON rule_nats_config, rule_nats_retention TO rule_nats_definer;
GRANT SELECT, INSERT ON rule_nats_streams, rule_nats_consumers, rule_nats_outbox TO rule_nats_definer;
GRANT SELECT, UPDATE ON rule_webhooks, rule_nats_retries, rule_nats_endpoint_state TO rule_nats_definer;
GRANT SELECT, INSERT, UPDATE ON rule_webhook_secrets TO rule_nats_definer;
GRANT SELECT, INSERT, DELETE ON rule_nats_publish_history TO rule_nats_definer;
GRANT SELECT, DELETE ON rule_nats_delivery_attempts TO rule_nats_definer;
GRANT SELECT, UPDATE, DELETE ON rule_nats_dead_letters TO rule_nats_definer;
GRANT SELECT, INSERT, UPDATE, DELETE ON rule_nats_stats_hourly TO rule_nats_definer;
DO $seq$
BEGIN
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO rule_nats_definer',
                   pg_get_serial_sequence('public.rule_nats_outbox', 'outbox_id'));
END
$seq$;

REVOKE ALL ON FUNCTION rule_nats__insert_failure(text, integer, text, jsonb, jsonb, text, text, double precision),
    rule_nats__check_publish(text, text, text, jsonb, text), rule_nats_enqueue_row_event(text, text, jsonb),
    rule_nats_purge_due(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__insert_failure(text, integer, text, jsonb, jsonb, text, text, double precision)
    TO rule_nats_failure_writer;
GRANT EXECUTE ON FUNCTION rule_nats_enqueue_row_event(text, text, jsonb) TO rule_nats_publisher, rule_nats_admin;

-- The worker: retention as configured, no purge age of its own.
REVOKE EXECUTE ON FUNCTION rule_nats_purge_batch(text, interval, integer) FROM rule_nats_worker;
GRANT EXECUTE ON FUNCTION rule_nats_purge_due(text) TO rule_nats_worker, rule_nats_admin;

-- The monitor: no payloads (envelopes carry Authorization headers), no raw URLs.
REVOKE SELECT ON rule_nats_publish_history, rule_nats_delivery_attempts FROM rule_nats_monitor;
REVOKE SELECT (url) ON rule_webhooks FROM rule_nats_monitor;
REVOKE SELECT (url) ON rule_nats_dead_letters FROM rule_nats_monitor;
DO $cols$
DECLARE
    t text;
    c text;
BEGIN
    FOR t, c IN
        SELECT a.attrelid::regclass::text, a.attname FROM pg_attribute a
         WHERE a.attrelid IN ('public.rule_nats_publish_history'::regclass, 'public.rule_nats_delivery_attempts'::regclass)
           AND a.attnum > 0 AND NOT a.attisdropped AND a.attname NOT IN ('payload', 'url')
    LOOP
        EXECUTE format('GRANT SELECT (%I) ON %s TO rule_nats_monitor', c, t);
    END LOOP;
END
$cols$;
GRANT SELECT ON nats_webhooks, nats_delivery_attempts TO rule_nats_monitor, rule_nats_admin;

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (6, 'security');
