"""One request model at the coordinator: what a generation asks for, what it
reports, and how it fails. Every face (the CLI's chat, the OpenAI and Ollama
APIs, bench) builds a GenerationRequest and reads a Generation; the engine
turns it into sessions on the stages."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Sequence

# Bounds every layer enforces (the HTTP faces, the engine, the node).
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence/frequency: OpenAI's range is [-2, 2]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.6  # DeepSeek's recommendation for R1
    top_p: float = 0.95
    seed: Optional[int] = None
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 0.0  # 0 (or 1): off; mlx-lm's multiplicative penalty
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def problem(self) -> str:
        """What is out of range, naming the field, or ''."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                return f"{name} must be a finite number"
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            return f"temperature must be in [0, {MAX_TEMPERATURE:g}]"
        if not 0 <= self.top_p <= 1:
            return "top_p must be in [0, 1]"
        if not 0 <= self.min_p <= 1:
            return "min_p must be in [0, 1]"
        if self.top_k < 0:
            return "top_k must be >= 0"
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            return f"seed must be an integer in [0, {MAX_SEED}]"
        if not 0 <= self.repetition_penalty <= 10:
            return "repetition_penalty must be in [0, 10]"
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                return f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"
        return ""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop_ids: tuple[int, ...] = ()  # token ids that end the answer (not part of it)
    draft: str = "auto"  # speculative drafts: "auto" | "mtp" | "ngram" | "none"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the stages' prompt cache
    tokens: list[int] = field(default_factory=list)
    queued_s: float = 0.0  # waiting for room in the ring
    ttft_s: float = 0.0  # from submit (queueing included) to the first token
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" | "length" | "cancelled"
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    trips: int = 0  # decode trips around the ring
    draft_trips: list[tuple[int, int]] = field(default_factory=list)  # (drafted, accepted)
    recoveries: int = 0  # times the ring healed under this generation
    first_token_at: float = 0.0  # monotonic clock of the first token (0: none yet)

    @property
    def decode_tok_s(self) -> float:
        n = len(self.tokens) - 1  # the first token's time is TTFT
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def tokens_per_trip(self) -> float:
        return len(self.tokens) / self.trips if self.trips else 0.0


class GenerationError(RuntimeError):
    """The generation stopped; the message names the node and the reason."""


class AdmissionError(GenerationError):
    """The request was not started; nothing ran on any stage."""


class ContextTooLong(AdmissionError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
        room = context - prompt_tokens
        if room < 1:
            text = (f"the prompt has {prompt_tokens} tokens; this ring was planned for a "
                    f"context of {context} tokens (prompt and answer together), so it does "
                    "not fit: shorten it, or plan the ring with a larger --context")
        else:
            text = (f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                    f"together more than the context of {context} tokens this ring was "
                    f"planned for; at most {room} new tokens fit after this prompt")
        super().__init__(text)


class QueueFull(AdmissionError):
    def __init__(self, queued: int, limit: int, running: int):
        self.queued, self.limit, self.running = queued, limit, running
        super().__init__(f"the ring is busy: {running} requests running and {queued} waiting "
                         f"(the queue holds {limit}); try again shortly")


class RingUnavailable(AdmissionError):
    def __init__(self, message: str, missing: Sequence[str] = ()):
        self.missing = tuple(missing)
        super().__init__(message)


class Unsupported(AdmissionError):
    """A parameter this ring cannot honour; the message names it."""


class Generation(Protocol):
    """A submitted request: iterate for token ids as the last stage accepts
    them (a GenerationError ends the iteration); `cancel` ends its session on
    every stage at once. `stats` fills in as it runs."""

    stats: GenerationStats

    def __iter__(self) -> Iterator[int]: ...

    def cancel(self) -> None: ...
