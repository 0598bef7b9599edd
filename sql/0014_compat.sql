-- 0014_compat: the SQL API of rule-engine-postgres (issue 18), working here.
--
-- A rule-engine-postgres user's SQL (its migrations 005 and 007, sql/nats_api.sql and the functions
-- of src/api/nats.rs) runs against this schema unchanged: every function exists with the original's
-- name, argument names, types and defaults and answers in its shape; every column exists; the
-- counters mean what the original documents. This project's own objects and columns stay: where
-- both name the same setting (timeout_ms and timeout_seconds, nats_config_id and config_name, ...)
-- a trigger keeps the two in step, whichever one a statement writes.
-- docs/migrating-from-rule-engine-postgres.md lists every object and what it does here.

-- ---------------------------------------------------------------------------
-- rule_nats_config: the original's connection columns.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_config
    ADD COLUMN enabled               boolean DEFAULT true,
    ADD COLUMN jetstream_enabled     boolean DEFAULT true,
    ADD COLUMN stream_name           text    DEFAULT 'WEBHOOKS',
    ADD COLUMN subject_prefix        text    DEFAULT 'webhooks',
    ADD COLUMN max_connections       integer DEFAULT 10,
    ADD COLUMN connection_timeout_ms integer,
    ADD COLUMN reconnect_delay_ms    integer,
    ADD CONSTRAINT "stream_name: 1-255 of A-Z a-z 0-9 _ - (no dots, spaces, * or >)"
        CHECK (stream_name IS NULL OR rule_nats_valid_name(stream_name)),
    ADD CONSTRAINT "subject_prefix: a.b.c, no spaces, empty tokens or wildcards"
        CHECK (subject_prefix IS NULL OR rule_nats_valid_subject(subject_prefix, false)),
    ADD CONSTRAINT "max_connections must be >= 1" CHECK (max_connections IS NULL OR max_connections >= 1);
