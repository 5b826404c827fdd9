-- +goose Up

-- Failed logins per account, for a growing wait after repeated failures
-- that every replica sees.
ALTER TABLE users ADD COLUMN failed_logins integer NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN login_blocked_until timestamptz;
-- A user's JWTs carry this number; a password change or reset, and a
-- deactivation, raise it and so end every session issued before.
ALTER TABLE users ADD COLUMN session_epoch integer NOT NULL DEFAULT 0;

-- A user's JWT for a team carries its membership's key: a user removed
-- and added back is a new membership, and the old tokens stay dead.
ALTER TABLE team_members ADD COLUMN session_key uuid NOT NULL DEFAULT gen_random_uuid();

-- A ticket opens the one stream (path) it was issued for, and only while
-- the credential it was issued to (a user's session, an API key) lasts.
ALTER TABLE event_tickets ADD COLUMN scope text NOT NULL DEFAULT '/v1/events/stream';
ALTER TABLE event_tickets ADD COLUMN user_id text;
ALTER TABLE event_tickets ADD COLUMN key_id text;
ALTER TABLE event_tickets ADD COLUMN session_epoch integer NOT NULL DEFAULT 0;
ALTER TABLE event_tickets ADD COLUMN membership text NOT NULL DEFAULT '';

-- +goose Down
ALTER TABLE event_tickets DROP COLUMN membership;
ALTER TABLE event_tickets DROP COLUMN session_epoch;
ALTER TABLE event_tickets DROP COLUMN key_id;
ALTER TABLE event_tickets DROP COLUMN user_id;
ALTER TABLE event_tickets DROP COLUMN scope;
ALTER TABLE team_members DROP COLUMN session_key;
ALTER TABLE users DROP COLUMN session_epoch;
ALTER TABLE users DROP COLUMN login_blocked_until;
ALTER TABLE users DROP COLUMN failed_logins;
