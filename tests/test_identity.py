import json
import multiprocessing
import uuid

import pytest

from clusterd.node.identity import ID_FILE, load_identity, machine_fingerprint


def test_id_is_created_once_and_stable(tmp_path):
    first = load_identity(tmp_path)
    uuid.UUID(first.node_id)
    assert (tmp_path / ID_FILE).exists()
    assert load_identity(tmp_path).node_id == first.node_id


def test_different_folders_get_different_ids(tmp_path):
    assert load_identity(tmp_path / "a").node_id != load_identity(tmp_path / "b").node_id


def test_new_id_replaces_the_old_one(tmp_path):
    old = load_identity(tmp_path).node_id
    new = load_identity(tmp_path, new=True).node_id
    assert new != old and load_identity(tmp_path).node_id == new


def test_copied_folder_is_recognised(tmp_path):
    ident = load_identity(tmp_path)
    assert ident.moved_warning() is None  # created here
    data = json.loads((tmp_path / ID_FILE).read_text())
    data["machine"], data["created_on"] = "0123456789abcdef", "studio-1"
    (tmp_path / ID_FILE).write_text(json.dumps(data))
    moved = load_identity(tmp_path)
    assert moved.node_id == ident.node_id  # never changed behind the user's back
    warning = moved.moved_warning(current_machine=machine_fingerprint() or "elsewhere")
    assert warning and "studio-1" in warning and "--new-id" in warning


def test_corrupt_id_file_says_what_to_do(tmp_path):
    (tmp_path / ID_FILE).write_text('{"node_id": "not-a-uuid"}')
    with pytest.raises(ValueError, match="delete it"):
        load_identity(tmp_path)


def _first_run(home, queue):
    queue.put(load_identity(home).node_id)


def test_concurrent_first_runs_agree(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_first_run, args=(tmp_path, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = {queue.get(timeout=20) for _ in procs}
    for p in procs:
        p.join(10)
    assert len(ids) == 1