-- connection_timeout_ms and reconnect_delay_ms follow their seconds columns, whose CHECKs bound them
-- (a bad value written in milliseconds is refused with the seconds column's message).

CREATE FUNCTION rule_nats__config_compat() RETURNS trigger
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
CREATE TRIGGER rule_nats_config_compat BEFORE INSERT OR UPDATE ON rule_nats_config
    FOR EACH ROW EXECUTE FUNCTION rule_nats__config_compat();
UPDATE rule_nats_config SET connection_timeout_ms = least(round(connect_timeout_seconds * 1000), 2147483647),
                            reconnect_delay_ms = least(round(reconnect_wait_seconds * 1000), 2147483647);

COMMENT ON COLUMN rule_nats_config.enabled IS
    'As in rule-engine-postgres: false makes rule_nats_init, rule_nats_test_connection and rule_webhook_enable_nats refuse this connection.';
COMMENT ON COLUMN rule_nats_config.jetstream_enabled IS
    'As in rule-engine-postgres; reported by rule_nats_init and rule_nats_health_check. Publishing here always uses JetStream (a PubAck).';
COMMENT ON COLUMN rule_nats_config.stream_name IS
    'The stream rule_nats_init registers (capturing subject_prefix.>) when no registered stream captures that prefix.';
COMMENT ON COLUMN rule_nats_config.subject_prefix IS 'Subjects of stream_name: subject_prefix.> (rule_nats_init).';
COMMENT ON COLUMN rule_nats_config.max_connections IS
    'As in rule-engine-postgres (its connection pool size); informational: each session here keeps one connection per configuration.';
COMMENT ON COLUMN rule_nats_config.connection_timeout_ms IS 'connect_timeout_seconds in milliseconds (either may be written; the other follows).';
COMMENT ON COLUMN rule_nats_config.reconnect_delay_ms IS 'reconnect_wait_seconds in milliseconds (either may be written; the other follows).';

-- ---------------------------------------------------------------------------
-- rule_nats_streams: config_id, and the original's bounded defaults.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_streams
    ADD COLUMN config_id integer REFERENCES rule_nats_config (config_id) ON DELETE CASCADE,
    ALTER COLUMN max_messages SET DEFAULT 1000000,
    ALTER COLUMN max_bytes SET DEFAULT 1073741824,
    ALTER COLUMN max_age_seconds SET DEFAULT 604800;
COMMENT ON COLUMN rule_nats_streams.config_id IS 'config_name''s rule_nats_config.config_id (either may be written; the other follows).';

CREATE FUNCTION rule_nats__config_ref_compat() RETURNS trigger
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
CREATE TRIGGER rule_nats_streams_compat BEFORE INSERT OR UPDATE ON rule_nats_streams
    FOR EACH ROW EXECUTE FUNCTION rule_nats__config_ref_compat();
UPDATE rule_nats_streams s SET config_id = c.config_id FROM rule_nats_config c WHERE c.config_name = s.config_name;

-- ---------------------------------------------------------------------------
-- rule_webhooks: the columns of the original's 005 and 007.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_webhooks
    ADD COLUMN nats_enabled             boolean NOT NULL DEFAULT true,
    ADD COLUMN nats_config_id           integer REFERENCES rule_nats_config (config_id),
    ADD COLUMN timeout_ms               integer,
    ADD COLUMN retry_enabled            boolean NOT NULL DEFAULT true,
    ADD COLUMN max_retries              integer,
    ADD COLUMN retry_delay_ms           integer,
    ADD COLUMN retry_backoff_multiplier numeric NOT NULL DEFAULT 2.0,
    ADD COLUMN created_by               text DEFAULT CURRENT_USER,
    ADD COLUMN tags                     text[] DEFAULT '{}',
    -- timeout_ms, max_retries and retry_delay_ms follow this project's columns, whose CHECKs bound them.
    ADD CONSTRAINT "retry_backoff_multiplier must be >= 1.0" CHECK (retry_backoff_multiplier >= 1.0),
    DROP CONSTRAINT "method: POST, PUT or PATCH",
    ADD CONSTRAINT "method: GET, POST, PUT, PATCH or DELETE" CHECK (method IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE')),
    DROP CONSTRAINT "publish_mode: immediate or outbox",
    ADD CONSTRAINT "publish_mode: immediate, outbox, nats, queue or both"
        CHECK (publish_mode IN ('immediate', 'outbox', 'nats', 'queue', 'both'));

COMMENT ON COLUMN rule_webhooks.publish_mode IS
    'immediate or nats: rule_webhook_publish_nats publishes during the call; outbox or queue: after the calling '
    'transaction commits (the transactional outbox is this project''s PostgreSQL queue; rule_webhook_publish_nats '
    'publishes a queue webhook at once, as the original did); both: at once, and queued in the outbox if NATS '
    'cannot take it now (rule_webhook_call_unified).';
COMMENT ON COLUMN rule_webhooks.nats_enabled IS
    'As in rule-engine-postgres: false refuses rule_webhook_publish_nats and leaves the webhook out of routing by '
    'subject. Default true (every webhook here is delivered through NATS; the original defaulted to false).';
COMMENT ON COLUMN rule_webhooks.nats_config_id IS 'config_name''s rule_nats_config.config_id (either may be written; the other follows).';
COMMENT ON COLUMN rule_webhooks.timeout_ms IS 'timeout_seconds in milliseconds (either may be written; the other follows).';
COMMENT ON COLUMN rule_webhooks.retry_enabled IS 'false: one attempt only (retry_max_attempts 1).';
COMMENT ON COLUMN rule_webhooks.max_retries IS 'Retries after the first attempt: retry_max_attempts - 1 (either may be written; the other follows).';
COMMENT ON COLUMN rule_webhooks.retry_delay_ms IS 'retry_initial_seconds in milliseconds (either may be written; the other follows).';
COMMENT ON COLUMN rule_webhooks.retry_backoff_multiplier IS
    'As in rule-engine-postgres; informational: the sidecar''s backoff doubles (exponential with jitter, capped by retry_max_backoff_seconds).';
COMMENT ON COLUMN rule_webhooks.created_by IS 'The role that created the webhook.';
COMMENT ON COLUMN rule_webhooks.tags IS 'Free labels.';

CREATE FUNCTION rule_nats__webhook_compat() RETURNS trigger
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
-- Named to fire before rule_webhooks_touch (alphabetical order), and before the NOT NULL check.
CREATE TRIGGER rule_webhooks_compat BEFORE INSERT OR UPDATE ON rule_webhooks
    FOR EACH ROW EXECUTE FUNCTION rule_nats__webhook_compat();
ALTER TABLE rule_webhooks ALTER COLUMN nats_subject DROP NOT NULL;  -- filled by the trigger above
ALTER TABLE rule_webhooks ADD CONSTRAINT "nats_subject: set (default webhooks.<webhook_name>)" CHECK (nats_subject IS NOT NULL);
UPDATE rule_webhooks w SET nats_config_id = c.config_id FROM rule_nats_config c WHERE c.config_name = w.config_name;
CREATE INDEX rule_webhooks_subject_idx ON rule_webhooks (nats_subject) WHERE enabled AND nats_enabled;

-- ---------------------------------------------------------------------------
-- rule_nats_publish_history: rule_execution_id, expires_at; latency_ms numeric(10,2).
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_publish_history
    ADD COLUMN rule_execution_id bigint,
    ADD COLUMN expires_at timestamptz DEFAULT now() + interval '7 days',
    ALTER COLUMN latency_ms TYPE numeric(10,2) USING round(least(latency_ms, 99999999)::numeric, 2);
COMMENT ON COLUMN rule_nats_publish_history.rule_execution_id IS 'As in rule-engine-postgres: the rule execution that published, if the caller says.';
COMMENT ON COLUMN rule_nats_publish_history.expires_at IS
    'rule_nats_cleanup_expired() deletes rows past it (7 days by default, as in the original); CALL rule_nats_purge() keeps applying rule_nats_retention too.';
-- No index on expires_at or webhook_id (the original had them): each would cost every publish an
-- index insert, for a cleanup that runs now and then and statistics that read the last hours
-- through the published_at index anyway.

-- ---------------------------------------------------------------------------
-- rule_nats_consumer_stats: the original's columns, and its counters' meaning.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_consumer_stats
    ADD COLUMN consumer_id integer GENERATED BY DEFAULT AS IDENTITY,
    ADD COLUMN queue_group text,
    ADD COLUMN ack_policy text,
    ADD COLUMN max_deliver integer,
    ADD COLUMN nats_acks bigint NOT NULL DEFAULT 0,
    ADD COLUMN avg_ack_time_ms numeric(10,2),
    ALTER COLUMN avg_processing_time_ms TYPE numeric(10,2) USING round(least(avg_processing_time_ms, 99999999)::numeric, 2);
COMMENT ON COLUMN rule_nats_consumer_stats.messages_delivered IS
    'As in rule-engine-postgres: messages the worker processed (each attempt: delivered, failed and retried, or dead-lettered).';
COMMENT ON COLUMN rule_nats_consumer_stats.messages_acknowledged IS
    'As in rule-engine-postgres: messages delivered successfully (HTTP 2xx); never more than messages_delivered.';
COMMENT ON COLUMN rule_nats_consumer_stats.avg_processing_time_ms IS
    'As in rule-engine-postgres: mean HTTP time of the successful requests, in ms.';
COMMENT ON COLUMN rule_nats_consumer_stats.nats_acks IS
    'Acknowledgements sent to JetStream (also for messages retried from PostgreSQL or dead-lettered).';
COMMENT ON COLUMN rule_nats_consumer_stats.avg_ack_time_ms IS 'Mean time from receiving a message to its acknowledgement, in ms.';
COMMENT ON COLUMN rule_nats_consumer_stats.queue_group IS 'The durable consumer the workers share (QUEUE_GROUP).';
COMMENT ON COLUMN rule_nats_consumer_stats.ack_policy IS 'explicit (the sidecar acknowledges each message).';
COMMENT ON COLUMN rule_nats_consumer_stats.consumer_id IS 'As in rule-engine-postgres (stats_id is this table''s key).';

-- The original's key: one row per (stream_name, consumer_name), its examples insert with ON CONFLICT
-- (stream_name, consumer_name). A worker of a consumer registered in rule_nats_consumers reported
-- per (consumer_name, worker_name); its row is now named <consumer>@<worker>, with the durable
-- consumer in queue_group (the original's model: consumer_name per worker, queue_group shared).
UPDATE rule_nats_consumer_stats
   SET queue_group = consumer_name, consumer_name = consumer_name || '@' || worker_name
 WHERE worker_name <> '';
ALTER TABLE rule_nats_consumer_stats
    ADD CONSTRAINT rule_nats_consumer_stats_consumer_key UNIQUE (stream_name, consumer_name);

DROP FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean);
CREATE FUNCTION rule_nats_consumer_add_stats(
    p_stream_name            text,
    p_consumer_name          text,
    p_worker_name            text,
    p_delivered              bigint,
    p_acknowledged           bigint,
    p_failed                 bigint,
    p_redelivered            bigint,
    p_messages_pending       bigint,
    p_avg_processing_time_ms double precision,
    p_active                 boolean,
    p_nats_acks              bigint DEFAULT 0,
    p_avg_ack_time_ms        double precision DEFAULT NULL,
    p_queue_group            text DEFAULT NULL,
    p_max_deliver            integer DEFAULT NULL
) RETURNS boolean
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO public.rule_nats_consumer_stats AS s (
        stream_name, consumer_name, worker_name, messages_delivered, messages_acknowledged,
        messages_failed, messages_redelivered, messages_pending, avg_processing_time_ms,
        last_active_at, active, nats_acks, avg_ack_time_ms, queue_group, ack_policy, max_deliver)
    VALUES (p_stream_name, p_consumer_name, coalesce(p_worker_name, ''), greatest(p_delivered, 0),
            greatest(p_acknowledged, 0), greatest(p_failed, 0), greatest(p_redelivered, 0),
            coalesce(p_messages_pending, 0), round(least(p_avg_processing_time_ms, 99999999)::numeric, 2),
            now(), coalesce(p_active, true), greatest(coalesce(p_nats_acks, 0), 0),
            round(least(p_avg_ack_time_ms, 99999999)::numeric, 2), p_queue_group, 'explicit', p_max_deliver)
    ON CONFLICT (stream_name, consumer_name, worker_name) DO UPDATE SET
        messages_delivered     = s.messages_delivered + greatest(EXCLUDED.messages_delivered, 0),
        messages_acknowledged  = s.messages_acknowledged + greatest(EXCLUDED.messages_acknowledged, 0),
        messages_failed        = s.messages_failed + greatest(EXCLUDED.messages_failed, 0),
        messages_redelivered   = s.messages_redelivered + greatest(EXCLUDED.messages_redelivered, 0),
        nats_acks              = s.nats_acks + EXCLUDED.nats_acks,
        messages_pending       = EXCLUDED.messages_pending,
        avg_processing_time_ms = coalesce(EXCLUDED.avg_processing_time_ms, s.avg_processing_time_ms),
        avg_ack_time_ms        = coalesce(EXCLUDED.avg_ack_time_ms, s.avg_ack_time_ms),
        queue_group            = coalesce(EXCLUDED.queue_group, s.queue_group),
        ack_policy             = 'explicit',
        max_deliver            = coalesce(EXCLUDED.max_deliver, s.max_deliver),
        last_active_at         = CASE WHEN EXCLUDED.messages_delivered > 0 OR EXCLUDED.nats_acks > 0
                                      THEN now() ELSE s.last_active_at END,
        active                 = EXCLUDED.active
    RETURNING true
$$;
COMMENT ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean, bigint, double precision, text, integer) IS
    'The sidecar''s report: adds the counts since its last report (counters never go down on a restart).';
REVOKE ALL ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean, bigint, double precision, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean, bigint, double precision, text, integer)
    TO rule_nats_worker, rule_nats_admin;

