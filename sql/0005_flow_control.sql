-- Flow control per campaign: quiet hours, and the daily limit's usage.

ALTER TABLE campaigns
    ADD COLUMN quiet_start time,
    ADD COLUMN quiet_end   time;

-- Sends charged to a campaign's day (in its timezone), first attempts apart
-- from retries so that retries only take what first attempts leave.
CREATE TABLE campaign_daily_usage (
    campaign_id    text NOT NULL,
    day            date NOT NULL,
    first_attempts integer NOT NULL DEFAULT 0,
    retries        integer NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, day)
);

-- Take one send from the campaign's quota for p_day. A first attempt may use
-- the whole limit; a retry only what remains after the first attempts known to
-- be waiting for this day (status 'queued', due before p_day_end; a first
-- attempt stops counting as waiting once it took its quota). Returns whether
-- the send may go now.
CREATE FUNCTION herald_take_quota(
    p_campaign_id text, p_message_id text, p_day date, p_first boolean, p_limit integer,
    p_day_end timestamptz
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    waiting integer := 0;
BEGIN
    INSERT INTO campaign_daily_usage (campaign_id, day) VALUES (p_campaign_id, p_day)
    ON CONFLICT DO NOTHING;
    IF NOT p_first THEN
        SELECT count(*) INTO waiting FROM messages
         WHERE campaign_id = p_campaign_id AND status = 'queued'
           AND next_attempt_at < p_day_end;
    END IF;
    UPDATE campaign_daily_usage u
       SET first_attempts = u.first_attempts + CASE WHEN p_first THEN 1 ELSE 0 END,
           retries = u.retries + CASE WHEN p_first THEN 0 ELSE 1 END
     WHERE u.campaign_id = p_campaign_id AND u.day = p_day
       AND u.first_attempts + u.retries + waiting < p_limit;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_first THEN
        -- Counted now: no longer a first attempt waiting for today.
        UPDATE messages SET next_attempt_at = NULL
         WHERE message_id = p_message_id AND status = 'queued';
    END IF;
    RETURN true;
END;
$$;
