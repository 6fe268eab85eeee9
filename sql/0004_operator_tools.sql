-- Operator tools: replaying the parking lot, the per-message history of what
-- people did, the audit log of mutating calls, and the statistics views.

-- A parked copy whose message was delivered meanwhile (a late webhook) is not
-- replayed but 'resolved'.
ALTER TABLE parked_messages DROP CONSTRAINT parked_messages_state_check;
ALTER TABLE parked_messages ADD CONSTRAINT parked_messages_state_check
    CHECK (state IN ('parked', 'replayed', 'rejected', 'purged', 'resolved'));

ALTER TABLE parked_messages
    -- The attempt number a replay gives this copy, fixed before it is
    -- published: a replay interrupted after the publish and before the ack
    -- publishes the same attempt again, which the claim turns into no second send.
    ADD COLUMN replay_attempt integer,
    -- An operator's edited request (herald parked replay --set-body/--set-request),
    -- published instead of the original bytes, which stay in `body`.
    ADD COLUMN replay_body bytea,
    ADD COLUMN resolved_by text;

-- Parked copies per (channel, error_type, campaign), kept by statement
-- triggers, so that `herald parked list` answers its counts per error_type
-- from a few rows however large the lot is. campaign_id '' stands for none
-- (it is part of the key). Each statement folds its rows into one change per
-- key, applied in key order (two statements never wait on each other's keys
-- in opposite orders).
CREATE TABLE parked_counts (
    channel     text NOT NULL,
    error_type  text NOT NULL,
    campaign_id text NOT NULL,
    parked      bigint NOT NULL,
    PRIMARY KEY (channel, error_type, campaign_id)
);

INSERT INTO parked_counts (channel, error_type, campaign_id, parked)
SELECT channel, error_type, COALESCE(campaign_id, ''), count(*)
  FROM parked_messages WHERE state = 'parked'
 GROUP BY 1, 2, 3;

CREATE FUNCTION herald_parked_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO parked_counts AS c (channel, error_type, campaign_id, parked)
        SELECT channel, error_type, COALESCE(campaign_id, ''), count(*)
          FROM new_rows WHERE state = 'parked'
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (channel, error_type, campaign_id)
        DO UPDATE SET parked = c.parked + EXCLUDED.parked;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO parked_counts AS c (channel, error_type, campaign_id, parked)
        SELECT channel, error_type, campaign_id, sum(change)
          FROM (SELECT channel, error_type, COALESCE(campaign_id, '') AS campaign_id,
                       1 AS change
                  FROM new_rows WHERE state = 'parked'
                UNION ALL
                SELECT channel, error_type, COALESCE(campaign_id, ''), -1
                  FROM old_rows WHERE state = 'parked') AS changes
         GROUP BY 1, 2, 3 HAVING sum(change) <> 0 ORDER BY 1, 2, 3
        ON CONFLICT (channel, error_type, campaign_id)
        DO UPDATE SET parked = c.parked + EXCLUDED.parked;
    ELSE
        INSERT INTO parked_counts AS c (channel, error_type, campaign_id, parked)
        SELECT channel, error_type, COALESCE(campaign_id, ''), -count(*)
          FROM old_rows WHERE state = 'parked'
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (channel, error_type, campaign_id)
        DO UPDATE SET parked = c.parked + EXCLUDED.parked;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER parked_counts_insert AFTER INSERT ON parked_messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION herald_parked_counts();
CREATE TRIGGER parked_counts_update AFTER UPDATE ON parked_messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION herald_parked_counts();
CREATE TRIGGER parked_counts_delete AFTER DELETE ON parked_messages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION herald_parked_counts();

