-- sql/definitions/70_views.sql: the current definition of these objects (docs/schema.md).
--
-- The views: what operators and monitoring read (nats_*), and the rule-engine-postgres
-- rule_webhook_queue. They call functions of the files before this one.
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

-- rule_nats_delivery_attempts: the view with the columns of the table it was until 0019 (the rows are in
-- rule_nats_attempt_log; INSERT and DELETE reach it through the INSTEAD OF trigger of sql/0019, which
-- CREATE OR REPLACE keeps: never DROP this view here, the trigger would go with it).
CREATE OR REPLACE VIEW rule_nats_delivery_attempts AS
SELECT a.attempt_id, a.attempted_at, a.message_id, r.stream_name, r.consumer_name, a.stream_seq, a.subject,
       a.webhook_id, r.url, a.attempt::integer AS attempt,
       CASE a.outcome WHEN 'd' THEN 'delivered' WHEN 'r' THEN 'retry' ELSE 'dead_letter' END AS outcome,
       a.http_status::integer AS http_status,
       a.latency_us / 1000.0::double precision AS latency_ms, a.error, a.response_body, a.next_attempt_at,
       r.worker_name, a.notes
  FROM public.rule_nats_attempt_log a
  LEFT JOIN public.rule_nats_history_routes r ON r.route_id = a.route_id
UNION ALL
SELECT l.attempt_id, l.attempted_at, l.message_id, l.stream_name, l.consumer_name, l.stream_seq, l.subject,
       l.webhook_id, l.url, l.attempt, l.outcome, l.http_status, l.latency_ms, l.error, l.response_body,
       l.next_attempt_at, l.worker_name, l.notes
  FROM rule_nats_private.rule_nats_delivery_attempts_legacy l;
GRANT SELECT, DELETE ON rule_nats_delivery_attempts TO rule_nats_admin, rule_nats_definer;
GRANT SELECT, INSERT ON rule_nats_delivery_attempts TO rule_nats_worker;
-- Every column but url (it may hold credentials: nats_delivery_attempts redacts it).
GRANT SELECT (attempt_id, attempted_at, message_id, stream_name, consumer_name, stream_seq, subject, webhook_id, attempt,
    outcome, http_status, latency_ms, error, response_body, next_attempt_at, worker_name, notes)
    ON rule_nats_delivery_attempts TO rule_nats_monitor;
COMMENT ON VIEW rule_nats_delivery_attempts IS
    'One row per HTTP delivery attempt, written before the message is acknowledged to NATS (stored in '
    'rule_nats_attempt_log). SELECT * FROM rule_nats_delivery_attempts WHERE message_id = ... ORDER BY attempt '
    'answers "was it delivered, when, how many attempts, why not"; a condition on attempted_at reads only the '
    'partitions of those days.';
