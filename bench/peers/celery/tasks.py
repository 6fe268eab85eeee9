"""Herald's work as a Celery task, written as a user would.

Each send request: POST its body to the URL in `to`, upsert the message as
sent (committed), then Celery acks (acks_late: only once the task returned).
Run: celery -A tasks worker --pool prefork --concurrency 8
(or --pool threads --concurrency 128 for a slow endpoint).
"""

import os
import threading

import requests
from celery import Celery
from psycopg_pool import ConnectionPool

UPSERT = """
    INSERT INTO bench_peer_messages (message_id, recipient, status, attempts, sent_at)
    VALUES (%s, %s, 'sent', 1, now())
    ON CONFLICT (message_id) DO UPDATE
    SET status = 'sent', attempts = bench_peer_messages.attempts + 1, sent_at = now()
"""

app = Celery("peer", broker=os.environ["BENCH_AMQP_URL"])
app.conf.update(
    task_default_queue=os.environ["BENCH_QUEUE"],
    task_acks_late=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)

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


@app.task(autoretry_for=(requests.RequestException,), retry_backoff=True, max_retries=10)
def send(request: dict) -> None:
    headers = {"Idempotency-Key": request["message_id"]}
    response = http().post(request["to"], json=request["body"], headers=headers, timeout=30)
    response.raise_for_status()
    with db().connection() as conn:  # commits on leaving the block
        conn.execute(UPSERT, (request["message_id"], request["to"]))
