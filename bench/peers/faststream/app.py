"""Herald's work as a plain FastStream consumer, written as a user would.

Each send request from a classic queue: POST its body to the URL in `to`,
upsert the message as sent (committed), then FastStream acks (its default
policy acks once the handler returned). Run: faststream run app:app
"""

import os

import aiohttp
import asyncpg
from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from pydantic import BaseModel

UPSERT = """
    INSERT INTO bench_peer_messages (message_id, recipient, status, attempts, sent_at)
    VALUES ($1, $2, 'sent', 1, now())
    ON CONFLICT (message_id) DO UPDATE
    SET status = 'sent', attempts = bench_peer_messages.attempts + 1, sent_at = now()
"""
PREFETCH = 256

broker = RabbitBroker(os.environ["BENCH_AMQP_URL"])
app = FastStream(broker)
queue = RabbitQueue(os.environ["BENCH_QUEUE"], durable=True)
http: aiohttp.ClientSession
db: asyncpg.Pool


class SendRequest(BaseModel):
    message_id: str
    to: str
    body: dict[str, object]


@app.on_startup
async def connect() -> None:
    global http, db
    # aiohttp allows 100 connections per session by default: one per message in flight.
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=PREFETCH))
    db = await asyncpg.create_pool(os.environ["BENCH_DATABASE_URL"])


@app.after_shutdown
async def disconnect() -> None:
    await http.close()
    await db.close()


@broker.subscriber(queue, channel=Channel(prefetch_count=PREFETCH))
async def send(request: SendRequest) -> None:
    headers = {"Idempotency-Key": request.message_id}
    async with http.post(request.to, json=request.body, headers=headers) as response:
        response.raise_for_status()
    await db.execute(UPSERT, request.message_id, request.to)
