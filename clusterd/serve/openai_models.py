"""The OpenAI request bodies clusterd accepts, as declared models: every
field OpenAI defines is known, so a parameter clusterd cannot honour is a
400 naming it rather than silently ignored, and an unknown one is a 400 as
OpenAI itself answers."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from clusterd.coordinator.generation import MAX_PENALTY, MAX_SEED, MAX_TEMPERATURE, Sampling
from clusterd.serve.errors import ApiError, unsupported

MAX_STOPS = 16
MAX_STOP_CHARS = 256


class Strict(BaseModel):
    # No coercion ("10" is not 10, true is not 1), no NaN or infinity, no
    # unknown fields.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def stop_list(value: Union[None, str, list]) -> tuple[str, ...]:
    """`stop` as OpenAI and Ollama give it: a string or a list of strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or a list of strings")
    if len(items) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences are accepted")
    if any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(items)


def check_unsupported(req: BaseModel, harmless: Mapping[str, Callable[[Any], bool]],
                      why: Mapping[str, str], prefix: str = "") -> None:
    """A 400 for the first field given with a value that would change the
    output in a way clusterd cannot honour."""
    for name, ok in harmless.items():
        value = getattr(req, name)
        if value is not None and not ok(value):
            raise unsupported(prefix + name, why.get(name, ""))


class StreamOptions(Strict):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None  # clusterd never pads chunks


class SamplingFields(Strict):
    """What the chat and the plain completions share."""

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Any = None  # a string or a list of strings
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: Optional[float] = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    # Extensions other servers accept (vLLM, llama.cpp), mapped to Sampling.
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, ge=0, le=10)
    n: Optional[int] = Field(None, ge=1)
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None  # changes nothing

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stop_list(v)
        return v

    def sampling(self) -> Sampling:
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty") if getattr(self, name) is not None}
        return Sampling(**given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def content_text(value: Any) -> Optional[str]:
    """A message's content: a string, or a list of text parts joined."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ValueError(f"part {i} must be an object with a 'type'")
        if part["type"] != "text":
            raise ValueError(f"part {i} has type {part['type']!r}: only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part {i} needs a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None  # a string or a list of text parts

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        content_text(v)
        return v
    name: Optional[str] = None  # R1's template has no place for it
    # An earlier answer's reasoning, sent back: dropped, as the template does.
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[Any] = None
    tool_call_id: Optional[Any] = None
    function_call: Optional[Any] = None
    audio: Optional[Any] = None

    def text(self, where: str) -> str:
        for name in ("tool_calls", "tool_call_id", "function_call", "audio"):
            if getattr(self, name) is not None:
                raise unsupported(f"{where}.{name}", "tools and audio are not supported")
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise ApiError(400, f"{where}.content is required", f"{where}.content",
                           "missing_required_parameter")
        return content_text(self.content)


class ResponseFormat(Strict):
    type: str
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


CHAT_HARMLESS: Mapping[str, Callable[[Any], bool]] = MappingProxyType({
    "n": lambda v: v == 1,
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"),
    "functions": lambda v: v == [],
    "function_call": lambda v: v in ("none", "auto"),
    "response_format": lambda v: v.type == "text",
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0,
    "logit_bias": lambda v: v == {},
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
    "reasoning_effort": lambda v: False,
    "verbosity": lambda v: False,
    "web_search_options": lambda v: False,
    "moderation": lambda v: False,
    "prompt_cache_options": lambda v: False,
})

WHY: Mapping[str, str] = MappingProxyType({
    "n": "one choice per request",
    "tools": "this server has no tool calling",
    "tool_choice": "this server has no tool calling",
    "functions": "this server has no tool calling",
    "function_call": "this server has no tool calling",
    "response_format": "only {\"type\": \"text\"}",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "logit_bias": "the last stage samples without a bias",
    "audio": "text only",
    "modalities": "text only",
    "reasoning_effort": "R1 decides how long it reasons; use max_tokens to bound it",
    "echo": "the prompt is not echoed",
    "best_of": "one completion per request",
    "suffix": "no fill-in-the-middle",
})


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None  # only means something with tools
    functions: Optional[list] = None
    function_call: Optional[Any] = None
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0)
    audio: Optional[Any] = None
    modalities: Optional[list[str]] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[Any] = None
    verbosity: Optional[Any] = None
    web_search_options: Optional[Any] = None
    moderation: Optional[Any] = None
    prompt_cache_options: Optional[Any] = None
    # Change nothing clusterd produces.
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None

    def check(self) -> None:
        check_unsupported(self, CHAT_HARMLESS, WHY)
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ: give one",
                           "max_completion_tokens", "invalid_value")

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text(f"messages[{i}]")}
                for i, m in enumerate(self.messages)]


COMPLETION_HARMLESS: Mapping[str, Callable[[Any], bool]] = MappingProxyType({
    "n": lambda v: v == 1,
    "best_of": lambda v: v == 1,
    "echo": lambda v: v is False,
    "logprobs": lambda v: v == 0,
    "suffix": lambda v: v == "",
    "logit_bias": lambda v: v == {},
})


class CompletionRequest(SamplingFields):
    prompt: Any  # a string, or a list of one string
    best_of: Optional[int] = Field(None, ge=1)
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0)
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        text = v if isinstance(v, str) else (
            v[0] if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) else None)
        if text is None:
            raise ValueError("must be a string (or a list of one string): one prompt per request")
        if not text:
            raise ValueError("is empty")
        return v

    def check(self) -> None:
        check_unsupported(self, COMPLETION_HARMLESS, WHY)

    @property
    def limit(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for completions

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
