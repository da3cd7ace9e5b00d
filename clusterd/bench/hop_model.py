"""A model at R1's width (7168) whose layers are nearly free to run.

The hop measurement needs real daemons holding real stages that accept a
hidden vector of R1's width; with tiny inner dimensions (one attention head,
16-wide projections, dense MLPs, 256-token vocabulary) a stage's compute is a
fraction of a millisecond, so what the measurement sees is the hop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

R1_HIDDEN = 7168
HOP_LAYERS = 3  # first, middle and last stage: the middle one takes and sends hidden states


def hop_config(hidden: int = R1_HIDDEN) -> dict:
    from clusterd.models.synthetic import synthetic_config

    config = synthetic_config("deepseek_v3", "tiny", num_layers=HOP_LAYERS)
    config.update({
        "hidden_size": hidden,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        # 16-wide everywhere, unquantized: ~1 ms a layer on a CPU core, where
        # 64-wide 4-bit layers took ~3 ms.
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
        "intermediate_size": 16,
        "first_k_dense_replace": HOP_LAYERS,  # no experts: nothing to route
        "vocab_size": 256,
    })
    return config


def build_hop_model(hidden: int = R1_HIDDEN, root: Optional[Path] = None,
                    dtype: str = "float32") -> Path:
    """Build (or reuse) the hop model: float32 like every synthetic CPU model,
    or bfloat16 as real checkpoints (the hop then carries 2 bytes a value)."""
    from clusterd.models.synthetic import default_root

    config = {**hop_config(hidden), "torch_dtype": dtype}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(root) if root is not None else default_root()
    final = root / f"hop-deepseek_v3-h{hidden}-{digest}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{final.name}-", dir=root))
    try:
        tmp.chmod(0o755)
        _write(tmp, config)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # someone else published it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write(path: Path, config: dict) -> None:
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config

    from clusterd.models.synthetic_init import init_weights

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    init_weights(model, 0, config)
    weights = {k: v.astype(getattr(mx, config["torch_dtype"]))
               for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, path / "config.json")
