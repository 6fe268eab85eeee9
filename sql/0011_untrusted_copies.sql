-- Copies of a message carry their attempt number and attempt base in AMQP
-- headers that Herald sets; a publisher can set them too. The claim no longer
-- takes them on trust:
--
-- * a live lease holds every later copy, whatever attempt number it claims:
--   one message is never sent by two consumers at once (before, a copy with
--   a higher attempt number took over a lease still running);
-- * a message that ended 'failed' (parked) is claimed again only by the copy
--   of a replay, recognised by the attempt number the replay fixed in
--   parked_messages.replay_attempt; any other copy is 'stale';
-- * a fresh budget (x-herald-attempt-base above the stored one) is granted
--   only to such a replay copy; any other copy keeps the stored base. The
--   granted base is returned, and the pipeline counts the retry budget from it.
--
-- And the parking lot's index keeps at most HERALD_MAX_BODY_BYTES of a
-- parked body (the parking queue keeps all of it): body_size is the whole
-- body's size when the stored one was cut, NULL when it is whole.

ALTER TABLE parked_messages ADD COLUMN body_size integer;

DROP FUNCTION herald_claim_batch(jsonb);

-- Claim a batch of attempts (see 0001 for the input and the outcomes, 0009
-- for tombstones and the prune lock, kept here as they were).
-- Returns, besides 0001's columns, attempt_base: the base the claim granted.
CREATE FUNCTION herald_claim_batch(p_items jsonb)
RETURNS TABLE (idx integer, outcome text, status text, attempts integer,
               claimed_until timestamptz, attempt_base integer)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
PERFORM pg_advisory_xact_lock_shared(herald_prune_lock_key());
RETURN QUERY
WITH raw AS (
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
input AS (
    -- First attempts (nearly all traffic) never need the lookup; the others use
    -- parked_message_id_idx.
    SELECT r.*,
           r.attempt > 1 AND EXISTS (
               SELECT 1 FROM parked_messages p
                WHERE p.message_id = r.message_id AND p.replay_attempt = r.attempt
           ) AS replayed
      FROM raw r
),
inserted AS (
    INSERT INTO messages (message_id, status, channel, recipient, campaign_id, payload,
                          attempts, attempt_base, claimed_by, claimed_until, queued_at,
                          sending_at)
    SELECT message_id, 'sending', channel, recipient, campaign_id, payload, attempt,
           CASE WHEN replayed THEN attempt_base ELSE 0 END, owner, lease_end, now(), now()
      FROM input
     WHERE pruned_status IS NULL
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id, attempt_base
),
existing AS (
    SELECT i.idx, i.message_id, i.attempt, i.owner, i.lease_end,
           CASE WHEN i.replayed THEN i.attempt_base ELSE m.attempt_base END AS granted_base,
           m.status, m.attempts, m.attempt_base AS stored_base, m.claimed_until,
           COALESCE(m.sending_at, m.updated_at) AS began,
           CASE
               WHEN i.pruned_status IS NOT NULL
                    OR m.status IN ('sent', 'delivered', 'read', 'cancelled', 'expired')
                   THEN 'duplicate'
               WHEN m.attempts > i.attempt OR (m.attempts = i.attempt AND m.status <> 'sending')
                   THEN 'stale'
               WHEN m.status = 'sending' AND m.claimed_until > clock_timestamp()
                   THEN 'held'
               WHEN m.status = 'failed' AND NOT i.replayed
                   THEN 'stale'
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
       SET status = 'sending', attempts = e.attempt, attempt_base = e.granted_base,
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
            THEN i.lease_end ELSE e.claimed_until END,
       CASE WHEN ins.message_id IS NOT NULL THEN ins.attempt_base
            WHEN e.verdict IN ('claimed', 'reclaimed') THEN e.granted_base
            ELSE COALESCE(e.stored_base, 0) END
  FROM input i
  LEFT JOIN inserted ins ON ins.message_id = i.message_id
  LEFT JOIN existing e ON e.idx = i.idx
 ORDER BY i.idx;
END;
$$;