COMMENT ON COLUMN rule_nats_delivery_attempts.attempt_id IS 'Id of the attempt (rule_nats_attempt_log.attempt_id), in the order attempts were written.';
COMMENT ON COLUMN rule_nats_delivery_attempts.attempted_at IS 'When the attempt ended (the partition key: a condition on it reads only those days).';
COMMENT ON COLUMN rule_nats_delivery_attempts.stream_name IS 'Stream the message came from.';
COMMENT ON COLUMN rule_nats_delivery_attempts.consumer_name IS 'Consumer that delivered it.';
COMMENT ON COLUMN rule_nats_delivery_attempts.subject IS 'NATS subject of the message.';
COMMENT ON COLUMN rule_nats_delivery_attempts.url IS 'URL the attempt was sent to.';
COMMENT ON COLUMN rule_nats_delivery_attempts.next_attempt_at IS 'For outcome retry: when the next attempt is due.';
COMMENT ON COLUMN rule_nats_delivery_attempts.notes IS 'What else happened to the message (e.g. its body was not valid JSON).';
COMMENT ON COLUMN rule_nats_delivery_attempts.message_id IS 'Event id of the message (envelope id, else Nats-Msg-Id, else stream:seq); stable across retries.';
COMMENT ON COLUMN rule_nats_delivery_attempts.stream_seq IS 'Stream sequence of the message in JetStream.';
COMMENT ON COLUMN rule_nats_delivery_attempts.webhook_id IS 'Webhook of the registry the message named, if any (no foreign key: history outlives endpoints).';
COMMENT ON COLUMN rule_nats_delivery_attempts.attempt IS '1 for the first attempt, counting up across retries.';
COMMENT ON COLUMN rule_nats_delivery_attempts.outcome IS 'delivered (2xx), retry (scheduled for next_attempt_at) or dead_letter (permanent failure or retries exhausted).';
COMMENT ON COLUMN rule_nats_delivery_attempts.http_status IS 'HTTP status of the response; NULL when none was received.';
COMMENT ON COLUMN rule_nats_delivery_attempts.latency_ms IS 'Duration of the HTTP attempt in milliseconds.';
COMMENT ON COLUMN rule_nats_delivery_attempts.error IS 'Why the attempt failed (timeout, connection refused, HTTP 503, ...).';
COMMENT ON COLUMN rule_nats_delivery_attempts.response_body IS 'Start of the response body of a failed attempt (truncated).';
COMMENT ON COLUMN rule_nats_delivery_attempts.worker_name IS 'Sidecar instance that made the attempt.';

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
GRANT SELECT ON nats_performance_stats TO rule_nats_admin, rule_nats_monitor, rule_nats_worker;
COMMENT ON VIEW nats_performance_stats IS
    'Last 24 hours (from the start of the hour 24 hours ago), per source (publish: from SQL; outbox: relayed or '
    'replayed by a sidecar; delivery: HTTP deliveries), subject, consumer and webhook. Messages and attempts apart: '
    'one event that failed twice, then was delivered, is 1 message, 3 attempts, 100 % success. Reads '
    'rule_nats_stats_hourly.';
COMMENT ON COLUMN nats_performance_stats.source IS 'publish (from SQL), outbox (relayed or replayed by a sidecar) or delivery (HTTP).';
COMMENT ON COLUMN nats_performance_stats.subject IS 'NATS subject.';
COMMENT ON COLUMN nats_performance_stats.consumer_name IS 'Durable consumer (deliveries only).';
COMMENT ON COLUMN nats_performance_stats.webhook_name IS 'Registered webhook, when the message names one.';
COMMENT ON COLUMN nats_performance_stats.message_count IS
    'As in rule-engine-postgres: successful messages (published, or delivered) in the window; total_count counts failures too.';
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
COMMENT ON COLUMN nats_performance_stats.total_count IS 'Every message in the window, successful or not.';

