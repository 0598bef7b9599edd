-- 0001_schema.sql: the registry, the delivery state, the monitoring views and the roles.
--
-- Apply with `webhook-worker migrate --database-url URL` (recommended: transaction,
-- advisory lock, version table), or by hand, in order, each file in one transaction:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 --single-transaction -f sql/0001_schema.sql
-- Released migrations are never edited: changes go into a new, higher-numbered file.

-- ---------------------------------------------------------------------------
-- Version table. Every migration records itself as its last statement, so files
-- applied with psql and files applied by `webhook-worker migrate` agree.
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS rule_nats_schema_migrations (
    version     integer PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  name        NOT NULL DEFAULT current_user
);
COMMENT ON TABLE rule_nats_schema_migrations IS
    'Applied schema migrations of the NATS webhook worker (one row per sql/NNNN_*.sql file).';
COMMENT ON COLUMN rule_nats_schema_migrations.checksum IS
    'SHA-256 of the migration file as applied by webhook-worker migrate (NULL when applied with psql).';

-- ---------------------------------------------------------------------------
-- Roles. NOLOGIN groups: grant them to login roles, e.g. GRANT rule_nats_worker TO sidecar;
-- ---------------------------------------------------------------------------
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['rule_nats_admin', 'rule_nats_monitor', 'rule_nats_worker', 'rule_nats_publisher']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$roles$;
COMMENT ON ROLE rule_nats_admin IS 'NATS webhook worker: configures connections, streams, consumers and webhooks; reads everything.';
COMMENT ON ROLE rule_nats_monitor IS 'NATS webhook worker: reads monitoring views and non-secret configuration; writes nothing.';
COMMENT ON ROLE rule_nats_worker IS 'NATS webhook worker: what the sidecar needs (read configuration, record outcomes), nothing more.';
COMMENT ON ROLE rule_nats_publisher IS 'NATS webhook worker: may publish to NATS from SQL (rule_nats_publish and friends).';

