-- +goose Up

-- Warm pools: how many ready sandboxes of a template each host keeps
-- (NULL: the host's own --warm-pools setting decides), and what each
-- host last reported of its pools.
ALTER TABLE templates ADD COLUMN warm_pool_size integer CHECK (warm_pool_size BETWEEN 0 AND 64);
ALTER TABLE hosts ADD COLUMN warm_pools jsonb NOT NULL DEFAULT '[]';

-- +goose Down
ALTER TABLE hosts DROP COLUMN warm_pools;
ALTER TABLE templates DROP COLUMN warm_pool_size;
