"""The .mpk artifact: byte-exact round trips of real models, determinism, sizes, hostile input."""

import hashlib
import struct
import zlib

import numpy as np
import pytest
from conftest import tiny_mlp
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from modelpress.compressors.encode import mpk
from modelpress.compressors.encode.entropy import EntropyConfig, EntropyEncode
from modelpress.compressors.encode.mpk import describe, pack, unpack
from modelpress.compressors.errors import InputError


def _model(tensors, nodes=None, inputs=None, outputs=None, sparse=None) -> bytes:
    graph = helper.make_graph(nodes or [], "g", inputs or [], outputs or [], initializer=tensors,
                              sparse_initializer=sparse)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _if_model() -> bytes:
    rng = np.random.default_rng(0)
    then_w = numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "then_w")
    else_w = numpy_helper.from_array(rng.integers(-5, 5, (32, 32)).astype(np.float32), "else_w")
    def branch(name, weight):
        return helper.make_graph([helper.make_node("MatMul", ["x", weight.name], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [1, 32])],
                                 initializer=[weight])
    return _model(
        [numpy_helper.from_array(np.array(True), "cond")],
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", then_w), else_branch=branch("else", else_w))],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
    )


def _cases() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    sparse = rng.normal(size=(256, 256)).astype(np.float32)
    sparse[rng.random(sparse.shape) < 0.9] = 0
    int8 = np.clip(np.round(rng.normal(0, 30, (300, 200))), -127, 127).astype(np.int8)
    nibbles = np.clip(np.round(rng.normal(0, 2, 6000)), -8, 7).astype(np.int8) & 0x0F  # int4, two per byte
    int4 = helper.make_tensor("q4", TensorProto.INT4, [6000], (nibbles[0::2] | nibbles[1::2] << 4).astype(np.uint8).tobytes(), raw=True)
    constant = numpy_helper.from_array(rng.normal(size=(40, 40)).astype(np.float32), "c")
    values = numpy_helper.from_array(rng.normal(size=2000).astype(np.float32), "sp")
    indices = numpy_helper.from_array(np.sort(rng.choice(100_000, 2000, replace=False)).astype(np.int64), "sp_i")
    return {
        "fp32": tiny_mlp().SerializeToString(),
        "int8": _model([numpy_helper.from_array(int8, "q")]),
        "int4": _model([int4]),
        "sparse90": _model([numpy_helper.from_array(sparse, "s")]),
        "fp16": _model([numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float16), "h")]),
        "fp64_special": _model([numpy_helper.from_array(
            np.resize(np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, 1.0]), 3000), "d")]),
        "subgraph": _if_model(),
        "constant_node": _model([], [helper.make_node("Constant", [], ["c"], value=constant)]),
        "float_data_field": _model([helper.make_tensor("fd", TensorProto.FLOAT, [500], rng.normal(size=500))]),
        "sparse_initializer": _model([], sparse=[helper.make_sparse_tensor(values, indices, [100_000])]),
        "no_initializers": _model([]),
        "empty_bytes": b"",
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_byte_exact_and_deterministic(name):
    original = CASES[name]
    artifact, stats = pack(original)
    assert unpack(artifact) == original
    assert pack(original)[0] == artifact
    assert stats["shipped_bytes"] == len(artifact) and stats["onnx_bytes"] == len(original)
    for key in ("tensors", "entropy_bytes", "coded_payload_bytes", "skeleton_bytes", "payload_bytes", "methods"):
        assert key in stats
    assert sum(stats["methods"].values()) == stats["tensors"]


def test_which_tensors_are_coded():
    def names(case):
        return [t["tensor"] for t in describe(pack(CASES[case])[0])["tensors"]]

    assert sorted(names("subgraph")) == ["else_w", "then_w"]  # initializers inside If branches
    assert names("constant_node") == ["c"]  # Constant-node weights
    assert names("sparse_initializer") == ["sp", "sp_i"]  # values and indices of a sparse initializer
    assert names("float_data_field") == []  # not raw_data: stays in the skeleton, still exact
    assert names("no_initializers") == []
    assert names("fp32") == ["w1", "b1", "w2"]