-- nats_recent_failures (0014) showed payloads to members of the PUBLIC rule_nats_admin: in a
-- database with roles of its own, another installation's admins. It asks rule_nats_role now.
CREATE OR REPLACE VIEW nats_recent_failures AS
SELECT f.source, f.failed_at, f.subject, w.webhook_name, f.consumer_name, f.url, f.http_status, f.attempt,
       f.outcome, f.error_message, f.message_id, f.ref_id,
       CASE WHEN f.source <> 'delivery' THEN f.ref_id END AS publish_id,
       -- Payloads are the admin's to see (as in the original); the monitor's view stays redacted.
       -- THIS database's admin: rule_nats_role('admin'), not the public name another
       -- installation's admins hold (a superuser is a member of every role).
       CASE WHEN pg_has_role(CURRENT_USER, public.rule_nats_role('admin'), 'USAGE') THEN f.payload END AS payload,
       f.failed_at AS published_at,
       f.latency_ms
  FROM (
    (SELECT CASE WHEN h.triggered_by = 'sql' THEN 'publish' ELSE 'outbox' END AS source,
            h.published_at AS failed_at, h.subject, h.webhook_id, NULL::text AS consumer_name, NULL::text AS url,
            NULL::integer AS http_status, NULL::integer AS attempt, NULL::text AS outcome, h.error_message,
            h.message_id, h.publish_id AS ref_id, h.payload, h.latency_ms
       FROM public.rule_nats_publish_history h
      WHERE NOT h.success AND h.published_at >= now() - interval '24 hours'
      ORDER BY h.published_at DESC
      LIMIT 100)
    UNION ALL
    (SELECT 'delivery', a.attempted_at, a.subject, a.webhook_id, r.consumer_name,
            public.rule_nats_redact_url(r.url), a.http_status::integer, a.attempt::integer,
            CASE a.outcome WHEN 'r' THEN 'retry' ELSE 'dead_letter' END, a.error,
            a.message_id, a.attempt_id, NULL::jsonb,
            round(least(a.latency_us / 1000.0, 99999999)::numeric, 2)::numeric(10,2)
       FROM public.rule_nats_attempt_log a
       LEFT JOIN public.rule_nats_history_routes r ON r.route_id = a.route_id
      WHERE a.outcome <> 'd' AND a.attempted_at >= now() - interval '24 hours'
      ORDER BY a.attempted_at DESC
      LIMIT 100)
    UNION ALL
    -- Rows of before 0019 not moved yet (CALL rule_nats_history_upgrade()).
    (SELECT 'delivery', l.attempted_at, l.subject, l.webhook_id, l.consumer_name,
            public.rule_nats_redact_url(l.url), l.http_status, l.attempt, l.outcome, l.error, l.message_id,
            l.attempt_id, NULL::jsonb, round(least(l.latency_ms, 99999999)::numeric, 2)::numeric(10,2)
       FROM rule_nats_private.rule_nats_delivery_attempts_legacy l
      WHERE l.outcome <> 'delivered' AND l.attempted_at >= now() - interval '24 hours'
      ORDER BY l.attempted_at DESC
      LIMIT 100)
  ) f
  LEFT JOIN public.rule_webhooks w ON w.webhook_id = f.webhook_id
 ORDER BY f.failed_at DESC
 LIMIT 100;
GRANT SELECT ON nats_recent_failures TO rule_nats_admin, rule_nats_monitor, rule_nats_worker;
COMMENT ON VIEW nats_recent_failures IS
    'The 100 most recent failed publishes and delivery attempts of the last 24 hours, newest first. '
    'ref_id is publish_id (source publish) or attempt_id (source delivery). Shows no payloads, headers or secrets.';
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
GRANT SELECT ON nats_publish_summary TO rule_nats_admin, rule_nats_monitor;
COMMENT ON VIEW nats_publish_summary IS
    'Publishes per subject and webhook since the hourly rollup began; every NATS-enabled webhook has a row, with 0 if it never published (as in rule-engine-postgres).';
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
COMMENT ON COLUMN nats_publish_summary.publish_mode IS 'The webhook''s publish_mode.';

CREATE OR REPLACE VIEW nats_endpoint_health AS
SELECT w.webhook_id,
       w.webhook_name,
       public.rule_nats_redact_url(w.url) AS url,
       CASE WHEN NOT w.enabled THEN 'disabled'
            WHEN s.circuit = 'open' THEN 'open'
            WHEN s.circuit = 'half_open' THEN 'half_open'
            WHEN s.backoff_until > now() THEN 'backing_off'
            WHEN s.consecutive_failures > 0 THEN 'failing'
            WHEN b.created_at IS NOT NULL THEN 'blocked'
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
       CASE WHEN s.last_failure_at > coalesce(s.last_success_at, '-infinity') THEN s.last_error
            WHEN b.created_at IS NOT NULL THEN b.error END     AS last_error,
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
         GROUP BY m.webhook_id) a ON a.webhook_id = w.webhook_id
  LEFT JOIN LATERAL (
        SELECT d.created_at, d.error
          FROM public.rule_nats_dead_letters d
         WHERE d.webhook_id = w.webhook_id AND d.reason = 'ssrf_blocked'
           AND d.created_at > coalesce(s.last_success_at, '-infinity')
         ORDER BY d.created_at DESC
         LIMIT 1) b ON true;
GRANT SELECT ON nats_endpoint_health TO rule_nats_admin, rule_nats_monitor, rule_nats_worker;
COMMENT ON VIEW nats_endpoint_health IS
    'Per endpoint: healthy | failing | backing_off | open | half_open | disabled, the failure streak, last success '
    'and failure, attempts and success rate over the last hour, limits, deliveries waiting.';
