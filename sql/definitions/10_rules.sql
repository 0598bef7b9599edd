-- sql/definitions/10_rules.sql: the current definition of these objects (docs/schema.md).
--
-- Validation rules: what a subject, a header, a message id, a name or a URL may be. CHECK
-- constraints of the tables call them, and so do the publish functions; plpython/pgnats.py and
-- sidecar/validation.py apply the same rules (tests/security/cases.py holds the shared table of cases).
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

CREATE OR REPLACE FUNCTION rule_nats_valid_name(p_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT p_name ~ '^[A-Za-z0-9_-]{1,255}$' $$;
COMMENT ON FUNCTION rule_nats_valid_name(text) IS
    'True when the text is a safe JetStream stream/consumer name: 1-255 of A-Z a-z 0-9 _ - (no dots, wildcards or spaces).';

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
COMMENT ON FUNCTION rule_nats_valid_subject(text, boolean) IS
    'True when the text is a NATS subject: 1-1024 characters, dot-separated non-empty tokens, no spaces or control '
    'characters. With p_allow_wildcards, a token may be * and the last token may be >. See also rule_nats_subject_reserved.';

CREATE OR REPLACE FUNCTION rule_nats_valid_subjects(p_subjects text[], p_allow_wildcards boolean DEFAULT true)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT cardinality(p_subjects) > 0
       AND coalesce((SELECT bool_and(s IS NOT NULL AND public.rule_nats_valid_subject(s, p_allow_wildcards))
                       FROM unnest(p_subjects) AS s), false)
$$;
COMMENT ON FUNCTION rule_nats_valid_subjects(text[], boolean) IS
    'True when the array is non-empty and every element is a valid subject (wildcards allowed by default).';

CREATE OR REPLACE FUNCTION rule_nats_valid_server_url(p_url text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_url !~ '[\x01-\x20\x7f]'
       AND p_url ~ '^(nats|tls)://(\[[0-9A-Fa-f:.]+\]|[^/@:\[\]]+)(:[0-9]{1,5})?/?$'
$$;
COMMENT ON FUNCTION rule_nats_valid_server_url(text) IS
    'True when the text is a NATS server URL: nats://host[:port] or tls://host[:port], without user:password@ '
    '(credentials go in nats_user/nats_password, auth_token, ...).';

CREATE OR REPLACE FUNCTION rule_nats_valid_server_urls(p_urls text[])
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT bool_and(u IS NOT NULL AND public.rule_nats_valid_server_url(u))
                       FROM unnest(p_urls) AS u), true)
$$;
COMMENT ON FUNCTION rule_nats_valid_server_urls(text[]) IS
    'True when every element is a valid NATS server URL (an empty array is valid).';

