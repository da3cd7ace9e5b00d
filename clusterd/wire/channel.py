"""The one place client channels are made, so every client gets the same
options (message size, keepalive) and the same credentials."""

from typing import Optional, Sequence

import grpc

from clusterd.security import ClientSecurity, channel_credentials, tls_channel_options

# A prefill chunk of R1 is 2048 x 7168 bf16 values (28 MiB); allow headroom.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def open_channel(
    address: str,
    interceptors: Sequence[object] = (),
    security: Optional[ClientSecurity] = None,
) -> grpc.Channel:
    """`security` None: the cluster secret (and TLS files) of this Mac's
    clusterd folder or environment, so every client proves the secret."""
    if security is None:
        security = ClientSecurity.from_environment()
    if security.tls.client_enabled:
        channel = grpc.secure_channel(address, channel_credentials(security.tls),
                                      options=CHANNEL_OPTIONS + tls_channel_options())
    else:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    interceptors = (*security.interceptors(), *interceptors)
    if interceptors:
        channel = grpc.intercept_channel(channel, *interceptors)
    return channel
