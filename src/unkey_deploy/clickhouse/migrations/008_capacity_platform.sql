-- Platform-wide capacity planning per hour from a projection of capacity_hourly. Without it the
-- query merges one t-digest per customer-hour (50 customers x 24 h = 1,200 states of ~4 KB):
-- measured 25-60 ms p50 and > 100 ms p95 on this shared 2-core machine. The projection keeps
-- one state per hour per part, so the same query reads ~25 states (~6 ms); ClickHouse picks it
-- automatically for reads with no customer condition (queries.SQL_CAPACITY). Per-customer reads
-- keep using the table's sort key. The p95 is the same t-digest estimate merged in another
-- order (measured: 23 of 24 hours identical, one 0.002 points apart).
-- Merges of this AggregatingMergeTree rebuild the projection from the merged rows (the default
-- mode refuses projections on engines whose merges combine rows).
ALTER TABLE capacity_hourly MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE capacity_hourly ADD PROJECTION IF NOT EXISTS p_platform
(
    SELECT
        hour,
        quantileTDigestMerge(0.95)(cpu_p95),
        max(cpu_max),
        max(mem_max),
        uniqExactMerge(active_vms),
        sum(sample_count)
    GROUP BY hour
);

-- Existing parts get the projection too (a background mutation; until it is done the query reads
-- those parts' rows, with the same answer).
ALTER TABLE capacity_hourly MATERIALIZE PROJECTION p_platform;
