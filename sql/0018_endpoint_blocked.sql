-- 0018_endpoint_blocked: an endpoint whose messages were all refused before any request is not
-- shown as healthy (issue 21: "an endpoint whose only attempts were blocked is not shown as healthy").
--
--  * A delivery refused by the SSRF policy (reason ssrf_blocked: the endpoint's address is one
--    deliveries may not reach) sends no request, so the endpoint's state records no failure and
--    nats_endpoint_health said 'healthy' while none of its messages could ever arrive. Since 0018
--    the view says 'blocked', with the refusal as last_error, while such a dead letter is newer than
--    the endpoint's last success; `webhook-worker status` reads the view as it is.
--  * A partial index finds the newest refusal of a webhook without reading its other dead letters.

CREATE INDEX rule_nats_dead_letters_blocked_idx
    ON rule_nats_dead_letters (webhook_id, created_at DESC) WHERE reason = 'ssrf_blocked';

CREATE OR REPLACE VIEW nats_endpoint_health AS
SELECT w.webhook_id,
       w.webhook_name,
       public.rule_nats_redact_url(w.url) AS url,
       CASE WHEN NOT w.enabled THEN 'disabled'
            WHEN s.circuit = 'open' THEN 'open'
            WHEN s.circuit = 'half_open' THEN 'half_open'
            WHEN s.backoff_until > now() THEN 'backing_off'
            WHEN s.consecutive_failures > 0 THEN 'failing'
            WHEN b.created_at IS NOT NULL THEN 'blocked'
            ELSE 'healthy' END                                AS status,
       w.enabled,
       w.disabled_at,
       w.disabled_reason,
       coalesce(s.circuit, 'closed')                          AS circuit,
       coalesce(s.consecutive_failures, 0)                    AS consecutive_failures,
       s.failing_since,
       s.open_until,
       s.backoff_until,
       CASE WHEN s.last_failure_at > coalesce(s.last_success_at, '-infinity') THEN s.last_status END AS last_status,
       CASE WHEN s.last_failure_at > coalesce(s.last_success_at, '-infinity') THEN s.last_error
            WHEN b.created_at IS NOT NULL THEN b.error END     AS last_error,
       s.last_success_at,
       s.last_failure_at,
       coalesce(a.attempts_1h, 0)                             AS attempts_1h,
       coalesce(a.failures_1h, 0)                             AS failures_1h,
       round(100.0 * (a.attempts_1h - a.failures_1h) / nullif(a.attempts_1h, 0), 2) AS success_rate_1h,
       w.max_concurrency,
       w.rate_limit_per_second,
       (SELECT count(*) FROM public.rule_nats_retries r WHERE r.webhook_id = w.webhook_id) AS waiting,
       s.updated_at                                           AS state_updated_at
  FROM public.rule_webhooks w
  LEFT JOIN public.rule_nats_endpoint_state s USING (webhook_id)
  LEFT JOIN (
        SELECT m.webhook_id,
               sum(m.delivered + m.failed)::bigint            AS attempts_1h,
               sum(m.failed)::bigint                          AS failures_1h
          FROM public.rule_nats_stats_minute m
         WHERE m.minute > now() - interval '1 hour' AND m.webhook_id <> 0
         GROUP BY m.webhook_id) a ON a.webhook_id = w.webhook_id
  LEFT JOIN LATERAL (
        SELECT d.created_at, d.error
          FROM public.rule_nats_dead_letters d
         WHERE d.webhook_id = w.webhook_id AND d.reason = 'ssrf_blocked'
           AND d.created_at > coalesce(s.last_success_at, '-infinity')
         ORDER BY d.created_at DESC
         LIMIT 1) b ON true;

COMMENT ON COLUMN nats_endpoint_health.status IS
    'healthy | failing | backing_off | open | half_open | blocked (refused by the SSRF policy since its last success, nothing sent) | disabled.';
COMMENT ON COLUMN nats_endpoint_health.last_error IS
    'The last failure''s error while it is newer than the last success; for a blocked endpoint, the refusal.';

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (18, 'endpoint_blocked');
