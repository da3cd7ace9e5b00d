"""What every call of a node goes through after the proof check: a bound on
calls at once per source address and in all, the request read and parsed
here (a body that does not parse is INVALID_ARGUMENT, not INTERNAL), and a
clear INTERNAL (details in the node's log) instead of grpc's UNKNOWN with
Python's text when a handler fails unexpectedly.

The limits are checked before the request body is read: every unary handler
is served as request-streaming, so this code runs from the headers and reads
the one request message itself."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import grpc
from google.protobuf.message import DecodeError

from clusterd.proofs import source_ip

log = logging.getLogger("clusterd.node")


@dataclass(frozen=True)
class Limits:
    """Calls a node serves at once. grpc's own bound (`max_workers`, also
    grpc's maximum_concurrent_rpcs) is the backstop: past it a call is
    refused before any thread takes it. Below it, `max_calls` in all and
    `max_calls_per_peer` per source address leave worker threads for the
    refusals and for other peers, so one client cannot take the node."""

    max_workers: int = 128
    max_calls: int = 96
    max_calls_per_peer: int = 48

    def __post_init__(self) -> None:
        if not 1 <= self.max_calls_per_peer <= self.max_calls < self.max_workers:
            raise ValueError("need 1 <= calls per peer <= calls < worker threads")


class _Counts:
    def __init__(self, limits: Limits):
        self._limits = limits
        self._per_peer: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def enter(self, ip: str) -> Optional[str]:
        """None when the call may run (release it with leave), else why not."""
        with self._lock:
            if self._total >= self._limits.max_calls:
                return f"{self._total} calls are running (at most {self._limits.max_calls})"
            held = self._per_peer.get(ip, 0)
            if held >= self._limits.max_calls_per_peer:
                return (f"{held} calls from {ip} are running (at most "
                        f"{self._limits.max_calls_per_peer} per address)")
            self._per_peer[ip] = held + 1
            self._total += 1
            return None

    def leave(self, ip: str) -> None:
        with self._lock:
            self._total -= 1
            left = self._per_peer.get(ip, 1) - 1
            if left > 0:
                self._per_peer[ip] = left
            else:
                self._per_peer.pop(ip, None)


def _aborted(context) -> bool:
    # abort() and set_code() set the call's status before raising: those
    # exceptions carry an answer already.
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class CallGuard(grpc.ServerInterceptor):
    def __init__(self, node_label: str, limits: Limits = Limits()):
        self._label = node_label
        self._counts = _Counts(limits)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # the proto has no request-streaming call
        return self._wrap(handler, handler_call_details.method.rsplit("/", 1)[-1])

    def _admit(self, context, method: str) -> None:
        ip = source_ip(context.peer())
        why = self._counts.enter(ip)
        if why is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"node {self._label} is busy: {why}; {method} refused, try again "
                          "when calls finish")
        released = threading.Event()

        def leave() -> None:
            if not released.is_set():
                released.set()
                self._counts.leave(ip)

        if not context.add_callback(leave):  # the call already ended
            leave()

    def _request(self, request_iterator, context, parse: Callable[[bytes], object],
                 method: str):
        try:
            raw = next(request_iterator)
        except StopIteration:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{method} takes exactly one request message; none came")
        try:
            return parse(raw)
        except (DecodeError, ValueError, TypeError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request body is not a valid {method} request message")

    def _unimplemented(self, context, method: str) -> None:
        # The generated servicer's default: said plainly, without a traceback in the log.
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      f"node {self._label} does not serve {method} (another clusterd version?)")

    def _failed(self, context, method: str) -> None:
        log.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL,
                      f"node {self._label}: {method} failed unexpectedly; the node's log "
                      "has the details")

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer or (lambda raw: raw)

        if handler.response_streaming:
            behaviour = handler.unary_stream

            def serve_stream(request_iterator, context):
                self._admit(context, method)
                request = self._request(request_iterator, context, parse, method)
                try:
                    yield from behaviour(request, context)
                except grpc.RpcError:
                    return  # the client went away
                except NotImplementedError:
                    self._unimplemented(context, method)
                except Exception:
                    if _aborted(context):
                        raise
                    self._failed(context, method)

            return grpc.stream_stream_rpc_method_handler(
                serve_stream, request_deserializer=None,
                response_serializer=handler.response_serializer)

        unary = handler.unary_unary

        def serve(request_iterator, context):
            self._admit(context, method)
            request = self._request(request_iterator, context, parse, method)
            try:
                return unary(request, context)
            except NotImplementedError:
                self._unimplemented(context, method)
            except Exception:
                if _aborted(context):
                    raise
                self._failed(context, method)

        return grpc.stream_unary_rpc_method_handler(
            serve, request_deserializer=None, response_serializer=handler.response_serializer)
