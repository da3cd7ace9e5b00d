"""The wire contract: committed stubs are fresh, tensors round-trip exactly."""

import importlib.util
from pathlib import Path

import mlx.core as mx
import pytest

from clusterd.wire import clusterd_pb2 as pb
from clusterd.wire.tensors import TensorError, check, from_wire, to_wire

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    for name in ("clusterd_pb2.py", "clusterd_pb2_grpc.py"):
        fresh = (tmp_path / "clusterd" / "wire" / name).read_text()
        committed = (ROOT / "clusterd" / "wire" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `python protos/generate.py`"


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_tensors_round_trip_bit_exact(dtype):
    a = (mx.random.normal((1, 5, 7168)) * 100).astype(dtype)
    t = to_wire(a)
    assert len(t.data) == a.nbytes
    b = from_wire(pb.Tensor.FromString(t.SerializeToString()))
    assert b.dtype == dtype and b.shape == a.shape
    assert mx.array_equal(a.view(mx.uint8) if dtype != mx.float32 else a,
                          b.view(mx.uint8) if dtype != mx.float32 else b).item()


@pytest.mark.parametrize("tensor, problem", [
    (pb.Tensor(data=b"\0" * 10, dtype="float32", shape=[3]), "needs 12"),
    (pb.Tensor(data=b"", dtype="int64", shape=[0]), "unknown tensor dtype"),
    (pb.Tensor(data=b"", dtype="float32", shape=[-1, 2]), "negative"),
    (pb.Tensor(data=b"", dtype="float32", shape=[1 << 20, 1 << 20]), "too large"),
])
def test_malformed_tensors_are_named(tensor, problem):
    with pytest.raises(TensorError, match=problem):
        check(tensor)
