"""The node's compute: one thread runs every MLX operation (loads and forward
steps) in arrival order, so MLX is never used from two threads at once and a
session's steps apply to its caches in order."""

import concurrent.futures
import gc
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from clusterd.models.stage import StageModel, load_stage
from clusterd.node.sessions import Session, SessionTable
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire.tensors import from_wire, to_wire

log = logging.getLogger("clusterd.node")

HOP_TIMEOUT_S = 30.0


class Busy(RuntimeError):
    """A load is already in progress."""


class Executor:
    def __init__(self, node_name: str, next_hop: Callable[[str], Any]):
        self.node_name = node_name
        self.sessions = SessionTable()
        self.stage: Optional[StageModel] = None
        self.load_seconds = 0.0
        self._next_hop = next_hop  # address -> stub with .Forward
        # One sender thread per next hop, made once (touched by the compute thread only).
        self._senders: dict[str, "_Sender"] = {}
        self._jobs: "queue.Queue[Any]" = queue.Queue()
        self._loading = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._thread.start()

    # -- the compute thread -------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, pb.Activation):
                self._step_guarded(job)
            else:
                fn, fut = job
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # delivered to the waiting RPC
                        fut.set_exception(e)

    def call(self, fn: Callable[[], Any]) -> Any:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut.result()

    def enqueue(self, act: pb.Activation) -> None:
        self._jobs.put(act)

    def stop(self) -> None:
        self.sessions.end_all("node is shutting down")
        self._jobs.put(None)
        self._thread.join(timeout=10)
        for sender in list(self._senders.values()):
            sender.put(None, None)

    # -- shards -------------------------------------------------------------
    @property
    def loading(self) -> bool:
        return self._loading.locked()

    def load(self, path: Path, start: int, end: int, max_bytes: Optional[int]) -> StageModel:
        if not self._loading.acquire(blocking=False):
            raise Busy("a load is already in progress on this node; wait for it to finish")
        try:
            current = self.stage
            if (current is not None and current.path == Path(path).resolve()
                    and (current.bounds.start, current.bounds.end) == (start, end)):
                return current  # already held: the next run starts at once
            self.unload()  # never hold two shards: the old one is freed first
            t0 = time.monotonic()
            stage = self.call(lambda: load_stage(path, start, end, max_bytes=max_bytes))
            self.load_seconds = time.monotonic() - t0
            self.stage = stage
            return stage
        finally:
            self._loading.release()

    def unload(self) -> int:
        freed = self.sessions.end_all("the shard was unloaded")
        if self.stage is not None:
            freed += self.stage.weight_bytes
            self.stage = None
            gc.collect()
            self.call(mx.clear_cache)
        return freed

    # -- sessions -----------------------------------------------------------
    def open_session(self, req: pb.OpenSessionRequest) -> None:
        stage = self.stage
        assert stage is not None
        sampler = None
        if stage.bounds.last:
            sp = req.sampling
            if sp.has_seed:
                # One global generator per process: reproducible for one
                # session at a time, which is what a seed is used for.
                self.call(lambda: mx.random.seed(sp.seed))
            sampler = make_sampler(temp=sp.temperature, top_p=sp.top_p)
        caches = self.call(stage.make_cache)
        self.sessions.open(
            Session(
                session_id=req.session_id,
                caches=caches,
                next_address=req.next_address,
                sampler=sampler,
                max_tokens=req.max_tokens,
                stop_ids=frozenset(req.stop_token_ids),
                timeout_s=req.timeout_seconds or 300.0,
            )
        )

    def _step_guarded(self, act: pb.Activation) -> None:
        s = self.sessions.get(act.session_id)
        if s is None or s.closed or self.stage is None:
            return  # ended meanwhile: late activations are dropped
        s.touch()
        try:
            self._step(self.stage, s, act)
        except Exception as e:  # the daemon survives; the coordinator hears why
            log.exception("step failed in session %s", act.session_id)
            self._fail(s, f"node {self.node_name}: step failed: {e}")

    def _step(self, stage: StageModel, s: Session, act: pb.Activation) -> None:
        kind = act.WhichOneof("payload")
        if kind == "error":
            self._fail(s, act.error)
            return
        if kind == "tokens":
            x = mx.array(list(act.tokens.ids), dtype=mx.int32)[None]
        else:
            x = from_wire(act.hidden)
        h = stage.forward(x, s.caches)
        if not stage.bounds.last:
            mx.eval(h)
            out = pb.Activation(session_id=s.session_id, step=act.step, sample=act.sample)
            to_wire(h, out=out.hidden)  # in place: one copy of the data, not two
            self._send(s, out)
            return
        if not act.sample:  # a prefill chunk: only the caches matter
            mx.eval([c.state for c in s.caches])
            return
        token = s.sampler(stage.logprobs(h)).item()
        s.produced += 1
        if token in s.stop_ids:
            reason = "stop"
        elif s.produced >= s.max_tokens:
            reason = "length"
        else:
            reason = ""
            self._send(s, pb.Activation(
                session_id=s.session_id, step=act.step + x.shape[1],
                tokens=pb.TokenIds(ids=[token]), sample=True))
        s.events.put(pb.TokenEvent(
            token=token, index=s.produced - 1, time=time.monotonic(),
            done=bool(reason), finish_reason=reason))

    def _send(self, s: Session, act: pb.Activation) -> None:
        if not s.next_address:  # a one-stage ring: the next stage is us
            self.enqueue(act)
            return
        # A long-lived thread per next hop makes the (blocking) call, so the
        # compute thread goes back to work at once and one hop's calls stay in
        # order. Not grpc's future(): it starts a polling thread whenever no
        # other call is in flight, i.e. on every decode hop (+0.25 ms measured).
        sender = self._senders.get(s.next_address)
        if sender is None:
            sender = self._senders[s.next_address] = _Sender(self, s.next_address)
        sender.put(s, act)

    def _hop_failed(self, s: Session, e: grpc.RpcError) -> None:
        self._fail(s, f"node {self.node_name} could not reach the next stage at "
                      f"{s.next_address}: {e.code().name}: {e.details()}")

    def _fail(self, s: Session, message: str) -> None:
        s.events.put(pb.TokenEvent(done=True, finish_reason="error", error=message))
        self.sessions.end(s.session_id, reason=message)


class _Sender:
    """Sends one next hop's activations, in the order the compute thread made them."""

    def __init__(self, executor: Executor, address: str):
        self._executor = executor
        self._address = address
        self._queue: "queue.Queue[Any]" = queue.Queue()
        threading.Thread(target=self._run, name=f"send {address}", daemon=True).start()

    def put(self, s: Optional[Session], act: Optional[pb.Activation]) -> None:
        self._queue.put((s, act))

    def _run(self) -> None:
        while True:
            s, act = self._queue.get()
            if act is None:
                return
            if s.closed:
                continue  # ended (or failed) meanwhile
            try:
                self._executor._next_hop(self._address).Forward(act, timeout=HOP_TIMEOUT_S)
            except grpc.RpcError as e:
                self._executor._hop_failed(s, e)
