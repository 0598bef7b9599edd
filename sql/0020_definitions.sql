-- 0020_definitions: the current schema in one place (issue 22, finding 4).
--
--  * The current definition of every function, procedure, aggregate and view is in
--    sql/definitions/NN_area.sql, with its owner, grants and comments; the numbered migrations
--    0001-0018 defined many of them several times, and a release restated whole functions to
--    change a line. From this release on a numbered migration changes tables and data, and a
--    changed function or view is an edit of its definition file (docs/schema.md).
--  * `webhook-worker migrate` applies the numbered migrations as before, then every definition
--    file whose checksum differs from the one recorded here (all of them after a numbered
--    migration), in one transaction, under the same advisory lock. A file records itself as its
--    last statement (checksum NULL: applied by hand with psql), the tool adds the checksum.
--  * sql/schema.sql is the whole schema as pg_dump prints it (scripts/schema-dump); a test
--    fails when a fresh migration differs from it.

CREATE TABLE rule_nats_schema_definitions (
    filename    text        PRIMARY KEY,
    checksum    text,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  name        NOT NULL DEFAULT current_user,
    CONSTRAINT "filename: NN_name.sql" CHECK (filename ~ '^[0-9]{2}_[a-z0-9_]+\.sql$')
);
COMMENT ON TABLE rule_nats_schema_definitions IS
    'Applied definition files of the NATS webhook worker (one row per sql/definitions/NN_area.sql file, re-applied '
    'by webhook-worker migrate when it changes).';
COMMENT ON COLUMN rule_nats_schema_definitions.checksum IS
    'SHA-256 of the file as applied by webhook-worker migrate (NULL when applied with psql: the next migrate applies '
    'it again).';
GRANT SELECT ON rule_nats_schema_definitions TO rule_nats_admin, rule_nats_monitor, rule_nats_worker;

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (20, 'definitions');
