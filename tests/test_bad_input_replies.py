"""Bad-input corpus, extension replies (issue 5, part 3): what an extension answers.

A real `Invoker` (over a fixtures-mode registry, see `invoke_helpers`) calls tiny responders on
a real NATS server, each answering one malformed reply: bytes that are not JSON, an empty
body, JSON that is not an object (array, string, number, null, true), text that is not UTF-8,
an object nested 100,000 deep, NUL bytes, keys given twice, an object followed by garbage,
replies of 5 MB. Every call must, within its timeout:

- raise `InvalidResponse` carrying the extension's id, one attempt (a bad reply is not
  retried, only a timeout is, though the records allow 2 retries) and a short printable
  reason saying the reply is not a JSON object and quoting its start (at most 80 bytes,
  escaped); or, where the reply *is* a JSON object
  (NUL written as \\u0000, a key given twice: the last one wins, trailing whitespace, a
  valid 5 MB object), return that object;
- be counted in health (a failure, or a success) and reported to the observer ("error" or
  "ok"), and go to the circuit breaker as a failure;
- leave the invoker working: after every case a good extension still answers, the event loop
  is never blocked for long, and no other exception type (RecursionError,
  UnicodeDecodeError...) escapes.

Replies of 5 MB need a NATS server that carries them (max_payload 8 MiB, a private server);
on the shared server, whose max_payload is NATS's default 1 MB, the responder cannot send such
a reply at all and the call ends as `MaxRetriesExceeded` after its attempts time out, never
hanging. The module prints how many cases it tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import nats
import pytest
from helpers import CaseCounter
from invoke_helpers import constant, fixture_settings, listen, open_invoker, subject
from nats.aio.client import Client

from extreg import InvalidResponse, MaxRetriesExceeded
from extreg.invoke import Invoker

DEEP = 100_000
FIVE_MB = 5 * 1024 * 1024
REASON = "reply is not a JSON object"
REASON_LIMIT = 400  # the reason quotes the reply's first 80 bytes, escaped; never megabytes
TIMEOUT_MS = 2000  # each call's timeout: generous, a slow CI must not turn a reply into one
CALL_LIMIT_S = 60.0  # a deadline for hangs only: generous, whatever the machine's load
INVALID = object()  # expected outcome: InvalidResponse

# -- counting what was tried ------------------------------------------------------------------

COUNTER = CaseCounter(
    "bad-input replies corpus", ["replies"], unit="calls, each followed by a good one"
)
_print_case_count = COUNTER.fixture()


def tried(case: str) -> None:
    COUNTER.tried("replies", case)


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    name: str
    body: bytes
    expect: Any  # INVALID, or the dict the call must return


REPLIES: list[Reply] = [
    # not JSON
    Reply("plain text", b"not json", INVALID),
    Reply("every byte value", bytes(range(256)), INVALID),
    Reply("empty body", b"", INVALID),
    Reply("only whitespace", b" \r\n\t", INVALID),
    Reply("HTML error page", b"<html><body>502 Bad Gateway</body></html>", INVALID),
    Reply("single quotes", b"{'status': 'ok'}", INVALID),
    Reply("trailing comma", b'{"status": "ok",}', INVALID),
    Reply("truncated", b'{"status": "o', INVALID),
    Reply("NaN", b'{"score": NaN}', INVALID),
    Reply("Infinity", b'{"score": -Infinity}', INVALID),
    Reply("number out of range", b'{"score": 1e400}', INVALID),
    # JSON, but not an object
    Reply("array", b'[{"status": "ok"}]', INVALID),
    Reply("empty array", b"[]", INVALID),
    Reply("string", b'"ok"', INVALID),
    Reply("number", b"42", INVALID),
    Reply("negative float", b"-1.5e10", INVALID),
    Reply("null", b"null", INVALID),
    Reply("true", b"true", INVALID),
    # text that is not UTF-8
    Reply("invalid UTF-8 in a string", b'{"status": "\xff\xfe"}', INVALID),
    Reply("invalid UTF-8 in a key", b'{"\xc3\x28": 1}', INVALID),
    Reply("overlong UTF-8", b'{"status": "\xc0\xaf"}', INVALID),
    Reply("UTF-8 encoded surrogate", b'{"status": "\xed\xa0\x80"}', INVALID),
    Reply("Latin-1 text", '{"status": "café"}'.encode("latin-1"), INVALID),
    Reply("UTF-16 with BOM", '{"status": "ok"}'.encode("utf-16"), INVALID),
    Reply("UTF-8 BOM", b'\xef\xbb\xbf{"status": "ok"}', INVALID),
    Reply("lone surrogate escape", b'{"status": "\\ud800"}', INVALID),
    # deep nesting
    Reply("object nested 100k deep", b'{"a": ' * DEEP + b"1" + b"}" * DEEP, INVALID),
    Reply(
        "list nested 100k deep in an object", b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}", INVALID
    ),
    Reply("unclosed nesting 100k deep", b'{"a": ' * DEEP, INVALID),
    # NUL
    Reply("raw NUL in a string", b'{"status": "o\x00k"}', INVALID),
    Reply("NUL after the object", b'{"status": "ok"}\x00', INVALID),
    Reply("only NUL bytes", b"\x00" * 64, INVALID),
    Reply("NUL escaped in a string", b'{"status": "o\\u0000k"}', {"status": "o\x00k"}),
    Reply("NUL escaped in a key", b'{"k\\u0000": 1}', {"k\x00": 1}),
    # keys given twice: valid JSON (RFC 8259 leaves it to the reader); the last one wins
    Reply("key twice", b'{"status": "reject", "status": "ok"}', {"status": "ok"}),
    Reply("key twice, nested", b'{"a": {"b": 1, "b": 2}}', {"a": {"b": 2}}),
    # an object and then something
    Reply("object then garbage", b'{"status": "ok"} garbage', INVALID),
    Reply("two objects", b'{"status": "ok"}{"status": "ok"}', INVALID),
    Reply("object then a comma", b'{"status": "ok"},', INVALID),
    Reply("object then whitespace", b'{"status": "ok"}\n\t ', {"status": "ok"}),
    # valid replies that look odd
    Reply("empty object", b"{}", {}),
    Reply(
        "integer beyond 64 bits",
        b'{"n": 123456789012345678901234567890}',
        {"n": 123456789012345678901234567890},
    ),
]

HUGE: list[Reply] = [
    Reply("5 MB of garbage", b"x" * FIVE_MB, INVALID),
    Reply("5 MB array", b"[" + b"1," * (FIVE_MB // 2) + b"1]", INVALID),
    Reply("5 MB object then garbage", b'{"blob": "' + b"x" * FIVE_MB + b'"} tail', INVALID),
    Reply("5 MB string with invalid UTF-8", b'{"blob": "' + b"\xff" * FIVE_MB + b'"}', INVALID),
    Reply("5 MB valid object", b'{"blob": "' + b"x" * FIVE_MB + b'"}', {"blob": "x" * FIVE_MB}),
]


def record(ext_id: str, on: str) -> dict[str, Any]:
    return {"id": ext_id, "type": "pre", "subject": on, "timeout_ms": TIMEOUT_MS, "retry": 2}


def ext_id(index: int) -> str:
    return f"reply-{index}"


# -- running them -----------------------------------------------------------------------------


class LoopWatch:
    """Measures the longest stall of the event loop while it runs (a blocked invoker)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            self.longest = max(self.longest, time.perf_counter() - before - 0.01)

    async def __aenter__(self) -> Self:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def run_cases(inv: Invoker, cases: list[Reply], good: str) -> list[str]:
    """Call every case's extension once; the ways any case went wrong."""
    failures: list[str] = []
    outcomes: list[tuple[str, str]] = []
    inv.observer = lambda extension_id, _type, _version, outcome, _seconds: outcomes.append(
        (extension_id, outcome)
    )
    for index, case in enumerate(cases):
        tried(case.name)
        who = ext_id(index)
        outcomes.clear()
        problems = await one_case(inv, who, case)
        health = inv.health.get_health(who)
        counts = (health["success_count"], health["failure_count"])
        ok = case.expect is not INVALID
        if counts != ((1, 0) if ok else (0, 1)):
            problems.append(f"health counts {counts}")
        if outcomes != [(who, "ok" if ok else "error")]:
            problems.append(f"observer told {outcomes}")
        failures_seen = inv.breaker.snapshot(who).consecutive_failures
        if failures_seen != (0 if ok else 1):
            problems.append(f"breaker counted {failures_seen} consecutive failures")
        try:  # the invoker still works
            answer = await asyncio.wait_for(inv.invoke(good, {"payload": index}), CALL_LIMIT_S)
            if answer != {"fine": True}:
                problems.append(f"the good extension then answered {answer}")
        except Exception as exc:  # reported with the other failures
            problems.append(f"the good extension then failed: {exc!r}")
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)}")
    return failures


