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


def teacher_forced_misses(path: Path, prompt: Sequence[int], tokens: Sequence[int],
                          tolerance: float = 1e-4, model=None) -> list[tuple[int, int, int, float]]:
    """Check generated tokens against mlx-lm fed the same prefix: each must be
    mlx-lm's argmax there, or within `tolerance` of it in log-probability (a
    batched or multi-token pass may differ from a one-token pass in the last
    bits). Returns (index, token, argmax, logprob gap) for each that is not."""
    model = model if model is not None else load_model(Path(path))[0]
    if not tokens:
        return []
    seq = mx.array([*prompt, *tokens[:-1]])[None]
    logits = model(seq)[0, len(prompt) - 1:, :].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    best = mx.argmax(logprobs, axis=-1).tolist()
    misses = []
    for i, (t, b) in enumerate(zip(tokens, best)):
        if t != b:
            gap = (logprobs[i, b] - logprobs[i, t]).item()
            if gap > tolerance:
                misses.append((i, t, b, gap))
    return misses
