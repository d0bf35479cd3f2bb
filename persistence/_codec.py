"""The event codec: an explicit tag registry, schema versions and upcasters.

Events are encoded as **JSON** (``msgspec.json``), not msgpack, because:

- a journal is readable with nothing but the ``sqlite3`` shell (``SELECT payload FROM events``);
- SQLite's ``json_extract`` can query payloads in place, which the audit views need
  (``WHERE json_extract(payload, '$.job_id') = ?``);
- msgspec's JSON codec runs within a small factor of its msgpack codec for these small structs
  (decoding one event straight into its class takes well under a microsecond), so the speed
  given up is small next to the SQLite row fetch it sits behind.

Every journaled event class is registered with an explicit, namespaced tag and a schema
version.  Decoding a payload stored at the current version goes straight into the class through
a per-class ``Decoder`` (no intermediate dict); an older payload is decoded to a dict, upgraded
one version at a time by the upcasters registered for its tag, then converted to the class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar, overload

import msgspec

from runtime import ConfigurationError, Message

from ._errors import EventDecodeError, EventEncodeError, JournalError

__all__ = [
    "EncodedEvent",
    "Event",
    "EventCodec",
    "UndecodedEvent",
    "Upcaster",
    "default_codec",
]


class Event(Message, frozen=True, kw_only=True):
    """Base of every journaled event (a fact, named in the past tense).

    Subclasses repeat ``kw_only=True``, set an explicit namespaced ``tag`` and are registered in
    an :class:`EventCodec`.  Evolve them safely: new fields get defaults, a field never changes
    type, a tag is never reused; a breaking change bumps the registered version and adds an
    upcaster.
    """


class UndecodedEvent(Event, frozen=True, kw_only=True, tag="persistence.undecoded"):
    """Stands in for a stored event that a lenient codec could not decode (audit tools only).

    A codec built with ``keep_undecodable=True`` returns this instead of raising, so a replay
    tool can show the raw payload.  It is never written to a journal.
    """

    event_tag: str
    schema_version: int
    payload: str
    reason: str


E = TypeVar("E", bound=Event)
S = TypeVar("S")

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Upgrade a raw payload (a dict) by exactly one schema version."""

Decode = Callable[[str | bytes], Any]


class EncodedEvent(NamedTuple):
    """An event ready to store: its tag, the schema version it was written at, and its JSON."""

    tag: str
    schema_version: int
    payload: bytes


class _Registration(NamedTuple):
    cls: type[Event]
    version: int
    decode: Decode


