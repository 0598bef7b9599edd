-- 0005_operations: hourly rollups behind nats_performance_stats (fast with millions of
-- rows), live JetStream and worker status views, retention.

-- ---------------------------------------------------------------------------
-- Latency histograms. 72 buckets: [0, 0.1 ms), then 25% wide up to ~610 s, then the rest.
-- Immutable helpers, usable by anyone (they read nothing).
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_latency_bucket(p_ms double precision)
RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_ms IS NULL OR p_ms < 0.1 THEN 1
                ELSE least(72, 2 + floor(ln(p_ms / 0.1) / ln(1.25))::integer) END
$$;
COMMENT ON FUNCTION rule_nats_latency_bucket(double precision) IS
    'Histogram bucket (1..72) of a latency in ms: 1 is below 0.1 ms, bucket i covers [0.1*1.25^(i-2), 0.1*1.25^(i-1)).';

CREATE FUNCTION rule_nats_hist_add(p_state bigint[], p_ms double precision)
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
    i := rule_nats_latency_bucket(p_ms);
    p_state[i] := p_state[i] + 1;
    RETURN p_state;
END
$$;
COMMENT ON FUNCTION rule_nats_hist_add(bigint[], double precision) IS 'Aggregate step: count one latency into a histogram.';

CREATE FUNCTION rule_nats_hist_merge(p_a bigint[], p_b bigint[])
RETURNS bigint[] LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    IF p_a IS NULL THEN
        RETURN p_b;
    ELSIF p_b IS NULL THEN
        RETURN p_a;
    END IF;
    FOR i IN 1 .. 72 LOOP
        p_a[i] := p_a[i] + p_b[i];
    END LOOP;
    RETURN p_a;
END
$$;
COMMENT ON FUNCTION rule_nats_hist_merge(bigint[], bigint[]) IS 'Element-wise sum of two latency histograms.';

CREATE AGGREGATE rule_nats_hist_agg(double precision) (
    SFUNC = rule_nats_hist_add, STYPE = bigint[], PARALLEL = SAFE
);
COMMENT ON AGGREGATE rule_nats_hist_agg(double precision) IS 'Latency histogram (72 buckets) of a set of latencies in ms.';

CREATE AGGREGATE rule_nats_hist_sum(bigint[]) (
    SFUNC = rule_nats_hist_merge, STYPE = bigint[], COMBINEFUNC = rule_nats_hist_merge, PARALLEL = SAFE
);
COMMENT ON AGGREGATE rule_nats_hist_sum(bigint[]) IS 'Sum of latency histograms.';

CREATE FUNCTION rule_nats_hist_quantile(p_hist bigint[], p_q double precision,
                                        p_min double precision, p_max double precision)
RETURNS double precision LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    total bigint := 0;
    target double precision;
    cum bigint := 0;
    c bigint;
    lo double precision;
    hi double precision;
    v double precision;
BEGIN
    IF p_hist IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT sum(x) INTO total FROM unnest(p_hist) AS x;
    IF total IS NULL OR total = 0 THEN
        RETURN NULL;
    END IF;
    target := p_q * total;
    FOR i IN 1 .. array_length(p_hist, 1) LOOP
        c := p_hist[i];
        IF c > 0 AND cum + c >= target THEN
            lo := CASE WHEN i = 1 THEN 0 ELSE 0.1 * power(1.25, i - 2) END;
            hi := CASE WHEN i = 1 THEN 0.1 WHEN i = 72 THEN greatest(p_max, lo) ELSE 0.1 * power(1.25, i - 1) END;
            lo := greatest(lo, coalesce(p_min, lo));
            hi := least(hi, coalesce(p_max, hi));
            IF hi <= lo THEN
                v := lo;
            ELSE
                v := lo + (hi - lo) * ((target - cum) / c);
            END IF;
            RETURN v;
        END IF;
        cum := cum + c;
    END LOOP;
    RETURN p_max;
END
$$;
COMMENT ON FUNCTION rule_nats_hist_quantile(bigint[], double precision, double precision, double precision) IS
    'Quantile q (0..1) of a latency histogram, interpolated inside its bucket and clamped to [min, max]: '
    'within one bucket (25%) of the exact value.';

