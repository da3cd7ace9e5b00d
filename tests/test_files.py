"""Per-stage file selection on synthetic models whose layers straddle shard
files, against what load_stage really reads; safetensors verification."""

import json
import shutil
import struct
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from clusterd.models.files import (FileCheckError, check_safetensors, check_stage_files,
                                   head_is_tied, meta_files, read_weight_map, stage_files,
                                   stage_weight_files)
from clusterd.models.stage import load_stage
from shard_planner.safetensors import read_header

MODELS = {
    "deepseek": ("deepseek_v3", {}),
    "qwen2-small-shards": ("qwen2", {"shard_bytes": 120_000}),
    "llama-7-layers": ("llama", {"num_layers": 7, "shard_bytes": 90_000}),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, synthetic):
    arch, kw = MODELS[request.param]
    return synthetic(arch, "tiny", **kw)


def all_ranges(n):
    return [(a, b) for a in range(n) for b in range(a + 1, n + 1)]


def layer_files(path: Path) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for k, f in read_weight_map(path).items():
        if k.startswith("model.layers."):
            out.setdefault(int(k.split(".")[2]), set()).add(f)
    return out


def test_models_really_straddle(model):
    """The test is only meaningful when file and layer boundaries disagree."""
    per_layer = layer_files(model)
    assert len(set(read_weight_map(model).values())) >= 4
    assert any(len(fs) > 1 for fs in per_layer.values()), "no layer spans two files"
    files_layers: dict[str, set[int]] = {}
    for layer, fs in per_layer.items():
        for f in fs:
            files_layers.setdefault(f, set()).add(layer)
    assert any(len(ls) > 1 for ls in files_layers.values()), "no file holds two layers"


def test_selection_is_exactly_the_files_a_loaded_stage_reads(model):
    """For a few ranges, load the stage and map every parameter it holds to
    the file whose header (not the index) contains it."""
    config = json.loads((model / "config.json").read_text())
    n = config["num_hidden_layers"]
    where = {}
    for f in sorted(model.glob("model-*.safetensors")):
        for t in read_header(f):
            where[t.name] = f.name
    for start, end in [(0, 1), (1, n - 1), (n - 1, n), (0, n), (2, 4)]:
        stage = load_stage(model, start, end)
        names = {k for k, _ in tree_flatten(stage.model.parameters())}
        expected = {where[k] for k in names}
        assert stage_weight_files(read_weight_map(model), config, start, end) == sorted(expected), \
            (start, end)


def test_only_the_selected_files_are_enough_to_load(model, tmp_path):
    """A folder with just the stage's selection loads; without one of its
    weight files it does not."""
    config = json.loads((model / "config.json").read_text())
    n = config["num_hidden_layers"]
    meta = meta_files(p.name for p in model.iterdir())
    assert "config.json" in meta and "tokenizer.json" in meta
    assert not any(m.endswith(".safetensors") for m in meta)
    start, end = 1, n - 1
    chosen = stage_files(model, start, end, meta)
    sub = tmp_path / "stage"
    sub.mkdir()
    for name in chosen:
        shutil.copy(model / name, sub / name)
    stage = load_stage(sub, start, end)
    assert (stage.bounds.start, stage.bounds.end) == (start, end)
    weights = [c for c in chosen if c.endswith(".safetensors")]
    (sub / weights[-1]).unlink()
    with pytest.raises(Exception, match="missing"):
        load_stage(sub, start, end)


def test_every_range_covers_its_layers_and_nothing_more(model):
    config = json.loads((model / "config.json").read_text())
    n = config["num_hidden_layers"]
    wmap = read_weight_map(model)
    per_layer = layer_files(model)
    embed = {f for k, f in wmap.items() if "embed_tokens" in k}
    head = {f for k, f in wmap.items() if k.startswith(("lm_head", "model.norm"))}
    for start, end in all_ranges(n):
        got = set(stage_weight_files(wmap, config, start, end))
        want = set().union(*(per_layer[i] for i in range(start, end)))
        want |= embed if start == 0 else set()
        want |= head if end == n else set()
        assert got == want, (start, end)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # DeepSeek-V3 always has its own head
def test_tied_head_pulls_the_embedding_file_into_the_last_stage(arch, synthetic):
    model = synthetic(arch, "tiny")
    config = json.loads((model / "config.json").read_text())
    n = config["num_hidden_layers"]
    wmap = {k: f for k, f in read_weight_map(model).items() if not k.startswith("lm_head")}
    tied = {**config, "tie_word_embeddings": True}
    assert head_is_tied(tied, wmap)
    embed = {f for k, f in wmap.items() if "embed_tokens" in k}
    assert embed <= set(stage_weight_files(wmap, tied, n - 1, n))
    # An untied config but a checkpoint without lm_head can only work tied.
    assert head_is_tied({**config, "tie_word_embeddings": False}, wmap)


def test_bad_range_is_refused(model):
    config = json.loads((model / "config.json").read_text())
    with pytest.raises(ValueError, match="outside"):
        stage_weight_files(read_weight_map(model), config, 0, config["num_hidden_layers"] + 1)


# -- verification --------------------------------------------------------------

@pytest.fixture
def weight_file(model, tmp_path):
    src = sorted(model.glob("model-*.safetensors"))[0]
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst


def test_whole_file_passes(weight_file):
    assert check_safetensors(weight_file) == weight_file.stat().st_size
    with pytest.raises(FileCheckError, match="source has"):
        check_safetensors(weight_file, expected_size=weight_file.stat().st_size + 1)


@pytest.mark.parametrize("cut", ["in-length", "in-header", "in-data", "last-byte"])
def test_truncated_file_is_refused(weight_file, cut):
    data = weight_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    keep = {"in-length": 5, "in-header": 8 + n // 2, "in-data": 8 + n + 100,
            "last-byte": len(data) - 1}[cut]
    weight_file.write_bytes(data[:keep])
    with pytest.raises(FileCheckError, match="truncated|corrupt"):
        check_safetensors(weight_file)


def test_padded_or_garbled_file_is_refused(weight_file):
    data = weight_file.read_bytes()
    weight_file.write_bytes(data + b"\0" * 16)
    with pytest.raises(FileCheckError, match="corrupt"):
        check_safetensors(weight_file)
    weight_file.write_bytes(data[:8] + b"\xff" * 32 + data[40:])
    with pytest.raises(FileCheckError, match="corrupt"):
        check_safetensors(weight_file)


def test_stage_check_names_the_bad_file(model, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    config = json.loads((model / "config.json").read_text())
    n = config["num_hidden_layers"]
    victim = stage_weight_files(read_weight_map(copy), config, n - 1, n)[-1]
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[: len(data) - 10])
    check_stage_files(copy, 0, 1) if victim not in stage_weight_files(
        read_weight_map(copy), config, 0, 1) else None
    with pytest.raises(FileCheckError, match=victim):
        check_stage_files(copy, n - 1, n)
