-- +goose Up

-- The platform team owns the capsules platform admins run under
-- /v1/admin/capsules (as upstream Wrenn's platform team does); it has no
-- members, so no one reaches its capsules through the team routes.
INSERT INTO teams (id, name, slug) VALUES ('team-platform', 'Platform', 'platform') ON CONFLICT DO NOTHING;

-- +goose Down
DELETE FROM teams WHERE id = 'team-platform';
