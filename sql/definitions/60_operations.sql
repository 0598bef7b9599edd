-- sql/definitions/60_operations.sql: the current definition of these objects (docs/schema.md).
--
-- Statistics and retention: latency histograms, the per-minute and per-hour roll-ups behind
-- nats_performance_stats, the purge (rule_nats_purge_batch, CALL rule_nats_purge()) and
-- rule_nats_refresh_status().
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

CREATE OR REPLACE FUNCTION rule_nats_latency_bucket(p_ms double precision)
RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p_ms IS NULL OR p_ms < 0.1 THEN 1
                ELSE least(72, 2 + floor(ln(p_ms / 0.1) / ln(1.25))::integer) END
$$;
COMMENT ON FUNCTION rule_nats_latency_bucket(double precision) IS
    'Histogram bucket (1..72) of a latency in ms: 1 is below 0.1 ms, bucket i covers [0.1*1.25^(i-2), 0.1*1.25^(i-1)).';

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
COMMENT ON FUNCTION rule_nats_hist_add(bigint[], double precision) IS 'Aggregate step: count one latency into a histogram.';

CREATE OR REPLACE FUNCTION rule_nats_hist_merge(p_a bigint[], p_b bigint[])
RETURNS bigint[] LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
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

CREATE OR REPLACE AGGREGATE rule_nats_hist_agg(double precision) (
    SFUNC = rule_nats_hist_add, STYPE = bigint[], PARALLEL = SAFE
);
COMMENT ON AGGREGATE rule_nats_hist_agg(double precision) IS 'Latency histogram (72 buckets) of a set of latencies in ms.';

CREATE OR REPLACE AGGREGATE rule_nats_hist_sum(bigint[]) (
    SFUNC = rule_nats_hist_merge, STYPE = bigint[], COMBINEFUNC = rule_nats_hist_merge, PARALLEL = SAFE
);
COMMENT ON AGGREGATE rule_nats_hist_sum(bigint[]) IS 'Sum of latency histograms.';

