"""Speculative sampling is distribution-exact: on a real (synthetic, tiny) DeepSeek model
loaded with mlx-lm, the joint distribution of the first three sampled tokens over many
seeds, with deliberately imperfect drafts verified by verify(), is the distribution
mlx-lm's sampler draws from without speculation.

Each arm is a chi-square goodness-of-fit test of N_SEEDS draws of (t1, t2, t3) against
the exact joint distribution (computed from the model's log-probabilities with the
sampler's filters), at a false-alarm rate of ALPHA per arm. The plain mlx-lm sampler is
an arm too: it checks the exact distribution itself. Power: with N_SEEDS = 2000 and the
~104 pooled cells (125 triples) this model gives, a deviation of chi-square distance
sum((p' - p)^2 / p) >= 0.05 from the exact distribution (noncentrality N x 0.05 = 100) is
detected with probability 0.98, >= 0.06 with probability 0.998 (noncentral chi-square,
simulated, at ALPHA = 1e-3). A real error shows as far more: the last arm passes drafts
with a proposal q they were not drawn from, and the test must reject it with 500 seeds.

Drafts come from perturbed copies of the target's distribution (as a cheap drafter
would be), both deterministic (q one-hot) and sampled from a proper q. The model's
log-probabilities are computed once for every token sequence a run can reach (Target).
"""

import zlib
from collections import Counter

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from chisquare import chi2_sf, goodness_of_fit
from clusterd.speculative.sampling import SamplingParams, next_key, probabilities
from clusterd.speculative.verify import verify

# R1's temperature and top-p; top-k 5 keeps the support of a random tiny model small
# enough for a chi-square test on the joint of three tokens.
PARAMS = SamplingParams(0.6, top_p=0.95, top_k=5)
N_SEEDS = 2000
N_WRONG = 500
ALPHA = 1e-3
TOKENS = 3
K = 2  # drafts per trip
DRAFT_SUPPORT = 6  # the drafter proposes among the target's 6 likeliest tokens
PROMPT = [0, 17, 230, 5, 981, 17, 230, 5, 44, 1203, 7]


class Target:
    """The last stage's log-probabilities after every token sequence a run can reach: the
    sampler's support is the top 5 and the drafter's the top 6, so the sequences of up to
    TOKENS tokens whose every token is among the top 6 after its prefix. Computed level by
    level, each level one batched forward through mlx-lm's model with the prompt's KV
    cache; a trip's [k+1, V] rows are the rows after its prefixes."""

    def __init__(self, model):
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([PROMPT[:-1]]), cache=cache))
        self.table = {(): self._forward(model, cache, [()])[0]}
        level = [()]
        for _ in range(TOKENS):
            level = [seq + (t,) for seq in level for t in _top(self.table[seq], DRAFT_SUPPORT)]
            self.table.update(zip(level, self._forward(model, cache, level)))

    @staticmethod
    def _forward(model, cache, seqs):
        tiled = []
        for c in cache:  # the prompt's cache, once per sequence of the batch
            t = KVCache()
            t.keys, t.values = (mx.repeat(a[:, :, :c.offset], len(seqs), axis=0)
                                for a in (c.keys, c.values))
            t.offset = c.offset
            tiled.append(t)
        logits = model(mx.array([[PROMPT[-1], *seq] for seq in seqs]), cache=tiled)
        lp = logits[:, -1].astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        mx.eval(lp)
        return list(lp)

    def rows(self, emitted: tuple, drafts: tuple = ()) -> mx.array:
        return mx.stack([self.table[emitted + tuple(drafts[:i])] for i in range(len(drafts) + 1)])


def _top(lp: mx.array, k: int) -> list[int]:
    return mx.argpartition(-lp, kth=k - 1)[:k].tolist()


@pytest.fixture(scope="module")
def target(synthetic):
    model, _ = load(str(synthetic("deepseek_v3", "tiny")))
    return Target(model)


class Drafter:
    """Knows the target's likeliest tokens and perturbs their log-probs: roughly right
    about what comes next, and often wrong. A fixed function of the history (memoized);
    only its sampled drafts use the session's key."""

    def __init__(self, target: Target):
        self.target = target
        self._q, self._best = {}, {}

    def q(self, prefix: tuple) -> mx.array:
        """[V] log-probs of the drafter's own distribution after prefix."""
        if prefix not in self._q:
            lp = self.target.rows(prefix)[-1]
            noise = mx.random.normal(lp.shape, key=mx.random.key(zlib.crc32(repr(prefix).encode())))
            top = probabilities(lp[None], SamplingParams(1.0, top_k=DRAFT_SUPPORT))[0]
            q = mx.log(probabilities((mx.log(top) + 0.7 * noise)[None], SamplingParams(0.9)))[0]
            mx.eval(q)
            self._q[prefix] = q
        return self._q[prefix]

    def best(self, prefix: tuple) -> int:
        if prefix not in self._best:
            self._best[prefix] = int(mx.argmax(self.q(prefix)).item())
        return self._best[prefix]


