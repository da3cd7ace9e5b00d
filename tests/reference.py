"""The outside reference: single-process mlx-lm on the same model directory."""

from functools import lru_cache
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model


@lru_cache(maxsize=4)
def _model(path: str):
    return load_model(Path(path))[0]


def mlx_lm_greedy(path: Path, prompt: list[int], max_tokens: int, prefill_step_size: int,
                  stop_ids: tuple[int, ...] = ()) -> list[int]:
    """mlx-lm's own generate_step, greedy; stops before a stop token like
    clusterd (and mlx-lm's stream_generate) do."""
    out = []
    steps = generate_step(mx.array(prompt), _model(str(path)), max_tokens=max_tokens,
                          prefill_step_size=prefill_step_size)
    for token, _ in steps:
        if token in stop_ids:
            break
        out.append(token)
    return out
