"""A node that dies mid-generation: the engine re-plans on the nodes left,
replays every running session and goes on; when the model no longer fits,
requests are refused naming the node until it is back, and then the ring
re-forms by itself. Real daemons, killed with SIGKILL."""

import threading

import pytest

from clusterd.coordinator.generation import (GenerationError, GenerationRequest,
                                             RingUnavailable, Sampling)
from clusterd.coordinator.ring import RingOptions, model_source, open_engine, open_ring
from clusterd.local_cluster import LocalCluster
from mlx_lm.utils import load_model
from reference import mlx_lm_greedy, teacher_forced_misses

PROMPT = (17, 300, 42, 9, 1000)
CONTEXT = 512
CHUNK = 128


def healing_engine(model, cluster, notes, sessions=1):
    opts = RingOptions(context=CONTEXT, sessions=sessions, prefill_step_size=CHUNK, show=False)
    ring = open_ring(model_source(str(model), None, notes.append), cluster.addresses, opts,
                     notes.append)
    assert len(ring.stages) == 3
    return open_engine(ring, "m", on_note=notes.append)


def greedy(prompt, n, stop_ids=(1,)):
    return GenerationRequest(tuple(prompt), n, Sampling(temperature=0.0), stop_ids)


def test_generation_goes_on_after_a_node_is_killed(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    notes: list[str] = []
    with LocalCluster(3, workdir=tmp_path) as cluster:
        engine = healing_engine(model, cluster, notes)
        gen = engine.submit(greedy(PROMPT, 160))
        tokens = []
        for t in gen:
            tokens.append(t)
            if len(tokens) == 20:
                cluster.nodes[1].proc.kill()  # the middle stage, mid-decode
        assert gen.stats.recoveries == 1
        assert {s.peer.address for s in engine.stages} == {cluster.addresses[0],
                                                            cluster.addresses[2]}
        engine.close()
    assert any("local1" in n and "dropped out" in n for n in notes)
    expected = mlx_lm_greedy(model, PROMPT, 160, CHUNK, stop_ids=(1,))
    assert len(tokens) == len(expected) == 160
    # Before the failure: identical. After it the replayed tokens were
    # prefilled as one chunk, so each must be mlx-lm's choice on its prefix.
    assert tokens[:20] == expected[:20]
    assert teacher_forced_misses(model, PROMPT, tokens) == []
    assert gen.stats.tokens == tokens and gen.stats.finish_reason == "length"


def test_every_running_session_resumes(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    ref = load_model(model)[0]
    prompts = [tuple(range(5 + i, 12 + 3 * i)) for i in range(4)]
    with LocalCluster(3, workdir=tmp_path) as cluster:
        engine = healing_engine(model, cluster, [], sessions=4)
        gens = [engine.submit(greedy(p, 60, stop_ids=())) for p in prompts]
        out: dict[int, list[int]] = {}
        started = threading.Barrier(5)

        def run(i: int) -> None:
            toks = []
            for t in gens[i]:
                toks.append(t)
                if len(toks) == 10:
                    started.wait(60)
            out[i] = toks

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(60)  # all four are decoding
        cluster.nodes[2].proc.kill()  # the last stage
        for t in threads:
            t.join(120)
        engine.close()
    for i, p in enumerate(prompts):
        assert len(out[i]) == 60, i
        assert gens[i].stats.recoveries == 1
        assert teacher_forced_misses(model, p, out[i], model=ref) == []


def test_refused_naming_the_node_then_the_ring_reforms(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "small")  # 57 MB: three 38 MB nodes hold it, two do not
    notes: list[str] = []
    with LocalCluster(3, workdir=tmp_path, extra=["--memory-limit", "38M"]) as cluster:
        engine = healing_engine(model, cluster, notes)
        with pytest.raises(RingUnavailable) as e:
            for i, _ in enumerate(engine.submit(greedy(PROMPT, 400))):
                if i == 5:
                    cluster.nodes[2].proc.kill()
        assert "local2" in str(e.value) and "cannot be placed without it" in str(e.value)
        assert e.value.missing == ("local2",)
        with pytest.raises(RingUnavailable) as again:  # refused at once while it is gone
            engine.submit(greedy(PROMPT, 8))
        assert "local2" in str(again.value)
        cluster.restart(2)
        for _ in range(200):  # the engine finds it again by itself
            try:
                gen = engine.submit(greedy(PROMPT, 16))
                break
            except RingUnavailable:
                threading.Event().wait(0.1)
        tokens = list(gen)
        assert engine.health()["status"] == "ok"
        engine.close()
    assert tokens == mlx_lm_greedy(model, PROMPT, 16, CHUNK, stop_ids=(1,))
    assert any("ring is back" in n for n in notes)


def test_a_failure_that_is_not_a_node_loss_is_reported(tmp_path, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    with LocalCluster(3, workdir=tmp_path) as cluster:
        engine = healing_engine(model, cluster, [])
        gen = engine.submit(greedy(PROMPT, 400))
        with pytest.raises(GenerationError) as e:
            for i, _ in enumerate(gen):
                if i == 3:  # the node lives on but forgets the shard
                    engine.stages[1].peer.unload()
        assert "unloaded" in str(e.value)
        engine.close()
