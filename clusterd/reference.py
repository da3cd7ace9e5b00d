"""The outside reference: single-process mlx-lm on the same model directory,
on the same schedule clusterd uses (mlx-lm's generate_step)."""

from pathlib import Path
from typing import Sequence

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model


def mlx_lm_greedy(path: Path, prompt: Sequence[int], max_tokens: int, prefill_step_size: int = 2048,
                  stop_ids: Sequence[int] = (), model=None) -> list[int]:
    """Greedy tokens from mlx-lm alone, stopping before a stop token as
    clusterd (and mlx-lm's stream_generate) do."""
    model = model if model is not None else load_model(Path(path))[0]
    out = []
    for token, _ in generate_step(mx.array(list(prompt)), model, max_tokens=max_tokens,
                                  prefill_step_size=prefill_step_size):
        if token in stop_ids:
            break
        out.append(token)
    return out
