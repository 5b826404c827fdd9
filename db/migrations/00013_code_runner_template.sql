-- +goose Up

-- The code-runner-beta image (`make images`, scripts/build-rootfs.sh
-- code-runner-beta): base with a Jupyter server on port 8888, which the
-- Wrenn Python SDK's code interpreter asks for by default.
INSERT INTO templates (id, team_id, name, type) VALUES ('tpl-code-runner-beta', NULL, 'code-runner-beta', 'base') ON CONFLICT DO NOTHING;

-- +goose Down
DELETE FROM templates WHERE id = 'tpl-code-runner-beta';
