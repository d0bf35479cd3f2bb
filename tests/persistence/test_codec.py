"""The event codec: tag registry rules, schema versions, upcasters and snapshot states."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from persistence import (
    Event,
    EventCodec,
    EventDecodeError,
    EventEncodeError,
    JournalError,
    UndecodedEvent,
)
from runtime import ConfigurationError


class JobSubmitted(Event, frozen=True, kw_only=True, tag="test.job_submitted"):
    job_id: str
    priority: int = 0


class JobStarted(Event, frozen=True, kw_only=True, tag="test.job_started"):
    job_id: str
    at: datetime


# Version 3 of a renamed-field event: v1 had `name`, v2 renamed it to `title`, v3 added `tags`.
class TaskNamed(Event, frozen=True, kw_only=True, tag="test.task_named"):
    title: str
    tags: tuple[str, ...]


class State(msgspec.Struct, frozen=True):
    count: int
    names: tuple[str, ...] = ()


def test_round_trip_current_version() -> None:
    """An event encodes to JSON with its tag and decodes straight back into its class."""
    codec = EventCodec()
    codec.register(JobSubmitted)
    codec.register(JobStarted, version=2)
    started = JobStarted(job_id="j1", at=datetime(2026, 1, 1, 12, tzinfo=UTC))
    encoded = codec.encode(started)
    assert (encoded.tag, encoded.schema_version) == ("test.job_started", 2)
    assert msgspec.json.decode(encoded.payload)["type"] == "test.job_started"
    assert codec.decode(encoded.tag, 2, encoded.payload) == started
    assert codec.decode("test.job_submitted", 1, b'{"job_id":"j2"}') == JobSubmitted(job_id="j2")


def test_register_as_decorator() -> None:
    """register works as a bare class decorator and with a version argument."""
    codec = EventCodec()

    @codec.register
    class Plain(Event, frozen=True, kw_only=True, tag="test.plain"):
        pass

    @codec.register(version=3)
    class Versioned(Event, frozen=True, kw_only=True, tag="test.versioned"):
        pass

    assert codec.tags() == {"test.plain": (Plain, 1), "test.versioned": (Versioned, 3)}


class ClassNameTag(Event, frozen=True, kw_only=True, tag=True):
    pass


class NoDotTag(Event, frozen=True, kw_only=True, tag="nodot"):
    pass


class Strict(Event, frozen=True, kw_only=True, tag="test.strict", forbid_unknown_fields=True):
    pass


class Clash(Event, frozen=True, kw_only=True, tag="test.job_submitted"):
    pass


class NotAnEvent(msgspec.Struct, tag="test.not_event"):
    pass


@pytest.mark.parametrize(
    ("cls", "version", "match"),
    [
        (ClassNameTag, 1, "namespaced tag"),
        (NoDotTag, 1, "namespaced tag"),
        (Strict, 1, "unknown fields"),
        (Clash, 1, "already registered"),
        (JobSubmitted, 2, "already registered"),
        (NotAnEvent, 1, "not an Event"),
        (UndecodedEvent, 1, "never journaled"),
        (JobStarted, 0, "version"),
    ],
)
def test_register_refuses(cls: Any, version: int, match: str) -> None:
    """Registration refuses implicit tags, strict events, duplicates and bad versions."""
    codec = EventCodec()
    codec.register(JobSubmitted)
    with pytest.raises(ConfigurationError, match=match):
        codec.register(cls, version=version)


def test_registering_the_same_class_again_is_harmless() -> None:
    """Registering the identical class and version twice is a no-op."""
    codec = EventCodec()
    codec.register(JobSubmitted)
    codec.register(JobSubmitted)
    assert list(codec.tags()) == ["test.job_submitted"]


def test_unregistered_event_cannot_be_encoded() -> None:
    """Encoding an event whose class is not registered raises EventEncodeError."""
    with pytest.raises(EventEncodeError, match="JobSubmitted"):
        EventCodec().encode(JobSubmitted(job_id="j"))


def upcasting_codec() -> EventCodec:
    codec = EventCodec()
    codec.register(TaskNamed, version=3)

    @codec.upcaster("test.task_named", 1)
    def rename(payload: dict[str, Any]) -> dict[str, Any]:
        payload["title"] = payload.pop("name")
        return payload

    @codec.upcaster("test.task_named", 2)
    def add_tags(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "tags": []}

    return codec


def test_old_payloads_are_upcast_one_version_at_a_time() -> None:
    """A v1 or v2 payload goes through each upcaster in turn to the current class."""
    codec = upcasting_codec()
    v1 = b'{"type":"test.task_named","name":"render"}'
    v2 = b'{"type":"test.task_named","title":"render"}'
    expected = TaskNamed(title="render", tags=())
    assert codec.decode("test.task_named", 1, v1, position=4) == expected
    assert codec.decode("test.task_named", 2, v2, position=5) == expected


def test_decode_errors_name_position_and_tag() -> None:
    """Unknown tags, newer schemas, missing or failing upcasters and bad payloads all raise
    EventDecodeError naming the position and tag."""
    codec = upcasting_codec()
    codec.register(JobSubmitted)

    @codec.upcaster("test.job_submitted", 7)  # never used: JobSubmitted is at version 1
    def unused(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    cases: list[tuple[str, int, bytes, str]] = [
        ("test.unknown", 1, b"{}", "unknown tag"),
        ("test.job_submitted", 2, b'{"job_id":"j"}', "newer"),
        ("test.job_submitted", 1, b'{"job_id":5}', "Expected `str`"),
        ("test.job_submitted", 1, b"{not json", "JSON"),
        ("test.task_named", 1, b'{"title":"no name key"}', "upcaster from version 1 failed"),
        ("test.task_named", 0, b"{}", "invalid schema version"),
    ]
    for tag, version, payload, reason in cases:
        with pytest.raises(EventDecodeError, match=reason) as caught:
            codec.decode(tag, version, payload, position=42)
        assert (caught.value.position, caught.value.tag) == (42, tag)
        assert "position 42" in str(caught.value)

    partial = EventCodec()
    partial.register(TaskNamed, version=3)
    with pytest.raises(EventDecodeError, match="no upcaster from schema version 1 to 2"):
        partial.decode("test.task_named", 1, b'{"name":"x"}', position=1)


def test_duplicate_upcaster_is_refused() -> None:
    """Two upcasters for the same tag and version are a configuration error."""
    codec = upcasting_codec()
    with pytest.raises(ConfigurationError, match="already exists"):
        codec.upcaster("test.task_named", 1)(lambda payload: payload)
    with pytest.raises(ConfigurationError, match="from_version"):
        codec.upcaster("test.task_named", 0)


def test_lenient_codec_keeps_undecodable_events() -> None:
    """With keep_undecodable, an unknown tag decodes to an UndecodedEvent with the raw JSON."""
    codec = EventCodec(keep_undecodable=True)
    event = codec.decode("test.mystery", 1, b'{"x":1}', position=9)
    assert event == UndecodedEvent(
        event_tag="test.mystery",
        schema_version=1,
        payload='{"x":1}',
        reason="unknown tag (no event class registered)",
    )


def test_update_merges_registrations_and_upcasters() -> None:
    """update() adds another codec's classes and upcasters, refusing conflicts."""
    merged = EventCodec()
    merged.update(upcasting_codec())
    assert merged.decode("test.task_named", 1, b'{"name":"a"}') == TaskNamed(title="a", tags=())
    clashing = EventCodec()
    clashing.register(Clash)
    merged.register(JobSubmitted)
    with pytest.raises(ConfigurationError):
        merged.update(clashing)


def test_snapshot_states_round_trip() -> None:
    """Snapshot states encode as JSON and decode back; a mismatch raises JournalError."""
    codec = EventCodec()
    data = codec.encode_state(State(count=3, names=("a", "b")))
    assert codec.decode_state(data, State) == State(count=3, names=("a", "b"))
    with pytest.raises(JournalError, match="State"):
        codec.decode_state(b'{"count":"three"}', State)
