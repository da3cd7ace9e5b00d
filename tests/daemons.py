"""Real `clusterd up` processes for tests (stopped by PID)."""

from clusterd.local_cluster import LocalNode as DaemonProcess
from clusterd.local_cluster import start_node as start_daemon

__all__ = ["DaemonProcess", "start_daemon"]
