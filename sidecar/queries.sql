-- Runtime queries of the sidecar, loaded by name (sidecar/queries.py).
-- Each query starts with a line "-- name: <query_name>". Parameters are %(name)s placeholders.

-- name: migrations_table_exists
SELECT to_regclass('public.rule_nats_schema_migrations') IS NOT NULL AS present;

-- name: applied_migrations
SELECT version, name, checksum FROM public.rule_nats_schema_migrations ORDER BY version;

-- name: migration_lock
SELECT pg_advisory_lock(hashtext('rule_nats_schema_migrations'));

-- name: migration_unlock
SELECT pg_advisory_unlock(hashtext('rule_nats_schema_migrations'));

-- name: migration_recorded
SELECT count(*) AS n FROM public.rule_nats_schema_migrations WHERE version = %(version)s;

-- name: uninstall_present
SELECT to_regprocedure('rule_nats_private.uninstall()') IS NOT NULL;

-- name: uninstall
SELECT rule_nats_private.uninstall();

-- name: isolation_present
SELECT to_regprocedure('rule_nats_private.isolate()') IS NOT NULL;

-- name: isolation_apply
SELECT rule_nats_private.isolate();

-- name: migration_set_checksum
UPDATE public.rule_nats_schema_migrations SET checksum = %(checksum)s WHERE version = %(version)s;

-- name: definitions_table_exists
SELECT to_regclass('public.rule_nats_schema_definitions') IS NOT NULL AS present;

-- name: applied_definitions
SELECT filename, checksum FROM public.rule_nats_schema_definitions ORDER BY filename;

-- name: definition_recorded
SELECT count(*) AS n FROM public.rule_nats_schema_definitions WHERE filename = %(filename)s AND checksum IS NULL;

-- name: definition_set_checksum
UPDATE public.rule_nats_schema_definitions SET checksum = %(checksum)s WHERE filename = %(filename)s;

-- name: definitions_forget
DELETE FROM public.rule_nats_schema_definitions WHERE filename = ANY(%(filenames)s);

-- name: public_roles_missing
-- The public role names an installation with roles of its own grants to (the migrations and
-- definition files do; isolate() moves the grants), when a database dropped them: the cluster's
-- first installation was uninstalled.
SELECT 'rule_nats_' || k AS rolname
  FROM unnest(ARRAY['admin', 'monitor', 'worker', 'publisher', 'failure_writer']) k
 WHERE (SELECT role_suffix FROM public.rule_nats_installation_roles) IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = 'rule_nats_' || k);

-- name: installation_role_suffix
SELECT role_suffix FROM public.rule_nats_installation_roles;

-- name: nats_config_all
SELECT config_name, nats_url, nats_cluster_urls, auth_type, nats_user, nats_password, auth_token,
       auth_credentials_file, auth_nkey_seed, tls_enabled, tls_ca_file, tls_cert_file, tls_key_file,
       auth_credentials, tls_ca_pem, tls_cert_pem, tls_key_pem,
       connect_timeout_seconds::float8 AS connect_timeout_seconds,
       request_timeout_seconds::float8 AS request_timeout_seconds,
       reconnect_wait_seconds::float8 AS reconnect_wait_seconds, max_reconnect_attempts
  FROM public.rule_nats_config
 ORDER BY config_name;

-- name: worker_register
INSERT INTO public.rule_nats_workers (worker_name, hostname, pid, version, started_at, last_heartbeat, stopped_at,
                                      heartbeat_interval_seconds, last_activity_at, messages_delivered,
                                      messages_failed, in_flight, consumers)
VALUES (%(worker_name)s, %(hostname)s, %(pid)s, %(version)s, now(), now(), NULL, %(interval)s, NULL, 0, 0, 0, '{}')
ON CONFLICT (worker_name) DO UPDATE SET
    hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, version = EXCLUDED.version,
    started_at = now(), last_heartbeat = now(), stopped_at = NULL,
    heartbeat_interval_seconds = EXCLUDED.heartbeat_interval_seconds, last_activity_at = NULL,
    messages_delivered = 0, messages_failed = 0, in_flight = 0, consumers = '{}',
    problems = '{}', nats_down = '{}';  -- the previous run's, until the first heartbeat says otherwise

