"""Herald's work as a Dramatiq actor, written as a user would.

Each send request: POST its body to the URL in `to`, upsert the message as
sent (committed), then Dramatiq acks (it acks only once the actor returned).
Run: dramatiq tasks --processes 2 --threads 16
"""

import os
import threading

import dramatiq
import requests
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from psycopg_pool import ConnectionPool

UPSERT = """
    INSERT INTO bench_peer_messages (message_id, recipient, status, attempts, sent_at)
    VALUES (%s, %s, 'sent', 1, now())
    ON CONFLICT (message_id) DO UPDATE
    SET status = 'sent', attempts = bench_peer_messages.attempts + 1, sent_at = now()
"""

dramatiq.set_broker(RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"]))

# One pool per worker process (opened on first use, after the fork) and one
# HTTP session per worker thread: requests' Session is not thread-safe.
_pool: ConnectionPool | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def db() -> ConnectionPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ConnectionPool(os.environ["BENCH_DATABASE_URL"], min_size=1, max_size=16)
        return _pool


def http() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


@dramatiq.actor(queue_name=os.environ["BENCH_QUEUE"])
def send(request: dict) -> None:
    headers = {"Idempotency-Key": request["message_id"]}
    response = http().post(request["to"], json=request["body"], headers=headers, timeout=30)
    response.raise_for_status()
    with db().connection() as conn:  # commits on leaving the block
        conn.execute(UPSERT, (request["message_id"], request["to"]))
