-- A sample delivery through the compose stack: a webhook for the demo receiver, one event.
INSERT INTO rule_webhooks (webhook_name, url, nats_subject)
VALUES ('demo', 'http://receiver:8080/demo', 'webhooks.demo')
ON CONFLICT (webhook_name) DO NOTHING;
SELECT rule_webhook_publish_nats((SELECT webhook_id FROM rule_webhooks WHERE webhook_name = 'demo'),
                                 '{"hello": "from SQL"}');
SELECT pg_sleep(2);
SELECT attempted_at, outcome, http_status, latency_ms, worker_name
  FROM rule_nats_delivery_attempts ORDER BY attempt_id DESC LIMIT 5;
