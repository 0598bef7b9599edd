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

CREATE FUNCTION rule_nats_subject_captured(p_filters text[], p_subject text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_subject = ANY (p_filters)
        OR EXISTS (SELECT 1 FROM unnest(p_filters) AS f WHERE public.rule_nats_subject_matches(f, p_subject))
$$;
COMMENT ON FUNCTION rule_nats_subject_captured(text[], text) IS 'True when one of the subject filters captures the subject.';

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

-- ---------------------------------------------------------------------------
-- The embedded PL/Python module (validation, the publish restriction, the failure log).
-- ---------------------------------------------------------------------------
-- BEGIN EMBEDDED plpython/pgnats.py (scripts/embed-plpython writes this block)
CREATE OR REPLACE FUNCTION rule_nats__pgnats_source()
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
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

    def fail(self, function, err, config_name, webhook_id, subject, payload, headers, msg_id, latency_ms):
        """Record a failed publish in its own transaction (it must survive this error), then raise it."""
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
        sqlstate = "22023" if err.reason in INVALID_ARGUMENT_REASONS else "NA001"
        self.plpy.error("%s: %s" % (function, err), hint=err.hint, sqlstate=sqlstate)

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

-- A new GD key: a session that loaded the old module before this migration loads the new one.
CREATE OR REPLACE FUNCTION rule_nats__load()
RETURNS void LANGUAGE plpython3u
SET search_path = pg_catalog, pg_temp
AS $py$
if "pgnats_publisher6" not in GD:
    import types
    src = plpy.execute("SELECT public.rule_nats__pgnats_source() AS s")[0]["s"]
    mod = types.ModuleType("pgnats")
    exec(compile(src, "pgnats.py", "exec"), mod.__dict__)
    GD["pgnats6"] = mod
    GD["pgnats_publisher6"] = mod.Publisher(plpy)
$py$;

CREATE OR REPLACE FUNCTION rule_nats__flush_history()
RETURNS trigger LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $py$
pub = GD.get("pgnats_publisher6")
if pub is not None:
    pub.flush_history()
return None
$py$;

CREATE OR REPLACE FUNCTION rule_nats__config_invalidate()
RETURNS trigger LANGUAGE plpython3u
AS $py$
pub = GD.get("pgnats_publisher6")
if pub is not None:
    pub.invalidate()
$py$;

-- The restriction reads rule_nats_streams: a change there applies at once in this session too.
CREATE TRIGGER rule_nats_streams_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_nats_streams
    FOR EACH STATEMENT EXECUTE FUNCTION rule_nats__config_invalidate();

CREATE OR REPLACE FUNCTION rule_nats_try_publish(
    subject     text,
    payload     jsonb,
    headers     jsonb DEFAULT NULL,
    msg_id      text  DEFAULT NULL,
    config_name text  DEFAULT 'default'
) RETURNS jsonb
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $py$
if "pgnats_publisher6" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
pub = GD["pgnats_publisher6"]
result, err, latency, hdrs = pub.publish(subject, payload, headers, msg_id, config_name)
import json
if err is not None and err.reason in GD["pgnats6"].INVALID_ARGUMENT_REASONS and err.reason != "unregistered_subject":
    # The caller's mistake, not a failed publish: an ERROR like every other SQL function's.
    plpy.error("rule_nats_try_publish: %s" % err, hint=err.hint, sqlstate="22023")
pub.record(config_name, None, subject, payload, hdrs, msg_id, result,
           None if err is None else str(err), latency)
if err is None:
    return json.dumps(dict(result, ok=True, latency_ms=round(latency, 3)))
return json.dumps({"ok": False, "error": str(err), "reason": err.reason, "hint": err.hint,
                   "latency_ms": round(latency, 3)})
$py$;
COMMENT ON FUNCTION rule_nats_try_publish(text, jsonb, jsonb, text, text) IS
    'Like rule_nats_publish, but never raises for NATS errors: returns {"ok": false, "error", "reason", "hint"}. '
    'Invalid arguments (subject, headers, msg_id, a reserved subject) still raise (SQLSTATE 22023). '
    'Its history row, failure or not, is written when the caller''s transaction commits.';

CREATE OR REPLACE FUNCTION rule_nats_publish(
    subject     text,
    payload     jsonb,
    headers     jsonb DEFAULT NULL,
    msg_id      text  DEFAULT NULL,
    config_name text  DEFAULT 'default'
) RETURNS jsonb
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $py$
if "pgnats_publisher6" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
pub = GD["pgnats_publisher6"]
result, err, latency, hdrs = pub.publish(subject, payload, headers, msg_id, config_name)
import json
if err is None:
    pub.record(config_name, None, subject, payload, hdrs, msg_id, result, None, latency)
    return json.dumps(dict(result, latency_ms=round(latency, 3)))
pub.fail("rule_nats_publish", err, config_name, None, subject, payload, hdrs, msg_id, latency)
$py$;

CREATE OR REPLACE FUNCTION rule_webhook_publish_nats(
    webhook_id integer,
    payload    jsonb,
    message_id text DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $py$
if "pgnats_publisher6" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
mod, pub = GD["pgnats6"], GD["pgnats_publisher6"]
import json
plan = GD.get("pgnats_webhook_plan_v6")
if plan is None:
    plan = GD["pgnats_webhook_plan_v6"] = plpy.prepare(
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
try:
    mod.validate_message_id(event_id)
    mod.validate_subject(w["nats_subject"])
    if w["publish_mode"] == "outbox":
        pub.client(w["config_name"])
        pub.check_registered(w["config_name"], w["nats_subject"])
except mod.NatsError as exc:
    plpy.error("rule_webhook_publish_nats: %s" % exc, hint=exc.hint,
               sqlstate="22023" if exc.reason in mod.INVALID_ARGUMENT_REASONS else "NA001")
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

CREATE OR REPLACE FUNCTION rule_nats_health_check(config_name text DEFAULT 'default')
RETURNS jsonb
LANGUAGE plpython3u SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $py$
if "pgnats_publisher6" not in GD:
    plpy.execute("SELECT public.rule_nats__load()")
import json
return json.dumps(GD["pgnats_publisher6"].health(config_name))
$py$;

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
    IF NOT public.rule_nats_valid_headers(p_headers) THEN
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
            USING ERRCODE = '22023', HINT = 'See rule_nats_config.';
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
    -- The common case costs two plain expressions and one INSERT ... SELECT (which also finds the
    -- configuration and the registered stream); rule_nats__check_publish then says what is wrong.
    IF subject IS NULL OR NOT public.rule_nats_valid_subject(subject, false)
       OR public.rule_nats_subject_reserved(subject)
       OR (headers IS NOT NULL AND NOT public.rule_nats_valid_headers(headers))
       OR (v_msg_id IS NOT NULL AND NOT public.rule_nats_valid_message_id(v_msg_id)) THEN
        PERFORM public.rule_nats__check_publish('rule_nats_publish_on_commit', config_name, subject, headers, v_msg_id);
    END IF;
    v_id := nextval(pg_get_serial_sequence('public.rule_nats_outbox', 'outbox_id'));
    INSERT INTO public.rule_nats_outbox (outbox_id, config_name, subject, payload, headers, message_id)
    SELECT v_id, c.config_name, rule_nats_publish_on_commit.subject, rule_nats_publish_on_commit.payload,
           rule_nats_publish_on_commit.headers,
           coalesce(v_msg_id, format('outbox-%s-%s', current_database(), v_id))
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
    (SELECT 'publish'::text          AS source,
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
       FROM rule_nats_publish_history h
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
       FROM rule_nats_delivery_attempts a
      WHERE a.outcome <> 'delivered'
        AND a.attempted_at >= now() - interval '24 hours'
      ORDER BY a.attempted_at DESC
      LIMIT 100)
  ) f
  LEFT JOIN rule_webhooks w ON w.webhook_id = f.webhook_id
 ORDER BY f.failed_at DESC
 LIMIT 100;

CREATE OR REPLACE VIEW nats_endpoint_health AS
SELECT w.webhook_id,
       w.webhook_name,
       public.rule_nats_redact_url(w.url) AS url,
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
