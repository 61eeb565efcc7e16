-- A replica's restart summarises the usage records older than the ledgers replay in full, in SQL
-- (authpool_server/store/postgres_usage.py). Each sum is a range scan of one index per subscription;
-- the rarer records it looks for (provider reports, announced resets, errors, fallback) each have a
-- partial index, whose WHERE the queries repeat word for word.
CREATE INDEX IF NOT EXISTS usage_subscription_at ON usage (subscription_id, at, request_id) INCLUDE (fallback, cost_micros);
CREATE INDEX IF NOT EXISTS usage_provider_report ON usage (subscription_id, at, request_id) WHERE provider_remaining_ppm IS NOT NULL;
CREATE INDEX IF NOT EXISTS usage_provider_reset ON usage (subscription_id, at, request_id) WHERE provider_reset_at > at;
CREATE INDEX IF NOT EXISTS usage_not_ok ON usage (subscription_id, at, request_id) WHERE outcome <> 'ok';
CREATE INDEX IF NOT EXISTS usage_fallback ON usage (at, request_id) WHERE fallback;
