"""The Ollama request bodies, as declared models. Options that map to
sampling are honoured; load-time options (they choose how Ollama loads a
model, not what it answers) are accepted and have no effect; options that
would change the answer in a way clusterd cannot honour are a 400 naming
them, and so are options Ollama does not define."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal, Mapping, Optional

from pydantic import Field, field_validator

from clusterd.coordinator.generation import MAX_PENALTY, MAX_SEED, MAX_TEMPERATURE, Sampling
from clusterd.serve.errors import unsupported
from clusterd.serve.openai_models import Strict, check_unsupported, stop_list

# num_predict: -1 is "no limit", -2 "fill the context"; both mean the room left.
NO_LIMIT = (-1, -2)


class Options(Strict):
    temperature: Optional[float] = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, ge=-1, le=MAX_SEED)  # -1: no seed, as in Ollama
    num_predict: Optional[int] = Field(None, ge=-2)
    stop: Any = None
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repeat_penalty: Optional[float] = Field(None, ge=0, le=10)
    presence_penalty: Optional[float] = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: Optional[float] = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    # Would change the answer; only their neutral values are accepted.
    tfs_z: Optional[float] = None
    typical_p: Optional[float] = None
    repeat_last_n: Optional[int] = None
    mirostat: Optional[int] = None
    mirostat_tau: Optional[float] = None  # used by mirostat only
    mirostat_eta: Optional[float] = None
    penalize_newline: Optional[bool] = None
    # How Ollama loads a model: no effect on a ring (its context is --context).
    num_ctx: Optional[int] = None
    num_keep: Optional[int] = None
    num_batch: Optional[int] = None
    num_gpu: Optional[int] = None
    main_gpu: Optional[int] = None
    num_thread: Optional[int] = None
    numa: Optional[bool] = None
    low_vram: Optional[bool] = None
    f16_kv: Optional[bool] = None
    logits_all: Optional[bool] = None
    vocab_only: Optional[bool] = None
    use_mmap: Optional[bool] = None
    use_mlock: Optional[bool] = None
    embedding_only: Optional[bool] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stop_list(v)
        return v

    def check(self) -> None:
        check_unsupported(self, {
            "tfs_z": lambda v: v == 1, "typical_p": lambda v: v == 1,
            "mirostat": lambda v: v == 0, "repeat_last_n": lambda v: False,
            "penalize_newline": lambda v: False,
        }, {"repeat_last_n": "the repetition window is not configurable",
            "penalize_newline": "the repetition penalty treats newlines like any token"},
            prefix="options.")
        if self.num_predict == 0:
            raise unsupported("options.num_predict", "it must be at least 1 (or -1 for no limit)")

    def sampling(self) -> Sampling:
        given = {
            "temperature": self.temperature, "top_p": self.top_p,
            "seed": None if self.seed == -1 else self.seed, "top_k": self.top_k,
            "min_p": self.min_p, "repetition_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return Sampling(**{k: v for k, v in given.items() if v is not None})

    @property
    def limit(self) -> Optional[int]:
        return None if self.num_predict in NO_LIMIT else self.num_predict


def _no_format(v) -> bool:
    return v == ""


class Generic(Strict):
    """What /api/chat and /api/generate share."""

    model: str = Field(min_length=1)
    stream: Optional[bool] = None  # Ollama streams unless told not to
    options: Optional[Options] = None
    format: Any = None
    keep_alive: Any = None  # the ring stays loaded; nothing to keep alive
    think: Any = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None

    @field_validator("think")
    @classmethod
    def _think(cls, v):
        if v is not None and not isinstance(v, bool):
            raise ValueError("must be true or false (levels are for other models)")
        return v

    HARMLESS: ClassVar[Mapping[str, Callable[[Any], bool]]] = {
        "format": _no_format, "logprobs": lambda v: v is False,
        "top_logprobs": lambda v: v == 0,
    }

    def check(self, more: Optional[Mapping[str, Callable[[Any], bool]]] = None) -> None:
        check_unsupported(self, {**self.HARMLESS, **(more or {})}, {
            "format": "structured output is not supported",
            "logprobs": "log probabilities are not returned",
            "top_logprobs": "log probabilities are not returned"})
        self.opts.check()

    @property
    def opts(self) -> Options:
        return self.options or Options()

    @property
    def streamed(self) -> bool:
        return self.stream is not False

    @property
    def show_thinking(self) -> bool:
        """think: false leaves the reasoning out of the reply (R1 still
        reasons: its template opens the reasoning itself)."""
        return self.think is not False


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    thinking: Optional[str] = None  # an earlier answer's reasoning: dropped
    images: Optional[list] = None
    tool_calls: Optional[list] = None
    tool_name: Optional[str] = None

    def text(self, where: str) -> str:
        if self.images:
            raise unsupported(f"{where}.images", "text only")
        if self.tool_calls:
            raise unsupported(f"{where}.tool_calls", "this server has no tool calling")
        return self.content


class ChatRequest(Generic):
    messages: list[Message] = []
    tools: Optional[list] = None

    def check(self) -> None:
        super().check({"tools": lambda v: v == []})

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text(f"messages[{i}]")}
                for i, m in enumerate(self.messages)]


class GenerateRequest(Generic):
    prompt: Optional[str] = None
    system: Optional[str] = None
    raw: Optional[bool] = None
    suffix: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list] = None
    images: Optional[list] = None
    width: Optional[int] = None
    height: Optional[int] = None
    steps: Optional[int] = None

    def check(self) -> None:
        super().check({
            "suffix": lambda v: v == "", "template": lambda v: v == "",
            "context": lambda v: v == [], "images": lambda v: v == [],
            "width": lambda v: False, "height": lambda v: False, "steps": lambda v: False})

    def chat(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt or ""}]


class ShowRequest(Strict):
    model: Optional[str] = None
    name: Optional[str] = None  # older clients
    verbose: Optional[bool] = None
