"""The wire contract (protos/clusterd.proto) and its generated stubs."""

PROTOCOL_VERSION = 2
