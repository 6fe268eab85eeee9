-- The operator console (/console/): sign-in sessions, background jobs on the
-- parking lot, campaign targets, the counts its badges show per error code,
-- and audit rows written before the action they record.

-- The console writes audit rows too; the admin API and the console write a
-- row with outcome 'started' before an action runs and fill in its outcome after.
ALTER TABLE audit_log DROP CONSTRAINT audit_log_source_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_source_check
    CHECK (source IN ('api', 'cli', 'console'));

-- Signed-in browsers. The cookie carries a random session id; only its
-- SHA-256 is stored, so reading this table does not let anyone sign in.
-- token_fingerprint ties the session to the admin token that opened it:
-- removing or changing that token in HERALD_ADMIN_TOKEN ends its sessions.
CREATE TABLE console_sessions (
    session_hash      bytea PRIMARY KEY,
    label             text NOT NULL,
    role              text NOT NULL CHECK (role IN ('viewer', 'operator')),
    token_fingerprint bytea NOT NULL,
    csrf              text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    seen_at           timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    remote            text
);

CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);

-- Replays, rejects and purges started from the console (or the admin API's
-- background replays): run by the gateway process, never inside an HTTP
-- request. A job's runner holds a session advisory lock on it while it runs,
-- so a job 'running' whose lock nobody holds lost its process: it is marked
-- 'interrupted' (replay is idempotent: running it again is safe).
CREATE TABLE lot_jobs (
    id                  bigserial PRIMARY KEY,
    kind                text NOT NULL CHECK (kind IN ('replay', 'reject', 'purge')),
    state               text NOT NULL DEFAULT 'queued' CHECK (state IN (
                            'queued', 'running', 'done', 'failed', 'cancelled',
                            'interrupted')),
    -- what to do: the selection (recipients in clear, like the index), rate,
    -- reset_attempts, an edited body, a reason, an age
    params              jsonb NOT NULL,
    -- what to show people about it (recipients masked)
    summary             jsonb NOT NULL DEFAULT '{}',
    created_by          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    heartbeat_at        timestamptz,
    runner              text,
    cancel_requested_by text,
    cancel_requested_at timestamptz,
    -- progress: done of total (replayed + already delivered + skipped, or
    -- copies removed), and the report as it stands
    total               integer,
    done                integer NOT NULL DEFAULT 0,
    report              jsonb NOT NULL DEFAULT '{}',
    error               text,
    audit_id            bigint
);

CREATE INDEX lot_jobs_state_idx ON lot_jobs (state, id);

-- The targets a campaign is judged by, set by operators in the console.
CREATE TABLE campaign_targets (
    campaign_id             text PRIMARY KEY,
    min_delivered_share     double precision CHECK (min_delivered_share BETWEEN 0 AND 1),
    min_retry_success_share double precision CHECK (min_retry_success_share BETWEEN 0 AND 1),
    max_average_attempts    double precision CHECK (max_average_attempts >= 1),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    updated_by              text NOT NULL
);

-- The console's badges count parked copies per error code as well as per
-- error_type: parked_counts gets error_code in its key ('' for none), so the
-- badges of a page over a million parked copies still read a few rows.
ALTER TABLE parked_counts ADD COLUMN error_code text NOT NULL DEFAULT '';
ALTER TABLE parked_counts DROP CONSTRAINT parked_counts_pkey;
TRUNCATE parked_counts;
INSERT INTO parked_counts (channel, error_type, campaign_id, error_code, parked)
SELECT channel, error_type, COALESCE(campaign_id, ''), COALESCE(error_code, ''), count(*)
  FROM parked_messages WHERE state = 'parked'
 GROUP BY 1, 2, 3, 4;
ALTER TABLE parked_counts ADD PRIMARY KEY (channel, error_type, campaign_id, error_code);

CREATE OR REPLACE FUNCTION herald_parked_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO parked_counts AS c (channel, error_type, campaign_id, error_code, parked)
        SELECT channel, error_type, COALESCE(campaign_id, ''), COALESCE(error_code, ''),
               count(*)
          FROM new_rows WHERE state = 'parked'
         GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (channel, error_type, campaign_id, error_code)
        DO UPDATE SET parked = c.parked + EXCLUDED.parked;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO parked_counts AS c (channel, error_type, campaign_id, error_code, parked)
        SELECT channel, error_type, campaign_id, error_code, sum(change)
          FROM (SELECT channel, error_type, COALESCE(campaign_id, '') AS campaign_id,
                       COALESCE(error_code, '') AS error_code, 1 AS change
                  FROM new_rows WHERE state = 'parked'
                UNION ALL
                SELECT channel, error_type, COALESCE(campaign_id, ''),
                       COALESCE(error_code, ''), -1
                  FROM old_rows WHERE state = 'parked') AS changes
         GROUP BY 1, 2, 3, 4 HAVING sum(change) <> 0 ORDER BY 1, 2, 3, 4
        ON CONFLICT (channel, error_type, campaign_id, error_code)
        DO UPDATE SET parked = c.parked + EXCLUDED.parked;
    ELSE
        INSERT INTO parked_counts AS c (channel, error_type, campaign_id, error_code, parked)
        SELECT channel, error_type, COALESCE(campaign_id, ''), COALESCE(error_code, ''),
               -count(*)
          FROM old_rows WHERE state = 'parked'
         GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (channel, error_type, campaign_id, error_code)
        DO UPDATE SET parked = c.parked + EXCLUDED.parked;
    END IF;
    RETURN NULL;
END;
$$;

-- Filtering the lot by error code pages in parked_at order: a code badge's
-- link names its error type too (the first index); the filter form may name
-- a code alone (the second).
CREATE INDEX parked_state_error_code_idx ON parked_messages (state, error_type, error_code, parked_at);
CREATE INDEX parked_state_code_idx ON parked_messages (state, error_code, parked_at);