CREATE OR REPLACE FUNCTION rule_nats_subject_reserved(p_subject text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT p_subject ~ '^(\$|_INBOX(\.|$))' $$;
COMMENT ON FUNCTION rule_nats_subject_reserved(text) IS
    'True when the subject (or filter) belongs to NATS itself: its first token starts with $ ($JS, $KV, $O, $SYS, '
    '$MQTT, $NRG, ...) or is _INBOX. Such subjects are refused for publishing and as stream subjects.';

CREATE OR REPLACE FUNCTION rule_nats_subjects_reserved(p_subjects text[])
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT coalesce((SELECT bool_or(public.rule_nats_subject_reserved(s)) FROM unnest(p_subjects) AS s), false) $$;
COMMENT ON FUNCTION rule_nats_subjects_reserved(text[]) IS 'True when any element is a reserved subject.';

-- SQL, not plpgsql: it runs for every SQL publish (publish_registered_subjects_only), and the
-- common filters (exact, prefix.>) need no regular expression.
CREATE OR REPLACE FUNCTION rule_nats_subject_matches(p_filter text, p_subject text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
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

CREATE OR REPLACE FUNCTION rule_nats_valid_header_name(p_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT length(p_name) BETWEEN 1 AND 256 AND p_name ~ '^[-!#$%&''*+.^_`|~0-9A-Za-z]+$' $$;
COMMENT ON FUNCTION rule_nats_valid_header_name(text) IS
    'True when the text is an HTTP token of 1-256 characters (!#$%&''*+-.^_`|~, digits, ASCII letters).';

CREATE OR REPLACE FUNCTION rule_nats_valid_header_value(p_value text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT length(p_value) <= 8192 AND p_value !~ '[\r\n]' $$;
COMMENT ON FUNCTION rule_nats_valid_header_value(text) IS 'True when the header value has at most 8192 characters and no CR or LF.';

CREATE OR REPLACE FUNCTION rule_nats_valid_headers(p_headers jsonb)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
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

CREATE OR REPLACE FUNCTION rule_nats_valid_message_id(p_id text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT length(p_id) BETWEEN 1 AND 256 AND p_id !~ '[\x01-\x1f\x7f]' AND p_id !~ '^ ' AND p_id !~ ' $' $$;
COMMENT ON FUNCTION rule_nats_valid_message_id(text) IS
    'True when the text can be a message id (Nats-Msg-Id, event_id, webhook-id): 1-256 characters, no control '
    'characters, no leading or trailing space.';

CREATE OR REPLACE FUNCTION rule_nats_valid_webhook_url(p_url text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT length(p_url) <= 2048 AND p_url !~ '[\x01-\x20\x7f]' AND p_url ~* '^https?://[^/?#@]+([/?#].*)?$' $$;
COMMENT ON FUNCTION rule_nats_valid_webhook_url(text) IS
    'True when the text is an absolute http(s) URL of at most 2048 characters with a host, no user:password@, '
    'no spaces or control characters.';

CREATE OR REPLACE FUNCTION rule_nats_subjects_pattern(p_filters text[])
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '^(' || string_agg(replace(replace(regexp_replace(f, '([.+?^$(){}|\\[\]])', '\\\1', 'g'),
                                              '*', '[^.]+'), '>', '.+'), '|') || ')$'
      FROM unnest(p_filters) AS f
$$;
COMMENT ON FUNCTION rule_nats_subjects_pattern(text[]) IS
    'One regular expression that matches exactly the subjects the filters capture (rule_nats_streams.subjects_pattern).';

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

CREATE OR REPLACE FUNCTION rule_nats_subjects_overlap(p_a text, p_b text)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a text[] := string_to_array(p_a, '.');
    b text[] := string_to_array(p_b, '.');
BEGIN
    IF p_a IS NULL OR p_b IS NULL THEN
        RETURN NULL;
    END IF;
    FOR i IN 1 .. least(cardinality(a), cardinality(b)) LOOP
        IF a[i] = '>' OR b[i] = '>' THEN
            RETURN true;  -- the other has a token here, and > takes it and whatever follows
        END IF;
        IF a[i] <> '*' AND b[i] <> '*' AND a[i] <> b[i] THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN cardinality(a) = cardinality(b);
END
$$;
COMMENT ON FUNCTION rule_nats_subjects_overlap(text, text) IS
    'True when some subject is captured by both subject filters (NATS wildcards: * one token, > one or more '
    'trailing tokens), e.g. orders.> and orders.*.created; false for orders.> and orders.';

CREATE OR REPLACE FUNCTION rule_nats_message_id_reserved(p_id text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT p_id OPERATOR(pg_catalog.~*) '^(outbox|replay|stream)-' $$;
COMMENT ON FUNCTION rule_nats_message_id_reserved(text) IS
    'True when a caller''s message id has the shape of an id the project generates (outbox-, replay- or stream-, '
    'any case): such ids are refused, so that no caller can claim the identity of a generated message.';

CREATE OR REPLACE FUNCTION rule_nats_nats_header_allowed(p_name text)
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
CREATE OR REPLACE FUNCTION rule_nats_valid_nats_headers(p_headers jsonb)
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

CREATE OR REPLACE FUNCTION rule_nats_nats_headers_allowed(p_headers jsonb)
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

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('10_rules.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
