-- 0009_counters: counters with one meaning each, and status views that read rollups.
--
--  * nats_performance_stats.message_count counts messages (publishes, or deliveries that reached
--    an outcome: delivered or dead-lettered), attempt_count counts HTTP attempts; success rate and
--    failure_count are per message. One event failing twice, then delivered: 1 message, 3
--    attempts, 100 %.
--  * nats_endpoint_health, nats_consumer_status and nats_publish_summary read rollups instead of
--    the raw rows of the last hour (they took 0.5 s with 3.6 million attempts in that hour): a
--    per-minute counter table beside the hourly one, kept by the same statement trigger.
--  * Zeros instead of NULLs, an endpoint's last error shown only while it is failing, and a
--    comment on every column of every view (the one vocabulary for source is in 0006's
--    nats_recent_failures).

-- ---------------------------------------------------------------------------
-- Hourly rollup: messages and attempts apart.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_stats_hourly
    ADD COLUMN attempt_count   bigint NOT NULL DEFAULT 0,
    ADD COLUMN duplicate_count bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN rule_nats_stats_hourly.message_count IS
    'Messages: publishes, or deliveries that reached an outcome (delivered or dead-lettered).';
COMMENT ON COLUMN rule_nats_stats_hourly.attempt_count IS 'Attempts: publishes, or HTTP delivery attempts (retries included).';
COMMENT ON COLUMN rule_nats_stats_hourly.success_count IS 'Messages published, or delivered.';
COMMENT ON COLUMN rule_nats_stats_hourly.duplicate_count IS 'Publishes JetStream reported as duplicates (same Nats-Msg-Id).';

-- Rows written before: every row was an attempt. Where the raw attempts are still there, count the
-- messages again; older buckets keep the attempt count (the best figure left).
UPDATE rule_nats_stats_hourly SET attempt_count = message_count;
UPDATE rule_nats_stats_hourly s
   SET message_count = r.messages
  FROM (SELECT date_trunc('hour', attempted_at) AS bucket, coalesce(subject, '') AS subject, consumer_name,
               coalesce(webhook_id, 0) AS webhook_id, count(*) FILTER (WHERE outcome <> 'retry') AS messages
          FROM rule_nats_delivery_attempts GROUP BY 1, 2, 3, 4) r
 WHERE s.source = 'delivery' AND s.bucket = r.bucket AND s.subject = r.subject
   AND s.consumer_name = r.consumer_name AND s.webhook_id = r.webhook_id;
UPDATE rule_nats_stats_hourly s
   SET duplicate_count = r.duplicates
  FROM (SELECT date_trunc('hour', published_at) AS bucket,
               CASE WHEN triggered_by = 'sql' THEN 'publish' ELSE 'outbox' END AS source, subject,
               coalesce(webhook_id, 0) AS webhook_id, count(*) FILTER (WHERE duplicate) AS duplicates
          FROM rule_nats_publish_history GROUP BY 1, 2, 3, 4) r
 WHERE s.source = r.source AND s.bucket = r.bucket AND s.subject = r.subject AND s.webhook_id = r.webhook_id;

-- ---------------------------------------------------------------------------
-- Per-minute counts of delivery attempts: what "the last hour" and "the last 5 minutes" read.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_stats_minute (
    minute                     timestamptz NOT NULL,
    stream_name                text        NOT NULL,
    consumer_name              text        NOT NULL,
    webhook_id                 integer     NOT NULL DEFAULT 0,
    delivered                  bigint      NOT NULL DEFAULT 0,
    failed                     bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, stream_name, consumer_name, webhook_id)
);
COMMENT ON TABLE rule_nats_stats_minute IS
    'Delivery attempts per minute, stream, consumer and webhook (delivered, and failed: retry or dead letter). Kept '
    'by the same statement trigger as rule_nats_stats_hourly; rows older than 2 hours are purged with the stats.';
INSERT INTO rule_nats_stats_minute (minute, stream_name, consumer_name, webhook_id, delivered, failed)
SELECT date_trunc('minute', attempted_at), stream_name, consumer_name, coalesce(webhook_id, 0),
       count(*) FILTER (WHERE outcome = 'delivered'), count(*) FILTER (WHERE outcome <> 'delivered')
  FROM rule_nats_delivery_attempts
 WHERE attempted_at > now() - interval '2 hours'
 GROUP BY 1, 2, 3, 4;