COMMENT ON COLUMN nats_endpoint_health.webhook_id IS 'The webhook''s id.';
COMMENT ON COLUMN nats_endpoint_health.webhook_name IS 'The webhook''s name.';
COMMENT ON COLUMN nats_endpoint_health.url IS 'Where deliveries go, without credentials, query string or fragment.';
COMMENT ON COLUMN nats_endpoint_health.status IS
    'healthy | failing | backing_off | open | half_open | blocked (refused by the SSRF policy since its last success, nothing sent) | disabled.';
COMMENT ON COLUMN nats_endpoint_health.enabled IS 'False: disabled (by a DBA, or by the worker when disabled_reason is set).';
COMMENT ON COLUMN nats_endpoint_health.disabled_at IS 'When the worker disabled the endpoint.';
COMMENT ON COLUMN nats_endpoint_health.disabled_reason IS 'Why the worker disabled it (HTTP 410, failing for disable_after_seconds).';
COMMENT ON COLUMN nats_endpoint_health.circuit IS 'closed (normal), open (no requests until open_until) or half_open (one probe).';
COMMENT ON COLUMN nats_endpoint_health.consecutive_failures IS 'Failed attempts in a row; 0 after a success.';
COMMENT ON COLUMN nats_endpoint_health.failing_since IS 'First failure of the current streak.';
COMMENT ON COLUMN nats_endpoint_health.open_until IS 'An open circuit lets a probe through after this time.';
COMMENT ON COLUMN nats_endpoint_health.backoff_until IS 'The endpoint asked to wait (429/503 Retry-After) until then.';
COMMENT ON COLUMN nats_endpoint_health.last_status IS 'HTTP status of the last failure, while the endpoint is failing (NULL once it succeeds again).';
COMMENT ON COLUMN nats_endpoint_health.last_error IS
    'The last failure''s error while it is newer than the last success; for a blocked endpoint, the refusal.';
COMMENT ON COLUMN nats_endpoint_health.last_success_at IS 'Last successful delivery.';
COMMENT ON COLUMN nats_endpoint_health.last_failure_at IS 'Last failed attempt.';
COMMENT ON COLUMN nats_endpoint_health.attempts_1h IS 'Delivery attempts in the last hour (0 when none).';
COMMENT ON COLUMN nats_endpoint_health.failures_1h IS 'Failed attempts in the last hour (retry or dead letter).';
COMMENT ON COLUMN nats_endpoint_health.success_rate_1h IS 'Successful attempts / attempts in the last hour, in percent; NULL without attempts.';
COMMENT ON COLUMN nats_endpoint_health.max_concurrency IS 'Requests in flight allowed to this endpoint (all sidecars together).';
COMMENT ON COLUMN nats_endpoint_health.rate_limit_per_second IS 'Requests per second allowed to this endpoint (all sidecars together).';
COMMENT ON COLUMN nats_endpoint_health.waiting IS 'Deliveries waiting in rule_nats_retries (scheduled, deferred or held).';
COMMENT ON COLUMN nats_endpoint_health.state_updated_at IS 'When a sidecar last wrote the endpoint''s state.';

CREATE OR REPLACE VIEW nats_worker_status AS
SELECT w.worker_name,
       CASE WHEN w.stopped_at IS NOT NULL THEN 'STOPPED'
            WHEN now() - w.last_heartbeat > make_interval(secs => 2 + 3 * w.heartbeat_interval_seconds)
                 THEN 'STALE'
            WHEN cardinality(w.problems) > 0 THEN 'DEGRADED'
            WHEN w.last_activity_at > now() - interval '1 minute' THEN 'ACTIVE'
            ELSE 'IDLE' END                                             AS status,
       w.hostname,
       w.pid,
       w.version,
       w.started_at,
       w.last_heartbeat,
       round(extract(epoch FROM now() - w.last_heartbeat)::numeric, 1) AS heartbeat_age_seconds,
       w.last_activity_at,
       w.consumers,
       w.in_flight,
       w.messages_delivered,
       w.messages_failed,
       w.stopped_at,
       w.problems,
       w.nats_down
  FROM public.rule_nats_workers w;
