-- sql/definitions/65_history.sql: the current definition of these objects (docs/schema.md).
--
-- Partitioned delivery and publish history (sql/0019_partitioned_history.sql, docs/scaling.md):
-- the routes and outcome codes of rule_nats_attempt_log, the INSTEAD OF trigger of the view
-- rule_nats_delivery_attempts, the daily partitions, the move of the rows of before 0019
-- (CALL rule_nats_history_upgrade()), and the successes counted per minute (recording = 'failures').
-- The roll-up triggers and the purge are in 60_operations.sql, the views in 70_views.sql.
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

CREATE OR REPLACE FUNCTION rule_nats_outcome_code(p_outcome text)
RETURNS "char" LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE p_outcome WHEN 'delivered' THEN 'd' WHEN 'retry' THEN 'r' WHEN 'dead_letter' THEN 'x' ELSE '?' END
$$;
COMMENT ON FUNCTION rule_nats_outcome_code(text) IS
    'The one-letter code of rule_nats_attempt_log.outcome for an outcome''s name (''?'' for another: the CHECK refuses it).';

-- The route of a stream, consumer, worker and URL, made when first seen (the sidecar caches them;
-- see sidecar/history_ids.py).
CREATE OR REPLACE FUNCTION rule_nats_history_route_id(p_stream text, p_consumer text, p_worker text, p_url text)
RETURNS integer LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id integer;
BEGIN
    LOOP
        SELECT route_id INTO v_id FROM public.rule_nats_history_routes
         WHERE stream_name = p_stream AND consumer_name = p_consumer
           AND coalesce(worker_name, '') = coalesce(p_worker, '') AND md5(coalesce(url, '')) = md5(coalesce(p_url, ''))
           AND url IS NOT DISTINCT FROM p_url AND worker_name IS NOT DISTINCT FROM p_worker;
        EXIT WHEN FOUND;
        INSERT INTO public.rule_nats_history_routes (stream_name, consumer_name, worker_name, url)
        VALUES (p_stream, p_consumer, p_worker, p_url)
        ON CONFLICT DO NOTHING RETURNING route_id INTO v_id;
        EXIT WHEN v_id IS NOT NULL;  -- else another session made it: read it
    END LOOP;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION rule_nats_history_route_id(text, text, text, text) IS
    'The route_id of a stream, consumer, worker and URL in delivery history, made when new.';
REVOKE ALL ON FUNCTION rule_nats_history_route_id(text, text, text, text) FROM PUBLIC;
-- Who inserts into the view rule_nats_delivery_attempts (its trigger runs as the caller).
GRANT EXECUTE ON FUNCTION rule_nats_history_route_id(text, text, text, text) TO rule_nats_worker;

-- INSERT and DELETE through the view (as before, on the table): a statement-level trigger cannot
-- serve a view, so these run per row; the sidecar writes rule_nats_attempt_log by COPY instead.
CREATE OR REPLACE FUNCTION rule_nats_delivery_attempts_write()
RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM public.rule_nats_attempt_log WHERE attempt_id = OLD.attempt_id AND attempted_at = OLD.attempted_at;
        DELETE FROM rule_nats_private.rule_nats_delivery_attempts_legacy WHERE attempt_id = OLD.attempt_id;
        RETURN OLD;
    END IF;
    INSERT INTO public.rule_nats_attempt_log (attempt_id, attempted_at, message_id, route_id, stream_seq, subject,
                                              webhook_id, attempt, outcome, http_status, latency_us, error,
                                              response_body, next_attempt_at, notes)
    VALUES (coalesce(NEW.attempt_id, nextval(pg_get_serial_sequence('public.rule_nats_attempt_log', 'attempt_id'))),
            coalesce(NEW.attempted_at, clock_timestamp()), NEW.message_id,
            public.rule_nats_history_route_id(NEW.stream_name, NEW.consumer_name, NEW.worker_name, NEW.url),
            NEW.stream_seq, NEW.subject, NEW.webhook_id, least(NEW.attempt, 32767),
            public.rule_nats_outcome_code(NEW.outcome), NEW.http_status,
            round(least(NEW.latency_ms * 1000, 2147483647))::integer, NEW.error, NEW.response_body,
            NEW.next_attempt_at, NEW.notes)
    RETURNING attempt_id, attempted_at INTO NEW.attempt_id, NEW.attempted_at;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION rule_nats_delivery_attempts_write() IS
    'INSTEAD OF trigger: INSERT and DELETE on the view rule_nats_delivery_attempts reach rule_nats_attempt_log.';
