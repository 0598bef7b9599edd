-- 0012_stream_settings: nats_stream_status shows the limits JetStream actually applies (max_age,
-- max_bytes, max_messages, replicas) beside the configured ones, so a DBA can confirm from SQL that
-- a change took effect (or see that JetStream kept something else).

ALTER TABLE rule_nats_stream_state
    ADD COLUMN max_age_seconds double precision,
    ADD COLUMN max_bytes       bigint,
    ADD COLUMN max_messages    bigint,
    ADD COLUMN replicas        integer;
COMMENT ON COLUMN rule_nats_stream_state.max_age_seconds IS 'max_age in force in JetStream, in seconds (0: unlimited).';
COMMENT ON COLUMN rule_nats_stream_state.max_bytes IS 'max_bytes in force in JetStream (-1: unlimited).';
COMMENT ON COLUMN rule_nats_stream_state.max_messages IS 'max_msgs in force in JetStream (-1: unlimited).';
COMMENT ON COLUMN rule_nats_stream_state.replicas IS 'Replicas in force in JetStream.';

CREATE OR REPLACE VIEW nats_stream_status AS
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
  LEFT JOIN public.rule_nats_stream_state st USING (stream_name);

COMMENT ON COLUMN nats_stream_status.configured_max_age_seconds IS 'max_age_seconds in rule_nats_streams (0: unlimited).';
COMMENT ON COLUMN nats_stream_status.actual_max_age_seconds IS 'max_age JetStream reported, in seconds (0: unlimited).';
COMMENT ON COLUMN nats_stream_status.configured_max_bytes IS 'max_bytes in rule_nats_streams (-1: unlimited).';
COMMENT ON COLUMN nats_stream_status.actual_max_bytes IS 'max_bytes JetStream reported (-1: unlimited).';
COMMENT ON COLUMN nats_stream_status.configured_max_messages IS 'max_messages in rule_nats_streams (-1: unlimited).';
COMMENT ON COLUMN nats_stream_status.actual_max_messages IS 'max_msgs JetStream reported (-1: unlimited).';
COMMENT ON COLUMN nats_stream_status.configured_replicas IS 'replicas in rule_nats_streams.';
COMMENT ON COLUMN nats_stream_status.actual_replicas IS 'Replicas JetStream reported.';

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (12, 'stream_settings');
