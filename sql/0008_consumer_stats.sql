-- 0008_consumer_stats: rule_nats_consumer_stats counts up, whatever restarts.
--
-- The sidecar used to report the counters of its running consumers since they started, so a
-- restart made messages_delivered go down. It now reports what happened since its last report
-- and rule_nats_consumer_add_stats adds it. A worker started the original way (STREAM_NAME,
-- SUBJECT, QUEUE_GROUP, CONSUMER_NAME) reports under consumer_name = CONSUMER_NAME, as the
-- original worker did, so its documented queries find it (sidecar/stats.py).

CREATE FUNCTION rule_nats_consumer_add_stats(
    p_stream_name             text,
    p_consumer_name           text,
    p_worker_name             text,
    p_delivered               bigint,
    p_acknowledged            bigint,
    p_failed                  bigint,
    p_redelivered             bigint,
    p_messages_pending        bigint,
    p_avg_processing_time_ms  double precision,
    p_active                  boolean
) RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO public.rule_nats_consumer_stats AS s (
        stream_name, consumer_name, worker_name, messages_delivered, messages_acknowledged,
        messages_failed, messages_redelivered, messages_pending, avg_processing_time_ms,
        last_active_at, active)
    VALUES (p_stream_name, p_consumer_name, coalesce(p_worker_name, ''), greatest(p_delivered, 0),
            greatest(p_acknowledged, 0), greatest(p_failed, 0), greatest(p_redelivered, 0),
            coalesce(p_messages_pending, 0), p_avg_processing_time_ms, now(), coalesce(p_active, true))
    ON CONFLICT (stream_name, consumer_name, worker_name) DO UPDATE SET
        messages_delivered     = s.messages_delivered + greatest(EXCLUDED.messages_delivered, 0),
        messages_acknowledged  = s.messages_acknowledged + greatest(EXCLUDED.messages_acknowledged, 0),
        messages_failed        = s.messages_failed + greatest(EXCLUDED.messages_failed, 0),
        messages_redelivered   = s.messages_redelivered + greatest(EXCLUDED.messages_redelivered, 0),
        messages_pending       = EXCLUDED.messages_pending,
        avg_processing_time_ms = coalesce(EXCLUDED.avg_processing_time_ms, s.avg_processing_time_ms),
        last_active_at         = CASE WHEN EXCLUDED.messages_acknowledged > 0 THEN now() ELSE s.last_active_at END,
        active                 = EXCLUDED.active
    RETURNING true
$$;
COMMENT ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean) IS
    'Adds what a worker did since its last report to its row of rule_nats_consumer_stats (counters never go '
    'down); messages_pending and avg_processing_time_ms are replaced. What the sidecar calls.';
REVOKE ALL ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean)
    TO rule_nats_worker, rule_nats_admin;

COMMENT ON TABLE rule_nats_consumer_stats IS
    'Per stream, consumer and worker instance: what the workers did, counted up across restarts. A worker started '
    'with the original environment (STREAM_NAME, SUBJECT, QUEUE_GROUP, CONSUMER_NAME) reports under '
    'consumer_name = its CONSUMER_NAME and an empty worker_name, as the original worker did; other consumers '
    'report per durable consumer (consumer_name) and worker instance (worker_name).';
COMMENT ON COLUMN rule_nats_consumer_stats.last_active_at IS 'Last time the worker acknowledged a message.';

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (8, 'consumer_stats');