GRANT SELECT ON nats_worker_status TO rule_nats_admin, rule_nats_monitor, rule_nats_worker;
COMMENT ON VIEW nats_worker_status IS
    'Sidecars: ACTIVE (worked in the last minute), IDLE (alive, nothing to do), DEGRADED (alive but not ready, see '
    'problems: e.g. NATS down, a consumer on a closed connection, a failed task), STALE (no heartbeat for 3 intervals '
    '+ 2 s: crashed, hung or cut off), STOPPED (shut down cleanly).';
COMMENT ON COLUMN nats_worker_status.worker_name IS 'The sidecar instance (CONSUMER_NAME or WORKER_NAME).';
COMMENT ON COLUMN nats_worker_status.status IS
    'ACTIVE (worked in the last minute) | IDLE | DEGRADED (running but not ready: see problems) | STALE (no heartbeat '
    'for 3 intervals + 2 s) | STOPPED.';
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
COMMENT ON COLUMN nats_worker_status.problems IS 'Why the worker is not ready, as its /readyz said at the last heartbeat.';
COMMENT ON COLUMN nats_worker_status.nats_down IS
    'NATS configurations the worker could not reach at its last heartbeat (problems says why); its streams and '
    'consumers on them show as unknown.';

-- "cut off": the sidecar whose report a state row holds is alive and cannot reach the stream's NATS
-- connection now, so the row no longer says how things are.
CREATE OR REPLACE VIEW nats_stream_status AS
SELECT s.stream_name,
       CASE WHEN NOT s.enabled THEN 'disabled'
            WHEN st.stream_name IS NULL THEN 'unknown'
            WHEN cut_off.worker_name IS NOT NULL THEN 'unknown'
            WHEN st.last_error IS NOT NULL AND NOT st.present THEN 'error'
            WHEN NOT st.present THEN 'missing'
            WHEN st.last_error IS NOT NULL THEN 'drift'
            WHEN now() - st.updated_at > interval '2 minutes' THEN 'stale'
            ELSE 'ok' END                                              AS status,
       s.config_name,
       s.subjects                                                      AS configured_subjects,
       st.subjects                                                     AS actual_subjects,
       s.storage_type                                                  AS configured_storage,
       st.storage_type                                                 AS actual_storage,
       st.present,
       st.messages,
       st.bytes,
       st.first_seq,
       st.last_seq,
       st.consumer_count,
       st.last_error,
       st.reported_by,
       st.updated_at,
       round(extract(epoch FROM now() - st.updated_at)::numeric, 1)    AS age_seconds,
       s.max_age_seconds::double precision                             AS configured_max_age_seconds,
       st.max_age_seconds                                              AS actual_max_age_seconds,
       s.max_bytes                                                     AS configured_max_bytes,
       st.max_bytes                                                    AS actual_max_bytes,
       s.max_messages                                                  AS configured_max_messages,
       st.max_messages                                                 AS actual_max_messages,
       s.replicas                                                      AS configured_replicas,
       st.replicas                                                     AS actual_replicas
  FROM public.rule_nats_streams s
  LEFT JOIN public.rule_nats_stream_state st USING (stream_name)
  LEFT JOIN public.rule_nats_workers cut_off
    ON cut_off.worker_name = st.reported_by AND cut_off.stopped_at IS NULL
   AND now() - cut_off.last_heartbeat <= make_interval(secs => 2 + 3 * cut_off.heartbeat_interval_seconds)
   AND s.config_name = ANY (cut_off.nats_down);
GRANT SELECT ON nats_stream_status TO rule_nats_admin, rule_nats_monitor, rule_nats_worker;
COMMENT ON VIEW nats_stream_status IS
    'Each configured stream and what JetStream last reported: ok | missing | error | drift (a change was refused, '
    'see last_error) | stale (no report for 2 minutes: no sidecar running?) | unknown (never reported, or the sidecar '
    'that reported it cannot reach NATS now: nats_worker_status.problems says why) | disabled.';
