-- PLACEHOLDER on branch issue-19b only, so that 0016_identities applies (migration numbers may not
-- have gaps). The real 0014_compat comes from another branch: when merging, take that one and drop this.
INSERT INTO rule_nats_schema_migrations (version, name) VALUES (14, 'compat');
