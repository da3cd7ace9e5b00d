"""What every drafter hands the verifier, and how a drafter says it cannot draft."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the coordinator and the planner import the errors without mlx
    import mlx.core as mx


class DrafterUnavailable(RuntimeError):
    """A drafter that cannot be used for this model or node. The executor catches it,
    says the message, and drafts by prompt lookup instead."""


class MtpUnavailable(DrafterUnavailable):
    """The model's multi-token-prediction layer cannot be used: its files are not on
    this node, the checkpoint has none, or the conversion failed (the message says which)."""


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...]
    # [len(tokens), vocab] float32 log-probabilities the tokens were drawn from; None when
    # the tokens are deterministic (greedy, prompt lookup), i.e. q is one-hot.
    logprobs: Optional[mx.array] = None
    key: Optional[mx.array] = None  # the session key after the drafter's own draws