CREATE OR REPLACE FUNCTION rule_nats_rollup_attempts()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO public.rule_nats_stats_hourly AS s
        (bucket, source, subject, consumer_name, webhook_id, message_count, attempt_count, success_count,
         latency_count, latency_sum, latency_min, latency_max, latency_hist, last_at)
    SELECT date_trunc('hour', attempted_at), 'delivery', coalesce(subject, ''), consumer_name,
           coalesce(webhook_id, 0), count(*) FILTER (WHERE outcome <> 'retry'), count(*),
           count(*) FILTER (WHERE outcome = 'delivered'), count(latency_ms), coalesce(sum(latency_ms), 0),
           min(latency_ms), max(latency_ms), public.rule_nats_hist_agg(latency_ms), max(attempted_at)
      FROM new_rows
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3, 4, 5  -- rows locked in one order: concurrent writers cannot deadlock
    ON CONFLICT (bucket, source, subject, consumer_name, webhook_id) DO UPDATE SET
        message_count = s.message_count + excluded.message_count,
        attempt_count = s.attempt_count + excluded.attempt_count,
        success_count = s.success_count + excluded.success_count,
        latency_count = s.latency_count + excluded.latency_count,
        latency_sum = s.latency_sum + excluded.latency_sum,
        latency_min = least(s.latency_min, excluded.latency_min),
        latency_max = greatest(s.latency_max, excluded.latency_max),
        latency_hist = public.rule_nats_hist_merge(s.latency_hist, excluded.latency_hist),
        last_at = greatest(s.last_at, excluded.last_at);
    INSERT INTO public.rule_nats_stats_minute AS m (minute, stream_name, consumer_name, webhook_id, delivered, failed)
    SELECT date_trunc('minute', attempted_at), stream_name, consumer_name, coalesce(webhook_id, 0),
           count(*) FILTER (WHERE outcome = 'delivered'), count(*) FILTER (WHERE outcome <> 'delivered')
      FROM new_rows
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT (minute, stream_name, consumer_name, webhook_id) DO UPDATE SET
        delivered = m.delivered + excluded.delivered,
        failed = m.failed + excluded.failed;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION rule_nats_rollup_publishes()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO public.rule_nats_stats_hourly AS s
        (bucket, source, subject, consumer_name, webhook_id, message_count, attempt_count, success_count,
         duplicate_count, latency_count, latency_sum, latency_min, latency_max, latency_hist, last_at)
    SELECT date_trunc('hour', published_at), CASE WHEN triggered_by = 'sql' THEN 'publish' ELSE 'outbox' END,
           subject, '', coalesce(webhook_id, 0), count(*), count(*), count(*) FILTER (WHERE success),
           count(*) FILTER (WHERE duplicate), count(latency_ms), coalesce(sum(latency_ms), 0), min(latency_ms),
           max(latency_ms), public.rule_nats_hist_agg(latency_ms), max(published_at)
      FROM new_rows
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3, 4, 5  -- rows locked in one order: concurrent writers cannot deadlock
    ON CONFLICT (bucket, source, subject, consumer_name, webhook_id) DO UPDATE SET
        message_count = s.message_count + excluded.message_count,
        attempt_count = s.attempt_count + excluded.attempt_count,
        success_count = s.success_count + excluded.success_count,
        duplicate_count = s.duplicate_count + excluded.duplicate_count,
        latency_count = s.latency_count + excluded.latency_count,
        latency_sum = s.latency_sum + excluded.latency_sum,
        latency_min = least(s.latency_min, excluded.latency_min),
        latency_max = greatest(s.latency_max, excluded.latency_max),
        latency_hist = public.rule_nats_hist_merge(s.latency_hist, excluded.latency_hist),
        last_at = greatest(s.last_at, excluded.last_at);
    RETURN NULL;
END
$$;

-- The 'stats' kind of retention also drops per-minute rows older than 2 hours (nothing reads them).
CREATE OR REPLACE FUNCTION rule_nats_purge_batch(p_what text, p_older_than interval, p_batch_size integer DEFAULT 5000)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint;
BEGIN
    IF p_older_than IS NULL OR p_older_than <= interval '0' THEN
        RAISE EXCEPTION 'p_older_than must be a positive interval' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'e.g. rule_nats_purge_batch(''attempts'', interval ''30 days'')';
    END IF;
    CASE p_what
    WHEN 'attempts' THEN
        DELETE FROM public.rule_nats_delivery_attempts WHERE attempt_id IN (
            SELECT attempt_id FROM public.rule_nats_delivery_attempts
             WHERE attempted_at < now() - p_older_than ORDER BY attempted_at LIMIT p_batch_size);
    WHEN 'publish_history' THEN
        DELETE FROM public.rule_nats_publish_history WHERE publish_id IN (
            SELECT publish_id FROM public.rule_nats_publish_history
             WHERE published_at < now() - p_older_than ORDER BY published_at LIMIT p_batch_size);
    WHEN 'dead_letters' THEN
        DELETE FROM public.rule_nats_dead_letters WHERE dead_letter_id IN (
            SELECT dead_letter_id FROM public.rule_nats_dead_letters
             WHERE replayed AND created_at < now() - p_older_than ORDER BY created_at LIMIT p_batch_size);
    WHEN 'stats' THEN
        DELETE FROM public.rule_nats_stats_minute WHERE minute < now() - interval '2 hours';
        DELETE FROM public.rule_nats_stats_hourly WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM public.rule_nats_stats_hourly
             WHERE bucket < now() - p_older_than LIMIT p_batch_size));
    ELSE
        RAISE EXCEPTION 'unknown history kind %', p_what USING ERRCODE = 'invalid_parameter_value',
            HINT = 'one of: attempts, publish_history, dead_letters, stats';
    END CASE;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- ---------------------------------------------------------------------------
