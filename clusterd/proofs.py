"""Proof of the cluster secret on every RPC: made by clients, checked by nodes.

The proof is an HMAC, never the secret itself:

    x-clusterd-proof: v2.<node id>.<boot id>.<unix ms>.<nonce>.<MAC>
    MAC = HMAC-SHA256(key, "v2|method|node id|boot id|ms|nonce")

Why not send the secret as a bearer token? Without TLS, gRPC travels in clear
text; anyone on the same Wi-Fi who sees one request would own the cluster.
The HMAC reveals nothing about the secret and is bound to one method, one
node (its id) and one start of that node (its boot id, new in every daemon
process); it expires after REPLAY_WINDOW_S and each nonce is accepted once.
So a captured proof is refused by every other node, by the same node after a
restart (its nonce log is gone, but so is its boot id), and by the same node
a second time. It does not protect request bodies from an active
man-in-the-middle; that is what TLS is for.

A client learns the (node id, boot id) to bind to from the node's `Hello`,
the one call that needs no proof (it only says what the mDNS record says).
AuthClientInterceptor asks once per channel and again, retrying the call
once, when the node says the proof was made for another boot.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import grpc

log = logging.getLogger("clusterd.security")

SECRET_ENV = "CLUSTERD_SECRET"
PROOF_HEADER = "x-clusterd-proof"
PROOF_VERSION = "v2"
HELLO_METHOD = "/clusterd.v1.Node/Hello"
# Macs keep their clocks within a second of each other by NTP; two minutes
# leaves room for a Mac that was asleep, yet bounds the nonce memory.
REPLAY_WINDOW_S = 120.0
MAX_PROOF_CHARS = 512  # a real proof is ~150; anything longer is not one
# Refusals are logged once a minute per source address, and at most this
# many lines a minute in all (a flood from many addresses stays a few lines).
REFUSAL_LOG_PER_MINUTE = 20
# The phrase clients recognise: the proof was bound to another boot or node.
STALE_PHRASE = "proof made for another node or an earlier start of this node"

HOW_TO_SHARE = (
    "run `clusterd secret` on a Mac of the cluster and `clusterd secret --set -` "
    f"on this one (or set {SECRET_ENV} to the same value on every Mac)"
)


@dataclass(frozen=True)
class NodeIdentity:
    """What a proof is bound to: one node, one start of its daemon."""

    node_id: str
    boot_id: str


def new_boot_id() -> str:
    return os.urandom(16).hex()


def _mac_key(secret: str) -> bytes:
    # A derived key, so the raw secret is never an input to anything sent.
    return hmac.new(secret.encode(), b"clusterd rpc proof v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mac(key: bytes, method: str, target: NodeIdentity, millis: str, nonce: str) -> str:
    msg = f"{PROOF_VERSION}|{method}|{target.node_id}|{target.boot_id}|{millis}|{nonce}"
    return _b64(hmac.new(key, msg.encode(), hashlib.sha256).digest())


def make_proof(secret: str, method: str, target: NodeIdentity, *, now: Optional[float] = None,
               nonce: Optional[str] = None) -> str:
    millis = str(int((time.time() if now is None else now) * 1000))
    nonce = nonce or _b64(os.urandom(16))
    mac = _mac(_mac_key(secret), method, target, millis, nonce)
    return f"{PROOF_VERSION}.{target.node_id}.{target.boot_id}.{millis}.{nonce}.{mac}"


# --- server side -----------------------------------------------------------


class _NonceLog:
    """Nonces seen within the replay window. Only proofs whose HMAC verified
    get here, so strangers cannot grow it; entries leave in arrival order."""

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s
        self._seen: set[str] = set()
        self._order: collections.deque[tuple[float, str]] = collections.deque()
        self._lock = threading.Lock()

    def first_use(self, nonce: str, now: float) -> bool:
        with self._lock:
            while self._order and self._order[0][0] < now:
                self._seen.discard(self._order.popleft()[1])
            if nonce in self._seen:
                return False
            self._seen.add(nonce)
            self._order.append((now + self._keep_s, nonce))
            return True


def source_ip(peer: str) -> str:
    """The address part of grpc's peer string ("ipv4:10.0.0.2:5123",
    "ipv6:[::1]:5123"): refusals and limits count per address, not per
    connection, so reconnecting does not reset them."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0].strip("[]")
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return host
    return kind or "unknown"


