-- +goose Up

-- What the ingress needs to route traffic into a capsule: whether anyone
-- may reach its ports (public) or only its team and holders of its traffic
-- token; whether traffic resumes it when paused; and envd's access token,
-- which the team's clients need to talk to envd. Both tokens are sealed
-- with the control plane's encryption key.
ALTER TABLE sandboxes ADD COLUMN public boolean NOT NULL DEFAULT false;
ALTER TABLE sandboxes ADD COLUMN auto_resume boolean NOT NULL DEFAULT false;
ALTER TABLE sandboxes ADD COLUMN traffic_token text;
ALTER TABLE sandboxes ADD COLUMN envd_token text;

-- +goose Down
ALTER TABLE sandboxes DROP COLUMN envd_token;
ALTER TABLE sandboxes DROP COLUMN traffic_token;
ALTER TABLE sandboxes DROP COLUMN auto_resume;
ALTER TABLE sandboxes DROP COLUMN public;
