"""The node's compute: one thread runs every MLX operation (loads, steps,
cache moves) so MLX is never used from two threads at once. RPC threads
and links only queue work and read state; they never wait for a step.

Work comes in three queues: control jobs (first), decode steps and prompt
chunks. When both of the last two wait, they alternate, so a long prompt
arriving does not freeze the conversations already decoding.

A step takes an activation (rows of sessions, each `width` positions):
the first stage embeds token ids, every stage runs its layers on the batch
(GroupCaches holds a decode group's caches as one batch), a middle stage
sends the hidden state on over its link, the last stage samples each row,
sends the continuing rows' tokens back to the first stage (GroupFormer
there forms each group's next step) and then publishes the tokens to the
coordinators' event streams."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx

from clusterd.node.batching import GroupCaches, GroupFormer, trim_row
from clusterd.node.cache_store import compact, materialize
from clusterd.node.checks import activation_problem
from clusterd.node.events import EventHub
from clusterd.node.link import LinkClient, LinkError, LinkServer
from clusterd.node.heap import free_memory, give_back
from clusterd.node.loading import Loader
from clusterd.node.drafting import LookupDrafts, MtpDrafts
from clusterd.node.last_stage import decide, settle, step_of
from clusterd.node.sampling import RowSampler
from clusterd.node.sessions import Session, SessionRefused, SessionTable
from clusterd.node.shards import Shard, ShardTable
from clusterd.security import TlsFiles
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire.tensors import describe, from_wire, raw_view

log = logging.getLogger("clusterd.node")

HOP_TIMEOUT_S = 30.0
INLINE_SEND_BYTES = 1 << 16  # larger frames go to the link's sender thread


class Stopping(RuntimeError):
    """The node is stopping: work in progress is abandoned."""


class _RowError(ValueError):
    pass


@dataclass(frozen=True)
class _Work:
    act: pb.Activation
    raw: Optional[bytes]
    from_ring: bool  # sent back by the last stage (tokens for the next step)


class Executor:
    def __init__(self, node_name: str, next_hop: Callable[[str], Any], *,
                 host: str = "127.0.0.1", tls: TlsFiles = TlsFiles(),
                 max_frame_bytes: int = 1 << 30, link_port: int = 0):
        self.node_name = node_name
        self.shards = ShardTable()
        self.sessions = SessionTable()
        self.events = EventHub()
        self._next_hop = next_hop  # gRPC address -> stub (OpenLink)
        self._tls = tls
        self._links: dict[str, LinkClient] = {}
        self._links_lock = threading.Lock()
        self.link_server = LinkServer(host, self._on_link_frame, max_raw_bytes=max_frame_bytes,
                                      tls=tls, node_name=node_name, port=link_port)
        # Compute thread only:
        self._ring_next: dict[str, str] = {}  # shard -> next stage's address
        self._groups: dict[str, GroupCaches] = {}
        self._formers: dict[str, GroupFormer] = {}
        self._control: deque = deque()
        self._decode: deque = deque()
        self._prefill: deque = deque()
        self._last_was_prefill = False
        self._steps = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self.loader = Loader(self.shards, self.call, self._stopping.is_set, self.unload)
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._thread.start()

    # -- the compute thread -------------------------------------------------
    def _take(self):
        with self._cond:
            while not (self._control or self._decode or self._prefill or self._stopping.is_set()):
                self._cond.wait()
            if self._stopping.is_set():
                return None
            if self._control:
                return self._control.popleft()
            if self._decode and (not self._prefill or self._last_was_prefill):
                self._last_was_prefill = False
                return self._decode.popleft()
            if self._prefill:
                self._last_was_prefill = True
                return self._prefill.popleft()
            return self._decode.popleft()

    def _run(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            if isinstance(job, _Work):
                try:
                    self._step(job)
                except Stopping:
                    return
                except Exception as e:  # the daemon survives; the coordinators hear why
                    log.exception("step failed")
                    self._fail_rows(job.act, f"node {self.node_name}: step failed: {e}")
                # Return MLX's freed buffers as mlx-lm does (after each prompt chunk,
                # every 256 decode steps): batches of changing shapes otherwise keep
                # growing its buffer cache, and the node's memory with it.
                self._steps += 1
                if (job.act.group == 0 and not job.from_ring) or self._steps % 256 == 0:
                    mx.clear_cache()
            else:
                fn, fut = job
                if fut is None:
                    try:
                        fn()
                    except Exception:
                        log.exception("background job failed")
                elif fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # delivered to the waiting caller
                        fut.set_exception(e)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the compute thread and return its result."""
        fut: Future = Future()
        self._put(self._control, (fn, fut))
        return fut.result()

    def post(self, fn: Callable[[], None]) -> None:
        """Run fn on the compute thread soon; nobody waits for it."""
        self._put(self._control, (fn, None))

    def _put(self, q: deque, item) -> None:
        with self._cond:
            q.append(item)
            self._cond.notify()

    def enqueue(self, act: pb.Activation, raw: Optional[bytes] = None,
                from_ring: bool = False) -> None:
        q = self._prefill if act.group == 0 and not from_ring else self._decode
        self._put(q, _Work(act, raw, from_ring))

    def _on_link_frame(self, act: pb.Activation, raw: Optional[bytes], peer: str) -> None:
        shard = self.shards.get(act.shard)
        problem = "" if shard is None else activation_problem(act, shard, raw, from_link=True)
        if shard is None or problem:
            log.warning("dropped a frame from %s: %s", peer,
                        problem or f"no shard {act.shard[:40]!r}")
            self._fail_rows(act, f"node {self.node_name}: {problem or 'no such shard'}")
            return
        self.enqueue(act, raw, from_ring=shard.stage.bounds.first)

    def stop(self) -> None:
        """End every session and stop the compute thread (it finishes the
        layer it is in; a load stops between layers)."""
        for s in self.sessions.select():
            self._end(s, "node is shutting down")
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=2)
        with self._cond:  # whoever waits on a job that will never run hears why now
            pending, self._control = list(self._control), deque()
        for _, fut in pending:
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(Stopping("the node is stopping"))
        self.link_server.close()
        with self._links_lock:
            links = list(self._links.values())
        for link in links:
            link.close()

    # -- shards ---------------------------------------------------------------
    @property
    def loading(self) -> bool:
        return self.loader.loading

    @property
    def stage(self):
        """The first shard's stage (one shard is the common case)."""
        shards = self.shards.all()
        return shards[0].stage if shards else None

    def load(self, *args, **kwargs) -> Shard:
        return self.loader.load(*args, **kwargs)

    def attach_drafter(self, *args, **kwargs) -> None:
        self.loader.attach_drafter(*args, **kwargs)

    def unload(self, name: str = "") -> int:
        """Answers at once: the shard leaves the table, its sessions end,
        and the compute thread frees the memory when it gets there."""
        freed = 0
        for shard in ([self.shards.get(name)] if name else self.shards.all()):
            if shard is None or self.shards.pop(shard.name) is None:
                continue
            for s in self.sessions.select(shard=shard.name):
                self._end(s, "the shard was unloaded")
            freed += shard.stage.weight_bytes + shard.prompt_cache.nbytes
            self.post(lambda sh=shard: self._free_shard(sh))
        return freed

    def _free_shard(self, shard: Shard) -> None:
        self._groups.pop(shard.name, None)
        self._formers.pop(shard.name, None)
        shard.prompt_cache.clear()
        free_memory()

    # -- sessions -------------------------------------------------------------
    def open_session(self, req: pb.OpenSessionRequest, shard: Shard) -> int:
        """Called on an RPC thread (no MLX here); the reusable prompt prefix."""
        pin = shard.prompt_cache.lookup(req.prompt) if len(req.prompt) > 1 else None
        last = shard.stage.bounds.last
        s = Session(
            session_id=req.session_id, shard=shard.name, client_id=req.client_id,
            next_address=req.next_address, timeout_s=req.timeout_seconds or 300.0,
            prompt=tuple(req.prompt), pin=pin,
            sampler=RowSampler(req.sampling, shard.limits.context) if last else None,
            max_tokens=req.max_tokens, stop_ids=frozenset(req.stop_token_ids),
            drafts=_drafts(req, shard))
        self.events.opened(s.client_id)  # before it can be ended and released
        try:
            self.sessions.open(s, shard.limits.max_sessions)
        except SessionRefused:
            self.events.released(s.client_id)
            raise
        self._ring_next[shard.name] = req.next_address
        return pin.tokens if pin else 0

    def end_session(self, session_id: str, keep_tokens=(), reason: str = "") -> int:
        """Answers at once; the caches move to the prompt cache (or are freed)
        on the compute thread. Bytes the session's caches held, about."""
        s = self.sessions.end(session_id, reason)
        if s is None:
            return 0
        shard = self.shards.get(s.shard)
        per_token = shard.kv_bytes_per_token if shard else 0
        keep = tuple(keep_tokens)[: s.length]  # what its caches hold of them
        if shard is not None and len(keep) > 1:
            shard.prompt_cache.announce(keep, len(keep) * per_token)
        self.post(lambda: self._release(s, keep))
        return s.length * per_token

    def end_client(self, client_id: str, reason: str) -> list[str]:
        ended = []
        for s in self.sessions.select(client_id=client_id):
            if self.sessions.end(s.session_id, reason) is not None:  # once, whoever ends it
                self.post(lambda s=s: self._release(s, ()))
                ended.append(s.session_id)
        return ended

    def expire(self, now: Optional[float] = None) -> list[str]:
        """End sessions idle longer than their timeout (a vanished coordinator)."""
        now = time.monotonic() if now is None else now
        stale = self.sessions.select(idle_before=now)
        for s in stale:
            self._end(s, "session timed out")
        return [s.session_id for s in stale]

    def _end(self, s: Session, reason: str) -> None:
        if self.sessions.end(s.session_id, reason) is not None:
            self.events.publish(s.client_id, pb.TokenEvent(
                session_id=s.session_id, done=True, finish_reason="error",
                error=reason, node=self.node_name))
            self.post(lambda: self._release(s, ()))

    def _release(self, s: Session, keep: tuple[int, ...]) -> None:
        shard = self.shards.get(s.shard)
        groups = self._groups.get(s.shard)
        caches = groups.take(s) if groups is not None else s.caches
        s.caches, s.pin = None, None
        self.sessions.released(s.session_id)
        self.events.released(s.client_id)
        if shard is None:
            return
        n = min(len(keep), s.length)
        if n < len(keep) or not caches:  # not what end_session announced
            shard.prompt_cache.withdraw(keep)
        if caches and n > 1:
            trim_row(caches, None, s.length - n)
            shard.prompt_cache.insert(keep[:n], compact(caches))
        del caches
        if not self.sessions.select():  # idle: give the freed memory back to the system
            give_back()

    # -- a step ---------------------------------------------------------------
    def _step(self, work: _Work) -> None:
        act = work.act
        shard = self.shards.get(act.shard)
        if shard is None or shard.closed:
            return  # unloaded meanwhile: late activations are dropped
        if work.from_ring and shard.stage.bounds.first:
            former = self._formers.setdefault(shard.name, GroupFormer())
            for nxt in former.on_return(act, shard.limits.ring_stages):
                self._compute(shard, nxt, None)
            return
        self._compute(shard, act, work.raw)

    def _groups_of(self, shard: Shard) -> GroupCaches:
        g = self._groups.get(shard.name)
        if g is None:
            g = self._groups[shard.name] = GroupCaches(shard.stage.make_cache)
        return g

    def _rows(self, shard: Shard, act: pb.Activation) -> list[tuple[int, Session]]:
        """The activation's rows whose sessions are open here, caches ready."""
        groups = self._groups_of(shard)
        out = []
        for i, row in enumerate(act.rows):
            s = self.sessions.get(row.session_id)
            if s is None or s.closed or s.shard != shard.name:
                continue  # ended meanwhile: its row is dropped here and downstream
            try:
                self._ready(shard, groups, s, row)
            except _RowError as e:
                self._end(s, f"node {self.node_name}: {e}")
                continue
            out.append((i, s))
        return out

    def _ready(self, shard: Shard, groups: GroupCaches, s: Session, row: pb.Row) -> None:
        if row.trim:
            if row.trim > s.length:
                raise _RowError(f"asked to drop {row.trim} positions of {s.length}")
            trim_row(groups.caches_of(s), groups.row_of(s), row.trim)
            s.length -= row.trim
        if s.caches is None and not s.group:  # its first activation on this stage
            if row.position == 0:
                s.caches = shard.stage.make_cache()
            elif s.pin is not None and s.pin.tokens >= row.position:
                try:
                    s.caches = materialize(s.pin, row.position)
                except LookupError as e:
                    raise _RowError(str(e)) from None
            else:
                raise _RowError(f"session starts at position {row.position} but this stage "
                                "holds no prompt cache for it")
            s.pin = None
            s.length = row.position
        if s.length != row.position:
            raise _RowError(f"activation for position {row.position} but the session's "
                            f"caches hold {s.length} positions")
        s.touch()

    def _compute(self, shard: Shard, act: pb.Activation, raw: Optional[bytes]) -> None:
        rows = self._rows(shard, act)
        stage = shard.stage
        if not rows:
            if act.group and not stage.bounds.last:  # the group's turn goes on, empty
                self._send_on(shard, pb.Activation(shard=act.shard, group=act.group,
                                                   width=act.width, sample=act.sample), None)
            elif act.group:
                self._send_on(shard, step_of(shard.name, act.group, []), None)
            return
        sessions = [s for _, s in rows]
        w = act.width or 1
        x = self._input(stage, act, raw, [i for i, _ in rows], w)
        if act.group:
            caches = self._groups_of(shard).reconcile(act.group, sessions, self.sessions.holder)
        else:
            caches = sessions[0].caches
        # A prompt chunk is evaluated a layer at a time, as mlx-lm computes it; a
        # trip the last stage samples from (a token and its drafts: never a
        # prompt's chunk, whose last token goes alone) attends in the latent space.
        after = self._between_layers if w > 1 and not act.sample else None
        h = stage.forward(x, caches, after, absorb_up_to=w if act.sample else 1)
        for s in sessions:
            s.length += w
        if not stage.bounds.last:
            mx.eval(h)
            k = act.drafts
            out = pb.Activation(shard=act.shard, group=act.group, width=w, sample=act.sample,
                                rows=[act.rows[i] for i, _ in rows], drafts=k,
                                draft_ids=[d for i, _ in rows
                                           for d in act.draft_ids[i * k:(i + 1) * k]])
            describe(h, out.hidden)
            out.hidden.raw_bytes = h.nbytes
            self._send_on(shard, out, h, sessions)
            return
        if not act.sample:  # a prompt chunk: only the caches matter (and the MTP layer's)
            s = sessions[0]
            if s.drafts is not None and s.drafts.kind == "mtp":
                p = act.rows[0].position
                s.drafts.feed(stage.normed(h)[0], s.prompt[p + 1:p + 1 + w])
            mx.eval([c.state for c in caches])
            return
        self._sample(shard, act, sessions, h)

    def _between_layers(self, h: mx.array) -> None:
        # A long chunk is evaluated a layer at a time: bounded GPU command
        # buffers on Metal, and a stop request is honoured between layers.
        mx.eval(h)
        if self._stopping.is_set():
            raise Stopping()

    @staticmethod
    def _input(stage, act: pb.Activation, raw, sel: list[int], w: int) -> mx.array:
        if act.WhichOneof("payload") == "tokens":
            ids = list(act.tokens.ids)
            return mx.array([ids[i * w:(i + 1) * w] for i in sel], dtype=mx.int32)
        x = from_wire(act.hidden, raw)
        return x if len(sel) == x.shape[0] else x[mx.array(sel)]

    def _sample(self, shard: Shard, act: pb.Activation, sessions: list[Session],
                h: mx.array) -> None:
        outcomes = decide(shard.stage, sessions, h, act.width or 1, act.drafts)
        done = settle(shard.stage, sessions, outcomes, h, shard.limits.context)
        # The next step first: the ring goes on while the events are handed out.
        if done.returns or act.group:
            self._send_on(shard, step_of(shard.name, act.group, done.returns), None, sessions)
        for s, ev in done.events:
            self.events.publish(s.client_id, ev)

    # -- sending ---------------------------------------------------------------
    def _send_on(self, shard: Shard, act: pb.Activation, h: Optional[mx.array],
                 sessions: Optional[list[Session]] = None) -> None:
        address = self._next_address(shard, act, sessions)
        if address is None:
            return
        if address == "":  # a one-stage ring: the next stage is this node
            self.enqueue(act, None, from_ring=True)
            return
        link = self._link(address)
        raw = raw_view(h) if h is not None else None
        # Big frames (prompt chunks) go to the link's sender thread so the next
        # chunk's compute overlaps this transfer; a decode step is sent right
        # here (a thread handoff costs more than it saves), unless frames are
        # still queued, which it must not overtake.
        if (raw is not None and len(raw) > INLINE_SEND_BYTES) or not link.idle:
            link.send_later(act, raw, lambda e: self._fail_rows(act, self._link_text(e)))
            return
        try:
            link.send(act, raw)
        except LinkError as e:
            self._fail_rows(act, self._link_text(e))

    def _link_text(self, e: LinkError) -> str:
        return f"node {self.node_name} could not reach the next stage: {e}"

    def _next_address(self, shard: Shard, act: pb.Activation,
                      sessions: Optional[list[Session]]) -> Optional[str]:
        for s in sessions or ():
            return s.next_address
        for row in act.rows:
            s = self.sessions.get(row.session_id)
            if s is not None:
                return s.next_address
        return self._ring_next.get(shard.name)

    def _link(self, address: str) -> LinkClient:
        with self._links_lock:
            link = self._links.get(address)
            if link is None:
                stub = self._next_hop(address)
                link = LinkClient(address, lambda: stub.OpenLink(
                    pb.OpenLinkRequest(from_node=self.node_name), timeout=HOP_TIMEOUT_S),
                    self._tls)
                self._links[address] = link
            return link

    def _fail_rows(self, act: pb.Activation, message: str) -> None:
        for row in act.rows:
            s = self.sessions.get(row.session_id)
            if s is not None:
                self._end(s, message)


def _drafts(req: pb.OpenSessionRequest, shard: Shard):
    """The drafter of a session that asked for drafts (the last stage drafts;
    penalties need each token's own logits, so they draft nothing). MTP when
    the shard holds the layer, else prompt lookup."""
    sp = req.sampling
    if not shard.stage.bounds.last or not req.draft.kind or not req.draft.tokens or (
            sp.repetition_penalty or sp.presence_penalty or sp.frequency_penalty):
        return None
    if req.draft.kind == "mtp" and shard.drafter is not None:
        return MtpDrafts(req.draft.tokens, shard.drafter)
    return LookupDrafts(req.draft.tokens, req.prompt)
