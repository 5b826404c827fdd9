-- +goose Up

-- One row per stretch of time a capsule was running. Usage and stats are
-- computed from these, so they are exact whatever path changed the state
-- (API, reconciler, a replica that died). A trigger keeps them.
CREATE TABLE sandbox_runs (
    id         bigserial PRIMARY KEY,
    sandbox_id text NOT NULL,
    team_id    text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    vcpus      integer NOT NULL,
    memory_mb  integer NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz
);
CREATE INDEX sandbox_runs_team ON sandbox_runs (team_id, started_at);
CREATE UNIQUE INDEX sandbox_runs_open ON sandbox_runs (sandbox_id) WHERE ended_at IS NULL;

-- Resource samples of running capsules, taken by the reconciler from the
-- agents; kept 24 hours.
CREATE TABLE sandbox_metrics (
    sandbox_id text NOT NULL,
    at         timestamptz NOT NULL,
    cpu_pct    double precision NOT NULL,
    mem_bytes  bigint NOT NULL,
    disk_bytes bigint NOT NULL,
    PRIMARY KEY (sandbox_id, at)
);
CREATE INDEX sandbox_metrics_at ON sandbox_metrics (at);

-- Lifecycle events (capsule, template, host), written by triggers in the
-- same transaction as the change, so none is lost. Channels and the SSE
-- stream read them in seq order; kept 7 days.
CREATE TABLE events (
    seq         bigserial PRIMARY KEY,
    id          text NOT NULL UNIQUE DEFAULT 'evt-' || md5(random()::text || clock_timestamp()::text),
    -- No foreign key: a team's deletion cascades into deleting its
    -- templates, whose trigger still records events for it.
    team_id     text,
    event       text NOT NULL,
    resource_id text NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_team ON events (team_id, seq);
CREATE INDEX events_created ON events (created_at);

-- Notification channels of a team. delivered_seq is the last event handled
-- (delivered, or given up on after retrying for a day).
CREATE TABLE channels (
    id              text PRIMARY KEY,
    team_id         text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name            text NOT NULL,
    provider        text NOT NULL,
    config          jsonb NOT NULL,
    events          text[] NOT NULL,
    delivered_seq   bigint NOT NULL DEFAULT 0,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text NOT NULL DEFAULT '',
    last_delivered_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (team_id, name)
);

-- Single-use tickets that let a browser open the SSE stream without
-- putting a long-lived credential in a URL.
CREATE TABLE event_tickets (
    token_hash text PRIMARY KEY,
    team_id    text REFERENCES teams (id) ON DELETE CASCADE,
    admin      boolean NOT NULL DEFAULT false,
    expires_at timestamptz NOT NULL
);

-- +goose StatementBegin
CREATE FUNCTION wrenn_sandbox_changed() RETURNS trigger AS $$
DECLARE
    ev text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'running' THEN
        UPDATE sandbox_runs SET ended_at = now() WHERE sandbox_id = NEW.id AND ended_at IS NULL;
    END IF;
    IF NEW.status = 'running' THEN
        INSERT INTO sandbox_runs (sandbox_id, team_id, vcpus, memory_mb, started_at)
        VALUES (NEW.id, NEW.team_id, NEW.vcpus, NEW.memory_mb, now())
        ON CONFLICT (sandbox_id) WHERE ended_at IS NULL DO NOTHING;
    END IF;
    ev := CASE
        WHEN TG_OP = 'INSERT' THEN 'capsule.created'
        WHEN NEW.status = 'running' THEN 'capsule.running'
        WHEN NEW.status = 'paused' THEN 'capsule.paused'
        WHEN NEW.status = 'stopped' THEN 'capsule.destroyed'
        WHEN NEW.status IN ('error', 'missing') THEN 'capsule.error'
    END;
    IF ev IS NOT NULL THEN
        INSERT INTO events (team_id, event, resource_id, payload)
        VALUES (NEW.team_id, ev, NEW.id, jsonb_build_object(
            'id', NEW.id, 'status', NEW.status, 'template', NEW.template, 'host_id', NEW.host_id,
            'vcpus', NEW.vcpus, 'memory_mb', NEW.memory_mb, 'metadata', NEW.metadata, 'error', NEW.error));
        PERFORM pg_notify('wrenn_events', NEW.team_id);
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
-- +goose StatementEnd
CREATE TRIGGER sandbox_changed AFTER INSERT OR UPDATE OF status ON sandboxes
    FOR EACH ROW EXECUTE FUNCTION wrenn_sandbox_changed();

-- +goose StatementBegin
CREATE FUNCTION wrenn_host_changed() RETURNS trigger AS $$
DECLARE
    ev text;
BEGIN
    IF NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NEW;
    END IF;
    ev := CASE
        WHEN NEW.status = 'online' THEN 'host.up'
        WHEN NEW.status IN ('unreachable', 'offline') THEN 'host.down'
    END;
    IF ev IS NOT NULL THEN
        INSERT INTO events (team_id, event, resource_id, payload)
        VALUES (NEW.team_id, ev, NEW.id, jsonb_build_object('id', NEW.id, 'status', NEW.status, 'address', NEW.address));
        PERFORM pg_notify('wrenn_events', coalesce(NEW.team_id, ''));
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
-- +goose StatementEnd
CREATE TRIGGER host_changed AFTER UPDATE OF status ON hosts
    FOR EACH ROW EXECUTE FUNCTION wrenn_host_changed();

-- +goose StatementBegin
CREATE FUNCTION wrenn_template_changed() RETURNS trigger AS $$
DECLARE
    row templates;
BEGIN
    IF TG_OP = 'DELETE' THEN row := OLD; ELSE row := NEW; END IF;
    IF row.type <> 'snapshot' OR row.team_id IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO events (team_id, event, resource_id, payload)
    VALUES (row.team_id,
            CASE WHEN TG_OP = 'DELETE' THEN 'template.snapshot.deleted' ELSE 'template.snapshot.created' END,
            row.name, jsonb_build_object('name', row.name, 'source_sandbox_id', row.source_sandbox_id));
    PERFORM pg_notify('wrenn_events', row.team_id);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
-- +goose StatementEnd
CREATE TRIGGER template_changed AFTER INSERT OR DELETE ON templates
    FOR EACH ROW EXECUTE FUNCTION wrenn_template_changed();

-- +goose Down
DROP TRIGGER template_changed ON templates;
DROP FUNCTION wrenn_template_changed();
DROP TRIGGER host_changed ON hosts;
DROP FUNCTION wrenn_host_changed();
DROP TRIGGER sandbox_changed ON sandboxes;
DROP FUNCTION wrenn_sandbox_changed();
DROP TABLE event_tickets;
DROP TABLE channels;
DROP TABLE events;
DROP TABLE sandbox_metrics;
DROP TABLE sandbox_runs;