CREATE OR REPLACE FUNCTION rule_nats_hist_quantile(p_hist bigint[], p_q double precision,
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

-- The rollup reads the new rows' ids (same counters as before, from rule_nats_attempt_log).
CREATE OR REPLACE FUNCTION rule_nats_rollup_attempts()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('rule_nats.history_move', true) = 'on' THEN
        RETURN NULL;  -- rows moved from the legacy table: counted when they were first written
    END IF;
    INSERT INTO public.rule_nats_stats_hourly AS s
        (bucket, source, subject, consumer_name, webhook_id, message_count, attempt_count, success_count,
         latency_count, latency_sum, latency_min, latency_max, latency_hist, last_at)
    SELECT n.bucket, 'delivery', n.subject, r.consumer_name, n.webhook_id, sum(n.messages), sum(n.attempts),
           sum(n.successes), sum(n.latency_count), sum(n.latency_sum), min(n.latency_min), max(n.latency_max),
           public.rule_nats_hist_sum(n.hist), max(n.last_at)
      FROM (SELECT date_trunc('hour', attempted_at) AS bucket, coalesce(subject, '') AS subject, route_id,
                   coalesce(webhook_id, 0) AS webhook_id, count(*) FILTER (WHERE outcome <> 'r') AS messages,
                   count(*) AS attempts, count(*) FILTER (WHERE outcome = 'd') AS successes,
                   count(latency_us) AS latency_count, coalesce(sum(latency_us / 1000.0::double precision), 0) AS latency_sum,
                   min(latency_us / 1000.0::double precision) AS latency_min,
                   max(latency_us / 1000.0::double precision) AS latency_max,
                   public.rule_nats_hist_agg(latency_us / 1000.0::double precision) AS hist, max(attempted_at) AS last_at
              FROM new_rows GROUP BY 1, 2, 3, 4) n
      JOIN public.rule_nats_history_routes r ON r.route_id = n.route_id
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
    SELECT n.minute, r.stream_name, r.consumer_name, n.webhook_id, sum(n.delivered), sum(n.failed)
      FROM (SELECT date_trunc('minute', attempted_at) AS minute, route_id, coalesce(webhook_id, 0) AS webhook_id,
                   count(*) FILTER (WHERE outcome = 'd') AS delivered,
                   count(*) FILTER (WHERE outcome <> 'd') AS failed
              FROM new_rows GROUP BY 1, 2, 3) n
      JOIN public.rule_nats_history_routes r ON r.route_id = n.route_id
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT (minute, stream_name, consumer_name, webhook_id) DO UPDATE SET
        delivered = m.delivered + excluded.delivered,
        failed = m.failed + excluded.failed;
    RETURN NULL;
END
$$;
ALTER FUNCTION rule_nats_rollup_attempts() OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_rollup_attempts() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_rollup_attempts() IS 'Statement trigger: adds inserted delivery attempts to rule_nats_stats_hourly.';

-- The rows of publish history moved from the legacy table were counted when first written.
CREATE OR REPLACE FUNCTION rule_nats_rollup_publishes()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('rule_nats.history_move', true) = 'on' THEN
        RETURN NULL;
    END IF;
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
ALTER FUNCTION rule_nats_rollup_publishes() OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_rollup_publishes() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_rollup_publishes() IS 'Statement trigger: adds inserted publish history rows to rule_nats_stats_hourly.';

-- On demand: ask the running sidecars to report stream and consumer state now.
CREATE OR REPLACE FUNCTION rule_nats_refresh_status()
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_notify('rule_nats_refresh', '') $$;
ALTER FUNCTION rule_nats_refresh_status() OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_refresh_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_refresh_status() TO rule_nats_admin, rule_nats_monitor;
COMMENT ON FUNCTION rule_nats_refresh_status() IS
    'NOTIFY rule_nats_refresh: running sidecars write stream and consumer info into rule_nats_stream_state and '
    'rule_nats_consumer_state at once (otherwise every heartbeat). Look again a second later.';

-- The 'stats' kind of retention also drops per-minute rows older than 2 hours (nothing reads them).
-- Rows of partitions older than p_older_than: dropped whole (the count is the planner's estimate
-- for an analyzed partition: counting would read it). The DEFAULT partition and a legacy table
-- are deleted from in batches, as before.
CREATE OR REPLACE FUNCTION rule_nats_purge_batch(p_what text, p_older_than interval, p_batch_size integer DEFAULT 5000)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count bigint := 0;
    v_n bigint;
    v_cut timestamptz;
    v_table text;
    r record;
BEGIN
    IF p_older_than IS NULL OR p_older_than <= interval '0' THEN
        RAISE EXCEPTION 'p_older_than must be a positive interval' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'e.g. rule_nats_purge_batch(''attempts'', interval ''30 days'')';
    END IF;
    v_cut := now() - p_older_than;
    CASE p_what
    WHEN 'attempts', 'publish_history' THEN
        v_table := CASE p_what WHEN 'attempts' THEN 'rule_nats_attempt_log' ELSE 'rule_nats_publish_history' END;
        PERFORM public.rule_nats_history_partitions();
        FOR r IN SELECT c.oid::regclass AS part, c.relname, c.reltuples
                   FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                  WHERE i.inhparent = ('public.' || v_table)::regclass
                    AND c.relname ~ ('^' || v_table || '_[0-9]{8}$')
                    AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC' <= v_cut
                  ORDER BY c.relname LOOP
            IF r.reltuples >= 0 THEN
                v_n := r.reltuples::bigint;
            ELSE
                EXECUTE format('SELECT count(*) FROM %s', r.part) INTO v_n;
            END IF;
            EXECUTE format('DROP TABLE %s', r.part);
            v_count := v_count + v_n;
        END LOOP;
        IF p_what = 'attempts' THEN
            DELETE FROM rule_nats_private.rule_nats_attempt_log_default WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM rule_nats_private.rule_nats_attempt_log_default
                 WHERE attempted_at < v_cut LIMIT p_batch_size));
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_count := v_count + v_n;
            -- The counts of successes not kept as rows (recording = failures): one row per minute
            -- and route, few; not counted as history rows.
            DELETE FROM public.rule_nats_success_minutes WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM public.rule_nats_success_minutes WHERE minute < v_cut LIMIT p_batch_size));
            DELETE FROM rule_nats_private.rule_nats_delivery_attempts_legacy WHERE attempt_id IN (
                SELECT attempt_id FROM rule_nats_private.rule_nats_delivery_attempts_legacy
                 WHERE attempted_at < v_cut ORDER BY attempted_at LIMIT p_batch_size);
        ELSE
            DELETE FROM rule_nats_private.rule_nats_publish_history_default WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM rule_nats_private.rule_nats_publish_history_default
                 WHERE published_at < v_cut LIMIT p_batch_size));
            GET DIAGNOSTICS v_n = ROW_COUNT;
            v_count := v_count + v_n;
            DELETE FROM rule_nats_private.rule_nats_publish_history_legacy WHERE publish_id IN (
                SELECT publish_id FROM rule_nats_private.rule_nats_publish_history_legacy
                 WHERE published_at < v_cut ORDER BY published_at LIMIT p_batch_size);
        END IF;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        RETURN v_count + v_n;
    WHEN 'dead_letters' THEN
        DELETE FROM public.rule_nats_dead_letters WHERE dead_letter_id IN (
            SELECT dead_letter_id FROM public.rule_nats_dead_letters
             WHERE replayed AND created_at < v_cut ORDER BY created_at LIMIT p_batch_size);
    WHEN 'stats' THEN
        DELETE FROM public.rule_nats_stats_minute WHERE minute < now() - interval '2 hours';
        DELETE FROM public.rule_nats_stats_hourly WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM public.rule_nats_stats_hourly
             WHERE bucket < v_cut LIMIT p_batch_size));
    ELSE
        RAISE EXCEPTION 'unknown history kind %', p_what USING ERRCODE = 'invalid_parameter_value',
            HINT = 'one of: attempts, publish_history, dead_letters, stats';
    END CASE;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
