"""What the node refuses before it computes: one rule for activations,
whether they come from the coordinator (Forward) or a link, and for
OpenSession. Every limit comes from the shard's plan (ShardLimits)."""

from __future__ import annotations

import math
from typing import Optional

from clusterd.node.sessions import MAX_ID_CHARS
from clusterd.node.shards import Shard
from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire.tensors import TensorError, check, dtype_name

MAX_DRAFTS = 16
MAX_STOP_IDS = 64
MAX_TIMEOUT_S = 24 * 3600.0


def quoted(text: str, limit: int = 40) -> str:
    """A request string in a message, cut short."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def activation_problem(act: pb.Activation, shard: Shard, raw: Optional[bytes] = None,
                       from_link: bool = False) -> str:
    """What is wrong with an activation for this shard, or ''."""
    lim, stage = shard.limits, shard.stage
    rows, w = len(act.rows), act.width or 1
    if not rows:
        return "" if from_link and act.group else "the activation has no rows"
    if rows > lim.max_sessions:
        return f"{rows} rows, more than the {lim.max_sessions} sessions this shard holds"
    if act.group == 0 and rows != 1:
        return "a prompt chunk (group 0) carries exactly one row"
    if act.drafts > MAX_DRAFTS or act.drafts >= w and act.drafts:
        return f"drafts {act.drafts} must be below the width {w} and at most {MAX_DRAFTS}"
    if len(act.draft_ids) != rows * act.drafts:
        return f"draft_ids has {len(act.draft_ids)} ids, expected rows x drafts = {rows * act.drafts}"
    if w > max(lim.prefill_step, 1 + MAX_DRAFTS) or rows * w > max(lim.prefill_step,
                                                                  lim.max_sessions * (1 + MAX_DRAFTS)):
        return (f"{rows} rows of {w} positions: more than the {lim.prefill_step} positions "
                "an activation may carry on this shard")
    for r in act.rows:
        if not r.session_id or len(r.session_id) > MAX_ID_CHARS:
            return f"session id must be 1-{MAX_ID_CHARS} characters"
        if r.trim > MAX_DRAFTS:
            return f"trim {r.trim} is more than {MAX_DRAFTS}"
        if r.position + w > lim.context:
            return (f"positions {r.position}..{r.position + w} go past the context of "
                    f"{lim.context} tokens this shard was loaded for")
    kind = act.WhichOneof("payload")
    if stage.bounds.first:
        if kind != "tokens":
            return "the first stage takes token ids, not a hidden state"
        ids = act.tokens.ids
        if len(ids) != rows * w:
            return f"{len(ids)} token ids for {rows} rows of width {w}"
        bad = next((i for i in ids if not 0 <= i < stage.vocab_size), None)
        if bad is not None:
            return f"token id {bad} is outside the vocabulary [0, {stage.vocab_size})"
        return ""
    if kind != "hidden":
        return "this stage takes a hidden state, not token ids"
    if raw is None and act.hidden.raw_bytes:
        return "raw_bytes is only for link frames"
    try:
        shape = check(act.hidden, raw)
    except TensorError as e:
        return str(e)
    if tuple(shape) != (rows, w, stage.hidden_size):
        return f"hidden state has shape {list(shape)}, expected [{rows}, {w}, {stage.hidden_size}]"
    if act.hidden.dtype != dtype_name(stage.activation_dtype):
        return f"hidden state is {act.hidden.dtype}, expected {dtype_name(stage.activation_dtype)}"
    return ""


def _address_ok(address: str) -> bool:
    """HOST:PORT (a name, IPv4, or [IPv6]) of reasonable length, port 1-65535."""
    host, _, port = address.rpartition(":")
    if not host or len(address) > 300 or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    if host.startswith("["):
        return host.endswith("]") and all(c in "0123456789abcdefABCDEF:." for c in host[1:-1])
    return all(c.isalnum() or c in "-._" for c in host)


def _finite_range(name: str, v: float, lo: float, hi: float) -> str:
    if not math.isfinite(v) or not lo <= v <= hi:
        return f"{name} must be a finite number in [{lo:g}, {hi:g}] (got {v:g})"
    return ""


def open_session_problem(req: pb.OpenSessionRequest, shard: Shard) -> str:
    """What is wrong with an OpenSession for this shard, or ''."""
    lim, stage = shard.limits, shard.stage
    if not req.session_id or len(req.session_id) > MAX_ID_CHARS:
        return f"session_id must be 1-{MAX_ID_CHARS} characters"
    if len(req.client_id) > MAX_ID_CHARS:
        return f"client_id must be at most {MAX_ID_CHARS} characters"
    if req.next_address and not _address_ok(req.next_address):
        return f"next_address {quoted(req.next_address)} is not HOST:PORT"
    t = req.timeout_seconds
    if t and (not math.isfinite(t) or not 0 < t <= MAX_TIMEOUT_S):
        return f"timeout_seconds must be in (0, {MAX_TIMEOUT_S:g}] (got {t:g})"
    if len(req.prompt) > lim.context:
        return (f"the prompt has {len(req.prompt)} tokens, more than the context of "
                f"{lim.context} this shard was loaded for")
    if any(not 0 <= i < stage.vocab_size for i in req.prompt):
        return f"a prompt token id is outside the vocabulary [0, {stage.vocab_size})"
    if req.draft.kind not in ("", "ngram", "mtp"):
        return f"draft kind {quoted(req.draft.kind)} is not one of ngram, mtp"
    if req.draft.tokens > MAX_DRAFTS:
        return f"draft tokens {req.draft.tokens} is more than {MAX_DRAFTS}"
    if not stage.bounds.last:
        return ""
    if req.max_tokens < 1:
        return "max_tokens must be at least 1"
    if len(req.prompt) + req.max_tokens > lim.context:
        room = lim.context - len(req.prompt)
        return (f"the prompt ({len(req.prompt)} tokens) plus max_tokens ({req.max_tokens}) "
                f"exceed the context of {lim.context}; at most {max(room, 0)} new tokens fit")
    if len(req.stop_token_ids) > MAX_STOP_IDS:
        return f"at most {MAX_STOP_IDS} stop token ids"
    sp = req.sampling
    for problem in (_finite_range("temperature", sp.temperature, 0, 2),
                    _finite_range("top_p", sp.top_p, 0, 1),
                    _finite_range("min_p", sp.min_p, 0, 1),
                    _finite_range("repetition_penalty", sp.repetition_penalty, 0, 10),
                    _finite_range("presence_penalty", sp.presence_penalty, -2, 2),
                    _finite_range("frequency_penalty", sp.frequency_penalty, -2, 2)):
        if problem:
            return problem
    if sp.top_k >= stage.vocab_size:
        return f"top_k must be below the vocabulary size {stage.vocab_size}"
    if sp.has_seed and sp.seed >= 2**63:
        return "seed must be below 2**63"
    return ""