-- name: worker_heartbeat
UPDATE public.rule_nats_workers
   SET last_heartbeat = now(),
       last_activity_at = CASE WHEN %(active)s THEN now() ELSE last_activity_at END,
       messages_delivered = %(delivered)s, messages_failed = %(failed)s, in_flight = %(in_flight)s,
       consumers = %(consumers)s, problems = %(problems)s, nats_down = %(nats_down)s
 WHERE worker_name = %(worker_name)s;

-- name: live_workers
-- Live sidecars that run at least one of the given consumers (this one included): each takes an
-- equal share of the endpoints' rate and concurrency limits.
SELECT count(*) AS workers
  FROM public.rule_nats_workers
 WHERE stopped_at IS NULL
   AND last_heartbeat > now() - make_interval(secs => 2 + 3 * heartbeat_interval_seconds)
   AND (worker_name = %(worker_name)s OR consumers && %(consumers)s::text[]);

-- name: backlog
-- Every heartbeat: exact up to 10,000 rows each (a bounded scan, an index for the outbox's), and
-- PostgreSQL's estimate from the last ANALYZE beyond (never less than 10,000): a count(*) of the
-- whole backlog would take longer the larger the backlog it reports.
WITH capped AS MATERIALIZED (
    SELECT (SELECT count(*) FROM (SELECT FROM public.rule_nats_retries LIMIT 10000) r) AS retries,
           (SELECT count(*) FROM (SELECT FROM public.rule_nats_outbox WHERE status = 'pending' LIMIT 10000) p)
               AS pending,
           (SELECT count(*) FROM (SELECT FROM public.rule_nats_outbox WHERE status = 'failed' LIMIT 10000) f)
               AS failed
), estimated AS (
    SELECT max(c.reltuples) FILTER (WHERE c.oid = 'public.rule_nats_retries'::regclass)::bigint AS retries,
           max(c.reltuples) FILTER (WHERE c.oid = 'public.rule_nats_outbox_pending_idx'::regclass)::bigint AS pending,
           max(c.reltuples) FILTER (WHERE c.oid = 'public.rule_nats_outbox_failed_idx'::regclass)::bigint AS failed
      FROM pg_catalog.pg_class c
     WHERE c.oid IN ('public.rule_nats_retries'::regclass, 'public.rule_nats_outbox_pending_idx'::regclass,
                     'public.rule_nats_outbox_failed_idx'::regclass)
)
SELECT CASE WHEN c.retries < 10000 THEN c.retries ELSE greatest(c.retries, e.retries) END AS retries_waiting,
       CASE WHEN c.pending < 10000 THEN c.pending ELSE greatest(c.pending, e.pending) END AS outbox_pending,
       CASE WHEN c.failed < 10000 THEN c.failed ELSE greatest(c.failed, e.failed) END AS outbox_failed
  FROM capped c, estimated e;

-- name: retention_settings
SELECT attempts_days, publish_history_days, dead_letters_days, stats_days, batch_size, run_every_seconds,
       extract(epoch FROM now() - last_run_at)::float8 AS seconds_since_run
  FROM public.rule_nats_retention;

-- name: history_partitions
-- The days ahead of the partitioned history tables (sql/0019); how many partitions were made.
SELECT public.rule_nats_history_partitions() AS made;

-- name: retention_lock
SELECT pg_try_advisory_lock(hashtext('rule_nats_retention')) AS locked;

-- name: retention_unlock
SELECT pg_advisory_unlock(hashtext('rule_nats_retention'));

-- name: purge_batch
-- Age and batch size come from rule_nats_retention inside the function: the worker cannot choose
-- what to delete (0 when that kind is kept for ever).
SELECT public.rule_nats_purge_due(%(what)s) AS deleted;

-- name: retention_done
UPDATE public.rule_nats_retention SET last_run_at = now(), last_result = %(result)s::jsonb;

-- name: worker_stopped
UPDATE public.rule_nats_workers SET last_heartbeat = now(), stopped_at = now() WHERE worker_name = %(worker_name)s;

-- name: adopt_consumer
-- Inserts the rows when missing (never changes one), with what JetStream already has (NULL: defaults).
SELECT public.rule_nats_adopt_consumer(%(stream_name)s, %(subject)s, %(consumer_name)s, %(batch_size)s,
                                       %(config_name)s, %(stream)s, %(consumer)s);

-- name: outbox_claim_plan
-- After a burst of inserts the table's statistics are stale and the planner sorts every
-- pending row to find the oldest few (45 ms for 50,000 rows instead of 1 ms): walk the
-- partial index in order instead.
SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off;

-- name: outbox_claim
-- Rows other relays hold are skipped, so several sidecars relay at once without double work.
SELECT outbox_id, config_name, webhook_id, subject, coalesce(payload_raw, convert_to(payload::text, 'UTF8')) AS payload,
       headers, message_id, attempts
  FROM public.rule_nats_outbox
 WHERE status = 'pending' AND next_attempt_at <= now()
 ORDER BY outbox_id
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED;

-- name: outbox_done
-- Published rows leave the outbox (their record is the history row written here); rows that
-- failed for good or must wait stay, with the reason. One statement, one pass over the batch.
-- Rows refused before publishing (history = false) were never sent: no history row.
WITH r AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(streams)s::text[], %(seqs)s::bigint[],
                         %(duplicates)s::boolean[], %(errors)s::text[], %(delays)s::float8[],
                         %(latencies)s::float8[], %(history)s::boolean[])
           AS r(outbox_id, status, stream_name, seq, duplicate, error, delay, latency_ms, history)
), published AS (
    DELETE FROM public.rule_nats_outbox o
     USING r
     WHERE o.outbox_id = r.outbox_id AND r.status = 'published'
    RETURNING o.*
), kept AS (
    UPDATE public.rule_nats_outbox o
       SET status          = r.status,
           attempts        = o.attempts + 1,
           error_message   = r.error,
           next_attempt_at = now() + make_interval(secs => r.delay)
      FROM r
     WHERE o.outbox_id = r.outbox_id AND r.status <> 'published'
    RETURNING o.*
)
INSERT INTO public.rule_nats_publish_history
    (config_name, webhook_id, subject, payload, headers, message_id, stream_name, sequence_number, duplicate,
     success, error_message, latency_ms, triggered_by)