-- The views.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE VIEW nats_performance_stats AS
WITH g AS (
    SELECT s.source, s.subject, s.consumer_name, s.webhook_id,
           sum(s.message_count)::bigint          AS message_count,
           sum(s.success_count)::bigint          AS success_count,
           sum(s.attempt_count)::bigint          AS attempt_count,
           sum(s.latency_count)                  AS latency_count,
           sum(s.latency_sum)                    AS latency_sum,
           min(s.latency_min)                    AS latency_min,
           max(s.latency_max)                    AS latency_max,
           public.rule_nats_hist_sum(s.latency_hist) AS hist,
           max(s.last_at)                        AS last_at
      FROM public.rule_nats_stats_hourly s
     WHERE s.bucket >= date_trunc('hour', now() - interval '24 hours')
     GROUP BY s.source, s.subject, s.consumer_name, s.webhook_id
)
SELECT g.source,
       nullif(g.subject, '')                                             AS subject,
       nullif(g.consumer_name, '')                                       AS consumer_name,
       w.webhook_name,
       g.message_count,
       g.success_count,
       greatest(g.message_count - g.success_count, 0)                    AS failure_count,
       round(100.0 * least(g.success_count, g.message_count) / nullif(g.message_count, 0), 2) AS success_rate_pct,
       round((g.latency_sum / nullif(g.latency_count, 0))::numeric, 2)  AS avg_latency_ms,
       round(g.latency_min::numeric, 2)                                  AS min_latency_ms,
       round(g.latency_max::numeric, 2)                                  AS max_latency_ms,
       round(public.rule_nats_hist_quantile(g.hist, 0.50, g.latency_min, g.latency_max)::numeric, 2) AS p50_latency_ms,
       round(public.rule_nats_hist_quantile(g.hist, 0.95, g.latency_min, g.latency_max)::numeric, 2) AS p95_latency_ms,
       round(public.rule_nats_hist_quantile(g.hist, 0.99, g.latency_min, g.latency_max)::numeric, 2) AS p99_latency_ms,
       g.last_at,
       nullif(g.webhook_id, 0)                                           AS webhook_id,
       date_trunc('hour', now() - interval '24 hours')                   AS window_start,
       g.attempt_count,
       g.attempt_count - least(g.success_count, g.attempt_count)         AS failed_attempt_count
  FROM g
  LEFT JOIN public.rule_webhooks w ON w.webhook_id = g.webhook_id;

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
       CASE WHEN s.last_failure_at > coalesce(s.last_success_at, '-infinity') THEN s.last_status END AS last_status,
       CASE WHEN s.last_failure_at > coalesce(s.last_success_at, '-infinity') THEN s.last_error END AS last_error,
       s.last_success_at,
       s.last_failure_at,
       coalesce(a.attempts_1h, 0)                             AS attempts_1h,
       coalesce(a.failures_1h, 0)                             AS failures_1h,
       round(100.0 * (a.attempts_1h - a.failures_1h) / nullif(a.attempts_1h, 0), 2) AS success_rate_1h,
       w.max_concurrency,
       w.rate_limit_per_second,
       (SELECT count(*) FROM public.rule_nats_retries r WHERE r.webhook_id = w.webhook_id) AS waiting,
       s.updated_at                                           AS state_updated_at
  FROM public.rule_webhooks w
  LEFT JOIN public.rule_nats_endpoint_state s USING (webhook_id)
  LEFT JOIN (
        SELECT m.webhook_id,
               sum(m.delivered + m.failed)::bigint            AS attempts_1h,
               sum(m.failed)::bigint                          AS failures_1h
          FROM public.rule_nats_stats_minute m
         WHERE m.minute > now() - interval '1 hour' AND m.webhook_id <> 0
         GROUP BY m.webhook_id) a ON a.webhook_id = w.webhook_id;

