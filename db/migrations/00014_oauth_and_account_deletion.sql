-- +goose Up

-- Sign-in identities at OAuth providers (GitHub): one per provider
-- account, at most one per provider for each user.
CREATE TABLE oauth_identities (
    provider    text NOT NULL,
    provider_id text NOT NULL,
    user_id     text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, provider_id),
    UNIQUE (user_id, provider)
);

-- A user who deleted their account is 'deleted' from deleted_at until the
-- grace period ends and the row is purged. An empty password_hash is an
-- account that signs in through a provider only.
ALTER TABLE users DROP CONSTRAINT users_status_check;
ALTER TABLE users ADD CONSTRAINT users_status_check CHECK (status IN ('pending', 'active', 'disabled', 'deleted'));
ALTER TABLE users ADD COLUMN deleted_at timestamptz;

-- +goose Down
DELETE FROM users WHERE status = 'deleted';
ALTER TABLE users DROP COLUMN deleted_at;
ALTER TABLE users DROP CONSTRAINT users_status_check;
ALTER TABLE users ADD CONSTRAINT users_status_check CHECK (status IN ('pending', 'active', 'disabled'));
DROP TABLE oauth_identities;
