-- The batch functions look messages up by primary key, one probe per item.
-- Switching off sequential scans (0001) was not enough: while the table grows
-- faster than autovacuum analyzes it, the planner may join a batch to
-- messages with a merge or hash join, which reads the whole primary-key index
-- for every batch. Measured at 10,000 rows: 5 to 6 ms of backend CPU per
-- batch whatever its size, against under 1 ms with nested loops (issue #16).
-- A batch is at most a few hundred items and every item finds at most one
-- row, so a nested loop over the index is always the right plan.
ALTER FUNCTION herald_claim_batch(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION herald_claim_batch(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION herald_record_batch(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION herald_record_batch(jsonb) SET enable_hashjoin = off;
ALTER FUNCTION herald_apply_events(jsonb) SET enable_mergejoin = off;
ALTER FUNCTION herald_apply_events(jsonb) SET enable_hashjoin = off;
