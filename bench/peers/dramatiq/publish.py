"""Queue N send requests for the Dramatiq peer: python publish.py N URL."""

import sys

from tasks import send

if __name__ == "__main__":
    n, url = int(sys.argv[1]), sys.argv[2]
    for i in range(n):
        send.send({"message_id": f"b-{i}", "channel": "http", "to": url, "body": {"n": i}})
    send.broker.close()
