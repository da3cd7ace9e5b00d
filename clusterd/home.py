"""The user's clusterd folder: node identity, cluster secret, model store."""

import os
from pathlib import Path


def clusterd_home() -> Path:
    """`$CLUSTERD_HOME`, else `~/.clusterd`. Created on first use."""
    home = Path(os.environ.get("CLUSTERD_HOME") or Path.home() / ".clusterd")
    home.mkdir(parents=True, exist_ok=True)
    return home
