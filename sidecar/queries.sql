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

-- name: migration_set_checksum
UPDATE public.rule_nats_schema_migrations SET checksum = %(checksum)s WHERE version = %(version)s;