-- ---------------------------------------------------------------------------
-- Monitoring views: the original's columns with the original's meaning; this project's extra
-- measures in columns of their own.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE VIEW nats_performance_stats AS
WITH g AS (
    SELECT s.source, s.subject, s.consumer_name, s.webhook_id,
           sum(s.message_count)::bigint AS message_count,
           sum(s.success_count)::bigint AS success_count,
           sum(s.attempt_count)::bigint AS attempt_count,
           sum(s.latency_count) AS latency_count,
           sum(s.latency_sum) AS latency_sum,
           min(s.latency_min) AS latency_min,
           max(s.latency_max) AS latency_max,
           rule_nats_hist_sum(s.latency_hist) AS hist,
           max(s.last_at) AS last_at
      FROM rule_nats_stats_hourly s
     WHERE s.bucket >= date_trunc('hour', now() - interval '24 hours')
     GROUP BY s.source, s.subject, s.consumer_name, s.webhook_id
)
SELECT g.source,
       NULLIF(g.subject, '') AS subject,
       NULLIF(g.consumer_name, '') AS consumer_name,
       w.webhook_name,
       -- The original's message_count: successful messages only (its view reads success = true).
       LEAST(g.success_count, g.message_count) AS message_count,
       g.success_count,
       GREATEST(g.message_count - g.success_count, 0) AS failure_count,
       round(100.0 * LEAST(g.success_count, g.message_count) / NULLIF(g.message_count, 0), 2) AS success_rate_pct,
       round((g.latency_sum / NULLIF(g.latency_count, 0))::numeric, 2) AS avg_latency_ms,
       round(g.latency_min::numeric, 2) AS min_latency_ms,
       round(g.latency_max::numeric, 2) AS max_latency_ms,
       round(rule_nats_hist_quantile(g.hist, 0.50, g.latency_min, g.latency_max)::numeric, 2) AS p50_latency_ms,
       round(rule_nats_hist_quantile(g.hist, 0.95, g.latency_min, g.latency_max)::numeric, 2) AS p95_latency_ms,
       round(rule_nats_hist_quantile(g.hist, 0.99, g.latency_min, g.latency_max)::numeric, 2) AS p99_latency_ms,
       g.last_at,
       NULLIF(g.webhook_id, 0) AS webhook_id,
       date_trunc('hour', now() - interval '24 hours') AS window_start,
       g.attempt_count,
       g.attempt_count - LEAST(g.success_count, g.attempt_count) AS failed_attempt_count,
       g.message_count AS total_count
  FROM g LEFT JOIN rule_webhooks w ON w.webhook_id = g.webhook_id;
