"""Error text that is safe to send back: request strings quoted and cut
short (a request cannot make a reply exceed gRPC's metadata limit, or echo
a megabyte back), and whole messages bounded."""

QUOTE_CHARS = 80
MESSAGE_CHARS = 1000


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr() of a request string, cut to about `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} characters)"
    return repr(text)


def bounded(message: str, limit: int = MESSAGE_CHARS) -> str:
    """A whole message, cut to `limit` characters."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
