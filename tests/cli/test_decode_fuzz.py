"""`modelpress decode` on damaged .mpk files: every one ends in exit 2 with one clear message —
never a traceback, never a file written (in the target folder or beside the artifact), and never
memory out of proportion to the file, whatever lengths a forged header declares."""

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from conftest import tiny_mlp
from modelpress.cli.main import app
from modelpress.compressors.encode import mpk
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

runner = CliRunner()
# The LZMA2 dictionary (at most 8 MiB) and some slack: far below what any forged length (up to
# 2 GiB of ONNX, 64 MiB of table) would cost if it were trusted.
MEMORY_LIMIT = 24 << 20


def _model_bytes() -> bytes:
    """A model whose artifact holds several coding methods: planes, sparse, nibbles, bytes."""
    rng = np.random.default_rng(0)
    sparse = rng.normal(size=(96, 96)).astype(np.float32)
    sparse[rng.random(sparse.shape) < 0.9] = 0
    nibbles = rng.integers(0, 6, 4000).astype(np.uint8)
    model = tiny_mlp()
    model.graph.initializer.extend([
        numpy_helper.from_array(sparse, "sparse"),
        helper.make_tensor("q4", TensorProto.UINT4, [4000], (nibbles[0::2] | nibbles[1::2] << 4).tobytes(), raw=True),
        numpy_helper.from_array(np.clip(np.round(rng.normal(0, 9, 3000)), -127, 127).astype(np.int8), "q8"),
    ])
    return model.SerializeToString()


@pytest.fixture(scope="module")
def artifact() -> tuple[bytes, bytes]:
    onnx_bytes = _model_bytes()
    packed, stats = mpk.pack(onnx_bytes)
    assert stats["tensors"] >= 4
    return packed, onnx_bytes


def _recrc(body: bytes | bytearray) -> bytes:
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def _damaged(packed: bytes) -> list[tuple[str, bytes]]:
    """Byte flips, truncations at many offsets, wrong magic/version, forged lengths (CRC fixed)."""
    rng = np.random.default_rng(7)
    cases = [("empty", b""), ("magic only", mpk.MAGIC), ("wrong magic", b"\x89MPX" + packed[4:]),
             ("appended", packed + b"\x00"), ("text-mode transfer", packed.replace(b"\r\n", b"\n"))]
    for offset in sorted(set(np.linspace(1, len(packed) - 1, 30).astype(int))):
        cases.append((f"truncated at {offset}", packed[:offset]))
    for trial in range(30):
        flipped = bytearray(packed)
        for _ in range(1 + trial % 3):
            flipped[int(rng.integers(0, len(flipped)))] ^= 1 << int(rng.integers(0, 8))
        cases.append((f"flips {trial}", bytes(flipped)))
    body = packed[:-4]
    fields = list(mpk._HEADER.unpack_from(packed))
    for index, value, label in [(1, 1, "old version"), (1, 999, "future version"), (2, 4, "flags"),
                                (3, 2**32 - 1, "tensor count"), (4, 2**31 - 1, "onnx length 2 GiB"),
                                (4, 2**64 - 1, "onnx length 2^64"), (5, 2**63, "block length"),
                                (5, 0, "block length 0"), (6, (64 << 20), "table length 64 MiB"),
                                (6, 2**64 - 1, "table length 2^64"), (7, bytes(32), "sha256")]:
        forged = list(fields)
        forged[index] = value
        cases.append((f"forged {label}", _recrc(mpk._HEADER.pack(*forged) + body[mpk._HEADER.size:])))
    for trial in range(20):  # forged with a valid CRC anywhere: structure, lengths, the LZMA block
        mutated = bytearray(body)
        position = int(rng.integers(8, len(mutated)))
        mutated[position] = (mutated[position] + int(rng.integers(1, 256))) % 256
        cases.append((f"forged byte {position}", _recrc(mutated)))
    return cases


def test_valid_artifact_decodes_exactly(tmp_path, artifact):
    packed, onnx_bytes = artifact
    (tmp_path / "ok.mpk").write_bytes(packed)
    result = runner.invoke(app, ["decode", str(tmp_path / "ok.mpk"), "-o", str(tmp_path / "ok.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ok.onnx").read_bytes() == onnx_bytes


def test_every_damaged_artifact_fails_cleanly(tmp_path, artifact):
    packed, onnx_bytes = artifact
    source, target = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    target.mkdir()
    outcomes = {"rejected": 0, "harmless": 0}
    for label, data in _damaged(packed):
        path = source / "bad.mpk"
        path.write_bytes(data)
        traced = label.startswith(("forged", "truncated"))  # where lengths could be believed; tracing is slow
        if traced:
            tracemalloc.start()
        try:
            result = runner.invoke(app, ["decode", str(path), "-o", str(target / "model.onnx")])
            peak = tracemalloc.get_traced_memory()[1] if traced else 0
        finally:
            if traced:
                tracemalloc.stop()
        assert peak < MEMORY_LIMIT + 8 * len(data), f"{label}: peak {peak} bytes"
        if data == packed or result.exit_code == 0:
            # Only a change in a byte decode never reads may pass, and then the output is exact.
            assert (target / "model.onnx").read_bytes() == onnx_bytes, label
            (target / "model.onnx").unlink()
            outcomes["harmless"] += 1
            continue
        assert result.exit_code == 2, f"{label}: exit {result.exit_code}\n{result.output}"
        assert "Traceback" not in result.output, label
        assert "error:" in result.output and "bad.mpk" in result.output, f"{label}: {result.output}"
        assert sorted(p.name for p in target.iterdir()) == [], f"{label}: wrote {list(target.iterdir())}"
        assert sorted(p.name for p in source.iterdir()) == ["bad.mpk"], f"{label}: wrote beside the artifact"
        outcomes["rejected"] += 1
    assert outcomes["rejected"] >= 85 and outcomes["harmless"] <= 5, outcomes


def test_forged_lengths_are_named(tmp_path, artifact):
    """The messages say what is wrong, so a user can tell a truncated upload from a forged file."""
    packed, _ = artifact
    messages = {}
    for label, data in _damaged(packed):
        if label.startswith(("forged onnx length 2^64", "forged table length 2^64", "forged future", "truncated at 1")):
            path = tmp_path / "bad.mpk"
            path.write_bytes(data)
            messages[label] = runner.invoke(app, ["decode", str(path), "-o", str(tmp_path / "x.onnx")]).output
    assert "more than the format allows" in messages["forged onnx length 2^64"]
    assert "more than its table can hold" in messages["forged table length 2^64"]
    assert "format version 999" in messages["forged future version"]
    assert "bad magic" in messages["truncated at 1"]
