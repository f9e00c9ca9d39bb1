-- Cleaned intervals (BILLING.md "Usage of an interval"): one row per pair of consecutive valid
-- samples of a series, counters as DELTAS so sum() is right, timestamp = closing sample b.t.
-- Deduplication window: a retried insert with the same insert_deduplication_token is dropped.
CREATE TABLE IF NOT EXISTS metrics_raw
(
    customer_id LowCardinality(String),
    vm_id LowCardinality(String),
    instance_id LowCardinality(String),
    timestamp DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    interval_ns UInt64 CODEC(T64, ZSTD(1)),
    cpu_time_ns UInt64 CODEC(T64, ZSTD(1)),
    cpu_usage_percent Float32 CODEC(Gorilla, ZSTD(1)),
    memory_used_bytes UInt64 CODEC(Delta, ZSTD(1)),
    memory_total_bytes UInt64 CODEC(T64, ZSTD(1)),
    vcpus UInt16 CODEC(T64, ZSTD(1)),
    network_rx_bytes UInt64 CODEC(T64, ZSTD(1)),
    network_tx_bytes UInt64 CODEC(T64, ZSTD(1)),
    disk_read_bytes UInt64 CODEC(T64, ZSTD(1)),
    disk_write_bytes UInt64 CODEC(T64, ZSTD(1)),
    mem_byte_ns UInt64 CODEC(T64, ZSTD(1)),
    gap_ns UInt64 CODEC(T64, ZSTD(1)),
    batch_id String DEFAULT '' CODEC(ZSTD(1))
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(timestamp)
ORDER BY (customer_id, vm_id, timestamp)
TTL toDateTime(timestamp) + INTERVAL 7 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000;

-- Finds which batches already have rows (exactly-once after a crash between insert and mark).
ALTER TABLE metrics_raw ADD INDEX IF NOT EXISTS idx_batch_id batch_id TYPE bloom_filter(0.01) GRANULARITY 4;