COMMENT ON COLUMN nats_performance_stats.message_count IS
    'As in rule-engine-postgres: successful messages (published, or delivered) in the window; total_count counts failures too.';
COMMENT ON COLUMN nats_performance_stats.total_count IS 'Every message in the window, successful or not.';

CREATE OR REPLACE VIEW nats_recent_failures AS
SELECT f.source, f.failed_at, f.subject, w.webhook_name, f.consumer_name, f.url, f.http_status, f.attempt,
       f.outcome, f.error_message, f.message_id, f.ref_id,
       CASE WHEN f.source <> 'delivery' THEN f.ref_id END AS publish_id,
       -- Payloads are the admin's to see (as in the original); the monitor's view stays redacted.
       CASE WHEN pg_has_role(current_user, 'rule_nats_admin', 'USAGE') THEN f.payload END AS payload,
       f.failed_at AS published_at,
       f.latency_ms
  FROM ((SELECT CASE WHEN h.triggered_by = 'sql' THEN 'publish' ELSE 'outbox' END AS source,
                h.published_at AS failed_at, h.subject, h.webhook_id, NULL::text AS consumer_name,
                NULL::text AS url, NULL::integer AS http_status, NULL::integer AS attempt, NULL::text AS outcome,
                h.error_message, h.message_id, h.publish_id AS ref_id, h.payload, h.latency_ms
           FROM rule_nats_publish_history h
          WHERE NOT h.success AND h.published_at >= now() - interval '24 hours'
          ORDER BY h.published_at DESC LIMIT 100)
        UNION ALL
        (SELECT 'delivery', a.attempted_at, a.subject, a.webhook_id, a.consumer_name, rule_nats_redact_url(a.url),
                a.http_status, a.attempt, a.outcome, a.error, a.message_id, a.attempt_id, NULL::jsonb,
                round(least(a.latency_ms, 99999999)::numeric, 2)::numeric(10,2)
           FROM rule_nats_delivery_attempts a
          WHERE a.outcome <> 'delivered' AND a.attempted_at >= now() - interval '24 hours'
          ORDER BY a.attempted_at DESC LIMIT 100)) f
  LEFT JOIN rule_webhooks w ON w.webhook_id = f.webhook_id
 ORDER BY f.failed_at DESC
 LIMIT 100;
