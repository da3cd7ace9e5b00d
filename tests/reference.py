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


def mlx_lm_sampled(path: Path, prompt, max_tokens: int, *, seed: int, temperature: float,
                   top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                   stop_ids: tuple[int, ...] = (), context: int = 4096, **penalties) -> list[int]:
    """mlx-lm's own sampled tokens with its sampler and logits processors, from
    `mx.random.seed(seed)`; penalties look at the whole session (context)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    procs = make_logits_processors(**{k: v for k, v in penalties.items()},
                                   **{f"{k.split('_')[0]}_context_size": context
                                      for k in penalties})
    mx.random.seed(seed)
    out = []
    for token, _ in generate_step(mx.array(list(prompt)), _model(str(path)),
                                  max_tokens=max_tokens, logits_processors=procs,
                                  sampler=make_sampler(temperature, top_p=top_p, min_p=min_p,
                                                       top_k=top_k)):
        if token in stop_ids:
            break
        out.append(token)
    return out
