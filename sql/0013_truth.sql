-- 0013_truth: tell the operator the truth (issue 13, the rest).
--
--  * A stream whose subjects overlap another stream's on the same NATS connection is refused at
--    INSERT/UPDATE, like a unique key (23P01, naming the other stream), instead of being accepted
--    and then refused by JetStream (err 10065) where only the sidecar's log said so.
--  * The sidecar's periodic queries stay fast whatever the traffic: the retry claim reads its own
--    consumer's due rows through an index and no longer re-reads the rows in flight; the
--    heartbeat's backlog is counted up to 10,000 rows, estimated beyond.
--  * A worker that cannot reach NATS writes which connections with its heartbeat (nats_down): it is
--    DEGRADED within one heartbeat, and the streams and consumers it reported on them are
--    'unknown', not 'ok'.
--  * A failure log that is enabled but broken shows in nats_failure_log_status (and
--    rule_nats_failure_log_check() says why), not only in a WARNING of the failing session.

-- ---------------------------------------------------------------------------
-- Overlapping streams.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_subjects_overlap(p_a text, p_b text)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
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

CREATE FUNCTION rule_nats_streams_check_overlap()
RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_other text;
    v_mine text;
    v_theirs text;
BEGIN
    -- One writer of stream subjects at a time: two transactions cannot each add half of an overlap.
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rule_nats_streams.subjects'));
    SELECT s.stream_name, mine, theirs INTO v_other, v_mine, v_theirs
      FROM public.rule_nats_streams s
     CROSS JOIN LATERAL unnest(NEW.subjects) AS mine
     CROSS JOIN LATERAL unnest(s.subjects) AS theirs
     WHERE s.config_name = NEW.config_name
       AND s.stream_id <> NEW.stream_id
       AND s.stream_name <> NEW.stream_name  -- INSERT ... ON CONFLICT (stream_name) of the row itself
       AND public.rule_nats_subjects_overlap(mine, theirs)
     ORDER BY s.stream_name
     LIMIT 1;
    IF v_other IS NOT NULL THEN
        RAISE EXCEPTION 'subjects of stream "%" overlap those of stream "%"', NEW.stream_name, v_other
            USING ERRCODE = 'exclusion_violation',
                  DETAIL = format('%L (stream %s) and %L (stream %s) capture some of the same subjects on NATS '
                                  'connection %L; JetStream would refuse the stream (err 10065, subjects overlap).',
                                  v_mine, NEW.stream_name, v_theirs, v_other, NEW.config_name),
                  HINT = format('A subject belongs to one stream per NATS account: change the subjects of one of '
                                'them, or remove stream "%s" first (DELETE FROM rule_nats_streams WHERE stream_name '
                                '= %L; the sidecar leaves it in JetStream: nats stream rm %s).',
                                v_other, v_other, v_other);
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION rule_nats_streams_check_overlap() IS
    'Trigger: refuses a stream whose subjects overlap those of another stream on the same NATS connection '
    '(23P01, naming the other stream).';
REVOKE ALL ON FUNCTION rule_nats_streams_check_overlap() FROM PUBLIC;

CREATE TRIGGER rule_nats_streams_overlap BEFORE INSERT OR UPDATE OF subjects, config_name, stream_name
    ON rule_nats_streams FOR EACH ROW EXECUTE FUNCTION rule_nats_streams_check_overlap();
COMMENT ON TRIGGER rule_nats_streams_overlap ON rule_nats_streams IS
    'Subjects overlapping another stream''s on the same connection are refused here, not by JetStream later. Rows '
    'that overlapped before 0013 stay; JetStream''s refusal of one of them shows in nats_stream_status.last_error.';

-- ---------------------------------------------------------------------------
-- The sidecar's periodic queries, bounded whatever the traffic (sidecar/queries.sql; timed by
-- bench/views.py with 10 million attempts in the last hour and large retry and outbox tables).
-- ---------------------------------------------------------------------------
-- The retry claim (every 0.25 s per consumer) reads its own consumer's due rows only; a leased row's
-- next_attempt_at is the lease's end, so the rows in flight are not due (and read) again.
CREATE INDEX rule_nats_retries_claim_idx ON rule_nats_retries (stream_name, consumer_name, next_attempt_at);
DROP INDEX rule_nats_retries_due_idx;
UPDATE rule_nats_retries SET next_attempt_at = leased_until
 WHERE leased_until > now() AND next_attempt_at < leased_until;
COMMENT ON COLUMN rule_nats_retries.next_attempt_at IS
    'Earliest time of the next attempt (backoff with jitter, or Retry-After). While a sidecar attempts it (leased), '
    'the end of its lease: if that sidecar dies the row is due again then.';
-- The heartbeat's backlog: failed outbox rows counted from an index like pending ones.
CREATE INDEX rule_nats_outbox_failed_idx ON rule_nats_outbox (outbox_id) WHERE status = 'failed';

-- ---------------------------------------------------------------------------
-- A worker that cannot reach NATS says so with each heartbeat; what it reported about streams and
-- consumers on that connection is then unknown, not ok.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_workers ADD COLUMN nats_down text[] NOT NULL DEFAULT '{}';
COMMENT ON COLUMN rule_nats_workers.nats_down IS
    'NATS configurations (rule_nats_config.config_name) the worker could not reach at its last heartbeat; '
    'problems says why (server address and error).';

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
COMMENT ON VIEW nats_stream_status IS
    'Each configured stream and what JetStream last reported: ok | missing | error | drift (a change was refused, '
    'see last_error) | stale (no report for 2 minutes: no sidecar running?) | unknown (never reported, or the sidecar '
    'that reported it cannot reach NATS now: nats_worker_status.problems says why) | disabled.';
