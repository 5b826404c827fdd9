-- +goose Up

-- Per-team overrides of the platform's quotas (NULL: the platform
-- default; 0: no limit): live capsules, and the vCPUs, memory and disk
-- they hold.
ALTER TABLE teams ADD COLUMN max_capsules integer CHECK (max_capsules >= 0);
ALTER TABLE teams ADD COLUMN max_vcpus integer CHECK (max_vcpus >= 0);
ALTER TABLE teams ADD COLUMN max_memory_mb integer CHECK (max_memory_mb >= 0);
ALTER TABLE teams ADD COLUMN max_disk_mb integer CHECK (max_disk_mb >= 0);

-- +goose Down
ALTER TABLE teams DROP COLUMN max_disk_mb;
ALTER TABLE teams DROP COLUMN max_memory_mb;
ALTER TABLE teams DROP COLUMN max_vcpus;
ALTER TABLE teams DROP COLUMN max_capsules;
