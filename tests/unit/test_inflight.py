"""The lane's in-flight search (consumer.delivery.inflight) against a model of the work:
throughput = min(in flight / latency, what the CPU allows)."""

from __future__ import annotations

from itertools import pairwise

from consumer.delivery.inflight import InFlight


def run(ctl: InFlight, *, latency_s: float, cpu_cap: float, backlog: bool = True,
        offered: float = 0.0, periods: int = 60) -> list[int]:
    """Drive the controller period by period; returns the prefetch after each."""
    now, seen = 0.0, []
    ctl.tick(now)
    for _ in range(periods):
        if backlog:
            in_flight = ctl.current
            rate = min(in_flight / latency_s, cpu_cap)
        else:  # light traffic: only what is offered is in flight
            rate = offered
            in_flight = max(1, int(offered * latency_s))
        ctl.sample(now, in_flight)
        ctl.completed(int(rate * ctl.period_s))
        now += ctl.period_s
        ctl.tick(now)
        seen.append(ctl.current)
    return seen


def test_latency_bound_work_grows_until_the_cpu_is_the_limit() -> None:
    ctl = InFlight(floor=256, ceiling=4096)
    seen = run(ctl, latency_s=0.2, cpu_cap=3000)
    # 3,000/s at 200 ms needs 600 in flight: the search gets within 10 % of the CPU's
    # limit and stays there (trying a bigger step now and then, taking it back).
    assert min(min(p / 0.2, 3000) for p in seen[-20:]) >= 0.9 * 3000, seen
    assert max(seen) <= 1500, seen


def test_cpu_bound_work_keeps_the_configured_prefetch() -> None:
    ctl = InFlight(floor=256, ceiling=4096)
    seen = run(ctl, latency_s=0.01, cpu_cap=2000)
    assert max(seen) <= int(256 * 1.5) + 1  # one step tried, taken back
    assert seen[-1] == 256


def test_light_traffic_never_grows_it() -> None:
    ctl = InFlight(floor=256, ceiling=4096)
    assert set(run(ctl, latency_s=0.2, cpu_cap=3000, backlog=False, offered=50)) == {256}


def test_the_ceiling_bounds_it() -> None:
    ctl = InFlight(floor=64, ceiling=300)
    seen = run(ctl, latency_s=1.0, cpu_cap=100_000)
    assert max(seen) == 300 and seen[-1] == 300


def test_a_step_that_does_not_pay_is_retried_after_the_hold() -> None:
    ctl = InFlight(floor=100, ceiling=1000, hold_s=10.0)
    seen = run(ctl, latency_s=0.1, cpu_cap=1000, periods=30)  # 100 in flight is enough
    growths = [b for a, b in pairwise([100, *seen]) if b > a]
    assert 2 <= len(growths) <= 8, seen  # tried now and then, never kept
    assert seen[-1] in (100, 151)


def test_the_period_follows_the_time_in_flight() -> None:
    """Five times a message's time in flight (Little's law: load over throughput),
    within the bounds: a burst of a few thousand slow messages still sees the
    prefetch grow, and fast work is judged over a quarter of a second."""
    slow = InFlight(floor=256, ceiling=4096)
    run(slow, latency_s=0.2, cpu_cap=3000, periods=3)
    assert abs(slow.period_s - 1.0) < 0.05, slow.period_s
    fast = InFlight(floor=256, ceiling=4096)
    run(fast, latency_s=0.001, cpu_cap=100_000, periods=3)
    assert fast.period_s == fast.min_period_s
    stuck = InFlight(floor=256, ceiling=4096)
    run(stuck, latency_s=30.0, cpu_cap=3000, periods=3)
    assert stuck.period_s == stuck.max_period_s


def test_a_pause_forgets_the_step_being_judged() -> None:
    ctl = InFlight(floor=100, ceiling=1000)
    ctl.tick(0.0)
    ctl.sample(0.0, 100)
    ctl.completed(500)
    assert ctl.tick(0.5) == 151  # a step, to be judged at the next tick
    ctl.restart(60.0)  # the lane was paused a minute: nothing completed meanwhile
    ctl.sample(60.0, 151)
    ctl.completed(755)
    assert ctl.tick(60.5) is not None and ctl.current > 151  # judged on the new period only
