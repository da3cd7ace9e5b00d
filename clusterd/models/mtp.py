"""DeepSeek-V3/R1's multi-token-prediction (MTP) module as a drafter.

The module (DeepSeek-V3 technical report, section 2.2; the checkpoint's model.layers.61):
given the main model's hidden state h_i at position i and the token t_{i+1} that follows
it, it predicts t_{i+2}:

    x   = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])     embedding first, then hidden
    x   = decoder_layer(x)                                  one more MLA + MoE layer
    g   = shared_head.norm(x)
    p   = softmax(head(g))                                  the main model's head

Which h: the main model's last hidden state AFTER its final norm (model.norm), the state
its own head reads. vLLM's deepseek_mtp.py takes `previous_hidden_states` from the target
model's forward, which in deepseek_v2.py ends with `hidden_states, _ = self.norm(...)`;
SGLang's deepseek_nextn.py reads `spec_info.hidden_states`, the state its logits
processor was given (after model.norm); and DeepSeek's own modeling_deepseek.py (shipped
with R1-0528 MTP repackagings) hands `self.norm(hidden_states)` to the MTP layer (ROCm
ATOM PR #1764 quotes it). The concatenation order [embedding; hidden] is vLLM's and
SGLang's, which the checkpoint's eh_proj was loaded with. Chaining (k > 1) feeds g back
as the next step's h (the post-norm state, as vLLM PR #47448 and ATOM #1764 settled).
vLLM also zeroes the embedding at position 0; SGLang does not; neither changes the
verified output, only acceptance, and this follows SGLang.

The decoder layer, norms and linear layers are mlx-lm's own classes; the converted
weights come from mtp_convert.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.deepseek_v3 import DeepseekV3DecoderLayer, ModelArgs
from mlx_lm.utils import infer_quant_config

from clusterd.models.files import FileCheckError, check_safetensors, read_weight_map
from clusterd.models.mtp_files import (EMBED_PREFIX, SOURCE_FILE, WEIGHTS_FILE, MtpSource,
                                       mtp_layer_index)
from clusterd.speculative.drafts import Draft, MtpUnavailable
from clusterd.speculative.sampling import SamplingParams, draw, next_key, probabilities

# Up to this many new positions are fed one at a time (see MtpDrafter._feed).
ONE_BY_ONE = 8
Embed = Callable[[mx.array], mx.array]  # token ids [1, n] -> [1, n, hidden]
Head = Callable[[mx.array], mx.array]  # normed hidden [..., hidden] -> logits [..., vocab]


class _SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # Only the norm: the head itself is the main model's (the checkpoint's
        # shared_head.head is a copy of lm_head).
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class MtpModule(nn.Module):
    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        hidden = args.hidden_size
        self.enorm = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = DeepseekV3DecoderLayer(args, layer_index)
        self.shared_head = _SharedHead(args)

    def __call__(self, hidden: mx.array, embedded: mx.array, cache: KVCache) -> mx.array:
        """[1, n, H] post-norm hidden states and [1, n, H] embeddings of the tokens that
        followed them -> [1, n, H] normed states (head input, and next step's hidden)."""
        x = self.eh_proj(mx.concatenate([self.enorm(embedded), self.hnorm(hidden)], axis=-1))
        mask = create_attention_mask(x, cache, return_array=True)  # MLA adds scores to it
        return self.shared_head.norm(self.layer(x, mask, cache=cache))


class MtpState:
    """Per session: the MTP layer's own KV cache (a plain mlx-lm KVCache) and how many of
    its last positions are chained drafts, dropped at the next call.

    Invariant the executor keeps: after each call, `offset` equals the main model's
    cache offset (the MTP layer has seen every accepted position and nothing else)."""

    def __init__(self) -> None:
        self.cache = KVCache()
        self.pending = 0

    @property
    def offset(self) -> int:
        return self.cache.offset - self.pending

    def rewind(self, length: int) -> None:
        """Forget positions >= length (a session cut back for any other reason)."""
        if not 0 <= length <= self.cache.offset:
            raise ValueError(f"cannot rewind an MTP cache of {self.cache.offset} positions "
                             f"to {length}")
        self.cache.trim(self.cache.offset - length)
        self.pending = 0


class MtpDrafter:
    """Drafts with the MTP module, sharing the main model's embedding and head."""

    def __init__(self, module: MtpModule, embed: Embed, head: Head):
        self.module, self.embed, self.head = module, embed, head
        self.hidden_size = module.eh_proj.weight.shape[0]

    @classmethod
    def load(cls, folder: Path, main_config: dict, embed: Embed, head: Head) -> "MtpDrafter":
        return cls(load_module(folder, main_config), embed, head)

    def new_state(self) -> MtpState:
        return MtpState()

    def extend(self, state: MtpState, hidden: mx.array, tokens: Sequence[int]) -> None:
        """Feed positions without drafting (prompt chunks whose next tokens are known)."""
        self.draft(state, hidden, tokens, k=0)

    def draft(self, state: MtpState, hidden: mx.array, tokens: Sequence[int], k: int = 1,
              params: SamplingParams = SamplingParams(),
              key: Optional[mx.array] = None) -> Draft:
        """Feed n new positions and propose k tokens after the last one.

        hidden: [n, H] or [1, n, H], the main model's post-final-norm hidden states at the
        n positions the MTP layer has not seen (state.offset .. state.offset + n - 1), all
        of them accepted; tokens: the n tokens that followed them (for a trip that accepted
        a drafts: its a drafts and the target's own token). k = 1 is what the module was
        trained for; k > 1 chains it on its own output. Greedy params: argmax drafts,
        Draft.logprobs None. Sampling: drafts drawn from the sampler's distribution of the
        MTP logits (same filters and temperature), their log-probs in Draft.logprobs [k, V]
        for verify(); key is the session's key, returned advanced in Draft.key.

        A prompt is fed in the chunks the stage prefills it with (extend), its last position
        with the sampled first token here: the layer's own attention works like the main
        model's, so a whole long prompt at once costs what a whole-prompt prefill would."""
        h = hidden.reshape(1, -1, hidden.shape[-1]) if hidden.ndim == 2 else hidden
        n = h.shape[1]
        if len(tokens) != n or n == 0:
            raise ValueError(f"{n} hidden states need as many next tokens, got {len(tokens)}")
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states of size {h.shape[-1]}, the MTP layer takes "
                             f"{self.hidden_size}")
        if not params.greedy and k and key is None:
            raise ValueError("drafting at temperature > 0 needs the session's random key")
        state.cache.trim(state.pending)
        state.pending = 0
        g = self._feed(h, [int(t) for t in tokens], state.cache)
        drafts, qs = [], []
        for i in range(k):
            logits = self.head(g)[0].astype(mx.float32)  # [1, V]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if params.greedy:
                d = mx.argmax(logprobs, axis=-1)
            else:
                key, sub = next_key(key)
                d = draw(logprobs, params, sub)
                qs.append(mx.log(probabilities(logprobs, params))[0])
            drafts.append(d)
            if i + 1 < k:  # chained: the draft position enters the cache, to be dropped
                g = self.module(g, self.embed(d[None]), state.cache)
                state.pending += 1
        q = mx.stack(qs) if qs else None
        mx.eval([*drafts, *([q] if q is not None else []), *_cache_arrays(state.cache)])
        return Draft(tuple(int(d.item()) for d in drafts), q, key)

    def _feed(self, h: mx.array, tokens: list[int], cache: KVCache) -> mx.array:
        """The normed output at the last of the fed positions, [1, 1, H]."""
        embedded = self.embed(mx.array([tokens]))
        if len(tokens) > ONE_BY_ONE:
            return self.module(h, embedded, cache)[:, -1:]
        # mlx-lm's MLA attention takes its absorbed path only for one position; a chunk
        # re-expands the whole latent cache per head, which for a trip's few accepted
        # positions costs more than feeding them one by one.
        for i in range(len(tokens)):
            g = self.module(h[:, i:i + 1], embedded[:, i:i + 1], cache)
        return g


