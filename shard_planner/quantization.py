"""Dtypes and mlx quantization modes: what a tensor's bytes depend on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["DTYPE_BYTES", "MODES", "Quantization", "parse_dtype"]

DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3": 1,
    "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8,
    "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
}
_DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "f16": "float16",
    "float16": "float16", "half": "float16", "fp32": "float32", "f32": "float32",
    "float32": "float32", "float": "float32",
}

# mode -> (allowed bits, allowed group sizes, bytes per scale or None for the model dtype,
# whether there is a bias per group); mirrors mx.quantize.
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int | None, bool]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), None, True),
    "mxfp4": ((4,), (32,), 1, False),
    "mxfp8": ((8,), (32,), 1, False),
    "nvfp4": ((4,), (16,), 1, False),
}


def parse_dtype(text: str) -> str | None:
    """'bf16', 'float16', 'fp32', ... -> mlx dtype name; None when it is not a float dtype."""
    return _DTYPE_ALIASES.get(text.strip().lower())


@dataclass(frozen=True)
class Quantization:
    """mlx quantization of weights: ``bits`` per weight, one scale (and for affine one bias)
    per ``group_size`` weights along the input axis."""

    bits: int
    group_size: int = 64
    mode: str = "affine"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r} (known: {', '.join(MODES)})")
        bits, groups, _, _ = MODES[self.mode]
        if self.bits not in bits:
            raise ValueError(f"{self.mode} quantization takes bits in {bits}, not {self.bits}")
        if self.group_size not in groups:
            raise ValueError(
                f"{self.mode} quantization takes group sizes {groups}, not {self.group_size}"
            )

    @property
    def label(self) -> str:
        base = f"{self.bits}bit-g{self.group_size}"
        return base if self.mode == "affine" else f"{base}-{self.mode}"

    @classmethod
    def parse(cls, text: str, default_group_size: int = 64) -> "Quantization":
        """'4bit', '4-bit', 'q4', '4', '4bit-g32', '4bit-gs32', '4bit-mxfp4'."""
        t = text.strip().lower().replace("_", "-")
        mode = "affine"
        for m in MODES:
            if t.endswith("-" + m):
                mode, t = m, t[: -len(m) - 1]
        head, _, group = t.partition("-g")
        head = head.removeprefix("q").removesuffix("bit").removesuffix("-").removesuffix("b")
        try:
            bits = int(head)
            gs = int(group.removeprefix("s")) if group else None
        except ValueError:
            raise ValueError(
                f"cannot read quantization {text!r}: use e.g. 3bit, 4bit, 8bit or 4bit-g32"
            ) from None
        if gs is None:
            gs = MODES[mode][1][0] if mode != "affine" else default_group_size
        return cls(bits, gs, mode)

    @classmethod
    def from_config(cls, block: Mapping[str, Any]) -> "Quantization":
        return cls(int(block["bits"]), int(block["group_size"]), str(block.get("mode", "affine")))
