"""Queue N send requests for the Celery peer: python publish.py N URL."""

import sys

from tasks import app, send

if __name__ == "__main__":
    n, url = int(sys.argv[1]), sys.argv[2]
    with app.producer_or_acquire() as producer:
        for i in range(n):
            send.apply_async(
                ({"message_id": f"b-{i}", "channel": "http", "to": url, "body": {"n": i}},),
                producer=producer,
            )
