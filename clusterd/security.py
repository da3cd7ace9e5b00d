"""The cluster secret (where it is kept, how it is shared) and optional TLS.
The proof of the secret that every RPC carries is in clusterd/proofs.py."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import grpc

from clusterd.home import clusterd_home
from clusterd.proofs import (HOW_TO_SHARE, SECRET_ENV, STALE_PHRASE, AuthClientInterceptor,
                             NodeIdentity)

SECRET_FILE = "secret"
MIN_SECRET_CHARS = 16
# All TLS certificates of a cluster are checked against this name, not the
# node's IP: nodes are found by address (mDNS, DHCP), and addresses change.
TLS_SERVER_NAME = "clusterd"

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


def is_auth_error(err: BaseException) -> bool:
    return isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAUTHENTICATED


def explain_rpc_error(err: grpc.RpcError, node: str) -> str:
    """One line for a user, naming the node: what went wrong and what to do."""
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if "secret missing" in details:
            what = "refused the request: the cluster secret is missing on this side"
        elif STALE_PHRASE in details:
            return (f"node {node} refused the request: it was signed for an earlier start "
                    "of the node (or another node at that address), and asking the node "
                    "again did not help; retry in a moment")
        elif "expired" in details or "replayed" in details:
            what = f"refused the request: {details.split(': ', 1)[-1]}"
        else:
            what = "refused the request: this Mac's cluster secret differs from the node's"
        return f"node {node} {what}; {HOW_TO_SHARE}"
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

    def interceptors(self, learn: Callable[[Optional[float]], NodeIdentity]
                     ) -> tuple[grpc.ClientInterceptor, ...]:
        """The proof-adding interceptor, bound to the node `learn` describes
        (see AuthClientInterceptor); none without a secret."""
        return (AuthClientInterceptor(self.secret, learn),) if self.secret else ()
