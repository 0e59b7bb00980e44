"""The extension record's rules (SPEC.md, "The extension record"), checked through
`extreg.core.model.parse_extension`, the one gate every record passes through."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import record

from extreg.core.model import Extension, Instance, Version, parse_extension, to_plain
from extreg.errors import InvalidRecord

MAX_TIMEOUT_MS = 60_000  # the settings' default extension_max_timeout_ms
MAX_RETRIES = 10  # the settings' default extension_max_retries

SUBJECT_RULE = (
    "must be a NATS subject: dot-separated non-empty tokens, at most 512 characters, "
    "no whitespace and no wildcards (* or >)"
)
ID_RULE = "must be 1-255 characters of a-z A-Z 0-9 _ - . and start with a letter or digit"


def parse(data: Any, **limits: int) -> Extension:
    return parse_extension(
        data,
        max_timeout_ms=limits.get("max_timeout_ms", MAX_TIMEOUT_MS),
        max_retries=limits.get("max_retries", MAX_RETRIES),
    )


def rejection(data: Any, **limits: int) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        parse(data, **limits)
    return info.value


def fields_of(exc: InvalidRecord) -> list[str]:
    return [field for field, _ in exc.problems]


# -- valid records ---------------------------------------------------------------------------


def test_minimal_record_gets_the_documented_defaults() -> None:
    """A record with only id, type and subject gets timeout 5000, retry 0, enabled, v1, {} and {}."""
    ext = parse(
        {"id": "normalize_text", "type": "pre", "subject": "beamline.ext.pre.normalize_text.v1"}
    )
    expected = Extension(
        id="normalize_text",
        type="pre",
        subject="beamline.ext.pre.normalize_text.v1",
        timeout_ms=5000,
        retry=0,
        enabled=True,
        version="v1",
        config={},
        metadata={},
        versions=(),
        instances=(),
        created_at=None,
        updated_at=None,
        created_by=None,
        updated_by=None,
    )
    assert expected == ext


@pytest.mark.parametrize("ext_type", ["pre", "validator", "post", "provider"])
def test_each_of_the_four_types_is_accepted(ext_type: str) -> None:
    """Every type named in the contract is a valid `type`."""
    assert ext_type == parse(record("x", type=ext_type)).type


def test_full_record_with_versions_and_instances_is_kept_as_given() -> None:
    """Every writable field, versions and instances included, survives parsing unchanged."""
    data = record(
        "routed",
        type="provider",
        subject="beamline.provider.routed.v1",
        timeout_ms=900,
        retry=2,
        enabled=False,
        version="v7",
        config={"model": "big", "n": [1, 2]},
        metadata={"owner": "team-a", "max_payload_size": 2048},
        versions=[
            {
                "version": "v2",
                "subject": "beamline.provider.routed.v2",
                "timeout_ms": 1200,
                "retry": 1,
                "config": {"a": 1},
                "metadata": {"b": 2},
                "routing_rules": {"tenant_id": ["acme", "beta"], "region": "eu"},
                "enabled": False,
            }
        ],
        instances=[
            {
                "instance_id": "i1",
                "subject": "beamline.provider.routed.i1",
                "weight": 0,
                "enabled": False,
                "health_status": "degraded",
            }
        ],
    )
    ext = parse(data)
    assert (
        Version(
            version="v2",
            subject="beamline.provider.routed.v2",
            timeout_ms=1200,
            retry=1,
            config={"a": 1},
            metadata={"b": 2},
            routing_rules={"tenant_id": ["acme", "beta"], "region": "eu"},
            enabled=False,
        )
        == ext.versions[0]
    )
    assert (
        Instance(
            instance_id="i1",
            subject="beamline.provider.routed.i1",
            weight=0,
            enabled=False,
            health_status="degraded",
        )
        == ext.instances[0]
    )
    assert ("routed", "provider", "beamline.provider.routed.v1", 900, 2, False, "v7") == (
        ext.id,
        ext.type,
        ext.subject,
        ext.timeout_ms,
        ext.retry,
        ext.enabled,
        ext.version,
    )
    assert {"model": "big", "n": [1, 2]} == ext.config
    assert {"owner": "team-a", "max_payload_size": 2048} == ext.metadata


@pytest.mark.parametrize(
    "ext_id",
    ["a", "9lives", "A.b-c_d", "x" * 255, "v1.2.3"],
    ids=["one-char", "starts-with-digit", "all-allowed-chars", "255-chars", "dots"],
)
def test_ids_within_the_rule_are_accepted(ext_id: str) -> None:
    """Ids of 1-255 characters of a-z A-Z 0-9 _ - . starting with a letter or digit are valid."""
    assert ext_id == parse(record("x", id=ext_id)).id


@pytest.mark.parametrize(
    "subject",
    ["a", "beamline.ext.pre.normalize_text.v1", "a-b_c.D9", "x" * 512, "é.ü"],
    ids=["single-token", "dotted", "punctuation", "512-chars", "non-ascii"],
)
def test_subjects_within_the_rule_are_accepted(subject: str) -> None:
    """A subject of at most 512 characters made of non-empty, wildcard-free tokens is valid."""
    assert subject == parse(record("x", subject=subject)).subject


def test_limits_are_inclusive() -> None:
    """timeout_ms equal to extension_max_timeout_ms and retry equal to the maximum are valid."""
    ext = parse(record("x", timeout_ms=MAX_TIMEOUT_MS, retry=MAX_RETRIES))
    assert (MAX_TIMEOUT_MS, MAX_RETRIES) == (ext.timeout_ms, ext.retry)
    ext = parse(record("y", timeout_ms=1, retry=0))
    assert (1, 0) == (ext.timeout_ms, ext.retry)


def test_limits_come_from_the_arguments_not_a_constant() -> None:
    """The configured maxima (not the defaults) decide: 1000 ms passes a 1000 limit, 1001 does not."""
    assert 1000 == parse(record("x", timeout_ms=1000), max_timeout_ms=1000).timeout_ms
    exc = rejection(record("x", timeout_ms=1001), max_timeout_ms=1000)
    assert [("timeout_ms", "1001 exceeds extension_max_timeout_ms 1000")] == exc.problems
    exc = rejection(record("x", retry=3), max_retries=2)
    assert [("retry", "3 exceeds extension_max_retries 2")] == exc.problems


# -- rejections: id ------------------------------------------------------------------------


def test_empty_id_is_rejected() -> None:
    """An empty id breaks the 1-255 length rule; the record cannot be named by it."""
    exc = rejection(record("x", id=""))
    assert "<record without id>" == exc.record
    assert ["id"] == fields_of(exc)


def test_id_of_256_characters_is_rejected() -> None:
    """An id one character over the 255 limit is rejected on field id; the message shows the
    id cut to 80 characters with its length."""
    long_id = "a" * 256
    exc = rejection(record("x", id=long_id))
    assert long_id == exc.record
    assert [("id", "Expected str of length <= 255")] == exc.problems
    assert f"extension '{long_id[:80]}... (256 characters)'" in str(exc)


@pytest.mark.parametrize(
    "bad_id",
    ["-leading-dash", "_leading_underscore", ".leading-dot", "a/b", "a b", "a:b", "ä"],
)
def test_id_outside_the_alphabet_or_with_a_bad_first_character_is_rejected(bad_id: str) -> None:
    """An id starting with - _ . or holding / space : or non-ASCII is rejected on field id."""
    exc = rejection(record("x", id=bad_id))
    assert bad_id == exc.record
    assert [("id", ID_RULE)] == exc.problems


def test_missing_id_is_rejected() -> None:
    """A record without an id is rejected on field id as a missing required field."""
    data = record("x")
    del data["id"]
    exc = rejection(data)
    assert "<record without id>" == exc.record
    assert [("id", "required field is missing")] == exc.problems


# -- rejections: type ----------------------------------------------------------------------


@pytest.mark.parametrize("bad_type", ["router", "PRE", "", "validate"])
def test_type_outside_the_four_is_rejected(bad_type: str) -> None:
    """`type` must be exactly one of pre, validator, post, provider."""
    exc = rejection(record("ext1", type=bad_type))
    assert "ext1" == exc.record
    assert ["type"] == fields_of(exc)


# -- rejections: subject -------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "beamline.*.v1",
        "beamline.>",
        "beamline.ext*",
        ">",
        "beamline. ext",
        "beamline.ext\tv1",
        "beamline.ext\nv1",
        "beamline..v1",
        ".beamline",
        "beamline.",
        "",
    ],
    ids=[
        "star-token",
        "gt-token",
        "star-in-token",
        "gt-alone",
        "space",
        "tab",
        "newline",
        "empty-middle-token",
        "empty-first-token",
        "empty-last-token",
        "empty",
    ],
)
def test_subject_breaking_the_nats_rule_is_rejected(subject: str) -> None:
    """Wildcards, whitespace and empty tokens make a subject invalid, on field subject."""
    exc = rejection(record("ext1", subject=subject))
    assert "ext1" == exc.record
    assert ["subject"] == fields_of(exc)


def test_subject_wildcard_message_explains_the_rule() -> None:
    """The subject problem is explained in words, not as a raw regular expression."""
    exc = rejection(record("ext1", subject="beamline.*"))
    assert [("subject", SUBJECT_RULE)] == exc.problems


def test_subject_longer_than_512_characters_is_rejected() -> None:
    """A 513-character subject is over the limit."""
    exc = rejection(record("ext1", subject="a" * 513))
    assert [("subject", "Expected str of length <= 512")] == exc.problems


# -- rejections: timeout and retry ---------------------------------------------------------


@pytest.mark.parametrize("timeout_ms", [0, -1])
def test_timeout_must_be_positive(timeout_ms: int) -> None:
    """timeout_ms of 0 or less is rejected on field timeout_ms."""
    exc = rejection(record("ext1", timeout_ms=timeout_ms))
    assert [("timeout_ms", "Expected int >= 1")] == exc.problems


def test_timeout_above_the_maximum_is_rejected() -> None:
    """timeout_ms above extension_max_timeout_ms is rejected and the message names the limit."""
    exc = rejection(record("ext1", timeout_ms=MAX_TIMEOUT_MS + 1))
    assert "ext1" == exc.record
    assert [("timeout_ms", "60001 exceeds extension_max_timeout_ms 60000")] == exc.problems


def test_negative_retry_is_rejected() -> None:
    """retry of -1 is rejected on field retry."""
    exc = rejection(record("ext1", retry=-1))
    assert [("retry", "Expected int >= 0")] == exc.problems


def test_retry_above_the_maximum_is_rejected() -> None:
    """retry above extension_max_retries is rejected and the message names the limit."""
    exc = rejection(record("ext1", retry=MAX_RETRIES + 1))
    assert [("retry", "11 exceeds extension_max_retries 10")] == exc.problems


# -- rejections: unknown fields and wrong types --------------------------------------------


def test_unknown_field_is_rejected() -> None:
    """A field the record does not have is an error naming that field."""
    exc = rejection(record("ext1", colour="blue"))
    assert "ext1" == exc.record
    assert [("colour", "unknown field")] == exc.problems


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timeout_ms", "100", "Expected int, got str"),
        ("timeout_ms", 100.5, "Expected int, got float"),
        ("timeout_ms", True, "Expected int, got bool"),
        ("retry", "1", "Expected int, got str"),
        ("enabled", "yes", "Expected bool, got str"),
        ("enabled", 1, "Expected bool, got int"),
        ("config", [], "Expected object, got array"),
        ("metadata", "x", "Expected object, got str"),
        ("subject", 5, "Expected str, got int"),
        ("version", 1, "Expected str, got int"),
    ],
)
def test_wrong_json_type_is_rejected_without_coercion(field: str, value: Any, message: str) -> None:
    """No value is coerced: a string "100" is not an int, 1 is not a bool, [] is not an object."""
    exc = rejection(record("ext1", **{field: value}))
    assert "ext1" == exc.record
    assert [(field, message)] == exc.problems


def test_record_that_is_not_an_object_is_rejected() -> None:
    """A list or a string in place of a record is rejected as a whole record."""
    exc = rejection(["not", "a", "record"])
    assert "<record without id>" == exc.record
    assert [("record", "Expected a JSON object, got `array`")] == exc.problems


def test_error_message_names_record_and_field() -> None:
    """str(InvalidRecord) names the record and each field at fault."""
    exc = rejection(record("ext1", retry=-1))
    assert "extension 'ext1': retry: Expected int >= 0" == str(exc)


# -- versions and instances ----------------------------------------------------------------


def test_instance_weight_above_100_is_rejected() -> None:
    """An instance weight of 101 breaks the 0-100 rule; the field path names the instance."""
    exc = rejection(
        record("ext1", instances=[{"instance_id": "i1", "subject": "a.b", "weight": 101}])
    )
    assert [("instances[0].weight", "Expected int <= 100")] == exc.problems


def test_instance_weight_below_0_is_rejected() -> None:
    """A negative instance weight is rejected."""
    exc = rejection(
        record(
            "ext1",
            instances=[
                {"instance_id": "i1", "subject": "a.b", "weight": 50},
                {"instance_id": "i2", "subject": "a.c", "weight": -1},
            ],
        )
    )
    assert [("instances[1].weight", "Expected int >= 0")] == exc.problems


def test_instance_health_status_outside_the_four_is_rejected() -> None:
    """health_status must be healthy, degraded, unhealthy or unknown."""
    exc = rejection(
        record("ext1", instances=[{"instance_id": "i1", "subject": "a.b", "health_status": "fine"}])
    )
    assert ["instances[0].health_status"] == fields_of(exc)


def test_instance_subject_follows_the_subject_rule() -> None:
    """An instance subject with a wildcard is rejected with the subject rule."""
    exc = rejection(record("ext1", instances=[{"instance_id": "i1", "subject": "a.*"}]))
    assert [("instances[0].subject", SUBJECT_RULE)] == exc.problems


def test_duplicate_instance_ids_are_rejected() -> None:
    """Two instances with the same instance_id are an error on field instances."""
    exc = rejection(
        record(
            "ext1",
            instances=[
                {"instance_id": "i1", "subject": "a.b"},
                {"instance_id": "i1", "subject": "a.c"},
            ],
        )
    )
    assert [("instances", "instance_id 'i1' appears twice")] == exc.problems


def test_duplicate_version_names_are_rejected() -> None:
    """Two versions with the same name are an error on field versions."""
    exc = rejection(
        record(
            "ext1",
            versions=[{"version": "v2", "subject": "a.b"}, {"version": "v2", "subject": "a.c"}],
        )
    )
    assert "ext1" == exc.record
    assert [("versions", "version 'v2' appears twice")] == exc.problems


def test_version_without_subject_is_rejected() -> None:
    """A version must carry its own subject."""
    exc = rejection(record("ext1", versions=[{"version": "v2"}]))
    assert [("versions[0].subject", "required field is missing")] == exc.problems


def test_version_limits_are_checked_like_the_record() -> None:
    """A version's timeout_ms and retry obey the same maxima as the record's."""
    exc = rejection(
        record(
            "ext1",
            versions=[{"version": "v2", "subject": "a.b", "timeout_ms": 70_000, "retry": 11}],
        )
    )
    assert [
        ("versions[0].timeout_ms", "70000 exceeds extension_max_timeout_ms 60000"),
        ("versions[0].retry", "11 exceeds extension_max_retries 10"),
    ] == exc.problems


def test_unknown_field_in_a_version_is_rejected() -> None:
    """Strictness reaches into versions: an unknown field there names its path."""
    exc = rejection(record("ext1", versions=[{"version": "v2", "subject": "a.b", "colour": 1}]))
    assert [("versions[0].colour", "unknown field")] == exc.problems


def test_every_problem_of_one_record_is_reported() -> None:
    """A record breaking three rules (type, subject, retry) reports all three fields, so
    `validate` can list every error (SPEC: "extreg validate DIR reports every error")."""
    exc = rejection(record("ext1", type="router", subject="a.*", retry=99))
    assert {"type", "subject", "retry"} == set(fields_of(exc))


def test_limit_problems_are_reported_alongside_both_limits() -> None:
    """timeout_ms and retry both over their maxima are two problems, not one."""
    exc = rejection(record("ext1", timeout_ms=60_001, retry=11))
    assert ["timeout_ms", "retry"] == fields_of(exc)


# -- to_plain --------------------------------------------------------------------------------


def test_to_plain_writable_only_round_trips() -> None:
    """to_plain(writable_only=True) gives exactly the writable fields, and parsing them back
    gives an equal record."""
    ext = parse(
        record(
            "routed",
            retry=1,
            config={"k": "v"},
            metadata={"m": 1},
            versions=[{"version": "v2", "subject": "a.v2", "routing_rules": {"tenant_id": "acme"}}],
            instances=[{"instance_id": "i1", "subject": "a.i1", "weight": 40}],
        )
    )
    plain = to_plain(ext, writable_only=True)
    assert [
        "id",
        "type",
        "subject",
        "timeout_ms",
        "retry",
        "enabled",
        "version",
        "config",
        "metadata",
        "versions",
        "instances",
    ] == list(plain)
    assert [
        "version",
        "subject",
        "timeout_ms",
        "retry",
        "config",
        "metadata",
        "routing_rules",
        "enabled",
    ] == list(plain["versions"][0])
    assert ext == parse(plain)


def test_to_plain_writable_only_drops_database_kept_fields() -> None:
    """Timestamps and actors (kept by the database) are left out of the writable form, also in
    versions, but kept in the full form."""
    ext = parse(
        record(
            "x",
            created_at="2025-01-27T12:00:00Z",
            updated_at="2025-01-27T12:00:00Z",
            created_by="cli:alice",
            updated_by="cli:bob",
            versions=[
                {
                    "version": "v2",
                    "subject": "a.b",
                    "created_at": "2025-01-27T12:00:00Z",
                    "created_by": "cli:alice",
                }
            ],
        )
    )
    full = to_plain(ext)
    assert ("cli:alice", "cli:bob") == (full["created_by"], full["updated_by"])
    assert "cli:alice" == full["versions"][0]["created_by"]
    writable = to_plain(ext, writable_only=True)
    dropped = {"created_at", "updated_at", "created_by", "updated_by"}
    assert set() == dropped & set(writable)
    assert set() == dropped & set(writable["versions"][0])
