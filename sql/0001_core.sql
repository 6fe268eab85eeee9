-- Herald core schema: messages, their attempts, campaigns.
-- Applied by `herald migrate` in one transaction; forward-only.

CREATE TABLE campaigns (
    campaign_id   text PRIMARY KEY,
    name          text,
    max_attempts  integer CHECK (max_attempts BETWEEN 1 AND 100),
    base_delay_s  double precision CHECK (base_delay_s >= 1),
    max_delay_s   double precision CHECK (max_delay_s >= 1),
    retry_mode    text CHECK (retry_mode IN ('auto', 'manual')),
    priority      text CHECK (priority IN ('high', 'normal')),
    daily_limit   integer CHECK (daily_limit > 0),
    timezone      text NOT NULL DEFAULT 'UTC',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE messages (
    message_id          text PRIMARY KEY,
    status              text NOT NULL CHECK (status IN (
                            'queued', 'sending', 'sent', 'delivered', 'read',
                            'retrying', 'failed', 'expired', 'cancelled')),
    channel             text NOT NULL,
    recipient           text NOT NULL,
    campaign_id         text,
    payload             jsonb NOT NULL,
    -- attempts claimed so far (the attempt being made while status = 'sending')
    attempts            integer NOT NULL DEFAULT 0,
    -- attempts made before the last replay with a fresh budget (the retry
    -- budget counts attempts - attempt_base)
    attempt_base        integer NOT NULL DEFAULT 0,
    provider            text,
    provider_message_id text,
    last_error_type     text,
    last_error_code     text,
    last_error          text,
    -- the lease of the consumer making the current attempt: a redelivered
    -- copy waits for it to run out before it may send again
    claimed_by          text,
    claimed_until       timestamptz,
    next_attempt_at     timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    queued_at           timestamptz,
    sending_at          timestamptz,
    sent_at             timestamptz,
    delivered_at        timestamptz,
    read_at             timestamptz,
    retrying_at         timestamptz,
    failed_at           timestamptz,
    expired_at          timestamptz,
    cancelled_at        timestamptz
);

-- Operators' questions: "what is in status X", "how is campaign C doing",
-- "what failed with error_type E lately", and webhooks find messages by the
-- provider's id.
CREATE INDEX messages_status_idx ON messages (status, updated_at);
CREATE INDEX messages_campaign_status_idx ON messages (campaign_id, status)
    WHERE campaign_id IS NOT NULL;
CREATE INDEX messages_failed_error_type_idx ON messages (last_error_type, failed_at)
    WHERE status = 'failed';
-- Not unique: a generic HTTP endpoint may answer the same "id" for many sends.
CREATE INDEX messages_provider_message_idx ON messages (provider, provider_message_id)
    WHERE provider_message_id IS NOT NULL;

CREATE TABLE delivery_attempts (
    id                  bigserial PRIMARY KEY,
    message_id          text NOT NULL REFERENCES messages (message_id) ON DELETE CASCADE,
    attempt             integer NOT NULL,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL DEFAULT now(),
    -- sent | retrying | failed | paused (provider-wide, not charged) |
    -- abandoned (the consumer making it died before recording an outcome)
    outcome             text NOT NULL CHECK (outcome IN (
                            'sent', 'retrying', 'failed', 'paused', 'abandoned')),
    error_type          text,
    error_code          text,
    error_text          text,
    latency_ms          double precision,
    provider_message_id text
);

CREATE INDEX delivery_attempts_message_idx ON delivery_attempts (message_id, attempt);
CREATE INDEX delivery_attempts_error_type_idx ON delivery_attempts (error_type, finished_at)
    WHERE error_type IS NOT NULL;

-- Both batch functions are PL/pgSQL wrapping one set-based statement so that
-- the statement's plan is cached per connection instead of planned per call.
-- They only ever touch messages by primary key; sequential scans are switched
-- off inside them because the table grows by thousands of rows a second and
-- its statistics lag behind, which would otherwise make the planner scan it
-- whole for every batch.

-- Claim a batch of attempts (one transaction for all the messages in flight).
-- p_items: [{"idx", "message_id", "channel", "recipient", "campaign_id",
--            "payload", "attempt", "attempt_base", "owner", "lease_s"}, ...] with distinct
-- message_ids (the caller holds back a second copy of the same message).
--
-- outcome per item:
--   claimed    the caller may send (a new row, or the next attempt of a known one)
--   reclaimed  the same attempt was claimed before and never finished (its
--              consumer died): the caller may send; the earlier claim is
--              recorded as an 'abandoned' attempt, since the provider may have
--              accepted it already
--   held       another consumer holds a live lease on this very attempt (or the
--              row appeared concurrently): ask again later
--   duplicate  already sent/delivered/read/cancelled/expired: do not send
--   stale      a copy of an attempt that already has an outcome: do not send
CREATE FUNCTION herald_claim_batch(p_items jsonb)
RETURNS TABLE (idx integer, outcome text, status text, attempts integer,
               claimed_until timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH input AS (
    SELECT x.idx, x.message_id, x.channel, x.recipient, x.campaign_id, x.payload, x.attempt,
           COALESCE(x.attempt_base, 0) AS attempt_base, x.owner,
           clock_timestamp() + make_interval(secs => x.lease_s) AS lease_end
      FROM jsonb_to_recordset(p_items) AS x(
           idx integer, message_id text, channel text, recipient text, campaign_id text,
           payload jsonb, attempt integer, attempt_base integer, owner text,
           lease_s double precision)
),
inserted AS (
    INSERT INTO messages (message_id, status, channel, recipient, campaign_id, payload,
                          attempts, attempt_base, claimed_by, claimed_until, queued_at,
                          sending_at)
    SELECT message_id, 'sending', channel, recipient, campaign_id, payload, attempt,
           attempt_base, owner, lease_end, now(), now()
      FROM input
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
-- Rows that existed before this statement (this statement's own inserts are
-- not visible here), locked, with the verdict for each copy.
existing AS (
    SELECT i.idx, i.message_id, i.attempt, i.attempt_base, i.owner, i.lease_end,
           m.status, m.attempts, m.claimed_until, COALESCE(m.sending_at, m.updated_at) AS began,
           CASE
               WHEN m.status IN ('sent', 'delivered', 'read', 'cancelled', 'expired')
                   THEN 'duplicate'
               WHEN m.attempts > i.attempt OR (m.attempts = i.attempt AND m.status <> 'sending')
                   THEN 'stale'
               WHEN m.status = 'sending' AND m.attempts = i.attempt
                    AND m.claimed_until > clock_timestamp()
                   THEN 'held'
               WHEN m.status = 'sending' AND m.attempts = i.attempt
                   THEN 'reclaimed'
               ELSE 'claimed'
           END AS verdict
      FROM input i
      JOIN messages m ON m.message_id = i.message_id
       FOR UPDATE OF m
),
abandoned AS (
    INSERT INTO delivery_attempts (message_id, attempt, started_at, outcome, error_text)
    SELECT message_id, attempts, began, 'abandoned',
           'consumer stopped before recording the outcome'
      FROM existing
     WHERE verdict IN ('claimed', 'reclaimed') AND status = 'sending'
),
claimed AS (
    UPDATE messages m
       SET status = 'sending', attempts = e.attempt, attempt_base = e.attempt_base,
           claimed_by = e.owner,
           claimed_until = e.lease_end, sending_at = now(), updated_at = now(),
           next_attempt_at = NULL
      FROM existing e
     WHERE m.message_id = e.message_id AND e.verdict IN ('claimed', 'reclaimed')
)
SELECT i.idx,
       CASE WHEN ins.message_id IS NOT NULL THEN 'claimed' ELSE COALESCE(e.verdict, 'held') END,
       CASE WHEN ins.message_id IS NOT NULL OR e.verdict IN ('claimed', 'reclaimed')
            THEN 'sending' ELSE e.status END,
       CASE WHEN ins.message_id IS NOT NULL OR e.verdict IN ('claimed', 'reclaimed')
            THEN i.attempt ELSE e.attempts END,
       CASE WHEN ins.message_id IS NOT NULL OR e.verdict IN ('claimed', 'reclaimed')
            THEN i.lease_end ELSE e.claimed_until END
  FROM input i
  LEFT JOIN inserted ins ON ins.message_id = i.message_id
  LEFT JOIN existing e ON e.idx = i.idx
 ORDER BY i.idx;
END;
$$;

-- Record the outcomes of a batch of attempts (distinct message_ids), one
-- transaction. outcome: sent | retrying | failed | paused (provider-wide, not
-- charged to the message). A status that a provider event already moved past
-- 'sent' is never moved back. Returns each message's status afterwards.
CREATE FUNCTION herald_record_batch(p_items jsonb)
RETURNS TABLE (idx integer, status text)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH input AS (
    SELECT x.*, CASE x.outcome WHEN 'paused' THEN 'retrying' ELSE x.outcome END AS new_status
      FROM jsonb_to_recordset(p_items) AS x(
           idx integer, message_id text, attempt integer, outcome text,
           started_at timestamptz, latency_ms double precision, provider text,
           provider_message_id text, error_type text, error_code text, error_text text,
           next_attempt_at timestamptz)
),
recorded AS (
    INSERT INTO delivery_attempts (message_id, attempt, started_at, outcome, error_type,
                                   error_code, error_text, latency_ms, provider_message_id)
    SELECT message_id, attempt, started_at, outcome, error_type, error_code, error_text,
           latency_ms, provider_message_id
      FROM input
),
updated AS (
    UPDATE messages m SET
        status = CASE WHEN m.status IN ('delivered', 'read') THEN m.status
                      ELSE i.new_status END,
        attempts = CASE WHEN i.outcome = 'paused' THEN i.attempt - 1 ELSE m.attempts END,
        provider = COALESCE(i.provider, m.provider),
        provider_message_id = COALESCE(i.provider_message_id, m.provider_message_id),
        last_error_type = CASE WHEN i.outcome = 'sent' THEN m.last_error_type
                               ELSE i.error_type END,
        last_error_code = CASE WHEN i.outcome = 'sent' THEN m.last_error_code
                               ELSE i.error_code END,
        last_error = CASE WHEN i.outcome = 'sent' THEN m.last_error ELSE i.error_text END,
        claimed_by = NULL,
        claimed_until = NULL,
        next_attempt_at = i.next_attempt_at,
        updated_at = now(),
        sent_at = CASE WHEN i.new_status = 'sent' THEN COALESCE(m.sent_at, now())
                       ELSE m.sent_at END,
        retrying_at = CASE WHEN i.new_status = 'retrying' THEN now() ELSE m.retrying_at END,
        failed_at = CASE WHEN i.new_status = 'failed' THEN now() ELSE m.failed_at END
      FROM input i
     WHERE m.message_id = i.message_id
    RETURNING m.message_id, m.status
)
SELECT i.idx, u.status FROM input i LEFT JOIN updated u ON u.message_id = i.message_id
 ORDER BY i.idx;
END;
$$;