def test_sizes_track_entropy():
    artifact, stats = pack(CASES["int8"])
    assert stats["coded_payload_bytes"] <= stats["entropy_bytes"] * 1.01 + 400
    assert len(artifact) <= stats["entropy_bytes"] * 1.01 + stats["skeleton_bytes"] + 600
    info = describe(artifact)["tensors"][0]
    assert (info["tensor"], info["dtype"], info["shape"], info["method"]) == ("q", "int8", "300x200", "bytes")
    assert info["entropy_bits_per_weight"] <= info["bits_per_weight"] < info["entropy_bits_per_weight"] * 1.01 + 0.05
    assert 6.5 < info["bits_per_weight"] < 7.1  # gaussian, sigma 30: ~6.95 bits

    sparse_artifact, sparse_stats = pack(CASES["sparse90"])
    assert len(sparse_artifact) < 0.2 * len(CASES["sparse90"])  # 10 % of fp32 values + the mask
    assert describe(sparse_artifact)["tensors"][0]["method"].startswith("sparse-")

    int4 = describe(pack(CASES["int4"])[0])["tensors"][0]
    assert (int4["dtype"], int4["shape"], int4["method"]) == ("int4", "6000", "nibbles")
    assert int4["bits_per_weight"] < min(3.2, int4["entropy_bits_per_weight"] + 0.1)  # sigma 2: ~3.05 bits


def test_describe_summarizes_the_artifact():
    artifact, stats = pack(CASES["fp32"])
    info = describe(artifact)
    assert info["format_version"] == mpk.VERSION
    assert info["onnx_bytes"] == len(CASES["fp32"]) and info["shipped_bytes"] == len(artifact)
    assert info["onnx_sha256"] == hashlib.sha256(CASES["fp32"]).hexdigest()
    assert info["coded_tensors"] == stats["tensors"] == 3
    w1 = info["tensors"][0]
    assert (w1["dtype"], w1["shape"], w1["bytes"]) == ("float32", "64x128", 64 * 128 * 4)
    assert w1["coded_bytes"] < w1["bytes"] and w1["bits_per_weight"] < 32


def test_pass_verifies_and_reports():
    encoder = EntropyEncode(EntropyConfig())
    artifact, stats = encoder.encode(CASES["fp32"])
    assert unpack(artifact) == CASES["fp32"] and stats["verified"] is True
    fast, _ = EntropyEncode(EntropyConfig(level=0, verify=False)).encode(CASES["fp32"])
    assert unpack(fast) == CASES["fp32"]
    with pytest.raises(ValidationError):
        EntropyConfig(levle=3)
    with pytest.raises(ValidationError):
        EntropyConfig(level=12)


def test_pass_refuses_bytes_that_are_not_protobuf():
    with pytest.raises(InputError, match="protobuf"):
        pack(b"\x0a\xff\xff\xff\x0f")  # field 1 claims 4 GB


# --- hostile input ----------------------------------------------------------------------------


def _recrc(body: bytes | bytearray) -> bytes:
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


@pytest.fixture(scope="module")
def artifacts():
    """A few artifacts that between them hold every coding method."""
    rng = np.random.default_rng(1)
    mixed = _model([
        numpy_helper.from_array(np.clip(np.round(rng.normal(0, 9, 5000)), -127, 127).astype(np.int8), "bytes"),
        numpy_helper.from_array(rng.normal(size=1500).astype(np.float32), "planes"),
        numpy_helper.from_array(np.where(rng.random(3000) < 0.9, 0, rng.normal(size=3000)).astype(np.float32), "sparse"),
        numpy_helper.from_array(np.tile(rng.normal(size=16).astype(np.float32), 200), "zlib"),
        numpy_helper.from_array(rng.integers(0, 256, 2000).astype(np.uint8), "raw"),
    ])
    packed = {name: pack(CASES[name])[0] for name in ("int8", "int4", "subgraph")}
    packed["mixed"] = pack(mixed)[0]
    methods = {t["method"] for a in packed.values() for t in describe(a)["tensors"]}
    assert {"bytes", "byte-planes", "zlib", "raw", "nibbles"} <= methods and any(m.startswith("sparse") for m in methods)
    originals = {name: CASES[name] for name in ("int8", "int4", "subgraph")} | {"mixed": mixed}
    return packed, originals