COMMENT ON COLUMN nats_recent_failures.publish_id IS 'As in rule-engine-postgres: the failed publish''s rule_nats_publish_history row (NULL for delivery failures).';
COMMENT ON COLUMN nats_recent_failures.payload IS 'The failed publish''s payload, for members of rule_nats_admin only (NULL for others and for delivery failures).';
COMMENT ON COLUMN nats_recent_failures.published_at IS 'As in rule-engine-postgres: when it failed (failed_at).';
COMMENT ON COLUMN nats_recent_failures.latency_ms IS 'Time of the failed publish or HTTP attempt, in ms.';

CREATE OR REPLACE VIEW nats_publish_summary AS
WITH s AS (
    SELECT h.subject, h.webhook_id,
           sum(h.message_count)::bigint AS message_count, sum(h.success_count)::bigint AS success_count,
           sum(h.duplicate_count)::bigint AS duplicate_count, sum(h.latency_sum) AS latency_sum,
           sum(h.latency_count) AS latency_count, min(h.latency_min) AS latency_min,
           max(h.latency_max) AS latency_max, max(h.last_at) AS last_at
      FROM rule_nats_stats_hourly h
     WHERE h.source IN ('publish', 'outbox')
     GROUP BY h.subject, h.webhook_id
)
SELECT coalesce(NULLIF(s.subject, ''), w.nats_subject) AS subject,
       w.webhook_id,
       w.webhook_name,
       coalesce(s.message_count, 0) AS total_published,
       coalesce(s.success_count, 0) AS successful,
       coalesce(s.message_count - s.success_count, 0) AS failed,
       coalesce(s.duplicate_count, 0) AS duplicates,
       round(100.0 * s.success_count / NULLIF(s.message_count, 0), 2) AS success_rate_pct,
       round((s.latency_sum / NULLIF(s.latency_count, 0))::numeric, 2) AS avg_latency_ms,
       round(s.latency_min::numeric, 2) AS min_latency_ms,
       round(s.latency_max::numeric, 2) AS max_latency_ms,
       s.last_at AS last_published_at,
       w.publish_mode
  FROM s FULL JOIN (SELECT * FROM rule_webhooks WHERE nats_enabled) w ON w.webhook_id = NULLIF(s.webhook_id, 0)
 WHERE s.subject IS NOT NULL OR w.webhook_id IS NOT NULL;