def load_module(folder: Path, main_config: dict) -> MtpModule:
    """The converted module of mtp_convert.py, quantized as it was saved."""
    folder = Path(folder)
    source = MtpSource.read(folder)
    weights_file = folder / WEIGHTS_FILE
    if source is None or not weights_file.is_file():
        raise MtpUnavailable(f"{folder} holds no converted MTP layer ({SOURCE_FILE} and "
                             f"{WEIGHTS_FILE} expected)")
    try:
        check_safetensors(weights_file)
        weights = mx.load(str(weights_file))
    except (FileCheckError, RuntimeError, ValueError) as e:
        raise MtpUnavailable(f"the converted MTP layer in {folder} cannot be read: {e}") from None
    layer = mtp_layer_index({**main_config, "num_nextn_predict_layers": 1})
    if source.layer != layer:
        raise MtpUnavailable(f"{folder} holds an MTP layer for a {source.layer}-layer model, "
                             f"this model has {layer} layers")
    module = MtpModule(ModelArgs.from_dict(main_config), layer)
    _quantize_as_saved(module, weights)
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MtpUnavailable(f"the converted MTP layer in {folder} does not fit this model: "
                             f"{e}") from None
    module.eval()
    mx.eval(module.parameters())
    return module


def _quantize_as_saved(module: nn.Module, weights: dict) -> None:
    # As stage loading and mlx-lm's load_model: quantized where the file has scales.
    def predicate(path: str, m: nn.Module):
        if not hasattr(m, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, m, weights)

    nn.quantize(module, class_predicate=predicate)


def load_main_embedding(model_dir: Path) -> nn.Module:
    """The converted model's embedding (quantized as stored), for the last stage, which
    does not otherwise hold it."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
        weight_map = read_weight_map(model_dir)
    except (OSError, ValueError, FileCheckError) as e:
        raise MtpUnavailable(f"cannot read the model in {model_dir}: {e}") from None
    files = sorted({f for k, f in weight_map.items() if k.startswith(EMBED_PREFIX) or k == "*"})
    weights = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise MtpUnavailable(f"the embedding's weight file {name} is not in {model_dir}")
        weights.update({k[len("model."):]: v for k, v in mx.load(str(path)).items()
                        if k.startswith(EMBED_PREFIX)})
    embed = nn.Embedding(int(config["vocab_size"]), int(config["hidden_size"]))
    if "embed_tokens.scales" in weights:
        embed = embed.to_quantized(**infer_quant_config("embed_tokens", embed, weights))
    holder = nn.Module()
    holder.embed_tokens = embed
    try:
        holder.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MtpUnavailable(f"the embedding in {model_dir} does not fit its config: {e}") from None
    mx.eval(holder.parameters())
    return embed


def _cache_arrays(cache: KVCache) -> list:
    # Evaluated with the drafts, so a k = 0 call does its work now, not in the next trip.
    return [a for a in (cache.keys, cache.values) if a is not None]


def parameter_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))