SELECT o.config_name, o.webhook_id, o.subject, o.payload,
       (SELECT jsonb_object_agg(k, CASE WHEN k ~* '(authorization|cookie|token|secret|password|passwd|api[-_]?key|signature)'
                                        THEN '"***"'::jsonb ELSE v END)
          FROM jsonb_each(o.headers) AS h(k, v)),
       o.message_id, r.stream_name, r.seq, coalesce(r.duplicate, false), r.status = 'published', r.error,
       r.latency_ms, 'outbox'
  FROM (SELECT * FROM published UNION ALL SELECT * FROM kept) o
  JOIN r USING (outbox_id)
 WHERE r.history;

-- name: streams_all
SELECT stream_name, config_name, subjects, storage_type, retention_policy, max_messages, max_bytes,
       max_age_seconds::float8 AS max_age_seconds, max_message_size, discard_policy, replicas,
       duplicate_window_seconds::float8 AS duplicate_window_seconds, description, enabled, adopted_config
  FROM public.rule_nats_streams
 ORDER BY stream_name;

-- name: consumers_all
SELECT consumer_id, stream_name, consumer_name, filter_subject, batch_size, max_deliver,
       ack_wait_seconds::float8 AS ack_wait_seconds, max_ack_pending, deliver_policy, retry_max_attempts,
       retry_initial_seconds::float8 AS retry_initial_seconds,
       retry_max_backoff_seconds::float8 AS retry_max_backoff_seconds,
       retry_max_age_seconds::float8 AS retry_max_age_seconds, enabled, adopted_config
  FROM public.rule_nats_consumers
 ORDER BY consumer_id;

