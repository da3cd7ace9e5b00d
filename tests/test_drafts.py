"""Speculative trips through real daemons: the last stage proposes drafts
(prompt lookup), every stage runs the token and its drafts as one chunk, the
last stage accepts a prefix plus a token of its own and every stage drops
the rest. Output is checked against single-process mlx-lm fed the same
prefix (teacher forcing: a multi-token pass may differ in the last bits)."""

import threading

import pytest

from clusterd.coordinator.engine import Engine
from clusterd.coordinator.generation import GenerationRequest, Sampling
from clusterd.coordinator.ring import RingOptions, model_source, open_ring
from clusterd.local_cluster import LocalCluster
from reference import mlx_lm_greedy, teacher_forced_misses

SPLITS = {1: None, 3: "2,1,1"}


@pytest.fixture(scope="module", params=[1, 3], ids=["1-node", "3-nodes"])
def rings(request, tmp_path_factory, synthetic):
    """Engines on a DeepSeek-V3 and a Qwen2 model on the same daemons."""
    n = request.param
    with LocalCluster(n, workdir=tmp_path_factory.mktemp("drafts")) as cluster:
        engines = {}
        for arch, split in (("deepseek_v3", {1: None, 3: "2,2,2"}[n]),
                            ("qwen2", SPLITS[n])):
            model = synthetic(arch, "tiny")
            ring = open_ring(model_source(str(model), None, lambda t: None), cluster.addresses,
                             RingOptions(context=512, sessions=4, split=split, show=False),
                             lambda t: None)
            engines[arch] = (model, Engine(ring, name=arch, context=512, max_sessions=4,
                                           draft="ngram"))
        yield engines
        for _, eng in engines.values():
            eng.close()


def greedy(prompt, n, draft="ngram"):
    return GenerationRequest(tuple(prompt), n, Sampling(temperature=0.0), (), draft)


def test_a_loop_the_drafts_predict_is_accepted_whole(rings):
    """Qwen2's greedy answer to a run of one token loops; prompt lookup then
    proposes the loop and whole trips are accepted: fewer trips than tokens."""
    model, engine = rings["qwen2"]
    prompt = [100] * 10
    gen = engine.submit(greedy(prompt, 96))
    tokens = list(gen)
    assert len(tokens) == 96
    assert teacher_forced_misses(model, prompt, tokens) == []
    s = gen.stats
    assert any(d == a and d > 1 for d, a in s.draft_trips), s.draft_trips  # all accepted
    assert s.accepted > s.drafted / 2 and s.trips < 0.6 * len(tokens), (s.trips, s.accepted)


def test_drafts_the_model_does_not_follow_are_rejected(rings):
    """A prompt of a repeated pattern the model does not continue: drafts are
    proposed and rejected, and the answer is what the model says."""
    model, engine = rings["deepseek_v3"]
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [5, 6]
    gen = engine.submit(greedy(prompt, 64))
    tokens = list(gen)
    assert len(tokens) == 64
    assert teacher_forced_misses(model, prompt, tokens) == []
    assert any(a == 0 for _, a in gen.stats.draft_trips), gen.stats.draft_trips


def test_without_drafts_a_session_alone_equals_mlx_lm_exactly(rings):
    model, engine = rings["deepseek_v3"]
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [5, 6]
    gen = engine.submit(greedy(prompt, 64, draft="none"))
    assert list(gen) == mlx_lm_greedy(model, prompt, 64, 2048)
    assert gen.stats.drafted == 0 and gen.stats.trips == 64


