-- +goose Up

-- The base image (`make images`, scripts/build-rootfs.sh base): Python,
-- Node.js, git and build tools, installed on every host next to minimal.
-- E2B's SDKs ask for it by default.
INSERT INTO templates (id, team_id, name, type) VALUES ('tpl-base', NULL, 'base', 'base') ON CONFLICT DO NOTHING;

-- +goose Down
DELETE FROM templates WHERE id = 'tpl-base';
