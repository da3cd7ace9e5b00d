"""Prompt lookup: the continuation of the latest earlier match of the longest suffix."""

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterd.speculative.ngram import PromptLookup


def rescan(tokens, k, min_n=1, max_n=4):
    """Reference: search the whole history, every time, longest n-gram first, latest
    earlier occurrence first, copying on into the proposal itself past the end."""
    end = len(tokens)
    for n in range(min(max_n, end), min_n - 1, -1):
        suffix = tokens[end - n:]
        for start in range(end - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                out = []
                for j in range(k):
                    pos = start + n + j
                    out.append(tokens[pos] if pos < end else out[pos - end])
                return out
    return []


def test_a_repeating_sequence_is_continued():
    lookup = PromptLookup([1, 2, 3, 4, 5, 1, 2, 3])
    assert lookup.propose(4) == [4, 5, 1, 2]
    # A short period: the copy runs on into what it proposes.
    assert PromptLookup([7, 8, 7, 8, 7]).propose(5) == [8, 7, 8, 7, 8]
    assert PromptLookup([9, 9]).propose(3) == [9, 9, 9]


def test_nothing_to_match_proposes_nothing():
    assert PromptLookup([1, 2, 3, 4]).propose(3) == []
    assert PromptLookup([]).propose(3) == []
    assert PromptLookup([5]).propose(3) == []
    assert PromptLookup([1, 2, 1]).propose(0) == []


def test_the_longest_match_wins_over_a_later_shorter_one():
    # Suffix (1, 2, 3): a 3-gram match at the start continues with 40; the latest
    # 1-gram match of 3 (at index 6) would continue with 99.
    lookup = PromptLookup([1, 2, 3, 40, 5, 6, 3, 99, 1, 2, 3])
    assert lookup.propose(2) == [40, 5]
    # Within the same n, the latest earlier occurrence.
    assert PromptLookup([4, 10, 4, 20, 4]).propose(1) == [20]


def test_sizes_are_bounded():
    tokens = [1, 2, 3, 50, 9, 2, 3, 60, 1, 2, 3]
    assert PromptLookup(tokens).propose(1) == [50]  # the 3-gram (1, 2, 3)
    assert PromptLookup(tokens, max_n=2).propose(1) == [60]  # the latest (2, 3)
    assert PromptLookup([1, 2, 9, 1, 2]).propose(1) == [9]
    assert PromptLookup([1, 2, 9, 1, 2], min_n=3).propose(1) == []
    with pytest.raises(ValueError, match="min_n"):
        PromptLookup(min_n=3, max_n=2)
    with pytest.raises(ValueError, match="32-bit"):
        PromptLookup([-1])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=60), st.lists(st.integers(0, 5), max_size=30),
       st.integers(1, 6))
def test_incremental_index_equals_a_rescan(prompt, output, k):
    lookup = PromptLookup(prompt)
    history = list(prompt)
    for t in output:  # as a session grows: one accepted token at a time
        assert lookup.propose(k) == rescan(history, k)
        lookup.extend([t])
        history.append(t)
    assert lookup.propose(k) == rescan(history, k)
    assert lookup.tokens == history


def test_long_histories_cost_the_same_per_token():
    rng = random.Random(0)
    lookup = PromptLookup([rng.randrange(129280) for _ in range(100_000)])
    t0 = time.perf_counter()
    for _ in range(1000):
        lookup.extend([rng.randrange(129280)])
        lookup.propose(3)
    per_token = (time.perf_counter() - t0) / 1000
    # A rescan of 100k tokens takes tens of milliseconds; an index lookup, microseconds.
    assert per_token < 5e-3, per_token