class EventCodec:
    """Encode and decode journaled events and snapshot states.

    ``register`` adds event classes (also usable as a class decorator); ``upcaster`` adds
    one-version payload upgrades.  With ``keep_undecodable=True`` a stored event that cannot be
    decoded comes back as an :class:`UndecodedEvent` instead of raising.
    """

    def __init__(self, *, keep_undecodable: bool = False) -> None:
        self.keep_undecodable = keep_undecodable
        self._encoder = msgspec.json.Encoder()
        self._by_tag: dict[str, _Registration] = {}
        self._by_class: dict[type[Event], tuple[str, int]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._state_decoders: dict[type[Any], Decode] = {}
        # tag -> (current version, decode): what the journals' hot read loops consult.
        self._fast: dict[str, tuple[int, Decode]] = {}

    # -- registration ------------------------------------------------------------------------

    @overload
    def register(self, cls: type[E], /, *, version: int = 1) -> type[E]: ...

    @overload
    def register(self, /, *, version: int = 1) -> Callable[[type[E]], type[E]]: ...

    def register(self, cls: Any = None, /, *, version: int = 1) -> Any:
        """Register an event class at its current schema ``version`` (also a class decorator).

        Raises:
            ConfigurationError: the class is not an ``Event``, has no explicit namespaced tag
                (a string containing a dot), forbids unknown fields, the version is below 1,
                or the tag is already registered.
        """
        if cls is None:

            def decorate(target: type[E]) -> type[E]:
                self._add(target, version)
                return target

            return decorate
        self._add(cls, version)
        return cls

    def _add(self, cls: type[Event], version: int) -> None:
        where = "EventCodec.register"
        if not (isinstance(cls, type) and issubclass(cls, Event)):
            raise ConfigurationError(f"{cls!r} is not an Event subclass", where=where)
        if cls is UndecodedEvent:
            raise ConfigurationError("UndecodedEvent is never journaled", where=where)
        config = cls.__struct_config__
        tag = config.tag
        if not isinstance(tag, str) or "." not in tag:
            raise ConfigurationError(
                f"{cls.__qualname__} needs an explicit namespaced tag such as "
                f'tag="render.frame_completed" (got {tag!r})',
                where=where,
            )
        if config.forbid_unknown_fields:
            raise ConfigurationError(
                f"{cls.__qualname__}: journaled events must accept unknown fields "
                "(old code must read events written by newer code)",
                where=where,
            )
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigurationError(f"version must be an int >= 1, got {version!r}", where=where)
        existing = self._by_tag.get(tag)
        if existing is not None:
            if existing.cls is cls and existing.version == version:
                return
            raise ConfigurationError(
                f"tag {tag!r} is already registered to {existing.cls.__qualname__} "
                f"(version {existing.version})",
                where=where,
            )
        decode: Decode = msgspec.json.Decoder(cls).decode
        self._by_tag[tag] = _Registration(cls, version, decode)
        self._by_class[cls] = (tag, version)
        self._fast[tag] = (version, decode)

    def upcaster(self, tag: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register ``fn(payload) -> payload`` upgrading a raw ``tag`` payload by one version.

        Raises:
            ConfigurationError: ``from_version`` is below 1, or an upcaster for the same tag
                and version already exists.
        """
        where = "EventCodec.upcaster"
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise ConfigurationError(
                f"from_version must be an int >= 1, got {from_version!r}", where=where
            )
        key = (tag, from_version)

        def decorate(fn: Upcaster) -> Upcaster:
            if key in self._upcasters:
                raise ConfigurationError(
                    f"an upcaster for {tag!r} from version {from_version} already exists",
                    where=where,
                )
            self._upcasters[key] = fn
            return fn

        return decorate

    def update(self, other: EventCodec) -> None:
        """Add every registration and upcaster of ``other`` to this codec.

        Raises:
            ConfigurationError: a tag or upcaster in ``other`` conflicts with one here.
        """
        for registration in other._by_tag.values():
            self._add(registration.cls, registration.version)
        for (tag, from_version), fn in other._upcasters.items():
            if self._upcasters.get((tag, from_version), fn) is not fn:
                raise ConfigurationError(
                    f"conflicting upcasters for {tag!r} from version {from_version}",
                    where="EventCodec.update",
                )
            self._upcasters[(tag, from_version)] = fn

    # -- introspection -----------------------------------------------------------------------

    def tags(self) -> dict[str, tuple[type[Event], int]]:
        """Return every registered tag with its class and current schema version."""
        return {tag: (reg.cls, reg.version) for tag, reg in self._by_tag.items()}

    def fast_decoders(self) -> Mapping[str, tuple[int, Decode]]:
        """Return ``tag -> (current version, decode)`` for hot read loops (do not mutate).

        A payload whose stored version equals the current one can be passed straight to
        ``decode``; anything else (or any failure) goes through :meth:`decode`.
        """
        return self._fast

    # -- events ------------------------------------------------------------------------------

    def encode(self, event: Event) -> EncodedEvent:
        """Encode ``event`` as JSON with its tag and current schema version.

        Raises:
            EventEncodeError: the event's class is not registered here, or a value in it
                cannot be encoded.
        """
        entry = self._by_class.get(type(event))
        if entry is None:
            raise EventEncodeError(
                event_type=type(event).__qualname__,
                reason="its class is not registered in this codec",
            )
        try:
            payload = self._encoder.encode(event)
        except (TypeError, ValueError, msgspec.EncodeError) as error:
            raise EventEncodeError(
                event_type=type(event).__qualname__, reason=str(error)
            ) from error
        return EncodedEvent(entry[0], entry[1], payload)

    def decode(
        self, tag: str, schema_version: int, payload: str | bytes, *, position: int = 0
    ) -> Event:
        """Decode a stored payload written at ``schema_version``, upcasting it if it is older.

        Raises:
            EventDecodeError: the tag is unknown, the payload was written by a newer schema, an
                upcaster is missing or fails, or the payload does not match the class (unless
                the codec keeps undecodable events).
        """
        try:
            return self._decode(tag, schema_version, payload, position)
        except EventDecodeError as error:
            if not self.keep_undecodable:
                raise
            text = payload if isinstance(payload, str) else payload.decode("utf-8", "replace")
            return UndecodedEvent(
                event_tag=tag, schema_version=schema_version, payload=text, reason=error.reason
            )

    def _decode(self, tag: str, schema_version: int, payload: str | bytes, position: int) -> Event:
        registration = self._by_tag.get(tag)
        if registration is None:
            raise EventDecodeError(
                position=position, tag=tag, reason="unknown tag (no event class registered)"
            )
        try:
            if schema_version == registration.version:
                event: Event = registration.decode(payload)
                return event
            if schema_version > registration.version:
                raise EventDecodeError(
                    position=position,
                    tag=tag,
                    reason=f"written at schema version {schema_version}, newer than this "
                    f"code's version {registration.version}",
                )
            if schema_version < 1:
                raise EventDecodeError(
                    position=position, tag=tag, reason=f"invalid schema version {schema_version}"
                )
            raw = msgspec.json.decode(payload)
            if not isinstance(raw, dict):
                raise EventDecodeError(
                    position=position, tag=tag, reason="payload is not an object"
                )
            for version in range(schema_version, registration.version):
                upcast = self._upcasters.get((tag, version))
                if upcast is None:
                    raise EventDecodeError(
                        position=position,
                        tag=tag,
                        reason=f"no upcaster from schema version {version} to {version + 1}",
                    )
                try:
                    raw = upcast(raw)
                except Exception as error:
                    raise EventDecodeError(
                        position=position,
                        tag=tag,
                        reason=f"upcaster from version {version} failed: {error!r}",
                    ) from error
            upgraded: Event = registration.decode(self._encoder.encode(raw))
            return upgraded
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as error:
            raise EventDecodeError(position=position, tag=tag, reason=str(error)) from error

    # -- snapshot states ---------------------------------------------------------------------

    def encode_state(self, state: msgspec.Struct) -> bytes:
        """Encode a snapshot state (any msgspec Struct) as JSON.

        Raises:
            JournalError: a value in the state cannot be encoded.
        """
        try:
            return self._encoder.encode(state)
        except (TypeError, ValueError, msgspec.EncodeError) as error:
            raise JournalError(
                f"cannot encode snapshot state {type(state).__qualname__}: {error}"
            ) from error

    def decode_state(self, data: str | bytes, state_type: type[S]) -> S:
        """Decode a snapshot state of ``state_type``.

        Raises:
            JournalError: the data does not match ``state_type``.
        """
        decode = self._state_decoders.get(state_type)
        if decode is None:
            decode = self._state_decoders[state_type] = msgspec.json.Decoder(state_type).decode
        try:
            state: S = decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise JournalError(
                f"cannot decode snapshot state {state_type.__qualname__}: {error}"
            ) from error
        return state


default_codec = EventCodec()
"""The process-wide registry: event modules register into it with ``@default_codec.register``.

``taskfarm replay`` imports the modules listed under the ``taskfarm.events`` entry-point group
and decodes with this codec (plus any codec object such an entry point names).
"""
