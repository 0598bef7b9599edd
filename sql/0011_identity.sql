-- 0011_identity: a message keeps one identity wherever it goes (issue 11, defect 7).
--
--  * rule_nats_installation: one random id per installation, generated here once. Outbox message ids
--    (the Nats-Msg-Id JetStream de-duplicates by) are outbox-<installation>-<outbox_id>: two
--    clusters whose databases have the same name no longer publish the same ids into one stream,
--    where JetStream dropped the second event as a duplicate and the relay deleted its row.
--  * rule_nats_retries holds one row per message and consumer (a unique index): a deferred message
--    that comes back keeps its row instead of adding a second one (INSERT ... ON CONFLICT DO NOTHING).
--  * A replayed dead letter is the same message to its receiver: the original message id and the
--    attempts made so far travel in the headers Rule-Nats-Message-Id and Rule-Nats-Attempts (the
--    sidecar sends the first as webhook-id and records attempts under it, numbered on), while the
--    Nats-Msg-Id of each replay is its own (replay-<installation>-<dead_letter_id>-<n>), so that
--    JetStream's duplicate window does not drop it.

-- ---------------------------------------------------------------------------
-- The installation.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_installation (
    singleton                  boolean     PRIMARY KEY DEFAULT true,
    installation_id            text        NOT NULL
        DEFAULT left(replace(gen_random_uuid()::text, '-', ''), 16),
    created_at                 timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT "one row only" CHECK (singleton),
    CONSTRAINT "installation_id: 1-64 letters, digits, _ or -"
        CHECK (installation_id ~ '^[A-Za-z0-9_-]{1,64}$')
);
COMMENT ON TABLE rule_nats_installation IS
    'One row: the random id of this installation of the worker''s schema, part of every outbox message id '
    '(outbox-<installation_id>-<outbox_id>) and replay id, so that installations publishing into one stream never '
    'share a Nats-Msg-Id. A database copied from another (CREATE DATABASE ... TEMPLATE, a restored dump) keeps the '
    'id: give the copy its own with UPDATE rule_nats_installation SET installation_id = DEFAULT.';
INSERT INTO rule_nats_installation DEFAULT VALUES;

-- ---------------------------------------------------------------------------
-- One retry row per message and consumer. Rows that exist twice already (the defect this fixes):
-- the oldest stays, it is the one attempts were counted on.
-- ---------------------------------------------------------------------------
DELETE FROM rule_nats_retries r
 USING rule_nats_retries older
 WHERE older.stream_name = r.stream_name AND older.consumer_name = r.consumer_name
   AND older.stream_seq = r.stream_seq AND older.retry_id < r.retry_id;
CREATE UNIQUE INDEX rule_nats_retries_message_key ON rule_nats_retries (stream_name, consumer_name, stream_seq);
COMMENT ON INDEX rule_nats_retries_message_key IS
    'A message (stream sequence) waits in the retry table of a consumer at most once.';

