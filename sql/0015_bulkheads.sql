-- 0015_bulkheads: bounds for every duration, rate and count of the registry (issue 19, defect 5).
--
--  * Every setting the sidecar turns into a time, a rate or a count has a sane range, checked when a
--    row is written: an ack wait of 1e-9 s sent every message 20 times, retry_initial_seconds = 1e300
--    and rate_limit_per_second = 1e-300 made the worker fail inside delivery.
--  * Rows already outside a new range are CLAMPED to it first (an UPDATE to the nearest bound), then
--    the constraints are added VALID. Chosen over NOT VALID: a NOT VALID constraint leaves the absurd
--    value in force for the worker, and makes any later UPDATE of the row (even of another column,
--    e.g. enabling the webhook) fail until someone repairs it. A clamped value is what the sidecar
--    would use anyway (it clamps every value it reads to the same ranges, sidecar/bounds.py); a
--    NOTICE says how many rows of which table were clamped.
--  * The constraints are named "<column>: <range>", so the error says what is allowed. Superseded
--    constraints of earlier migrations (CHECKs on that column alone, a looser range) are dropped;
--    CHECKs that relate two columns (retry_max_backoff_seconds >= retry_initial_seconds) stay.
--

CREATE FUNCTION pg_temp.clamp(p_table text, p_column text, p_lo numeric, p_hi numeric)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format(
        'UPDATE public.%I SET %I = least(greatest(%I, $1), $2) WHERE %I < $1 OR %I > $2',
        p_table, p_column, p_column, p_column, p_column, p_column
    ) USING p_lo, p_hi;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        RAISE NOTICE '0015: % row(s) of % had % outside [%, %]; clamped to the range', n, p_table, p_column, p_lo, p_hi;
    END IF;
END
$$;

-- Clamp, drop the column's own earlier range CHECKs, add the new one: bound(table, column, lo, hi, name).
CREATE FUNCTION pg_temp.bound(p_table text, p_column text, p_lo numeric, p_hi numeric, p_name text)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    c record;
BEGIN
    PERFORM pg_temp.clamp(p_table, p_column, p_lo, p_hi);
    FOR c IN
        SELECT con.conname
          FROM pg_catalog.pg_constraint con
          JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attname = p_column
         WHERE con.conrelid = format('public.%I', p_table)::regclass
           AND con.contype = 'c'
           AND con.conkey = ARRAY[a.attnum]
    LOOP
        EXECUTE format('ALTER TABLE public.%I DROP CONSTRAINT %I', p_table, c.conname);
    END LOOP;
    EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I CHECK (%I BETWEEN %s AND %s)',
                   p_table, p_name, p_column, p_lo, p_hi);
END
$$;

SELECT pg_temp.bound('rule_nats_config', 'connect_timeout_seconds', 0.1, 60, 'connect_timeout_seconds: 0.1 to 60');
SELECT pg_temp.bound('rule_nats_config', 'request_timeout_seconds', 0.1, 300, 'request_timeout_seconds: 0.1 to 300');
SELECT pg_temp.bound('rule_nats_config', 'reconnect_wait_seconds', 0, 3600, 'reconnect_wait_seconds: 0 to 3600');
SELECT pg_temp.bound('rule_nats_config', 'max_reconnect_attempts', -1, 1000000,
                     'max_reconnect_attempts: -1 (forever) or 0 to 1000000');

SELECT pg_temp.bound('rule_nats_streams', 'max_age_seconds', 0, 3153600000,
                     'max_age_seconds: 0 (unlimited) or up to 3153600000 (100 years)');
SELECT pg_temp.bound('rule_nats_streams', 'duplicate_window_seconds', 0, 604800,
                     'duplicate_window_seconds: 0 to 604800 (7 days)');

-- The ack wait need not exceed a webhook's timeout_seconds: while its request runs, the sidecar tells
-- JetStream the message is in progress every ack_wait/3. It must leave room for that signal: >= 1 s.
SELECT pg_temp.bound('rule_nats_consumers', 'ack_wait_seconds', 1, 43200, 'ack_wait_seconds: 1 to 43200 (12 hours)');
SELECT pg_temp.clamp('rule_nats_consumers', 'max_deliver', -1, 1000000);
SELECT pg_temp.clamp('rule_nats_consumers', 'max_ack_pending', -1, 1000000);
ALTER TABLE rule_nats_consumers
    ADD CONSTRAINT "max_deliver: at most 1000000" CHECK (max_deliver <= 1000000),
    ADD CONSTRAINT "max_ack_pending: at most 1000000" CHECK (max_ack_pending <= 1000000);
SELECT pg_temp.bound('rule_nats_consumers', 'retry_max_attempts', 1, 1000, 'retry_max_attempts: 1 to 1000');
SELECT pg_temp.bound('rule_nats_consumers', 'retry_initial_seconds', 0.1, 86400,
                     'retry_initial_seconds: 0.1 to 86400 (a day)');
SELECT pg_temp.bound('rule_nats_consumers', 'retry_max_backoff_seconds', 0.1, 604800,
                     'retry_max_backoff_seconds: 0.1 to 604800 (7 days)');
SELECT pg_temp.bound('rule_nats_consumers', 'retry_max_age_seconds', 1, 2592000,
                     'retry_max_age_seconds: 1 to 2592000 (30 days)');
UPDATE rule_nats_consumers SET retry_max_backoff_seconds = retry_initial_seconds
 WHERE retry_max_backoff_seconds < retry_initial_seconds;

-- rule_webhooks: NULL keeps meaning "the consumer's value", "no limit" or "never" (a BETWEEN of
-- NULL is NULL, which a CHECK lets pass).
SELECT pg_temp.bound('rule_webhooks', 'timeout_seconds', 0.1, 300, 'timeout_seconds: 0.1 to 300');
SELECT pg_temp.bound('rule_webhooks', 'retry_max_attempts', 1, 1000, 'retry_max_attempts: 1 to 1000');
SELECT pg_temp.bound('rule_webhooks', 'retry_initial_seconds', 0.1, 86400,
                     'retry_initial_seconds: 0.1 to 86400 (a day)');
SELECT pg_temp.bound('rule_webhooks', 'retry_max_backoff_seconds', 0.1, 604800,
                     'retry_max_backoff_seconds: 0.1 to 604800 (7 days)');
SELECT pg_temp.bound('rule_webhooks', 'retry_max_age_seconds', 1, 2592000,
                     'retry_max_age_seconds: 1 to 2592000 (30 days)');
SELECT pg_temp.bound('rule_webhooks', 'max_concurrency', 1, 10000, 'max_concurrency: 1 to 10000');
SELECT pg_temp.bound('rule_webhooks', 'rate_limit_per_second', 0.001, 100000,
                     'rate_limit_per_second: 0.001 to 100000');
SELECT pg_temp.bound('rule_webhooks', 'circuit_failure_threshold', 1, 10000,
                     'circuit_failure_threshold: 1 to 10000');
SELECT pg_temp.bound('rule_webhooks', 'circuit_open_seconds', 0.1, 3600, 'circuit_open_seconds: 0.1 to 3600');
SELECT pg_temp.bound('rule_webhooks', 'disable_after_seconds', 60, 31536000,
                     'disable_after_seconds: 60 to 31536000 (a year), or NULL (never)');

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (15, 'bulkheads');
