"""Prometheus metrics (``herald_*``): few, bounded labels; never ids or numbers."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram


@functools.cache
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once: for the per-message path, where
    ``labels()`` (checks, conversion, a lock) is paid on every delivery. Only for
    series that are never removed."""
    return metric.labels(*labels)

CONSUMED = Counter(
    "herald_messages_consumed_total", "Send requests taken from a channel queue", ["channel"]
)
SENT = Counter("herald_messages_sent_total", "Messages accepted by the provider", ["channel"])
RETRIED = Counter(
    "herald_messages_retried_total",
    "Failed attempts scheduled for another try",
    ["channel", "error_type"],
)
PARKED = Counter(
    "herald_messages_parked_total",
    "Messages moved to the parking queue",
    ["channel", "error_type"],
)
EXPIRED = Counter(
    "herald_messages_expired_total", "Messages dropped because expires_at passed", ["channel"]
)
DEFERRED = Counter(
    "herald_messages_deferred_total",
    "Messages deferred through the delay levels without an attempt (send_at, pauses)",
    ["channel", "reason"],
)
DUPLICATES = Counter(
    "herald_duplicates_suppressed_total",
    "Copies of a message that were acked without sending (already sent or stale)",
    ["channel"],
)
RESENT_AFTER_CRASH = Counter(
    "herald_resent_after_crash_total",
    "Attempts sent again because the consumer making them died before recording the"
    " outcome (the one window where a provider may see a message twice)",
    ["channel"],
)
ATTEMPTS = Counter(
    "herald_delivery_attempts_total",
    "Send attempts by outcome",
    ["channel", "provider", "outcome", "error_type"],
)
PROVIDER_LATENCY = Histogram(
    "herald_provider_latency_seconds",
    "Time the provider took to answer a send",
    ["channel", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
IN_FLIGHT = Gauge(
    "herald_in_flight_messages", "Messages taken from the broker and not yet acked", ["channel"]
)
INFRA_RETRIES = Counter(
    "herald_infrastructure_retries_total",
    "Database or broker operations retried because the service was unreachable",
    ["component"],
)
PREFETCH = Gauge(
    "herald_prefetch", "The prefetch a lane's consumer runs with (found by the lane itself"
    " unless the channel has a rate)", ["channel", "lane"]
)
CONSUMERS_ACTIVE = Gauge(
    "herald_channel_consumer_active", "1 when the channel's queue is being consumed", ["channel"]
)
BROKER_RECONNECTS = Counter(
    "herald_broker_reconnects_total",
    "Connections to RabbitMQ made again after one was lost, by the node reached (host:port)",
    ["node"],
)
CONSUMER_CANCELLED = Counter(
    "herald_consumer_cancelled_total",
    "Consumers the broker cancelled (queue deleted, leader moved, consumer timeout);"
    " Herald consumes again by itself",
    ["queue"],
)
DB_BATCH_SIZE = Histogram(
    "herald_db_batch_size",
    "Messages written per database transaction (group commit)",
    ["kind"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
)
DB_BATCH_SPLITS = Counter(
    "herald_db_batch_splits_total",
    "Group-commit batches the database refused for one item's data, written again"
    " item by item so that only that item failed",
    ["kind"],
)
RECORDS_REFUSED = Counter(
    "herald_records_refused_total",
    "Outcomes the database refused for their content (a provider's odd answer),"
    " recorded again without the provider's texts",
    ["outcome"],
)
DB_BATCH_SECONDS = Histogram(
    "herald_db_batch_seconds",
    "Time one group-commit transaction took",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

# -- channel state, retries, latency (pipeline and worker) --------------------------
DOMAIN_OPEN = Gauge(
    "herald_domain_open",
    "1 while a failure domain (an http destination, a provider account) is open or"
    " probing: its messages are deferred without being charged; the series goes away"
    " when it closes",
    ["channel", "domain", "reason"],
)
DOMAIN_TRIPS = Counter(
    "herald_domain_trips_total",
    "Failure domains opened, by why (failure_rate, consecutive_failures, probe_failed,"
    " or the provider-wide error)",
    ["channel", "reason"],
)
CHANNEL_PAUSED = Gauge(
    "herald_channel_paused",
    "1 while a channel's consumer is paused (provider-wide error, open breaker)",
    ["channel", "reason"],
)
RETRIES_BY_ATTEMPT = Counter(
    "herald_retries_by_attempt_total",
    "Retries scheduled, by the number of the attempt that failed (10 means 10 or more)",
    ["channel", "attempt"],
)
END_TO_END = Histogram(
    "herald_end_to_end_seconds",
    "From publish (the message's AMQP timestamp) to recorded as sent",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400),
)

# -- broker state (consumer.gauges) -------------------------------------------------
QUEUE_MESSAGES = Gauge(
    "herald_queue_messages", "Messages ready in a Herald queue", ["queue"]
)
QUEUE_CONSUMERS = Gauge(
    "herald_queue_consumers", "Consumers attached to a Herald queue", ["queue"]
)
BACKLOG_OLDEST = Gauge(
    "herald_backlog_oldest_seconds",
    "How long the most overdue known message (a retry or send_at deferral whose"
    " next_attempt_at has passed) has waited for its attempt; see consumer/gauges.py",
    ["channel"],
)

# -- provider status webhooks (consumer.status.webhooks, consumer.status.events) ----------------
WEBHOOK_EVENTS = Counter(
    "herald_webhook_events_total",
    "Provider status events accepted by the webhook receiver",
    ["provider", "status"],
)
WEBHOOK_SIGNATURE_FAILURES = Counter(
    "herald_webhook_signature_failures_total",
    "Webhook requests refused (403) for a bad or missing signature",
    ["provider"],
)
HTTP_DEADLINES = Counter(
    "herald_http_deadline_exceeded_total",
    "Requests not received in time: connections closed before their headers were"
    " complete (phase head) or answered 408 (phase request)",
    ["listener", "phase"],
)
EVENTS_APPLIED = Counter(
    "herald_events_applied_total",
    "Provider events applied to messages by the events consumer",
    ["provider", "status", "result"],
)

# -- operator actions (consumer.parking.lot) ------------------------------------------------
REPLAYED = Counter(
    "herald_replayed_total", "Parked messages replayed to the send exchange",
    ["channel", "error_type"],
)
CHANNEL_RATE = Gauge(
    "herald_channel_rate_limit",
    "Sends per second a channel is allowed now (adaptive; 0 means unlimited)",
    ["channel"],
)

# -- escalation and campaigns (consumer.parking.escalation, consumer.records.completion) --
ESCALATION_COUNTED = Counter(
    "herald_escalation_counted_total",
    "Parked messages counted into an escalation window, once per rule that selects them",
)
ESCALATION_DIGESTS = Counter(
    "herald_escalation_digests_total",
    "Digests of parked messages published to people, by the channel that reaches them",
    ["target_channel"],
)
CAMPAIGNS_COMPLETED = Counter(
    "herald_campaigns_completed_total",
    "Campaigns judged complete (a reopened campaign that completes again counts again)",
)
