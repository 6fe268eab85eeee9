-- Provider status events (webhooks), applied to messages by the events consumer.
--
-- Every event published on {prefix}.events is stored once (event_id is the
-- AMQP message id the webhook receiver gave it, so a redelivered copy is
-- recognised) together with what it did to its message (outcome):
--
--   applied     moved the message forward or set one of its timestamps
--   unchanged   the message was already there (a repeat, or behind it)
--   superseded  about an attempt that a failure report had already ended:
--               a late success report never resurrects a failed attempt
--   ignored     a failure reported after the attempt was delivered or read
--   retry, pause, park
--               a failure report that re-sent (through the delay levels),
--               re-sent without charging an attempt (provider-wide error),
--               or parked the message
--   orphan      no message had its provider message id within the bound
--   NULL        pending: the send is not recorded yet (a fast provider called
--               back before the consumer committed); the events consumer
--               applies it as soon as the provider message id is recorded.

-- A read report implies delivery: until the delivery report itself arrives,
-- delivered_at holds the read report's time and this flag says so; the
-- delivery report then replaces it, once.
ALTER TABLE messages ADD COLUMN delivered_implied boolean NOT NULL DEFAULT false;

-- Messenger watermarks cover every message to a person sent before them.
CREATE INDEX messages_messenger_recipient_idx ON messages (recipient, sending_at)
    WHERE channel = 'messenger';

CREATE TABLE provider_events (
    id                  bigserial PRIMARY KEY,
    event_id            uuid NOT NULL UNIQUE,
    provider            text NOT NULL,
    provider_message_id text,
    status              text NOT NULL CHECK (status IN ('sent', 'delivered', 'read', 'failed')),
    -- when the provider says it happened (Twilio gives no time: when Herald received it)
    occurred_at         timestamptz NOT NULL,
    stored_at           timestamptz NOT NULL DEFAULT now(),
    recipient           text,
    error_code          text,
    error_text          text,
    watermark           timestamptz,
    raw                 jsonb,
    message_id          text,
    outcome             text CHECK (outcome IN ('applied', 'unchanged', 'superseded', 'ignored',
                                                'failure', 'retry', 'pause', 'park', 'orphan')),
    applied_at          timestamptz
);

CREATE INDEX provider_events_pending_idx ON provider_events (id) WHERE outcome IS NULL;
CREATE INDEX provider_events_message_idx ON provider_events (message_id, occurred_at)
    WHERE message_id IS NOT NULL;
-- Finds the message of an earlier attempt's provider message id (superseded).
CREATE INDEX provider_events_provider_message_idx
    ON provider_events (provider, provider_message_id) WHERE message_id IS NOT NULL;
-- herald status: the watermarks that covered a Messenger message.
CREATE INDEX provider_events_watermark_idx ON provider_events (recipient, watermark)
    WHERE watermark IS NOT NULL;

-- What a failure report made Herald do, written in the transaction that
-- decided it and carried out (published) right after the commit: if the
-- process dies in between, the events consumer finds the action still
-- undone and does it then (an outbox; a second copy of a re-send is fenced
-- by the attempt number in herald_claim_batch).
CREATE TABLE event_actions (
    id           bigserial PRIMARY KEY,
    event_row    bigint NOT NULL REFERENCES provider_events (id) ON DELETE CASCADE,
    message_id   text NOT NULL REFERENCES messages (message_id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('resend', 'pause', 'park')),
    channel      text NOT NULL,
    attempt      integer NOT NULL,          -- x-herald-attempt of the copy published
    delay_s      integer NOT NULL DEFAULT 0,
    error_type   text NOT NULL,
    error_code   text,
    error_text   text,
    parked_id    uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz
);

CREATE INDEX event_actions_undone_idx ON event_actions (created_at) WHERE done_at IS NULL;