-- name: webhooks_all
SELECT webhook_id, webhook_name, url, method, headers, timeout_seconds::float8 AS timeout_seconds,
       retry_max_attempts, retry_initial_seconds::float8 AS retry_initial_seconds,
       retry_max_backoff_seconds::float8 AS retry_max_backoff_seconds,
       retry_max_age_seconds::float8 AS retry_max_age_seconds, enabled, allow_networks, https_only,
       max_concurrency, rate_limit_per_second::float8 AS rate_limit_per_second, circuit_failure_threshold,
       circuit_open_seconds::float8 AS circuit_open_seconds,
       disable_after_seconds::float8 AS disable_after_seconds, disabled_reason, nats_subject, nats_enabled
  FROM public.rule_webhooks
 ORDER BY webhook_id;

-- name: secrets_active
SELECT secret_id, webhook_id, secret, extract(epoch FROM expires_at)::float8 AS expires_at
  FROM public.rule_webhook_secrets
 WHERE expires_at IS NULL OR expires_at > now()
 ORDER BY secret_id;

-- name: delivery_settings
SELECT allow_networks, https_only, max_payload_bytes FROM public.rule_nats_delivery_settings;

-- name: endpoint_state_upsert
INSERT INTO public.rule_nats_endpoint_state AS s
    (webhook_id, circuit, consecutive_failures, failing_since, open_until, backoff_until, last_status,
     last_error, last_success_at, last_failure_at, worker_name, updated_at)
SELECT u.webhook_id, u.circuit, u.failures, to_timestamp(u.failing_since), to_timestamp(u.open_until),
       to_timestamp(u.backoff_until), u.status, left(u.error, 500), to_timestamp(u.success_at),
       to_timestamp(u.failure_at), %(worker)s, now()
  FROM unnest(%(ids)s::int[], %(circuits)s::text[], %(failures)s::int[], %(failing_since)s::float8[],
              %(open_until)s::float8[], %(backoff_until)s::float8[], %(statuses)s::int[], %(errors)s::text[],
              %(success_at)s::float8[], %(failure_at)s::float8[])
       AS u(webhook_id, circuit, failures, failing_since, open_until, backoff_until, status, error, success_at,
            failure_at)
 WHERE EXISTS (SELECT 1 FROM public.rule_webhooks w WHERE w.webhook_id = u.webhook_id)
ON CONFLICT (webhook_id) DO UPDATE
   SET circuit = excluded.circuit, consecutive_failures = excluded.consecutive_failures,
       failing_since = excluded.failing_since, open_until = excluded.open_until,
       backoff_until = excluded.backoff_until, last_status = coalesce(excluded.last_status, s.last_status),
       last_error = coalesce(excluded.last_error, s.last_error),
       last_success_at = coalesce(excluded.last_success_at, s.last_success_at),
       last_failure_at = coalesce(excluded.last_failure_at, s.last_failure_at),
       worker_name = excluded.worker_name, updated_at = now();

-- name: endpoint_disable
SELECT public.rule_nats_endpoint_disable(%(webhook_id)s, %(reason)s) AS disabled;

-- name: retries_insert
-- One row per message and consumer (unique index rule_nats_retries_message_key): a message that
-- comes back keeps the row it has, with its schedule and lease.
INSERT INTO public.rule_nats_retries
    (message_id, stream_name, consumer_name, stream_seq, subject, message_raw, message_headers, attempts,
     first_attempt_at, last_error, next_attempt_at, webhook_id)
SELECT * FROM unnest(%(message_id)s::text[], %(stream_name)s::text[], %(consumer_name)s::text[],
                     %(stream_seq)s::bigint[], %(subject)s::text[], %(message_raw)s::bytea[],
                     %(message_headers)s::jsonb[], %(attempts)s::int[], %(first_attempt_at)s::timestamptz[],
                     %(last_error)s::text[], %(next_attempt_at)s::timestamptz[], %(webhook_id)s::int[])
ON CONFLICT (stream_name, consumer_name, stream_seq) DO NOTHING;

