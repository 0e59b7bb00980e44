"""The per-extension circuit breaker: every transition, overrides, callbacks, and a model check."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from extreg.core.breaker import BreakerConfig, CircuitBreakers, breaker_override_problems
from extreg.errors import CircuitOpen, Conflict, ExtensionError, InvalidRecord
from extreg.settings import Settings

EXT = "normalize_text"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock, **config: Any) -> CircuitBreakers:
    config.setdefault("enabled", True)
    return CircuitBreakers(BreakerConfig(**config), clock=clock)


def fail(breakers: CircuitBreakers, times: int, extension_id: str = EXT) -> None:
    for _ in range(times):
        breakers.record_failure(extension_id)


def succeed(
    breakers: CircuitBreakers, times: int, extension_id: str = EXT, seconds: float = 0.0
) -> None:
    for _ in range(times):
        breakers.record_success(extension_id, seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_unseen_extension_is_closed_and_admitted(clock: FakeClock) -> None:
    """A breaker starts closed for any extension id and admits its calls."""
    breakers = make(clock)
    breakers.check_circuit(EXT)
    assert "closed" == breakers.state(EXT)


def test_consecutive_failures_open_the_circuit(clock: FakeClock) -> None:
    """closed -> open exactly at `failure_threshold` failures in a row."""
    breakers = make(clock, failure_threshold=5, min_calls=1000)
    fail(breakers, 4)
    assert "closed" == breakers.state(EXT)
    fail(breakers, 1)
    assert "open" == breakers.state(EXT)


def test_a_success_breaks_the_failure_streak(clock: FakeClock) -> None:
    """Failures separated by a success are not consecutive."""
    breakers = make(clock, failure_threshold=3, min_calls=1000)
    fail(breakers, 2)
    succeed(breakers, 1)
    fail(breakers, 2)
    assert "closed" == breakers.state(EXT)
    assert 2 == breakers.snapshot(EXT).consecutive_failures


def test_error_rate_opens_the_circuit_after_min_calls(clock: FakeClock) -> None:
    """closed -> open when failures reach the error-rate share of >= min_calls window calls."""
    breakers = make(clock, failure_threshold=100, min_calls=10, error_rate_threshold=0.5)
    for _ in range(4):
        succeed(breakers, 1)
        fail(breakers, 1)
    assert "closed" == breakers.state(EXT)  # 8 calls: below min_calls
    succeed(breakers, 1)
    fail(breakers, 1)  # 10 calls, 5 failures: 0.5
    assert "open" == breakers.state(EXT)


def test_error_rate_is_ignored_before_min_calls(clock: FakeClock) -> None:
    """Nine failures out of nine calls do not open the circuit when min_calls is 10."""
    breakers = make(clock, failure_threshold=100, min_calls=10, error_rate_threshold=0.5)
    fail(breakers, 9)
    assert "closed" == breakers.state(EXT)
    fail(breakers, 1)
    assert "open" == breakers.state(EXT)


def test_error_rate_below_threshold_keeps_the_circuit_closed(clock: FakeClock) -> None:
    """A failure share under the threshold never opens the circuit."""
    breakers = make(clock, failure_threshold=100, min_calls=10, error_rate_threshold=0.5)
    for _ in range(20):
        succeed(breakers, 2)
        fail(breakers, 1)
    assert "closed" == breakers.state(EXT)


def test_calls_older_than_the_window_do_not_count(clock: FakeClock) -> None:
    """Failures that left the window are forgotten by the error-rate rule."""
    breakers = make(
        clock, failure_threshold=100, min_calls=4, error_rate_threshold=0.5, window_seconds=10
    )
    fail(breakers, 3)
    clock.advance(11)
    succeed(breakers, 3)
    fail(breakers, 1)  # the window holds 4 calls, 1 failure; with the old ones it would be 4/7
    snapshot = breakers.snapshot(EXT)
    assert ("closed", 4, 1) == (snapshot.state, snapshot.window_calls, snapshot.window_failures)


def test_open_circuit_refuses_with_circuit_open(clock: FakeClock) -> None:
    """An open circuit raises CircuitOpen naming the extension, with no attempts made."""
    breakers = make(clock, failure_threshold=1)
    fail(breakers, 1)
    with pytest.raises(CircuitOpen) as caught:
        breakers.check_circuit(EXT)
    assert isinstance(caught.value, ExtensionError)
    assert (EXT, 0) == (caught.value.extension_id, caught.value.attempts)
    assert "open" in caught.value.reason


def test_other_extensions_are_not_affected(clock: FakeClock) -> None:
    """Each extension id has its own circuit."""
    breakers = make(clock, failure_threshold=1)
    fail(breakers, 1)
    breakers.check_circuit("pii_guard")
    assert {EXT: "open", "pii_guard": "closed"} == breakers.states()


def test_open_becomes_half_open_after_the_timeout(clock: FakeClock) -> None:
    """open -> half_open once timeout_seconds have passed, not before."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=30)
    fail(breakers, 1)
    clock.advance(29.9)
    assert False is breakers.should_attempt_recovery(EXT)
    assert "open" == breakers.update_state(EXT)
    with pytest.raises(CircuitOpen):
        breakers.check_circuit(EXT)
    clock.advance(0.1)
    assert True is breakers.should_attempt_recovery(EXT)
    assert "half_open" == breakers.update_state(EXT)
    assert False is breakers.should_attempt_recovery(EXT)