COMMENT ON VIEW nats_publish_summary IS
    'Publishes per subject and webhook since the hourly rollup began; every NATS-enabled webhook has a row, with 0 if it never published (as in rule-engine-postgres).';
COMMENT ON COLUMN nats_publish_summary.publish_mode IS 'The webhook''s publish_mode.';

-- ---------------------------------------------------------------------------
-- rule_webhook_queue: the PostgreSQL queue the original's example 04 reads (a table it never
-- shipped). Here the queue is the transactional outbox: waiting or failed rows, then the publishes
-- it made.
-- ---------------------------------------------------------------------------
CREATE VIEW rule_webhook_queue AS
SELECT o.outbox_id AS queue_id, o.webhook_id, o.status, o.attempts AS retry_count, o.payload, o.created_at,
       CASE WHEN o.status = 'pending' AND o.next_attempt_at > '-infinity' THEN o.next_attempt_at END AS next_retry_at,
       NULL::timestamptz AS completed_at, o.error_message, o.subject, o.message_id
  FROM rule_nats_outbox o
UNION ALL
SELECT NULL::bigint, h.webhook_id, 'success', 0, h.payload, h.published_at, NULL::timestamptz, h.published_at,
       NULL::text, h.subject, h.message_id
  FROM rule_nats_publish_history h
 WHERE h.triggered_by <> 'sql' AND h.success;
COMMENT ON VIEW rule_webhook_queue IS
    'The original''s PostgreSQL webhook queue (read by its example 04), here the transactional outbox: pending '
    'and failed rows (queue_id is the outbox_id rule_webhook_call_unified returns) and, as success, what it published.';
COMMENT ON COLUMN rule_webhook_queue.queue_id IS 'The outbox_id (NULL once published: the row is then publish history).';
COMMENT ON COLUMN rule_webhook_queue.webhook_id IS 'The webhook it is for.';
COMMENT ON COLUMN rule_webhook_queue.status IS 'pending (waiting for its publish) | failed (see error_message) | success (published).';
COMMENT ON COLUMN rule_webhook_queue.retry_count IS 'Failed publish attempts so far.';
COMMENT ON COLUMN rule_webhook_queue.payload IS 'What is published (the webhook envelope).';
COMMENT ON COLUMN rule_webhook_queue.created_at IS 'When it was queued (published, for success rows).';
COMMENT ON COLUMN rule_webhook_queue.next_retry_at IS 'When a pending row is tried again after a failed attempt.';
COMMENT ON COLUMN rule_webhook_queue.completed_at IS 'When it was published.';
COMMENT ON COLUMN rule_webhook_queue.error_message IS 'Why its last publish attempt failed.';
COMMENT ON COLUMN rule_webhook_queue.subject IS 'The NATS subject.';
COMMENT ON COLUMN rule_webhook_queue.message_id IS 'Its Nats-Msg-Id (the event id receivers see).';
GRANT SELECT ON rule_webhook_queue TO rule_nats_admin;

