-- 0014: reserved for issue 18 (helper 18's sql/0014_compat.sql). This placeholder only lets
-- 0015_bulkheads run on the issue-19a branch (migrate refuses gaps); drop it when merging 0014_compat.

INSERT INTO rule_nats_schema_migrations (version, name) VALUES (14, 'reserved');