COMMENT ON COLUMN nats_stream_status.stream_name IS 'The stream (rule_nats_streams).';
COMMENT ON COLUMN nats_stream_status.status IS
    'ok | missing | error | drift | stale | unknown (never reported, or its reporter cannot reach NATS now) | disabled.';
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
COMMENT ON COLUMN nats_stream_status.configured_max_age_seconds IS 'max_age_seconds in rule_nats_streams (0: unlimited).';
COMMENT ON COLUMN nats_stream_status.actual_max_age_seconds IS 'max_age JetStream reported, in seconds (0: unlimited).';
COMMENT ON COLUMN nats_stream_status.configured_max_bytes IS 'max_bytes in rule_nats_streams (-1: unlimited).';
COMMENT ON COLUMN nats_stream_status.actual_max_bytes IS 'max_bytes JetStream reported (-1: unlimited).';
COMMENT ON COLUMN nats_stream_status.configured_max_messages IS 'max_messages in rule_nats_streams (-1: unlimited).';
COMMENT ON COLUMN nats_stream_status.actual_max_messages IS 'max_msgs JetStream reported (-1: unlimited).';
COMMENT ON COLUMN nats_stream_status.configured_replicas IS 'replicas in rule_nats_streams.';
COMMENT ON COLUMN nats_stream_status.actual_replicas IS 'Replicas JetStream reported.';

CREATE OR REPLACE VIEW nats_consumer_status AS
SELECT c.stream_name,
       c.consumer_name,
       CASE WHEN NOT c.enabled THEN 'disabled'
            WHEN cs.consumer_name IS NULL THEN 'unknown'
            WHEN cut_off.worker_name IS NOT NULL THEN 'unknown'
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
  LEFT JOIN public.rule_nats_streams s ON s.stream_name = c.stream_name
  LEFT JOIN public.rule_nats_consumer_state cs ON cs.stream_name = c.stream_name AND cs.consumer_name = c.consumer_name
  LEFT JOIN public.rule_nats_workers cut_off
    ON cut_off.worker_name = cs.reported_by AND cut_off.stopped_at IS NULL
   AND now() - cut_off.last_heartbeat <= make_interval(secs => 2 + 3 * cut_off.heartbeat_interval_seconds)
   AND s.config_name = ANY (cut_off.nats_down)
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
GRANT SELECT ON nats_consumer_status TO rule_nats_admin, rule_nats_monitor, rule_nats_worker;
COMMENT ON VIEW nats_consumer_status IS
    'Each configured durable consumer and what JetStream last reported: does it exist, is its filter the configured '
    'one, lag (num_pending), unacknowledged, redelivered, waiting pull requests, live workers, deliveries and '
    'failed attempts in the last hour, deliveries per second over the last 5 minutes. '
    'status: ok | missing | error | filter_mismatch | stale | not_consuming | unknown | disabled.';
COMMENT ON COLUMN nats_consumer_status.stream_name IS 'The stream.';
COMMENT ON COLUMN nats_consumer_status.consumer_name IS 'The durable consumer (rule_nats_consumers).';
COMMENT ON COLUMN nats_consumer_status.status IS
    'ok | missing | error | filter_mismatch | stale | not_consuming | unknown (never reported, or its reporter cannot '
    'reach NATS now) | disabled.';
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

CREATE OR REPLACE VIEW nats_webhooks AS
SELECT webhook_id, webhook_name, public.rule_nats_redact_url(url) AS url, method, nats_subject, config_name,
       publish_mode, enabled, disabled_at, disabled_reason, timeout_seconds, retry_max_attempts,
       retry_initial_seconds, retry_max_backoff_seconds, retry_max_age_seconds, allow_networks, https_only,
       max_concurrency, rate_limit_per_second, circuit_failure_threshold, circuit_open_seconds,
       disable_after_seconds, description, created_at, updated_at
  FROM public.rule_webhooks;
GRANT SELECT ON nats_webhooks TO rule_nats_monitor, rule_nats_admin;
COMMENT ON VIEW nats_webhooks IS
    'The registered webhooks as monitoring may see them: no static headers, URLs without credentials or query string.';
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
COMMENT ON COLUMN nats_webhooks.timeout_seconds IS
    'Total time allowed for one HTTP attempt, in seconds.';
COMMENT ON COLUMN nats_webhooks.retry_max_attempts IS
    'Overrides the consumer''s retry_max_attempts when set.';