REVOKE ALL ON FUNCTION rule_nats_delivery_attempts_write() FROM PUBLIC;

-- Partitions: one per UTC day, made ahead; a row for a day without one lands in the DEFAULT
-- partition (a write never fails), which is emptied into the day's partition when it is made.
CREATE OR REPLACE FUNCTION rule_nats_history_partitions(p_ahead interval DEFAULT '12 hours', p_from date DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_table text;
    v_key text;
    v_day date;
    v_name text;
    v_made integer := 0;
    v_today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    IF p_ahead IS NULL OR p_ahead < interval '0' OR p_ahead > interval '366 days' THEN
        RAISE EXCEPTION 'p_ahead must be 0 to 366 days' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_table IN ARRAY ARRAY['rule_nats_attempt_log', 'rule_nats_publish_history'] LOOP
        v_key := CASE v_table WHEN 'rule_nats_attempt_log' THEN 'attempted_at' ELSE 'published_at' END;
        -- Days are UTC days, whatever the session's time zone.
        FOR v_day IN SELECT generate_series(least(coalesce(p_from, v_today), v_today),
                                            ((now() + p_ahead) AT TIME ZONE 'UTC')::date, interval '1 day')::date LOOP
            v_name := v_table || '_' || to_char(v_day, 'YYYYMMDD');
            CONTINUE WHEN to_regclass('rule_nats_private.' || quote_ident(v_name)) IS NOT NULL;
            -- Rows of that day in the DEFAULT partition move to the new one in this transaction.
            EXECUTE format('CREATE TABLE rule_nats_private.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', v_name, v_table);
            EXECUTE format('WITH m AS (DELETE FROM rule_nats_private.%I WHERE %I >= %L AND %I < %L RETURNING *) '
                           'INSERT INTO rule_nats_private.%I SELECT * FROM m',
                           v_table || '_default', v_key, v_day::timestamp AT TIME ZONE 'UTC', v_key,
                           (v_day + 1)::timestamp AT TIME ZONE 'UTC', v_name);
            EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION rule_nats_private.%I FOR VALUES FROM (%L) TO (%L)',
                           v_table, v_name, v_day::timestamp AT TIME ZONE 'UTC', (v_day + 1)::timestamp AT TIME ZONE 'UTC');
            v_made := v_made + 1;
        END LOOP;
    END LOOP;
    RETURN v_made;
END
$$;
COMMENT ON FUNCTION rule_nats_history_partitions(interval, date) IS
    'Makes the daily (UTC) partitions of rule_nats_attempt_log and rule_nats_publish_history from today (or '
    'p_from) to the day of now() + p_ahead (tomorrow''s once today has less than 12 hours left); returns how many '
    'it made. The sidecar (every 10 minutes) and CALL rule_nats_purge() call it; a row for a day without a '
    'partition waits in the DEFAULT partition and moves to its own when that is made.';