class RefusalLog:
    """Logs refused calls: once a minute per source address, and at most
    REFUSAL_LOG_PER_MINUTE lines a minute in all."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_sources: int = 4096):
        self._clock = clock
        self._max_sources = max_sources
        self._last: dict[str, float] = {}
        self._minute = (-1e9, 0)  # start of the current minute, lines logged in it
        self._lock = threading.Lock()

    def should_log(self, ip: str) -> bool:
        now = self._clock()
        with self._lock:
            if now - self._last.get(ip, -1e9) < 60:
                return False
            start, count = self._minute
            if now - start >= 60:
                start, count = now, 0
            if count >= REFUSAL_LOG_PER_MINUTE:
                return False
            self._minute = (start, count + 1)
            if len(self._last) >= self._max_sources:
                self._last.clear()  # forget old sources rather than grow
            self._last[ip] = now
            return True

    def refused(self, peer: str, method: str, reason: str) -> None:
        ip = source_ip(peer)
        if self.should_log(ip):
            log.warning("refused %s from %s: %s (further refusals from there are not "
                        "logged for a minute)", method, ip, reason)


@dataclass(frozen=True)
class Refusal:
    reason: str   # a few words, for the log
    message: str  # for the caller: says what is wrong and what to do, echoes nothing


class ProofChecker:
    """Decides whether a call's proof holds for this node (`identity`)."""

    def __init__(self, secret: str, identity: NodeIdentity, *, node_label: str = "this node",
                 window_s: float = REPLAY_WINDOW_S, clock: Callable[[], float] = time.time):
        self._key = _mac_key(secret)
        self.identity = identity
        self._label = node_label
        self._window_s = window_s
        self._clock = clock
        # A nonce must be remembered as long as its timestamp can pass: the
        # timestamp may be up to window_s ahead of now, and stays valid for
        # window_s after that.
        self._nonces = _NonceLog(2 * window_s)

    def _refusal(self, reason: str, text: str) -> Refusal:
        return Refusal(reason, f"clusterd node {self._label}: {text}")

    def check(self, method: str, metadata: Sequence[tuple[str, object]]) -> Optional[Refusal]:
        """None when the proof holds, else why not (safe to show anyone)."""
        values = [v for k, v in metadata if k == PROOF_HEADER]
        if not values:
            return self._refusal("cluster secret missing", (
                "cluster secret missing: the request carried no proof of the cluster "
                f"secret; {HOW_TO_SHARE}"))
        wrong = self._refusal("cluster secret wrong", (
            "cluster secret wrong: the request was signed with a different cluster "
            f"secret than this node's; {HOW_TO_SHARE}"))
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        parts = value.split(".") if len(value) <= MAX_PROOF_CHARS else []
        if len(values) != 1 or len(parts) != 6 or parts[0] != PROOF_VERSION:
            return wrong
        _, node_id, boot_id, millis, nonce, mac = parts
        if (node_id, boot_id) != (self.identity.node_id, self.identity.boot_id):
            return self._refusal("proof for another boot", (
                f"{STALE_PHRASE} (it restarted, or the address now belongs to another "
                "node): ask the node's Hello again and sign for what it says"))
        target = self.identity
        if not hmac.compare_digest(_mac(self._key, method, target, millis, nonce).encode(),
                                   mac.encode()):
            return wrong
        now = self._clock()
        try:
            skew = int(millis) / 1000.0 - now
        except ValueError:
            return wrong
        if abs(skew) > self._window_s:
            return self._refusal("cluster secret proof expired", (
                f"cluster secret proof expired: the clocks of the two Macs differ by "
                f"{abs(skew):.0f} s (at most {self._window_s:.0f} s allowed); turn on "
                "'Set time automatically'"))
        if not self._nonces.first_use(nonce, now):
            return self._refusal("cluster secret proof replayed",
                                 "cluster secret proof replayed: refused")
        return None


class AuthServerInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a valid proof (except the `public` methods)
    with UNAUTHENTICATED, before reading its body: the refusing handler is
    declared request-streaming and never asks for the request, so a refused
    call holds no worker thread past the refusal and its body is never read
    or parsed (grpc reads a unary request before calling the handler)."""

    def __init__(self, secret: str, identity: NodeIdentity, *, node_label: str = "this node",
                 window_s: float = REPLAY_WINDOW_S, clock: Callable[[], float] = time.time,
                 public: Sequence[str] = (HELLO_METHOD,), refusals: Optional[RefusalLog] = None):
        self.checker = ProofChecker(secret, identity, node_label=node_label, window_s=window_s,
                                    clock=clock)
        self._public = frozenset(public)
        self._refusals = refusals or RefusalLog()

    def check(self, method: str, metadata: Sequence[tuple[str, object]]) -> Optional[Refusal]:
        return self.checker.check(method, metadata)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method in self._public:
            return handler
        refusal = self.check(method, handler_call_details.invocation_metadata or ())
        if refusal is None:
            return handler
        return refusing_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED, refusal.message,
            lambda peer: self._refusals.refused(peer, method, refusal.reason))


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
                     on_refuse: Callable[[str], None] = lambda peer: None
                     ) -> grpc.RpcMethodHandler:
    """A handler that answers `code` at once, never reading the request."""

    def refuse(request_iterator, context):
        on_refuse(context.peer())
        context.abort(code, message)

    make = (grpc.stream_stream_rpc_method_handler if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler)
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


# --- client side -----------------------------------------------------------


class _CallDetails(NamedTuple):
    method: str
    timeout: Optional[float]
    metadata: Optional[Sequence[tuple[str, str]]]
    credentials: Optional[grpc.CallCredentials]
    wait_for_ready: Optional[bool]
    compression: Optional[grpc.Compression]


def is_stale_refusal(err: object) -> bool:
    """Did the node refuse a proof made for another of its boots (or another node)?"""
    return (isinstance(err, grpc.RpcError) and isinstance(err, grpc.Call)
            and err.code() == grpc.StatusCode.UNAUTHENTICATED
            and STALE_PHRASE in (err.details() or ""))


class AuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh proof, bound to the target node's identity, to every call.

    `learn(timeout)` returns the target's NodeIdentity (its Hello reply); it
    is asked once, on the first call, and again when the node refuses a proof
    as made for another boot (it restarted), and the call is then made once
    more. Calls that stream requests are not retried (their requests cannot
    be sent twice); the proto has none today."""

    HELLO_TIMEOUT_S = 5.0

    def __init__(self, secret: str, learn: Callable[[Optional[float]], NodeIdentity]) -> None:
        self._secret = secret
        self._learn = learn
        self._identity: Optional[NodeIdentity] = None
        self._lock = threading.Lock()

    def identity(self, timeout: Optional[float], stale: Optional[NodeIdentity] = None
                 ) -> NodeIdentity:
        """The target's identity; asked anew when it is still `stale`."""
        budget = self.HELLO_TIMEOUT_S if timeout is None else min(timeout, self.HELLO_TIMEOUT_S)
        with self._lock:
            if self._identity is None or self._identity == stale:
                self._identity = self._learn(budget)
            return self._identity

    def _sign(self, details, target: NodeIdentity) -> _CallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != PROOF_HEADER]
        metadata.append((PROOF_HEADER, make_proof(self._secret, method, target)))
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        try:
            target = self.identity(client_call_details.timeout)
        except grpc.RpcError as e:
            return e  # grpc's error is also a finished call: raised to the caller
        outcome = continuation(self._sign(client_call_details, target), request)
        # Only a finished call can be retried here (a .future() still in
        # flight is returned as it is).
        if outcome.done() and is_stale_refusal(outcome):
            try:
                target = self.identity(client_call_details.timeout, stale=target)
            except grpc.RpcError as e:
                return e
            outcome = continuation(self._sign(client_call_details, target), request)
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):
        def start(stale: Optional[NodeIdentity]):
            target = self.identity(client_call_details.timeout, stale=stale)
            return target, continuation(self._sign(client_call_details, target), request)

        return _RetryingStream(start)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        target = self.identity(client_call_details.timeout)
        return continuation(self._sign(client_call_details, target), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        target = self.identity(client_call_details.timeout)
        return continuation(self._sign(client_call_details, target), request_iterator)


class _RetryingStream:
    """A response stream that, when the node refuses the proof as made for
    another boot before the first message, learns the node anew and calls
    once more. Otherwise it is the grpc call itself (iterator and Call)."""

    def __init__(self, start):
        self._start = start
        self._error: Optional[grpc.RpcError] = None
        self._retried = False
        self._received = False
        try:
            self._target, self._call = start(None)
        except grpc.RpcError as e:  # Hello failed: the call fails with its error
            self._target, self._call, self._error = None, None, e

    def __iter__(self):
        return self

    def __next__(self):
        if self._error is not None:
            raise self._error
        try:
            item = next(self._call)
        except grpc.RpcError as e:
            if self._received or self._retried or not is_stale_refusal(e):
                raise
            self._retried = True
            self._target, self._call = self._start(self._target)
            item = next(self._call)
        self._received = True
        return item

    def cancel(self) -> bool:
        return self._call.cancel() if self._call is not None else False

    def __getattr__(self, name):
        if self._call is None:
            return getattr(self._error, name)
        return getattr(self._call, name)