-- ---------------------------------------------------------------------------
-- rule_nats_stats_hourly: one row per hour, source, subject, consumer and webhook.
-- Written by statement triggers (one INSERT ... ON CONFLICT per batch of attempts or history
-- rows), so nats_performance_stats reads 25 rows per group instead of every attempt. (Per-minute
-- rows were measured too: merging 57,000 histograms took 560-1,500 ms, see docs/operations.md.)
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_stats_hourly (
    bucket                     timestamptz NOT NULL,
    source                     text        NOT NULL,
    subject                    text        NOT NULL DEFAULT '',
    consumer_name              text        NOT NULL DEFAULT '',
    webhook_id                 integer     NOT NULL DEFAULT 0,
    message_count              bigint      NOT NULL DEFAULT 0,
    success_count              bigint      NOT NULL DEFAULT 0,
    latency_count              bigint      NOT NULL DEFAULT 0,
    latency_sum                double precision NOT NULL DEFAULT 0,
    latency_min                double precision,
    latency_max                double precision,
    latency_hist               bigint[],
    last_at                    timestamptz,
    PRIMARY KEY (bucket, source, subject, consumer_name, webhook_id),
    CONSTRAINT "source: publish, outbox or delivery" CHECK (source IN ('publish', 'outbox', 'delivery'))
);
COMMENT ON TABLE rule_nats_stats_hourly IS
    'Hourly rollup of publishes (rule_nats_publish_history) and delivery attempts (rule_nats_delivery_attempts), '
    'maintained by triggers; nats_performance_stats reads it. Empty strings and 0 stand for "none" in the key.';

CREATE FUNCTION rule_nats_rollup_attempts()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    INSERT INTO public.rule_nats_stats_hourly AS s
        (bucket, source, subject, consumer_name, webhook_id, message_count, success_count, latency_count,
         latency_sum, latency_min, latency_max, latency_hist, last_at)
    SELECT date_trunc('hour', attempted_at), 'delivery', coalesce(subject, ''), consumer_name,
           coalesce(webhook_id, 0), count(*), count(*) FILTER (WHERE outcome = 'delivered'), count(latency_ms),
           coalesce(sum(latency_ms), 0), min(latency_ms), max(latency_ms), public.rule_nats_hist_agg(latency_ms),
           max(attempted_at)
      FROM new_rows
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3, 4, 5  -- rows locked in one order: concurrent writers cannot deadlock
    ON CONFLICT (bucket, source, subject, consumer_name, webhook_id) DO UPDATE SET
        message_count = s.message_count + excluded.message_count,
        success_count = s.success_count + excluded.success_count,
        latency_count = s.latency_count + excluded.latency_count,
        latency_sum = s.latency_sum + excluded.latency_sum,
        latency_min = least(s.latency_min, excluded.latency_min),
        latency_max = greatest(s.latency_max, excluded.latency_max),
        latency_hist = public.rule_nats_hist_merge(s.latency_hist, excluded.latency_hist),
        last_at = greatest(s.last_at, excluded.last_at);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION rule_nats_rollup_attempts() IS 'Statement trigger: adds inserted delivery attempts to rule_nats_stats_hourly.';
CREATE TRIGGER rule_nats_delivery_attempts_rollup AFTER INSERT ON rule_nats_delivery_attempts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rule_nats_rollup_attempts();

CREATE FUNCTION rule_nats_rollup_publishes()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    INSERT INTO public.rule_nats_stats_hourly AS s
        (bucket, source, subject, consumer_name, webhook_id, message_count, success_count, latency_count,
         latency_sum, latency_min, latency_max, latency_hist, last_at)
    SELECT date_trunc('hour', published_at), CASE WHEN triggered_by = 'sql' THEN 'publish' ELSE 'outbox' END,
           subject, '', coalesce(webhook_id, 0), count(*),
           count(*) FILTER (WHERE success), count(latency_ms), coalesce(sum(latency_ms), 0), min(latency_ms),
           max(latency_ms), public.rule_nats_hist_agg(latency_ms), max(published_at)
      FROM new_rows
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3, 4, 5  -- rows locked in one order: concurrent writers cannot deadlock
    ON CONFLICT (bucket, source, subject, consumer_name, webhook_id) DO UPDATE SET
        message_count = s.message_count + excluded.message_count,
        success_count = s.success_count + excluded.success_count,
        latency_count = s.latency_count + excluded.latency_count,
        latency_sum = s.latency_sum + excluded.latency_sum,
        latency_min = least(s.latency_min, excluded.latency_min),
        latency_max = greatest(s.latency_max, excluded.latency_max),
        latency_hist = public.rule_nats_hist_merge(s.latency_hist, excluded.latency_hist),
        last_at = greatest(s.last_at, excluded.last_at);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION rule_nats_rollup_publishes() IS 'Statement trigger: adds inserted publish history rows to rule_nats_stats_hourly.';
