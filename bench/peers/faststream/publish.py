"""Queue N send requests for the FastStream peer: python publish.py N URL."""

import asyncio
import os
import sys

from faststream.rabbit import RabbitBroker, RabbitQueue


async def main(n: int, url: str) -> None:
    queue = RabbitQueue(os.environ["BENCH_QUEUE"], durable=True)
    async with RabbitBroker(os.environ["BENCH_AMQP_URL"]) as broker:
        await broker.declare_queue(queue)
        window = 1000
        for start in range(0, n, window):
            await asyncio.gather(*(
                broker.publish(
                    {"message_id": f"b-{i}", "channel": "http", "to": url, "body": {"n": i}},
                    queue=queue, persist=True,
                )
                for i in range(start, min(n, start + window))
            ))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