-- ---------------------------------------------------------------------------
-- The original's functions: configuration (sql/nats_api.sql).
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_configure(
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
COMMENT ON FUNCTION rule_nats_configure(text, text, text, boolean, text, text) IS
    'As in rule-engine-postgres: create or change a NATS connection (rule_nats_config). Credentials go in their columns (auth_token, nats_user, ...).';

CREATE FUNCTION rule_nats_stream_create(
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
COMMENT ON FUNCTION rule_nats_stream_create(text, text[], text, text, text, bigint) IS
    'As in rule-engine-postgres: register a stream (rule_nats_streams); the sidecar creates it in JetStream.';

CREATE FUNCTION rule_webhook_enable_nats(
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
COMMENT ON FUNCTION rule_webhook_enable_nats(integer, text, text, text) IS
    'As in rule-engine-postgres: publish this webhook through NATS (default subject webhooks.<webhook_name>).';

CREATE FUNCTION rule_webhook_disable_nats(p_webhook_id integer) RETURNS boolean
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
COMMENT ON FUNCTION rule_webhook_disable_nats(integer) IS
    'As in rule-engine-postgres: nats_enabled false, publish_mode queue. rule_webhook_publish_nats then refuses it and routing by subject skips it.';

-- ---------------------------------------------------------------------------
-- Statistics and maintenance (sql/nats_api.sql, migration 007).
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_stats(p_webhook_id integer DEFAULT NULL, p_hours integer DEFAULT 24) RETURNS json
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
COMMENT ON FUNCTION rule_nats_stats(integer, integer) IS
    'As in rule-engine-postgres: publish statistics of one webhook (or all) over the last p_hours.';

CREATE FUNCTION rule_nats_config_info(p_config_name text DEFAULT 'default') RETURNS json
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
COMMENT ON FUNCTION rule_nats_config_info(text) IS 'As in rule-engine-postgres: a connection''s settings (no credentials).';

CREATE FUNCTION rule_nats_webhooks_list()
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
COMMENT ON FUNCTION rule_nats_webhooks_list() IS 'As in rule-engine-postgres: NATS-enabled webhooks with their publish counts.';

CREATE FUNCTION rule_nats_cleanup_expired() RETURNS bigint
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
COMMENT ON FUNCTION rule_nats_cleanup_expired() IS 'As in rule-engine-postgres: delete publish history past its expires_at.';

CREATE FUNCTION rule_nats_cleanup_old_history(p_older_than interval DEFAULT '30 days', p_keep_failed boolean DEFAULT true)
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
COMMENT ON FUNCTION rule_nats_cleanup_old_history(interval, boolean) IS
    'As in rule-engine-postgres: delete publish history older than p_older_than (keeping failures unless p_keep_failed is false).';

-- ---------------------------------------------------------------------------
-- The functions of src/api/nats.rs: rule_nats_init, rule_webhook_publish_nats,
-- rule_webhook_call_unified, rule_nats_health_check; and rule_nats_test_connection.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_init(config_name text) RETURNS jsonb
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
COMMENT ON FUNCTION rule_nats_init(text) IS
    'As in rule-engine-postgres: check a configuration and connect. Also registers (rule_nats_streams) and creates '
    'the stream that captures subject_prefix.> if none does. Not needed before publishing here (sessions connect on first use).';

CREATE FUNCTION rule_nats_test_connection(p_config_name text DEFAULT 'default') RETURNS json
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
COMMENT ON FUNCTION rule_nats_test_connection(text) IS
    'As in rule-engine-postgres, but really connects: {success, message, config}.';

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
COMMENT ON FUNCTION rule_nats_health_check(text) IS
    'Connects and reports: the original''s {success, config, connected, pool_stats, jetstream_enabled} (pool_stats '
    'describes this session''s one connection) and this project''s {ok, connected_url, server_version, rtt_ms, jetstream_account, ...}.';

CREATE FUNCTION rule_nats__webhook_publish_as(p_webhook_id integer, p_payload jsonb, p_message_id text, p_mode text)
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
COMMENT ON FUNCTION rule_nats__webhook_publish_as(integer, jsonb, text, text) IS
    'Internal: publish a registered webhook''s envelope at once or through the outbox; the result or a failure description.';
REVOKE ALL ON FUNCTION rule_nats__webhook_publish_as(integer, jsonb, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats__webhook_publish_as(integer, jsonb, text, text) TO rule_nats_definer;

CREATE OR REPLACE FUNCTION rule_webhook_publish_nats(webhook_id integer, payload jsonb, message_id text DEFAULT NULL)
RETURNS jsonb
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
    END IF;
    r := public.rule_nats__webhook_publish_as(webhook_id, payload, nullif(message_id, ''), NULL);
    IF NOT (r ->> 'ok')::boolean THEN
        PERFORM public.rule_nats__raise('rule_webhook_publish_nats', r);
    END IF;
    RETURN r - 'ok';
END
$$;
COMMENT ON FUNCTION rule_webhook_publish_nats(integer, jsonb, text) IS
    'Publish {"webhook_url", "webhook_id", "data", "event_id", "timestamp"} to the webhook''s nats_subject (at once; '
    'after COMMIT for publish_mode outbox). Returns the original''s {success, webhook_name, subject, stream, sequence, '
    'duplicate, latency_ms} and this project''s {seq, mode, event_id} (outbox: outbox_id, sequence NULL).';

CREATE FUNCTION rule_webhook_call_unified(webhook_id integer, payload jsonb) RETURNS jsonb
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
COMMENT ON FUNCTION rule_webhook_call_unified(integer, jsonb) IS
    'As in rule-engine-postgres, by publish_mode: queue/outbox -> {"queue": {success, queue_id (the outbox_id), status}} '
    '(published after COMMIT); nats/immediate -> {"nats": <rule_webhook_publish_nats result>}; both -> published at '
    'once, and queued in the outbox only if NATS cannot take it now (delivered once, not twice).';

DO $owner$
DECLARE
    f regprocedure;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'rule_nats_init(text)',
        'rule_nats_test_connection(text)',
        'rule_webhook_call_unified(integer, jsonb)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO rule_nats_definer', f);
    END LOOP;
END
$owner$;

-- ---------------------------------------------------------------------------
-- Privileges: as the rest of the schema (none to PUBLIC that writes or shows secrets).
-- ---------------------------------------------------------------------------
REVOKE ALL ON FUNCTION rule_nats_configure(text, text, text, boolean, text, text), rule_nats_stream_create(text, text[], text, text, text, bigint),
    rule_webhook_enable_nats(integer, text, text, text), rule_webhook_disable_nats(integer), rule_nats_stats(integer, integer),
    rule_nats_config_info(text), rule_nats_webhooks_list(), rule_nats_cleanup_expired(),
    rule_nats_cleanup_old_history(interval, boolean), rule_nats_init(text), rule_nats_test_connection(text),
    rule_webhook_call_unified(integer, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_configure(text, text, text, boolean, text, text), rule_nats_stream_create(text, text[], text, text, text, bigint),
    rule_webhook_enable_nats(integer, text, text, text), rule_webhook_disable_nats(integer), rule_nats_cleanup_expired(),
    rule_nats_cleanup_old_history(interval, boolean), rule_nats_init(text) TO rule_nats_admin;
GRANT EXECUTE ON FUNCTION rule_nats_stats(integer, integer), rule_nats_config_info(text), rule_nats_webhooks_list()
    TO rule_nats_admin;  -- they read tables only the admin reads (payload history, connection rows)
GRANT EXECUTE ON FUNCTION rule_nats_test_connection(text) TO rule_nats_admin, rule_nats_monitor;
GRANT EXECUTE ON FUNCTION rule_webhook_call_unified(integer, jsonb) TO rule_nats_publisher, rule_nats_admin;
GRANT SELECT ON nats_performance_stats, nats_recent_failures TO rule_nats_monitor, rule_nats_admin, rule_nats_worker;
GRANT SELECT ON nats_publish_summary TO rule_nats_monitor, rule_nats_admin;

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (14, 'compat');
