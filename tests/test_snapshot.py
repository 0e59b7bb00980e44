"""The cache's copy-on-write patch gives the snapshot a full build of the same records gives."""

from __future__ import annotations

from helpers import record
from hypothesis import given
from hypothesis import strategies as st

from extreg.core.model import TYPES, Extension, parse_extension
from extreg.core.snapshot import Snapshot

IDS = [f"e{i}" for i in range(12)]


def ext(ext_id: str, ext_type: str, enabled: bool) -> Extension:
    return parse_extension(
        record(ext_id, type=ext_type, enabled=enabled), max_timeout_ms=60_000, max_retries=10
    )


extensions = st.builds(ext, st.sampled_from(IDS), st.sampled_from(sorted(TYPES)), st.booleans())


@given(
    before=st.lists(extensions),
    upserts=st.lists(extensions),
    deleted=st.lists(st.sampled_from(IDS)),
)
def test_patched_equals_a_build_of_the_same_records(
    before: list[Extension], upserts: list[Extension], deleted: list[str]
) -> None:
    snap = Snapshot.build(before, 1)
    patched = snap.patched(upserts, deleted)
    records = {e.id: e for e in before} | {e.id: e for e in upserts}
    for ext_id in deleted:
        records.pop(ext_id, None)
    built = Snapshot.build(records.values(), 2)
    assert patched.by_id == built.by_id
    assert patched.enabled == built.enabled
    assert {t: v for t, v in patched.by_type.items() if v} == {
        t: v for t, v in built.by_type.items() if v
    }