def test_sessions_with_and_without_drafts_share_trips(rings):
    """Four at once in one ring: drafting rows, a row with a penalty (which
    drafts nothing) and rows of different prompts, batched together."""
    model, engine = rings["qwen2"]
    asks = [([100] * 10, greedy([100] * 10, 48)),
            ([7, 8, 9] * 4, greedy([7, 8, 9] * 4, 48)),
            (list(range(30, 45)), greedy(list(range(30, 45)), 40, draft="none")),
            ([100] * 10, GenerationRequest((100,) * 10, 32,
                                           Sampling(temperature=0.0, repetition_penalty=1.3),
                                           ()))]
    out: dict[int, list[int]] = {}
    gens = [engine.submit(r) for _, r in asks]

    def run(i):
        out[i] = list(gens[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(3):
        prompt, req = asks[i]
        assert len(out[i]) == req.max_tokens
        assert teacher_forced_misses(model, prompt, out[i]) == [], i
    assert gens[3].stats.drafted == 0 and len(out[3]) == 32
    assert gens[0].stats.accepted > 0


@pytest.mark.parametrize("nodes", [1, 3])
def test_drafts_from_the_models_own_mtp_layer(tmp_path, synthetic, nodes):
    """The last stage converts the original checkpoint's MTP layer (FP8
    blocks) once, loads it beside its layers, and drafts with it every trip;
    the answer is still the model's."""
    from clusterd.models.synthetic_mtp import build_synthetic_original

    model = synthetic("deepseek_v3", "tiny")
    original = build_synthetic_original("tiny")
    notes: list[str] = []
    with LocalCluster(nodes, workdir=tmp_path) as cluster:
        ring = open_ring(model_source(str(model), None, notes.append), cluster.addresses,
                         RingOptions(context=512, sessions=2, split={1: None, 3: "2,2,2"}[nodes],
                                     draft="mtp", mtp_from=str(original), show=False),
                         notes.append)
        assert ring.stages[-1].drafts == "mtp", (ring.stages[-1].drafts_note, notes)
        engine = Engine(ring, name="m", context=512, max_sessions=2, draft="mtp")
        prompt = list(range(30, 52))
        gen = engine.submit(greedy(prompt, 64, draft="mtp"))
        tokens = list(gen)
        engine.close()
    assert len(tokens) == 64
    assert teacher_forced_misses(model, prompt, tokens) == []
    s = gen.stats
    # A draft rode on every trip but the first (the prompt) and the last (no room left).
    assert s.drafted >= s.trips - 2 > 0
    assert all(d == 1 for d, _ in s.draft_trips)


def test_an_mtp_layer_that_cannot_be_had_falls_back_to_lookup(tmp_path, synthetic):
    model = synthetic("qwen2", "tiny")  # no MTP layer, and the folder given is not a checkpoint
    notes: list[str] = []
    with LocalCluster(1, workdir=tmp_path) as cluster:
        ring = open_ring(model_source(str(model), None, notes.append), cluster.addresses,
                         RingOptions(context=512, draft="mtp", mtp_from=str(tmp_path), show=False),
                         notes.append)
        assert ring.stages[-1].drafts == "ngram"
        assert any("drafting by prompt lookup" in n for n in notes), notes
        engine = Engine(ring, name="m", context=512, draft="mtp")
        prompt = [100] * 10
        tokens = list(engine.submit(greedy(prompt, 32, draft="mtp")))
        engine.close()
    assert teacher_forced_misses(model, prompt, tokens) == []


def test_a_seeded_session_with_drafts_is_reproducible_whatever_else_runs(rings):
    """Sampling at 0.6 / 0.95 with prompt lookup: the session's own key makes
    its answer the same on every run, alone or beside another session."""
    model, engine = rings["qwen2"]
    ask = GenerationRequest((100,) * 10, 48, Sampling(temperature=0.6, top_p=0.95, seed=7), (),
                            "ngram")
    alone = list(engine.submit(ask))
    other = engine.submit(GenerationRequest((7, 8, 9) * 4, 64,
                                            Sampling(temperature=0.9, seed=1), (), "ngram"))
    side = threading.Thread(target=lambda: list(other))
    side.start()
    beside = list(engine.submit(ask))
    side.join(60)
    assert alone == beside and len(alone) == 48
