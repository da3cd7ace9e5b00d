"""The session and token calls of a node's gRPC service (a part of
NodeService): open a session, feed it prompt chunks, stream every session's
events to its coordinator on one stream, end it, open a link. None of them
waits for the compute thread."""

from __future__ import annotations

import logging
import threading

import grpc

from clusterd.node.checks import activation_problem, open_session_problem, quoted
from clusterd.node.sessions import MAX_ID_CHARS, SessionRefused
from clusterd.node.link import LinkError
from clusterd.wire import clusterd_pb2 as pb

log = logging.getLogger("clusterd.node")

EVENT_POLL_S = 0.5


def _peer_host(context) -> str:
    """The caller's IP from gRPC's peer string (ipv4:1.2.3.4:5, ipv6:[::1]:5)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = host.strip("[]")
    return normal_host(host)


def normal_host(host: str) -> str:
    """One spelling per address: an IPv4 address seen through IPv6 is IPv4."""
    return host[7:] if host.startswith("::ffff:") else host


class SessionRpcs:
    """Needs `self.executor` and `self.name` (see NodeService)."""

    def _shard_or_abort(self, name: str, context):
        shard = self.executor.shards.get(name)
        if shard is None:
            held = [s.name for s in self.executor.shards.all()]
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name} holds no shard {quoted(name)}"
                          + (f" (it holds {', '.join(map(quoted, held))})" if held
                             else " (nothing is loaded)"))
        return shard

    def OpenSession(self, request, context):
        shard = self._shard_or_abort(request.shard, context)
        problem = open_session_problem(request, shard)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: {problem}")
        try:
            cached = self.executor.open_session(request, shard)
        except SessionRefused as e:
            context.abort(getattr(grpc.StatusCode, e.code), f"node {self.name}: {e}")
        if not context.is_active():  # the caller gave up: the call has no effect
            self.executor.end_session(request.session_id, reason="the caller went away")
        return pb.OpenSessionReply(cached_tokens=cached)

    def Forward(self, request, context):
        shard = self._shard_or_abort(request.shard, context)
        if request.group != 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "Forward takes prompt chunks (group 0); decode steps travel on links")
        problem = activation_problem(request, shard)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {self.name}: {problem}")
        sid = request.rows[0].session_id
        if self.executor.sessions.get(sid) is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"unknown session {quoted(sid)} on node {self.name}")
        self.executor.enqueue(request)
        return pb.ForwardReply()

    def Events(self, request, context):
        client = request.client_id
        if not client or len(client) > MAX_ID_CHARS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"client_id must be 1-{MAX_ID_CHARS} characters")
        hub = self.executor.events
        token = object()
        q = hub.attach(client, token)
        gone = threading.Event()

        def on_rpc_end() -> None:
            # The coordinator went away (it died, or its link did): free its
            # sessions' caches now, not at the idle timeout. A callback,
            # because a stream blocked in `yield` never resumes.
            gone.set()
            if hub.detach(client, token):
                ended = self.executor.end_client(client, "the coordinator went away")
                if ended:
                    log.info("coordinator %s gone: %d sessions ended", client[:16], len(ended))

        context.add_callback(on_rpc_end)
        while not gone.is_set() and context.is_active():
            event = hub.get(q, EVENT_POLL_S)
            if event is not None:
                yield event

    def EndSession(self, request, context):
        if len(request.session_id) > MAX_ID_CHARS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"session_id must be at most {MAX_ID_CHARS} characters")
        freed = self.executor.end_session(request.session_id, request.keep_tokens)
        return pb.EndSessionReply(freed_bytes=freed)

    def OpenLink(self, request, context):
        try:
            ticket = self.executor.link_server.ticket(_peer_host(context))
        except LinkError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return pb.OpenLinkReply(port=self.executor.link_server.port, ticket=ticket)
