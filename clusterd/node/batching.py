"""Decode groups: the sessions that travel the ring together, one batch row
each. Two parts, one job each:

- GroupCaches (every stage): the KV caches of each group's rows as one
  batch (mlx-lm's BatchKVCache, with its own masks for rows of different
  lengths). An activation's row list is the truth: before a step the group
  is reconciled to it (rows that left are extracted back to their sessions,
  rows that joined are merged in). A group of one row holds that session's
  plain caches, so a session alone runs exactly as mlx-lm runs it.
- GroupFormer (first stage): decides the rows of each group's next step
  from what the last stage sent back, and where a session that finished
  its prompt joins: a new group while there are fewer groups than stages
  (so every stage has a group to work on), else the smallest group.

All of it runs on the compute thread."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from clusterd.node.last_stage import step_of
from clusterd.node.sessions import Session
from clusterd.wire import clusterd_pb2 as pb


def _merge(per_session: Sequence[list[Any]]) -> list[Any]:
    """Layer-wise batch of several sessions' caches (rows in the given order)."""
    return [BatchKVCache.merge([caches[i] for caches in per_session])
            for i in range(len(per_session[0]))]


def _extract(batch: list[Any], row: int) -> list[Any]:
    return [c.extract(row) for c in batch]


def trim_row(caches: list[Any], row: Optional[int], n: int) -> None:
    """Drop the last `n` positions of one session: its plain caches (row
    None) or one row of a batch, whose dropped positions become left padding
    (mlx-lm's own right-padding roll), so rows may trim by different counts."""
    if n <= 0:
        return
    if row is None:
        for c in caches:
            c.trim(n)
        return
    for c in caches:
        pad = [0] * c.offset.shape[0]
        pad[row] = n
        c._right_padding = mx.array(pad)  # noqa: SLF001 (mlx-lm's finalize reads it)
        c.finalize()


@dataclass
class _Group:
    rows: list[str] = field(default_factory=list)
    caches: Optional[list[Any]] = None  # plain per-layer caches for one row, batch otherwise


class GroupCaches:
    def __init__(self, make_cache: Callable[[], list[Any]]):
        self._make_cache = make_cache
        self._groups: dict[int, _Group] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def row_of(self, s: Session) -> Optional[int]:
        g = self._groups.get(s.group)
        return None if g is None or len(g.rows) == 1 else g.rows.index(s.session_id)

    def caches_of(self, s: Session) -> list[Any]:
        """The caches a session's rows live in (plain or its group's batch)."""
        if s.group:
            return self._groups[s.group].caches
        return s.caches

    def reconcile(self, gid: int, sessions: list[Session],
                  lookup: Callable[[str], Optional[Session]]) -> list[Any]:
        """Make group `gid` hold exactly `sessions`, in order; its caches."""
        g = self._groups.setdefault(gid, _Group())
        want = [s.session_id for s in sessions]
        if g.rows == want:
            return g.caches
        wanted = set(want)
        leaving = [i for i, sid in enumerate(g.rows) if sid not in wanted]
        for i in reversed(leaving):
            self._detach(g, i, lookup(g.rows[i]))
        have = set(g.rows)
        joining = [s for s in sessions if s.session_id not in have]
        if joining:
            own = [s.caches for s in joining]
            if not g.rows:
                g.caches = own[0] if len(own) == 1 else _merge(own)
            else:
                base = g.caches if len(g.rows) > 1 else _merge([g.caches])
                add = _merge(own)
                for b, a in zip(base, add):
                    b.extend(a)
                g.caches = base
            for s in joining:
                s.caches, s.group = None, gid
            g.rows += [s.session_id for s in joining]
        if g.rows != want:  # only if the former and this stage disagree: rebuild in order
            own = [self.take(lookup(sid)) for sid in list(g.rows)]
            g.rows, g.caches = [], None
            for s, c in zip(sessions, own):
                s.caches = c
            return self.reconcile(gid, sessions, lookup)
        return g.caches

    def take(self, s: Optional[Session]) -> Optional[list[Any]]:
        """Take a session's caches out of its group (or its own); None if none."""
        if s is None:
            return None
        if not s.group:
            caches, s.caches = s.caches, None
            return caches
        gid = s.group
        g = self._groups.get(gid)
        if g is None or s.session_id not in g.rows:
            s.group = 0
            return None
        self._detach(g, g.rows.index(s.session_id), s)
        if not g.rows:
            del self._groups[gid]
        caches, s.caches = s.caches, None
        return caches

    def _detach(self, g: _Group, i: int, s: Optional[Session]) -> None:
        """Row i leaves group g; its caches go back to its session (if any)."""
        if len(g.rows) == 1:
            own, g.caches = g.caches, None
        else:
            own = _extract(g.caches, i)
            keep = [j for j in range(len(g.rows)) if j != i]
            for c in g.caches:
                c.filter(keep)
            if len(keep) == 1:  # alone again: plain caches, as mlx-lm runs one session
                g.caches = _extract(g.caches, 0)
        sid = g.rows.pop(i)
        if s is not None and s.session_id == sid:
            s.caches, s.group = own, 0


@dataclass
class _Pending:
    row: pb.Row
    tokens: list[int]


class GroupFormer:
    def __init__(self) -> None:
        self._groups: dict[int, int] = {}  # gid -> rows in flight
        self._joiners: dict[int, list[_Pending]] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._groups)

    def on_return(self, act: pb.Activation, target_groups: int) -> list[pb.Activation]:
        """What the last stage sent back -> the steps to run now."""
        w = act.width or 1
        ids = list(act.tokens.ids)
        rows = [_Pending(r, ids[i * w:(i + 1) * w]) for i, r in enumerate(act.rows)]
        if act.group == 0:  # sessions that finished their prompt
            out = []
            for p in rows:
                if len(self._groups) < max(1, target_groups):
                    out.append(self._step(self._new_group(), [p], act))
                else:
                    gid = min(self._groups, key=lambda k: (self._size(k), k))
                    self._joiners[gid].append(p)
            return out
        gid = act.group
        if gid not in self._groups:
            return []
        rows += self._joiners.pop(gid, [])
        if not rows:
            del self._groups[gid]
            return []
        self._joiners[gid] = []
        return [self._step(gid, rows, act)]

    def _size(self, gid: int) -> int:
        return self._groups[gid] + len(self._joiners.get(gid, []))

    def _new_group(self) -> int:
        gid = self._next
        self._next += 1
        self._groups[gid] = 0
        self._joiners[gid] = []
        return gid

    def _step(self, gid: int, rows: list[_Pending], like: pb.Activation) -> pb.Activation:
        self._groups[gid] = len(rows)
        return step_of(like.shard, gid, [(p.row, p.tokens) for p in rows])

    def forget(self, gid: int) -> None:
        self._groups.pop(gid, None)
        self._joiners.pop(gid, None)