CREATE TRIGGER rule_nats_publish_history_rollup AFTER INSERT ON rule_nats_publish_history
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rule_nats_rollup_publishes();

-- Backfill what is already recorded (history only once: the triggers take over from here).
INSERT INTO rule_nats_stats_hourly
    (bucket, source, subject, consumer_name, webhook_id, message_count, success_count, latency_count, latency_sum,
     latency_min, latency_max, latency_hist, last_at)
SELECT date_trunc('hour', attempted_at), 'delivery', coalesce(subject, ''), consumer_name, coalesce(webhook_id, 0),
       count(*), count(*) FILTER (WHERE outcome = 'delivered'), count(latency_ms), coalesce(sum(latency_ms), 0),
       min(latency_ms), max(latency_ms), rule_nats_hist_agg(latency_ms), max(attempted_at)
  FROM rule_nats_delivery_attempts GROUP BY 1, 2, 3, 4, 5;
INSERT INTO rule_nats_stats_hourly
    (bucket, source, subject, consumer_name, webhook_id, message_count, success_count, latency_count, latency_sum,
     latency_min, latency_max, latency_hist, last_at)
SELECT date_trunc('hour', published_at), CASE WHEN triggered_by = 'sql' THEN 'publish' ELSE 'outbox' END,
       subject, '', coalesce(webhook_id, 0), count(*),
       count(*) FILTER (WHERE success), count(latency_ms), coalesce(sum(latency_ms), 0), min(latency_ms),
       max(latency_ms), rule_nats_hist_agg(latency_ms), max(published_at)
  FROM rule_nats_publish_history GROUP BY 1, 2, 3, 4, 5;

-- Same columns as before (a stable interface), now from the rollup; webhook_id and window_start added.
CREATE OR REPLACE VIEW nats_performance_stats AS
WITH g AS (
    SELECT s.source, s.subject, s.consumer_name, s.webhook_id,
           sum(s.message_count)::bigint          AS message_count,
           sum(s.success_count)::bigint          AS success_count,
           sum(s.latency_count)                  AS latency_count,
           sum(s.latency_sum)                    AS latency_sum,
           min(s.latency_min)                    AS latency_min,
           max(s.latency_max)                    AS latency_max,
           rule_nats_hist_sum(s.latency_hist)    AS hist,
           max(s.last_at)                        AS last_at
      FROM rule_nats_stats_hourly s
     WHERE s.bucket >= date_trunc('hour', now() - interval '24 hours')
     GROUP BY s.source, s.subject, s.consumer_name, s.webhook_id
)
SELECT g.source,
       nullif(g.subject, '')                                             AS subject,
       nullif(g.consumer_name, '')                                       AS consumer_name,
       w.webhook_name,
       g.message_count,
       g.success_count,
       g.message_count - g.success_count                                 AS failure_count,
       round(100.0 * g.success_count / nullif(g.message_count, 0), 2)   AS success_rate_pct,
       round((g.latency_sum / nullif(g.latency_count, 0))::numeric, 2)  AS avg_latency_ms,
       round(g.latency_min::numeric, 2)                                  AS min_latency_ms,
       round(g.latency_max::numeric, 2)                                  AS max_latency_ms,
       round(rule_nats_hist_quantile(g.hist, 0.50, g.latency_min, g.latency_max)::numeric, 2) AS p50_latency_ms,
       round(rule_nats_hist_quantile(g.hist, 0.95, g.latency_min, g.latency_max)::numeric, 2) AS p95_latency_ms,
       round(rule_nats_hist_quantile(g.hist, 0.99, g.latency_min, g.latency_max)::numeric, 2) AS p99_latency_ms,
       g.last_at,
       nullif(g.webhook_id, 0)                                           AS webhook_id,
       date_trunc('hour', now() - interval '24 hours')                   AS window_start
  FROM g
  LEFT JOIN rule_webhooks w ON w.webhook_id = g.webhook_id;
