"""What a node advertises in its mDNS TXT record, and the node a client sees.

The TXT record carries what planning needs before any RPC, and nothing
secret: identity, memory, chip, port and what is loaded. Keys are short
because each TXT string is at most 255 bytes and the record should fit one
mDNS packet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

SERVICE_TYPE = "_clusterd._tcp.local."
TXT_FORMAT = "1"
_MAX_VALUE = 200  # bytes; leaves room for the key within 255

# Which TXT keys exist, so a test (and a reader) can see nothing else leaks.
TXT_KEYS = frozenset(
    {"txt", "id", "boot", "name", "proto", "chip", "ram", "usable", "bw",
     "port", "state", "model", "layers", "tls"}
)


def _get(info: Any, name: str, default: Any = None) -> Any:
    """Field of a NodeInfo message or of a dict with the same field names."""
    if isinstance(info, Mapping):
        return info.get(name, default)
    return getattr(info, name, default)


def _clip(value: Any) -> str:
    text = str(value)
    data = text.encode("utf-8")
    if len(data) <= _MAX_VALUE:
        return text
    return data[:_MAX_VALUE].decode("utf-8", errors="ignore")


def model_label(model_path: str) -> str:
    """The model's folder name: enough to recognise it, and no local paths
    (user names) go out on the network."""
    return model_path.rstrip("/").rsplit("/", 1)[-1] if model_path else ""


def txt_from_info(info: Any, *, port: int, boot: str, tls: bool = False) -> dict[str, str]:
    """TXT properties from a NodeInfo (or a dict with its field names)."""
    shard = _get(info, "shard")
    has_shard = bool(_get(info, "has_shard", False)) and shard is not None
    props = {
        "txt": TXT_FORMAT,
        "id": _get(info, "node_id", ""),
        "boot": boot,
        "name": _get(info, "name", ""),
        "proto": int(_get(info, "protocol_version", 0) or 0),
        "chip": _get(info, "chip", ""),
        "ram": int(_get(info, "total_memory_bytes", 0) or 0),
        "usable": int(_get(info, "usable_memory_bytes", 0) or 0),
        "bw": f"{float(_get(info, 'bandwidth_gbs', 0.0) or 0.0):g}",
        "port": int(port),
        "state": _get(info, "state", "") or "idle",
        "model": model_label(str(_get(shard, "model_path", ""))) if has_shard else "",
        "layers": (
            f"{_get(shard, 'start_layer', 0)}-{_get(shard, 'end_layer', 0)}/{_get(shard, 'num_layers', 0)}"
            if has_shard else ""
        ),
        "tls": "1" if tls else "0",
    }
    assert set(props) == TXT_KEYS
    return {k: _clip(v) for k, v in props.items()}


@dataclass(frozen=True)
class DiscoveredNode:
    """A node as a client sees it: from its TXT record (mDNS), from its Info
    RPC (a --peer, or after verification), or both."""

    host: str                    # the address to dial
    port: int
    node_id: str = ""
    name: str = ""
    addresses: tuple[str, ...] = ()  # every address it advertised
    protocol_version: int = 0
    chip: str = ""
    total_memory_bytes: int = 0
    usable_memory_bytes: int = 0
    bandwidth_gbs: float = 0.0
    state: str = ""
    model: str = ""
    start_layer: int = 0
    end_layer: int = 0
    num_layers: int = 0
    tls: bool = False
    source: str = "mdns"         # "mdns" | "peer"
    instance: str = ""           # mDNS service name; "" for peers
    boot: str = ""               # per-process token; tells restarts and twins apart

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def layers(self) -> str:
        return f"{self.start_layer}-{self.end_layer}/{self.num_layers}" if self.model else ""

    @property
    def label(self) -> str:
        """How messages name the node: 'studio-2 (10.0.0.2:50051)'."""
        return f"{self.name} ({self.address})" if self.name else self.address


def _int(value: Optional[str]) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _float(value: Optional[str]) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def node_from_txt(
    props: Mapping[bytes | str, Optional[bytes | str]],
    addresses: tuple[str, ...],
    srv_port: int,
    instance: str,
) -> DiscoveredNode:
    """A node from a TXT record. Fields that fail to parse become empty or 0:
    a stranger's malformed record must not break discovery of the others."""
    p: dict[str, str] = {}
    for k, v in props.items():
        key = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
        val = v.decode("utf-8", "replace") if isinstance(v, bytes) else (v or "")
        p[key] = val
    start = end = num = 0
    layers = p.get("layers", "")
    if layers:
        try:
            rng, num_s = layers.split("/")
            a, b = rng.split("-")
            start, end, num = int(a), int(b), int(num_s)
        except ValueError:
            pass
    return DiscoveredNode(
        host=addresses[0] if addresses else "",
        port=_int(p.get("port")) or srv_port,
        node_id=p.get("id", ""),
        name=p.get("name", ""),
        addresses=addresses,
        protocol_version=_int(p.get("proto")),
        chip=p.get("chip", ""),
        total_memory_bytes=_int(p.get("ram")),
        usable_memory_bytes=_int(p.get("usable")),
        bandwidth_gbs=_float(p.get("bw")),
        state=p.get("state", ""),
        model=p.get("model", ""),
        start_layer=start,
        end_layer=end,
        num_layers=num,
        tls=p.get("tls") == "1",
        source="mdns",
        instance=instance,
        boot=p.get("boot", ""),
    )


def node_from_info(info: Any, host: str, port: int, *, base: Optional[DiscoveredNode] = None) -> DiscoveredNode:
    """Live figures from an Info reply, over what the TXT record said."""
    shard = _get(info, "shard")
    has_shard = bool(_get(info, "has_shard", False)) and shard is not None
    base = base or DiscoveredNode(host=host, port=port, source="peer", addresses=(host,))
    return DiscoveredNode(
        host=host,
        port=port,
        node_id=str(_get(info, "node_id", "") or base.node_id),
        name=str(_get(info, "name", "") or base.name),
        addresses=base.addresses or (host,),
        protocol_version=int(_get(info, "protocol_version", 0) or base.protocol_version),
        chip=str(_get(info, "chip", "") or base.chip),
        total_memory_bytes=int(_get(info, "total_memory_bytes", 0) or base.total_memory_bytes),
        usable_memory_bytes=int(_get(info, "usable_memory_bytes", 0) or base.usable_memory_bytes),
        bandwidth_gbs=float(_get(info, "bandwidth_gbs", 0.0) or base.bandwidth_gbs),
        state=str(_get(info, "state", "") or base.state),
        model=model_label(str(_get(shard, "model_path", ""))) if has_shard else "",
        start_layer=int(_get(shard, "start_layer", 0)) if has_shard else 0,
        end_layer=int(_get(shard, "end_layer", 0)) if has_shard else 0,
        num_layers=int(_get(shard, "num_layers", 0)) if has_shard else 0,
        tls=base.tls,
        source=base.source,
        instance=base.instance,
        # The live process's own boot id, when the node says it (older nodes do not).
        boot=str(_get(info, "boot_id", "") or "") or base.boot,
    )
