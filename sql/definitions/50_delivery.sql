-- sql/definitions/50_delivery.sql: the current definition of these objects (docs/schema.md).
--
-- What the sidecar and operators call around delivery: consumer registration and adoption,
-- per-worker counters, endpoint circuit breaker and enable/disable, signing secrets, dead-letter replay.
--
-- Re-applied by `webhook-worker migrate` when this file changes (and after every new numbered
-- migration), in one transaction with the other definition files, in file-name order. Edit in
-- place; never put tables, data or anything that is not safe to run twice here.

-- The original worker's 6-argument form: absolute values, no worker name.
CREATE OR REPLACE FUNCTION rule_nats_consumer_update_stats(
    p_stream_name             text,
    p_consumer_name           text,
    p_messages_delivered      bigint,
    p_messages_acknowledged   bigint,
    p_messages_pending        bigint,
    p_avg_processing_time_ms  numeric DEFAULT NULL
) RETURNS boolean
LANGUAGE sql
AS $$
    INSERT INTO rule_nats_consumer_stats AS s (
        stream_name, consumer_name, worker_name, messages_delivered, messages_acknowledged,
        messages_pending, avg_processing_time_ms, last_active_at, active)
    VALUES (p_stream_name, p_consumer_name, '', p_messages_delivered, p_messages_acknowledged,
            p_messages_pending, p_avg_processing_time_ms, now(), true)
    ON CONFLICT (stream_name, consumer_name, worker_name) DO UPDATE SET
        messages_delivered     = EXCLUDED.messages_delivered,
        messages_acknowledged  = EXCLUDED.messages_acknowledged,
        messages_pending       = EXCLUDED.messages_pending,
        avg_processing_time_ms = coalesce(EXCLUDED.avg_processing_time_ms, s.avg_processing_time_ms),
        last_active_at         = now(),
        active                 = true
    RETURNING true
$$;
REVOKE ALL ON FUNCTION rule_nats_consumer_update_stats(text, text, bigint, bigint, bigint, numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_consumer_update_stats(text, text, bigint, bigint, bigint, numeric) TO rule_nats_admin, rule_nats_worker;
COMMENT ON FUNCTION rule_nats_consumer_update_stats(text, text, bigint, bigint, bigint, numeric) IS
    'Compatibility form used by the original workers: sets absolute counters for (stream, consumer) without a worker name.';

-- The form the sidecar uses: per worker instance, absolute counters since the worker started.
CREATE OR REPLACE FUNCTION rule_nats_consumer_update_stats(
    p_stream_name             text,
    p_consumer_name           text,
    p_worker_name             text,
    p_messages_delivered      bigint,
    p_messages_acknowledged   bigint,
    p_messages_failed         bigint,
    p_messages_redelivered    bigint,
    p_messages_pending        bigint,
    p_avg_processing_time_ms  double precision,
    p_active                  boolean
) RETURNS boolean
LANGUAGE sql
AS $$
    INSERT INTO rule_nats_consumer_stats AS s (
        stream_name, consumer_name, worker_name, messages_delivered, messages_acknowledged,
        messages_failed, messages_redelivered, messages_pending, avg_processing_time_ms,
        last_active_at, active)
    VALUES (p_stream_name, p_consumer_name, coalesce(p_worker_name, ''), p_messages_delivered,
            p_messages_acknowledged, p_messages_failed, p_messages_redelivered, p_messages_pending,
            p_avg_processing_time_ms, now(), p_active)
    ON CONFLICT (stream_name, consumer_name, worker_name) DO UPDATE SET
        messages_delivered     = EXCLUDED.messages_delivered,
        messages_acknowledged  = EXCLUDED.messages_acknowledged,
        messages_failed        = EXCLUDED.messages_failed,
        messages_redelivered   = EXCLUDED.messages_redelivered,
        messages_pending       = EXCLUDED.messages_pending,
        avg_processing_time_ms = coalesce(EXCLUDED.avg_processing_time_ms, s.avg_processing_time_ms),
        last_active_at         = now(),
        active                 = EXCLUDED.active
    RETURNING true
$$;
REVOKE ALL ON FUNCTION rule_nats_consumer_update_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_consumer_update_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean) TO rule_nats_admin, rule_nats_worker;
COMMENT ON FUNCTION rule_nats_consumer_update_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean) IS
    'Sets the counters of one worker instance for (stream, consumer); called by the sidecar every few seconds and at shutdown (p_active false).';