-- name: retries_update
-- Only the worker holding the lease reschedules (and lets go of) a retry: after its lease expired
-- another worker may have taken the row over.
UPDATE public.rule_nats_retries r
   SET attempts = u.attempts, next_attempt_at = u.next_at, last_error = coalesce(u.error, r.last_error),
       leased_until = NULL, leased_by = NULL
  FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(next)s::timestamptz[], %(errors)s::text[])
       AS u(retry_id, attempts, next_at, error)
 WHERE r.retry_id = u.retry_id AND r.leased_by = %(worker)s;

-- name: retries_release_mine
-- At start and at shutdown: retries this worker (by its name) took and did not finish are free at
-- once for any worker, instead of after their lease.
UPDATE public.rule_nats_retries
   SET leased_until = NULL, leased_by = NULL, next_attempt_at = least(next_attempt_at, now())
 WHERE leased_by = %(worker)s;

-- name: retries_delete
DELETE FROM public.rule_nats_retries WHERE retry_id = ANY(%(ids)s::bigint[]);

-- name: retries_release
-- Deliveries held for endpoints a worker has just seen enabled again are due now. The SQL trigger
-- does the same when the endpoint is enabled; this catches deliveries held again in between by a
-- worker that had not reloaded yet.
UPDATE public.rule_nats_retries
   SET next_attempt_at = now()
 WHERE webhook_id = ANY(%(ids)s::int[]) AND next_attempt_at > now()
   AND (leased_until IS NULL OR leased_until < now());

-- name: retries_claim
-- Due retries of the consumers this worker runs, leased so that no other worker takes them;
-- a worker that dies leaves the lease to expire.
-- A leased row's next_attempt_at moves to the lease's end: the rows in flight leave the due range
-- of the index (stream, consumer, next_attempt_at) instead of being read again by every claim, and
-- come back due by themselves if their worker dies.
UPDATE public.rule_nats_retries r
   SET leased_until = now() + make_interval(secs => %(lease)s), leased_by = %(worker)s,
       next_attempt_at = now() + make_interval(secs => %(lease)s)
 WHERE r.retry_id IN (
        SELECT retry_id FROM public.rule_nats_retries
         WHERE stream_name = %(stream)s AND consumer_name = %(consumer)s
           AND next_attempt_at <= now() AND (leased_until IS NULL OR leased_until < now())
         ORDER BY next_attempt_at
         LIMIT %(limit)s
           FOR UPDATE SKIP LOCKED)
RETURNING retry_id, message_id, stream_seq, subject, message_raw, message_headers, attempts, webhook_id,
          extract(epoch FROM first_attempt_at)::float8 AS first_attempt_at;

-- name: dead_letter_insert
INSERT INTO public.rule_nats_dead_letters
    (message_id, stream_name, consumer_name, stream_seq, subject, webhook_id, url, message_raw, message_headers,
     reason, error, attempts, first_attempt_at, last_attempt_at)
VALUES (%(message_id)s, %(stream_name)s, %(consumer_name)s, %(stream_seq)s, %(subject)s, %(webhook_id)s, %(url)s,
        %(message_raw)s, %(message_headers)s::jsonb, %(reason)s, %(error)s, %(attempts)s, %(first_attempt_at)s,
        %(last_attempt_at)s);

-- name: history_routes
-- The route ids of new (stream, consumer, worker, URL) combinations of delivery history
-- (sidecar/history_ids.py); made when new, committed on their own before rows use them.
SELECT k.s, k.c, k.w, k.u, public.rule_nats_history_route_id(k.s, k.c, k.w, k.u) AS route_id
  FROM unnest(%(streams)s::text[], %(consumers)s::text[], %(workers)s::text[], %(urls)s::text[]) AS k(s, c, w, u);

-- name: recording_failures
-- Consumers (stream, consumer) and webhooks (id) whose delivered attempts are counted, not kept
-- as rows (recording = 'failures', sql/0019).
SELECT stream_name, consumer_name, NULL::integer AS webhook_id FROM public.rule_nats_consumers
 WHERE recording = 'failures'
