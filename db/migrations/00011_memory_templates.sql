-- +goose Up

-- Templates that hold a VM's memory (a snapshot of a running or paused
-- capsule): capsules of the same shape start from it instead of booting.
-- 0: disk only.
ALTER TABLE templates ADD COLUMN memory_bytes bigint NOT NULL DEFAULT 0;
-- How a capsule's VM started: 'memory' (its template's memory) or 'boot';
-- boot_note says why one whose template has memory booted.
ALTER TABLE sandboxes ADD COLUMN started_from text NOT NULL DEFAULT '';
ALTER TABLE sandboxes ADD COLUMN boot_note text NOT NULL DEFAULT '';

-- +goose Down
ALTER TABLE sandboxes DROP COLUMN boot_note;
ALTER TABLE sandboxes DROP COLUMN started_from;
ALTER TABLE templates DROP COLUMN memory_bytes;
