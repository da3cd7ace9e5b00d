"""Many conversations at once through real daemons: the stages batch the
sessions' steps (continuous batching: sessions join after their prompt and
leave when done), admission follows the sessions the plan reserved room
for, and a long prompt does not freeze the conversations already decoding.
Batched passes may differ from one-at-a-time ones in the last bits, so each
token is checked against mlx-lm fed the same prefix (teacher forcing)."""

import threading
import time

import pytest

from clusterd.coordinator.engine import Engine
from clusterd.coordinator.generation import GenerationRequest, QueueFull, Sampling
from clusterd.coordinator.ring import RingOptions, model_source, open_ring
from clusterd.local_cluster import LocalCluster
from reference import mlx_lm_greedy, teacher_forced_misses

SPLITS = {1: None, 2: "3,3", 3: "2,2,2"}


def engine_on(cluster, model, n, sessions, queue=64, context=512, prefill=2048):
    ring = open_ring(model_source(str(model), None, lambda t: None), cluster.addresses[:n],
                     RingOptions(context=context, sessions=sessions, split=SPLITS[n],
                                 prefill_step_size=prefill, show=False), lambda t: None)
    return Engine(ring, name="m", context=context, max_sessions=sessions, queue_limit=queue,
                  prefill_step_size=prefill)


def greedy(prompt, n):
    return GenerationRequest(tuple(prompt), n, Sampling(temperature=0.0), ())


def run_all(engine, requests, delays):
    """Submit each request after its delay, each iterated on its own thread;
    returns tokens, stats and first-token times."""
    out, first = {}, {}
    gens = {}

    def run(i):
        time.sleep(delays[i])
        gens[i] = engine.submit(requests[i])
        toks = []
        for t in gens[i]:
            if not toks:
                first[i] = time.monotonic()
            toks.append(t)
        out[i] = toks

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out, gens, first


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(3, workdir=tmp_path_factory.mktemp("batching")) as c:
        yield c


@pytest.mark.parametrize("nodes", [1, 2, 3])
def test_eight_sessions_that_start_and_finish_apart(cluster, synthetic, nodes):
    model = synthetic("deepseek_v3", "tiny")
    engine = engine_on(cluster, model, nodes, sessions=8)
    prompts = [[(11 * i + 3 * j) % 1900 + 2 for j in range(2 + 7 * i)] for i in range(8)]
    requests = [greedy(p, 12 + 5 * i) for i, p in enumerate(prompts)]
    out, gens, _ = run_all(engine, requests, delays=[0.15 * (i % 4) for i in range(8)])
    engine.close()
    for i, p in enumerate(prompts):
        assert len(out[i]) == requests[i].max_tokens, i
        assert teacher_forced_misses(model, p, out[i]) == [], i
    # They really shared trips: fewer steps ran than tokens were made.
    assert sum(g.stats.trips for g in gens.values()) == sum(len(t) for t in out.values())


def test_a_session_alone_equals_mlx_lm_exactly(cluster, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    engine = engine_on(cluster, model, 3, sessions=8, prefill=16)
    prompt = list(range(40, 75))
    assert list(engine.submit(greedy(prompt, 48))) == mlx_lm_greedy(model, prompt, 48, 16)
    engine.close()


def test_admission_waits_in_arrival_order_within_the_planned_room(cluster, synthetic):
    """Room for 2: five requests all complete, served in the order they came,
    and no stage ever holds more than 2 sessions or its planned KV."""
    model = synthetic("deepseek_v3", "tiny")
    engine = engine_on(cluster, model, 3, sessions=2, queue=3)
    peers = [st.peer for st in engine.stages]
    planned = {st.peer.address: [s for s in st.peer.info().shards if s.shard == st.shard][0]
               for st in engine.stages}
    seen = {"sessions": 0, "kv": 0, "over": []}
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            for p in peers:
                info = p.info()
                shard = planned[p.address]
                kv = sum(s.kv_bytes for s in info.sessions)
                room = shard.limits.max_sessions * shard.limits.context * shard.kv_bytes_per_token
                seen["sessions"] = max(seen["sessions"], len(info.sessions))
                if kv > room:
                    seen["over"].append((p.address, kv, room))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    prompts = [[5 + i, 6, 7, 8] for i in range(5)]
    requests = [greedy(p, 24) for p in prompts]
    out, gens, first = run_all(engine, requests, delays=[0.05 * i for i in range(5)])
    with pytest.raises(QueueFull) as full:  # the queue (3) and the ring (2) are both full
        blockers = [engine.submit(greedy([9, 9], 300)) for _ in range(5)]
        threads = [threading.Thread(target=lambda g=g: list(g)) for g in blockers]
        for t in threads:
            t.start()
        time.sleep(1.0)
        engine.submit(greedy([9, 9], 4))
    assert "3 waiting" in str(full.value) and "queue holds 3" in str(full.value)
    for g in blockers:
        g.cancel()
    watching.set()
    watcher.join()
    engine.close()
    assert all(len(out[i]) == 24 for i in range(5))
    for i, p in enumerate(prompts):
        assert teacher_forced_misses(model, p, out[i]) == [], i
    order = sorted(range(5), key=lambda i: first[i])
    assert order[2:] == [2, 3, 4], order  # the three that waited started in arrival order
    assert [gens[i].stats.queued_s > 0.05 for i in (2, 3, 4)] == [True] * 3
    assert seen["sessions"] <= 2 and not seen["over"], seen


def test_a_long_prompt_does_not_freeze_the_decoding_sessions(cluster, synthetic):
    model = synthetic("deepseek_v3", "tiny")
    engine = engine_on(cluster, model, 3, sessions=5, context=2304)
    stamps: dict[int, list[float]] = {i: [] for i in range(4)}
    decoding = [engine.submit(greedy([20 + i, 21, 22], 1200)) for i in range(4)]

    def decode(i):
        for _ in decoding[i]:
            stamps[i].append(time.monotonic())

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps.values()) < 5:
        time.sleep(0.01)
    long_prompt = [(7 * j) % 1900 + 2 for j in range(2000)]
    t0 = time.monotonic()
    gen = engine.submit(greedy(long_prompt, 4))
    tokens = list(gen)
    t1 = t0 + gen.stats.ttft_s
    for g in decoding:
        g.cancel()
    for t in threads:
        t.join(60)
    engine.close()
    assert teacher_forced_misses(model, long_prompt, tokens) == []
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:]) if t0 <= a and b <= t1]
    ttft = gen.stats.ttft_s
    assert ttft > 2.0, ttft
    # Without interleaving each stream would wait the whole prefill for its
    # next token; here every stream goes on decoding while it runs.
    assert all(sum(t0 <= x <= t1 for x in s) >= 3 for s in stamps.values()), stamps
    assert max(gaps) < ttft / 2, (max(gaps), ttft)
