-- +goose Up

-- Builds as upstream Wrenn's: its status words, a log entry per step (with
-- phase and timing), step counters, and the user and variables the recipe
-- left, which become the template's defaults.
ALTER TABLE template_builds DROP CONSTRAINT template_builds_status_check;
UPDATE template_builds SET status = 'pending' WHERE status = 'queued';
UPDATE template_builds SET status = 'success' WHERE status = 'succeeded';
ALTER TABLE template_builds ALTER COLUMN status SET DEFAULT 'pending',
    ADD CONSTRAINT template_builds_status_check CHECK (status IN ('pending', 'running', 'success', 'failed', 'cancelled')),
    ADD COLUMN steps        jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN current_step integer NOT NULL DEFAULT 0,
    ADD COLUMN total_steps  integer NOT NULL DEFAULT 0,
    ADD COLUMN default_user text NOT NULL DEFAULT '',
    ADD COLUMN default_env  jsonb NOT NULL DEFAULT '{}';
DROP INDEX template_builds_queued;
CREATE INDEX template_builds_pending ON template_builds (created_at) WHERE status = 'pending';

-- The archive a build's COPY steps read, kept until the build ends (any
-- replica may run the build, so it cannot live in one replica's memory).
CREATE TABLE build_archives (
    build_id text PRIMARY KEY REFERENCES template_builds (id) ON DELETE CASCADE,
    filename text NOT NULL DEFAULT '',
    data     bytea NOT NULL
);

-- A template's default user and variables (from its build); capsules made
-- from it run /v1 commands as that user and start with those variables.
ALTER TABLE templates ADD COLUMN default_user text NOT NULL DEFAULT '',
    ADD COLUMN default_env jsonb NOT NULL DEFAULT '{}';
ALTER TABLE sandboxes ADD COLUMN default_user text NOT NULL DEFAULT '';

-- +goose Down
ALTER TABLE sandboxes DROP COLUMN default_user;
ALTER TABLE templates DROP COLUMN default_user, DROP COLUMN default_env;
DROP TABLE build_archives;
DROP INDEX template_builds_pending;
ALTER TABLE template_builds DROP CONSTRAINT template_builds_status_check,
    DROP COLUMN steps, DROP COLUMN current_step, DROP COLUMN total_steps, DROP COLUMN default_user, DROP COLUMN default_env;
UPDATE template_builds SET status = 'queued' WHERE status = 'pending';
UPDATE template_builds SET status = 'succeeded' WHERE status = 'success';
ALTER TABLE template_builds ALTER COLUMN status SET DEFAULT 'queued',
    ADD CONSTRAINT template_builds_status_check CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled'));
CREATE INDEX template_builds_queued ON template_builds (created_at) WHERE status = 'queued';
