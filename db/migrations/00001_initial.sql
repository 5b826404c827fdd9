-- The control plane's first schema: accounts, teams, keys, hosts,
-- capsules, templates and the audit log. IDs are text with a kind prefix
-- (usr-, team-, key-, host-, sb-, tpl-, aud-) and 64+ random bits.

-- +goose Up
CREATE TABLE settings (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id            text PRIMARY KEY,
    email         text NOT NULL,
    name          text NOT NULL DEFAULT '',
    password_hash text NOT NULL,
    is_admin      boolean NOT NULL DEFAULT false,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('pending', 'active', 'disabled')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

-- One-time tokens mailed to users (activation, password reset); only hashes are kept.
CREATE TABLE user_tokens (
    token_hash text PRIMARY KEY,
    user_id    text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind       text NOT NULL CHECK (kind IN ('activation', 'password_reset')),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);

CREATE TABLE teams (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    slug       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);

CREATE TABLE team_members (
    team_id   text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id   text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role      text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX team_members_user ON team_members (user_id);

CREATE TABLE api_keys (
    id         text PRIMARY KEY,
    team_id    text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name       text NOT NULL,
    key_hash   text NOT NULL UNIQUE,
    key_prefix text NOT NULL,
    created_by text REFERENCES users (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used  timestamptz
);
CREATE INDEX api_keys_team ON api_keys (team_id);

CREATE TABLE hosts (
    id                text PRIMARY KEY,
    type              text NOT NULL DEFAULT 'regular' CHECK (type IN ('regular', 'byoc')),
    team_id           text REFERENCES teams (id) ON DELETE CASCADE,
    provider          text,
    availability_zone text,
    arch              text,
    cpu_cores         integer,
    memory_mb         integer,
    disk_gb           integer,
    address           text,
    vmm               text,
    version           text,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'online', 'offline', 'draining', 'unreachable')),
    -- The credential the control plane presents to the agent (the host's current JWT).
    agent_token       text,
    last_heartbeat_at timestamptz,
    created_by        text REFERENCES users (id) ON DELETE SET NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE host_tags (
    host_id text NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    tag     text NOT NULL,
    PRIMARY KEY (host_id, tag)
);

CREATE TABLE host_registration_tokens (
    token_hash text PRIMARY KEY,
    host_id    text NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);

CREATE TABLE host_refresh_tokens (
    token_hash text PRIMARY KEY,
    host_id    text NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);

-- Templates: platform base images (team_id NULL) and team snapshots.
CREATE TABLE templates (
    id                text PRIMARY KEY,
    team_id           text REFERENCES teams (id) ON DELETE CASCADE,
    name              text NOT NULL,
    type              text NOT NULL CHECK (type IN ('base', 'snapshot')),
    vcpus             integer,
    memory_mb         integer,
    size_bytes        bigint NOT NULL DEFAULT 0,
    host_id           text REFERENCES hosts (id) ON DELETE SET NULL,
    source_sandbox_id text,
    metadata          jsonb NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX templates_name_key ON templates (coalesce(team_id, ''), name);
INSERT INTO templates (id, team_id, name, type) VALUES ('tpl-minimal', NULL, 'minimal', 'base');

CREATE TABLE sandboxes (
    id             text PRIMARY KEY,
    team_id        text NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    host_id        text REFERENCES hosts (id) ON DELETE SET NULL,
    template       text NOT NULL,
    status         text NOT NULL CHECK (status IN ('pending', 'starting', 'running', 'pausing', 'paused',
                       'resuming', 'stopping', 'hibernated', 'stopped', 'missing', 'error')),
    vcpus          integer NOT NULL,
    memory_mb      integer NOT NULL,
    disk_size_mb   integer,
    timeout_sec    integer NOT NULL DEFAULT 0,
    auto_pause     boolean NOT NULL DEFAULT true,
    metadata       jsonb NOT NULL DEFAULT '{}',
    guest_ip       text NOT NULL DEFAULT '',
    host_ip        text NOT NULL DEFAULT '',
    error          text NOT NULL DEFAULT '',
    created_by     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    last_active_at timestamptz,
    last_updated   timestamptz NOT NULL DEFAULT now(),
    stopped_at     timestamptz
);
CREATE INDEX sandboxes_team ON sandboxes (team_id, created_at DESC);
CREATE INDEX sandboxes_host_live ON sandboxes (host_id) WHERE status NOT IN ('stopped', 'error');

CREATE TABLE audit_logs (
    id            text PRIMARY KEY,
    team_id       text REFERENCES teams (id) ON DELETE CASCADE,
    actor_type    text NOT NULL CHECK (actor_type IN ('user', 'api_key', 'host', 'system')),
    actor_id      text NOT NULL,
    actor_name    text NOT NULL DEFAULT '',
    resource_type text NOT NULL,
    resource_id   text NOT NULL DEFAULT '',
    action        text NOT NULL,
    status        text NOT NULL CHECK (status IN ('success', 'failure')),
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_logs_team ON audit_logs (team_id, created_at DESC, id DESC);

-- +goose Down
DROP TABLE audit_logs;
DROP TABLE sandboxes;
DROP TABLE templates;
DROP TABLE host_refresh_tokens;
DROP TABLE host_registration_tokens;
DROP TABLE host_tags;
DROP TABLE hosts;
DROP TABLE api_keys;
DROP TABLE team_members;
DROP TABLE teams;
DROP TABLE user_tokens;
DROP TABLE users;
DROP TABLE settings;