def test_check_after_the_timeout_admits_a_trial(clock: FakeClock) -> None:
    """check_circuit itself moves a due open circuit to half_open and admits the call."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=30)
    fail(breakers, 1)
    clock.advance(30)
    breakers.check_circuit(EXT)
    snapshot = breakers.snapshot(EXT)
    assert ("half_open", 1) == (snapshot.state, snapshot.half_open_admitted)


async def test_half_open_admits_exactly_max_requests_under_concurrency(clock: FakeClock) -> None:
    """500 concurrent asyncio calls on a half-open circuit: exactly half_open_max_requests run."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=1, half_open_max_requests=3)
    fail(breakers, 1)
    clock.advance(1)
    release = asyncio.Event()

    async def call() -> bool:
        try:
            breakers.check_circuit(EXT)
        except CircuitOpen:
            return False
        await release.wait()
        return True

    tasks = [asyncio.create_task(call()) for _ in range(500)]
    await asyncio.sleep(0)
    release.set()
    admitted = sum(await asyncio.gather(*tasks))
    assert 3 == admitted


def test_trial_success_closes_the_circuit(clock: FakeClock) -> None:
    """half_open -> closed on a trial success, with a fresh streak and window."""
    breakers = make(clock, failure_threshold=2, timeout_seconds=5)
    fail(breakers, 2)
    clock.advance(5)
    breakers.check_circuit(EXT)
    succeed(breakers, 1)
    snapshot = breakers.snapshot(EXT)
    assert ("closed", 0, 0) == (
        snapshot.state,
        snapshot.consecutive_failures,
        snapshot.window_failures,
    )
    fail(breakers, 1)
    assert "closed" == breakers.state(EXT)


def test_trial_failure_reopens_for_a_full_timeout(clock: FakeClock) -> None:
    """half_open -> open on a trial failure; the timeout starts again."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=5)
    fail(breakers, 1)
    clock.advance(5)
    breakers.check_circuit(EXT)
    fail(breakers, 1)
    assert "open" == breakers.state(EXT)
    clock.advance(4.9)
    with pytest.raises(CircuitOpen):
        breakers.check_circuit(EXT)
    clock.advance(0.1)
    assert "half_open" == breakers.state(EXT)


def test_half_open_refuses_beyond_the_trials_in_flight(clock: FakeClock) -> None:
    """While the trials are out, further calls are refused with a half-open reason."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=5, half_open_max_requests=1)
    fail(breakers, 1)
    clock.advance(5)
    breakers.check_circuit(EXT)
    with pytest.raises(CircuitOpen) as caught:
        breakers.check_circuit(EXT)
    assert "half-open" in caught.value.reason


