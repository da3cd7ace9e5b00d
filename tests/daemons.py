"""Real `clusterd up` processes for tests (stopped by PID)."""

from dataclasses import dataclass, field

from clusterd.local_cluster import LocalNode as DaemonProcess
from clusterd.local_cluster import start_node as start_daemon

__all__ = ["Cluster", "DaemonProcess", "start_daemon"]


@dataclass
class Cluster:
    daemons: list[DaemonProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [d.address for d in self.daemons]

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
