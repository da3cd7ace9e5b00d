"""Models known by name: their config.json (shipped, so `clusterd plan` works offline) and the
published mlx-community conversions per quantization.

A data table plus `resolve(name, quant)`. To add a model, put its config.json in
clusterd/models/catalog/ and add a CatalogModel below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from shard_planner.model_spec import Quantization, parse_dtype

CATALOG_DIR = Path(__file__).parent / "catalog"
# mlx_lm.convert's default group size, for quantizations with no published conversion.
MLX_DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class Published:
    """One conversion on the Hugging Face hub."""

    bits: int
    group_size: int
    repo: Optional[str]  # None: no published conversion known; convert it yourself
    verified: bool  # the repository id was seen in public sources (the hub is not reachable here)
    evidence: str = ""


@dataclass(frozen=True)
class CatalogModel:
    name: str
    config_file: str  # file name in CATALOG_DIR
    description: str
    published: tuple[Published, ...]
    aliases: tuple[str, ...] = ()
    default_bits: int = 4
    # The original checkpoint (FP8) the conversions were made from: the only place the
    # multi-token-prediction layer is published (mlx-lm drops it when converting).
    original: Optional[str] = None


CATALOG: dict[str, CatalogModel] = {
    "deepseek-r1": CatalogModel(
        name="deepseek-r1",
        config_file="deepseek-r1.json",  # deepseek-ai/DeepSeek-R1's config.json, unchanged
        description="DeepSeek-R1 671B (MoE, 61 layers, MLA)",
        aliases=("r1", "deepseek-ai/deepseek-r1"),
        original="deepseek-ai/DeepSeek-R1",
        published=(
            # Group size 32 is a judgement: the published sizes of these repositories (390.7 GB
            # for 4-bit, ~336 GB for 3-bit, "126B" tensor elements for 4-bit) match group 32
            # exactly and not 64. A downloaded model's own config.json always wins.
            Published(4, 32, "mlx-community/DeepSeek-R1-4bit", True,
                      "in mlx-swift-examples' model registry and exo's model list"),
            Published(3, 32, "mlx-community/DeepSeek-R1-3bit", True,
                      "default model of mlx-lm's pipeline_generate.py example"),
            Published(8, MLX_DEFAULT_GROUP_SIZE, None, False,
                      "no 8-bit mlx-community conversion found; mlx_lm.convert --q-bits 8"),
        ),
    ),
    # Same architecture and config.json as R1 (V3 is R1's base model; 0528 is a later R1
    # checkpoint): they share R1's shipped config. Group sizes of these conversions are
    # not published where we could read them: V3's follows R1's (same converter, same
    # month), 0528's is mlx_lm.convert's default. A downloaded config.json always wins.
    "deepseek-r1-0528": CatalogModel(
        name="deepseek-r1-0528",
        config_file="deepseek-r1.json",
        description="DeepSeek-R1-0528 671B (R1 architecture, May 2025 checkpoint)",
        aliases=("r1-0528", "deepseek-ai/deepseek-r1-0528"),
        original="deepseek-ai/DeepSeek-R1-0528",
        published=(
            Published(4, MLX_DEFAULT_GROUP_SIZE, "mlx-community/DeepSeek-R1-0528-4bit", True,
                      "in a public project's model table; group size unverified"),
            Published(8, MLX_DEFAULT_GROUP_SIZE, "mlx-community/DeepSeek-R1-0528-8bit", True,
                      "exo's model cards; group size unverified"),
            Published(3, MLX_DEFAULT_GROUP_SIZE, None, False,
                      "no 3-bit mlx-community conversion found; mlx_lm.convert --q-bits 3"),
        ),
    ),
    "deepseek-v3": CatalogModel(
        name="deepseek-v3",
        config_file="deepseek-r1.json",
        description="DeepSeek-V3 671B (R1's base model, same architecture)",
        aliases=("v3", "deepseek-ai/deepseek-v3"),
        original="deepseek-ai/DeepSeek-V3",
        published=(
            Published(4, 32, "mlx-community/DeepSeek-V3-4bit", True,
                      "exo's model list; group size assumed as R1-4bit's"),
            Published(3, 32, "mlx-community/DeepSeek-V3-3bit", True,
                      "exo's model list; group size assumed as R1-3bit's"),
        ),
    ),
}

# The R1 distills: dense Qwen2 / Llama models. Their config.json files here are written
# from the values deepseek-ai published (not downloaded: the hub is unreachable where this
# was written), only the fields mlx-lm and the planner read. Repositories as listed in
# exo's model list (mlx_lm.convert, default group size 64).
_DISTILLS = {
    "deepseek-r1-distill-qwen-1.5b": ("DeepSeek-R1-Distill-Qwen-1.5B", "1.5B dense, Qwen2, 28 layers",
                                      {8: "DeepSeek-R1-Distill-Qwen-1.5B-8bit"}),
    "deepseek-r1-distill-qwen-7b": ("DeepSeek-R1-Distill-Qwen-7B", "7B dense, Qwen2, 28 layers", {}),
    "deepseek-r1-distill-qwen-14b": ("DeepSeek-R1-Distill-Qwen-14B", "14B dense, Qwen2, 48 layers",
                                     {}),
    "deepseek-r1-distill-qwen-32b": ("DeepSeek-R1-Distill-Qwen-32B", "32B dense, Qwen2, 64 layers",
                                     {8: "DeepSeek-R1-Distill-Qwen-32B-MLX-8Bit"}),
    "deepseek-r1-distill-llama-8b": ("DeepSeek-R1-Distill-Llama-8B", "8B dense, Llama, 32 layers",
                                     {}),
    "deepseek-r1-distill-llama-70b": ("DeepSeek-R1-Distill-Llama-70B",
                                      "70B dense, Llama, 80 layers", {}),
}


def _distill(name: str, base: str, what: str, odd: dict[int, str]) -> CatalogModel:
    return CatalogModel(
        name=name,
        config_file=f"{name}.json",
        description=f"{base} ({what}; distilled from R1, not R1)",
        aliases=(f"deepseek-ai/{base.lower()}", name.removeprefix("deepseek-")),
        published=tuple(
            Published(bits, MLX_DEFAULT_GROUP_SIZE,
                      f"mlx-community/{odd.get(bits, f'{base}-{bits}bit')}", True,
                      "exo's model list" + ("; also in several apps' model lists"
                                            if bits == 4 else ""))
            for bits in (4, 3, 6, 8)),
    )


CATALOG.update({name: _distill(name, *entry) for name, entry in _DISTILLS.items()})


class CatalogError(ValueError):
    """An unknown model name or quantization."""


@dataclass(frozen=True)
class Resolved:
    name: str
    config: dict[str, Any]
    quantization: Optional[Quantization]  # None: unquantized in ``dtype``
    dtype: Optional[str]
    repo: Optional[str]
    verified: bool
    note: str

    @property
    def label(self) -> str:
        return self.quantization.label if self.quantization else (self.dtype or "bf16")


def names() -> list[str]:
    return sorted(CATALOG)


def _find(name: str) -> tuple[CatalogModel, Optional[Published]]:
    key = name.strip().lower()
    for model in CATALOG.values():
        if key == model.name or key in model.aliases:
            return model, None
        for pub in model.published:
            if pub.repo and key == pub.repo.lower():
                return model, pub
    raise CatalogError(f"unknown model {name!r}: give a model folder or one of {', '.join(names())}")


def original_repo(name: str) -> Optional[str]:
    """The original checkpoint's repository for a catalog name or a published
    conversion's repository id; None when the catalog knows none."""
    try:
        model, _ = _find(name)
    except CatalogError:
        return None
    return model.original


