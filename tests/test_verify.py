"""Verification of drafts: greedy acceptance against the true greedy continuation of a
real (synthetic) model, and the sampling path's exact reduction to mlx-lm's seeded
sampler when there is nothing to verify."""

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from clusterd.speculative.sampling import SamplingError, SamplingParams
from clusterd.speculative.verify import VerifyError, verify, verify_batch
from reference import mlx_lm_greedy

PROMPT = [0, 17, 230, 5, 981, 17, 230, 5, 44, 1203, 7]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def model_path(synthetic):
    return synthetic("deepseek_v3", "tiny")


@pytest.fixture(scope="module")
def tiny(model_path):
    model, _ = load(str(model_path))
    return model


def _trip_logprobs(model, tokens, chunk):
    """The last stage's log-probs at every position of one trip: the prompt, then the
    trip's tokens as one chunk."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([tokens]), cache=cache))
    logits = model(mx.array([chunk]), cache=cache)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_greedy_true_continuation_is_accepted_and_the_next_token_is_the_argmax(tiny, model_path):
    truth = mlx_lm_greedy(model_path, PROMPT, 6, 2048)  # t1 .. t6 from single-process mlx-lm
    first, drafts = truth[0], truth[1:5]
    rows = _trip_logprobs(tiny, PROMPT, [first, *drafts])
    v = verify(rows, drafts, GREEDY)
    assert v.accepted == 4 and v.token == truth[5]
    assert v.emitted(drafts) == truth[1:6]


def test_greedy_wrong_and_mixed_drafts_accept_exactly_the_right_prefix(tiny, model_path):
    truth = mlx_lm_greedy(model_path, PROMPT, 5, 2048)
    first, right = truth[0], truth[1:5]
    for bad_at in range(4):
        drafts = list(right)
        drafts[bad_at] = (drafts[bad_at] + 1) % 2048
        rows = _trip_logprobs(tiny, PROMPT, [first, *drafts])
        v = verify(rows, drafts, GREEDY)
        assert v.accepted == bad_at, drafts
        # The target's own token at the first wrong draft: the true continuation.
        assert v.token == right[bad_at]
        assert v.token == int(mx.argmax(rows[bad_at]).item())


def test_greedy_verdicts_on_arbitrary_rows():
    rows = mx.random.normal((5, 50), key=mx.random.key(3))
    best = mx.argmax(rows, axis=-1).tolist()
    assert verify(rows, best[:4], GREEDY).accepted == 4
    assert verify(rows, best[:4], GREEDY).token == best[4]
    wrong = [(b + 1) % 50 for b in best[:4]]
    assert (verify(rows, wrong, GREEDY).accepted, verify(rows, wrong, GREEDY).token) == (0, best[0])
    assert verify(rows[:1], [], GREEDY).token == best[0]


SAMPLERS = [
    SamplingParams(0.6, top_p=0.95),  # R1's recommended settings
    SamplingParams(1.0, min_p=0.05, min_tokens_to_keep=3),
    SamplingParams(0.7, top_p=0.9, top_k=20),
    SamplingParams(0.8),
]


@pytest.mark.parametrize("params", SAMPLERS, ids=lambda p: f"t{p.temperature}-p{p.top_p}-"
                         f"m{p.min_p}-k{p.top_k}")
def test_zero_drafts_draw_exactly_what_mlx_lm_draws_with_the_same_seed(params):
    steps = []
    for i in range(8):  # peaky and flat rows, like a model's
        logits = mx.random.normal((1, 300), key=mx.random.key(100 + i)) * (1 + i)
        steps.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    sampler = make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p,
                           min_tokens_to_keep=params.min_tokens_to_keep, top_k=params.top_k)
    for seed in range(12):
        mx.random.seed(seed)
        theirs = [sampler(lp).item() for lp in steps]
        key, ours = mx.random.key(seed), []
        for lp in steps:
            v = verify(lp, [], params, key)
            key = v.key
            ours.append(v.token)
        assert ours == theirs, f"seed {seed}"


def test_batch_rows_equal_single_verdicts():
    params = SamplingParams(0.6, top_p=0.95)
    rows = mx.random.normal((3, 4, 64), key=mx.random.key(1)) * 3
    rows = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    drafts = [[3, 9, 1], [5], []]
    q = mx.random.normal((3, 64), key=mx.random.key(2))
    q = q - mx.logsumexp(q, axis=-1, keepdims=True)
    proposals = [q, None, None]
    for seed in range(20):
        keys = [mx.random.key(seed * 3 + b) for b in range(3)]
        batch = verify_batch(rows, drafts, params, keys, proposals)
        for b in range(3):
            k = len(drafts[b])
            one = verify(rows[b, :k + 1], drafts[b], params, keys[b], proposals[b])
            assert (one.accepted, one.token) == (batch[b].accepted, batch[b].token)
            assert mx.array_equal(one.key, batch[b].key)


def test_bad_inputs_are_named():
    rows = mx.zeros((3, 10))
    with pytest.raises(VerifyError, match="3 drafts need 4 target positions"):
        verify(rows, [1, 2, 3], GREEDY)
    with pytest.raises(VerifyError, match="outside the vocabulary"):
        verify(rows, [1, 12], GREEDY)
    with pytest.raises(VerifyError, match="needs the session's random key"):
        verify(rows, [1], SamplingParams(0.6))
    with pytest.raises(VerifyError, match=r"proposal log-probs must be \[2, 10\]"):
        verify(rows, [1, 2], SamplingParams(0.6), mx.random.key(0), mx.zeros((1, 10)))
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(0.6, top_p=1.5)