COMMENT ON VIEW nats_performance_stats IS
    'Last 24 hours (from the start of the hour 24 hours ago), per source (publish: from SQL; outbox: relayed or '
    'replayed by a sidecar; delivery: HTTP attempts), subject, consumer '
    'and webhook: counts, success rate and latency in ms (avg, min, max exact; p50, p95, p99 from histograms, '
    'within one 25% bucket). Reads rule_nats_stats_hourly.';

-- No query strings (they may carry tokens), no payloads, headers or secrets. Each branch takes
-- its newest 100 rows from the partial "failed" index before the two are merged, so the view
-- reads 200 index entries however many failures there are.
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
            split_part(a.url, '?', 1),
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

-- ---------------------------------------------------------------------------
-- Workers: what the sidecar reports with each heartbeat.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_workers
    ADD COLUMN heartbeat_interval_seconds numeric NOT NULL DEFAULT 5,
    ADD COLUMN last_activity_at          timestamptz,
    ADD COLUMN messages_delivered        bigint NOT NULL DEFAULT 0,
    ADD COLUMN messages_failed           bigint NOT NULL DEFAULT 0,
    ADD COLUMN in_flight                 integer NOT NULL DEFAULT 0,
    ADD COLUMN consumers                 text[] NOT NULL DEFAULT '{}';
COMMENT ON COLUMN rule_nats_workers.heartbeat_interval_seconds IS 'The worker''s HEARTBEAT_INTERVAL: a heartbeat older than 3 of them is STALE.';
COMMENT ON COLUMN rule_nats_workers.last_activity_at IS 'Last heartbeat at which the worker had delivered, failed or relayed something since the one before.';
COMMENT ON COLUMN rule_nats_workers.messages_delivered IS 'Deliveries since the worker started.';
COMMENT ON COLUMN rule_nats_workers.messages_failed IS 'Failed attempts since the worker started.';
COMMENT ON COLUMN rule_nats_workers.in_flight IS 'Deliveries in progress at the last heartbeat.';
COMMENT ON COLUMN rule_nats_workers.consumers IS 'Consumers (STREAM/consumer) the worker runs.';

CREATE VIEW nats_worker_status AS
SELECT w.worker_name,
       CASE WHEN w.stopped_at IS NOT NULL THEN 'STOPPED'
            WHEN now() - w.last_heartbeat > make_interval(secs => 2 + 3 * w.heartbeat_interval_seconds)
                 THEN 'STALE'
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
       w.stopped_at
  FROM rule_nats_workers w;
COMMENT ON VIEW nats_worker_status IS
    'Sidecars: ACTIVE (worked in the last minute), IDLE (alive, nothing to do), STALE (no heartbeat for 3 intervals + 2 s: '
    'crashed, hung or cut off), STOPPED (shut down cleanly).';

-- ---------------------------------------------------------------------------
-- Streams and consumers: configured vs what JetStream reports.
-- ---------------------------------------------------------------------------
CREATE VIEW nats_stream_status AS
SELECT s.stream_name,
       CASE WHEN NOT s.enabled THEN 'disabled'
            WHEN st.stream_name IS NULL THEN 'unknown'
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
       round(extract(epoch FROM now() - st.updated_at)::numeric, 1)    AS age_seconds
  FROM rule_nats_streams s
  LEFT JOIN rule_nats_stream_state st USING (stream_name);
COMMENT ON VIEW nats_stream_status IS
    'Each configured stream and what JetStream last reported: ok | missing | error | drift (a change was refused, '
    'see last_error) | stale (no report for 2 minutes: no sidecar running?) | unknown (never reported) | disabled.';

