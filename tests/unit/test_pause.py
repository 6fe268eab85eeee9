"""The channel pause policy (consumer.delivery.pause): cool-down, probes, growth, resume."""

from __future__ import annotations

from consumer.delivery.pause import Mode, PauseState


def test_first_failure_pauses_for_the_base_cooldown() -> None:
    state = PauseState(base_cooldown_s=5, max_cooldown_s=60)
    assert state.trip("access_token:190", now=100.0) is True
    assert state.mode is Mode.PAUSED
    assert state.reason == "access_token:190"
    assert state.remaining(now=101.0) == 4.0
    assert not state.due_for_probe(now=104.9)
    assert state.due_for_probe(now=105.0)


def test_failures_while_paused_do_not_extend_the_pause() -> None:
    state = PauseState(base_cooldown_s=5)
    state.trip("x", now=0.0)
    assert state.trip("x", now=3.0) is False
    assert state.remaining(now=3.0) == 2.0
    assert state.pauses == 1


def test_a_failed_probe_doubles_the_cooldown_up_to_the_ceiling() -> None:
    state = PauseState(base_cooldown_s=5, max_cooldown_s=30)
    now = 0.0
    seen = []
    for _ in range(5):
        assert state.trip("x", now=now)
        seen.append(state.cooldown_s)
        now += state.cooldown_s
        state.start_probe()
        assert state.mode is Mode.PROBING
    assert seen == [5, 10, 20, 30, 30]


def test_success_resumes_and_resets_the_cooldown() -> None:
    state = PauseState(base_cooldown_s=5)
    state.trip("x", now=0.0)
    state.start_probe()
    assert state.succeeded() is True
    assert state.mode is Mode.RUNNING and state.reason is None
    assert state.remaining(now=1.0) == 0.0
    # A later failure starts again from the base cool-down.
    state.trip("x", now=50.0)
    assert state.cooldown_s == 5


def test_success_while_running_is_not_a_resume() -> None:
    assert PauseState().succeeded() is False