UNION ALL
SELECT NULL, NULL, webhook_id FROM public.rule_webhooks WHERE recording = 'failures';

-- name: count_successes
-- Delivered attempts kept as counts only: counted as their rows would have been.
SELECT public.rule_nats_count_successes(%(at)s::timestamptz[], %(route)s::integer[], %(subject)s::text[],
                                        %(webhook)s::integer[], %(latency_us)s::integer[]);

-- name: outcome_recorded
-- A redelivered message that already has a final or scheduled outcome only needs its ack. A
-- deferred message has no attempt row, only its row in the retry table.
SELECT EXISTS (SELECT 1 FROM public.rule_nats_delivery_attempts
                WHERE stream_name = %(stream)s AND consumer_name = %(consumer)s AND stream_seq = %(seq)s
                  AND message_id = %(message_id)s)
    OR EXISTS (SELECT 1 FROM public.rule_nats_retries
                WHERE stream_name = %(stream)s AND consumer_name = %(consumer)s AND stream_seq = %(seq)s
                  AND message_id = %(message_id)s) AS done;

-- name: stats_update
-- Counts since the last report: the database adds them (counters never go down on a restart).
-- In the original's meaning (sidecar/stats.py): delivered = processed, acked = delivered successfully.
SELECT public.rule_nats_consumer_add_stats(%(stream)s, %(consumer)s, %(worker)s, %(delivered)s, %(acked)s,
                                           %(failed)s, %(redelivered)s, %(pending)s, %(avg_ms)s, %(active)s,
                                           %(nats_acks)s, %(avg_ack_ms)s, %(queue_group)s, %(max_deliver)s);

-- name: stream_state_upsert
INSERT INTO public.rule_nats_stream_state AS s
    (stream_name, config_name, present, last_error, storage_type, subjects, messages, bytes, first_seq, last_seq,
     consumer_count, max_age_seconds, max_bytes, max_messages, replicas, reported_by, updated_at)
VALUES (%(stream_name)s, %(config_name)s, %(present)s, %(last_error)s, %(storage_type)s, %(subjects)s,
        %(messages)s, %(bytes)s, %(first_seq)s, %(last_seq)s, %(consumer_count)s, %(max_age_seconds)s, %(max_bytes)s, %(max_messages)s,
        %(replicas)s, %(worker)s, now())
ON CONFLICT (stream_name) DO UPDATE SET
    config_name = EXCLUDED.config_name, present = EXCLUDED.present, last_error = EXCLUDED.last_error,
    storage_type = coalesce(EXCLUDED.storage_type, s.storage_type), subjects = coalesce(EXCLUDED.subjects, s.subjects),
    messages = EXCLUDED.messages, bytes = EXCLUDED.bytes, first_seq = EXCLUDED.first_seq,
    last_seq = EXCLUDED.last_seq, consumer_count = EXCLUDED.consumer_count, reported_by = EXCLUDED.reported_by,
    max_age_seconds = coalesce(EXCLUDED.max_age_seconds, s.max_age_seconds),
    max_bytes = coalesce(EXCLUDED.max_bytes, s.max_bytes), max_messages = coalesce(EXCLUDED.max_messages, s.max_messages),
    replicas = coalesce(EXCLUDED.replicas, s.replicas), updated_at = now();