CREATE VIEW nats_consumer_status AS
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
       (SELECT count(*) FROM nats_worker_status ws
         WHERE ws.status IN ('ACTIVE', 'IDLE')
           AND (c.stream_name || '/' || c.consumer_name) = ANY (ws.consumers)) AS workers,
       m.delivered_1h,
       m.failed_1h,
       coalesce(m.per_second_5m, 0)                                    AS per_second_5m,
       cs.last_error,
       cs.reported_by,
       cs.updated_at,
       round(extract(epoch FROM now() - cs.updated_at)::numeric, 1)    AS age_seconds
  FROM rule_nats_consumers c
  LEFT JOIN rule_nats_consumer_state cs USING (stream_name, consumer_name)
  LEFT JOIN (
        SELECT a.stream_name, a.consumer_name,
               count(*) FILTER (WHERE a.outcome = 'delivered')    AS delivered_1h,
               count(*) FILTER (WHERE a.outcome <> 'delivered')   AS failed_1h,
               round(count(*) FILTER (WHERE a.outcome = 'delivered'
                                        AND a.attempted_at > now() - interval '5 minutes') / 300.0, 2)
                                                                 AS per_second_5m
          FROM rule_nats_delivery_attempts a
         WHERE a.attempted_at > now() - interval '1 hour'
         GROUP BY a.stream_name, a.consumer_name) m
    ON m.stream_name = c.stream_name AND m.consumer_name = c.consumer_name;
COMMENT ON VIEW nats_consumer_status IS
    'Each configured durable consumer and what JetStream last reported: does it exist, is its filter the configured '
    'one, lag (num_pending), unacknowledged, redelivered, waiting pull requests, live workers, deliveries and '
    'failed attempts in the last hour, deliveries per second over the last 5 minutes. '
    'status: ok | missing | error | filter_mismatch | stale | not_consuming | unknown | disabled.';

-- On demand: ask the running sidecars to report stream and consumer state now.
CREATE FUNCTION rule_nats_refresh_status()
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$ SELECT pg_notify('rule_nats_refresh', '') $$;
COMMENT ON FUNCTION rule_nats_refresh_status() IS
    'NOTIFY rule_nats_refresh: running sidecars write stream and consumer info into rule_nats_stream_state and '
    'rule_nats_consumer_state at once (otherwise every heartbeat). Look again a second later.';

-- ---------------------------------------------------------------------------
-- Retention.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_retention (
    settings_id                boolean     PRIMARY KEY DEFAULT true,
    attempts_days              integer     DEFAULT 30,
    publish_history_days       integer     DEFAULT 30,
    dead_letters_days          integer     DEFAULT 90,
    stats_days                 integer     DEFAULT 35,
    batch_size                 integer     NOT NULL DEFAULT 5000,
    run_every_seconds          integer     DEFAULT 3600,
    last_run_at                timestamptz,
    last_result                jsonb,
    CONSTRAINT "rule_nats_retention holds one row" CHECK (settings_id),
    CONSTRAINT "retention days must be >= 1 (NULL keeps forever)"
        CHECK (coalesce(attempts_days, 1) >= 1 AND coalesce(publish_history_days, 1) >= 1
               AND coalesce(dead_letters_days, 1) >= 1 AND coalesce(stats_days, 2) >= 2),
    CONSTRAINT "batch_size: 100 to 100000" CHECK (batch_size BETWEEN 100 AND 100000),
    CONSTRAINT "run_every_seconds: NULL or >= 60" CHECK (run_every_seconds IS NULL OR run_every_seconds >= 60)
);
COMMENT ON TABLE rule_nats_retention IS
    'How long history is kept (days; NULL keeps forever) and how often a sidecar purges it (run_every_seconds; '
    'NULL: the sidecars never do, e.g. because pg_cron runs CALL rule_nats_purge()).';
COMMENT ON COLUMN rule_nats_retention.dead_letters_days IS 'Replayed dead letters older than this are deleted; dead letters not yet replayed are kept.';
COMMENT ON COLUMN rule_nats_retention.stats_days IS 'Hourly rollups (rule_nats_stats_hourly) older than this are deleted.';
INSERT INTO rule_nats_retention DEFAULT VALUES;

