-- A sample delivery through the compose stack: a webhook for the demo receiver, one event, and
-- its outcome. Run with psql (it uses psql variables):
--   docker compose -f docker/compose.yaml exec postgres psql -U postgres -f /webhook-worker/demo.sql
--
-- It waits (up to 30 s) until the event is delivered. A worker that has not yet loaded the brand-new
-- webhook into its registry dead-letters the event as unknown_webhook; the demo then replays that
-- dead letter (same webhook-id, attempts numbered on), which the worker, having reloaded, delivers.
\set ON_ERROR_STOP on
\if :{?receiver_url}
\else
    \set receiver_url http://receiver:8080/demo
\endif
INSERT INTO rule_webhooks (webhook_name, url, nats_subject)
VALUES ('demo', :'receiver_url', 'webhooks.demo')
ON CONFLICT (webhook_name) DO NOTHING;
SELECT set_config('demo.message_id', 'demo-' || gen_random_uuid(), false) AS message_id \gset
SELECT rule_webhook_publish_nats((SELECT webhook_id FROM rule_webhooks WHERE webhook_name = 'demo'),
                                 '{"hello": "from SQL"}', :'message_id') IS NOT NULL AS published;
DO $demo$
DECLARE
    mid text := current_setting('demo.message_id');
    dead bigint;
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN EXISTS (SELECT FROM rule_nats_delivery_attempts
                           WHERE message_id = mid AND outcome = 'delivered');
        SELECT dead_letter_id INTO dead FROM rule_nats_dead_letters
         WHERE message_id = mid AND reason = 'unknown_webhook' AND NOT replayed;
        IF dead IS NOT NULL THEN
            RAISE NOTICE 'demo: the worker had not loaded the new webhook yet; replaying dead letter %', dead;
            PERFORM rule_nats_replay_dead_letter(dead);
        END IF;
        COMMIT;  -- the replay is published after COMMIT; the next look sees the workers' commits
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$demo$;
SELECT attempted_at, outcome, http_status, latency_ms, worker_name
  FROM rule_nats_delivery_attempts WHERE message_id = :'message_id' ORDER BY attempt_id;
