"""The node's model store: the Hugging Face cache layout, shared with
huggingface_hub and mlx-lm in both directions; refuses paths outside it."""

import hashlib
import os

import pytest

from clusterd.models.store import (LOCAL_REVISION, ModelRef, ModelStore, StoreError,
                                   default_root, safe_relpath)

COMMIT = "abcdefabcdefabcdefabcdefabcdefabcdefabcd"


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(b"x" * 1000)
    (src / "sub" / "extra.txt").write_text("hi")
    return src


def test_root_follows_huggingface_hub_rules(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert str(default_root()) == os.path.expanduser("~/.cache/huggingface/hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_root() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert default_root() == tmp_path / "cache"


@pytest.mark.parametrize("text,repo,rev", [
    ("mlx-community/DeepSeek-R1-4bit", "mlx-community/DeepSeek-R1-4bit", None),
    ("org/name@main", "org/name", "main"),
    (f"org/name@{COMMIT}", "org/name", COMMIT),
    ("gpt2", "gpt2", None),
])
def test_model_refs(text, repo, rev):
    ref = ModelRef.parse(text)
    assert (ref.repo_id, ref.revision) == (repo, rev)
    assert str(ref) == text


@pytest.mark.parametrize("bad", ["../etc", "/abs/path", "org/../x", "a/b/c", "", ".hidden/x",
                                 "org/name@../../x"])
def test_bad_refs_are_refused(bad):
    with pytest.raises(StoreError):
        ModelRef.parse(bad)


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b",
                                 "a\x00b"])
def test_bad_paths_are_refused(bad):
    with pytest.raises(StoreError):
        safe_relpath(bad)


def test_import_makes_the_layout_huggingface_hub_reads(folder, tmp_path):
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    store = ModelStore(tmp_path / "hub")
    snap = store.import_folder("org/model", folder, COMMIT)
    assert snap == store.root / "models--org--model" / "snapshots" / COMMIT
    assert sorted(store.files(ModelRef("org/model"))) == ["config.json", "model.safetensors",
                                                         "sub/extra.txt"]
    link = snap / "model.safetensors"
    assert link.is_symlink()
    assert link.resolve().name == hashlib.sha256(b"x" * 1000).hexdigest()
    assert try_to_load_from_cache("org/model", "sub/extra.txt", cache_dir=store.root) == str(
        snap / "sub" / "extra.txt")
    # mlx-lm loads a repo id with snapshot_download(local_files_only=True) when offline.
    assert snapshot_download("org/model", cache_dir=store.root, local_files_only=True) == str(snap)
    report = scan_cache_dir(store.root)
    assert not report.warnings
    [repo] = report.repos
    assert repo.repo_id == "org/model" and repo.size_on_disk >= 1000


def test_finds_what_huggingface_hub_downloaded(tmp_path):
    """A cache written the way hf_hub_download writes it (blob names are etags)."""
    root = tmp_path / "hub"
    repo = root / "models--mlx-community--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    etag = "0" * 40
    (repo / "blobs" / etag).write_text("{}")
    os.symlink(f"../../blobs/{etag}", repo / "snapshots" / COMMIT / "config.json")
    (repo / "refs" / "main").write_text(COMMIT)
    store = ModelStore(root)
    ref = ModelRef("mlx-community/tiny")
    assert store.commit(ref) == COMMIT
    assert store.file(ref, "config.json").read_text() == "{}"
    assert store.file(ref, "tokenizer.json") is None
    assert store.repos() == ["mlx-community/tiny"]
    assert store.snapshot(ModelRef("mlx-community/tiny", "v2")) is None


def test_new_files_join_the_snapshot_in_use(folder, tmp_path):
    store = ModelStore(tmp_path / "hub")
    ref = ModelRef("org/model")
    assert store.writable_snapshot(ref) == LOCAL_REVISION  # no commit known yet
    # A hub commit learned later does not split the model over two snapshots.
    assert store.writable_snapshot(ref, COMMIT) == LOCAL_REVISION
    data = tmp_path / "data"
    data.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    store.install(ref, LOCAL_REVISION, "w/a.bin", digest, data)
    assert not data.exists()
    assert store.file(ref, "w/a.bin").read_bytes() == b"abc"
    # The same content under another name shares the blob.
    again = tmp_path / "again"
    again.write_bytes(b"abc")
    store.install(ref, LOCAL_REVISION, "b.bin", digest, again)
    assert len(list(store.repo_dir("org/model").glob("blobs/*"))) == 1
    store.remove(ref, "w/a.bin")
    assert store.file(ref, "w/a.bin") is None