CREATE OR REPLACE VIEW nats_consumer_status AS
SELECT c.stream_name,
       c.consumer_name,
       CASE WHEN NOT c.enabled THEN 'disabled'
            WHEN cs.consumer_name IS NULL THEN 'unknown'
            WHEN NOT cs.present THEN 'missing'
            WHEN cs.last_error IS NOT NULL THEN 'error'
            WHEN cs.filter_subject IS DISTINCT FROM c.filter_subject THEN 'filter_mismatch'
            WHEN now() - cs.updated_at > interval '2 minutes' THEN 'stale'
            WHEN cs.num_pending > 0 AND cs.num_ack_pending = 0 AND cs.num_waiting = 0 THEN 'not_consuming'
            ELSE 'ok' END                                              AS status,
       c.filter_subject                                                AS configured_filter,
       cs.filter_subject                                               AS actual_filter,
       cs.present,
       cs.num_pending                                                  AS lag,
       cs.num_ack_pending,
       cs.num_redelivered,
       cs.num_waiting,
       (SELECT count(*) FROM public.nats_worker_status ws
         WHERE ws.status IN ('ACTIVE', 'IDLE')
           AND (c.stream_name || '/' || c.consumer_name) = ANY (ws.consumers)) AS workers,
       coalesce(m.delivered_1h, 0)                                     AS delivered_1h,
       coalesce(m.failed_1h, 0)                                        AS failed_1h,
       coalesce(m.per_second_5m, 0)                                    AS per_second_5m,
       cs.last_error,
       cs.reported_by,
       cs.updated_at,
       round(extract(epoch FROM now() - cs.updated_at)::numeric, 1)    AS age_seconds
  FROM public.rule_nats_consumers c
  LEFT JOIN public.rule_nats_consumer_state cs USING (stream_name, consumer_name)
  LEFT JOIN (
        SELECT m.stream_name, m.consumer_name,
               sum(m.delivered)::bigint                                 AS delivered_1h,
               sum(m.failed)::bigint                                    AS failed_1h,
               round(coalesce(sum(m.delivered) FILTER (WHERE m.minute >= now() - interval '5 minutes'), 0)
                     / 300.0, 2)                                        AS per_second_5m
          FROM public.rule_nats_stats_minute m
         WHERE m.minute > now() - interval '1 hour'
         GROUP BY m.stream_name, m.consumer_name) m
    ON m.stream_name = c.stream_name AND m.consumer_name = c.consumer_name;

-- Totals per subject and webhook, from the hourly rollup (as far back as rule_nats_retention.stats_days)
-- instead of a pass over the whole publish history.
CREATE OR REPLACE VIEW nats_publish_summary AS
SELECT nullif(s.subject, '')                                                   AS subject,
       w.webhook_id,
       w.webhook_name,
       sum(s.message_count)::bigint                                            AS total_published,
       sum(s.success_count)::bigint                                            AS successful,
       sum(s.message_count - s.success_count)::bigint                          AS failed,
       sum(s.duplicate_count)::bigint                                          AS duplicates,
       round(100.0 * sum(s.success_count) / nullif(sum(s.message_count), 0), 2) AS success_rate_pct,
       round((sum(s.latency_sum) / nullif(sum(s.latency_count), 0))::numeric, 2) AS avg_latency_ms,
       round(min(s.latency_min)::numeric, 2)                                   AS min_latency_ms,
       round(max(s.latency_max)::numeric, 2)                                   AS max_latency_ms,
       max(s.last_at)                                                          AS last_published_at
  FROM public.rule_nats_stats_hourly s
  LEFT JOIN public.rule_webhooks w ON w.webhook_id = s.webhook_id
 WHERE s.source IN ('publish', 'outbox')
 GROUP BY s.subject, w.webhook_id, w.webhook_name;

-- ---------------------------------------------------------------------------
-- Failed outbox rows: retry them after fixing the cause (the admin may only SELECT and DELETE
-- the outbox: a retry must not change what is published).
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_outbox_retry(p_outbox_id bigint DEFAULT NULL)
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
COMMENT ON FUNCTION rule_nats_outbox_retry(bigint) IS
    'Puts failed outbox rows (one by outbox_id, or all) back to pending, e.g. after registering the stream that '
    'was missing; the relay publishes them again with the same message id. Returns how many. To drop them instead: '
    'DELETE FROM rule_nats_outbox WHERE status = ''failed''.';