-- ---------------------------------------------------------------------------
-- Outbox ids with the installation.
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION rule_nats_publish_on_commit(
    subject     text,
    payload     jsonb,
    headers     jsonb DEFAULT NULL,
    msg_id      text  DEFAULT NULL,
    config_name text  DEFAULT 'default'
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
    v_msg_id text := nullif(msg_id, '');
BEGIN
    IF subject IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish_on_commit', 'subject', 'e.g. rule_nats_publish_on_commit(''webhooks.orders'', ''{"id": 1}'')');
    ELSIF payload IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish_on_commit', 'payload', 'Publish a JSON value, e.g. ''{}'' or ''null''::jsonb.');
    ELSIF config_name IS NULL THEN
        PERFORM public.rule_nats__null_argument('rule_nats_publish_on_commit', 'config_name', 'Leave it out for the default configuration.');
    END IF;
    -- The common case costs plain expressions and one INSERT ... SELECT (which also finds the
    -- configuration and the registered stream); rule_nats__check_publish then says what is wrong.
    IF NOT public.rule_nats_valid_subject(subject, false)
       OR public.rule_nats_subject_reserved(subject)
       OR (headers IS NOT NULL AND NOT coalesce(public.rule_nats_valid_headers(headers), false))
       OR (v_msg_id IS NOT NULL AND NOT public.rule_nats_valid_message_id(v_msg_id)) THEN
        PERFORM public.rule_nats__check_publish('rule_nats_publish_on_commit', config_name, subject, headers, v_msg_id);
    END IF;
    v_id := nextval(pg_get_serial_sequence('public.rule_nats_outbox', 'outbox_id'));
    INSERT INTO public.rule_nats_outbox (outbox_id, config_name, subject, payload, headers, message_id)
    SELECT v_id, c.config_name, rule_nats_publish_on_commit.subject, rule_nats_publish_on_commit.payload,
           rule_nats_publish_on_commit.headers,
           coalesce(v_msg_id, format('outbox-%s-%s', (SELECT i.installation_id FROM public.rule_nats_installation i), v_id))
      FROM public.rule_nats_config c
     WHERE c.config_name = rule_nats_publish_on_commit.config_name
       AND (NOT c.publish_registered_subjects_only
            OR EXISTS (SELECT 1 FROM public.rule_nats_streams s
                        WHERE s.enabled AND s.config_name = c.config_name
                          AND rule_nats_publish_on_commit.subject ~ s.subjects_pattern));
    IF NOT FOUND THEN
        PERFORM public.rule_nats__check_publish('rule_nats_publish_on_commit', config_name, subject, headers, v_msg_id);
        RAISE EXCEPTION 'rule_nats_publish_on_commit: not queued' USING ERRCODE = '22023';
    END IF;
    RETURN v_id;
END
$$;

CREATE OR REPLACE FUNCTION rule_nats_enqueue_row_event(p_subject text, p_webhook_name text, p_event jsonb)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_hook record;
    v_id bigint;
    v_event text;
    v_subject text := p_subject;
    v_config text := 'default';
BEGIN
    IF p_webhook_name IS NOT NULL THEN
        SELECT webhook_id, url, nats_subject, config_name, enabled, disabled_reason INTO v_hook
          FROM public.rule_webhooks WHERE webhook_name = p_webhook_name;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'rule_nats_table_trigger: no webhook named %', quote_literal(p_webhook_name)
                USING ERRCODE = '22023', HINT = 'See SELECT webhook_name FROM rule_webhooks.';
        END IF;
        -- The same rule as rule_webhook_publish_nats: a DBA's disable refuses, the worker's holds.
        IF NOT v_hook.enabled AND v_hook.disabled_reason IS NULL THEN
            RAISE EXCEPTION 'rule_nats_table_trigger: webhook % is disabled', quote_literal(p_webhook_name)
                USING ERRCODE = '55000',
                      HINT = format('UPDATE rule_webhooks SET enabled = true WHERE webhook_id = %s; or ALTER TABLE ... '
                                    'DISABLE TRIGGER to stop the events of the table.', v_hook.webhook_id);
        END IF;
        v_subject := coalesce(p_subject, v_hook.nats_subject);
        v_config := v_hook.config_name;
    END IF;
    PERFORM public.rule_nats__check_publish('rule_nats_table_trigger', v_config, v_subject, NULL, NULL);
    v_id := nextval(pg_get_serial_sequence('public.rule_nats_outbox', 'outbox_id'));
    v_event := format('outbox-%s-%s', (SELECT i.installation_id FROM public.rule_nats_installation i), v_id);
    IF p_webhook_name IS NULL THEN
        INSERT INTO public.rule_nats_outbox (outbox_id, subject, payload, message_id)
        VALUES (v_id, v_subject, p_event, v_event);
    ELSE
        INSERT INTO public.rule_nats_outbox (outbox_id, config_name, webhook_id, subject, payload, message_id)
        VALUES (v_id, v_config, v_hook.webhook_id, v_subject,
                jsonb_build_object('webhook_url', v_hook.url, 'data', p_event, 'headers', '{}'::jsonb,
                                   'webhook_id', v_hook.webhook_id, 'event_id', v_event,
                                   'timestamp', floor(extract(epoch FROM clock_timestamp()))::bigint),
                v_event);
    END IF;
    RETURN v_id;
END
$$;

-- ---------------------------------------------------------------------------
-- Replays keep the message's identity.
-- ---------------------------------------------------------------------------
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
                      WHERE lower(h.k) NOT IN ('nats-msg-id', 'nats-expected-stream', 'nats-expected-last-sequence',
                                               'rule-nats-message-id', 'rule-nats-attempts')), '{}'::jsonb)
               || jsonb_build_object('Rule-Nats-Message-Id', d.message_id, 'Rule-Nats-Attempts', d.attempts::text),
           format('replay-%s-%s-%s', (SELECT i.installation_id FROM public.rule_nats_installation i),
                  d.dead_letter_id, d.replay_count + 1)
    RETURNING outbox_id INTO v_outbox;
    UPDATE public.rule_nats_dead_letters
       SET replayed = true, replayed_at = now(), replay_count = replay_count + 1
     WHERE dead_letter_id = p_dead_letter_id;
    RETURN v_outbox;
END
$$;
COMMENT ON FUNCTION rule_nats_replay_dead_letter(bigint) IS
    'Re-publishes a dead letter''s original bytes to its subject (through the outbox, after COMMIT) and marks it '
    'replayed; returns the outbox_id. The replay is the same message to the receiver: same webhook-id (the dead '
    'letter''s message_id), attempts recorded under the same message_id and numbered on from the dead letter''s.';

-- Owner and search_path as for every definer function (0006); CREATE OR REPLACE keeps both, this
-- says so where the functions are.
DO $owner$
DECLARE
    f regprocedure;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'rule_nats_publish_on_commit(text, jsonb, jsonb, text, text)',
        'rule_nats_enqueue_row_event(text, text, jsonb)',
        'rule_nats_replay_dead_letter(bigint)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO rule_nats_definer', f);
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$owner$;

-- ---------------------------------------------------------------------------
-- Privileges.
-- ---------------------------------------------------------------------------
GRANT SELECT ON rule_nats_installation TO rule_nats_definer, rule_nats_admin, rule_nats_monitor, rule_nats_worker;
GRANT UPDATE (installation_id) ON rule_nats_installation TO rule_nats_admin;

COMMENT ON COLUMN rule_nats_outbox.message_id IS
    'Nats-Msg-Id of the message: the caller''s msg_id, or outbox-<installation_id>-<outbox_id> (rule_nats_installation).';

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (11, 'identity');
