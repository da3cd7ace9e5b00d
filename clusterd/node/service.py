"""The gRPC service of a node. Handlers validate requests and answer with a
status that names the problem; the work itself runs on the Executor. The
session and token calls are in session_rpcs.py."""

import logging
import os
import secrets
import threading
import time
from typing import Callable

import grpc
import mlx.core as mx
import psutil

from clusterd.models.stage import StageLoadError
from clusterd.home import clusterd_home
from clusterd.models.store import ModelStore, StoreError
from clusterd.node.executor import Busy, Executor
from clusterd.node.probe import ProbeRpcs
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
        name: str,
        port: int,
        resources: Resources,
        executor: Executor,
        on_shutdown: Callable[[], None],
        on_change: Callable[[], None] = lambda: None,
        files=None,  # NodeFiles: the model store and node-to-node transfers
    ):
        self.node_id = node_id
        self.boot_id = secrets.token_hex(8)  # this process: one node reached twice is one node
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
        sessions = [
            pb.SessionInfo(session_id=s.session_id, tokens=s.cached_tokens, kv_bytes=s.kv_bytes,
                           idle_seconds=time.monotonic() - s.last_active)
            for s in self.executor.sessions.snapshot()
        ]
        stage = self.executor.stage
        weights = stage.weight_bytes if stage else 0
        msg = pb.NodeInfo(
            node_id=self.node_id, name=self.name, protocol_version=PROTOCOL_VERSION,
            chip=r.chip, total_memory_bytes=r.total_bytes, usable_memory_bytes=r.usable_bytes,
            bandwidth_gbs=r.bandwidth_gbs, free_disk_bytes=r.free_disk_bytes,
            platform=r.platform, mlx_version=mx.__version__, state=self.state(),
            has_shard=stage is not None, sessions=sessions,
            memory_held_bytes=weights + sum(s.kv_bytes for s in sessions),
            rss_bytes=psutil.Process(os.getpid()).memory_info().rss, port=self.port,
            boot_id=self.boot_id,
        )
        if stage is not None:
            msg.shard.CopyFrom(self._shard(stage))
        return msg

    def _shard(self, stage) -> pb.LoadedShard:
        b = stage.bounds
        return pb.LoadedShard(
            model_path=str(stage.path), model_type=stage.model_type, start_layer=b.start,
            end_layer=b.end, num_layers=b.num_layers, first=b.first, last=b.last,
            weight_bytes=stage.weight_bytes, load_seconds=self.executor.load_seconds)

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
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except StoreError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: {e}")
        log.info("loading layers [%d, %d) of %s", spec.start_layer, spec.end_layer, path)
        try:
            stage = self.executor.load(path, spec.start_layer, spec.end_layer,
                                       max_bytes=self.resources.usable_bytes)
        except Busy as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except StageLoadError as e:
            log.warning("load failed: %s", e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: {e}")
        except Exception as e:  # anything else: the node stays up and says why
            log.exception("load failed")
            context.abort(grpc.StatusCode.INTERNAL, f"node {self.name}: load failed: {e}")
        log.info("loaded %.1f MiB in %.2fs", stage.weight_bytes / 2**20, self.executor.load_seconds)
        self.wired.hold(stage, spec.context, spec.sessions)
        self._on_change()
        return pb.LoadShardReply(shard=self._shard(stage), memory_held_bytes=stage.weight_bytes)

    def Unload(self, request, context):
        if self.executor.loading:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a load is in progress")
        freed = self.executor.unload()
        self.wired.release()
        self._on_change()
        return pb.UnloadReply(freed_bytes=freed)

    # -- weight files (clusterd/node/sources.py, transfer.py) -------------------
    def ListFiles(self, request, context):
        return self.files.list_files(request, context)

    def FetchFile(self, request, context):
        yield from self.files.fetch_file(request, context)

    def PrepareFiles(self, request, context):
        yield from self.files.prepare_files(request, context)

    def Shutdown(self, request, context):
        self._stopping.set()
        threading.Thread(target=self._on_shutdown, daemon=True).start()
        return pb.ShutdownReply()