CREATE FUNCTION rule_nats_purge_batch(p_what text, p_older_than interval, p_batch_size integer DEFAULT 5000)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
COMMENT ON FUNCTION rule_nats_purge_batch(text, interval, integer) IS
    'Deletes at most p_batch_size rows of one kind (attempts, publish_history, dead_letters: replayed only, stats) '
    'older than p_older_than, oldest first; returns how many. Call it in a loop, one transaction per call, so no '
    'lock is held for long: that is what CALL rule_nats_purge() and the sidecars do.';

-- SECURITY INVOKER and no SET clause: PostgreSQL allows COMMIT in a procedure only without them.
-- The caller needs rule_nats_admin (EXECUTE on rule_nats_purge_batch, UPDATE on rule_nats_retention).
CREATE PROCEDURE rule_nats_purge(p_max_seconds integer DEFAULT 300)
LANGUAGE plpgsql
AS $$
DECLARE
    r public.rule_nats_retention;
    v_started timestamptz := clock_timestamp();
    v_total jsonb := '{}';
    v_kind text;
    v_days integer;
    v_n bigint;
    v_sum bigint;
BEGIN
    SELECT * INTO r FROM public.rule_nats_retention;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    FOREACH v_kind IN ARRAY ARRAY['attempts', 'publish_history', 'dead_letters', 'stats'] LOOP
        v_days := CASE v_kind WHEN 'attempts' THEN r.attempts_days WHEN 'publish_history' THEN r.publish_history_days
                              WHEN 'dead_letters' THEN r.dead_letters_days ELSE r.stats_days END;
        CONTINUE WHEN v_days IS NULL;
        v_sum := 0;
        LOOP
            v_n := public.rule_nats_purge_batch(v_kind, make_interval(days => v_days), r.batch_size);
            v_sum := v_sum + v_n;
            COMMIT;  -- one short transaction per batch
            EXIT WHEN v_n < r.batch_size OR clock_timestamp() - v_started > make_interval(secs => p_max_seconds);
        END LOOP;
        v_total := v_total || jsonb_build_object(v_kind, v_sum);
    END LOOP;
    UPDATE public.rule_nats_retention SET last_run_at = now(), last_result = v_total;
    COMMIT;
END
$$;
COMMENT ON PROCEDURE rule_nats_purge(integer) IS
    'Purges all kinds of history by rule_nats_retention, in batches with a COMMIT after each (CALL it outside a '
    'transaction block, e.g. from pg_cron: SELECT cron.schedule(''nats-purge'', ''17 * * * *'', ''CALL rule_nats_purge()'')).';

-- ---------------------------------------------------------------------------
-- Privileges.
-- ---------------------------------------------------------------------------
REVOKE ALL ON FUNCTION rule_nats_rollup_attempts(), rule_nats_rollup_publishes(), rule_nats_refresh_status(),
    rule_nats_purge_batch(text, interval, integer) FROM PUBLIC;
REVOKE ALL ON PROCEDURE rule_nats_purge(integer) FROM PUBLIC;

GRANT SELECT ON rule_nats_stats_hourly, nats_worker_status, nats_stream_status, nats_consumer_status,
    nats_endpoint_health, rule_nats_stream_state, rule_nats_consumer_state TO rule_nats_admin;
GRANT SELECT, UPDATE ON rule_nats_retention TO rule_nats_admin;
GRANT EXECUTE ON FUNCTION rule_nats_refresh_status(), rule_nats_purge_batch(text, interval, integer) TO rule_nats_admin;
GRANT EXECUTE ON PROCEDURE rule_nats_purge(integer) TO rule_nats_admin;

GRANT SELECT ON rule_nats_stats_hourly, nats_worker_status, nats_stream_status, nats_consumer_status,
    rule_nats_stream_state, rule_nats_consumer_state, rule_nats_retention TO rule_nats_monitor;
GRANT EXECUTE ON FUNCTION rule_nats_refresh_status() TO rule_nats_monitor;

GRANT SELECT ON rule_nats_retention, nats_worker_status, nats_stream_status, nats_consumer_status,
    nats_endpoint_health, nats_performance_stats, nats_recent_failures TO rule_nats_worker;
GRANT UPDATE (last_run_at, last_result) ON rule_nats_retention TO rule_nats_worker;
GRANT EXECUTE ON FUNCTION rule_nats_purge_batch(text, interval, integer) TO rule_nats_worker;

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (5, 'operations');
