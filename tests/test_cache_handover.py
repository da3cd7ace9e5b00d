"""A session that ends while its decode group is mid-flight: the next step
drops its row from the batch before the compute thread gets to release it.
Its caches must still reach the prompt cache that already announced them,
so the conversation's next turn (which pinned the announced entry) starts
from them instead of failing (found by the 10-minute soak: 4 of 7,069
generations failed with "the prompt cache entry ... never arrived")."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from clusterd.node.batching import GroupCaches
from clusterd.node.cache_store import PromptCache, materialize
from clusterd.node.sessions import Session, SessionTable

LAYERS, HEADS, DIM = 2, 1, 4


def filled(n: int, seed: int) -> list[KVCache]:
    caches = [KVCache() for _ in range(LAYERS)]
    key = mx.random.key(seed)
    for c in caches:
        k = mx.random.normal((1, HEADS, n, DIM), key=key)
        c.update_and_fetch(k, k + 1)
    return caches


def open_session(table: SessionTable, sid: str, n: int, seed: int) -> Session:
    s = Session(session_id=sid, shard="m", client_id="c", next_address="", timeout_s=60)
    s.caches, s.length = filled(n, seed), n
    table.open(s, limit=8)
    return s


@pytest.fixture
def grouped():
    table = SessionTable()
    groups = GroupCaches(lambda: [KVCache() for _ in range(LAYERS)])
    a = open_session(table, "a", 5, 1)
    b = open_session(table, "b", 3, 2)
    want_a = [mx.array(c.keys[..., :5, :]) for c in a.caches]
    groups.reconcile(1, [a, b], table.holder)
    assert a.caches is None and a.group == 1  # its caches live in the batch now
    return table, groups, a, b, want_a


def test_an_ended_sessions_row_goes_back_to_it_when_the_next_step_drops_it(grouped):
    table, groups, a, b, want_a = grouped
    assert table.end("a") is a  # EndSession, on an RPC thread
    groups.reconcile(1, [b], table.holder)  # the step already running drops a's row
    got = groups.take(a)  # the release that follows on the compute thread
    table.released("a")
    assert got is not None, "the ended session's caches were dropped with its row"
    assert [c.offset for c in got] == [5] * LAYERS
    for c, want in zip(got, want_a):
        assert mx.array_equal(c.keys[..., -5:, :], want)
    assert table.holder("a") is None  # released: nothing kept for it


def test_the_next_turn_that_pinned_the_announced_entry_finds_its_caches(grouped):
    table, groups, a, b, want_a = grouped
    tokens = (11, 12, 13, 14, 15)
    store = PromptCache(max_bytes=1 << 20)
    table.end("a")
    store.announce(tokens, 1000)
    pin = store.lookup([*tokens, 16, 17])  # the next turn opens before a's caches arrive
    assert pin is not None and pin.tokens == 5
    groups.reconcile(1, [b], table.holder)
    caches = groups.take(a)
    table.released("a")
    assert store.insert(tokens, caches)
    mine = materialize(pin, 5)
    for c, want in zip(mine, want_a):
        assert mx.array_equal(c.keys[..., -5:, :], want)


def test_equal_announcements_share_one_entry():
    store = PromptCache(max_bytes=1 << 20)
    tokens = (1, 2, 3)
    store.announce(tokens, 100)
    first = store.lookup([1, 2, 3, 4])
    store.announce(tokens, 100)  # a second session ending with the same tokens
    second = store.lookup([1, 2, 3, 9])
    assert store.insert(tokens, filled(3, 5))
    assert materialize(first, 3) and materialize(second, 3)