-- name: stream_state_observe
-- Periodic observation: numbers and presence. What the last reconcile learned stays: JetStream's
-- refusal of a change, and, for a stream it could not create (e.g. subjects overlapping another
-- stream's, err 10065), JetStream's own reason rather than "does not exist".
INSERT INTO public.rule_nats_stream_state AS s
    (stream_name, config_name, present, last_error, storage_type, subjects, messages, bytes, first_seq, last_seq,
     consumer_count, max_age_seconds, max_bytes, max_messages, replicas, reported_by, updated_at)
VALUES (%(stream_name)s, %(config_name)s, %(present)s, %(last_error)s, %(storage_type)s, %(subjects)s,
        %(messages)s, %(bytes)s, %(first_seq)s, %(last_seq)s, %(consumer_count)s, %(max_age_seconds)s, %(max_bytes)s, %(max_messages)s,
        %(replicas)s, %(worker)s, now())
ON CONFLICT (stream_name) DO UPDATE SET
    present = EXCLUDED.present,
    last_error = CASE WHEN EXCLUDED.present AND s.present THEN s.last_error
                      WHEN NOT EXCLUDED.present AND NOT s.present THEN coalesce(s.last_error, EXCLUDED.last_error)
                      ELSE EXCLUDED.last_error END,
    storage_type = coalesce(EXCLUDED.storage_type, s.storage_type), subjects = coalesce(EXCLUDED.subjects, s.subjects),
    messages = EXCLUDED.messages, bytes = EXCLUDED.bytes, first_seq = EXCLUDED.first_seq,
    last_seq = EXCLUDED.last_seq, consumer_count = EXCLUDED.consumer_count, reported_by = EXCLUDED.reported_by,
    max_age_seconds = coalesce(EXCLUDED.max_age_seconds, s.max_age_seconds),
    max_bytes = coalesce(EXCLUDED.max_bytes, s.max_bytes), max_messages = coalesce(EXCLUDED.max_messages, s.max_messages),
    replicas = coalesce(EXCLUDED.replicas, s.replicas), updated_at = now();

-- name: consumer_state_upsert
INSERT INTO public.rule_nats_consumer_state AS c
    (stream_name, consumer_name, present, last_error, filter_subject, num_pending, num_ack_pending,
     num_redelivered, num_waiting, reported_by, updated_at)
VALUES (%(stream_name)s, %(consumer_name)s, %(present)s, %(last_error)s, %(filter_subject)s, %(num_pending)s,
        %(num_ack_pending)s, %(num_redelivered)s, %(num_waiting)s, %(worker)s, now())
ON CONFLICT (stream_name, consumer_name) DO UPDATE SET
    present = EXCLUDED.present, last_error = EXCLUDED.last_error, filter_subject = EXCLUDED.filter_subject,
    num_pending = EXCLUDED.num_pending, num_ack_pending = EXCLUDED.num_ack_pending,
    num_redelivered = EXCLUDED.num_redelivered, num_waiting = EXCLUDED.num_waiting,
    reported_by = EXCLUDED.reported_by, updated_at = now();

-- name: status_connections
SELECT config_name, nats_url, nats_cluster_urls, auth_type, publish_registered_subjects_only
  FROM public.rule_nats_config
 ORDER BY config_name;

-- name: status_workers
SELECT worker_name, status, hostname, pid, heartbeat_age_seconds, in_flight, messages_delivered,
       messages_failed, consumers, problems
  FROM public.nats_worker_status
 ORDER BY status, worker_name;

-- name: status_streams
SELECT stream_name, status, messages, bytes, first_seq, last_seq, consumer_count, age_seconds, last_error
  FROM public.nats_stream_status
 ORDER BY stream_name;

-- name: status_consumers
SELECT stream_name, consumer_name, status, lag, num_ack_pending, num_redelivered, workers, per_second_5m,
       delivered_1h, failed_1h, configured_filter, actual_filter, age_seconds, last_error
  FROM public.nats_consumer_status
 ORDER BY stream_name, consumer_name;

-- name: status_endpoints
-- The view says 'blocked' for an endpoint whose messages the SSRF policy refused since its last
-- success (0018), with the refusal as its last error.
SELECT h.webhook_id, h.webhook_name, h.status, h.consecutive_failures, h.success_rate_1h, h.attempts_1h,
       h.waiting, h.last_status, h.last_error, h.disabled_reason
  FROM public.nats_endpoint_health h
 ORDER BY h.webhook_id;

-- name: status_recent_failures
SELECT failed_at, source, webhook_name, consumer_name, http_status, attempt, outcome, error_message,
       message_id
  FROM public.nats_recent_failures
 LIMIT %(limit)s;

-- name: webhook_by_id
-- A message names a webhook the registry in memory lacks (inserted since the last reload): its row,
-- as webhooks_all reads it, before anything is dead-lettered unknown_webhook.
SELECT webhook_id, webhook_name, url, method, headers, timeout_seconds::float8 AS timeout_seconds,
       retry_max_attempts, retry_initial_seconds::float8 AS retry_initial_seconds,
       retry_max_backoff_seconds::float8 AS retry_max_backoff_seconds,
       retry_max_age_seconds::float8 AS retry_max_age_seconds, enabled, allow_networks, https_only,
       max_concurrency, rate_limit_per_second::float8 AS rate_limit_per_second, circuit_failure_threshold,
       circuit_open_seconds::float8 AS circuit_open_seconds,
       disable_after_seconds::float8 AS disable_after_seconds, disabled_reason, nats_subject, nats_enabled
  FROM public.rule_webhooks
 WHERE webhook_id = %(webhook_id)s;

-- name: webhooks_on_subject
-- A message names no endpoint and the registry in memory has no webhook on its subject (one may have
-- been inserted since the last reload): the rows routing by subject would use, read before anything
-- is dead-lettered missing_webhook_url. The same columns as webhook_by_id.
SELECT webhook_id, webhook_name, url, method, headers, timeout_seconds::float8 AS timeout_seconds,
       retry_max_attempts, retry_initial_seconds::float8 AS retry_initial_seconds,
       retry_max_backoff_seconds::float8 AS retry_max_backoff_seconds,
       retry_max_age_seconds::float8 AS retry_max_age_seconds, enabled, allow_networks, https_only,
       max_concurrency, rate_limit_per_second::float8 AS rate_limit_per_second, circuit_failure_threshold,
       circuit_open_seconds::float8 AS circuit_open_seconds,
       disable_after_seconds::float8 AS disable_after_seconds, disabled_reason, nats_subject, nats_enabled
  FROM public.rule_webhooks
 WHERE nats_subject = %(subject)s
 ORDER BY webhook_id;

-- name: secrets_of_webhook
SELECT secret_id, webhook_id, secret, extract(epoch FROM expires_at)::float8 AS expires_at
  FROM public.rule_webhook_secrets
 WHERE webhook_id = %(webhook_id)s AND (expires_at IS NULL OR expires_at > now())
 ORDER BY secret_id;

-- name: watch_consumers
-- `status --watch`, per consumer: delivered per second over the last 10 s (the attempts recorded),
-- lag (stream messages not yet delivered), in flight (JetStream's ack pending) and retries waiting.
SELECT c.stream_name, c.consumer_name, c.status,
       round(coalesce(a.delivered, 0) / 10.0, 1)             AS delivered_per_s,
       coalesce(a.failed, 0)                                  AS failed_10s,
       c.lag,
       c.num_ack_pending                                      AS in_flight,
       coalesce(r.waiting, 0)                                 AS retries,
       c.workers
  FROM public.nats_consumer_status c
  LEFT JOIN (SELECT stream_name, consumer_name, count(*) AS waiting
               FROM public.rule_nats_retries GROUP BY 1, 2) r USING (stream_name, consumer_name)
  LEFT JOIN (SELECT stream_name, consumer_name,
                    count(*) FILTER (WHERE outcome = 'delivered') AS delivered,
                    count(*) FILTER (WHERE outcome <> 'delivered') AS failed
               FROM public.rule_nats_delivery_attempts
              WHERE attempted_at > now() - interval '10 seconds'
              GROUP BY 1, 2) a USING (stream_name, consumer_name)
 ORDER BY c.stream_name, c.consumer_name;

-- name: watch_latency
-- `status --watch`, per endpoint: response time percentiles of the last 5 minutes' answered requests.
SELECT webhook_id,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)::numeric, 1)  AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)::numeric, 1) AS p95_ms,
       count(*)                                                                    AS requests_5m
  FROM public.rule_nats_delivery_attempts
 WHERE attempted_at > now() - interval '5 minutes' AND latency_ms IS NOT NULL AND webhook_id IS NOT NULL
 GROUP BY webhook_id;

-- name: watch_circuits
SELECT webhook_id, circuit FROM public.nats_endpoint_health;
