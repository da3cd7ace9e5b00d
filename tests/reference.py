"""The outside reference for tests: mlx-lm's generate_step, model cached."""

from functools import lru_cache
from pathlib import Path

from mlx_lm.utils import load_model

from clusterd import reference


@lru_cache(maxsize=4)
def _model(path: str):
    return load_model(Path(path))[0]


def mlx_lm_greedy(path: Path, prompt: list[int], max_tokens: int, prefill_step_size: int,
                  stop_ids: tuple[int, ...] = ()) -> list[int]:
    return reference.mlx_lm_greedy(path, prompt, max_tokens, prefill_step_size, stop_ids,
                                   model=_model(str(path)))


def mlx_lm_text(tokenizer, tokens: list[int]) -> str:
    """mlx-lm's own detokenization of an answer, as mlx_lm.generate prints it."""
    detok = tokenizer.detokenizer
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    return detok.text


def teacher_forced_misses(path: Path, prompt, tokens, tolerance: float = 1e-4, model=None):
    """Tokens that are neither mlx-lm's argmax on their prefix nor within
    `tolerance` of it in log-probability (see clusterd.reference)."""
    return reference.teacher_forced_misses(path, list(prompt), list(tokens), tolerance,
                                           model=model or _model(str(path)))