ALTER FUNCTION rule_nats_history_partitions(interval, date) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_history_partitions(interval, date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_history_partitions(interval, date) TO rule_nats_worker, rule_nats_admin;

-- The rows of the old tables: copied by migration 0019 when few, else by CALL rule_nats_history_upgrade().
-- One batch of the move, oldest first; the rollup skips the rows (the counters have them).
CREATE OR REPLACE FUNCTION rule_nats_private.history_move(p_batch_size integer)
RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n bigint;
    v_m bigint;
BEGIN
    PERFORM set_config('rule_nats.history_move', 'on', true);
    WITH moved AS (
        DELETE FROM rule_nats_private.rule_nats_delivery_attempts_legacy WHERE attempt_id IN (
            SELECT attempt_id FROM rule_nats_private.rule_nats_delivery_attempts_legacy
             ORDER BY attempt_id LIMIT p_batch_size)
        RETURNING *)
    INSERT INTO public.rule_nats_attempt_log (attempt_id, attempted_at, message_id, route_id, stream_seq, subject,
                                              webhook_id, attempt, outcome, http_status, latency_us, error,
                                              response_body, next_attempt_at, notes)
    SELECT attempt_id, attempted_at, message_id,
           public.rule_nats_history_route_id(stream_name, consumer_name, worker_name, url),
           stream_seq, subject, webhook_id, least(attempt, 32767), public.rule_nats_outcome_code(outcome), http_status,
           round(least(latency_ms * 1000, 2147483647))::integer, error, response_body, next_attempt_at, notes
      FROM moved;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    WITH moved AS (
        DELETE FROM rule_nats_private.rule_nats_publish_history_legacy WHERE publish_id IN (
            SELECT publish_id FROM rule_nats_private.rule_nats_publish_history_legacy
             ORDER BY publish_id LIMIT p_batch_size)
        RETURNING *)
    INSERT INTO public.rule_nats_publish_history (publish_id, published_at, config_name, webhook_id, subject,
                                                  payload, headers, message_id, stream_name, sequence_number,
                                                  duplicate, success, error_message, latency_ms, triggered_by,
                                                  rule_execution_id, expires_at)
    SELECT publish_id, published_at, config_name, webhook_id, subject, payload, headers, message_id, stream_name,
           sequence_number, duplicate, success, error_message, latency_ms, triggered_by, rule_execution_id,
           expires_at
      FROM moved;
    GET DIAGNOSTICS v_m = ROW_COUNT;
    PERFORM set_config('rule_nats.history_move', 'off', true);
    RETURN v_n + v_m;
END
$$;
REVOKE ALL ON FUNCTION rule_nats_private.history_move(integer) FROM PUBLIC;

-- No SET search_path: a procedure with one cannot COMMIT (it runs as its caller; names are qualified).
CREATE OR REPLACE PROCEDURE rule_nats_history_upgrade(p_batch_size integer DEFAULT 50000, p_max_seconds integer DEFAULT 3600)
LANGUAGE plpgsql
AS $$
DECLARE
    v_started timestamptz := clock_timestamp();
    v_n bigint;
    v_from date;
BEGIN
    -- Partitions for every day the legacy rows cover: no row lands in the DEFAULT partition.
    SELECT least((SELECT min(attempted_at) FROM rule_nats_private.rule_nats_delivery_attempts_legacy),
                 (SELECT min(published_at) FROM rule_nats_private.rule_nats_publish_history_legacy))::date INTO v_from;
    PERFORM public.rule_nats_history_partitions(interval '12 hours', v_from);
    COMMIT;
    LOOP
        -- One short transaction per batch: readers of the view see each row once.
        v_n := rule_nats_private.history_move(p_batch_size);
        COMMIT;
        EXIT WHEN v_n = 0 OR clock_timestamp() - v_started > make_interval(secs => p_max_seconds);
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM rule_nats_private.rule_nats_delivery_attempts_legacy)
       AND NOT EXISTS (SELECT 1 FROM rule_nats_private.rule_nats_publish_history_legacy) THEN
        -- Empty now: TRUNCATE gives the space of the deleted rows back at once.
        TRUNCATE rule_nats_private.rule_nats_delivery_attempts_legacy, rule_nats_private.rule_nats_publish_history_legacy;
        RAISE NOTICE 'rule_nats: the history of before 0019 is in the partitioned tables now';
    ELSE
        RAISE NOTICE 'rule_nats: rows remain in the legacy history tables; CALL rule_nats_history_upgrade() again';
    END IF;
