"""Zero-config discovery of clusterd nodes: mDNS advertisement and browsing
(python-zeroconf), `--peer` addresses where multicast is blocked, verification
of every node with an RPC, and detection of duplicate node ids."""

from .advertise import Advertiser
from .browse import HealthCheck, NodeBrowser, browse
from .discover import (
    DiscoveryResult,
    DuplicateId,
    NodeReport,
    PeerError,
    Probe,
    discover,
    distinct_nodes,
    find_duplicates,
    parse_peer,
)
from .interfaces import InterfaceError, resolve_interfaces
from .records import SERVICE_TYPE, TXT_KEYS, DiscoveredNode, node_from_info, txt_from_info

__all__ = [
    "Advertiser", "HealthCheck", "NodeBrowser", "browse", "DiscoveryResult", "DuplicateId",
    "NodeReport", "PeerError", "Probe", "discover", "distinct_nodes", "find_duplicates", "parse_peer",
    "InterfaceError", "resolve_interfaces", "SERVICE_TYPE", "TXT_KEYS", "DiscoveredNode",
    "node_from_info", "txt_from_info",
]