-- ---------------------------------------------------------------------------
-- Validation helpers, used by CHECK constraints and by the PL/Python functions.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_valid_name(p_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT p_name ~ '^[A-Za-z0-9_-]{1,255}$' $$;
COMMENT ON FUNCTION rule_nats_valid_name(text) IS
    'True when the text is a safe JetStream stream/consumer name: 1-255 of A-Z a-z 0-9 _ - (no dots, wildcards or spaces).';

CREATE FUNCTION rule_nats_valid_subject(p_subject text, p_allow_wildcards boolean DEFAULT false)
RETURNS boolean LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT length(p_subject) BETWEEN 1 AND 1024
       AND p_subject !~ '[[:space:][:cntrl:]]'
       AND CASE WHEN p_allow_wildcards
                THEN p_subject ~ '^(([^.*>]+|\*)\.)*([^.*>]+|\*|>)$'
                ELSE p_subject ~ '^([^.*>]+\.)*[^.*>]+$'
           END
$$;
COMMENT ON FUNCTION rule_nats_valid_subject(text, boolean) IS
    'True when the text is a NATS subject: dot-separated non-empty tokens without whitespace. '
    'With p_allow_wildcards, a token may be * and the last token may be >.';

CREATE FUNCTION rule_nats_valid_subjects(p_subjects text[], p_allow_wildcards boolean DEFAULT true)
RETURNS boolean LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT cardinality(p_subjects) > 0
       AND coalesce((SELECT bool_and(s IS NOT NULL AND rule_nats_valid_subject(s, p_allow_wildcards))
                       FROM unnest(p_subjects) AS s), false)
$$;
COMMENT ON FUNCTION rule_nats_valid_subjects(text[], boolean) IS
    'True when the array is non-empty and every element is a valid subject (wildcards allowed by default).';

CREATE FUNCTION rule_nats_valid_server_url(p_url text)
RETURNS boolean LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT p_url ~ '^(nats|tls)://([^\s/@:]+(:[^\s/@]*)?@)?[^\s/@]+(:[0-9]{1,5})?/?$' $$;
COMMENT ON FUNCTION rule_nats_valid_server_url(text) IS
    'True when the text is a NATS server URL: nats://host[:port] or tls://host[:port].';

CREATE FUNCTION rule_nats_valid_server_urls(p_urls text[])
RETURNS boolean LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT coalesce((SELECT bool_and(u IS NOT NULL AND rule_nats_valid_server_url(u))
                       FROM unnest(p_urls) AS u), true)
$$;
COMMENT ON FUNCTION rule_nats_valid_server_urls(text[]) IS
    'True when every element is a valid NATS server URL (an empty array is valid).';

CREATE FUNCTION rule_nats_touch_updated_at()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION rule_nats_touch_updated_at() IS 'Trigger function: sets updated_at on UPDATE.';

-- ---------------------------------------------------------------------------
-- rule_nats_config: named NATS connections.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_config (
    config_id                  integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    config_name                text        NOT NULL UNIQUE DEFAULT 'default',
    nats_url                   text        NOT NULL DEFAULT 'nats://localhost:4222',
    nats_cluster_urls          text[]      NOT NULL DEFAULT '{}',
    auth_type                  text        NOT NULL DEFAULT 'none',
    nats_user                  text,
    nats_password              text,
    auth_token                 text,
    auth_credentials_file      text,
    auth_nkey_seed             text,
    tls_enabled                boolean     NOT NULL DEFAULT false,
    tls_ca_file                text,
    tls_cert_file              text,
    tls_key_file               text,
    connect_timeout_seconds    numeric     NOT NULL DEFAULT 2,
    request_timeout_seconds    numeric     NOT NULL DEFAULT 5,
    reconnect_wait_seconds     numeric     NOT NULL DEFAULT 2,
    max_reconnect_attempts     integer     NOT NULL DEFAULT -1,
    description                text,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT "config_name: 1-63 of A-Z a-z 0-9 _ . -"
        CHECK (config_name ~ '^[A-Za-z0-9_.-]{1,63}$'),
    CONSTRAINT "nats_url must be nats://host[:port] or tls://host[:port]"
        CHECK (rule_nats_valid_server_url(nats_url)),
    CONSTRAINT "nats_cluster_urls: each must be nats:// or tls:// host[:port]"
        CHECK (rule_nats_valid_server_urls(nats_cluster_urls)),
    CONSTRAINT "auth_type: none, user_password, token, credentials or nkey"
        CHECK (auth_type IN ('none', 'user_password', 'token', 'credentials', 'nkey')),
    CONSTRAINT "auth_type user_password needs nats_user and nats_password"
        CHECK (auth_type <> 'user_password' OR (nats_user IS NOT NULL AND nats_password IS NOT NULL)),
    CONSTRAINT "auth_type token needs auth_token"
        CHECK (auth_type <> 'token' OR auth_token IS NOT NULL),
    CONSTRAINT "auth_type credentials needs auth_credentials_file"
        CHECK (auth_type <> 'credentials' OR auth_credentials_file IS NOT NULL),
    CONSTRAINT "auth_type nkey needs an auth_nkey_seed starting with SU"
        CHECK (auth_type <> 'nkey' OR auth_nkey_seed ~ '^SU[A-Z2-7]+$'),
    CONSTRAINT "tls_cert_file and tls_key_file go together"
        CHECK ((tls_cert_file IS NULL) = (tls_key_file IS NULL)),
    CONSTRAINT "connect_timeout_seconds must be > 0 and <= 60"
        CHECK (connect_timeout_seconds > 0 AND connect_timeout_seconds <= 60),
    CONSTRAINT "request_timeout_seconds must be > 0 and <= 300"
        CHECK (request_timeout_seconds > 0 AND request_timeout_seconds <= 300),
    CONSTRAINT "reconnect_wait_seconds must be >= 0"
        CHECK (reconnect_wait_seconds >= 0),
    CONSTRAINT "max_reconnect_attempts must be -1 (forever) or >= 0"
        CHECK (max_reconnect_attempts >= -1)
);
COMMENT ON TABLE rule_nats_config IS
    'Named NATS connections. The row ''default'' is used unless a stream, webhook or call names another. '
    'Secret columns (nats_password, auth_token, auth_nkey_seed) are readable by rule_nats_admin and rule_nats_worker only.';
COMMENT ON COLUMN rule_nats_config.config_name IS 'Name used by streams, webhooks and rule_nats_publish(config_name => ...).';
COMMENT ON COLUMN rule_nats_config.nats_url IS 'Primary server URL, nats://host:port (or tls://). Credentials belong in the auth columns, not in the URL.';
COMMENT ON COLUMN rule_nats_config.nats_cluster_urls IS 'Further servers of the same cluster, tried after nats_url.';
COMMENT ON COLUMN rule_nats_config.auth_type IS 'none | user_password (nats_user, nats_password) | token (auth_token) | credentials (auth_credentials_file, a .creds file on the sidecar host) | nkey (auth_nkey_seed).';
COMMENT ON COLUMN rule_nats_config.nats_user IS 'User name for auth_type user_password (the NATS_USER of the original worker).';
COMMENT ON COLUMN rule_nats_config.nats_password IS 'SECRET. Password for auth_type user_password (NATS_PASS).';
COMMENT ON COLUMN rule_nats_config.auth_token IS 'SECRET. Token for auth_type token.';
COMMENT ON COLUMN rule_nats_config.auth_credentials_file IS 'Path of a NATS .creds file (JWT + nkey seed) for auth_type credentials, as seen by the process that connects.';
COMMENT ON COLUMN rule_nats_config.auth_nkey_seed IS 'SECRET. User nkey seed (SU...) for auth_type nkey.';
COMMENT ON COLUMN rule_nats_config.tls_enabled IS 'Require TLS to the server (implied by tls:// URLs).';
COMMENT ON COLUMN rule_nats_config.tls_ca_file IS 'CA bundle used to verify the server certificate (system store when NULL).';
COMMENT ON COLUMN rule_nats_config.tls_cert_file IS 'Client certificate for mutual TLS (with tls_key_file).';
COMMENT ON COLUMN rule_nats_config.tls_key_file IS 'Client private key for mutual TLS (with tls_cert_file).';
COMMENT ON COLUMN rule_nats_config.connect_timeout_seconds IS 'Timeout of one connection attempt, in seconds.';
COMMENT ON COLUMN rule_nats_config.request_timeout_seconds IS 'Timeout of one request (publish acknowledgement, JetStream API call), in seconds.';
COMMENT ON COLUMN rule_nats_config.reconnect_wait_seconds IS 'Pause between reconnect attempts, in seconds.';
COMMENT ON COLUMN rule_nats_config.max_reconnect_attempts IS 'Reconnect attempts before giving up; -1 retries forever.';

CREATE TRIGGER rule_nats_config_touch BEFORE UPDATE ON rule_nats_config
    FOR EACH ROW EXECUTE FUNCTION rule_nats_touch_updated_at();

INSERT INTO rule_nats_config (config_name, nats_url, description)
VALUES ('default', 'nats://localhost:4222', 'Seeded by migration 0001: UPDATE nats_url for your server.')
ON CONFLICT (config_name) DO NOTHING;

-- ---------------------------------------------------------------------------
-- rule_nats_streams: JetStream streams the sidecar creates and keeps in shape.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_streams (
    stream_id                  integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    stream_name                text        NOT NULL UNIQUE,
    config_name                text        NOT NULL DEFAULT 'default'
                               REFERENCES rule_nats_config (config_name) ON UPDATE CASCADE ON DELETE RESTRICT,
    subjects                   text[]      NOT NULL,
    description                text,
    storage_type               text        NOT NULL DEFAULT 'file',
    retention_policy           text        NOT NULL DEFAULT 'limits',
    max_messages               bigint      NOT NULL DEFAULT -1,
    max_bytes                  bigint      NOT NULL DEFAULT -1,
    max_age_seconds            numeric     NOT NULL DEFAULT 0,
    max_message_size           integer     NOT NULL DEFAULT -1,
    discard_policy             text        NOT NULL DEFAULT 'old',
    replicas                   integer     NOT NULL DEFAULT 1,
    duplicate_window_seconds   numeric     NOT NULL DEFAULT 120,
    enabled                    boolean     NOT NULL DEFAULT true,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT "stream_name: 1-255 of A-Z a-z 0-9 _ - (no dots, spaces, * or >)"
        CHECK (rule_nats_valid_name(stream_name)),
    CONSTRAINT "subjects: a non-empty list of a.b.c subjects without spaces"
        CHECK (rule_nats_valid_subjects(subjects, true)),
    CONSTRAINT "storage_type: file or memory"
        CHECK (storage_type IN ('file', 'memory')),
    CONSTRAINT "retention_policy: limits, interest or workqueue"
        CHECK (retention_policy IN ('limits', 'interest', 'workqueue')),
    CONSTRAINT "discard_policy: old or new"
        CHECK (discard_policy IN ('old', 'new')),
    CONSTRAINT "max_messages: -1 (unlimited) or > 0"
        CHECK (max_messages = -1 OR max_messages > 0),
    CONSTRAINT "max_bytes: -1 (unlimited) or > 0"
        CHECK (max_bytes = -1 OR max_bytes > 0),
    CONSTRAINT "max_message_size: -1 (server limit) or > 0"
        CHECK (max_message_size = -1 OR max_message_size > 0),
    CONSTRAINT "max_age_seconds: 0 (unlimited) or > 0"
        CHECK (max_age_seconds >= 0),
    CONSTRAINT "replicas: 1 to 5"
        CHECK (replicas BETWEEN 1 AND 5),
    CONSTRAINT "duplicate_window_seconds must be >= 0"
        CHECK (duplicate_window_seconds >= 0)
);
COMMENT ON TABLE rule_nats_streams IS
    'JetStream streams. The sidecar creates each enabled stream and updates it when a row changes; '
    'changes JetStream refuses (e.g. storage_type of an existing stream) are reported by the sidecar, not applied.';
COMMENT ON COLUMN rule_nats_streams.stream_name IS 'JetStream stream name.';
COMMENT ON COLUMN rule_nats_streams.config_name IS 'NATS connection (rule_nats_config) the stream lives on.';
COMMENT ON COLUMN rule_nats_streams.subjects IS 'Subjects captured by the stream; * matches one token, > the rest (e.g. {webhooks.>}).';
COMMENT ON COLUMN rule_nats_streams.storage_type IS 'file (persistent) or memory (fast, lost on server restart).';
COMMENT ON COLUMN rule_nats_streams.retention_policy IS 'limits (keep until limits), interest (until all consumers ack), workqueue (until one consumer acks).';
COMMENT ON COLUMN rule_nats_streams.max_messages IS 'Maximum messages kept; -1 for unlimited.';
COMMENT ON COLUMN rule_nats_streams.max_bytes IS 'Maximum bytes kept; -1 for unlimited.';
COMMENT ON COLUMN rule_nats_streams.max_age_seconds IS 'Maximum message age in seconds; 0 for unlimited.';
COMMENT ON COLUMN rule_nats_streams.max_message_size IS 'Largest accepted message in bytes; -1 for the server limit.';
COMMENT ON COLUMN rule_nats_streams.discard_policy IS 'When a limit is hit: old (drop oldest) or new (refuse new messages).';
COMMENT ON COLUMN rule_nats_streams.replicas IS 'Copies kept in a clustered JetStream (1 on a single server).';
COMMENT ON COLUMN rule_nats_streams.duplicate_window_seconds IS 'Window in which a repeated Nats-Msg-Id is dropped as a duplicate.';
COMMENT ON COLUMN rule_nats_streams.enabled IS 'false: the sidecar leaves the stream alone (it does not delete it).';

CREATE TRIGGER rule_nats_streams_touch BEFORE UPDATE ON rule_nats_streams
    FOR EACH ROW EXECUTE FUNCTION rule_nats_touch_updated_at();

-- ---------------------------------------------------------------------------
-- rule_nats_consumers: durable pull consumers the sidecar runs.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_consumers (
    consumer_id                integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    stream_name                text        NOT NULL
                               REFERENCES rule_nats_streams (stream_name) ON UPDATE CASCADE ON DELETE CASCADE,
    consumer_name              text        NOT NULL,
    filter_subject             text,
    queue_group                text,
    batch_size                 integer     NOT NULL DEFAULT 10,
    max_deliver                integer     NOT NULL DEFAULT 20,
    ack_wait_seconds           numeric     NOT NULL DEFAULT 30,
    max_ack_pending            integer     NOT NULL DEFAULT 1000,
    deliver_policy             text        NOT NULL DEFAULT 'all',
    retry_max_attempts         integer     NOT NULL DEFAULT 8,
    retry_initial_seconds      numeric     NOT NULL DEFAULT 1,
    retry_max_backoff_seconds  numeric     NOT NULL DEFAULT 3600,
    retry_max_age_seconds      numeric     NOT NULL DEFAULT 86400,
    enabled                    boolean     NOT NULL DEFAULT true,
    description                text,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT rule_nats_consumers_stream_consumer_key UNIQUE (stream_name, consumer_name),
    CONSTRAINT "consumer_name: 1-255 of A-Z a-z 0-9 _ - (no dots, spaces, *, >)"
        CHECK (rule_nats_valid_name(consumer_name)),
    CONSTRAINT "queue_group: 1-255 of A-Z a-z 0-9 _ -"
        CHECK (queue_group IS NULL OR rule_nats_valid_name(queue_group)),
    CONSTRAINT "filter_subject: dot-separated tokens, no spaces or empty tokens"
        CHECK (filter_subject IS NULL OR rule_nats_valid_subject(filter_subject, true)),
    CONSTRAINT "batch_size: 1 to 10000 deliveries in flight"
        CHECK (batch_size BETWEEN 1 AND 10000),
    CONSTRAINT "max_deliver: -1 (unlimited) or >= 1"
        CHECK (max_deliver = -1 OR max_deliver >= 1),
    CONSTRAINT "ack_wait_seconds must be > 0"
        CHECK (ack_wait_seconds > 0),
    CONSTRAINT "max_ack_pending: -1 (unlimited) or >= 1"
        CHECK (max_ack_pending = -1 OR max_ack_pending >= 1),
    CONSTRAINT "deliver_policy: all, new or last"
        CHECK (deliver_policy IN ('all', 'new', 'last')),
    CONSTRAINT "retry_max_attempts must be >= 1"
        CHECK (retry_max_attempts >= 1),
    CONSTRAINT "retry_initial_seconds must be > 0"
        CHECK (retry_initial_seconds > 0),
    CONSTRAINT "retry_max_backoff_seconds must be >= retry_initial_seconds"
        CHECK (retry_max_backoff_seconds >= retry_initial_seconds),
    CONSTRAINT "retry_max_age_seconds must be > 0"
        CHECK (retry_max_age_seconds > 0)
);
COMMENT ON TABLE rule_nats_consumers IS
    'Durable JetStream pull consumers. Every sidecar that runs a row binds to the same durable consumer, '
    'so several sidecars share the work: each message goes to one of them.';
COMMENT ON COLUMN rule_nats_consumers.consumer_name IS 'Durable consumer name, shared by all workers of this consumer (the QUEUE_GROUP of the original worker).';
COMMENT ON COLUMN rule_nats_consumers.filter_subject IS 'Only messages on matching subjects are delivered (all of the stream when NULL).';
COMMENT ON COLUMN rule_nats_consumers.queue_group IS 'Kept for compatibility with the original QUEUE_GROUP setting: the value the consumer was registered under from the environment.';
COMMENT ON COLUMN rule_nats_consumers.batch_size IS 'Deliveries in flight per worker for this consumer (the BATCH_SIZE of the original worker).';
COMMENT ON COLUMN rule_nats_consumers.max_deliver IS 'JetStream redeliveries before the server gives up (covers crashed workers; HTTP retries are scheduled separately).';
COMMENT ON COLUMN rule_nats_consumers.ack_wait_seconds IS 'Seconds a delivered message may stay unacknowledged before JetStream redelivers it.';
COMMENT ON COLUMN rule_nats_consumers.max_ack_pending IS 'Unacknowledged messages JetStream allows across all workers of the consumer.';
COMMENT ON COLUMN rule_nats_consumers.deliver_policy IS 'Where a new consumer starts: all (oldest message), new (only new ones), last.';
COMMENT ON COLUMN rule_nats_consumers.retry_max_attempts IS 'HTTP delivery attempts per message before it is dead-lettered (webhooks may override).';
COMMENT ON COLUMN rule_nats_consumers.retry_initial_seconds IS 'Backoff before the second attempt; doubles each attempt, with jitter.';
COMMENT ON COLUMN rule_nats_consumers.retry_max_backoff_seconds IS 'Upper bound of one backoff.';
COMMENT ON COLUMN rule_nats_consumers.retry_max_age_seconds IS 'A message older than this (since its first attempt) is dead-lettered instead of retried.';
COMMENT ON COLUMN rule_nats_consumers.enabled IS 'false: workers finish in-flight deliveries and stop fetching (the durable consumer is kept).';

CREATE TRIGGER rule_nats_consumers_touch BEFORE UPDATE ON rule_nats_consumers
    FOR EACH ROW EXECUTE FUNCTION rule_nats_touch_updated_at();

-- ---------------------------------------------------------------------------
-- rule_webhooks: HTTP endpoints.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_webhooks (
    webhook_id                 integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    webhook_name               text        NOT NULL UNIQUE,
    url                        text        NOT NULL,
    method                     text        NOT NULL DEFAULT 'POST',
    headers                    jsonb       NOT NULL DEFAULT '{}',
    timeout_seconds            numeric     NOT NULL DEFAULT 10,
    retry_max_attempts         integer,
    retry_initial_seconds      numeric,
    retry_max_backoff_seconds  numeric,
    retry_max_age_seconds      numeric,
    config_name                text        NOT NULL DEFAULT 'default'
                               REFERENCES rule_nats_config (config_name) ON UPDATE CASCADE ON DELETE RESTRICT,
    nats_subject               text        NOT NULL,
    publish_mode               text        NOT NULL DEFAULT 'immediate',
    enabled                    boolean     NOT NULL DEFAULT true,
    description                text,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT "webhook_name: 1-255 of A-Z a-z 0-9 _ . -"
        CHECK (webhook_name ~ '^[A-Za-z0-9_.-]{1,255}$'),
    CONSTRAINT "url: absolute http(s) URL with host, no spaces, no user:pass@"
        CHECK (url ~* '^https?://[^\s/?#@]+(/[^\s]*)?$' AND length(url) <= 2048),
    CONSTRAINT "method: POST, PUT or PATCH"
        CHECK (method IN ('POST', 'PUT', 'PATCH')),
    CONSTRAINT "headers: a JSON object of string values"
        CHECK (jsonb_typeof(headers) = 'object'
               AND NOT jsonb_path_exists(headers, '$.* ? (@.type() != "string")')),
    CONSTRAINT "timeout_seconds: > 0 and <= 300"
        CHECK (timeout_seconds > 0 AND timeout_seconds <= 300),
    CONSTRAINT "retry_max_attempts must be >= 1"
        CHECK (retry_max_attempts IS NULL OR retry_max_attempts >= 1),
    CONSTRAINT "retry_initial_seconds must be > 0"
        CHECK (retry_initial_seconds IS NULL OR retry_initial_seconds > 0),
    CONSTRAINT "retry_max_backoff_seconds must be > 0"
        CHECK (retry_max_backoff_seconds IS NULL OR retry_max_backoff_seconds > 0),
    CONSTRAINT "retry_max_age_seconds must be > 0"
        CHECK (retry_max_age_seconds IS NULL OR retry_max_age_seconds > 0),
    CONSTRAINT "nats_subject: a.b.c, no spaces, empty tokens or wildcards"
        CHECK (rule_nats_valid_subject(nats_subject, false)),
    CONSTRAINT "publish_mode: immediate or outbox"
        CHECK (publish_mode IN ('immediate', 'outbox'))
);
COMMENT ON TABLE rule_webhooks IS
    'Webhook endpoints. Messages that name a webhook_id are delivered with these settings; the static headers '
    'and signing secrets never travel through NATS.';
COMMENT ON COLUMN rule_webhooks.webhook_name IS 'Unique name, used in views and logs.';
COMMENT ON COLUMN rule_webhooks.url IS 'Target URL (absolute http or https). A change applies to the next attempt.';
COMMENT ON COLUMN rule_webhooks.method IS 'HTTP method: POST, PUT or PATCH.';
COMMENT ON COLUMN rule_webhooks.headers IS 'SECRET-BEARING. Static headers added to every request (e.g. Authorization); not readable by rule_nats_monitor.';
COMMENT ON COLUMN rule_webhooks.timeout_seconds IS 'Total time allowed for one HTTP attempt, in seconds.';
COMMENT ON COLUMN rule_webhooks.retry_max_attempts IS 'Overrides the consumer''s retry_max_attempts when set.';
COMMENT ON COLUMN rule_webhooks.retry_initial_seconds IS 'Overrides the consumer''s retry_initial_seconds when set.';
COMMENT ON COLUMN rule_webhooks.retry_max_backoff_seconds IS 'Overrides the consumer''s retry_max_backoff_seconds when set.';
COMMENT ON COLUMN rule_webhooks.retry_max_age_seconds IS 'Overrides the consumer''s retry_max_age_seconds when set.';
COMMENT ON COLUMN rule_webhooks.config_name IS 'NATS connection used when publishing for this webhook from SQL.';
COMMENT ON COLUMN rule_webhooks.nats_subject IS 'Subject that rule_webhook_publish_nats() publishes this webhook''s events to.';
COMMENT ON COLUMN rule_webhooks.publish_mode IS 'immediate: publish during the call; outbox: publish after the calling transaction commits.';
COMMENT ON COLUMN rule_webhooks.enabled IS 'false: publishing for this webhook is refused and its queued deliveries are held.';

CREATE TRIGGER rule_webhooks_touch BEFORE UPDATE ON rule_webhooks
    FOR EACH ROW EXECUTE FUNCTION rule_nats_touch_updated_at();

-- ---------------------------------------------------------------------------
-- rule_webhook_secrets: signing secrets, referenced by webhook_id.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_webhook_secrets (
    secret_id                  bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    webhook_id                 integer     NOT NULL REFERENCES rule_webhooks (webhook_id) ON DELETE CASCADE,
    secret                     text        NOT NULL,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    expires_at                 timestamptz,

    CONSTRAINT "secret: whsec_ followed by base64 of 24 to 64 bytes"
        CHECK (secret ~ '^whsec_[A-Za-z0-9+/]{32,88}={0,2}$')
);
COMMENT ON TABLE rule_webhook_secrets IS
    'SECRET. Standard Webhooks signing secrets per webhook; every unexpired secret signs (rotation window). '
    'Readable by rule_nats_admin and rule_nats_worker only.';
COMMENT ON COLUMN rule_webhook_secrets.secret IS 'SECRET. whsec_ + base64 key material.';
COMMENT ON COLUMN rule_webhook_secrets.expires_at IS 'After this time the secret no longer signs (NULL: never expires).';
CREATE INDEX rule_webhook_secrets_webhook_idx ON rule_webhook_secrets (webhook_id);

-- ---------------------------------------------------------------------------
-- rule_nats_publish_history: one row per publish from SQL (or relay of the outbox).
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_publish_history (
    publish_id                 bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    published_at               timestamptz NOT NULL DEFAULT clock_timestamp(),
    config_name                text,
    webhook_id                 integer REFERENCES rule_webhooks (webhook_id) ON DELETE SET NULL,
    subject                    text        NOT NULL,
    payload                    jsonb,
    headers                    jsonb,
    message_id                 text,
    stream_name                text,
    sequence_number            bigint,
    duplicate                  boolean     NOT NULL DEFAULT false,
    success                    boolean     NOT NULL,
    error_message              text,
    latency_ms                 double precision,
    triggered_by               text        NOT NULL DEFAULT 'sql'
);
COMMENT ON TABLE rule_nats_publish_history IS 'One row per publish to JetStream from SQL or from the outbox relay, successful or not.';
COMMENT ON COLUMN rule_nats_publish_history.headers IS 'Message headers, with Authorization-like values masked.';
COMMENT ON COLUMN rule_nats_publish_history.message_id IS 'Nats-Msg-Id used for JetStream de-duplication.';
COMMENT ON COLUMN rule_nats_publish_history.stream_name IS 'Stream that stored the message (from the PubAck).';
COMMENT ON COLUMN rule_nats_publish_history.sequence_number IS 'Stream sequence of the message (from the PubAck).';
COMMENT ON COLUMN rule_nats_publish_history.duplicate IS 'True when JetStream dropped the message as a duplicate of message_id.';
COMMENT ON COLUMN rule_nats_publish_history.success IS 'True when JetStream acknowledged the message.';
COMMENT ON COLUMN rule_nats_publish_history.error_message IS 'Why the publish failed.';
COMMENT ON COLUMN rule_nats_publish_history.latency_ms IS 'Time from sending to the PubAck, in milliseconds.';
COMMENT ON COLUMN rule_nats_publish_history.triggered_by IS 'sql (rule_nats_publish), outbox (relayed by the sidecar) or replay (dead letter re-published).';
CREATE INDEX rule_nats_publish_history_time_idx ON rule_nats_publish_history (published_at);
CREATE INDEX rule_nats_publish_history_failed_idx ON rule_nats_publish_history (published_at) WHERE NOT success;
CREATE INDEX rule_nats_publish_history_message_idx ON rule_nats_publish_history (message_id) WHERE message_id IS NOT NULL;

-- ---------------------------------------------------------------------------
-- rule_nats_workers: one row per sidecar instance, with its heartbeat.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_workers (
    worker_name                text        PRIMARY KEY,
    hostname                   text        NOT NULL,
    pid                        integer     NOT NULL,
    version                    text        NOT NULL,
    started_at                 timestamptz NOT NULL DEFAULT now(),
    last_heartbeat             timestamptz NOT NULL DEFAULT now(),
    stopped_at                 timestamptz,
    CONSTRAINT "worker_name: 1-255 of A-Z a-z 0-9 _ . -"
        CHECK (worker_name ~ '^[A-Za-z0-9_.-]{1,255}$')
);
COMMENT ON TABLE rule_nats_workers IS 'Sidecar instances and their heartbeats; a worker whose heartbeat is old has stopped or hangs.';
COMMENT ON COLUMN rule_nats_workers.worker_name IS 'Instance name (CONSUMER_NAME of the original worker, or host-pid).';
COMMENT ON COLUMN rule_nats_workers.last_heartbeat IS 'Last time the worker reported in.';
COMMENT ON COLUMN rule_nats_workers.stopped_at IS 'Set when the worker shut down cleanly; NULL while running or after a crash.';

-- ---------------------------------------------------------------------------
-- rule_nats_delivery_attempts: one row per HTTP delivery attempt.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_delivery_attempts (
    attempt_id                 bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    attempted_at               timestamptz NOT NULL DEFAULT clock_timestamp(),
    message_id                 text,
    stream_name                text        NOT NULL,
    consumer_name              text        NOT NULL,
    stream_seq                 bigint,
    subject                    text,
    webhook_id                 integer,
    url                        text,
    attempt                    integer     NOT NULL,
    outcome                    text        NOT NULL,
    http_status                integer,
    latency_ms                 double precision,
    error                      text,
    response_body              text,
    next_attempt_at            timestamptz,
    worker_name                text,
    CONSTRAINT "outcome: delivered, retry or dead_letter"
        CHECK (outcome IN ('delivered', 'retry', 'dead_letter')),
    CONSTRAINT "attempt must be >= 1" CHECK (attempt >= 1)
);
COMMENT ON TABLE rule_nats_delivery_attempts IS
    'One row per HTTP delivery attempt, written before the message is acknowledged to NATS. '
    'SELECT * FROM rule_nats_delivery_attempts WHERE message_id = ... ORDER BY attempt answers "was it delivered".';
COMMENT ON COLUMN rule_nats_delivery_attempts.message_id IS 'Event id of the message (envelope id, else Nats-Msg-Id, else stream:seq); stable across retries.';
COMMENT ON COLUMN rule_nats_delivery_attempts.stream_seq IS 'Stream sequence of the message in JetStream.';
COMMENT ON COLUMN rule_nats_delivery_attempts.webhook_id IS 'Webhook of the registry the message named, if any (no foreign key: history outlives endpoints).';
COMMENT ON COLUMN rule_nats_delivery_attempts.attempt IS '1 for the first attempt, counting up across retries.';
COMMENT ON COLUMN rule_nats_delivery_attempts.outcome IS 'delivered (2xx), retry (scheduled for next_attempt_at) or dead_letter (permanent failure or retries exhausted).';
COMMENT ON COLUMN rule_nats_delivery_attempts.http_status IS 'HTTP status of the response; NULL when none was received.';
COMMENT ON COLUMN rule_nats_delivery_attempts.latency_ms IS 'Duration of the HTTP attempt in milliseconds.';
COMMENT ON COLUMN rule_nats_delivery_attempts.error IS 'Why the attempt failed (timeout, connection refused, HTTP 503, ...).';
COMMENT ON COLUMN rule_nats_delivery_attempts.response_body IS 'Start of the response body of a failed attempt (truncated).';
COMMENT ON COLUMN rule_nats_delivery_attempts.worker_name IS 'Sidecar instance that made the attempt.';
CREATE INDEX rule_nats_delivery_attempts_time_idx ON rule_nats_delivery_attempts (attempted_at);
CREATE INDEX rule_nats_delivery_attempts_message_idx ON rule_nats_delivery_attempts (message_id);
CREATE INDEX rule_nats_delivery_attempts_failed_idx ON rule_nats_delivery_attempts (attempted_at) WHERE outcome <> 'delivered';

-- ---------------------------------------------------------------------------
-- rule_nats_dead_letters: messages that will not be delivered without help.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_dead_letters (
    dead_letter_id             bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    created_at                 timestamptz NOT NULL DEFAULT clock_timestamp(),
    message_id                 text,
    stream_name                text        NOT NULL,
    consumer_name              text        NOT NULL,
    stream_seq                 bigint,
    subject                    text        NOT NULL,
    webhook_id                 integer,
    url                        text,
    message_raw                bytea       NOT NULL,
    message_headers            jsonb,
    reason                     text        NOT NULL,
    error                      text,
    attempts                   integer     NOT NULL DEFAULT 0,
    first_attempt_at           timestamptz,
    last_attempt_at            timestamptz,
    replayed                   boolean     NOT NULL DEFAULT false,
    replayed_at                timestamptz,
    replay_count               integer     NOT NULL DEFAULT 0,
    CONSTRAINT "reason: a lower_case code" CHECK (reason ~ '^[a-z0-9_]{1,64}$')
);
COMMENT ON TABLE rule_nats_dead_letters IS
    'Messages given up on: permanent failures (reason e.g. invalid_json, missing_webhook_url, http_4xx, ssrf_blocked) '
    'and exhausted retries (retries_exhausted). The original bytes are kept for replay.';
COMMENT ON COLUMN rule_nats_dead_letters.message_raw IS 'SECRET-BEARING. The message exactly as received from NATS (may carry Authorization headers); not readable by rule_nats_monitor.';
COMMENT ON COLUMN rule_nats_dead_letters.message_headers IS 'SECRET-BEARING. NATS headers of the message; not readable by rule_nats_monitor.';
COMMENT ON COLUMN rule_nats_dead_letters.reason IS 'Stable reason code.';
COMMENT ON COLUMN rule_nats_dead_letters.error IS 'Human-readable detail of the last failure.';
COMMENT ON COLUMN rule_nats_dead_letters.attempts IS 'HTTP attempts made before giving up (0 when the message was refused before sending).';
COMMENT ON COLUMN rule_nats_dead_letters.replayed IS 'True once the message was re-published for another try.';
CREATE INDEX rule_nats_dead_letters_time_idx ON rule_nats_dead_letters (created_at);
CREATE INDEX rule_nats_dead_letters_message_idx ON rule_nats_dead_letters (message_id);

-- ---------------------------------------------------------------------------
-- rule_nats_consumer_stats: counters reported by each worker per consumer.
-- ---------------------------------------------------------------------------
CREATE TABLE rule_nats_consumer_stats (
    stats_id                   bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    stream_name                text        NOT NULL,
    consumer_name              text        NOT NULL,
    worker_name                text        NOT NULL DEFAULT '',
    messages_delivered         bigint      NOT NULL DEFAULT 0,
    messages_acknowledged      bigint      NOT NULL DEFAULT 0,
    messages_failed            bigint      NOT NULL DEFAULT 0,
    messages_pending           bigint      NOT NULL DEFAULT 0,
    messages_redelivered       bigint      NOT NULL DEFAULT 0,
    avg_processing_time_ms     double precision,
    last_active_at             timestamptz,
    active                     boolean     NOT NULL DEFAULT true,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rule_nats_consumer_stats_key UNIQUE (stream_name, consumer_name, worker_name)
);
COMMENT ON TABLE rule_nats_consumer_stats IS
    'Per stream, consumer and worker instance: counters since the worker started, reported by the worker '
    '(rule_nats_consumer_update_stats). worker_name is empty for rows reported without one.';
COMMENT ON COLUMN rule_nats_consumer_stats.messages_delivered IS 'Messages successfully delivered over HTTP.';
COMMENT ON COLUMN rule_nats_consumer_stats.messages_acknowledged IS 'Messages acknowledged to JetStream (delivered, retry scheduled or dead-lettered).';
COMMENT ON COLUMN rule_nats_consumer_stats.messages_failed IS 'Attempts that failed (retry scheduled or dead-lettered).';
COMMENT ON COLUMN rule_nats_consumer_stats.messages_pending IS 'Messages not yet delivered to any worker (JetStream num_pending at the last report).';
COMMENT ON COLUMN rule_nats_consumer_stats.messages_redelivered IS 'Messages JetStream delivered more than once (e.g. after a worker crash).';
COMMENT ON COLUMN rule_nats_consumer_stats.avg_processing_time_ms IS 'Average time per message from receipt to acknowledgement, in milliseconds.';
COMMENT ON COLUMN rule_nats_consumer_stats.last_active_at IS 'Last time the worker processed a message or reported.';
COMMENT ON COLUMN rule_nats_consumer_stats.active IS 'False once the worker stopped this consumer.';

CREATE TRIGGER rule_nats_consumer_stats_touch BEFORE UPDATE ON rule_nats_consumer_stats
    FOR EACH ROW EXECUTE FUNCTION rule_nats_touch_updated_at();

-- The original worker's 6-argument form: absolute values, no worker name.
CREATE FUNCTION rule_nats_consumer_update_stats(
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
COMMENT ON FUNCTION rule_nats_consumer_update_stats(text, text, bigint, bigint, bigint, numeric) IS
    'Compatibility form used by the original workers: sets absolute counters for (stream, consumer) without a worker name.';

-- The form the sidecar uses: per worker instance, absolute counters since the worker started.
CREATE FUNCTION rule_nats_consumer_update_stats(
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
COMMENT ON FUNCTION rule_nats_consumer_update_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean) IS
    'Sets the counters of one worker instance for (stream, consumer); called by the sidecar every few seconds and at shutdown (p_active false).';

-- ---------------------------------------------------------------------------
-- Registering a consumer from the environment (the original worker's STREAM_NAME,
-- SUBJECT, QUEUE_GROUP, BATCH_SIZE). A function, so the worker role needs no
-- write access to the configuration tables.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_register_consumer(
    p_stream_name   text,
    p_subject       text,
    p_consumer_name text,
    p_batch_size    integer DEFAULT NULL,
    p_config_name   text DEFAULT 'default'
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_id integer;
BEGIN
    INSERT INTO public.rule_nats_streams (stream_name, subjects, config_name, description)
    VALUES (p_stream_name, ARRAY[p_subject], p_config_name, 'Registered from the worker environment')
    ON CONFLICT (stream_name) DO NOTHING;

    INSERT INTO public.rule_nats_consumers AS c (stream_name, consumer_name, filter_subject, queue_group,
                                            batch_size, description)
    VALUES (p_stream_name, p_consumer_name, p_subject, p_consumer_name, coalesce(p_batch_size, 10),
            'Registered from the worker environment')
    ON CONFLICT (stream_name, consumer_name) DO UPDATE
        SET batch_size = coalesce(p_batch_size, c.batch_size)
    RETURNING consumer_id INTO v_id;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION rule_nats_register_consumer(text, text, text, integer, text) IS
    'Creates the stream (if missing) and the durable consumer for a worker started with STREAM_NAME/SUBJECT/QUEUE_GROUP; '
    'returns consumer_id. An existing stream is left as configured.';

-- ---------------------------------------------------------------------------
-- Configuration change notifications: a wake-up hint for running sidecars.
-- The tables are the truth; the payload only says which table changed.
-- ---------------------------------------------------------------------------
CREATE FUNCTION rule_nats_notify_config_change()
RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('rule_nats_config_changed',
                      json_build_object('table', TG_TABLE_NAME, 'op', TG_OP)::text);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION rule_nats_notify_config_change() IS
    'Statement trigger: NOTIFY rule_nats_config_changed with {"table","op"} so sidecars reload their configuration.';

CREATE TRIGGER rule_nats_config_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_nats_config
    FOR EACH STATEMENT EXECUTE FUNCTION rule_nats_notify_config_change();
CREATE TRIGGER rule_nats_streams_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_nats_streams
    FOR EACH STATEMENT EXECUTE FUNCTION rule_nats_notify_config_change();
CREATE TRIGGER rule_nats_consumers_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_nats_consumers
    FOR EACH STATEMENT EXECUTE FUNCTION rule_nats_notify_config_change();
CREATE TRIGGER rule_webhooks_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_webhooks
    FOR EACH STATEMENT EXECUTE FUNCTION rule_nats_notify_config_change();
CREATE TRIGGER rule_webhook_secrets_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_webhook_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION rule_nats_notify_config_change();

-- ---------------------------------------------------------------------------
-- Monitoring views. Column names are a stable interface.
-- ---------------------------------------------------------------------------
CREATE VIEW nats_performance_stats AS
WITH events AS (
    SELECT 'publish'::text AS source, h.subject, NULL::text AS consumer_name,
           w.webhook_name, h.success, h.latency_ms, h.published_at AS at
      FROM rule_nats_publish_history h
      LEFT JOIN rule_webhooks w ON w.webhook_id = h.webhook_id
     WHERE h.published_at >= now() - interval '24 hours'
    UNION ALL
    SELECT 'delivery', a.subject, a.consumer_name,
           w.webhook_name, a.outcome = 'delivered', a.latency_ms, a.attempted_at
      FROM rule_nats_delivery_attempts a
      LEFT JOIN rule_webhooks w ON w.webhook_id = a.webhook_id
     WHERE a.attempted_at >= now() - interval '24 hours'
)
SELECT source,
       subject,
       consumer_name,
       webhook_name,
       count(*)                                                        AS message_count,
       count(*) FILTER (WHERE success)                                 AS success_count,
       count(*) FILTER (WHERE NOT success)                             AS failure_count,
       round(100.0 * count(*) FILTER (WHERE success) / count(*), 2)    AS success_rate_pct,
       round(avg(latency_ms)::numeric, 2)                              AS avg_latency_ms,
       round(min(latency_ms)::numeric, 2)                              AS min_latency_ms,
       round(max(latency_ms)::numeric, 2)                              AS max_latency_ms,
       round((percentile_cont(0.50) WITHIN GROUP (ORDER BY latency_ms))::numeric, 2) AS p50_latency_ms,
       round((percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms))::numeric, 2) AS p95_latency_ms,
       round((percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms))::numeric, 2) AS p99_latency_ms,
       max(at)                                                         AS last_at
  FROM events
 GROUP BY source, subject, consumer_name, webhook_name;
COMMENT ON VIEW nats_performance_stats IS
    'Last 24 hours, per source (publish from SQL, or HTTP delivery), subject, consumer and webhook: '
    'counts, success rate and latency (avg, min, max, p50, p95, p99) in milliseconds.';

CREATE VIEW nats_recent_failures AS
SELECT *
  FROM (
    SELECT 'publish'::text          AS source,
           h.published_at           AS failed_at,
           h.subject,
           w.webhook_name,
           NULL::text               AS consumer_name,
           NULL::text               AS url,
           NULL::integer            AS http_status,
           NULL::integer            AS attempt,
           NULL::text               AS outcome,
           h.error_message,
           h.message_id,
           h.publish_id             AS ref_id
      FROM rule_nats_publish_history h
      LEFT JOIN rule_webhooks w ON w.webhook_id = h.webhook_id
     WHERE NOT h.success
       AND h.published_at >= now() - interval '24 hours'
    UNION ALL
    SELECT 'delivery',
           a.attempted_at,
           a.subject,
           w.webhook_name,
           a.consumer_name,
           a.url,
           a.http_status,
           a.attempt,
           a.outcome,
           a.error,
           a.message_id,
           a.attempt_id
      FROM rule_nats_delivery_attempts a
      LEFT JOIN rule_webhooks w ON w.webhook_id = a.webhook_id
     WHERE a.outcome <> 'delivered'
       AND a.attempted_at >= now() - interval '24 hours'
  ) f
 ORDER BY failed_at DESC
 LIMIT 100;
COMMENT ON VIEW nats_recent_failures IS
    'The 100 most recent failed publishes and delivery attempts of the last 24 hours, newest first. '
    'ref_id is publish_id (source publish) or attempt_id (source delivery). Shows no payloads, headers or secrets.';

CREATE VIEW nats_publish_summary AS
SELECT h.subject,
       w.webhook_id,
       w.webhook_name,
       count(*)                                                      AS total_published,
       count(*) FILTER (WHERE h.success)                             AS successful,
       count(*) FILTER (WHERE NOT h.success)                         AS failed,
       count(*) FILTER (WHERE h.duplicate)                           AS duplicates,
       round(100.0 * count(*) FILTER (WHERE h.success) / count(*), 2) AS success_rate_pct,
       round(avg(h.latency_ms)::numeric, 2)                          AS avg_latency_ms,
       round(min(h.latency_ms)::numeric, 2)                          AS min_latency_ms,
       round(max(h.latency_ms)::numeric, 2)                          AS max_latency_ms,
       max(h.published_at)                                           AS last_published_at
  FROM rule_nats_publish_history h
  LEFT JOIN rule_webhooks w ON w.webhook_id = h.webhook_id
 GROUP BY h.subject, w.webhook_id, w.webhook_name;
COMMENT ON VIEW nats_publish_summary IS 'All publish history per subject and webhook: totals, failures, duplicates and latency.';

-- ---------------------------------------------------------------------------
-- Privileges. Nothing that writes or reveals a secret is granted to PUBLIC.
-- ---------------------------------------------------------------------------
REVOKE ALL ON FUNCTION rule_nats_consumer_update_stats(text, text, bigint, bigint, bigint, numeric) FROM PUBLIC;
REVOKE ALL ON FUNCTION rule_nats_consumer_update_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION rule_nats_register_consumer(text, text, text, integer, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION rule_nats_notify_config_change() FROM PUBLIC;
REVOKE ALL ON FUNCTION rule_nats_touch_updated_at() FROM PUBLIC;

-- admin: configures everything, reads everything, may purge history.
GRANT SELECT, INSERT, UPDATE, DELETE ON rule_nats_config, rule_nats_streams, rule_nats_consumers,
      rule_webhooks, rule_webhook_secrets TO rule_nats_admin;
GRANT SELECT, DELETE ON rule_nats_publish_history, rule_nats_delivery_attempts, rule_nats_dead_letters,
      rule_nats_consumer_stats, rule_nats_workers TO rule_nats_admin;
GRANT SELECT ON rule_nats_schema_migrations, nats_performance_stats, nats_recent_failures,
      nats_publish_summary TO rule_nats_admin;
GRANT EXECUTE ON FUNCTION rule_nats_consumer_update_stats(text, text, bigint, bigint, bigint, numeric),
      rule_nats_consumer_update_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean),
      rule_nats_register_consumer(text, text, text, integer, text) TO rule_nats_admin;

-- monitor: the views and the non-secret columns; no writes.
GRANT SELECT ON nats_performance_stats, nats_recent_failures, nats_publish_summary,
      rule_nats_schema_migrations, rule_nats_consumer_stats, rule_nats_workers, rule_nats_streams,
      rule_nats_consumers, rule_nats_publish_history, rule_nats_delivery_attempts TO rule_nats_monitor;
GRANT SELECT (config_id, config_name, nats_url, nats_cluster_urls, auth_type, nats_user, auth_credentials_file,
              tls_enabled, tls_ca_file, tls_cert_file, tls_key_file, connect_timeout_seconds,
              request_timeout_seconds, reconnect_wait_seconds, max_reconnect_attempts, description,
              created_at, updated_at) ON rule_nats_config TO rule_nats_monitor;
GRANT SELECT (webhook_id, webhook_name, url, method, timeout_seconds, retry_max_attempts, retry_initial_seconds,
              retry_max_backoff_seconds, retry_max_age_seconds, config_name, nats_subject, publish_mode,
              enabled, description, created_at, updated_at) ON rule_webhooks TO rule_nats_monitor;
GRANT SELECT (dead_letter_id, created_at, message_id, stream_name, consumer_name, stream_seq, subject,
              webhook_id, url, reason, error, attempts, first_attempt_at, last_attempt_at, replayed,
              replayed_at, replay_count) ON rule_nats_dead_letters TO rule_nats_monitor;

-- worker: reads the configuration (it must connect and sign), records outcomes.
GRANT SELECT ON rule_nats_config, rule_nats_streams, rule_nats_consumers, rule_webhooks,
      rule_webhook_secrets, rule_nats_schema_migrations TO rule_nats_worker;
GRANT SELECT, INSERT ON rule_nats_delivery_attempts, rule_nats_publish_history TO rule_nats_worker;
GRANT SELECT, INSERT, UPDATE ON rule_nats_dead_letters, rule_nats_consumer_stats, rule_nats_workers TO rule_nats_worker;
GRANT EXECUTE ON FUNCTION
      rule_nats_consumer_update_stats(text, text, text, bigint, bigint, bigint, bigint, bigint, double precision, boolean),
      rule_nats_consumer_update_stats(text, text, bigint, bigint, bigint, numeric),
      rule_nats_register_consumer(text, text, text, integer, text) TO rule_nats_worker;

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (1, 'schema');
