"""What one generation measured, and the interface every benchmarked system
(a clusterd layout, single-process mlx-lm, mlx-lm's ring pipeline) offers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass
class RunResult:
    prompt_tokens: int
    tokens: list[int]
    # Seconds from the start of the request to the arrival of each token, as
    # seen by whoever asked (the coordinator, or mlx-lm's own loop).
    token_times: list[float]

    @property
    def ttft_s(self) -> float:
        return self.token_times[0]

    @property
    def prefill_tok_s(self) -> float:
        # As mlx-lm's benchmark counts it: prompt tokens over the time to the first token.
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_times) - 1  # the first token's time is TTFT
        span = self.token_times[-1] - self.token_times[0] if n > 0 else 0.0
        return n / span if span > 0 else 0.0

    @property
    def intervals(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class ProcessMemory:
    name: str
    rss_bytes: int
    held_bytes: int = 0  # weights + KV caches the node reports; 0 when unknown
    layers: tuple[int, int] = (0, 0)


@dataclass
class SubjectInfo:
    name: str  # "clusterd 3 nodes [6,5,5]"
    kind: str  # "clusterd" | "mlx-lm" | "mlx-lm-ring"
    stages: int
    split: list[int] = field(default_factory=list)
    note: str = ""


class Subject(Protocol):
    info: SubjectInfo

    def generate(self, prompt: Sequence[int], max_tokens: int,
                 prefill_step_size: int) -> RunResult: ...

    def memory(self) -> list[ProcessMemory]: ...

    def close(self) -> None: ...
