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
CREATE UNIQUE INDEX messages_provider_message_idx ON messages (provider, provider_message_id)
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

-- Claim attempt p_attempt of a message for the consumer p_owner.
--
-- outcome:
--   claimed    the caller may send (a new row, or the next attempt of a known one)
--   reclaimed  the same attempt was claimed before and never finished (its
--              consumer died): the caller may send; the attempt is recorded as
--              abandoned, because the provider may have accepted it already
--   held       another consumer holds a live lease on this very attempt
--   duplicate  already sent/delivered/read/cancelled/expired: do not send
--   stale      a copy of an attempt that already has an outcome: do not send
CREATE FUNCTION herald_claim(
    p_message_id text, p_channel text, p_recipient text, p_campaign_id text,
    p_payload jsonb, p_attempt integer, p_owner text, p_lease_s double precision,
    p_take_over boolean
) RETURNS TABLE (outcome text, status text, attempts integer, claimed_until timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r messages%ROWTYPE;
    lease_end timestamptz := clock_timestamp() + make_interval(secs => p_lease_s);
BEGIN
    INSERT INTO messages AS m (message_id, status, channel, recipient, campaign_id, payload,
                               attempts, claimed_by, claimed_until, queued_at, sending_at)
    VALUES (p_message_id, 'sending', p_channel, p_recipient, p_campaign_id, p_payload,
            p_attempt, p_owner, lease_end, now(), now())
    ON CONFLICT (message_id) DO NOTHING;
    IF FOUND THEN
        RETURN QUERY SELECT 'claimed'::text, 'sending'::text, p_attempt, lease_end;
        RETURN;
    END IF;

    SELECT * INTO r FROM messages m WHERE m.message_id = p_message_id FOR UPDATE;

    IF r.status IN ('sent', 'delivered', 'read', 'cancelled', 'expired') THEN
        RETURN QUERY SELECT 'duplicate'::text, r.status, r.attempts, r.claimed_until;
        RETURN;
    END IF;
    IF r.attempts > p_attempt OR (r.attempts = p_attempt AND r.status <> 'sending') THEN
        RETURN QUERY SELECT 'stale'::text, r.status, r.attempts, r.claimed_until;
        RETURN;
    END IF;
    IF r.status = 'sending' AND r.attempts = p_attempt
       AND r.claimed_until > clock_timestamp() AND NOT p_take_over THEN
        RETURN QUERY SELECT 'held'::text, r.status, r.attempts, r.claimed_until;
        RETURN;
    END IF;

    IF r.status = 'sending' THEN
        -- The attempt in progress never recorded an outcome: its consumer died.
        INSERT INTO delivery_attempts (message_id, attempt, started_at, outcome, error_text)
        VALUES (p_message_id, r.attempts, COALESCE(r.sending_at, r.updated_at), 'abandoned',
                'consumer stopped before recording the outcome');
    END IF;

    UPDATE messages m
       SET status = 'sending', attempts = p_attempt, claimed_by = p_owner,
           claimed_until = lease_end, sending_at = now(), updated_at = now(),
           next_attempt_at = NULL
     WHERE m.message_id = p_message_id;

    RETURN QUERY SELECT
        (CASE WHEN r.status = 'sending' AND r.attempts = p_attempt
              THEN 'reclaimed' ELSE 'claimed' END)::text,
        'sending'::text, p_attempt, lease_end;
END;
$$;

-- Record the outcome of attempt p_attempt (one round trip, one transaction).
-- p_outcome: sent | retrying | failed | paused. A status that a provider
-- event already moved past 'sent' is never moved back.
CREATE FUNCTION herald_record(
    p_message_id text, p_attempt integer, p_outcome text, p_started_at timestamptz,
    p_latency_ms double precision, p_provider text, p_provider_message_id text,
    p_error_type text, p_error_code text, p_error_text text, p_next_attempt_at timestamptz
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    new_status text;
BEGIN
    INSERT INTO delivery_attempts (message_id, attempt, started_at, outcome, error_type,
                                   error_code, error_text, latency_ms, provider_message_id)
    VALUES (p_message_id, p_attempt, p_started_at, p_outcome, p_error_type, p_error_code,
            p_error_text, p_latency_ms, p_provider_message_id);

    new_status := CASE p_outcome WHEN 'paused' THEN 'retrying' ELSE p_outcome END;

    UPDATE messages m SET
        status = CASE WHEN m.status IN ('delivered', 'read') THEN m.status ELSE new_status END,
        -- a provider-wide failure is not charged to the message
        attempts = CASE WHEN p_outcome = 'paused' THEN p_attempt - 1 ELSE m.attempts END,
        provider = COALESCE(p_provider, m.provider),
        provider_message_id = COALESCE(p_provider_message_id, m.provider_message_id),
        last_error_type = CASE WHEN p_outcome = 'sent' THEN m.last_error_type ELSE p_error_type END,
        last_error_code = CASE WHEN p_outcome = 'sent' THEN m.last_error_code ELSE p_error_code END,
        last_error = CASE WHEN p_outcome = 'sent' THEN m.last_error ELSE p_error_text END,
        claimed_by = NULL,
        claimed_until = NULL,
        next_attempt_at = p_next_attempt_at,
        updated_at = now(),
        sent_at = CASE WHEN new_status = 'sent' THEN COALESCE(m.sent_at, now()) ELSE m.sent_at END,
        retrying_at = CASE WHEN new_status = 'retrying' THEN now() ELSE m.retrying_at END,
        failed_at = CASE WHEN new_status = 'failed' THEN now() ELSE m.failed_at END
    WHERE m.message_id = p_message_id
    RETURNING m.status INTO new_status;
    RETURN new_status;
END;
$$;