def load_config(name: str) -> dict[str, Any]:
    model, _ = _find(name)
    config: dict[str, Any] = json.loads((CATALOG_DIR / model.config_file).read_text())
    return config


def resolve(name: str, quant: Optional[str] = None) -> Resolved:
    """A catalog name (or a published repository id) and a quantization such as '4bit',
    '3bit', '4bit-g64' or 'bf16' -> config, exact quantization and repository."""
    model, pub = _find(name)
    config = load_config(model.name)
    if quant is None:
        if pub is not None:
            q = Quantization(pub.bits, pub.group_size)
            return Resolved(model.name, config, q, None, pub.repo, pub.verified, pub.evidence)
        quant = f"{model.default_bits}bit"
    dtype = parse_dtype(quant)
    if dtype is not None:
        return Resolved(model.name, config, None, dtype, None, False,
                        "unquantized; no published conversion")
    text = quant.strip().lower()
    explicit_group = "-g" in text
    try:
        q = Quantization.parse(text, default_group_size=MLX_DEFAULT_GROUP_SIZE)
    except ValueError as e:
        raise CatalogError(str(e)) from None
    for p in model.published:
        if p.bits == q.bits and q.mode == "affine" and (not explicit_group or p.group_size == q.group_size):
            q = Quantization(p.bits, p.group_size)
            return Resolved(model.name, config, q, None, p.repo, p.verified, p.evidence)
    return Resolved(model.name, config, q, None, None, False,
                    f"no published {q.label} conversion; mlx_lm.convert can make one")
