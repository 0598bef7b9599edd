-- PLACEHOLDER on branch issue-19b only, so that 0016_identities applies (migration numbers may not
-- have gaps). The real 0015_bulkheads comes from another branch: when merging, take that one and drop this.
INSERT INTO rule_nats_schema_migrations (version, name) VALUES (15, 'bulkheads');