COMMENT ON COLUMN nats_webhooks.retry_initial_seconds IS
    'Overrides the consumer''s retry_initial_seconds when set.';
COMMENT ON COLUMN nats_webhooks.retry_max_backoff_seconds IS
    'Overrides the consumer''s retry_max_backoff_seconds when set.';
COMMENT ON COLUMN nats_webhooks.retry_max_age_seconds IS
    'Overrides the consumer''s retry_max_age_seconds when set.';
COMMENT ON COLUMN nats_webhooks.allow_networks IS
    'Blocked networks this endpoint may nevertheless reach (e.g. {10.1.2.0/24} for an internal service).';
COMMENT ON COLUMN nats_webhooks.https_only IS
    'true: refuse to deliver to this endpoint over plain http.';
COMMENT ON COLUMN nats_webhooks.max_concurrency IS
    'At most this many requests in flight to the endpoint (NULL: no limit); live sidecars split it.';
COMMENT ON COLUMN nats_webhooks.rate_limit_per_second IS
    'At most this many requests per second to the endpoint (NULL: no limit); live sidecars split it. Messages over the limit wait in rule_nats_retries without using up an attempt.';
COMMENT ON COLUMN nats_webhooks.circuit_failure_threshold IS
    'Consecutive failed attempts (timeouts, connection errors, 5xx, 429) that open the circuit: deliveries pause.';
COMMENT ON COLUMN nats_webhooks.circuit_open_seconds IS
    'How long an open circuit pauses deliveries before one probe request; doubles after each failed probe (up to 16x).';
COMMENT ON COLUMN nats_webhooks.disable_after_seconds IS
    'After failing without a single success for this long, the endpoint is disabled (NULL: never). HTTP 410 disables at once.';
COMMENT ON COLUMN nats_webhooks.description IS 'Free text.';
COMMENT ON COLUMN nats_webhooks.created_at IS 'When the row was created.';
COMMENT ON COLUMN nats_webhooks.updated_at IS 'When the row was last changed.';

CREATE OR REPLACE VIEW nats_delivery_attempts AS
SELECT attempt_id, attempted_at, message_id, stream_name, consumer_name, stream_seq, subject, webhook_id,
       public.rule_nats_redact_url(url) AS url, attempt, outcome, http_status, latency_ms, error, response_body,
       next_attempt_at, worker_name, notes
  FROM public.rule_nats_delivery_attempts;
GRANT SELECT ON nats_delivery_attempts TO rule_nats_monitor, rule_nats_admin;
COMMENT ON VIEW nats_delivery_attempts IS
    'rule_nats_delivery_attempts as monitoring may see it: URLs without credentials or query string. '
    'WHERE message_id = ... uses the index of the table.';
COMMENT ON COLUMN nats_delivery_attempts.attempt_id IS 'The attempt''s id.';
COMMENT ON COLUMN nats_delivery_attempts.attempted_at IS 'When the attempt was made.';
COMMENT ON COLUMN nats_delivery_attempts.message_id IS 'The message id (event_id, Nats-Msg-Id or STREAM:seq): the webhook-id header.';
COMMENT ON COLUMN nats_delivery_attempts.stream_name IS 'The stream the message came from.';
COMMENT ON COLUMN nats_delivery_attempts.consumer_name IS 'The durable consumer that delivered it.';
COMMENT ON COLUMN nats_delivery_attempts.stream_seq IS 'The message''s sequence number in the stream.';
COMMENT ON COLUMN nats_delivery_attempts.subject IS 'The NATS subject of the message.';
COMMENT ON COLUMN nats_delivery_attempts.webhook_id IS 'Registered webhook, when the message names one.';
COMMENT ON COLUMN nats_delivery_attempts.url IS 'The URL the attempt went to, without credentials, query string or fragment.';
COMMENT ON COLUMN nats_delivery_attempts.attempt IS 'Attempt number of the message (1 for the first).';
COMMENT ON COLUMN nats_delivery_attempts.outcome IS 'delivered, retry (another attempt scheduled) or dead_letter.';
COMMENT ON COLUMN nats_delivery_attempts.http_status IS 'HTTP status of the response, NULL when there was none.';
COMMENT ON COLUMN nats_delivery_attempts.latency_ms IS 'Duration of the HTTP request, in ms.';
COMMENT ON COLUMN nats_delivery_attempts.error IS 'Why the attempt failed.';
COMMENT ON COLUMN nats_delivery_attempts.response_body IS 'The first 4 KB of the response body of a failed attempt.';
COMMENT ON COLUMN nats_delivery_attempts.next_attempt_at IS 'When the next attempt is due (outcome retry).';
COMMENT ON COLUMN nats_delivery_attempts.worker_name IS 'The sidecar that made the attempt.';
COMMENT ON COLUMN nats_delivery_attempts.notes IS
    'Remarks on the attempt that are not errors, e.g. headers dropped from the message (Host, Connection, webhook-*).';