def test_lost_trials_are_replaced_after_a_timeout(clock: FakeClock) -> None:
    """Trials that never report (cancelled calls) do not block the circuit forever."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=5, half_open_max_requests=1)
    fail(breakers, 1)
    clock.advance(5)
    breakers.check_circuit(EXT)
    clock.advance(5)
    breakers.check_circuit(EXT)
    assert 1 == breakers.snapshot(EXT).half_open_admitted


def test_results_recorded_while_open_are_ignored(clock: FakeClock) -> None:
    """A late success from a call admitted before the circuit opened does not close it."""
    breakers = make(clock, failure_threshold=1)
    fail(breakers, 1)
    succeed(breakers, 1)
    fail(breakers, 1)
    assert "open" == breakers.state(EXT)


def test_force_open_holds_past_the_timeout(clock: FakeClock) -> None:
    """A circuit opened by an operator stays open until closed by hand."""
    breakers = make(clock, timeout_seconds=5)
    assert "open" == breakers.force_open(EXT)
    clock.advance(500)
    assert "open" == breakers.state(EXT)
    assert False is breakers.should_attempt_recovery(EXT)
    with pytest.raises(CircuitOpen) as caught:
        breakers.check_circuit(EXT)
    assert "operator" in caught.value.reason
    assert True is breakers.snapshot(EXT).forced


def test_force_close_closes_and_clears(clock: FakeClock) -> None:
    """force_close closes an open circuit and forgets its failures."""
    breakers = make(clock, failure_threshold=3)
    fail(breakers, 3)
    assert "closed" == breakers.force_close(EXT)
    fail(breakers, 2)
    assert "closed" == breakers.state(EXT)
    assert "closed" == breakers.force_close("never_seen")


def test_reset_clears_the_streak_and_a_forced_open(clock: FakeClock) -> None:
    """reset returns to a fresh closed circuit from any state."""
    breakers = make(clock, failure_threshold=3)
    fail(breakers, 2)
    breakers.reset(EXT)
    assert 0 == breakers.snapshot(EXT).consecutive_failures
    breakers.force_open(EXT)
    assert "closed" == breakers.reset(EXT)
    breakers.check_circuit(EXT)
    assert False is breakers.snapshot(EXT).forced


def test_flat_metadata_overrides_apply_to_one_extension(clock: FakeClock) -> None:
    """`circuit_breaker_*` metadata keys override the defaults for that extension only."""
    breakers = make(clock, failure_threshold=5, timeout_seconds=60)
    config = breakers.configure(
        EXT, {"circuit_breaker_failure_threshold": 2, "circuit_breaker_timeout_seconds": 7}
    )
    assert (2, 7.0) == (config.failure_threshold, config.timeout_seconds)
    fail(breakers, 2)
    fail(breakers, 2, "pii_guard")
    assert {EXT: "open", "pii_guard": "closed"} == breakers.states()
    clock.advance(7)
    assert "half_open" == breakers.state(EXT)


def test_nested_metadata_overrides_and_flat_keys_win(clock: FakeClock) -> None:
    """`metadata["circuit_breaker"]` works too; a flat key beats the nested one."""
    breakers = make(clock)
    config = breakers.configure(
        EXT,
        {
            "circuit_breaker": {"half_open_max_requests": 1, "min_calls": 20, "window_seconds": 5},
            "circuit_breaker_min_calls": 30,
            "unrelated": True,
        },
    )
    assert (1, 30, 5.0) == (config.half_open_max_requests, config.min_calls, config.window_seconds)
    assert 3 == breakers.configure("pii_guard", {}).half_open_max_requests


def test_configure_without_overrides_restores_the_defaults(clock: FakeClock) -> None:
    """Removing an override from the metadata and configuring again brings the default back."""
    breakers = make(clock, failure_threshold=5)
    breakers.configure(EXT, {"circuit_breaker_failure_threshold": 1})
    breakers.configure(EXT, {})
    fail(breakers, 4)
    assert "closed" == breakers.state(EXT)


def test_bad_metadata_overrides_are_refused_with_their_fields(clock: FakeClock) -> None:
    """A bad override raises InvalidRecord naming the extension and every bad field."""
    breakers = make(clock)
    metadata = {
        "circuit_breaker_failure_threshold": 0,
        "circuit_breaker_error_rate_threshold": 1.5,
        "circuit_breaker_timeout": 3,
        "circuit_breaker": {"min_calls": "ten"},
    }
    with pytest.raises(InvalidRecord) as caught:
        breakers.configure(EXT, metadata)
    expected = {
        "metadata.circuit_breaker_failure_threshold",
        "metadata.circuit_breaker_error_rate_threshold",
        "metadata.circuit_breaker_timeout",
        "metadata.circuit_breaker.min_calls",
    }
    assert expected == {field for field, _ in caught.value.problems}
    assert EXT == caught.value.record
    assert expected == {field for field, _ in breaker_override_problems(metadata)}
    assert [] == breaker_override_problems({"circuit_breaker_window_seconds": 30})


def test_callbacks_see_every_transition(clock: FakeClock) -> None:
    """on_state_change callbacks get (id, old, new) for each transition, in order."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=1)
    seen: list[tuple[str, str, str]] = []
    breakers.on_state_change(lambda *change: seen.append(change))
    fail(breakers, 1)
    clock.advance(1)
    breakers.check_circuit(EXT)
    fail(breakers, 1)
    clock.advance(1)
    breakers.check_circuit(EXT)
    succeed(breakers, 1)
    breakers.force_open(EXT)
    breakers.reset(EXT)
    breakers.reset(EXT)  # already closed: no transition
    expected = [
        (EXT, "closed", "open"),
        (EXT, "open", "half_open"),
        (EXT, "half_open", "open"),
        (EXT, "open", "half_open"),
        (EXT, "half_open", "closed"),
        (EXT, "closed", "open"),
        (EXT, "open", "closed"),
    ]
    assert expected == seen


