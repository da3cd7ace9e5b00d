"""The session and token calls of a node's gRPC service (a part of
NodeService): open a session, feed it activations, stream its tokens, end it."""

import logging
import queue
import threading

import grpc

from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire.tensors import TensorError, check, dtype_name

log = logging.getLogger("clusterd.node")


class SessionRpcs:
    """Needs `self.executor` and `self.name` (see NodeService)."""

    # -- sessions -------------------------------------------------------------
    def OpenSession(self, request, context):
        if self.executor.stage is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name} has no shard loaded")
        if not request.session_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "OpenSession needs a session_id")
        if self.executor.stage.bounds.last and request.max_tokens < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1")
        self.executor.open_session(request)
        return pb.OpenSessionReply()

    def Forward(self, request, context):
        stage = self.executor.stage
        if stage is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.name} has no shard loaded")
        if self.executor.sessions.get(request.session_id) is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"unknown session {request.session_id!r} on node {self.name}")
        problem = _check_activation(request, stage)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: {problem}")
        self.executor.enqueue(request)
        return pb.ForwardReply()

    def StreamTokens(self, request, context):
        s = self.executor.sessions.get(request.session_id)
        if s is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"unknown session {request.session_id!r} on node {self.name}")
        finished = threading.Event()

        def on_rpc_end() -> None:
            # The coordinator went away mid-session (it died, or its link
            # did): free this stage's caches now, not at the idle timeout.
            # A callback, because a stream blocked in `yield` never resumes.
            if not finished.is_set() and self.executor.sessions.end(
                    request.session_id, "the coordinator went away") is not None:
                log.info("session %s: coordinator gone, caches freed", request.session_id)

        context.add_callback(on_rpc_end)
        while context.is_active():
            try:
                event = s.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event.done:
                finished.set()
            yield event
            if event.done:
                return

    def EndSession(self, request, context):
        freed = self.executor.sessions.end(request.session_id) or 0
        return pb.EndSessionReply(freed_bytes=freed)


def _check_activation(act: pb.Activation, stage) -> str:
    """What is wrong with an activation for this stage, or ''."""
    kind = act.WhichOneof("payload")
    if kind == "error":
        return ""
    if stage.bounds.first:
        if kind != "tokens":
            return "the first stage takes token ids, not a hidden state"
        ids = act.tokens.ids
        if not ids:
            return "no token ids"
        bad = [i for i in ids if not 0 <= i < stage.vocab_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {stage.vocab_size})"
        return ""
    if kind != "hidden":
        return "this stage takes a hidden state, not token ids"
    try:
        shape = check(act.hidden)
    except TensorError as e:
        return str(e)
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != stage.hidden_size:
        return f"hidden state has shape {list(shape)}, expected [1, L, {stage.hidden_size}]"
    if act.hidden.dtype != dtype_name(stage.activation_dtype):
        return f"hidden state is {act.hidden.dtype}, expected {dtype_name(stage.activation_dtype)}"
    return ""