END
$$;
COMMENT ON PROCEDURE rule_nats_history_upgrade(integer, integer) IS
    'Moves the delivery attempts and publish history of before migration 0019 into the partitioned tables, oldest '
    'first, p_batch_size rows per transaction, for at most p_max_seconds (call again to go on). For installations '
    'whose history was too big to copy in the migration (docs/scaling.md); no long lock.';
REVOKE ALL ON PROCEDURE rule_nats_history_upgrade(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE rule_nats_history_upgrade(integer, integer) TO rule_nats_admin;

-- Recording level (rule_nats_consumers.recording, rule_webhooks.recording): deliveries not kept as
-- rows are counted per minute.
-- The successes of a batch, counted as their rows would have been by the rollup trigger.
CREATE OR REPLACE FUNCTION rule_nats_count_successes(p_at timestamptz[], p_route integer[], p_subject text[],
                                          p_webhook integer[], p_latency_us integer[])
RETURNS void LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO public.rule_nats_success_minutes AS m (minute, route_id, webhook_id, subject, delivered, latency_us_sum)
    SELECT date_trunc('minute', n.at), n.route, coalesce(n.webhook, 0), coalesce(n.subject, ''), count(*),
           coalesce(sum(n.latency_us), 0)
      FROM unnest(p_at, p_route, p_subject, p_webhook, p_latency_us) AS n(at, route, subject, webhook, latency_us)
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT (minute, route_id, webhook_id, subject) DO UPDATE SET
        delivered = m.delivered + excluded.delivered,
        latency_us_sum = m.latency_us_sum + excluded.latency_us_sum;
    INSERT INTO public.rule_nats_stats_hourly AS s
        (bucket, source, subject, consumer_name, webhook_id, message_count, attempt_count, success_count,
         latency_count, latency_sum, latency_min, latency_max, latency_hist, last_at)
    SELECT date_trunc('hour', n.at), 'delivery', coalesce(n.subject, ''), r.consumer_name, coalesce(n.webhook, 0),
           count(*), count(*), count(*), count(n.latency_us),
           coalesce(sum(n.latency_us / 1000.0::double precision), 0), min(n.latency_us / 1000.0::double precision),
           max(n.latency_us / 1000.0::double precision),
           public.rule_nats_hist_agg(n.latency_us / 1000.0::double precision), max(n.at)
      FROM unnest(p_at, p_route, p_subject, p_webhook, p_latency_us) AS n(at, route, subject, webhook, latency_us)
      JOIN public.rule_nats_history_routes r ON r.route_id = n.route
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3, 4, 5
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
    SELECT date_trunc('minute', n.at), r.stream_name, r.consumer_name, coalesce(n.webhook, 0), count(*), 0
      FROM unnest(p_at, p_route, p_subject, p_webhook, p_latency_us) AS n(at, route, subject, webhook, latency_us)
      JOIN public.rule_nats_history_routes r ON r.route_id = n.route
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT (minute, stream_name, consumer_name, webhook_id) DO UPDATE SET
        delivered = m.delivered + excluded.delivered;
$$;
COMMENT ON FUNCTION rule_nats_count_successes(timestamptz[], integer[], text[], integer[], integer[]) IS
    'Counts deliveries recorded as counts only (recording = failures) in rule_nats_success_minutes and the '
    'rollups, as their attempt rows would have been counted. Called by the sidecar.';
ALTER FUNCTION rule_nats_count_successes(timestamptz[], integer[], text[], integer[], integer[])
    OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_count_successes(timestamptz[], integer[], text[], integer[], integer[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_count_successes(timestamptz[], integer[], text[], integer[], integer[])
    TO rule_nats_worker;

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('65_history.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
