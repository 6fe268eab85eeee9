-- Retention that keeps idempotency. `herald prune` deletes finished messages,
-- but a message_id must stay "already done" after its row is gone: a retry
-- copy may still be travelling through the delay levels, a parked copy may
-- have been left in the queue by a crash before it was indexed, a publisher
-- may publish the same request again. So each pruned message leaves a
-- tombstone, and the claim treats a tombstoned message_id like a finished one.

-- A message_id as a fixed 16 bytes: the first half of its SHA-256. Tombstones
-- are the long-lived idempotency memory, so their key should not grow with
-- whatever length publishers choose (up to 200 characters); 128 bits make an
-- accidental collision (a new message taken for a pruned one) negligible and a
-- deliberate one impractical. A single SQL expression, so the planner inlines
-- it into the claim instead of calling a function per item; STABLE because
-- convert_to is (declared IMMUTABLE, it would not be inlined).
CREATE FUNCTION herald_message_key(p_message_id text) RETURNS uuid
LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$ SELECT encode(substr(sha256(convert_to(p_message_id, 'UTF8')), 1, 16), 'hex')::uuid $$;

-- One row per pruned message: about 110 bytes with its index entry, whatever
-- the message was. Kept until the message's last change is older than
-- `herald prune --forget-after` (default 365 days); the BRIN index makes
-- finding those cheap, since tombstones are written roughly in finished_at order.
CREATE TABLE message_tombstones (
    message_key  uuid PRIMARY KEY,           -- herald_message_key(message_id)
    finished_at  timestamptz NOT NULL,       -- the message's last change (updated_at)
    status       text NOT NULL               -- its status then: sent, delivered, read,
                                             -- cancelled or expired
);
CREATE INDEX message_tombstones_finished_idx ON message_tombstones USING brin (finished_at);

-- Rows written outside the claim (a deferred first attempt recorded as
-- 'queued', an expired message recorded as 'expired') must not bring a pruned
-- message back either: its history would then say queued or expired when it
-- was sent. The claim checks tombstones itself and inserts only 'sending'
-- rows, which the WHEN clause lets through without calling the function, so
-- the hot path pays nothing for this.
CREATE FUNCTION herald_skip_pruned() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM message_tombstones
                WHERE message_key = herald_message_key(NEW.message_id)) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER messages_skip_pruned BEFORE INSERT ON messages
    FOR EACH ROW WHEN (NEW.status <> 'sending') EXECUTE FUNCTION herald_skip_pruned();

-- The lock that keeps prune and claims apart (see the claim below). Its key
-- is the tombstone table's oid, so that Herald schemas sharing one database
-- (tenants, tests) do not wait for each other, moved past 2^40 so that it
-- never meets the keys of `herald migrate` or of the parking lot's passes.
CREATE FUNCTION herald_prune_lock_key() RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT 1099511627776 + 'message_tombstones'::regclass::oid::bigint $$;

-- The claim of sql/0001, plus tombstones: one primary-key probe per item
-- (input), a tombstoned message is a 'duplicate' and gets no row.
--
-- Prune and claim must not interleave: a claim that took its snapshot before
-- prune committed a tombstone could otherwise find the row deleted by the
-- time it inserts, and claim the message as new. Every claim therefore holds
-- the prune lock shared (one lock per batch, not per item) and takes the
-- snapshot of its statement after that; prune holds it exclusively while it
-- writes tombstones and deletes rows (consumer/records/retention.py).
CREATE OR REPLACE FUNCTION herald_claim_batch(p_items jsonb)
RETURNS TABLE (idx integer, outcome text, status text, attempts integer,
               claimed_until timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
PERFORM pg_advisory_xact_lock_shared(herald_prune_lock_key());
RETURN QUERY
WITH input AS (
    SELECT x.idx, x.message_id, x.channel, x.recipient, x.campaign_id, x.payload, x.attempt,
           COALESCE(x.attempt_base, 0) AS attempt_base, x.owner,
           clock_timestamp() + make_interval(secs => x.lease_s) AS lease_end,
           t.status AS pruned_status
      FROM jsonb_to_recordset(p_items) AS x(
           idx integer, message_id text, channel text, recipient text, campaign_id text,
           payload jsonb, attempt integer, attempt_base integer, owner text,
           lease_s double precision)
      LEFT JOIN message_tombstones t ON t.message_key = herald_message_key(x.message_id)
),
inserted AS (
    INSERT INTO messages (message_id, status, channel, recipient, campaign_id, payload,
                          attempts, attempt_base, claimed_by, claimed_until, queued_at,
                          sending_at)
    SELECT message_id, 'sending', channel, recipient, campaign_id, payload, attempt,
           attempt_base, owner, lease_end, now(), now()
      FROM input
     WHERE pruned_status IS NULL
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
existing AS (
    SELECT i.idx, i.message_id, i.attempt, i.attempt_base, i.owner, i.lease_end,
           m.status, m.attempts, m.claimed_until, COALESCE(m.sending_at, m.updated_at) AS began,
           CASE
               WHEN i.pruned_status IS NOT NULL
                    OR m.status IN ('sent', 'delivered', 'read', 'cancelled', 'expired')
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
       CASE WHEN ins.message_id IS NOT NULL THEN 'claimed'
            WHEN e.verdict IS NOT NULL THEN e.verdict
            WHEN i.pruned_status IS NOT NULL THEN 'duplicate'
            ELSE 'held' END,
       CASE WHEN ins.message_id IS NOT NULL OR e.verdict IN ('claimed', 'reclaimed')
            THEN 'sending' ELSE COALESCE(e.status, i.pruned_status) END,
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