ALTER FUNCTION rule_nats_purge_batch(text, interval, integer) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_purge_batch(text, interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_purge_batch(text, interval, integer) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_purge_batch(text, interval, integer) IS
    'Removes history older than p_older_than: for attempts and publish_history the daily partitions whose whole day '
    'is older (dropped, no DELETE; rows of the day the cut falls in stay until that day is old) plus at most '
    'p_batch_size rows of the DEFAULT partition and of a legacy table; for dead_letters (replayed only) and stats '
    'at most p_batch_size rows. Returns the number removed (a partition''s planner estimate once analyzed).';

-- SECURITY INVOKER and no SET clause: PostgreSQL allows COMMIT in a procedure only without them.
-- The caller needs rule_nats_admin (EXECUTE on rule_nats_purge_batch, UPDATE on rule_nats_retention).
CREATE OR REPLACE PROCEDURE rule_nats_purge(p_max_seconds integer DEFAULT 300)
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
REVOKE ALL ON PROCEDURE rule_nats_purge(integer) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE rule_nats_purge(integer) TO rule_nats_admin;
COMMENT ON PROCEDURE rule_nats_purge(integer) IS
    'Purges all kinds of history by rule_nats_retention, in batches with a COMMIT after each (CALL it outside a '
    'transaction block, e.g. from pg_cron: SELECT cron.schedule(''nats-purge'', ''17 * * * *'', ''CALL rule_nats_purge()'')).';

CREATE OR REPLACE FUNCTION rule_nats_purge_due(p_what text)
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
ALTER FUNCTION rule_nats_purge_due(text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_purge_due(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_purge_due(text) TO rule_nats_worker, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_purge_due(text) IS
    'Deletes one batch of one kind of history (attempts, publish_history, dead_letters, stats) that is older than '
    'rule_nats_retention says, oldest first; returns how many. What the sidecars call: they cannot choose the age.';

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('60_operations.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
