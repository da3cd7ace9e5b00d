"""The one place gRPC channels and the node's server options are made, so
clients and servers agree on message size and keepalive, and every client
proves the cluster secret to the node it talks to."""

import os
from typing import Optional, Sequence

import grpc

from clusterd.proofs import HELLO_METHOD, NodeIdentity
from clusterd.security import ClientSecurity, channel_credentials, tls_channel_options
from clusterd.wire import clusterd_pb2 as pb

# The largest legitimate message is a prefill chunk between stages:
# prefill_step_size x hidden_size values. At 2048 tokens x 8192 (the widest
# model in the catalog, Llama 70B; R1 is 7168) x 4 bytes (float32, the widest
# activation dtype) that is 64 MiB; 1 MiB more for the envelope. Anything
# larger is refused by grpc from the message's length prefix.
PREFILL_STEP_MAX = 2048
HIDDEN_MAX = 8192
MAX_MESSAGE_BYTES = PREFILL_STEP_MAX * HIDDEN_MAX * 4 + 2**20

# Clients ping an idle connection every KEEPALIVE_S (a NAT or Wi-Fi that drops
# idle flows is noticed); the server accepts pings twice as often as that, so
# a client within the rule is never sent GOAWAY too_many_pings (grpc's
# default server minimum is 5 minutes, which killed idle streams after ~50 s).
KEEPALIVE_ENV = "CLUSTERD_KEEPALIVE_S"
KEEPALIVE_S = 10.0


def keepalive_s() -> float:
    """$CLUSTERD_KEEPALIVE_S (same on every Mac), else 10 s."""
    try:
        value = float(os.environ.get(KEEPALIVE_ENV, KEEPALIVE_S))
    except ValueError:
        return KEEPALIVE_S
    return value if 0.1 <= value <= 3600 else KEEPALIVE_S


def channel_options(keepalive: Optional[float] = None) -> list[tuple[str, int]]:
    ms = int(1000 * (keepalive or keepalive_s()))
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", max(ms // 2, 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(keepalive: Optional[float] = None) -> list[tuple[str, int]]:
    ms = int(1000 * (keepalive or keepalive_s()))
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # A port already in use is an error, not a second listener sharing it.
        ("grpc.so_reuseport", 0),
        # Clients' pings, with or without calls, at most twice as often as they
        # send them. (This is grpc's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS;
        # "min_recv_ping_interval..." is not a name grpc knows and is ignored.)
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms // 2),
        ("grpc.http2.max_ping_strikes", 2),
        # The server pings too, so a coordinator that vanished without closing
        # its connection (asleep, unplugged) is noticed and its sessions freed.
        ("grpc.keepalive_time_ms", 3 * ms),
        ("grpc.keepalive_timeout_ms", max(ms, 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def hello(channel: grpc.Channel, timeout: Optional[float] = 5.0) -> pb.HelloReply:
    """The node's Hello over a channel without proofs (Hello needs none)."""
    call = channel.unary_unary(HELLO_METHOD, request_serializer=pb.HelloRequest.SerializeToString,
                               response_deserializer=pb.HelloReply.FromString)
    return call(pb.HelloRequest(), timeout=timeout)


def open_channel(
    address: str,
    interceptors: Sequence[object] = (),
    security: Optional[ClientSecurity] = None,
) -> grpc.Channel:
    """A channel whose calls carry proofs bound to the node at `address`: it
    asks the node's Hello on the first call, and again when the node
    restarted. `security` None: the cluster secret (and TLS files) of this
    Mac's clusterd folder or environment."""
    if security is None:
        security = ClientSecurity.from_environment()
    if security.tls.client_enabled:
        raw = grpc.secure_channel(address, channel_credentials(security.tls),
                                  options=channel_options() + tls_channel_options())
    else:
        raw = grpc.insecure_channel(address, options=channel_options())

    def learn(timeout: Optional[float]) -> NodeIdentity:
        reply = hello(raw, timeout)
        return NodeIdentity(reply.node_id, reply.boot_id)

    interceptors = (*security.interceptors(learn), *interceptors)
    return grpc.intercept_channel(raw, *interceptors) if interceptors else raw
