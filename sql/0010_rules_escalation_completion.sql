-- Retry rules per error code, escalation of parked messages to people, and
-- campaigns that finish (issue #18).

-- 1. Retry rules ---------------------------------------------------------------------------
-- The operator's rules (campaign_id NULL: every message) and campaigns' own
-- (consumer.delivery.rules): the budget of attempts and the delays of one
-- kind of failure. The shipped rules live in the code; a row here with the
-- same selector wins over the shipped one.
CREATE TABLE retry_rules (
    id            bigserial PRIMARY KEY,
    campaign_id   text CHECK (length(campaign_id) BETWEEN 1 AND 200),
    channel       text CHECK (channel IN ('http', 'sms', 'whatsapp', 'messenger')),
    error_type    text CHECK (error_type IN ('rate_limit', 'network', 'provider_error')),
    error_code    text CHECK (length(error_code) BETWEEN 1 AND 100),
    max_attempts  integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    base_delay_s  double precision CHECK (base_delay_s BETWEEN 1 AND 262143),
    max_delay_s   double precision CHECK (max_delay_s BETWEEN 1 AND 262143),
    note          text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    updated_by    text NOT NULL,
    CHECK (channel IS NOT NULL OR error_type IS NOT NULL OR error_code IS NOT NULL)
);

CREATE UNIQUE INDEX retry_rules_selector_idx ON retry_rules (
    COALESCE(campaign_id, ''), COALESCE(channel, ''), COALESCE(error_type, ''),
    COALESCE(error_code, ''));

-- The rule that decided a failed attempt (retried or parked it), as
-- `herald stats` and `herald status` show it.
ALTER TABLE delivery_attempts ADD COLUMN retry_rule text;

CREATE INDEX delivery_attempts_rule_idx ON delivery_attempts (retry_rule, finished_at)
    WHERE retry_rule IS NOT NULL;

-- herald_record_batch of 0001, also storing each item's retry_rule.
CREATE OR REPLACE FUNCTION herald_record_batch(p_items jsonb)
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
           next_attempt_at timestamptz, retry_rule text)
),
recorded AS (
    INSERT INTO delivery_attempts (message_id, attempt, started_at, outcome, error_type,
                                   error_code, error_text, latency_ms, provider_message_id,
                                   retry_rule)
    SELECT message_id, attempt, started_at, outcome, error_type, error_code, error_text,
           latency_ms, provider_message_id, retry_rule
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

-- 2. Escalation ----------------------------------------------------------------------------
-- Who is told about parked messages, through Herald's own channels (an http
-- endpoint such as a chat's incoming webhook, an SMS or WhatsApp number):
-- parked messages matching a rule (NULL matches anything) are counted per
-- window of window_s seconds, and each window with any becomes one digest,
-- sent as an ordinary send request (consumer.escalation).
CREATE TABLE escalation_rules (
    id             bigserial PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    channel        text CHECK (channel IN ('http', 'sms', 'whatsapp', 'messenger')),
    error_type     text,
    campaign_id    text,
    target_channel text NOT NULL CHECK (target_channel IN ('http', 'sms', 'whatsapp',
                                                          'messenger')),
    target         text NOT NULL CHECK (length(target) BETWEEN 1 AND 2048),
    window_s       integer NOT NULL CHECK (window_s BETWEEN 1 AND 86400),
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text NOT NULL
);

-- One row per rule and window that had parked messages. 'open' while the
-- window counts; 'closed' once its digest is built (the row lock taken to
-- close it makes a count that arrives meanwhile wait, then go to the next
-- window); 'sent' once the digest's send request is confirmed by the broker.
CREATE TABLE escalation_digests (
    rule_id      bigint NOT NULL REFERENCES escalation_rules (id) ON DELETE CASCADE,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    state        text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed', 'sent')),
    parked       bigint NOT NULL DEFAULT 0,
    message_id   text,
    closed_at    timestamptz,
    sent_at      timestamptz,
    PRIMARY KEY (rule_id, window_start)
);

CREATE INDEX escalation_digests_due_idx ON escalation_digests (window_end)
    WHERE state <> 'sent';

-- What a digest says: parked messages per campaign ('' for none), channel and error_type.
CREATE TABLE escalation_counts (
    rule_id      bigint NOT NULL,
    window_start timestamptz NOT NULL,
    campaign_id  text NOT NULL,
    channel      text NOT NULL,
    error_type   text NOT NULL,
    parked       bigint NOT NULL,
    PRIMARY KEY (rule_id, window_start, campaign_id, channel, error_type),
    FOREIGN KEY (rule_id, window_start) REFERENCES escalation_digests ON DELETE CASCADE
);

-- Parking notices already counted: a notice the broker delivers again (its
-- consumer died after the commit, before the ack) is not counted twice.
-- Pruned after a day by the escalation component.
CREATE TABLE escalation_seen (
    parked_id uuid PRIMARY KEY,
    seen_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX escalation_seen_at_idx ON escalation_seen (seen_at);

-- Count a batch of parking notices into their rules' open windows.
-- p_notices: [{"parked_id", "channel", "error_type", "campaign_id"}, ...].
-- Notices of escalation messages (campaign p_reserved) are never counted: an
-- escalation that cannot be delivered is parked like any message but never
-- escalates itself. A window is chosen by the time of counting; when its
-- digest was closed meanwhile (its row lock made this statement wait), the
-- notice goes to the next window. Returns the notices counted per rule.
CREATE FUNCTION herald_escalation_count(p_notices jsonb, p_reserved text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    pending jsonb;
    counted integer := 0;
    rounds integer := 0;
BEGIN
    WITH input AS (
        SELECT DISTINCT ON (x.parked_id) x.*
          FROM jsonb_to_recordset(p_notices) AS x(parked_id uuid, channel text,
               error_type text, campaign_id text)
         WHERE x.parked_id IS NOT NULL AND x.campaign_id IS DISTINCT FROM p_reserved
         ORDER BY x.parked_id
    ),
    matches AS (
        SELECT i.parked_id, r.id AS rule_id, r.window_s, COALESCE(i.campaign_id, '') AS campaign_id,
               i.channel, i.error_type
          FROM input i
          JOIN escalation_rules r ON (r.channel IS NULL OR r.channel = i.channel)
                                 AND (r.error_type IS NULL OR r.error_type = i.error_type)
                                 AND (r.campaign_id IS NULL OR r.campaign_id = i.campaign_id)
    ),
    -- Only notices some rule wants are remembered.
    fresh AS (
        INSERT INTO escalation_seen (parked_id)
        SELECT DISTINCT parked_id FROM matches ORDER BY parked_id
        ON CONFLICT DO NOTHING
        RETURNING parked_id
    )
    SELECT COALESCE(jsonb_agg(jsonb_build_object(
               'rule_id', m.rule_id, 'window_s', m.window_s, 'campaign_id', m.campaign_id,
               'channel', m.channel, 'error_type', m.error_type)), '[]'::jsonb)
      INTO pending
      FROM matches m JOIN fresh f ON f.parked_id = m.parked_id;

    WHILE jsonb_array_length(pending) > 0 LOOP
        rounds := rounds + 1;
        IF rounds > 10 THEN
            RAISE EXCEPTION 'escalation windows keep closing under the count';
        END IF;
        WITH items AS (
            SELECT x.*, to_timestamp(floor(extract(epoch FROM clock_timestamp())
                                           / x.window_s) * x.window_s) AS window_start
              FROM jsonb_to_recordset(pending) AS x(rule_id bigint, window_s integer,
                   campaign_id text, channel text, error_type text)
        ),
        opened AS (
            INSERT INTO escalation_digests AS d (rule_id, window_start, window_end, parked)
            SELECT rule_id, window_start,
                   window_start + make_interval(secs => min(window_s)), count(*)
              FROM items GROUP BY rule_id, window_start ORDER BY rule_id, window_start
            ON CONFLICT (rule_id, window_start)
            DO UPDATE SET parked = d.parked + EXCLUDED.parked WHERE d.state = 'open'
            RETURNING d.rule_id, d.window_start
        ),
        added AS (
            INSERT INTO escalation_counts AS c (rule_id, window_start, campaign_id, channel,
                                                error_type, parked)
            SELECT i.rule_id, i.window_start, i.campaign_id, i.channel, i.error_type, count(*)
              FROM items i JOIN opened o USING (rule_id, window_start)
             GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
            ON CONFLICT (rule_id, window_start, campaign_id, channel, error_type)
            DO UPDATE SET parked = c.parked + EXCLUDED.parked
            RETURNING c.parked
        )
        SELECT COALESCE(jsonb_agg(to_jsonb(i) - 'window_start')
                        FILTER (WHERE o.rule_id IS NULL), '[]'::jsonb),
               counted + count(*) FILTER (WHERE o.rule_id IS NOT NULL)::integer
          INTO pending, counted
          FROM items i LEFT JOIN opened o USING (rule_id, window_start);
    END LOOP;
    RETURN counted;
END;
$$;

-- 3. Campaigns that finish -----------------------------------------------------------------
-- A campaign is complete when none of its messages is queued, sending or
-- retrying and nothing happened to it in the pipeline for a quiet period
-- (HERALD_CAMPAIGN_QUIET_S), which covers messages published but not yet
-- consumed (they have no row). consumer.records.completion keeps this
-- table from a periodic pass over the messages changed since the last one.
CREATE TABLE campaign_completion (
    campaign_id         text PRIMARY KEY,
    state               text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'completed')),
    first_seen_at       timestamptz NOT NULL DEFAULT now(),
    -- the latest pipeline event of any of its messages (queued, claimed, sent,
    -- retried, parked, expired; not delivery or read reports)
    last_activity_at    timestamptz NOT NULL,
    completed_at        timestamptz,
    completions         integer NOT NULL DEFAULT 0,
    reopened_at         timestamptz,
    counters            jsonb,
    notice_published_at timestamptz
);

CREATE INDEX campaign_completion_open_idx ON campaign_completion (last_activity_at)
    WHERE state = 'open';
CREATE INDEX campaign_completion_unpublished_idx ON campaign_completion (completed_at)
    WHERE state = 'completed' AND notice_published_at IS NULL;

-- Where the last pass stopped; its row lock lets one replica pass at a time.
CREATE TABLE campaign_watch (
    id         integer PRIMARY KEY CHECK (id = 1),
    scanned_to timestamptz NOT NULL
);

INSERT INTO campaign_watch (id, scanned_to) VALUES (1, now());
