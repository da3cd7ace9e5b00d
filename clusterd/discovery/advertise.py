"""A node's mDNS advertisement: register, re-announce on change, unregister."""

from __future__ import annotations

import logging
import re
import secrets
import threading
from typing import Any, Optional, Sequence

from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

from .interfaces import advertised_addresses
from .records import SERVICE_TYPE, txt_from_info

log = logging.getLogger(__name__)


def _label(text: str, limit: int) -> str:
    # DNS labels: keep them readable and short; dots would split the name.
    clean = re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")
    return clean[:limit] or "node"


class Advertiser:
    """Registers `_clusterd._tcp.local.` for one daemon.

    `interfaces` (IPv4 addresses, see resolve_interfaces) restricts both the
    sockets mDNS uses and the addresses advertised; None means every
    interface. The instance is named "<name>-<id prefix>-<boot>": unique per
    process, so a second node with a copied id (or a restarted node whose
    old record is still cached somewhere) never merges with another record;
    both stay visible and discovery decides, by id and address, whether it
    is a duplicate.
    """

    def __init__(
        self,
        info: Any,
        *,
        port: int,
        interfaces: Optional[Sequence[str]] = None,
        tls: bool = False,
    ) -> None:
        self._port = port
        self._interfaces = list(interfaces) if interfaces else None
        self._tls = tls
        # A token per process (the node's boot id when it has one): lets
        # browsers tell one node seen twice from two processes claiming one
        # id, and see restarts.
        boot = info.get("boot_id") if isinstance(info, dict) else getattr(info, "boot_id", "")
        self.boot = str(boot or "") or secrets.token_hex(4)
        self._info = info
        self._zc: Optional[Zeroconf] = None
        self._service: Optional[ServiceInfo] = None
        self._lock = threading.Lock()

    @property
    def service_name(self) -> Optional[str]:
        return self._service.name if self._service else None

    @property
    def addresses(self) -> list[str]:
        return advertised_addresses(self._interfaces)

    def _build(self, info: Any, name: Optional[str] = None) -> ServiceInfo:
        node_id = str(info.node_id if hasattr(info, "node_id") else info["node_id"])
        node_name = str(info.name if hasattr(info, "name") else info.get("name", ""))
        if name is None:
            name = f"{_label(node_name, 36)}-{node_id[:8]}-{self.boot}.{SERVICE_TYPE}"
        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=self._port,
            properties=txt_from_info(info, port=self._port, boot=self.boot, tls=self._tls),
            # One host name per process, so two daemons on one machine (or
            # in tests) never fight over the same A records.
            server=f"clusterd-{node_id[:8]}-{self.boot}.local.",
            parsed_addresses=self.addresses,
        )

    def start(self) -> None:
        """Register (blocks ~2 s while mDNS probes that the name is free)."""
        with self._lock:
            if self._zc is not None:
                return
            self._zc = Zeroconf(
                interfaces=self._interfaces or InterfaceChoice.All,
                ip_version=IPVersion.V4Only,
            )
            service = self._build(self._info)
            try:
                self._zc.register_service(service, allow_name_change=True)
            except BaseException:
                self._zc.close()
                self._zc = None
                raise
            self._service = service
            log.info("advertising %s on %s", service.name, ", ".join(self.addresses))

    def update(self, info: Any) -> bool:
        """Re-announce when what the record says changed (a shard loaded, the
        memory limit moved). Returns whether anything was sent."""
        with self._lock:
            self._info = info
            if self._zc is None or self._service is None:
                return False
            new = self._build(info, self._service.name)
            if new.properties == self._service.properties:
                return False
            self._zc.update_service(new)
            self._service = new
            return True

    def close(self) -> None:
        """Unregister (sends goodbye packets, so browsers drop us at once)."""
        with self._lock:
            zc, service = self._zc, self._service
            self._zc = self._service = None
        if zc is None:
            return
        try:
            if service is not None:
                zc.unregister_service(service)
                log.info("unregistered %s from mDNS", service.name)
        finally:
            zc.close()

    def __enter__(self) -> "Advertiser":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
