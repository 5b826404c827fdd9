-- +goose Up

-- The reconciler looks for running capsules past their deadline every
-- second; this keeps that a look at the running ones, however many
-- stopped capsules the table holds.
CREATE INDEX sandboxes_running ON sandboxes (end_at) WHERE status = 'running';

-- +goose Down
DROP INDEX sandboxes_running;