def test_corrupted_truncated_and_bit_flipped_artifacts_fail_cleanly(artifacts):
    packed, _ = artifacts
    rng = np.random.default_rng(42)
    names = sorted(packed)
    for trial in range(400):
        artifact = packed[names[trial % len(names)]]
        damaged = bytearray(artifact)
        kind = trial % 5
        if kind == 0:
            damaged = damaged[: rng.integers(0, len(damaged))]
        elif kind == 1:
            position = int(rng.integers(0, len(damaged)))
            damaged[position] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:
            position = int(rng.integers(0, len(damaged) - 8))
            damaged[position : position + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        elif kind == 3:
            position = int(rng.integers(0, len(damaged)))
            damaged[position:position] = rng.integers(0, 256, int(rng.integers(1, 5)), dtype=np.uint8).tobytes()
        else:
            damaged += rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        if bytes(damaged) == artifact:
            continue
        with pytest.raises(InputError):
            unpack(bytes(damaged))
        with pytest.raises(InputError):
            describe(bytes(damaged))


def test_forged_artifacts_with_a_valid_crc_fail_cleanly(artifacts):
    """A forger who recomputes the CRC reaches the structural checks and the SHA-256: every
    mutation is an InputError or, if it hit a field unpack does not use, the exact original."""
    packed, originals = artifacts
    rng = np.random.default_rng(43)
    names = sorted(packed)
    outcomes = {"rejected": 0, "harmless": 0}
    for trial in range(300):
        name = names[trial % len(names)]
        body = bytearray(packed[name][:-4])
        if trial % 2:  # aim at the header and the compressed table + skeleton, where lengths live
            table_end = len(body) - sum(t["coded_bytes"] for t in describe(packed[name])["tensors"])
            position = int(rng.integers(8, table_end))
        else:
            position = int(rng.integers(8, len(body)))
        body[position] = (body[position] + int(rng.integers(1, 256))) % 256
        try:
            result = unpack(_recrc(body))
        except InputError:
            outcomes["rejected"] += 1
            continue
        assert result == originals[name]
        outcomes["harmless"] += 1
    assert outcomes["rejected"] > 250


def _header_fields(artifact: bytes) -> list:
    return list(mpk._HEADER.unpack_from(artifact))


@pytest.mark.parametrize("field, value, message", [
    (1, 4, "format version 4"),
    (2, 1, "flags"),
    (3, 10**9, "more than its table can hold"),
    (4, 2**40, "more than the format allows"),
    (4, 10, "outside the model"),
    (5, 2**62, "run past its end"),
    (6, 2**62, "more than its table can hold"),
    (6, 10**6, "tensor table is shorter than declared"),
    (7, bytes(32), "checksum recorded at encode time"),
])
def test_forged_header_fields(field, value, message):
    artifact, _ = pack(CASES["int8"])
    fields = _header_fields(artifact)
    fields[field] = value
    forged = _recrc(mpk._HEADER.pack(*fields) + artifact[mpk._HEADER.size : -4])
    with pytest.raises(InputError, match=message):
        unpack(forged)


def test_not_an_artifact():
    for data in (b"", b"MPK", CASES["fp32"], bytes(1000), mpk.MAGIC + bytes(10)):
        with pytest.raises(InputError):
            unpack(data)
        with pytest.raises(InputError):
            describe(data)
