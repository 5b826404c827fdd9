-- +goose Up

-- An absolute deadline (E2B's timeout): at end_at a running capsule is
-- paused (auto_pause) or destroyed, whatever its activity. Capsules made
-- through /v1 have none; their timeout_sec counts idle time instead.
ALTER TABLE sandboxes ADD COLUMN end_at timestamptz;

-- +goose Down
ALTER TABLE sandboxes DROP COLUMN end_at;
