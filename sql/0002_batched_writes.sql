-- Batched forms of herald_claim / herald_record: one transaction (one commit,
-- one fsync) for many messages. Items are applied in array order, so two
-- copies of one message in the same batch behave as if they came one after
-- the other.

CREATE FUNCTION herald_claim_many(p_items jsonb)
RETURNS TABLE (idx integer, outcome text, status text, attempts integer,
               claimed_until timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    item jsonb;
    i integer := 0;
    c record;
BEGIN
    FOR item IN SELECT value FROM jsonb_array_elements(p_items) LOOP
        SELECT * INTO c FROM herald_claim(
            item->>'message_id', item->>'channel', item->>'recipient', item->>'campaign_id',
            item->'payload', (item->>'attempt')::integer, item->>'owner',
            (item->>'lease_s')::double precision, false);
        idx := i;
        outcome := c.outcome;
        status := c.status;
        attempts := c.attempts;
        claimed_until := c.claimed_until;
        RETURN NEXT;
        i := i + 1;
    END LOOP;
END;
$$;

CREATE FUNCTION herald_record_many(p_items jsonb)
RETURNS TABLE (idx integer, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    item jsonb;
    i integer := 0;
BEGIN
    FOR item IN SELECT value FROM jsonb_array_elements(p_items) LOOP
        idx := i;
        status := herald_record(
            item->>'message_id', (item->>'attempt')::integer, item->>'outcome',
            (item->>'started_at')::timestamptz, (item->>'latency_ms')::double precision,
            item->>'provider', item->>'provider_message_id', item->>'error_type',
            item->>'error_code', item->>'error_text', (item->>'next_attempt_at')::timestamptz);
        RETURN NEXT;
        i := i + 1;
    END LOOP;
END;
$$;