ALTER FUNCTION rule_nats_outbox_retry(bigint) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_outbox_retry(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_outbox_retry(bigint) TO rule_nats_admin;
GRANT UPDATE (status, next_attempt_at, error_message) ON rule_nats_outbox TO rule_nats_definer;

GRANT SELECT ON rule_nats_stats_minute TO rule_nats_admin, rule_nats_monitor;
GRANT SELECT (publish_registered_subjects_only) ON rule_nats_config TO rule_nats_monitor;
GRANT SELECT, INSERT, UPDATE, DELETE ON rule_nats_stats_minute TO rule_nats_definer;

-- ---------------------------------------------------------------------------
-- What every view column means.
-- ---------------------------------------------------------------------------
COMMENT ON VIEW nats_performance_stats IS
    'Last 24 hours (from the start of the hour 24 hours ago), per source (publish: from SQL; outbox: relayed or '
    'replayed by a sidecar; delivery: HTTP deliveries), subject, consumer and webhook. Messages and attempts apart: '
    'one event that failed twice, then was delivered, is 1 message, 3 attempts, 100 % success. Reads '
    'rule_nats_stats_hourly.';
COMMENT ON VIEW nats_publish_summary IS
    'Publishes per subject and webhook (from SQL and relayed from the outbox) as far back as the hourly rollup goes '
    '(rule_nats_retention.stats_days): totals, failures, duplicates and latency.';

DO $comments$
DECLARE
    c record;
BEGIN
    -- Columns that show a table's column as it is: the table's comment.
    FOR c IN
        SELECT v.relname AS view, a.attname AS col, d.description
          FROM (VALUES ('nats_webhooks', 'rule_webhooks'), ('nats_delivery_attempts', 'rule_nats_delivery_attempts'))
               AS m(view, tbl)
          JOIN pg_class v ON v.relname = m.view AND v.relnamespace = 'public'::regnamespace
          JOIN pg_attribute a ON a.attrelid = v.oid AND a.attnum > 0
          JOIN pg_attribute ta ON ta.attrelid = ('public.' || m.tbl)::regclass AND ta.attname = a.attname
          JOIN pg_description d ON d.objoid = ta.attrelid AND d.objsubid = ta.attnum
    LOOP
        EXECUTE format('COMMENT ON COLUMN public.%I.%I IS %L', c.view, c.col, c.description);
    END LOOP;
END
$comments$;

COMMENT ON COLUMN nats_webhooks.webhook_id IS 'The webhook''s id (rule_webhooks.webhook_id).';
COMMENT ON COLUMN nats_webhooks.webhook_name IS 'The webhook''s unique name.';
COMMENT ON COLUMN nats_webhooks.url IS 'Where deliveries go, without credentials, query string or fragment.';
COMMENT ON COLUMN nats_webhooks.method IS 'HTTP method of the deliveries.';
COMMENT ON COLUMN nats_webhooks.nats_subject IS 'The subject rule_webhook_publish_nats publishes this webhook''s events to.';
COMMENT ON COLUMN nats_webhooks.config_name IS 'The NATS configuration (rule_nats_config) publishes use.';
COMMENT ON COLUMN nats_webhooks.publish_mode IS 'immediate (published at once) or outbox (published after COMMIT).';
COMMENT ON COLUMN nats_webhooks.enabled IS 'False: refused (disabled by a DBA) or held (disabled_reason set: by the worker).';
COMMENT ON COLUMN nats_webhooks.disabled_at IS 'When the worker disabled the endpoint (HTTP 410 or a long failure).';
COMMENT ON COLUMN nats_webhooks.disabled_reason IS 'Why the worker disabled the endpoint; NULL when a DBA did.';
COMMENT ON COLUMN nats_webhooks.description IS 'Free text.';
COMMENT ON COLUMN nats_webhooks.created_at IS 'When the row was created.';
COMMENT ON COLUMN nats_webhooks.updated_at IS 'When the row was last changed.';
COMMENT ON COLUMN nats_delivery_attempts.url IS 'The URL the attempt went to, without credentials, query string or fragment.';
COMMENT ON COLUMN nats_delivery_attempts.attempt_id IS 'The attempt''s id.';
COMMENT ON COLUMN nats_delivery_attempts.attempted_at IS 'When the attempt was made.';
COMMENT ON COLUMN nats_delivery_attempts.message_id IS 'The message id (event_id, Nats-Msg-Id or STREAM:seq): the webhook-id header.';
COMMENT ON COLUMN nats_delivery_attempts.stream_name IS 'The stream the message came from.';
COMMENT ON COLUMN nats_delivery_attempts.consumer_name IS 'The durable consumer that delivered it.';
COMMENT ON COLUMN nats_delivery_attempts.stream_seq IS 'The message''s sequence number in the stream.';
COMMENT ON COLUMN nats_delivery_attempts.subject IS 'The NATS subject of the message.';
COMMENT ON COLUMN nats_delivery_attempts.webhook_id IS 'Registered webhook, when the message names one.';
COMMENT ON COLUMN nats_delivery_attempts.attempt IS 'Attempt number of the message (1 for the first).';
COMMENT ON COLUMN nats_delivery_attempts.outcome IS 'delivered, retry (another attempt scheduled) or dead_letter.';
COMMENT ON COLUMN nats_delivery_attempts.http_status IS 'HTTP status of the response, NULL when there was none.';
COMMENT ON COLUMN nats_delivery_attempts.latency_ms IS 'Duration of the HTTP request, in ms.';
COMMENT ON COLUMN nats_delivery_attempts.error IS 'Why the attempt failed.';
COMMENT ON COLUMN nats_delivery_attempts.response_body IS 'The first 4 KB of the response body of a failed attempt.';
COMMENT ON COLUMN nats_delivery_attempts.next_attempt_at IS 'When the next attempt is due (outcome retry).';
COMMENT ON COLUMN nats_delivery_attempts.worker_name IS 'The sidecar that made the attempt.';

COMMENT ON COLUMN nats_performance_stats.source IS 'publish (from SQL), outbox (relayed or replayed by a sidecar) or delivery (HTTP).';
COMMENT ON COLUMN nats_performance_stats.subject IS 'NATS subject.';
COMMENT ON COLUMN nats_performance_stats.consumer_name IS 'Durable consumer (deliveries only).';
COMMENT ON COLUMN nats_performance_stats.webhook_name IS 'Registered webhook, when the message names one.';
COMMENT ON COLUMN nats_performance_stats.message_count IS 'Messages: publishes, or deliveries that reached an outcome (delivered or dead-lettered).';
COMMENT ON COLUMN nats_performance_stats.success_count IS 'Messages published, or delivered.';
COMMENT ON COLUMN nats_performance_stats.failure_count IS 'Messages that failed: publishes that failed, or deliveries dead-lettered.';
COMMENT ON COLUMN nats_performance_stats.success_rate_pct IS 'success_count / message_count, in percent (per message, not per attempt).';
COMMENT ON COLUMN nats_performance_stats.avg_latency_ms IS 'Average latency of an attempt (publish round trip, or HTTP request), in ms.';
COMMENT ON COLUMN nats_performance_stats.min_latency_ms IS 'Fastest attempt, in ms.';
COMMENT ON COLUMN nats_performance_stats.max_latency_ms IS 'Slowest attempt, in ms.';
COMMENT ON COLUMN nats_performance_stats.p50_latency_ms IS 'Median attempt latency in ms (from a histogram: within one 25 % bucket).';
COMMENT ON COLUMN nats_performance_stats.p95_latency_ms IS '95th percentile attempt latency in ms (within one 25 % bucket).';
COMMENT ON COLUMN nats_performance_stats.p99_latency_ms IS '99th percentile attempt latency in ms (within one 25 % bucket).';
COMMENT ON COLUMN nats_performance_stats.last_at IS 'Time of the newest attempt in the window.';
COMMENT ON COLUMN nats_performance_stats.webhook_id IS 'Registered webhook id, when the message names one.';
COMMENT ON COLUMN nats_performance_stats.window_start IS 'Start of the window: the top of the hour 24 hours ago.';
COMMENT ON COLUMN nats_performance_stats.attempt_count IS 'Attempts: publishes, or HTTP delivery attempts including retries.';
COMMENT ON COLUMN nats_performance_stats.failed_attempt_count IS 'Attempts that did not succeed (retries scheduled, dead letters, failed publishes).';

COMMENT ON COLUMN nats_recent_failures.source IS 'publish (from SQL), outbox (relayed by a sidecar) or delivery (HTTP).';
COMMENT ON COLUMN nats_recent_failures.failed_at IS 'When it failed.';
COMMENT ON COLUMN nats_recent_failures.subject IS 'NATS subject.';
COMMENT ON COLUMN nats_recent_failures.webhook_name IS 'Registered webhook, when the message names one.';
COMMENT ON COLUMN nats_recent_failures.consumer_name IS 'Durable consumer (deliveries).';
COMMENT ON COLUMN nats_recent_failures.url IS 'Delivery URL without credentials, query string or fragment.';
COMMENT ON COLUMN nats_recent_failures.http_status IS 'HTTP status of the attempt, NULL when there was no response.';
COMMENT ON COLUMN nats_recent_failures.attempt IS 'Attempt number of the message (deliveries).';
COMMENT ON COLUMN nats_recent_failures.outcome IS 'retry (another attempt is scheduled) or dead_letter (deliveries).';
COMMENT ON COLUMN nats_recent_failures.error_message IS 'Why it failed.';
COMMENT ON COLUMN nats_recent_failures.message_id IS 'The message id (Nats-Msg-Id / event_id / webhook-id).';
COMMENT ON COLUMN nats_recent_failures.ref_id IS 'publish_id (publish, outbox) or attempt_id (delivery) of the row.';

COMMENT ON COLUMN nats_publish_summary.subject IS 'NATS subject.';
COMMENT ON COLUMN nats_publish_summary.webhook_id IS 'Registered webhook, when the publish named one.';
COMMENT ON COLUMN nats_publish_summary.webhook_name IS 'Registered webhook name.';
COMMENT ON COLUMN nats_publish_summary.total_published IS 'Publishes (from SQL and the outbox), successful or not.';
COMMENT ON COLUMN nats_publish_summary.successful IS 'Publishes JetStream acknowledged.';
COMMENT ON COLUMN nats_publish_summary.failed IS 'Publishes that failed.';
COMMENT ON COLUMN nats_publish_summary.duplicates IS 'Publishes JetStream reported as duplicates (same Nats-Msg-Id).';
COMMENT ON COLUMN nats_publish_summary.success_rate_pct IS 'successful / total_published, in percent.';
COMMENT ON COLUMN nats_publish_summary.avg_latency_ms IS 'Average publish round trip, in ms.';
COMMENT ON COLUMN nats_publish_summary.min_latency_ms IS 'Fastest publish, in ms.';
COMMENT ON COLUMN nats_publish_summary.max_latency_ms IS 'Slowest publish, in ms.';
COMMENT ON COLUMN nats_publish_summary.last_published_at IS 'Time of the newest publish.';

COMMENT ON COLUMN nats_endpoint_health.webhook_id IS 'The webhook''s id.';
COMMENT ON COLUMN nats_endpoint_health.webhook_name IS 'The webhook''s name.';
COMMENT ON COLUMN nats_endpoint_health.url IS 'Where deliveries go, without credentials, query string or fragment.';
COMMENT ON COLUMN nats_endpoint_health.status IS 'healthy | failing | backing_off | open | half_open | disabled.';
COMMENT ON COLUMN nats_endpoint_health.enabled IS 'False: disabled (by a DBA, or by the worker when disabled_reason is set).';
COMMENT ON COLUMN nats_endpoint_health.disabled_at IS 'When the worker disabled the endpoint.';
COMMENT ON COLUMN nats_endpoint_health.disabled_reason IS 'Why the worker disabled it (HTTP 410, failing for disable_after_seconds).';
COMMENT ON COLUMN nats_endpoint_health.circuit IS 'closed (normal), open (no requests until open_until) or half_open (one probe).';
COMMENT ON COLUMN nats_endpoint_health.consecutive_failures IS 'Failed attempts in a row; 0 after a success.';
COMMENT ON COLUMN nats_endpoint_health.failing_since IS 'First failure of the current streak.';
COMMENT ON COLUMN nats_endpoint_health.open_until IS 'An open circuit lets a probe through after this time.';
COMMENT ON COLUMN nats_endpoint_health.backoff_until IS 'The endpoint asked to wait (429/503 Retry-After) until then.';
COMMENT ON COLUMN nats_endpoint_health.last_status IS 'HTTP status of the last failure, while the endpoint is failing (NULL once it succeeds again).';
COMMENT ON COLUMN nats_endpoint_health.last_error IS 'Error of the last failure, while the endpoint is failing (NULL once it succeeds again).';
COMMENT ON COLUMN nats_endpoint_health.last_success_at IS 'Last successful delivery.';
COMMENT ON COLUMN nats_endpoint_health.last_failure_at IS 'Last failed attempt.';
COMMENT ON COLUMN nats_endpoint_health.attempts_1h IS 'Delivery attempts in the last hour (0 when none).';
COMMENT ON COLUMN nats_endpoint_health.failures_1h IS 'Failed attempts in the last hour (retry or dead letter).';
COMMENT ON COLUMN nats_endpoint_health.success_rate_1h IS 'Successful attempts / attempts in the last hour, in percent; NULL without attempts.';
COMMENT ON COLUMN nats_endpoint_health.max_concurrency IS 'Requests in flight allowed to this endpoint (all sidecars together).';
COMMENT ON COLUMN nats_endpoint_health.rate_limit_per_second IS 'Requests per second allowed to this endpoint (all sidecars together).';
COMMENT ON COLUMN nats_endpoint_health.waiting IS 'Deliveries waiting in rule_nats_retries (scheduled, deferred or held).';
COMMENT ON COLUMN nats_endpoint_health.state_updated_at IS 'When a sidecar last wrote the endpoint''s state.';

COMMENT ON COLUMN nats_worker_status.worker_name IS 'The sidecar instance (CONSUMER_NAME or WORKER_NAME).';
COMMENT ON COLUMN nats_worker_status.status IS 'ACTIVE (worked in the last minute) | IDLE | STALE (no heartbeat for 3 intervals + 2 s) | STOPPED.';
COMMENT ON COLUMN nats_worker_status.hostname IS 'Host the sidecar runs on.';
COMMENT ON COLUMN nats_worker_status.pid IS 'Its process id.';
COMMENT ON COLUMN nats_worker_status.version IS 'Its webhook-worker version.';
COMMENT ON COLUMN nats_worker_status.started_at IS 'When it started.';
COMMENT ON COLUMN nats_worker_status.last_heartbeat IS 'Its last heartbeat.';
COMMENT ON COLUMN nats_worker_status.heartbeat_age_seconds IS 'Seconds since the last heartbeat.';
COMMENT ON COLUMN nats_worker_status.last_activity_at IS 'Last heartbeat at which it had delivered, failed or relayed something.';
COMMENT ON COLUMN nats_worker_status.consumers IS 'The consumers it runs (STREAM/consumer).';
COMMENT ON COLUMN nats_worker_status.in_flight IS 'Deliveries in progress at the last heartbeat.';
COMMENT ON COLUMN nats_worker_status.messages_delivered IS 'Deliveries since it started.';
COMMENT ON COLUMN nats_worker_status.messages_failed IS 'Failed attempts since it started.';
COMMENT ON COLUMN nats_worker_status.stopped_at IS 'When it shut down cleanly (NULL while running or after a crash).';

COMMENT ON COLUMN nats_stream_status.stream_name IS 'The stream (rule_nats_streams).';
COMMENT ON COLUMN nats_stream_status.status IS 'ok | missing | error | drift | stale | unknown | disabled (see the view''s comment).';
COMMENT ON COLUMN nats_stream_status.config_name IS 'The NATS configuration the stream lives in.';
COMMENT ON COLUMN nats_stream_status.configured_subjects IS 'Subjects in rule_nats_streams.';
COMMENT ON COLUMN nats_stream_status.actual_subjects IS 'Subjects JetStream reported.';
COMMENT ON COLUMN nats_stream_status.configured_storage IS 'Storage in rule_nats_streams.';
COMMENT ON COLUMN nats_stream_status.actual_storage IS 'Storage JetStream reported.';
COMMENT ON COLUMN nats_stream_status.present IS 'Whether the stream existed at the last report.';
COMMENT ON COLUMN nats_stream_status.messages IS 'Messages in the stream.';
COMMENT ON COLUMN nats_stream_status.bytes IS 'Bytes in the stream.';
COMMENT ON COLUMN nats_stream_status.first_seq IS 'First sequence number held.';
COMMENT ON COLUMN nats_stream_status.last_seq IS 'Last sequence number.';
COMMENT ON COLUMN nats_stream_status.consumer_count IS 'Consumers on the stream.';
COMMENT ON COLUMN nats_stream_status.last_error IS 'Why the stream could not be created or changed as configured.';
COMMENT ON COLUMN nats_stream_status.reported_by IS 'The sidecar that reported.';
COMMENT ON COLUMN nats_stream_status.updated_at IS 'When it reported.';
COMMENT ON COLUMN nats_stream_status.age_seconds IS 'Seconds since the report.';

COMMENT ON COLUMN nats_consumer_status.stream_name IS 'The stream.';
COMMENT ON COLUMN nats_consumer_status.consumer_name IS 'The durable consumer (rule_nats_consumers).';
COMMENT ON COLUMN nats_consumer_status.status IS 'ok | missing | error | filter_mismatch | stale | not_consuming | unknown | disabled.';
COMMENT ON COLUMN nats_consumer_status.configured_filter IS 'Filter subject in rule_nats_consumers.';
COMMENT ON COLUMN nats_consumer_status.actual_filter IS 'Filter subject JetStream reported.';
COMMENT ON COLUMN nats_consumer_status.present IS 'Whether the consumer existed at the last report.';
COMMENT ON COLUMN nats_consumer_status.lag IS 'Messages not yet delivered to any worker (JetStream num_pending).';
COMMENT ON COLUMN nats_consumer_status.num_ack_pending IS 'Messages handed to workers and not yet acknowledged.';
COMMENT ON COLUMN nats_consumer_status.num_redelivered IS 'Messages JetStream delivered more than once.';
COMMENT ON COLUMN nats_consumer_status.num_waiting IS 'Pull requests waiting for messages.';
COMMENT ON COLUMN nats_consumer_status.workers IS 'Live sidecars (ACTIVE or IDLE) running this consumer.';
COMMENT ON COLUMN nats_consumer_status.delivered_1h IS 'Successful delivery attempts in the last hour (0 when none).';
COMMENT ON COLUMN nats_consumer_status.failed_1h IS 'Failed delivery attempts in the last hour (retry or dead letter).';
COMMENT ON COLUMN nats_consumer_status.per_second_5m IS 'Deliveries per second over the last 5 minutes.';
COMMENT ON COLUMN nats_consumer_status.last_error IS 'Why the consumer could not be created or changed as configured.';
COMMENT ON COLUMN nats_consumer_status.reported_by IS 'The sidecar that reported.';
COMMENT ON COLUMN nats_consumer_status.updated_at IS 'When it reported.';
COMMENT ON COLUMN nats_consumer_status.age_seconds IS 'Seconds since the report.';

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (9, 'counters');
