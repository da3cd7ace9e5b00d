"""The gRPC service of a node. Handlers validate requests and answer with a
status that names the problem; the work itself runs on the Executor. The
session and token calls are in session_rpcs.py."""

import logging
import os
import threading
import time
from typing import Callable

import grpc
import mlx.core as mx
import psutil

from clusterd.home import clusterd_home
from clusterd.messages import bounded
from clusterd.models.stage import StageLoadError
from clusterd.models.stage_check import check_stage
from clusterd.models.store import ModelStore, StoreError
from clusterd.node.executor import Executor
from clusterd.node.loading import Busy
from clusterd.node.mtp_loader import drafter_bytes, load_drafter
from clusterd.node.probe import ProbeRpcs
from clusterd.node.shards import LimitError, Limits
from clusterd.node.session_rpcs import SessionRpcs
from clusterd.node.resources import Resources
from clusterd.node.sources import ModelMissing, NodeFiles, Stubs
from clusterd.node.wired import WiredMemory
from clusterd.wire import PROTOCOL_VERSION
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire import clusterd_pb2_grpc as rpc

log = logging.getLogger("clusterd.node")


class NodeService(SessionRpcs, ProbeRpcs, rpc.NodeServicer):
    def __init__(
        self,
        *,
        node_id: str,
        boot_id: str,
        name: str,
        port: int,
        resources: Resources,
        executor: Executor,
        on_shutdown: Callable[[], None],
        on_change: Callable[[], None] = lambda: None,
        files=None,  # NodeFiles: the model store and node-to-node transfers
    ):
        self.node_id = node_id
        self.boot_id = boot_id  # this process: one node reached twice is one node
        self.name = name
        self.port = port
        self.resources = resources
        self.executor = executor
        self._on_shutdown = on_shutdown
        self._on_change = on_change
        self._stopping = threading.Event()
        if files is None:
            files = NodeFiles(name, ModelStore(), clusterd_home() / "hashes", Stubs())
        self.files = files
        self.wired = WiredMemory(executor.call)  # Metal only: keeps the stage resident

    # -- identity and health --------------------------------------------------
    def state(self) -> str:
        if self._stopping.is_set():
            return "stopping"
        if self.executor.loading:
            return "loading"
        return "ready" if self.executor.stage is not None else "idle"

    def info(self) -> pb.NodeInfo:
        r = self.resources
        ex = self.executor
        now = time.monotonic()
        per_token = {sh.name: sh.kv_bytes_per_token for sh in ex.shards.all()}
        sessions = [
            pb.SessionInfo(session_id=s.session_id, tokens=s.length,
                           kv_bytes=s.length * per_token.get(s.shard, 0),
                           idle_seconds=now - s.last_active)
            for s in ex.sessions.select()
        ]
        shards = [sh.to_wire(ex.sessions.count(sh.name)) for sh in ex.shards.all()]
        held = sum(sh.weight_bytes + sh.prompt_cache_bytes for sh in shards)
        msg = pb.NodeInfo(
            node_id=self.node_id, name=self.name, protocol_version=PROTOCOL_VERSION,
            chip=r.chip, total_memory_bytes=r.total_bytes, usable_memory_bytes=r.usable_bytes,
            bandwidth_gbs=r.bandwidth_gbs, free_disk_bytes=r.free_disk_bytes,
            platform=r.platform, mlx_version=mx.__version__, state=self.state(),
            has_shard=bool(shards), sessions=sessions, shards=shards,
            memory_held_bytes=held + sum(s.kv_bytes for s in sessions),
            rss_bytes=psutil.Process(os.getpid()).memory_info().rss, port=self.port,
            link_port=ex.link_server.port, boot_id=self.boot_id,
        )
        if shards:
            msg.shard.CopyFrom(shards[0])
        return msg

    def Hello(self, request, context):
        # The one call without a proof: only what the mDNS record says too.
        return pb.HelloReply(node_id=self.node_id, boot_id=self.boot_id,
                             protocol_version=PROTOCOL_VERSION, name=self.name)

    def Info(self, request, context):
        return self.info()

    def Health(self, request, context):
        return pb.HealthReply(node_id=self.node_id, protocol_version=PROTOCOL_VERSION,
                              state=self.state(), unix_time=self.clock(), boot_id=self.boot_id)

    # -- shards ---------------------------------------------------------------
    def LoadShard(self, request, context):
        spec = request.stage
        if not spec.model_path and not spec.model_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "LoadShard needs a model_path or a model_id")
        try:
            path = self.files.stage_dir(spec)  # model_id: the node's own model store
        except ModelMissing as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, bounded(str(e)))
        except StoreError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(f"node {self.name}: {e}"))
        try:
            limits = Limits.from_wire(spec.limits)
        except LimitError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(f"node {self.name}: {e}"))
        # Everything that can be known before loading is checked while the
        # shard held now (and its sessions) stays untouched.
        try:
            check = check_stage(path, spec.start_layer, spec.end_layer, self.resources.usable_bytes)
        except StageLoadError as e:
            log.warning("load refused: %s", e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(f"node {self.name}: {e}"))
        name = spec.shard or spec.model_id or str(check.path)
        log.info("loading layers [%d, %d) of %s as %s", check.start, check.end, check.path, name)
        shard, code, problem = self._load(name, check, limits, context)
        if problem is not None:
            context.abort(code, bounded(f"node {self.name}: {problem}"))
        log.info("loaded %.1f MiB in %.2fs", shard.stage.weight_bytes / 2**20, shard.load_seconds)
        if spec.HasField("mtp") and shard.drafter is None:
            self.executor.attach_drafter(
                shard, lambda: load_drafter(spec.mtp, shard.stage, check.path, spec.model_id,
                                            self.files.store),
                drafter_bytes, self.resources.usable_bytes)
            if shard.drafts_note:
                log.warning("drafts: %s", shard.drafts_note)
        self._wire()
        self._on_change()
        return pb.LoadShardReply(shard=shard.to_wire(self.executor.sessions.count(shard.name)),
                                 memory_held_bytes=shard.budget.total)

    def _load(self, name, check, limits, context):
        """(shard, None, None) when loaded, else (None, status, message); the
        exception (and the model it holds) is gone when this returns (the
        executor frees what a failed load allocated)."""
        try:
            shard = self.executor.load(name, check.path, check.start, check.end, limits,
                                       self.resources.usable_bytes,
                                       cancelled=lambda: not context.is_active())
            return shard, None, None
        except Busy as e:
            return None, grpc.StatusCode.FAILED_PRECONDITION, str(e)
        except LimitError as e:
            return None, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        except StageLoadError as e:
            log.warning("load failed: %s", e)
            return None, grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Exception:  # anything else: the node stays up and says why
            log.exception("load failed")
            return None, grpc.StatusCode.INTERNAL, "the load failed unexpectedly; the node's log has why"

    def _wire(self) -> None:
        """On Metal, keep what the shards hold (weights, planned KV, prompt
        cache) wired; nothing held, the system's limit back."""
        held = sum(sh.budget.total - sh.budget.workspace for sh in self.executor.shards.all())
        if held:
            self.wired.hold_bytes(held)
        else:
            self.wired.release()

    def Unload(self, request, context):
        if self.executor.loading:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a load is in progress")
        freed = self.executor.unload(request.shard)
        self._wire()
        self._on_change()
        return pb.UnloadReply(freed_bytes=freed)

    # -- weight files (clusterd/node/sources.py, transfer.py) -------------------
    def ListFiles(self, request, context):
        return self.files.list_files(request, context)

    def FetchFile(self, request, context):
        yield from self.files.fetch_file(request, context)

    def PrepareFiles(self, request, context):
        yield from self.files.prepare_files(request, context)

    def stopping(self) -> None:
        """From now on the node says "stopping" (Health, Info)."""
        self._stopping.set()

    def Shutdown(self, request, context):
        self._stopping.set()
        threading.Thread(target=self._on_shutdown, daemon=True).start()
        return pb.ShutdownReply()
