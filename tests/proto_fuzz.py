"""Hypothesis strategies for hostile messages, made from the proto's own
descriptors: a new field or call in protos/clusterd.proto is fuzzed without
a change here. Every address a message can carry stays on loopback (nodes
dial what they are given), so fuzzing sends traffic nowhere else."""

from __future__ import annotations

from typing import Iterable

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

from clusterd.wire import clusterd_pb2 as pb

F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1),
    F.TYPE_SFIXED32: (-2**31, 2**31 - 1), F.TYPE_INT64: (-2**63, 2**63 - 1),
    F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
HOSTILE_TEXT = ["", ".", "..", "../../../../etc/passwd", "/", "/etc", "a" * 300, "x" * 100_000,
                "org/name", "org/name@main", "\x00", "🙂" * 64, "%s%n", "model.safetensors",
                "config.json", "sub/../config.json", "C:\\windows", "\n\r\t"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)


def loopback_addresses(ports: Iterable[int] = ()) -> list[str]:
    """The only addresses fuzzed messages carry: loopback, some malformed."""
    return ["", "127.0.0.1:1", "127.0.0.1:99999", "127.0.0.1:-5", "127.0.0.1:" + "9" * 40,
            "[::1]:1", "127.0.0.1:0", *(f"127.0.0.1:{p}" for p in ports)]


def is_address_field(field: FieldDescriptor) -> bool:
    return "address" in field.name


def numbers(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type in INT_RANGES:
        low, high = INT_RANGES[field.type]
        return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1, -1 if low else 2]))
    if field.type == F.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if field.type == F.TYPE_DOUBLE:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from([float("nan"), float("inf"), -1.0, 1e308, -1e-308]))
    return st.booleans()


class Fuzz:
    """Strategies for the messages of one service, with `special` strategies
    for fields by name (e.g. session ids that exist, model paths that load)."""

    def __init__(self, ports: Iterable[int] = (), special: dict | None = None):
        self.addresses = st.sampled_from(loopback_addresses(ports))
        self.special = dict(special or {})

    def scalar(self, field: FieldDescriptor) -> st.SearchStrategy:
        if field.name in self.special:
            return self.special[field.name]
        if field.type == F.TYPE_STRING:
            return self.addresses if is_address_field(field) else st.one_of(
                TEXT, st.sampled_from(HOSTILE_TEXT))
        if field.type == F.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\0" * 4096]))
        return numbers(field)

    def message(self, desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        cls = getattr(pb, desc.name)
        fields = {}
        for field in desc.fields:
            if field.type == F.TYPE_MESSAGE:
                if depth >= 3:
                    continue
                value = self.message(field.message_type, depth + 1)
            else:
                value = self.scalar(field)
            if field.is_repeated:
                value = st.lists(value, max_size=6)
            fields[field.name] = value

        @st.composite
        def build(draw):
            msg = cls()
            for name, strategy in fields.items():
                if not draw(st.booleans()):
                    continue
                value = draw(strategy)
                field = desc.fields_by_name[name]
                if field.is_repeated:
                    target = getattr(msg, name)
                    if field.type == F.TYPE_MESSAGE:
                        for item in value:
                            target.add().CopyFrom(item)
                    else:
                        target.extend(value)
                elif field.type == F.TYPE_MESSAGE:
                    getattr(msg, name).CopyFrom(value)
                else:
                    setattr(msg, name, value)
            return msg

        return build()

    def body(self, desc: Descriptor) -> st.SearchStrategy[bytes]:
        """A serialized request for a call taking `desc`: a hostile message of
        that type, random bytes, or a message of another type."""
        others = [m for m in pb.DESCRIPTOR.message_types_by_name.values() if m is not desc]
        return st.one_of(
            self.message(desc).map(lambda m: m.SerializeToString()),
            self.message(desc).map(lambda m: m.SerializeToString()),
            st.binary(max_size=256),
            st.sampled_from(others).flatmap(
                lambda d: self.message(d).map(lambda m: m.SerializeToString())),
        )


def stays_on_loopback(desc: Descriptor, body: bytes, allowed: set[str]) -> bool:
    """Would the node, given `body` as a `desc`, only ever dial `allowed`
    addresses? (Random bytes can parse into any string.)"""
    try:
        msg = getattr(pb, desc.name).FromString(body)
    except (DecodeError, ValueError, UnicodeDecodeError):
        return True  # refused unparsed
    return all(a in allowed for a in _addresses(msg))


def _addresses(msg: Message) -> Iterable[str]:
    for field, value in msg.ListFields():
        if field.type == F.TYPE_MESSAGE:
            for item in (value if field.is_repeated else [value]):
                yield from _addresses(item)
        elif field.type == F.TYPE_STRING and is_address_field(field):
            yield from (value if field.is_repeated else [value])