-- Apply a batch of provider events (new ones, and stored pending ones again).
-- p_events: [{"idx", "id" (stored row, or null for a new event), "event_id",
--             "provider", "provider_message_id", "status", "occurred_at",
--             "recipient", "error_code", "error_text", "watermark", "raw"}, ...]
-- in arrival order (idx). New events already stored (a redelivered copy)
-- are left out. Returns one row per event applied: its stored row, outcome
-- (NULL = pending), message, and for outcome 'failure' (a failure report
-- on a sent message, locked until the caller's transaction ends) what the
-- caller needs to decide between retry, pause and park.
--
-- Order of the rules (DESIGN.md §6): statuses only move forward
-- (sent < delivered < read), read implies delivered, a repeat changes
-- nothing, and per attempt the first terminal report wins (delivered/read
-- or failed; Twilio's "keep terminal ones sticky").
CREATE FUNCTION herald_apply_events(p_events jsonb)
RETURNS TABLE (idx integer, row_id bigint, outcome text, message_id text, channel text,
               recipient text, attempts integer, campaign_id text, payload jsonb,
               provider text, provider_message_id text, error_code text, error_text text,
               occurred_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_watermarks jsonb;
BEGIN
-- 1. Messenger watermarks: every message to the person whose send had begun
-- by the watermark. A watermark that comes while such a send is not
-- recorded yet stays pending, so that the send is covered once it is.
WITH ev AS (
    SELECT x.idx, x.status, x.occurred_at, x.recipient, x.watermark
      FROM jsonb_to_recordset(p_events) AS x(idx integer, id bigint, event_id uuid,
           provider text, status text, occurred_at timestamptz, recipient text,
           watermark timestamptz)
     WHERE x.watermark IS NOT NULL AND x.recipient IS NOT NULL
       AND x.provider = 'messenger' AND x.status IN ('delivered', 'read')
       AND (x.id IS NOT NULL
            OR NOT EXISTS (SELECT 1 FROM provider_events p WHERE p.event_id = x.event_id))
),
targets AS (
    SELECT m.message_id, m.recipient, m.status, m.sending_at, m.delivered_at,
           m.delivered_implied, m.read_at
      FROM messages m
     WHERE m.channel = 'messenger'
       AND m.recipient IN (SELECT recipient FROM ev)
       AND m.status IN ('sent', 'delivered', 'read')
       AND m.sending_at <= (SELECT max(e.watermark) FROM ev e WHERE e.recipient = m.recipient)
     ORDER BY m.message_id
       FOR UPDATE
),
covered AS (
    SELECT e.idx, e.status AS ev_status, e.occurred_at AS ev_at, t.message_id
      FROM ev e JOIN targets t ON t.recipient = e.recipient AND t.sending_at <= e.watermark
),
agg AS (
    SELECT c.message_id,
           min(c.ev_at) FILTER (WHERE c.ev_status = 'delivered') AS d_at,
           min(c.ev_at) FILTER (WHERE c.ev_status = 'read') AS r_at
      FROM covered c GROUP BY c.message_id
),
changes AS (
    SELECT a.message_id, a.d_at, a.r_at
      FROM agg a JOIN targets t USING (message_id)
     WHERE (a.r_at IS NOT NULL AND t.status <> 'read')
        OR (a.d_at IS NOT NULL AND (t.status = 'sent' OR t.delivered_implied))
),
updated AS (
    UPDATE messages m SET
        status = CASE WHEN c.r_at IS NOT NULL THEN 'read'
                      WHEN m.status = 'sent' THEN 'delivered' ELSE m.status END,
        read_at = COALESCE(m.read_at, c.r_at),
        delivered_at = CASE
            WHEN c.d_at IS NOT NULL AND (m.delivered_at IS NULL OR m.delivered_implied)
                THEN c.d_at
            WHEN m.delivered_at IS NULL THEN c.r_at
            ELSE m.delivered_at END,
        delivered_implied = CASE
            WHEN c.d_at IS NOT NULL AND (m.delivered_at IS NULL OR m.delivered_implied)
                THEN false
            WHEN m.delivered_at IS NULL THEN true
            ELSE m.delivered_implied END,
        updated_at = now()
      FROM changes c
     WHERE m.message_id = c.message_id
    RETURNING m.message_id
)
SELECT COALESCE(jsonb_agg(jsonb_build_object('idx', e.idx, 'outcome',
           CASE
               -- Applied again (harmlessly) until the waiting sends are recorded.
               WHEN EXISTS (SELECT 1 FROM messages w
                             WHERE w.channel = 'messenger' AND w.recipient = e.recipient
                               AND w.status = 'sending' AND w.sending_at <= e.watermark)
                   THEN NULL
               WHEN EXISTS (SELECT 1 FROM covered c JOIN updated u USING (message_id)
                             WHERE c.idx = e.idx) THEN 'applied'
               ELSE 'unchanged'
           END)), '[]'::jsonb)
  INTO v_watermarks
  FROM ev e;

-- 2. Events naming a provider message id, then storing every event with its outcome.
-- Each step carries the columns forward (window functions, no joins back),
-- so the plan stays linear in the batch size.
RETURN QUERY
WITH ev AS (
    SELECT x.*
      FROM jsonb_to_recordset(p_events) AS x(idx integer, id bigint, event_id uuid,
           provider text, provider_message_id text, status text, occurred_at timestamptz,
           recipient text, error_code text, error_text text, watermark timestamptz, raw jsonb)
     WHERE x.id IS NOT NULL
        OR NOT EXISTS (SELECT 1 FROM provider_events p WHERE p.event_id = x.event_id)
),
locked AS (
    SELECT m.message_id, m.provider, m.provider_message_id, m.status, m.channel, m.recipient,
           m.attempts, m.campaign_id, m.payload, m.delivered_implied
      FROM messages m
     WHERE m.provider_message_id IS NOT NULL
       AND (m.provider, m.provider_message_id) IN (
           SELECT e.provider, e.provider_message_id FROM ev e
            WHERE e.provider_message_id IS NOT NULL)
     ORDER BY m.message_id
       FOR UPDATE
),
-- Every event with the message its id names (if any).
base AS (
    SELECT DISTINCT ON (e.idx) e.*, l.message_id AS m_id, l.status AS m_status,
           l.delivered_implied AS m_implied, l.channel AS m_channel,
           l.recipient AS m_recipient, l.attempts AS m_attempts,
           l.campaign_id AS m_campaign_id, l.payload AS m_payload
      FROM ev e
      LEFT JOIN locked l ON l.provider = e.provider
                        AND l.provider_message_id = e.provider_message_id
     ORDER BY e.idx, l.message_id
),
-- Per message, the first failure and the first success report of this batch.
firsts AS (
    SELECT b.*,
           min(b.idx) FILTER (WHERE b.status = 'failed') OVER w AS first_fail,
           min(b.idx) FILTER (WHERE b.status IN ('delivered', 'read')) OVER w AS first_ok
      FROM base b
    WINDOW w AS (PARTITION BY b.m_id)
),
verdicts AS (
    SELECT f.*,
           CASE
               WHEN f.m_id IS NULL THEN NULL
               WHEN f.m_status NOT IN ('sent', 'delivered', 'read') THEN 'superseded'
               WHEN f.status = 'failed' THEN
                   CASE WHEN f.m_status <> 'sent' OR f.first_ok < f.first_fail THEN 'ignored'
                        WHEN f.idx = f.first_fail THEN 'failure'
                        ELSE 'unchanged' END
               WHEN f.status = 'sent' THEN 'unchanged'
               WHEN f.m_status = 'sent' AND f.first_fail < f.first_ok THEN 'superseded'
               ELSE 'success'
           END AS verdict
      FROM firsts f
),
-- Per message, what its success reports say (earliest time of each status).
success AS (
    SELECT v.*,
           min(v.occurred_at) FILTER (WHERE v.verdict = 'success' AND v.status = 'delivered')
               OVER w AS d_at,
           min(v.occurred_at) FILTER (WHERE v.verdict = 'success' AND v.status = 'read')
               OVER w AS r_at,
           min(v.idx) FILTER (WHERE v.verdict = 'success' AND v.status = 'delivered')
               OVER w AS d_idx,
           min(v.idx) FILTER (WHERE v.verdict = 'success' AND v.status = 'read')
               OVER w AS r_idx
      FROM verdicts v
    WINDOW w AS (PARTITION BY v.m_id)
),
changes AS (
    SELECT DISTINCT ON (s.m_id) s.m_id, s.d_at, s.r_at
      FROM success s
     WHERE s.verdict = 'success'
       AND ((s.r_at IS NOT NULL AND s.m_status <> 'read')
            OR (s.d_at IS NOT NULL AND (s.m_status = 'sent' OR s.m_implied)))
     ORDER BY s.m_id
),
updated AS (
    UPDATE messages m SET
        status = CASE WHEN c.r_at IS NOT NULL THEN 'read'
                      WHEN m.status = 'sent' THEN 'delivered' ELSE m.status END,
        read_at = COALESCE(m.read_at, c.r_at),
        delivered_at = CASE
            WHEN c.d_at IS NOT NULL AND (m.delivered_at IS NULL OR m.delivered_implied)
                THEN c.d_at
            WHEN m.delivered_at IS NULL THEN c.r_at
            ELSE m.delivered_at END,
        delivered_implied = CASE
            WHEN c.d_at IS NOT NULL AND (m.delivered_at IS NULL OR m.delivered_implied)
                THEN false
            WHEN m.delivered_at IS NULL THEN true
            ELSE m.delivered_implied END,
        updated_at = now()
      FROM changes c
     WHERE m.message_id = c.m_id
    RETURNING m.message_id
),
-- An unmatched id that an earlier event tied to a message: that message has
-- moved on to a newer attempt (a failure report re-sent it).
earlier AS (
    SELECT DISTINCT ON (s.idx) s.idx, p.message_id
      FROM success s
      JOIN provider_events p ON p.provider = s.provider
                            AND p.provider_message_id = s.provider_message_id
                            AND p.message_id IS NOT NULL
     WHERE s.m_id IS NULL AND s.provider_message_id IS NOT NULL
     ORDER BY s.idx, p.id
),
outcomes AS (
    SELECT s.*,
           COALESCE(s.m_id, er.message_id) AS message_id,
           CASE
               WHEN s.verdict = 'success' THEN
                   CASE WHEN s.status = 'read' AND s.idx = s.r_idx AND s.m_status <> 'read'
                            THEN 'applied'
                        WHEN s.status = 'delivered' AND s.idx = s.d_idx
                             AND (s.m_status = 'sent' OR s.m_implied) THEN 'applied'
                        WHEN w.outcome = 'applied' THEN 'applied'
                        ELSE 'unchanged' END
               WHEN s.verdict IS NOT NULL THEN s.verdict
               WHEN er.message_id IS NOT NULL THEN 'superseded'
               WHEN s.provider_message_id IS NOT NULL THEN NULL
               ELSE w.outcome
           END AS outcome
      FROM success s
      LEFT JOIN earlier er ON er.idx = s.idx
      LEFT JOIN jsonb_to_recordset(v_watermarks) AS w(idx integer, outcome text)
             ON w.idx = s.idx
),
inserted AS (
    INSERT INTO provider_events (event_id, provider, provider_message_id, status, occurred_at,
                                 recipient, error_code, error_text, watermark, raw,
                                 message_id, outcome, applied_at)
    SELECT o.event_id, o.provider, o.provider_message_id, o.status, o.occurred_at,
           o.recipient, o.error_code, o.error_text, o.watermark, o.raw,
           o.message_id, o.outcome, CASE WHEN o.outcome IS NOT NULL THEN now() END
      FROM outcomes o
     WHERE o.id IS NULL
    ON CONFLICT (event_id) DO NOTHING
    RETURNING provider_events.id, provider_events.event_id
),
restored AS (
    UPDATE provider_events p SET
        message_id = COALESCE(o.message_id, p.message_id),
        outcome = o.outcome,
        applied_at = CASE WHEN o.outcome IS NOT NULL THEN now() END
      FROM outcomes o
     WHERE o.id IS NOT NULL AND p.id = o.id AND p.outcome IS NULL
    RETURNING p.id
)
-- The stored row's id is only needed (and only looked up) for failures.
SELECT o.idx,
       CASE WHEN o.outcome = 'failure'
            THEN COALESCE(o.id, (SELECT i.id FROM inserted i WHERE i.event_id = o.event_id))
       END,
       o.outcome, o.message_id, o.m_channel, o.m_recipient, o.m_attempts, o.m_campaign_id,
       CASE WHEN o.outcome = 'failure' THEN o.m_payload END,
       o.provider, o.provider_message_id, o.error_code, o.error_text, o.occurred_at
  FROM outcomes o
 ORDER BY o.idx;
END;
$$;
