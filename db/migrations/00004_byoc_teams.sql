-- +goose Up

-- Bring-your-own-cloud hosts are a feature a platform admin enables per
-- team (PUT /v1/admin/teams/{id}/byoc). Teams that made BYOC hosts
-- before it existed are not enabled by this migration: their hosts take
-- no capsules until an admin enables the team.
ALTER TABLE teams ADD COLUMN is_byoc boolean NOT NULL DEFAULT false;

-- +goose Down
ALTER TABLE teams DROP COLUMN is_byoc;