async def one_case(inv: Invoker, who: str, case: Reply) -> list[str]:
    started = time.perf_counter()
    try:
        reply = await asyncio.wait_for(inv.invoke(who, {"payload": {"n": 1}}), CALL_LIMIT_S)
    except InvalidResponse as exc:
        return invalid_problems(exc, who, case)
    except TimeoutError:
        return [f"hung for {CALL_LIMIT_S} s"]
    except Exception as exc:  # reported with the other failures
        return [f"raised {type(exc).__name__}: {str(exc)[:200]}"]
    took = time.perf_counter() - started
    if case.expect is INVALID:
        return [f"returned {str(reply)[:100]} ({took:.2f} s), expected InvalidResponse"]
    return [] if reply == case.expect else [f"returned {str(reply)[:100]}"]


def invalid_problems(exc: InvalidResponse, who: str, case: Reply) -> list[str]:
    problems = []
    if case.expect is not INVALID:
        problems.append(f"InvalidResponse for a JSON object: {exc.reason[:200]}")
    if (exc.extension_id, exc.attempts) != (who, 1):
        problems.append(f"carries {(exc.extension_id, exc.attempts)}, expected {(who, 1)}")
    reason = exc.reason
    if not reason.startswith(REASON) or len(reason) > REASON_LIMIT or not reason.isprintable():
        problems.append(f"reason {reason[:300]!r}")
    if str(exc) != f"{who}: {reason}":
        problems.append(f"message {str(exc)[:300]!r}")
    return problems