def test_a_failing_callback_does_not_break_the_call(clock: FakeClock) -> None:
    """A callback that raises is logged; the transition and later callbacks still happen."""
    breakers = make(clock, failure_threshold=1)
    seen: list[str] = []

    def broken(extension_id: str, old: str, new: str) -> None:
        raise RuntimeError("listener bug")

    breakers.on_state_change(broken)
    breakers.on_state_change(lambda extension_id, old, new: seen.append(new))
    fail(breakers, 1)
    assert (["open"], "open") == (seen, breakers.state(EXT))


def test_disabled_breaker_never_refuses_and_records_nothing(clock: FakeClock) -> None:
    """With enabled=False every call is admitted, no state is kept, and every reading says
    `disabled` (never `closed`, which would claim a protection that does not exist)."""
    breakers = make(clock, enabled=False, failure_threshold=1)
    fail(breakers, 50)
    assert "disabled" == breakers.check_circuit(EXT)
    assert ("disabled", "disabled", {}, False) == (
        breakers.state(EXT),
        breakers.update_state(EXT),
        breakers.states(),
        breakers.enabled,
    )
    assert ("disabled", None, 0) == (
        breakers.snapshot(EXT).state,
        breakers.snapshot(EXT).opened_at,
        breakers.snapshot(EXT).consecutive_failures,
    )


