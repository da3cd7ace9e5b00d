"""The cluster secret, proof of it on every RPC, and optional TLS.

Every node refuses every RPC that does not carry proof of the cluster secret.
The proof is an HMAC, not the secret itself:

    x-clusterd-proof: v1.<unix ms>.<nonce>.<HMAC-SHA256(key, "v1|method|ms|nonce")>

Why not send the secret as a bearer token? Without TLS, gRPC travels in clear
text; anyone on the same Wi-Fi who sees one request would own the cluster
forever. An HMAC over (method, timestamp, nonce) reveals nothing about the
secret, is bound to one method, expires after REPLAY_WINDOW_S, and each nonce
is accepted once, so a captured proof cannot be replayed. It does not protect
request bodies from an active man-in-the-middle; that is what TLS is for.
The cost is one HMAC-SHA256 (about a microsecond) per call.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import grpc

from clusterd.home import clusterd_home

log = logging.getLogger(__name__)

SECRET_ENV = "CLUSTERD_SECRET"
SECRET_FILE = "secret"
PROOF_HEADER = "x-clusterd-proof"
PROOF_VERSION = "v1"
# Macs keep their clocks within a second of each other by NTP; two minutes
# leaves room for a Mac that was asleep, yet bounds the nonce memory.
REPLAY_WINDOW_S = 120.0
MIN_SECRET_CHARS = 16
# All TLS certificates of a cluster are checked against this name, not the
# node's IP: nodes are found by address (mDNS, DHCP), and addresses change.
TLS_SERVER_NAME = "clusterd"

_HOW_TO_SHARE = (
    "run `clusterd secret` on a Mac of the cluster and `clusterd secret --set -` "
    f"on this one (or set {SECRET_ENV} to the same value on every Mac)"
)


class SecretError(Exception):
    """The cluster secret is missing, unreadable or unusable."""


def secret_path(home: Path) -> Path:
    return Path(home) / SECRET_FILE


def generate_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def _check_secret(value: str, origin: str) -> str:
    value = value.strip()
    if len(value) < MIN_SECRET_CHARS:
        # A short secret is guessable offline from one captured proof.
        raise SecretError(
            f"the cluster secret from {origin} is too short "
            f"(at least {MIN_SECRET_CHARS} characters needed)"
        )
    if any(c.isspace() for c in value) or not value.isascii():
        raise SecretError(f"the cluster secret from {origin} must be printable ASCII without spaces")
    return value


def load_secret(home: Path, *, create: bool) -> Optional[str]:
    """`$CLUSTERD_SECRET`, else `<home>/secret`; with `create`, a new random
    secret is written there (mode 0600) when neither exists. None when there
    is none and `create` is False."""
    env = os.environ.get(SECRET_ENV)
    if env is not None and env.strip():
        return _check_secret(env, f"${SECRET_ENV}")
    path = secret_path(home)
    try:
        return _read_secret_file(path)
    except FileNotFoundError:
        if not create:
            return None
    try:
        store_secret(home, generate_secret(), exclusive=True)
    except FileExistsError:
        pass  # another process created it first: use theirs
    return _read_secret_file(path)


def _read_secret_file(path: Path) -> str:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        # Same rule as ssh with private keys: readable by others means leaked.
        raise SecretError(
            f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`"
        )
    return _check_secret(path.read_text(encoding="ascii", errors="replace"), str(path))


def store_secret(home: Path, value: str, *, exclusive: bool = False) -> Path:
    """Write the secret atomically with mode 0600 (never world-readable, not
    even for an instant)."""
    value = _check_secret(value, "the given value")
    path = secret_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole to a private temporary file, then put in place in one
    # step, so no reader ever sees a half-written secret.
    tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(value + "\n")
        if exclusive:
            os.link(tmp, path)  # FileExistsError when another process was first
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fingerprint(secret: str) -> str:
    """A short, non-reversible tag to tell secrets apart in messages
    ("this Mac has secret 3f2a9c…") without revealing them."""
    return hashlib.sha256(b"clusterd-fingerprint|" + secret.encode()).hexdigest()[:8]


def _mac_key(secret: str) -> bytes:
    # A derived key, so the raw secret is never an input to anything sent.
    return hmac.new(secret.encode(), b"clusterd rpc proof v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mac(key: bytes, method: str, millis: str, nonce: str) -> str:
    msg = f"{PROOF_VERSION}|{method}|{millis}|{nonce}".encode()
    return _b64(hmac.new(key, msg, hashlib.sha256).digest())


def make_proof(secret: str, method: str, *, now: Optional[float] = None, nonce: Optional[str] = None) -> str:
    millis = str(int((time.time() if now is None else now) * 1000))
    nonce = nonce or _b64(os.urandom(16))
    return f"{PROOF_VERSION}.{millis}.{nonce}.{_mac(_mac_key(secret), method, millis, nonce)}"


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


class AuthServerInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a valid proof with UNAUTHENTICATED and a
    message that says whether the proof was missing or wrong, naming the node
    (`node_label`) but never echoing what was received."""

    def __init__(
        self,
        secret: str,
        *,
        node_label: str = "this node",
        window_s: float = REPLAY_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = _mac_key(secret)
        self._label = node_label
        self._window_s = window_s
        self._clock = clock
        # A nonce must be remembered as long as its timestamp can pass: the
        # timestamp may be up to window_s ahead of now, and stays valid for
        # window_s after that.
        self._nonces = _NonceLog(2 * window_s)
        self._logged: dict[str, float] = {}  # peer -> last refusal logged
        self._log_lock = threading.Lock()

    def _log_refusal(self, peer: str, method: str, message: str) -> None:
        # Once a minute per peer: a stranger hammering the port cannot flood the log.
        now = time.monotonic()
        with self._log_lock:
            if now - self._logged.get(peer, -1e9) < 60:
                return
            if len(self._logged) > 1024:
                self._logged.clear()
            self._logged[peer] = now
        reason = message.split(": ", 2)[1] if message.count(": ") >= 2 else "refused"
        log.warning("refused %s from %s: %s", method, peer, reason)

    def check(self, method: str, metadata: Sequence[tuple[str, object]]) -> Optional[str]:
        """None when the proof holds, else why not (safe to show anyone)."""
        values = [v for k, v in metadata if k == PROOF_HEADER]
        if not values:
            return (
                f"clusterd node {self._label}: cluster secret missing: the request "
                f"carried no proof of the cluster secret; {_HOW_TO_SHARE}"
            )
        wrong = (
            f"clusterd node {self._label}: cluster secret wrong: the request was "
            f"signed with a different cluster secret than this node's; {_HOW_TO_SHARE}"
        )
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        parts = value.split(".")
        if len(values) != 1 or len(parts) != 4 or parts[0] != PROOF_VERSION:
            return wrong
        _, millis, nonce, mac = parts
        if not hmac.compare_digest(_mac(self._key, method, millis, nonce).encode(), mac.encode()):
            return wrong
        now = self._clock()
        try:
            skew = int(millis) / 1000.0 - now
        except ValueError:
            return wrong
        if abs(skew) > self._window_s:
            return (
                f"clusterd node {self._label}: cluster secret proof expired: the "
                f"clocks of the two Macs differ by {abs(skew):.0f} s (at most "
                f"{self._window_s:.0f} s allowed); turn on 'Set time automatically'"
            )
        if not self._nonces.first_use(nonce, now):
            return f"clusterd node {self._label}: cluster secret proof replayed: refused"
        return None

    def intercept_service(self, continuation, handler_call_details):
        refusal = self.check(handler_call_details.method, handler_call_details.invocation_metadata or ())
        handler = continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        method = handler_call_details.method
        return _refusing_handler(handler, refusal,
                                 lambda peer: self._log_refusal(peer, method, refusal))


def _refusing_handler(handler: grpc.RpcMethodHandler, message: str,
                      on_refuse: Callable[[str], None] = lambda peer: None) -> grpc.RpcMethodHandler:
    def refuse(request_or_iterator, context):
        on_refuse(context.peer())
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No request_deserializer: the body of an unauthenticated request is never
    # parsed, so strangers cannot reach the protobuf parser or the servicer.
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


# --- client side -----------------------------------------------------------


class _CallDetails(NamedTuple):
    method: str
    timeout: Optional[float]
    metadata: Optional[Sequence[tuple[str, str]]]
    credentials: Optional[grpc.CallCredentials]
    wait_for_ready: Optional[bool]
    compression: Optional[grpc.Compression]


class AuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh proof of the cluster secret to every call."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def _sign(self, details):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != PROOF_HEADER]
        metadata.append((PROOF_HEADER, make_proof(self._secret, method)))
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._sign(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._sign(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._sign(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._sign(client_call_details), request_iterator)


def is_auth_error(err: BaseException) -> bool:
    return isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAUTHENTICATED


def explain_rpc_error(err: grpc.RpcError, node: str) -> str:
    """One line for a user, naming the node: what went wrong and what to do."""
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if "secret missing" in details:
            what = "refused the request: the cluster secret is missing on this side"
        elif "expired" in details or "replayed" in details:
            what = f"refused the request: {details.split(': ', 1)[-1]}"
        else:
            what = "refused the request: this Mac's cluster secret differs from the node's"
        return f"node {node} {what}; {_HOW_TO_SHARE}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"node {node} is unreachable ({details or 'connection failed'})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"node {node} did not answer in time"
    return f"node {node} failed: {code.name}: {details}"


# --- TLS -------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS. Every node presents `cert`/`key`; every client
    (the coordinator, and each node calling the next stage) checks it against
    `ca`. One cluster-wide self-signed certificate with subjectAltName
    DNS:clusterd works as both cert and CA (see the README, "TLS")."""

    cert: Optional[Path] = None
    key: Optional[Path] = None
    ca: Optional[Path] = None

    @property
    def server_enabled(self) -> bool:
        return self.cert is not None and self.key is not None

    @property
    def client_enabled(self) -> bool:
        return self.ca is not None


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SecretError(f"cannot read TLS {what} {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise SecretError(f"TLS {what} {path} is not a PEM file")
    return data


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    if not tls.server_enabled:
        raise SecretError("TLS for `clusterd up` needs both --tls-cert and --tls-key")
    cert = _read_pem(tls.cert, "certificate")
    key = _read_pem(tls.key, "key")
    return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    if tls.ca is None:
        raise SecretError("TLS for clients needs --tls-ca (the CA or the cluster certificate)")
    return grpc.ssl_channel_credentials(root_certificates=_read_pem(tls.ca, "CA certificate"))


def tls_channel_options() -> list[tuple[str, str]]:
    # Check the certificate against the cluster name, not the dialled IP.
    return [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]


TLS_DIR = "tls"
TLS_ENV = {"cert": "CLUSTERD_TLS_CERT", "key": "CLUSTERD_TLS_KEY", "ca": "CLUSTERD_TLS_CA"}


def tls_from_environment(home: Path, **given: Optional[Path]) -> TlsFiles:
    """TLS files: given paths (flags) first, then $CLUSTERD_TLS_CERT/KEY/CA,
    then cert.pem/key.pem/ca.pem in <home>/tls. Copying that folder to each
    Mac, like the secret, turns TLS on everywhere."""
    found: dict[str, Optional[Path]] = {}
    for part, env in TLS_ENV.items():
        value = given.get(part) or os.environ.get(env)
        default = Path(home) / TLS_DIR / f"{part}.pem"
        found[part] = Path(value) if value else (default if default.exists() else None)
    if found["ca"] is None and found["cert"] is not None:
        # A cluster-wide self-signed certificate is its own CA.
        found["ca"] = found["cert"]
    return TlsFiles(**found)


@dataclass(frozen=True)
class ClientSecurity:
    """What a client needs to talk to nodes: the secret, and TLS if used."""

    secret: Optional[str] = field(default=None, repr=False)
    tls: TlsFiles = TlsFiles()

    @classmethod
    def from_environment(cls, home: Optional[Path] = None) -> "ClientSecurity":
        """This Mac's secret ($CLUSTERD_SECRET or the clusterd folder; never
        created here: a client inventing a secret could only mismatch)."""
        home = clusterd_home() if home is None else home
        return cls(load_secret(home, create=False), tls_from_environment(home))

    def interceptors(self) -> tuple[grpc.ClientInterceptor, ...]:
        return (AuthClientInterceptor(self.secret),) if self.secret else ()
