"""Which engine answers a request: by the `model` it names. Each served
model has one name; Ollama's `name:latest` means the same model."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from clusterd.serve.errors import ApiError


@dataclass(frozen=True)
class Served:
    name: str
    engine: object  # clusterd.coordinator.engine.Engine
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def quant(self) -> str:
        bits = (self.engine.ring.config.get("quantization") or {}).get("bits")
        return f"{bits}bit" if bits else ""

    @property
    def model_type(self) -> str:
        return str(self.engine.ring.config.get("model_type", ""))

    @property
    def weight_bytes(self) -> int:
        return sum(st.weight_bytes for st in self.engine.ring.stages)

    @property
    def digest(self) -> str:
        """Stable for one model folder and config (Ollama clients show it)."""
        config = json.dumps(self.engine.ring.config, sort_keys=True, default=str)
        return hashlib.sha256(f"{self.name}\n{config}".encode()).hexdigest()

    @property
    def parameter_count(self) -> Optional[int]:
        index = self.engine.ring.model_dir / "model.safetensors.index.json"
        try:
            meta = json.loads(index.read_text()).get("metadata", {})
        except (OSError, ValueError):
            return None
        n = meta.get("total_parameters")
        return n if isinstance(n, int) else None


class Router:
    def __init__(self, models: Sequence[Served]):
        if not models:
            raise ValueError("a router needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models are served under one name: {names}")
        self.models = tuple(models)

    def find(self, name: str) -> Optional[Served]:
        base = name[:-len(":latest")] if name.endswith(":latest") else name
        return next((m for m in self.models if m.name == base), None)

    def get(self, name: str, param: str = "model") -> Served:
        served = self.find(name)
        if served is None:
            listed = ", ".join(m.name for m in self.models)
            raise ApiError(404, f"the model {name!r} is not served here; served: {listed}",
                           param, "model_not_found")
        return served

    def close(self) -> None:
        for m in self.models:
            m.engine.close()