@contextlib.asynccontextmanager
async def responders(nc: Client, cases: list[Reply]) -> Any:
    """One subject and listener per case (answering its body), and a good one; the records."""
    async with contextlib.AsyncExitStack() as stack:
        records, listeners = [], []
        for index, case in enumerate(cases):
            on = subject()
            records.append(record(ext_id(index), on))
            listeners.append(await stack.enter_async_context(listen(nc, on, constant(case.body))))
        good = subject()
        records.append(record("good", good))
        await stack.enter_async_context(listen(nc, good, constant(b'{"fine": true}')))
        yield records, listeners


async def test_malformed_replies(tmp_path: Path, nats_url: str, nats_client: Client) -> None:
    """Every malformed reply gives InvalidResponse (id, 1 attempt, a short printable reason),
    every reply that is a JSON object is returned; each is counted in health, told to the
    observer and to the breaker; bad replies are not retried; the invoker keeps working. The
    longest event-loop stall is printed, not asserted (a loaded machine stalls it too)."""
    async with responders(nats_client, REPLIES) as (records, listeners):
        settings = fixture_settings(
            tmp_path,
            nats_url,
            *records,
            circuit_breaker_enabled=True,
            circuit_breaker_failure_threshold=1000,
        )
        async with open_invoker(settings) as inv, LoopWatch() as watch:
            failures = await run_cases(inv, REPLIES, "good")
    retried = [c.name for c, lst in zip(REPLIES, listeners, strict=True) if lst.count != 1]
    assert not failures, "\n".join(failures)
    assert not retried, f"bad replies were retried: {retried}"
    print(
        f"longest event-loop stall while the malformed replies were decoded:"
        f" {watch.longest * 1000:.0f} ms"
    )


async def test_five_megabyte_replies(
    tmp_path: Path, nats_server_factory: Callable[..., Any]
) -> None:
    """On a NATS server carrying 8 MiB messages, 5 MB replies that are not a JSON object give
    InvalidResponse with a reason of at most 400 characters (not megabytes of the reply), a
    valid 5 MB object is returned whole, and each is counted in health."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 8388608\n", encoding="utf-8")
    server = nats_server_factory(extra_args=["-c", str(conf)])
    nc = await nats.connect(server.url, connect_timeout=2, max_reconnect_attempts=2)
    try:
        assert nc.max_payload == 8 * 1024 * 1024
        async with responders(nc, HUGE) as (records, _):
            settings = fixture_settings(
                tmp_path,
                server.url,
                *records,
                circuit_breaker_enabled=True,
                circuit_breaker_failure_threshold=1000,
            )
            async with open_invoker(settings) as inv:
                failures = await run_cases(inv, HUGE, "good")
    finally:
        await nc.close()
    assert not failures, "\n".join(failures)


async def test_reply_over_the_servers_max_payload(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """On the shared server (max_payload 1 MB) an extension trying to answer 5 MB cannot send
    it: every attempt times out, and the call ends as MaxRetriesExceeded after 3 attempts of
    200 ms plus backoff, counted as one failure; the invoker keeps working."""
    tried("5 MB reply over the server's max_payload")
    on, good = subject(), subject()
    sent: list[BaseException | None] = []

    async def huge(msg: Any) -> None:
        try:
            await nats_client.publish(msg.reply, b"x" * FIVE_MB)
            sent.append(None)
        except Exception as exc:  # what the responder saw, checked below
            sent.append(exc)

    sub = await nats_client.subscribe(on, cb=huge)
    settings = fixture_settings(
        tmp_path, nats_url, {**record("huge", on), "timeout_ms": 200}, record("good", good)
    )
    try:
        async with (
            listen(nats_client, good, constant(b'{"fine": true}')),
            open_invoker(settings) as inv,
        ):
            with pytest.raises(MaxRetriesExceeded) as caught:
                await asyncio.wait_for(inv.invoke("huge", {"payload": 1}), CALL_LIMIT_S)
            assert ("huge", 3) == (caught.value.extension_id, caught.value.attempts)
            assert (0, 1) == (
                inv.health.get_health("huge")["success_count"],
                inv.health.get_health("huge")["failure_count"],
            )
            assert {"fine": True} == await inv.invoke("good", {"payload": 1})
    finally:
        await sub.unsubscribe()
    assert sent and all(isinstance(e, nats.errors.MaxPayloadError) for e in sent), sent
