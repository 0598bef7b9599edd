-- 0013_truth: tell the operator the truth (issue 13, the rest).
--
--  * A stream whose subjects overlap another stream's on the same NATS connection is refused at
--    INSERT/UPDATE, like a unique key (23P01, naming the other stream), instead of being accepted
--    and then refused by JetStream (err 10065) where only the sidecar's log said so.
--  * The sidecar's periodic queries stay fast whatever the traffic: the retry claim reads its own
--    consumer's due rows through an index and no longer re-reads the rows in flight; the
--    heartbeat's backlog is counted up to 10,000 rows, estimated beyond.

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

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (13, 'truth');
