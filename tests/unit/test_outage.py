"""Outage detection per failure domain (consumer.delivery.outage), with a fake clock.

The simulation feeds a detector the way the pipeline does: first attempts of
a campaign at a steady rate, and the retries of those that failed released
in waves by the delay levels (every message that failed in the same second
comes back in the same second, base delay 30 s doubling). Retries never feed
the detector; they only ask to be admitted.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest

from consumer.delivery.outage import OutageDetector, State, Thresholds

SEEDS = range(20)


@dataclass(order=True)
class Send:
    at: float
    recipient: int = field(compare=False)
    attempt: int = field(compare=False)


def simulate(
    seed: int, *, flaky_share: float, max_failures: int, rate: float, recipients: int,
    outage: tuple[float, float] | None = None, background_after_outage: float = 0.0,
    detector: OutageDetector | None = None,
) -> tuple[OutageDetector, list[tuple[float, str]], dict[str, int]]:
    """Run a campaign through a detector; returns it, its transitions and counters."""
    rng = random.Random(seed)
    detector = detector or OutageDetector(rng=random.Random(seed))
    failures_left = {r: (rng.randint(1, max_failures) if rng.random() < flaky_share else 0)
                     for r in range(recipients)}
    queue = [Send(i / rate, r, 1) for i, r in enumerate(range(recipients))]
    heapq.heapify(queue)
    events: list[tuple[float, str]] = []
    counters = {"sent": 0, "deferred": 0, "charged": 0}
    while queue:
        send = heapq.heappop(queue)
        now, first = send.at, send.attempt == 1
        wait = detector.admit(now, first=first)
        if wait is not None:
            counters["deferred"] += 1
            heapq.heappush(queue, Send(now + max(1.0, wait), send.recipient, send.attempt))
            continue
        down = outage is not None and outage[0] <= now < outage[1]
        after = outage is not None and now >= outage[1]
        fails = down or failures_left[send.recipient] > 0 or (
            after and background_after_outage and rng.random() < background_after_outage)
        if not fails:
            counters["sent"] += 1
            if detector.success(now, first=first, key=str(send.recipient)):
                events.append((now, "closed"))
            continue
        if not down:
            failures_left[send.recipient] = max(0, failures_left[send.recipient] - 1)
        trip = detector.failure(now, first=first, key=str(send.recipient))
        if trip is not None:
            events.append((now, f"opened:{trip.reason}"))
        if detector.state is State.OPEN and (down or trip is not None):
            # Pause: not charged, sent again when the domain probes.
            heapq.heappush(queue, Send(detector.probe_at, send.recipient, send.attempt))
            continue
        counters["charged"] += 1
        # Retried through the delay levels: whole seconds, in waves.
        delay = min(3600, 30 * 2 ** (send.attempt - 1))
        heapq.heappush(queue, Send(float(int(now) + delay), send.recipient, send.attempt + 1))
    return detector, events, counters


@pytest.mark.parametrize("flaky_share", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("max_failures", [1, 2, 3])
@pytest.mark.parametrize("rate", [20.0, 1.0])
def test_flaky_recipients_never_trip_it(flaky_share: float, max_failures: int,
                                        rate: float) -> None:
    recipients = 2000 if rate > 1 else 600
    for seed in SEEDS:
        detector, events, counters = simulate(seed, flaky_share=flaky_share,
                                              max_failures=max_failures, rate=rate,
                                              recipients=recipients)
        assert events == [] and detector.trips == 0, (seed, events)
        assert counters["sent"] == recipients and counters["deferred"] == 0


@pytest.mark.parametrize(("rate", "bound_s"), [(20.0, 3.0), (1.0, 16.0)])
def test_a_real_outage_is_caught_within_the_bound(rate: float, bound_s: float) -> None:
    for seed in SEEDS:
        start = 200 / rate  # after 200 first attempts of normal (10 % flaky) traffic
        _, events, _ = simulate(seed, flaky_share=0.1, max_failures=2, rate=rate,
                                recipients=600, outage=(start, start + 120))
        opened = [at for at, what in events if what.startswith("opened")]
        assert opened, seed
        # The first failure of the outage is at `start` or the next send after it.
        assert opened[0] - start <= bound_s + 1 / rate, (seed, opened[0] - start)


def test_recovery_with_background_failures_closes_and_stays_closed() -> None:
    for seed in SEEDS:
        detector, events, counters = simulate(
            seed, flaky_share=0.0, max_failures=1, rate=20.0, recipients=3000,
            outage=(10.0, 70.0), background_after_outage=0.3)
        kinds = [what.split(":")[0] for _, what in events]
        # Opened once, maybe re-opened by probes that met the outage, then closed for good.
        assert kinds[0] == "opened" and kinds[-1] == "closed", (seed, events)
        closed_at = events[-1][0]
        assert closed_at >= 70.0
        assert detector.state is State.CLOSED
        assert counters["sent"] == 3000  # everything got through in the end
        # Once closed, 30 % background failures never open it again.
        assert all(at <= closed_at for at, _ in events)


def test_a_provider_wide_error_opens_at_once_and_a_probe_closes_it() -> None:
    detector = OutageDetector(Thresholds(base_cooldown_s=5.0, jitter=0.0))
    assert detector.admit(0.0, first=True) is None
    trip = detector.provider_wide(1.0, "access_token:20003")
    assert trip is not None and trip.cooldown_s == 5.0 and detector.state is State.OPEN
    assert detector.admit(2.0, first=True) == pytest.approx(4.0)
    assert detector.admit(6.0, first=False) is not None  # a retry never probes
    assert detector.admit(6.0, first=True) is None  # the probe
    assert detector.admit(6.1, first=True) is not None  # one at a time
    assert detector.success(7.0, first=True, key="a")
    assert detector.state is State.CLOSED and detector.admit(7.1, first=False) is None


def test_failed_probes_reopen_with_a_longer_cooldown_reset_after_calm() -> None:
    t = Thresholds(base_cooldown_s=5.0, max_cooldown_s=12.0, jitter=0.0, probe_failures=2,
                   calm_s=100.0)
    detector = OutageDetector(t)
    detector.provider_wide(0.0, "outage")
    assert detector.admit(5.0, first=True) is None
    assert detector.failure(6.0, first=True, key="a") is None  # one failed probe
    assert detector.admit(6.0, first=True) is None
    trip = detector.failure(7.0, first=True, key="b")  # the second: re-open
    assert trip is not None and trip.cooldown_s == 10.0
    detector.admit(17.0, first=True)
    detector.failure(17.5, first=True, key="c")
    detector.admit(17.5, first=True)
    trip = detector.failure(18.0, first=True, key="d")
    assert trip is not None and trip.cooldown_s == 12.0  # capped
    detector.admit(30.0, first=True)
    assert detector.success(31.0, first=True, key="e")
    again = detector.provider_wide(200.0, "outage")  # calm for 169 s > 100 s
    assert again is not None and again.cooldown_s == 5.0


def test_a_probe_that_never_reports_frees_its_slot() -> None:
    detector = OutageDetector(Thresholds(base_cooldown_s=1.0, jitter=0.0, probe_timeout_s=10.0))
    detector.provider_wide(0.0, "outage")
    assert detector.admit(1.0, first=True) is None
    assert detector.admit(5.0, first=True) is not None
    assert detector.admit(11.5, first=True) is None


def test_one_recipient_failing_again_and_again_is_not_an_outage() -> None:
    detector = OutageDetector()
    for i in range(200):
        assert detector.failure(i * 0.01, first=True, key="+15550001111") is None
    assert detector.state is State.CLOSED


def test_retries_never_feed_it() -> None:
    detector = OutageDetector()
    for i in range(500):
        assert detector.failure(i * 0.01, first=False, key=str(i)) is None
    assert detector.state is State.CLOSED