def test_enabled_breaker_check_returns_the_admitting_state(clock: FakeClock) -> None:
    """check_circuit answers the state that admitted the call: closed, or half_open for a
    trial call."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=5)
    assert "closed" == breakers.check_circuit(EXT)
    fail(breakers, 1)
    clock.advance(5)
    assert "half_open" == breakers.check_circuit(EXT)


@pytest.mark.parametrize("action", ["force_open", "force_close", "reset"])
def test_forcing_a_disabled_breaker_is_refused(clock: FakeClock, action: str) -> None:
    """Forcing a circuit while breakers are off raises Conflict saying so and how to turn them
    on, instead of answering a state nothing enforces."""
    breakers = make(clock, enabled=False)
    with pytest.raises(Conflict) as caught:
        getattr(breakers, action)(EXT)
    assert "circuit breakers are disabled" in str(caught.value)
    assert "EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED=true" in str(caught.value)
    assert ("disabled", {}) == (breakers.state(EXT), breakers.states())


# -- slow calls -----------------------------------------------------------------------------------

FAST, SLOW = 0.05, 0.2  # seconds, either side of the 100 ms threshold below


def test_slow_calls_open_the_circuit_without_any_error(clock: FakeClock) -> None:
    """closed -> open when slow successes reach the slow-call share of >= min_calls window
    calls; no call failed, and the callbacks see the same transition as for errors."""
    breakers = make(clock, min_calls=10, slow_call_duration_ms=100, slow_call_rate_threshold=0.5)
    seen: list[tuple[str, str, str]] = []
    breakers.on_state_change(lambda *change: seen.append(change))
    succeed(breakers, 5, seconds=FAST)
    succeed(breakers, 4, seconds=SLOW)
    assert "closed" == breakers.state(EXT)  # 9 calls: below min_calls
    succeed(breakers, 1, seconds=SLOW)  # 10 calls, 5 slow: 0.5
    snapshot = breakers.snapshot(EXT)
    assert ("open", 0) == (snapshot.state, snapshot.window_failures)
    assert "5 of 10 calls were slower than 100 ms in the window" == snapshot.open_reason
    assert [(EXT, "closed", "open")] == seen
    with pytest.raises(CircuitOpen, match="slower than 100 ms"):
        breakers.check_circuit(EXT)


def test_slow_share_below_threshold_keeps_the_circuit_closed(clock: FakeClock) -> None:
    """A slow share under the threshold never opens the circuit, however many calls."""
    breakers = make(clock, min_calls=10, slow_call_duration_ms=100, slow_call_rate_threshold=0.5)
    for _ in range(20):
        succeed(breakers, 2, seconds=FAST)
        succeed(breakers, 1, seconds=SLOW)
    snapshot = breakers.snapshot(EXT)
    assert ("closed", 60, 20) == (
        snapshot.state,
        snapshot.window_calls,
        snapshot.window_slow_calls,
    )


def test_a_call_as_long_as_the_threshold_is_not_slow(clock: FakeClock) -> None:
    """Slow means slower than `slow_call_duration_ms` (as resilience4j): 100 ms exactly is not."""
    breakers = make(clock, min_calls=1, slow_call_duration_ms=100, slow_call_rate_threshold=0.1)
    succeed(breakers, 5, seconds=0.1)
    assert ("closed", 0) == (breakers.state(EXT), breakers.snapshot(EXT).window_slow_calls)
    succeed(breakers, 1, seconds=0.1001)  # 1 slow of 6
    assert "open" == breakers.state(EXT)


def test_slow_calls_older_than_the_window_do_not_count(clock: FakeClock) -> None:
    """Slow calls that left the window are forgotten, like failures."""
    breakers = make(
        clock,
        min_calls=4,
        slow_call_duration_ms=100,
        slow_call_rate_threshold=0.5,
        window_seconds=10,
    )
    succeed(breakers, 3, seconds=SLOW)
    clock.advance(11)
    succeed(breakers, 3, seconds=FAST)
    succeed(breakers, 1, seconds=SLOW)  # the window holds 4 calls, 1 slow; with the old, 4/7
    snapshot = breakers.snapshot(EXT)
    assert ("closed", 4, 1) == (snapshot.state, snapshot.window_calls, snapshot.window_slow_calls)


def test_slow_and_failed_calls_are_judged_apart(clock: FakeClock) -> None:
    """Each rule judges its own share of the window: 4 slow and 4 failed calls out of 10 open
    neither at 0.5 (a failure is never also counted as slow)."""
    breakers = make(
        clock,
        failure_threshold=100,
        min_calls=10,
        error_rate_threshold=0.5,
        slow_call_duration_ms=100,
        slow_call_rate_threshold=0.5,
    )
    for _ in range(4):
        succeed(breakers, 1, seconds=SLOW)
        fail(breakers, 1)
    succeed(breakers, 2, seconds=FAST)
    snapshot = breakers.snapshot(EXT)
    assert ("closed", 10, 4, 4) == (
        snapshot.state,
        snapshot.window_calls,
        snapshot.window_failures,
        snapshot.window_slow_calls,
    )


def test_slow_trial_call_reopens_for_a_full_timeout(clock: FakeClock) -> None:
    """half_open -> open when a trial call succeeds but slowly (resilience4j counts it against
    the trial too): a trial is asked whether the extension is well again, and slow is not."""
    breakers = make(clock, failure_threshold=1, timeout_seconds=5, slow_call_duration_ms=100)
    fail(breakers, 1)
    clock.advance(5)
    breakers.check_circuit(EXT)
    succeed(breakers, 1, seconds=SLOW)
    snapshot = breakers.snapshot(EXT)
    assert ("open", "a trial call was slower than 100 ms while half-open") == (
        snapshot.state,
        snapshot.open_reason,
    )
    clock.advance(4.9)
    with pytest.raises(CircuitOpen):
        breakers.check_circuit(EXT)
    clock.advance(0.1)
    breakers.check_circuit(EXT)
    succeed(breakers, 1, seconds=FAST)
    assert "closed" == breakers.state(EXT)


def test_slow_calls_off_by_default_change_nothing(clock: FakeClock) -> None:
    """With `slow_call_duration_ms` 0 (the default) no duration is slow: an hour-long success
    counts like any success, closed and half-open alike."""
    breakers = make(clock, failure_threshold=1, min_calls=1, timeout_seconds=5)
    assert (0, 1.0) == (
        breakers.config.slow_call_duration_ms,
        breakers.config.slow_call_rate_threshold,
    )
    succeed(breakers, 20, seconds=3600.0)
    snapshot = breakers.snapshot(EXT)
    assert ("closed", 20, 0) == (snapshot.state, snapshot.window_calls, snapshot.window_slow_calls)
    fail(breakers, 1)
    clock.advance(5)
    breakers.check_circuit(EXT)
    succeed(breakers, 1, seconds=3600.0)
    assert "closed" == breakers.state(EXT)


def test_slow_call_metadata_overrides_apply_to_one_extension(clock: FakeClock) -> None:
    """Both slow-call settings are `circuit_breaker_*` metadata overrides, flat or nested, and
    can turn slow calls on (or off) for one extension."""
    breakers = make(clock, min_calls=2)
    config = breakers.configure(
        EXT,
        {
            "circuit_breaker_slow_call_duration_ms": 100,
            "circuit_breaker": {"slow_call_rate_threshold": 0.5},
        },
    )
    assert (100, 0.5) == (config.slow_call_duration_ms, config.slow_call_rate_threshold)
    succeed(breakers, 1, seconds=FAST)
    succeed(breakers, 1, seconds=SLOW)
    succeed(breakers, 2, "pii_guard", seconds=SLOW)
    assert {EXT: "open", "pii_guard": "closed"} == breakers.states()
    on = make(clock, min_calls=1, slow_call_duration_ms=100)
    off = on.configure(EXT, {"circuit_breaker_slow_call_duration_ms": 0})
    succeed(on, 1, seconds=SLOW)
    assert 0 == off.slow_call_duration_ms
    assert "closed" == on.state(EXT)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("slow_call_duration_ms", -1, "must be at least 0"),
        ("slow_call_duration_ms", 1.5, "must be an integer"),
        ("slow_call_duration_ms", "100", "must be an integer"),
        ("slow_call_duration_ms", True, "must be an integer"),
        ("slow_call_rate_threshold", 0, "must be greater than 0"),
        ("slow_call_rate_threshold", 1.5, "must be at most 1"),
        ("slow_call_rate_threshold", float("nan"), "must be greater than 0"),
        ("slow_call_rate_threshold", "half", "must be a number"),
    ],
)
def test_bad_slow_call_values_are_refused_naming_the_key(
    clock: FakeClock, key: str, value: Any, message: str
) -> None:
    """A bad slow-call value is refused as metadata (flat or nested, the path named) and as
    configuration (the key named)."""
    breakers = make(clock)
    for metadata, field in (
        ({f"circuit_breaker_{key}": value}, f"metadata.circuit_breaker_{key}"),
        ({"circuit_breaker": {key: value}}, f"metadata.circuit_breaker.{key}"),
    ):
        with pytest.raises(InvalidRecord) as caught:
            breakers.configure(EXT, metadata)
        assert [field] == [f for f, _ in caught.value.problems]
        assert message in caught.value.problems[0][1]
        assert caught.value.problems == breaker_override_problems(metadata)
    with pytest.raises(ValueError, match=f"{key}: {message}"):
        BreakerConfig(**{key: value})


def test_config_comes_from_the_settings_keys() -> None:
    """BreakerConfig.from_settings reads every circuit_breaker_* key."""
    settings = Settings.load(
        environ={},
        circuit_breaker_enabled=True,
        circuit_breaker_failure_threshold=7,
        circuit_breaker_timeout_seconds=12,
        circuit_breaker_half_open_max_requests=2,
        circuit_breaker_error_rate_threshold=0.25,
        circuit_breaker_window_seconds=30,
        circuit_breaker_min_calls=4,
        circuit_breaker_slow_call_duration_ms=250,
        circuit_breaker_slow_call_rate_threshold=0.8,
    )
    expected = BreakerConfig(True, 7, 12.0, 2, 0.25, 30.0, 4, 250, 0.8)
    assert expected == BreakerConfig.from_settings(settings)
    assert True is CircuitBreakers.from_settings(settings).enabled


def test_bad_config_values_are_refused() -> None:
    """BreakerConfig rejects values the rules cannot work with."""
    with pytest.raises(ValueError, match="error_rate_threshold"):
        BreakerConfig(error_rate_threshold=0)
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerConfig(failure_threshold=0)


def test_snapshot_reports_counters_and_opening_time(clock: FakeClock) -> None:
    """snapshot() shows the streak, the window and when (wall clock) the circuit opened."""
    breakers = CircuitBreakers(
        BreakerConfig(enabled=True, failure_threshold=3), clock=clock, wall_clock=lambda: 1.7e9
    )
    succeed(breakers, 2)
    fail(breakers, 2)
    snapshot = breakers.snapshot(EXT)
    assert (2, 4, 2, None) == (
        snapshot.consecutive_failures,
        snapshot.window_calls,
        snapshot.window_failures,
        snapshot.opened_at,
    )
    fail(breakers, 1)
    as_dict = breakers.snapshots()[EXT].to_dict()
    assert ("open", "2023-11-14T22:13:20Z", "3 consecutive failures") == (
        as_dict["state"],
        as_dict["opened_at"],
        as_dict["open_reason"],
    )


# -- the breaker against a plain reference model ------------------------------------------------


class ReferenceBreaker:
    """The rules written as plainly as possible: every closed-state call kept in a list."""

    def __init__(self, config: BreakerConfig, width: float, buckets: int) -> None:
        self.config, self.width, self.buckets = config, width, buckets
        self.state = "closed"
        self.calls: list[tuple[float, bool, bool]] = []  # (bucket, failed, slow) while closed
        self.opened_at = self.half_open_since = 0.0
        self.admitted = 0
        self.forced = False

    def streak(self) -> int:
        count = 0
        for _, failed, _ in reversed(self.calls):
            if not failed:
                break
            count += 1
        return count

    def window(self, now: float) -> list[tuple[bool, bool]]:
        """(failed, slow) of every call in the window."""
        current = now // self.width
        return [(f, s) for bucket, f, s in self.calls if bucket > current - self.buckets]

    def share(self, now: float, which: int) -> float | None:
        """The failed (0) or slow (1) share of the window; None below min_calls."""
        window = self.window(now)
        if len(window) < self.config.min_calls:
            return None
        return sum(call[which] for call in window) / len(window)

    def to(self, state: str, now: float) -> None:
        if state == "open":
            self.opened_at = now
        if state == "half_open":
            self.half_open_since = now
        if state != "half_open":
            self.calls = []
        self.admitted = 0
        self.state = state

    def due(self, now: float) -> bool:
        return (
            self.state == "open"
            and not self.forced
            and now - self.opened_at >= self.config.timeout_seconds
        )

    def check(self, now: float) -> bool:
        if self.due(now):
            self.to("half_open", now)
        if self.state == "closed":
            return True
        if self.state == "open":
            return False
        if self.admitted and now - self.half_open_since >= self.config.timeout_seconds:
            self.half_open_since, self.admitted = now, 0
        if self.admitted >= self.config.half_open_max_requests:
            return False
        self.admitted += 1
        return True

    def record(self, now: float, failed: bool, seconds: float) -> None:
        config = self.config
        ms = config.slow_call_duration_ms
        slow = not failed and ms > 0 and seconds * 1000 > ms
        if self.state == "half_open":
            self.to("open" if failed or slow else "closed", now)
        elif self.state == "closed":
            self.calls.append((now // self.width, failed, slow))
            failed_share = self.share(now, 0)
            slow_share = self.share(now, 1)
            if (
                failed
                and (
                    self.streak() >= config.failure_threshold
                    or (failed_share is not None and failed_share >= config.error_rate_threshold)
                )
            ) or (
                slow and slow_share is not None and slow_share >= config.slow_call_rate_threshold
            ):
                self.to("open", now)


class BreakerMachine(RuleBasedStateMachine):
    """Random sequences of calls, clock moves and operator actions: breaker == model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)

    @initialize(
        failure_threshold=st.integers(1, 6),
        timeout_seconds=st.sampled_from([0.5, 1.0, 3.0]),
        half_open_max_requests=st.integers(1, 3),
        error_rate_threshold=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
        window_seconds=st.sampled_from([1.0, 4.0, 8.0]),
        min_calls=st.integers(1, 8),
        slow_call_duration_ms=st.sampled_from([0, 100]),
        slow_call_rate_threshold=st.sampled_from([0.25, 0.5, 1.0]),
    )
    def setup(self, **values: Any) -> None:
        config = BreakerConfig(enabled=True, **values)
        self.breakers = CircuitBreakers(config, clock=self.clock)
        # window_seconds <= 60 gives 1-second buckets, as the module describes
        buckets = int(config.window_seconds)
        self.model = ReferenceBreaker(config, config.window_seconds / buckets, buckets)

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 20.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def check(self) -> None:
        expected = self.model.check(self.clock.now)
        try:
            self.breakers.check_circuit(EXT)
            admitted = True
        except CircuitOpen:
            admitted = False
        assert expected == admitted

    @rule(failed=st.booleans(), seconds=st.sampled_from([0.0, 0.05, 0.1, 0.2]))
    def record(self, failed: bool, seconds: float) -> None:
        self.model.record(self.clock.now, failed, seconds)
        if failed:
            self.breakers.record_failure(EXT)
        else:
            self.breakers.record_success(EXT, seconds)

    @rule()
    def force_open(self) -> None:
        self.model.forced = True
        self.model.to("open", self.clock.now)
        self.breakers.force_open(EXT)

    @rule()
    def reset(self) -> None:
        self.model.forced = False
        self.model.to("closed", self.clock.now)
        self.breakers.reset(EXT)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "model"):
            return
        if self.model.due(self.clock.now):
            self.model.to("half_open", self.clock.now)
        assert self.model.state == self.breakers.state(EXT)
        if self.model.state == "closed":
            snapshot = self.breakers.snapshot(EXT)
            window = self.model.window(self.clock.now)
            failed = sum(f for f, _ in window)
            slow = sum(s for _, s in window)
            assert (self.model.streak(), len(window), failed, slow) == (
                snapshot.consecutive_failures,
                snapshot.window_calls,
                snapshot.window_failures,
                snapshot.window_slow_calls,
            )


BreakerMachine.TestCase.settings = hypothesis_settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
TestBreakerAgainstModel = BreakerMachine.TestCase
