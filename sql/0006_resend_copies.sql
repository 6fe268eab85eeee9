-- A copy that the events consumer re-sends after a reported failure is built
-- like the pipeline's own (consumer.delivery.decision.copy_headers): it keeps
-- the message's attempt base (the budget of a replay with a fresh one) and
-- goes to the message's lane (bulk for campaign traffic).
ALTER TABLE event_actions
    ADD COLUMN attempt_base integer NOT NULL DEFAULT 0,
    ADD COLUMN lane         text NOT NULL DEFAULT 'main' CHECK (lane IN ('main', 'bulk'));
