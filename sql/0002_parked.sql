-- The parking lot's index: one row per message published to {prefix}.parked,
-- written by the pipeline after the broker confirmed the parked copy. The
-- queue stays the transport (replay takes messages from it); this table is
-- what operators list and filter without scanning the queue.

CREATE TABLE parked_messages (
    parked_id    uuid PRIMARY KEY,             -- also header x-herald-parked-id
    message_id   text,                         -- NULL when the body could not be decoded
    channel      text NOT NULL,
    recipient    text,
    campaign_id  text,
    attempts     integer NOT NULL,
    error_type   text NOT NULL,
    error_code   text,
    last_error   text,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    body         bytea NOT NULL,
    headers      jsonb NOT NULL DEFAULT '{}',
    -- parked until a person replays, rejects or purges it
    state        text NOT NULL DEFAULT 'parked'
                 CHECK (state IN ('parked', 'replayed', 'rejected', 'purged')),
    resolved_at  timestamptz,
    resolution   text
);

CREATE INDEX parked_state_time_idx ON parked_messages (state, parked_at);
CREATE INDEX parked_state_error_idx ON parked_messages (state, error_type, parked_at);
CREATE INDEX parked_state_channel_idx ON parked_messages (state, channel, parked_at);
CREATE INDEX parked_campaign_idx ON parked_messages (campaign_id, state, parked_at)
    WHERE campaign_id IS NOT NULL;
CREATE INDEX parked_message_id_idx ON parked_messages (message_id);
CREATE INDEX parked_recipient_idx ON parked_messages (recipient, parked_at);
