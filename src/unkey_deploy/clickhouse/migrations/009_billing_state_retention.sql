-- Retention of the billing aggregator's per-series state (billing/aggregator.py, "Memory"). Every
-- VM boot is a new series, so one row per series for ever would grow without bound. expires_at:
-- when the series' state is retired, written by the aggregator as billing.series_retention_s
-- after the series' newest sample and its last batch, whichever is later. It never decreases
-- from one version of a series' row to the next: the TTL drops rows one by one at merges, and a
-- newest version dropped before an older one would let FINAL read the older state back.
-- Rows written before this migration: 400 days after their last valid sample or their write
-- (version is wall-clock ns), whichever is later: those series keep their state as before until
-- then, a one-off grace for the rows that exist at the upgrade.
ALTER TABLE billing_series_state ADD COLUMN IF NOT EXISTS expires_at DateTime('UTC') DEFAULT toDateTime(intDiv(greatest(t, toInt64(version)), 1000000000), 'UTC') + INTERVAL 400 DAY AFTER acc_samples;

-- Correctness never depends on when a merge drops a row: the aggregator reads a state that is
-- still there (expired or not) and, once it is gone, quarantines what it cannot place.
ALTER TABLE billing_series_state MODIFY TTL expires_at;
