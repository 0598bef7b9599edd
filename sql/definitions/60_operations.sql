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
ALTER FUNCTION rule_nats_rollup_attempts() OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_rollup_attempts() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_rollup_attempts() IS 'Statement trigger: adds inserted delivery attempts to rule_nats_stats_hourly.';

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
ALTER FUNCTION rule_nats_purge_batch(text, interval, integer) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_purge_batch(text, interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_purge_batch(text, interval, integer) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_purge_batch(text, interval, integer) IS
    'Deletes at most p_batch_size rows of one kind (attempts, publish_history, dead_letters: replayed only, stats) '
    'older than p_older_than, oldest first; returns how many. Call it in a loop, one transaction per call, so no '
    'lock is held for long: that is what CALL rule_nats_purge() and the sidecars do.';

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
