-- Placeholder on branch issue-19c only: helper's branch holds the real 0014_compat.sql (take theirs on merge).
INSERT INTO rule_nats_schema_migrations (version, name) VALUES (14, 'compat');
