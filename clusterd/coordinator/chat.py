"""Prompt text <-> token ids with the model's own tokenizer and chat
template (mlx-lm's tokenizer wrapper), and streaming detokenization."""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    # The template ends the prompt inside `<think>` (R1 and its distills do),
    # so the answer starts with reasoning.
    opens_reasoning: bool


def template_messages(messages: Iterable[dict]) -> list[dict]:
    """Chat messages as a reasoning model's template expects them: the
    `developer` role is the system prompt; several system messages become
    one (R1's template would keep only the last); an earlier answer is sent
    back without its reasoning, as R1's own template drops it."""
    system, rest = [], []
    for m in messages:
        role, content = m["role"], m["content"]
        if role in ("system", "developer"):
            system.append(content)
        elif role == "assistant":
            rest.append({"role": role, "content": content.split(THINK_CLOSE)[-1]})
        else:
            rest.append({"role": role, "content": content})
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + rest


class Chat:
    def __init__(self, model_dir: Path):
        self.tokenizer: TokenizerWrapper = load_tokenizer(Path(model_dir))

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.tokenizer.eos_token_ids)

    @property
    def template(self) -> Optional[str]:
        return self.tokenizer.chat_template

    def prompt(self, messages: list[dict]) -> Prompt:
        """Chat messages through the template (see template_messages)."""
        if self.template is None:
            text = "\n\n".join(m["content"] for m in template_messages(messages))
            return Prompt(tuple(self.tokenizer.encode(text)), False)
        text = self.tokenizer.apply_chat_template(template_messages(messages), tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return Prompt(tuple(ids), text.rstrip().endswith(THINK_OPEN))

    def encode(self, messages: list[dict], raw: bool = False) -> list[int]:
        """Chat messages through the template, or (raw) the last message's
        text tokenized as is."""
        if raw:
            return self.encode_text(messages[-1]["content"])
        return list(self.prompt(messages).ids)

    def encode_text(self, text: str) -> list[int]:
        """Plain text, no template (the tokenizer adds its BOS)."""
        return list(self.tokenizer.encode(text))

    def stream_pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """One text piece per token as it arrives ('' while a multi-byte
        character is incomplete), then one last piece when the tokens end."""
        detok = self.tokenizer.detokenizer  # a fresh copy per access
        for t in tokens:
            detok.add_token(t)
            yield detok.last_segment  # reading it consumes it
        detok.finalize()
        yield detok.last_segment

    def stream_text(self, tokens: Iterable[int]) -> Iterator[str]:
        """Text pieces as tokens arrive (never splits a multi-byte character)."""
        return (piece for piece in self.stream_pieces(tokens) if piece)

    def decode(self, tokens: list[int]) -> str:
        """The text streaming shows (mlx-lm's detokenizer: a leading space of
        the answer is dropped, as mlx_lm.generate does)."""
        return "".join(self.stream_text(tokens))