COMMENT ON COLUMN nats_stream_status.status IS
    'ok | missing | error | drift | stale | unknown (never reported, or its reporter cannot reach NATS now) | disabled.';

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
COMMENT ON COLUMN nats_consumer_status.status IS
    'ok | missing | error | filter_mismatch | stale | not_consuming | unknown (never reported, or its reporter cannot '
    'reach NATS now) | disabled.';

-- ---------------------------------------------------------------------------
-- The failure log in SQL: enabled but broken (a changed password, port or pg_hba.conf) showed only
-- as a WARNING in the session whose failed publish was then recorded nowhere. Its uses are marked
-- in sequences, which a rollback does not undo (the caller's transaction is failing when they are
-- written), and nats_failure_log_status reads them.
-- ---------------------------------------------------------------------------
CREATE SEQUENCE rule_nats_private.failure_log_ok_at MINVALUE 0 START 0;
CREATE SEQUENCE rule_nats_private.failure_log_failed_at MINVALUE 0 START 0;
CREATE SEQUENCE rule_nats_private.failure_log_failures MINVALUE 0 START 1;
COMMENT ON SEQUENCE rule_nats_private.failure_log_ok_at IS
    'Epoch milliseconds of the last write (or check) through the failure log that worked (not called: none yet).';
COMMENT ON SEQUENCE rule_nats_private.failure_log_failed_at IS
    'Epoch milliseconds of the last write (or check) through the failure log that failed.';
COMMENT ON SEQUENCE rule_nats_private.failure_log_failures IS
    'Failed publishes the failure log could not record (nextval per failed write).';
GRANT USAGE, SELECT, UPDATE ON SEQUENCE rule_nats_private.failure_log_ok_at, rule_nats_private.failure_log_failed_at,
    rule_nats_private.failure_log_failures TO rule_nats_definer;

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
    IF v_conninfo IS NULL OR to_regprocedure('rule_nats_private.dblink(text,text)') IS NULL THEN
        RETURN false;
    END IF;
    -- libpq takes the last value of a repeated keyword: the login and the database are ours.
    v_conninfo := 'connect_timeout=5 ' || v_conninfo
        || ' user=rule_nats_failure_writer application_name=rule_nats_failure_log dbname='''
        || replace(replace(current_database(), '\', '\\'), '''', '\''') || '''';
    -- dblink(), not dblink_exec(): a SELECT returns a row, and dblink_exec() then raised "statement
    -- returning results not allowed" after the remote insert had committed (a WARNING that the
    -- failure was not recorded when it was, and a second one saying the log was not enabled).
    PERFORM 1 FROM rule_nats_private.dblink(v_conninfo, format(
        'SELECT public.rule_nats__insert_failure(%L, %L, %L, %L, %L, %L, %L, %L)',
        p_config_name, p_webhook_id, p_subject, p_payload, p_headers, p_message_id, p_error, p_latency_ms))
        AS t(inserted text);
    PERFORM setval('rule_nats_private.failure_log_ok_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN true;
EXCEPTION WHEN OTHERS THEN
    -- Marked outside the transaction (a sequence is not rolled back): nats_failure_log_status.
    PERFORM setval('rule_nats_private.failure_log_failed_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    PERFORM nextval('rule_nats_private.failure_log_failures');
    RAISE WARNING 'rule_nats: could not record the failed publish in the failure log: %', SQLERRM
        USING HINT = 'SELECT * FROM nats_failure_log_status; SELECT rule_nats_failure_log_check(); a superuser '
                     'checks rule_nats_private.failure_log and pg_hba.conf (docs/security.md).';
    RETURN false;
END
$$;

CREATE FUNCTION rule_nats_failure_log_check()
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_conninfo text;
    v_detail text;
BEGIN
    SELECT conninfo INTO v_conninfo FROM rule_nats_private.failure_log;
    IF v_conninfo IS NULL THEN
        RETURN 'not enabled: a failed publish from SQL is recorded only if its transaction commits; a superuser '
               'enables the failure log with SELECT rule_nats_private.enable_failure_log(''password'')';
    END IF;
    IF to_regprocedure('rule_nats_private.dblink(text,text)') IS NULL THEN
        RETURN 'dblink is not installed in schema rule_nats_private';
    END IF;
    v_conninfo := 'connect_timeout=5 ' || v_conninfo
        || ' user=rule_nats_failure_writer application_name=rule_nats_failure_log dbname='''
        || replace(replace(current_database(), '\', '\\'), '''', '\''') || '''';
    PERFORM 1 FROM rule_nats_private.dblink(v_conninfo, 'SELECT 1') AS t(one integer);
    PERFORM setval('rule_nats_private.failure_log_ok_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
    PERFORM setval('rule_nats_private.failure_log_failed_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    RETURN SQLERRM || coalesce(': ' || nullif(v_detail, ''), '');
END
$$;
COMMENT ON FUNCTION rule_nats_failure_log_check() IS
    'Connects through the failure log as a failed publish would: NULL when it works, else why (the server''s words, '
    'without the password). nats_failure_log_status shows the result.';
ALTER FUNCTION rule_nats_failure_log_check() OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_failure_log_check() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_failure_log_check() TO rule_nats_monitor, rule_nats_admin;

CREATE VIEW nats_failure_log_status AS
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
GRANT SELECT ON nats_failure_log_status TO rule_nats_monitor, rule_nats_admin;

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (13, 'truth');
