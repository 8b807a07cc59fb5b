"""compress/checkpoint.py on its own: the checksum, the version rules, and how a file that is
not a checkpoint is named. The end-to-end refusals (every reader, every entry point) are in
test_faults.py; these pin the edges those cases do not reach."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from compress.checkpoint import (
    HEAD,
    _refusal,
    checksum,
    describe,
    load_checkpoint,
    load_weights_file,
    read_torch_file,
    save_checkpoint,
)
from compress.errors import CheckpointError


def described(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        read_torch_file(path, "cpu", "expected X")
    return str(e.value)


# ---------------------------------------------------------------- checksum
def test_a_sparse_tensor_hashes_as_its_dense_values():
    dense = torch.tensor([[0.0, 1.5], [0.0, -2.0]])
    assert checksum({"w": dense.to_sparse()}) == checksum({"w": dense})
    assert checksum({"w": dense.to_sparse()}) != checksum({"w": dense * 2})


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants:UserWarning")
def test_a_checkpoint_with_a_sparse_tensor_loads_verified(tmp_path):
    dense = torch.eye(3)
    save_checkpoint(tmp_path / "s.pt", {"arch": {"name": "nin"}, "model": {"w": dense.to_sparse()}})
    loaded = load_checkpoint(tmp_path / "s.pt")["model"]["w"]
    assert torch.equal(loaded.to_dense(), dense)


# ---------------------------------------------------------------- versions
def _written(tmp_path: Path, **change) -> Path:
    path = save_checkpoint(
        tmp_path / "m.pt", {"arch": {"name": "nin"}, "model": {"w": torch.ones(2)}}
    )
    state = torch.load(path, weights_only=True)
    for k, v in change.items():
        if v is None:
            state.pop(k)
        else:
            state[k] = v
    torch.save(state, path)
    return path


def test_a_version_1_file_without_a_checksum_is_read_unverified(tmp_path):
    path = _written(tmp_path, version=1, checksum=None)
    assert load_checkpoint(path)["version"] == 1


def test_a_version_1_file_whose_checksum_does_not_match_is_refused(tmp_path):
    # a version 1 writer had no checksum: one that is there was written since, and is checked
    path = _written(tmp_path, version=1, checksum="0" * 64)
    with pytest.raises(CheckpointError, match="do not match the checksum written with it"):
        load_checkpoint(path)


def test_a_version_2_file_without_its_checksum_is_damaged(tmp_path):
    path = _written(tmp_path, checksum=None)
    for reader in (load_checkpoint, load_weights_file):
        with pytest.raises(
            CheckpointError, match="a version 2 checkpoint carries a checksum, this one none"
        ):
            reader(path)


# ---------------------------------------------------------------- naming what a file is
def test_a_safetensors_file_is_named_by_its_header_and_its_name(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(4)
    assert "is a safetensors file, not a checkpoint" in described(tmp_path, "m.safetensors", data)
    # the same bytes under another name: the header is not enough to say so
    for name in ("m.pt", "m.txt"):  # names that sort below and above it
        msg = described(tmp_path, name, data)
        assert "a safetensors file" not in msg and "is binary data of no format" in msg, name


def test_an_onnx_model_is_named_by_its_bytes_whatever_its_name(tmp_path):
    # ir_version 8, then a producer name: "pytorch" alone is enough, as is "onnx" alone
    for producer in (b"pytorch", b"onnx-tool"):
        data = b"\x08\x08\x12" + bytes([len(producer)]) + producer + bytes(16)
        assert "is an ONNX model, not a checkpoint" in described(tmp_path, "m.bin", data)


def test_bytes_that_mention_onnx_but_do_not_start_like_onnx_are_not_onnx(tmp_path):
    msg = described(tmp_path, "m.bin", b"\x01onnx pytorch" + bytes(16))
    assert "ONNX" not in msg
    assert msg.endswith(
        "is binary data of no format this project reads "
        "(it begins 01 6f 6e 6e 78 20 70 79), not a checkpoint: expected X"
    )


def test_a_csv_is_named_by_its_lines_without_its_suffix(tmp_path):
    assert "is a CSV file (it begins 'epoch,acc')" in described(
        tmp_path, "log.txt", b"epoch,acc\n1,50.0\n"
    )
    # wide rows: the comma counts are compared as numbers, not as small-int objects
    wide = ",".join(f"c{i}" for i in range(300)).encode()
    assert "is a CSV file" in described(tmp_path, "wide.txt", wide + b"\n" + b"," * 299 + b"\n")


def test_text_with_commas_that_do_not_line_up_is_text(tmp_path):
    assert "is a text file (it begins 'hello, world, again')" in described(
        tmp_path, "notes.txt", b"hello, world, again\nbye, now\n"
    )
    # a single line is no table
    assert "is a text file (it begins 'a,b')" in described(tmp_path, "one.txt", b"a,b\n")


def test_a_long_first_line_is_cut_at_40_characters(tmp_path):
    line = "x" * 39 + "yz"  # 41 characters
    msg = described(tmp_path, "t.txt", line.encode() + b"\n")
    assert f"it begins '{'x' * 37}...'" in msg
    msg = described(tmp_path, "t.txt", b"y" * 40 + b"\n")  # 40 fit whole
    assert f"it begins '{'y' * 40}'" in msg


def test_describe_shows_eight_bytes_of_unknown_binary():
    head = bytes(range(1, 20))
    assert describe(Path("x.bin"), head, whole=True).endswith("(it begins 01 02 03 04 05 06 07 08)")


def test_a_multibyte_character_cut_by_the_partial_read_is_still_text(tmp_path):
    # the first HEAD bytes end inside a 2-byte character: the file is text, read in part
    text = ("a" * (HEAD - 1) + "é" + "tail\n").encode()
    assert "is a text file" in described(tmp_path, "t.txt", text)
    # the same cut at the true end of a file is not UTF-8: binary
    assert "is binary data" in described(tmp_path, "t.txt", text[:HEAD])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 1:UserWarning")
def test_a_protocol_2_pickle_goes_to_torch_and_an_early_protocol_header_is_corrupt(tmp_path):
    # torch's legacy format is pickle protocol 2: torch.load reads it, and names a plain
    # pickle.dump of that protocol itself
    path = tmp_path / "p2.pt"
    sd = {"w": torch.arange(3.0)}
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_weights_file(path)[1]["w"], sd["w"])
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        read_torch_file(path, "cpu", "expected X")
    assert str(e.value) == f"{path} is a Python pickle, not a torch.save file: expected X"
    path.write_bytes(b"\x80\x01junk")  # no pickle.dump writes this: damaged, not a pickle
    with pytest.raises(CheckpointError) as e:
        read_torch_file(path, "cpu", "expected X")
    assert "is corrupt or truncated" in str(e.value) and "(pickle.dump" not in str(e.value)


def test_a_long_torch_error_is_cut_to_120_characters():
    long = RuntimeError("r" * 200)
    msg = str(_refusal(Path("m.pt"), long, False, "checkpoint", "expected X"))
    assert msg == f"checkpoint m.pt is corrupt or truncated ({'r' * 117}...)"
    short = RuntimeError("r" * 120)
    msg = str(_refusal(Path("m.pt"), short, False, "checkpoint", "expected X"))
    assert msg == f"checkpoint m.pt is corrupt or truncated ({'r' * 120})"
