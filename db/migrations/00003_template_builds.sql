-- +goose Up

-- A template build: a recipe run in a capsule whose disk becomes a
-- template. Replicas claim queued builds with FOR UPDATE SKIP LOCKED; a
-- running build refreshes updated_at as it logs, so one whose replica died
-- is found and failed.
CREATE TABLE template_builds (
    id          text PRIMARY KEY,
    team_id     text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    -- Platform builds (by admins) make templates every team can use.
    platform    boolean NOT NULL DEFAULT false,
    name        text NOT NULL,
    recipe      jsonb NOT NULL,
    status      text NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    cancel      boolean NOT NULL DEFAULT false,
    sandbox_id  text,
    template_id text,
    logs        text NOT NULL DEFAULT '',
    error       text NOT NULL DEFAULT '',
    created_by  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX template_builds_team ON template_builds (team_id, created_at DESC);
CREATE INDEX template_builds_queued ON template_builds (created_at) WHERE status = 'queued';

-- +goose Down
DROP TABLE template_builds;
