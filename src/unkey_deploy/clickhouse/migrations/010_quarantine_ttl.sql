-- Quarantined samples are kept 400 days after they were quarantined, whatever their own time:
-- the TTL counted from the sample's timestamp, so a merge dropped at once every row of old
-- usage that was quarantined (an import of old samples for an unknown customer, a batch of a
-- retired series, a sample with an absurd time), which had been acked: "never lost" held only
-- for recent samples.
ALTER TABLE metrics_quarantine MODIFY TTL toDateTime(received_at) + INTERVAL 400 DAY;
