"""Prompt text <-> token ids with the model's own tokenizer and chat
template (mlx-lm's tokenizer wrapper), and streaming detokenization."""

from pathlib import Path
from typing import Iterable, Iterator

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer


class Chat:
    def __init__(self, model_dir: Path):
        self.tokenizer: TokenizerWrapper = load_tokenizer(Path(model_dir))

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.tokenizer.eos_token_ids)

    def encode(self, messages: list[dict], raw: bool = False) -> list[int]:
        """Chat messages through the template, or (raw) the last message's
        text tokenized as is."""
        if raw or self.tokenizer.chat_template is None:
            return list(self.tokenizer.encode(messages[-1]["content"]))
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def stream_text(self, tokens: Iterable[int]) -> Iterator[str]:
        """Text pieces as tokens arrive (never splits a multi-byte character)."""
        detok = self.tokenizer.detokenizer  # a fresh copy per access
        for t in tokens:
            detok.add_token(t)
            piece = detok.last_segment  # reading it consumes it
            if piece:
                yield piece
        detok.finalize()
        piece = detok.last_segment
        if piece:
            yield piece

    def decode(self, tokens: list[int]) -> str:
        """The text streaming shows (mlx-lm's detokenizer: a leading space of
        the answer is dropped, as mlx_lm.generate does)."""
        return "".join(self.stream_text(tokens))