def test_symlink_out_of_the_repository_is_refused(folder, tmp_path):
    store = ModelStore(tmp_path / "hub")
    snap = store.import_folder("org/model", folder, COMMIT)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    os.symlink(secret, snap / "leak.json")
    with pytest.raises(StoreError, match="outside the model store"):
        store.file(ModelRef("org/model"), "leak.json")
    with pytest.raises(StoreError):
        store.file(ModelRef("org/model"), "../../refs/main")


def test_models_command_lists_sizes_and_what_this_machine_holds(tmp_path, synthetic):
    import json as jsonlib
    import shutil

    from click.testing import CliRunner

    from clusterd.cli import main

    model = synthetic("qwen2", "tiny")
    store = ModelStore(tmp_path / "hub")
    store.import_folder("mlx-community/DeepSeek-R1-Distill-Qwen-7B-4bit", model, COMMIT)
    half = tmp_path / "half"
    shutil.copytree(model, half)
    weights = sorted(half.glob("model-*.safetensors"))
    for w in weights[1:]:
        w.unlink()
    store.import_folder("mlx-community/DeepSeek-R1-Distill-Qwen-7B-8bit", half, COMMIT)
    out = CliRunner(env={"HF_HUB_CACHE": str(store.root)}).invoke(main, ["models", "--json"])
    assert out.exit_code == 0, out.output
    rows = {(r["name"], r["quant"]): r for r in jsonlib.loads(out.output)["models"]}
    assert rows[("deepseek-r1-distill-qwen-7b", "4bit")]["here"] == "yes"
    assert rows[("deepseek-r1-distill-qwen-7b", "8bit")]["here"] == f"partial (1/{len(weights)} files)"
    assert rows[("deepseek-r1", "4bit")]["here"] == "-"
    r1 = rows[("deepseek-r1", "4bit")]
    assert r1["repo"] == "mlx-community/DeepSeek-R1-4bit" and 380e9 < r1["bytes"] < 430e9
    for name in ("deepseek-r1-0528", "deepseek-v3", "deepseek-r1-distill-qwen-1.5b",
                 "deepseek-r1-distill-qwen-14b", "deepseek-r1-distill-qwen-32b",
                 "deepseek-r1-distill-llama-8b", "deepseek-r1-distill-llama-70b"):
        assert any(n == name and r["bytes"] for (n, _), r in rows.items()), name
    human = CliRunner(env={"HF_HUB_CACHE": str(store.root)}).invoke(main, ["models"])
    assert "mlx-community/DeepSeek-R1-Distill-Qwen-7B-4bit" in human.output


def test_a_name_a_repository_id_or_a_folder(tmp_path, monkeypatch):
    from clusterd.coordinator.prepare import PrepareFailed, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert resolve_model("models/mine", None).local_dir.resolve() == tmp_path / "models" / "mine"
    r = resolve_model("deepseek-r1", "4bit")
    assert str(r.ref) == "mlx-community/DeepSeek-R1-4bit" and r.local_dir is None
    assert str(resolve_model("deepseek-r1-distill-llama-8b", "8bit").ref) == \
        "mlx-community/DeepSeek-R1-Distill-Llama-8B-8bit"
    assert str(resolve_model("someone/their-model", None).ref) == "someone/their-model"
    with pytest.raises(PrepareFailed, match="does not exist"):
        resolve_model("models/typo", None)  # a folder's typo is not a repository id
    with pytest.raises(PrepareFailed, match="unknown model"):
        resolve_model("deepseek-r2", None)
    with pytest.raises(PrepareFailed, match="mlx_lm.convert"):
        resolve_model("deepseek-r1", "8bit")  # no published 8-bit conversion
