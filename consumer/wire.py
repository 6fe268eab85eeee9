"""Every AMQP header name Herald reads or writes, in one place.

Herald's own headers all start with ``x-herald-``. A publisher sets none of
them: Herald adds them when it re-sends, parks or replays a message. The
broker adds the dead-lettering headers (``x-death``, ``x-first-death-*``,
``x-last-death-*``) and, on quorum queues, ``x-delivery-count``.
"""

from __future__ import annotations

# -- on every copy Herald sends round again (retries, deferrals, replays) --------------

# The attempt this copy is (1 for the first), fencing the claim in PostgreSQL.
HEADER_ATTEMPT = "x-herald-attempt"
# Attempts numbered up to this one were used before a replay with a fresh budget.
HEADER_ATTEMPT_BASE = "x-herald-attempt-base"
# When Herald first saw the message (epoch seconds), kept across retries.
HEADER_FIRST_SEEN = "x-herald-first-seen"
# When a delay longer than one trip through the delay levels is due (epoch seconds).
HEADER_DUE_AT = "x-herald-due-at"

# -- why the last attempt failed (on retries and parked copies) -------------------------
HEADER_ERROR_TYPE = "x-herald-error-type"
HEADER_ERROR_CODE = "x-herald-error-code"
HEADER_LAST_ERROR = "x-herald-last-error"

# -- on parked copies -----------------------------------------------------------------
HEADER_PARKED_AT = "x-herald-parked-at"
HEADER_CHANNEL = "x-herald-channel"
HEADER_MESSAGE_ID = "x-herald-message-id"
HEADER_PARKED_ID = "x-herald-parked-id"
# A parked provider event's id (the AMQP message id the receiver gave it), which
# its replay publishes again so that the events consumer still recognises it.
HEADER_EVENT_ID = "x-herald-event-id"

# -- on replayed copies -----------------------------------------------------------------
HEADER_REPLAY_OF = "x-herald-replay-of"

# -- added by the broker ----------------------------------------------------------------
HEADER_DEATH = "x-death"
HEADER_FIRST_DEATH_QUEUE = "x-first-death-queue"
HEADER_FIRST_DEATH_REASON = "x-first-death-reason"
HEADER_DELIVERY_COUNT = "x-delivery-count"
BROKER_HEADERS = frozenset({
    HEADER_DEATH, "x-first-death-exchange", HEADER_FIRST_DEATH_QUEUE,
    HEADER_FIRST_DEATH_REASON, "x-last-death-exchange", "x-last-death-queue",
    "x-last-death-reason", HEADER_DELIVERY_COUNT,
})

# Headers that describe one attempt's failure or one delay trip: never carried
# over to the next copy of a message.
PER_ATTEMPT = frozenset({HEADER_ERROR_TYPE, HEADER_ERROR_CODE, HEADER_LAST_ERROR,
                         HEADER_DUE_AT, HEADER_ATTEMPT}) | BROKER_HEADERS