-- What people did to a message or a parked copy: its history next to the
-- delivery attempts (herald parked show).
CREATE TABLE message_actions (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    message_id  text,
    parked_id   uuid,
    action      text NOT NULL CHECK (action IN (
                    'indexed', 'edited', 'replayed', 'resolved', 'rejected', 'purged')),
    actor       text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX message_actions_message_idx ON message_actions (message_id, at)
    WHERE message_id IS NOT NULL;
CREATE INDEX message_actions_parked_idx ON message_actions (parked_id)
    WHERE parked_id IS NOT NULL;

-- Every mutating operator call (admin API and CLI): when, what, who, how many.
CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    source    text NOT NULL CHECK (source IN ('api', 'cli')),
    actor     text NOT NULL,            -- the admin token's label, or cli:<os user>
    action    text NOT NULL,            -- e.g. parked.replay, parked.reject
    params    jsonb NOT NULL DEFAULT '{}',
    affected  integer NOT NULL DEFAULT 0,
    outcome   text NOT NULL             -- ok, or the error that stopped it
);

CREATE INDEX audit_log_at_idx ON audit_log (at);

-- Failed attempts (retried, parked, or paused by a provider-wide error) by
-- campaign and error_type; messages_failed counts the messages that ended
-- 'failed' with that error_type as their last.
CREATE VIEW failed_deliveries_summary AS
SELECT m.campaign_id,
       a.error_type,
       count(*) AS failed_attempts,
       count(DISTINCT a.message_id) AS messages_affected,
       count(DISTINCT a.message_id) FILTER (
           WHERE m.status = 'failed' AND m.last_error_type = a.error_type) AS messages_failed,
       min(a.finished_at) AS first_failure_at,
       max(a.finished_at) AS last_failure_at
  FROM delivery_attempts a
  JOIN messages m ON m.message_id = a.message_id
 WHERE a.error_type IS NOT NULL AND a.outcome IN ('retrying', 'failed', 'paused')
 GROUP BY m.campaign_id, a.error_type;

-- How each attempt number fares: of the attempts made as number N, how many
-- were sent, retried again, parked.
CREATE VIEW retry_effectiveness AS
SELECT m.campaign_id,
       a.attempt,
       count(*) FILTER (WHERE a.outcome IN ('sent', 'retrying', 'failed')) AS attempts,
       count(*) FILTER (WHERE a.outcome = 'sent') AS sent,
       count(*) FILTER (WHERE a.outcome = 'retrying') AS retried,
       count(*) FILTER (WHERE a.outcome = 'failed') AS failed,
       count(*) FILTER (WHERE a.outcome = 'paused') AS paused,
       count(*) FILTER (WHERE a.outcome = 'abandoned') AS abandoned
  FROM delivery_attempts a
  JOIN messages m ON m.message_id = a.message_id
 GROUP BY m.campaign_id, a.attempt;

-- Per campaign, of the messages that were attempted at least once: how many
-- succeeded on the first attempt, how many needed more, and the totals the
-- rates are made of. messages.attempts is the last attempt's number (a
-- replay continues the numbering), so it is the number of attempts made.
CREATE VIEW first_attempt_success AS
SELECT m.campaign_id,
       count(*) AS attempted,
       count(*) FILTER (WHERE m.status IN ('sent', 'delivered', 'read')) AS succeeded,
       count(*) FILTER (
           WHERE m.status IN ('sent', 'delivered', 'read') AND m.attempts = 1) AS sent_first_attempt,
       count(*) FILTER (WHERE m.attempts > 1) AS needed_retries,
       count(*) FILTER (
           WHERE m.status IN ('sent', 'delivered', 'read') AND m.attempts > 1) AS recovered_by_retries,
       count(*) FILTER (
           WHERE m.status IN ('sent', 'delivered', 'read', 'failed', 'expired', 'cancelled'))
           AS finished,
       sum(m.attempts) AS total_attempts,
       round(count(*) FILTER (
           WHERE m.status IN ('sent', 'delivered', 'read') AND m.attempts = 1)::numeric
           / count(*), 4) AS first_attempt_success_rate
  FROM messages m
 WHERE m.attempts > 0
 GROUP BY m.campaign_id;