CREATE OR REPLACE VIEW nats_failure_log_status AS
SELECT CASE WHEN f.conninfo IS NULL THEN 'disabled'
            WHEN failed.at IS NOT NULL AND (ok.at IS NULL OR failed.at > ok.at) THEN 'broken'
            WHEN ok.at IS NOT NULL THEN 'ok'
            ELSE 'unused' END                                          AS status,
       f.conninfo IS NOT NULL                                          AS enabled,
       ok.at                                                           AS last_ok_at,
       failed.at                                                       AS last_failed_at,
       (SELECT CASE WHEN n.is_called THEN n.last_value ELSE 0 END
          FROM rule_nats_private.failure_log_failures n)               AS failures,
       f.updated_at                                                    AS configured_at
  FROM rule_nats_private.failure_log f
 CROSS JOIN LATERAL (SELECT CASE WHEN q.is_called THEN to_timestamp(q.last_value / 1000.0) END AS at
                       FROM rule_nats_private.failure_log_ok_at q) ok
 CROSS JOIN LATERAL (SELECT CASE WHEN q.is_called THEN to_timestamp(q.last_value / 1000.0) END AS at
                       FROM rule_nats_private.failure_log_failed_at q) failed;
GRANT SELECT ON nats_failure_log_status TO rule_nats_monitor, rule_nats_admin;
COMMENT ON VIEW nats_failure_log_status IS
    'The failure log, which records failed SQL publishes in a transaction of their own: disabled (a failed publish is '
    'recorded only if its transaction commits) | unused (enabled, not needed yet) | ok (its last use worked) | broken '
    '(its last use failed: SELECT rule_nats_failure_log_check() says why).';
COMMENT ON COLUMN nats_failure_log_status.status IS 'disabled | unused | ok | broken (see the view''s comment).';
COMMENT ON COLUMN nats_failure_log_status.enabled IS 'Whether a superuser enabled it (rule_nats_private.enable_failure_log).';
COMMENT ON COLUMN nats_failure_log_status.last_ok_at IS 'Last write or check through the failure log that worked.';
COMMENT ON COLUMN nats_failure_log_status.last_failed_at IS 'Last write or check through the failure log that failed.';
COMMENT ON COLUMN nats_failure_log_status.failures IS 'Failed publishes it could not record (missing from rule_nats_publish_history), since installation.';
COMMENT ON COLUMN nats_failure_log_status.configured_at IS 'When it was last enabled or disabled.';

CREATE OR REPLACE VIEW rule_webhook_queue AS
SELECT o.outbox_id AS queue_id, o.webhook_id, o.status, o.attempts AS retry_count, o.payload, o.created_at,
       CASE WHEN o.status = 'pending' AND o.next_attempt_at > '-infinity'::timestamptz THEN o.next_attempt_at END
           AS next_retry_at,
       NULL::timestamptz AS completed_at, o.error_message, o.subject, o.message_id
  FROM public.rule_nats_outbox o
UNION ALL
SELECT NULL::bigint, h.webhook_id, 'success'::text, 0, h.payload, h.published_at, NULL::timestamptz, h.published_at,
       NULL::text, h.subject, h.message_id
  FROM public.rule_nats_publish_history h
 WHERE h.triggered_by <> 'sql' AND h.success;
GRANT SELECT ON rule_webhook_queue TO rule_nats_admin;
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

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('70_views.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