def deterministic_drafter(drafter, out, key, k):
    drafts = []
    for _ in range(k):
        drafts.append(drafter.best(out + tuple(drafts)))
    return drafts, None, key


def sampling_drafter(drafter, out, key, k):
    drafts, qs = [], []
    for _ in range(k):
        q = drafter.q(out + tuple(drafts))
        key, sub = next_key(key)
        drafts.append(int(mx.random.categorical(q, key=sub).item()))
        qs.append(q)
    return drafts, mx.stack(qs), key


def wrong_q_drafter(drafter, out, key, k):
    """Deterministic drafts, verified as if drawn from the drafter's q: a real bug."""
    drafts, _, key = deterministic_drafter(drafter, out, key, k)
    return drafts, mx.stack([drafter.q(out + tuple(drafts[:i])) for i in range(k)]), key


def speculative_run(target, drafter, propose, seed, stats):
    v = verify(target.rows(()), [], PARAMS, mx.random.key(seed))
    out, key = (v.token,), v.key
    while len(out) < TOKENS:
        # No more drafts than tokens still wanted: runs stay within the table.
        drafts, q, key = propose(drafter, out, key, min(K, TOKENS - len(out)))
        v = verify(target.rows(out, tuple(drafts)), drafts, PARAMS, key, q)
        stats["accepted"] += v.accepted
        stats["rejected"] += v.accepted < len(drafts)
        out, key = out + tuple(v.emitted(drafts)), v.key
    return out[:TOKENS]


def mlx_lm_run(target, seed):
    sampler = make_sampler(temp=PARAMS.temperature, top_p=PARAMS.top_p, top_k=PARAMS.top_k)
    mx.random.seed(seed)
    out = ()
    for _ in range(TOKENS):
        out += (sampler(target.rows(out)).item(),)
    return out


def exact(target) -> dict:
    dist = {(): 1.0}
    for _ in range(TOKENS):
        nxt = {}
        for prefix, p in dist.items():
            probs = probabilities(target.rows(prefix), PARAMS)[-1].tolist()
            nxt.update({prefix + (t,): p * pt for t, pt in enumerate(probs) if pt > 0})
        dist = nxt
    return dist


def test_chi2_helper_matches_tabulated_quantiles():
    # chi-square critical values from standard tables.
    for x, df, tail in [(10.828, 1, 1e-3), (29.588, 10, 1e-3), (124.342, 100, 0.05)]:
        assert abs(chi2_sf(x, df) - tail) < tail * 1e-3


@pytest.fixture(scope="module")
def truth(target):
    return exact(target)


@pytest.fixture(scope="module")
def drafter(target):
    return Drafter(target)


def test_mlx_lm_sampler_draws_the_exact_distribution(target, truth):
    draws = Counter(mlx_lm_run(target, s) for s in range(N_SEEDS))
    stat, df, p = goodness_of_fit(draws, truth)
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df"


@pytest.mark.parametrize("propose", [deterministic_drafter, sampling_drafter],
                         ids=["one-hot-q", "proper-q"])
def test_speculative_sampling_draws_the_same_distribution(target, truth, drafter, propose):
    stats = Counter()
    draws = Counter(speculative_run(target, drafter, propose, s, stats) for s in range(N_SEEDS))
    # Both paths ran many times: accepted drafts and rejections with residual draws.
    assert stats["accepted"] > N_SEEDS // 5 and stats["rejected"] > N_SEEDS // 5, stats
    stat, df, p = goodness_of_fit(draws, truth)
    assert p > ALPHA, f"chi2 {stat:.1f} on {df} df"


def test_the_test_rejects_drafts_verified_with_the_wrong_proposal(target, truth, drafter):
    stats = Counter()
    draws = Counter(speculative_run(target, drafter, wrong_q_drafter, s, stats)
                    for s in range(N_WRONG))
    stat, df, p = goodness_of_fit(draws, truth)
    assert p < ALPHA, f"chi2 {stat:.1f} on {df} df did not detect the wrong proposal"
