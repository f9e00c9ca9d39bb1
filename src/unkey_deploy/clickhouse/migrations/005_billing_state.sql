-- The billing aggregator's per-series state (billing/aggregator.py): last applied seq, last valid
-- sample, usage so far in the series' current hour, the seqs skipped after the hold timeout and
-- the checkpoint a late batch is replayed from. One row per series and flush; the largest
-- version wins, so EVERY read uses FINAL. Before this migration the aggregator created the table
-- itself (without skipped/checkpoint): IF NOT EXISTS keeps those data dirs, the ALTERs add the
-- newer columns in the same place.
CREATE TABLE IF NOT EXISTS billing_series_state
(
    vm_id String,
    instance_id String,
    customer_id String,
    vcpus UInt32,
    memory_total_bytes UInt64,
    last_seq Int64,
    has_last UInt8,
    t Int64,
    cpu_time_ns Int64,
    memory_used_bytes Int64,
    net_rx_bytes Int64,
    net_tx_bytes Int64,
    disk_read_bytes Int64,
    disk_write_bytes Int64,
    hour Int64,
    acc_cpu_ns UInt64,
    acc_mem_byte_ns Decimal(38, 0),
    acc_net_rx_bytes UInt64,
    acc_net_tx_bytes UInt64,
    acc_disk_read_bytes UInt64,
    acc_disk_write_bytes UInt64,
    acc_gap_ns UInt64,
    acc_gaps UInt64,
    acc_samples UInt64,
    skipped Array(Int64) DEFAULT [],
    checkpoint String DEFAULT '',
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (vm_id, instance_id);

ALTER TABLE billing_series_state ADD COLUMN IF NOT EXISTS skipped Array(Int64) DEFAULT [] AFTER acc_samples;

ALTER TABLE billing_series_state ADD COLUMN IF NOT EXISTS checkpoint String DEFAULT '' AFTER skipped;

-- The batches (as received) applied to a series after one of its batches was skipped: a late
-- batch is applied by replaying them from the series' checkpoint, so every hour it changes is
-- recomputed exactly as in-order delivery would have computed it. Only series with a skipped
-- batch write here. Kept 8 days: the aggregator gives up on a missing batch after 7 (its
-- late_horizon_s) and quarantines it if it comes later.
CREATE TABLE IF NOT EXISTS billing_replay_batches
(
    customer_id String,
    vm_id String,
    instance_id String,
    seq Int64,
    data String,
    received_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree
ORDER BY (vm_id, instance_id, seq)
TTL toDateTime(received_at) + INTERVAL 8 DAY;