CREATE OR REPLACE FUNCTION rule_nats_register_consumer(
    p_stream_name   text,
    p_subject       text,
    p_consumer_name text,
    p_batch_size    integer DEFAULT NULL,
    p_config_name   text DEFAULT 'default'
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id integer;
BEGIN
    INSERT INTO public.rule_nats_streams (stream_name, subjects, config_name, description)
    VALUES (p_stream_name, ARRAY[p_subject], p_config_name, 'Registered from the worker environment')
    ON CONFLICT (stream_name) DO NOTHING;

    INSERT INTO public.rule_nats_consumers (stream_name, consumer_name, filter_subject, queue_group,
                                            batch_size, description)
    VALUES (p_stream_name, p_consumer_name, p_subject, p_consumer_name, coalesce(p_batch_size, 10),
            'Registered from the worker environment')
    ON CONFLICT (stream_name, consumer_name) DO NOTHING
    RETURNING consumer_id INTO v_id;
    IF v_id IS NULL THEN
        SELECT c.consumer_id INTO v_id FROM public.rule_nats_consumers c
         WHERE c.stream_name = p_stream_name AND c.consumer_name = p_consumer_name;
    END IF;
    RETURN v_id;
END
$$;
ALTER FUNCTION rule_nats_register_consumer(text, text, text, integer, text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_register_consumer(text, text, text, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_register_consumer(text, text, text, integer, text) TO rule_nats_admin, rule_nats_worker;
COMMENT ON FUNCTION rule_nats_register_consumer(text, text, text, integer, text) IS
    'Creates the stream and the durable consumer for a worker started with STREAM_NAME/SUBJECT/QUEUE_GROUP when they '
    'are missing; returns consumer_id. Rows that exist are never changed: the registry is the DBA''s.';

-- A replay sends the dead letter's headers again, but none of the Nats-* ones: a message that
-- reached the stream with Nats-Rollup (from any publisher) must not purge it a second time.
CREATE OR REPLACE FUNCTION rule_nats_replay_dead_letter(p_dead_letter_id bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d public.rule_nats_dead_letters;
    v_outbox bigint;
BEGIN
    SELECT * INTO d FROM public.rule_nats_dead_letters WHERE dead_letter_id = p_dead_letter_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rule_nats_replay_dead_letter: no dead letter %', p_dead_letter_id
            USING ERRCODE = '22023', HINT = 'See SELECT dead_letter_id, reason FROM rule_nats_dead_letters.';
    END IF;
    INSERT INTO public.rule_nats_outbox (config_name, webhook_id, subject, payload_raw, headers, message_id)
    SELECT coalesce((SELECT s.config_name FROM public.rule_nats_streams s WHERE s.stream_name = d.stream_name), 'default'),
           d.webhook_id, d.subject, d.message_raw,
           coalesce((SELECT jsonb_object_agg(h.k, h.v) FROM jsonb_each(d.message_headers) AS h(k, v)
                      WHERE lower(h.k) NOT LIKE 'nats-%'
                        AND lower(h.k) NOT IN ('rule-nats-message-id', 'rule-nats-attempts')), '{}'::jsonb)
               || jsonb_build_object('Rule-Nats-Message-Id', d.message_id, 'Rule-Nats-Attempts', d.attempts::text),
           format('replay-%s-%s-%s-%s', (SELECT i.installation_id FROM public.rule_nats_installation i),
                  d.dead_letter_id, d.replay_count + 1, md5(gen_random_uuid()::text || gen_random_uuid()::text))
    RETURNING outbox_id INTO v_outbox;
    UPDATE public.rule_nats_dead_letters
       SET replayed = true, replayed_at = now(), replay_count = replay_count + 1
     WHERE dead_letter_id = p_dead_letter_id;
    RETURN v_outbox;
END
$$;
ALTER FUNCTION rule_nats_replay_dead_letter(bigint) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_replay_dead_letter(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_replay_dead_letter(bigint) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_replay_dead_letter(bigint) IS
    'Re-publishes a dead letter''s original bytes to its subject (through the outbox, after COMMIT) and marks it '
    'replayed; returns the outbox_id. The replay is the same message to the receiver: same webhook-id (the dead '
    'letter''s message_id), attempts recorded under the same message_id and numbered on from the dead letter''s.';

CREATE OR REPLACE FUNCTION rule_nats_replay_dead_letters(
    p_reason        text        DEFAULT NULL,
    p_webhook_id    integer     DEFAULT NULL,
    p_since         timestamptz DEFAULT NULL,
    p_until         timestamptz DEFAULT NULL,
    p_include_replayed boolean  DEFAULT false,
    p_limit         integer     DEFAULT 1000
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
    v_n integer := 0;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'rule_nats_replay_dead_letters: p_limit must be >= 1' USING ERRCODE = '22023';
    END IF;
    FOR v_id IN
        SELECT dead_letter_id FROM public.rule_nats_dead_letters
         WHERE (p_reason IS NULL OR reason = p_reason)
           AND (p_webhook_id IS NULL OR webhook_id = p_webhook_id)
           AND (p_since IS NULL OR created_at >= p_since)
           AND (p_until IS NULL OR created_at < p_until)
           AND (p_include_replayed OR NOT replayed)
         ORDER BY dead_letter_id
         LIMIT p_limit
    LOOP
        PERFORM public.rule_nats_replay_dead_letter(v_id);
        v_n := v_n + 1;
    END LOOP;
    RETURN v_n;
END
$$;
ALTER FUNCTION rule_nats_replay_dead_letters(text, integer, timestamp with time zone, timestamp with time zone, boolean, integer) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_replay_dead_letters(text, integer, timestamp with time zone, timestamp with time zone, boolean, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_replay_dead_letters(text, integer, timestamp with time zone, timestamp with time zone, boolean, integer) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_replay_dead_letters(text, integer, timestamptz, timestamptz, boolean, integer) IS
    'Replays the dead letters that match every given filter (reason, webhook, created between since and until; '
    'not yet replayed unless p_include_replayed), oldest first, at most p_limit; returns how many.';

-- Enabling an endpoint (by rule_nats_endpoint_enable() or a plain UPDATE) releases what it held and
-- forgets the failure streak that disabled it.
CREATE OR REPLACE FUNCTION rule_nats_webhook_enabled()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.enabled AND NOT OLD.enabled THEN
        NEW.disabled_at := NULL;
        NEW.disabled_reason := NULL;
        UPDATE public.rule_nats_retries SET next_attempt_at = now()
         WHERE webhook_id = NEW.webhook_id AND next_attempt_at > now()
           AND (leased_until IS NULL OR leased_until < now());
        UPDATE public.rule_nats_endpoint_state
           SET circuit = 'closed', consecutive_failures = 0, failing_since = NULL, open_until = NULL,
               backoff_until = NULL, updated_at = now()
         WHERE webhook_id = NEW.webhook_id;
        PERFORM pg_notify('rule_nats_endpoint_health',
                          json_build_object('webhook_id', NEW.webhook_id, 'event', 'enabled')::text);
    END IF;
    RETURN NEW;
END
$$;
ALTER FUNCTION rule_nats_webhook_enabled() OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_webhook_enabled() FROM PUBLIC;
COMMENT ON FUNCTION rule_nats_webhook_enabled() IS
    'Row trigger: when a webhook is enabled again, clear disabled_*, close its circuit, release its held deliveries.';

CREATE OR REPLACE FUNCTION rule_nats_endpoint_disable(p_webhook_id integer, p_reason text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_found boolean;
BEGIN
    UPDATE public.rule_webhooks
       SET enabled = false, disabled_at = now(), disabled_reason = left(p_reason, 500)
     WHERE webhook_id = p_webhook_id AND enabled
    RETURNING true INTO v_found;
    IF v_found THEN
        PERFORM pg_notify('rule_nats_endpoint_health',
                          json_build_object('webhook_id', p_webhook_id, 'event', 'disabled',
                                            'reason', left(p_reason, 500))::text);
    END IF;
    RETURN coalesce(v_found, false);
END
$$;
ALTER FUNCTION rule_nats_endpoint_disable(integer, text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_endpoint_disable(integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_endpoint_disable(integer, text) TO rule_nats_admin, rule_nats_worker;
COMMENT ON FUNCTION rule_nats_endpoint_disable(integer, text) IS
    'Disables an endpoint and records why (called by the sidecar on HTTP 410 or after disable_after_seconds of '
    'failure). Its deliveries are held, not dropped. NOTIFY rule_nats_endpoint_health. Returns false if it was '
    'already disabled.';

CREATE OR REPLACE FUNCTION rule_nats_endpoint_enable(p_webhook_id integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_found boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.rule_webhooks WHERE webhook_id = p_webhook_id) THEN
        RAISE EXCEPTION 'webhook % does not exist', p_webhook_id
            USING ERRCODE = 'no_data_found', HINT = 'SELECT webhook_id, webhook_name FROM rule_webhooks;';
    END IF;
    UPDATE public.rule_webhooks SET enabled = true WHERE webhook_id = p_webhook_id AND NOT enabled
    RETURNING true INTO v_found;
    RETURN coalesce(v_found, false);
END
$$;
ALTER FUNCTION rule_nats_endpoint_enable(integer) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_endpoint_enable(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_endpoint_enable(integer) TO rule_nats_admin;
COMMENT ON FUNCTION rule_nats_endpoint_enable(integer) IS
    'Re-enables a disabled endpoint: clears disabled_at/disabled_reason, closes its circuit and makes its held '
    'deliveries due now. Returns false if it was enabled already.';

CREATE OR REPLACE FUNCTION rule_webhook_secret_create(
    p_webhook_id integer,
    p_secret     text DEFAULT NULL,
    p_expires_at timestamptz DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_secret text := coalesce(p_secret, rule_nats_private.random_secret());
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.rule_webhooks WHERE webhook_id = p_webhook_id) THEN
        RAISE EXCEPTION 'webhook % does not exist', p_webhook_id
            USING ERRCODE = 'no_data_found', HINT = 'SELECT webhook_id, webhook_name FROM rule_webhooks;';
    END IF;
    INSERT INTO public.rule_webhook_secrets (webhook_id, secret, expires_at)
    VALUES (p_webhook_id, v_secret, p_expires_at);
    RETURN v_secret;
END
$$;
ALTER FUNCTION rule_webhook_secret_create(integer, text, timestamp with time zone) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_webhook_secret_create(integer, text, timestamp with time zone) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_webhook_secret_create(integer, text, timestamp with time zone) TO rule_nats_admin;
COMMENT ON FUNCTION rule_webhook_secret_create(integer, text, timestamptz) IS
    'Adds a signing secret to a webhook and returns it (generated: whsec_ + 32 random bytes, unless given). '
    'Every unexpired secret signs each delivery.';

-- Calls its sibling with search_path = pg_catalog, pg_temp: qualified.
CREATE OR REPLACE FUNCTION rule_webhook_secret_rotate(
    p_webhook_id integer,
    p_overlap    interval DEFAULT '24 hours',
    p_secret     text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_secret text;
BEGIN
    IF p_overlap < interval '0' THEN
        RAISE EXCEPTION 'overlap must not be negative'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'e.g. interval ''24 hours''';
    END IF;
    v_secret := public.rule_webhook_secret_create(p_webhook_id, p_secret);
    UPDATE public.rule_webhook_secrets
       SET expires_at = now() + p_overlap
     WHERE webhook_id = p_webhook_id AND secret <> v_secret
       AND (expires_at IS NULL OR expires_at > now() + p_overlap);
    RETURN v_secret;
END
$$;
ALTER FUNCTION rule_webhook_secret_rotate(integer, interval, text) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_webhook_secret_rotate(integer, interval, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_webhook_secret_rotate(integer, interval, text) TO rule_nats_admin;
COMMENT ON FUNCTION rule_webhook_secret_rotate(integer, interval, text) IS
    'Adds a new signing secret and lets the current ones expire after p_overlap: during the overlap every delivery '
    'carries both signatures, so receivers can switch without downtime. Returns the new secret.';

CREATE OR REPLACE FUNCTION rule_webhook_secret_revoke(p_webhook_id integer, p_secret_id bigint DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE public.rule_webhook_secrets
       SET expires_at = now()
     WHERE webhook_id = p_webhook_id AND (p_secret_id IS NULL OR secret_id = p_secret_id)
       AND (expires_at IS NULL OR expires_at > now());
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
ALTER FUNCTION rule_webhook_secret_revoke(integer, bigint) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_webhook_secret_revoke(integer, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_webhook_secret_revoke(integer, bigint) TO rule_nats_admin;
COMMENT ON FUNCTION rule_webhook_secret_revoke(integer, bigint) IS
    'Expires a webhook''s signing secrets now (one by secret_id, or all). Returns how many were revoked.';

CREATE OR REPLACE FUNCTION rule_nats_consumer_add_stats(
    p_stream_name            text,
    p_consumer_name          text,
    p_worker_name            text,
    p_delivered              bigint,
    p_acknowledged           bigint,
    p_failed                 bigint,
    p_redelivered            bigint,
    p_messages_pending       bigint,
    p_avg_processing_time_ms double precision,
    p_active                 boolean,
    p_nats_acks              bigint DEFAULT 0,
    p_avg_ack_time_ms        double precision DEFAULT NULL,
    p_queue_group            text DEFAULT NULL,
    p_max_deliver            integer DEFAULT NULL
) RETURNS boolean
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO public.rule_nats_consumer_stats AS s (
        stream_name, consumer_name, worker_name, messages_delivered, messages_acknowledged,
        messages_failed, messages_redelivered, messages_pending, avg_processing_time_ms,
        last_active_at, active, nats_acks, avg_ack_time_ms, queue_group, ack_policy, max_deliver)
    VALUES (p_stream_name, p_consumer_name, coalesce(p_worker_name, ''), greatest(p_delivered, 0),
            greatest(p_acknowledged, 0), greatest(p_failed, 0), greatest(p_redelivered, 0),
            coalesce(p_messages_pending, 0), round(least(p_avg_processing_time_ms, 99999999)::numeric, 2),
            now(), coalesce(p_active, true), greatest(coalesce(p_nats_acks, 0), 0),
            round(least(p_avg_ack_time_ms, 99999999)::numeric, 2), p_queue_group, 'explicit', p_max_deliver)
    ON CONFLICT (stream_name, consumer_name, worker_name) DO UPDATE SET
        messages_delivered     = s.messages_delivered + greatest(EXCLUDED.messages_delivered, 0),
        messages_acknowledged  = s.messages_acknowledged + greatest(EXCLUDED.messages_acknowledged, 0),
        messages_failed        = s.messages_failed + greatest(EXCLUDED.messages_failed, 0),
        messages_redelivered   = s.messages_redelivered + greatest(EXCLUDED.messages_redelivered, 0),
        nats_acks              = s.nats_acks + EXCLUDED.nats_acks,
        messages_pending       = EXCLUDED.messages_pending,
        avg_processing_time_ms = coalesce(EXCLUDED.avg_processing_time_ms, s.avg_processing_time_ms),
        avg_ack_time_ms        = coalesce(EXCLUDED.avg_ack_time_ms, s.avg_ack_time_ms),
        queue_group            = coalesce(EXCLUDED.queue_group, s.queue_group),
        ack_policy             = 'explicit',
        max_deliver            = coalesce(EXCLUDED.max_deliver, s.max_deliver),
        last_active_at         = CASE WHEN EXCLUDED.messages_delivered > 0 OR EXCLUDED.nats_acks > 0
                                      THEN now() ELSE s.last_active_at END,
        active                 = EXCLUDED.active
    RETURNING true
$$;
REVOKE ALL ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean, bigint, double precision, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean, bigint, double precision, text, integer) TO rule_nats_worker, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_consumer_add_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean, bigint, double precision, text, integer) IS
    'The sidecar''s report: adds the counts since its last report (counters never go down on a restart).';

CREATE OR REPLACE FUNCTION rule_nats_adopt_consumer(
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
ALTER FUNCTION rule_nats_adopt_consumer(text, text, text, integer, text, jsonb, jsonb) OWNER TO rule_nats_definer;
REVOKE ALL ON FUNCTION rule_nats_adopt_consumer(text, text, text, integer, text, jsonb, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rule_nats_adopt_consumer(text, text, text, integer, text, jsonb, jsonb) TO rule_nats_worker, rule_nats_admin;
COMMENT ON FUNCTION rule_nats_adopt_consumer(text, text, text, integer, text, jsonb, jsonb) IS
    'For a worker started with STREAM_NAME/SUBJECT/QUEUE_GROUP: inserts the stream and the durable consumer when '
    'their rows are missing, with the settings JetStream already has (p_stream, p_consumer: by column name, kept in '
    'adopted_config) or the defaults when JetStream has none (NULL); returns consumer_id. Rows that exist are never '
    'changed: the registry is the DBA''s.';

-- Last: this file records itself (webhook-worker migrate adds the checksum).
INSERT INTO rule_nats_schema_definitions (filename) VALUES ('50_delivery.sql')
    ON CONFLICT (filename) DO UPDATE SET checksum = NULL, applied_at = now(), applied_by = current_user;
