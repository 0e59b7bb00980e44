"""The policy record's rules (SPEC.md, "Routing policies and the pipeline"): strict fields, every
problem named by field and item, the depth limits, references by stage type, and which
policies a snapshot reports unusable once an extension they name is disabled or deleted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import record

from extreg.adapters.fixtures import load_fixtures
from extreg.core.model import parse_extension
from extreg.core.policy import (
    POST_WITHOUT_PROVIDERS,
    PolicyLimits,
    complexity_warnings,
    parse_policy,
    reference_problems,
)
from extreg.core.snapshot import Snapshot
from extreg.errors import FixtureError, InvalidRecord

LIMITS = PolicyLimits()
TYPES = {"norm": "pre", "guard": "validator", "llm": "provider", "mask": "post"}


def policy(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "policy_id": "support_en",
        "pre": [{"id": "norm"}],
        "validators": [{"id": "guard"}],
        "providers": ["llm", "openai:gpt-4.1-mini"],
        "post": [{"id": "mask", "mode": "optional"}],
    }
    return {**base, **values}


def problems_of(data: object, limits: PolicyLimits = LIMITS) -> list[tuple[str, str]]:
    with pytest.raises(InvalidRecord) as caught:
        parse_policy(data, limits=limits)
    assert caught.value.kind == "policy"
    return caught.value.problems


def test_defaults_are_required_and_block() -> None:
    parsed = parse_policy(policy(), limits=LIMITS)
    assert parsed.pre[0].mode == "required"
    assert parsed.validators[0].on_fail == "block"
    assert parsed.enabled is True
    assert parsed.providers == ("llm", "openai:gpt-4.1-mini")


def test_every_problem_is_named_by_field_and_item() -> None:
    found = dict(
        problems_of(
            policy(
                pre=[{"id": "norm", "mode": "sometimes", "on_fail": "warn"}],
                validators=[{"id": "guard"}, {"idd": "x"}],
                providers=["has space"],
                colour="blue",
            )
        )
    )
    assert found["colour"] == "unknown field"
    assert found["pre[0].on_fail"] == "unknown field"  # on_fail belongs to validators
    assert found["pre[0].mode"].startswith("must be one of required, optional")
    assert found["validators[1].idd"] == "unknown field"
    assert found["validators[1].id"] == "required field is missing"
    assert "provider hook" in found["providers[0]"]


def test_a_policy_without_id_says_so() -> None:
    assert ("policy_id", "required field is missing") in problems_of({"pre": []})


@pytest.mark.parametrize(
    ("stage", "key"),
    [
        ("pre", "extension_max_pre_count"),
        ("validators", "extension_max_validators_count"),
        ("post", "extension_max_post_count"),
    ],
)
def test_stage_counts_are_limited(stage: str, key: str) -> None:
    item = {"id": "x"}
    found = problems_of(policy(**{stage: [item] * 3}), PolicyLimits(2, 2, 2, 2))
    assert (stage, f"3 items exceed {key} 2") in found


def test_depth_counts_pre_validators_and_post_not_providers() -> None:
    limits = PolicyLimits(max_depth=3)
    parse_policy(policy(providers=[f"p{i}" for i in range(8)]), limits=limits)  # 3 items: fine
    found = problems_of(policy(post=[{"id": "mask"}, {"id": "mask"}]), limits)
    assert found == [
        ("policy", "4 pre, validator and post items exceed extension_max_pipeline_depth 3")
    ]


def test_references_must_name_an_extension_of_the_stage_type() -> None:
    parsed = parse_policy(
        policy(pre=[{"id": "guard"}], validators=[{"id": "nosuch"}], providers=["mask", "x:y"]),
        limits=LIMITS,
    )
    assert reference_problems(parsed, TYPES) == [
        ("pre[0].id", "extension 'guard' is a validator extension, not a pre"),
        ("validators[0].id", "no extension 'nosuch'"),
        ("providers[0]", "extension 'mask' is a post extension, not a provider"),
    ]


def test_complexity_warnings_follow_the_originals_recommendations() -> None:
    assert complexity_warnings(parse_policy(policy(), limits=LIMITS)) == []
    heavy = parse_policy(policy(pre=[{"id": "norm"}] * 3), limits=LIMITS)
    assert complexity_warnings(heavy) == [
        "5 pre, validator and post items: more than the recommended 4 adds latency to every message",
        "pre: 3 items, more than the recommended 2",
    ]


def test_post_without_providers_is_warned_about_as_it_never_runs() -> None:
    """A run of a policy without providers ends after its validators: its post items are
    allowed (a provider may be added later) but said to do nothing."""
    idle = parse_policy(policy(providers=[]), limits=LIMITS)
    assert [POST_WITHOUT_PROVIDERS] == complexity_warnings(idle)
    assert POST_WITHOUT_PROVIDERS.startswith("post: never runs")
    assert [] == complexity_warnings(parse_policy(policy(providers=[], post=[]), limits=LIMITS))


def _extensions() -> list[Any]:
    return [
        parse_extension(
            record(ext_id, type=ext_type, subject=f"s.{ext_id}"),
            max_timeout_ms=60_000,
            max_retries=10,
        )
        for ext_id, ext_type in TYPES.items()
    ]


def test_snapshot_reports_policies_whose_extensions_went_away() -> None:
    parsed = parse_policy(policy(), limits=LIMITS)
    snap = Snapshot.build(_extensions(), policies=[parsed])
    assert snap.unusable_policies == {}
    disabled = msgspec.structs.replace(snap.by_id["guard"], enabled=False)
    snap = snap.patched([disabled], ["mask"])
    assert snap.unusable_policies == {
        "support_en": [
            "validators[0].id: extension 'guard' is disabled",
            "post[0].id: extension 'mask' does not exist",
        ]
    }
    snap = snap.patched(
        [msgspec.structs.replace(disabled, enabled=True)], [], policies_deleted=["support_en"]
    )
    assert snap.unusable_policies == {} and snap.policies == {}


def _folder(tmp_path: Path, *policies: dict[str, Any]) -> Path:
    (tmp_path / "exts.json").write_text(
        json.dumps([record(i, type=t, subject=f"s.{i}") for i, t in TYPES.items()])
    )
    (tmp_path / "policies").mkdir()
    for index, item in enumerate(policies):
        (tmp_path / "policies" / f"p{index}.json").write_text(json.dumps(item))
    return tmp_path


def test_fixtures_folder_serves_its_policies(tmp_path: Path) -> None:
    found = load_fixtures(_folder(tmp_path, policy()), max_timeout_ms=60_000, max_retries=10)
    assert [p.policy_id for p in found.policies] == ["support_en"]
    assert len(found.extensions) == 4


def test_fixtures_policy_problems_name_file_record_and_field(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        policy(validators=[{"id": "nosuch"}]),
        policy(policy_id="second", pre=[{"id": "norm", "mode": "x"}]),
        policy(),  # the same id as the first, which itself is refused
    )
    with pytest.raises(FixtureError) as caught:
        load_fixtures(folder, max_timeout_ms=60_000, max_retries=10)
    assert caught.value.problems[:2] == [
        "policies/p0.json record #1 (support_en): field validators[0].id: no extension 'nosuch'",
        "policies/p1.json record #1 (second): field pre[0].mode: must be one of required,"
        " optional ('x')",
    ]


def test_fixtures_refuse_a_policy_id_twice(tmp_path: Path) -> None:
    folder = _folder(tmp_path, policy(), policy())
    with pytest.raises(FixtureError) as caught:
        load_fixtures(folder, max_timeout_ms=60_000, max_retries=10)
    assert caught.value.problems == [
        "policies/p1.json record #1 (support_en): field policy_id: duplicate policy_id,"
        " first defined in policies/p0.json record #1"
    ]
