-- 0010_adopt: adopt, don't overwrite (issue 11, defect 6), and a worker that is not healthy says so
-- (issue 11, defect 4).
--
--  * A stream or durable consumer that already exists in JetStream when a worker started with the
--    original worker's environment (STREAM_NAME, SUBJECT, QUEUE_GROUP) registers it is adopted as it
--    is: its settings are copied into the new registry row, and into adopted_config. Afterwards the
--    sidecar applies to it only the columns a DBA changed (row value <> adopted_config value); a
--    worker never lowers the replicas, storage or retention of a stream it found in place.
--  * rule_nats_adopt_consumer() is how the worker role seeds those rows: it only INSERTs missing
--    rows, never changes one (the registry is the DBA's).
--  * rule_nats_workers.problems: what the worker's /readyz reports, written with each heartbeat;
--    nats_worker_status shows DEGRADED while it is not empty (e.g. a consumer on a closed NATS
--    connection), instead of ACTIVE.

-- ---------------------------------------------------------------------------
-- What JetStream had when a row was adopted.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_streams ADD COLUMN adopted_config jsonb;
ALTER TABLE rule_nats_streams ADD CONSTRAINT "adopted_config: a JSON object"
    CHECK (adopted_config IS NULL OR jsonb_typeof(adopted_config) = 'object');
COMMENT ON COLUMN rule_nats_streams.adopted_config IS
    'Set when a worker adopted a stream that already existed in JetStream: its settings then, by column name '
    '(subjects, storage_type, replicas, ...). The sidecar applies to the stream only the columns whose value differs '
    'from this (changed by a DBA after the adoption); NULL: the row is applied as it is.';

ALTER TABLE rule_nats_consumers ADD COLUMN adopted_config jsonb;
ALTER TABLE rule_nats_consumers ADD CONSTRAINT "adopted_config: a JSON object"
    CHECK (adopted_config IS NULL OR jsonb_typeof(adopted_config) = 'object');
COMMENT ON COLUMN rule_nats_consumers.adopted_config IS
    'Set when a worker adopted a durable consumer that already existed in JetStream: its settings then, by column '
    'name. The sidecar applies only the columns whose value differs from this; NULL: the row is applied as it is.';

-- ---------------------------------------------------------------------------
-- The worker seeds missing rows, adopting what JetStream already has.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_adopt_consumer(
    p_stream_name   text,
    p_subject       text,
    p_consumer_name text,
    p_batch_size    integer,
    p_config_name   text,
    p_stream        jsonb,
    p_consumer      jsonb
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id integer;
BEGIN
    IF p_stream IS NOT NULL AND jsonb_typeof(p_stream) <> 'object'
       OR p_consumer IS NOT NULL AND jsonb_typeof(p_consumer) <> 'object' THEN
        RAISE EXCEPTION 'p_stream and p_consumer must be JSON objects or NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_stream IS NULL THEN
        INSERT INTO public.rule_nats_streams (stream_name, subjects, config_name, description)
        VALUES (p_stream_name, ARRAY[p_subject], p_config_name, 'Registered from the worker environment')
        ON CONFLICT (stream_name) DO NOTHING;
    ELSE
        -- A setting missing from p_stream takes the column's default (the NOT NULL columns are
        -- checked before ON CONFLICT is, so an existing row must not fail on them either).
        INSERT INTO public.rule_nats_streams
            (stream_name, config_name, subjects, description, storage_type, retention_policy, max_messages,
             max_bytes, max_age_seconds, max_message_size, discard_policy, replicas, duplicate_window_seconds,
             adopted_config)
        VALUES (p_stream_name, p_config_name,
                CASE WHEN jsonb_typeof(p_stream -> 'subjects') = 'array'
                     THEN ARRAY(SELECT jsonb_array_elements_text(p_stream -> 'subjects'))
                     ELSE ARRAY[p_subject] END,
                p_stream ->> 'description',
                coalesce(p_stream ->> 'storage_type', 'file'),
                coalesce(p_stream ->> 'retention_policy', 'limits'),
                coalesce((p_stream ->> 'max_messages')::bigint, -1),
                coalesce((p_stream ->> 'max_bytes')::bigint, -1),
                coalesce((p_stream ->> 'max_age_seconds')::numeric, 0),
                coalesce((p_stream ->> 'max_message_size')::integer, -1),
                coalesce(p_stream ->> 'discard_policy', 'old'),
                coalesce((p_stream ->> 'replicas')::integer, 1),
                coalesce((p_stream ->> 'duplicate_window_seconds')::numeric, 120),
                p_stream)
        ON CONFLICT (stream_name) DO NOTHING;
    END IF;

    IF p_consumer IS NULL THEN
        INSERT INTO public.rule_nats_consumers (stream_name, consumer_name, filter_subject, queue_group,
                                                batch_size, description)
        VALUES (p_stream_name, p_consumer_name, p_subject, p_consumer_name, coalesce(p_batch_size, 10),
                'Registered from the worker environment')
        ON CONFLICT (stream_name, consumer_name) DO NOTHING
        RETURNING consumer_id INTO v_id;
    ELSE
        INSERT INTO public.rule_nats_consumers
            (stream_name, consumer_name, filter_subject, queue_group, batch_size, max_deliver, ack_wait_seconds,
             max_ack_pending, deliver_policy, description, adopted_config)
        VALUES (p_stream_name, p_consumer_name, p_consumer ->> 'filter_subject', p_consumer_name,
                coalesce(p_batch_size, 10),
                coalesce((p_consumer ->> 'max_deliver')::integer, 20),
                coalesce((p_consumer ->> 'ack_wait_seconds')::numeric, 30),
                coalesce((p_consumer ->> 'max_ack_pending')::integer, 1000),
                coalesce(p_consumer ->> 'deliver_policy', 'all'),
                'Adopted from JetStream by a worker started with QUEUE_GROUP',
                p_consumer)
        ON CONFLICT (stream_name, consumer_name) DO NOTHING
        RETURNING consumer_id INTO v_id;
    END IF;
    IF v_id IS NULL THEN
        SELECT c.consumer_id INTO v_id FROM public.rule_nats_consumers c
         WHERE c.stream_name = p_stream_name AND c.consumer_name = p_consumer_name;
    END IF;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION rule_nats_adopt_consumer(text, text, text, integer, text, jsonb, jsonb) IS
    'For a worker started with STREAM_NAME/SUBJECT/QUEUE_GROUP: inserts the stream and the durable consumer when '
    'their rows are missing, with the settings JetStream already has (p_stream, p_consumer: by column name, kept in '
    'adopted_config) or the defaults when JetStream has none (NULL); returns consumer_id. Rows that exist are never '
    'changed: the registry is the DBA''s.';

-- ---------------------------------------------------------------------------
-- Workers that run but are not ready.
-- ---------------------------------------------------------------------------
ALTER TABLE rule_nats_workers ADD COLUMN problems text[] NOT NULL DEFAULT '{}';
COMMENT ON COLUMN rule_nats_workers.problems IS
    'Why the worker is not ready, as its /readyz says (written with each heartbeat); empty when it is.';

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
       w.problems
  FROM rule_nats_workers w;
COMMENT ON VIEW nats_worker_status IS
    'Sidecars: ACTIVE (worked in the last minute), IDLE (alive, nothing to do), DEGRADED (alive but not ready, see '
    'problems: e.g. NATS down, a consumer on a closed connection, a failed task), STALE (no heartbeat for 3 intervals '
    '+ 2 s: crashed, hung or cut off), STOPPED (shut down cleanly).';
COMMENT ON COLUMN nats_worker_status.status IS
    'ACTIVE (worked in the last minute) | IDLE | DEGRADED (running but not ready: see problems) | STALE (no heartbeat '
    'for 3 intervals + 2 s) | STOPPED.';
COMMENT ON COLUMN nats_worker_status.problems IS 'Why the worker is not ready, as its /readyz said at the last heartbeat.';

-- ---------------------------------------------------------------------------
-- Definer functions: owned by rule_nats_definer, search_path pinned (as in 0006; docs/security.md
-- says why this one is a definer function, tests/security/test_definer_catalog.py checks it).
-- ---------------------------------------------------------------------------
DO $owner$
DECLARE
    f regprocedure;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'rule_nats_adopt_consumer(text, text, text, integer, text, jsonb, jsonb)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO rule_nats_definer', f);
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$owner$;

REVOKE ALL ON FUNCTION rule_nats_adopt_consumer(text, text, text, integer, text, jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_adopt_consumer(text, text, text, integer, text, jsonb, jsonb)
    TO rule_nats_worker, rule_nats_admin;

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (10, 'adopt');
