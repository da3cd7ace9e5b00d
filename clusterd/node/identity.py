"""A node's stable id, created on first run and kept in the clusterd folder.

The id names the node across restarts and address changes (DHCP, Wi-Fi vs
Ethernet). A copied home folder or a cloned VM carries the same id to a second
machine; discovery reports two live nodes with one id (see
clusterd.discovery), and `load_identity` warns when the folder was created on
another machine, so the pair is never silently merged into one node.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ID_FILE = "node_id.json"


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    created_on: str  # hostname when the id was made, for messages
    machine: str     # machine fingerprint when the id was made ("" if unknown)
    path: Path

    def moved_warning(self, current_machine: Optional[str] = None) -> Optional[str]:
        """A message when this id was created on another machine (copied
        folder, cloned VM), else None."""
        here = machine_fingerprint() if current_machine is None else current_machine
        if not self.machine or not here or here == self.machine:
            return None
        return (
            f"node id {self.node_id} in {self.path} was created on another machine "
            f"({self.created_on}); if that machine also runs clusterd, both would "
            f"claim the same id. Run `clusterd up --new-id` on one of them."
        )


def machine_fingerprint() -> str:
    """A value that differs between machines and stays put across reboots:
    IOPlatformUUID on macOS, /etc/machine-id on Linux. Hashed so the id file
    does not carry the raw hardware serial."""
    raw = ""
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"],
                capture_output=True, text=True, timeout=5,
            ).stdout
            for line in out.splitlines():
                if "IOPlatformUUID" in line:
                    raw = line.split("=", 1)[-1].strip().strip('"')
        except (OSError, subprocess.SubprocessError):
            raw = ""
    else:
        for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            try:
                raw = Path(p).read_text().strip()
                break
            except OSError:
                continue
    if not raw:
        return ""
    return uuid.uuid5(uuid.NAMESPACE_OID, "clusterd|" + raw).hex[:16]


def _read(path: Path) -> NodeIdentity:
    data = json.loads(path.read_text())
    node_id = str(data["node_id"])
    uuid.UUID(node_id)  # refuse a hand-edited, malformed id early
    return NodeIdentity(node_id, str(data.get("created_on", "")), str(data.get("machine", "")), path)


def load_identity(home: Path, *, new: bool = False) -> NodeIdentity:
    """The node's identity; created on first run, or replaced with `new`."""
    path = Path(home) / ID_FILE
    if not new:
        try:
            return _read(path)
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is corrupt ({e}); delete it to make a new node id") from None
    ident = {
        "node_id": str(uuid.uuid4()),
        "created_on": socket.gethostname(),
        "machine": machine_fingerprint(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ident, indent=2) + "\n")
    if new:
        os.replace(tmp, path)
    else:
        try:
            # link() fails if another process made the id first: keep theirs.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return _read(path)
