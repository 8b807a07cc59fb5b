"""The fault suite: what a hostile but realistic user does to the entry points, each case one
clear line and a non-zero exit (or identical weights), never a traceback.

Divergence: a non-finite train loss, test loss or weight stops the run at once, whatever the
steps per epoch, and `best.pt` never comes from such an epoch. Files: anything that is not a
checkpoint of this project is named for what it is, and random corruptions of a real
checkpoint are refused by every reader the entry points use (or, where they hit only bytes
nobody reads, load the original tensors exactly).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError
from torch import nn

from compress import engine
from compress.checkpoint import checksum, load_checkpoint, load_weights_file, save_checkpoint
from compress.deploy.ptq import calibration_loader
from compress.engine import Callback, TrainConfig
from compress.errors import CheckpointError, CompressError, DivergenceError
from compress.models import create_model
from compress.pipeline import run_pipeline
from compress.quant import quantize_
from compress.tasks.common import build_model, load_data, read_source, source_checkpoint
from compress.tasks.export import load_source
from compress.tasks.train import run as run_training
from tests.conftest import ROOT, TINY
from tests.test_config import GROUPS, UNKNOWN_KEY, compose_cfg
from tests.test_engine import tiny_cfg
from tests.test_pipeline import staged

try:
    import onnx
    from onnx import TensorProto, helper
except ImportError:  # the ONNX test file is then written from its leading bytes
    onnx = None

SMALL = {"name": "vgg_small", "channels": [8, 8, 16, 16, 16, 16]}


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


def assert_entry_line(result: tuple[int, str, str], code: int, *fragments: str) -> str:
    got, _, err = result
    assert got == code, err
    assert err.strip().count("\n") == 0 and err.startswith("error: "), err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---------------------------------------------------------------- divergence
@pytest.mark.parametrize("num_train", [16, 32, 64])  # 1, 2 and 4 steps per epoch
def test_a_huge_lr_stops_the_first_epoch_and_writes_no_best(tmp_path, num_train):
    cfg = tiny_cfg(epochs=2, lr=1e9)
    cfg["dataset"]["num_train"] = num_train
    with pytest.raises(DivergenceError) as e:
        run_training(cfg, tmp_path)
    assert one_line(e.value).startswith("training diverged: ")
    assert "lower schedule.lr" in str(e.value)
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_divergence_through_the_entry_point_exits_3(entry, tmp_path):
    result = entry("train", *TINY, "model=resnet20", "schedule.lr=1e9", run_dir=tmp_path)
    assert_entry_line(result, 3, "error: training diverged: ", "lower schedule.lr")
    assert not (tmp_path / "best.pt").exists()


def nan_test_loss_at(epoch: int, monkeypatch) -> None:
    """engine.evaluate reports a NaN test loss at its `epoch`-th call (accuracy stays high, so
    only the loss check can keep that epoch out of best.pt)."""
    real, calls = engine.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return {"acc": 99.0, "loss": math.nan} if calls["n"] == epoch else out

    monkeypatch.setattr(engine, "evaluate", evaluate)


def test_a_nan_test_loss_keeps_best_from_the_epoch_before(tmp_path, monkeypatch):
    nan_test_loss_at(2, monkeypatch)
    with pytest.raises(DivergenceError) as e:
        run_training(tiny_cfg(epochs=3), tmp_path)
    msg = one_line(e.value)
    assert "the test loss is nan after epoch 2 (best.pt holds epoch 1)" in msg, msg
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 1 and best["test_acc"] != 99.0
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_a_nan_test_loss_in_the_first_epoch_writes_no_best(tmp_path, monkeypatch):
    nan_test_loss_at(1, monkeypatch)
    with pytest.raises(DivergenceError, match=r"after epoch 1 \(no best.pt was written\)"):
        run_training(tiny_cfg(epochs=2), tmp_path)
    assert not (tmp_path / "best.pt").exists()


class PoisonAtLastStep(Callback):
    """NaN into one weight after the last optimizer step of epoch `epoch`: the loss of that
    step was finite, only the weight check can see it."""

    def __init__(self, epoch: int, steps: int) -> None:
        self.at, self.step = (epoch - 1) * steps + steps, 0

    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        if self.step == self.at:
            with torch.no_grad():
                model.fc.weight[0, 0] = math.nan


def test_non_finite_weights_after_an_epoch_are_caught(tmp_path):
    data = load_data({"name": "synthetic", "num_train": 32, "num_test": 16}, 0)
    model = create_model("resnet20", channels=[4] * 9)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False)
    with pytest.raises(DivergenceError) as e:
        engine.fit(
            model, data, cfg, tmp_path, torch.device("cpu"), callbacks=[PoisonAtLastStep(2, 2)]
        )
    assert "the weights became non-finite (fc.weight)" in one_line(e.value)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_a_diverged_pipeline_stage_is_named(tmp_path):
    with pytest.raises(FloatingPointError) as e:
        run_pipeline(staged("train", {"stage": "finetune", "lr": 1e9}), tmp_path)
    assert one_line(e.value).startswith("stage 01_finetune: training diverged: ")
    assert isinstance(e.value, DivergenceError)
    assert (tmp_path / "00_train" / "stage.json").exists()
    assert not (tmp_path / "01_finetune" / "best.pt").exists()


# ---------------------------------------------------------------- files that are not checkpoints
def write_onnx(path: Path) -> None:
    """A tiny ONNX model (Identity) written with the onnx package, or its leading bytes."""
    if onnx is None:  # what an ONNX file starts with: ir_version, producer "pytorch"
        path.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x032.0" + bytes(64))
        return
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(path))


def write_torchscript(path: Path) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))


WRONG_FILES: dict[str, tuple[Any, str]] = {
    "notes.txt": (lambda p: p.write_text("hello\nworld\n"), "is a text file (it begins 'hello')"),
    "results.csv": (
        lambda p: p.write_text("epoch,acc\n1,50.0\n2,61.5\n"),
        "is a CSV file (it begins 'epoch,acc')",
    ),
    "metrics.json": (lambda p: p.write_text('{"test_acc": 91.2}\n'), "is a JSON file"),
    "random.pt": (
        lambda p: p.write_bytes(b"\x01" + random.Random(3).randbytes(999)),
        "is binary data of no format this project reads (it begins 01 ",
    ),
    "empty.pt": (lambda p: p.write_bytes(b""), "is an empty file, not a checkpoint"),
    "folder.pt": (lambda p: p.mkdir(), "is a directory, not a checkpoint file"),
    "model.onnx": (write_onnx, "is an ONNX model, not a checkpoint"),
    "image.png": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32)), "is a PNG image"),
    "module.pt": (
        lambda p: torch.save(nn.Conv2d(1, 1, 1), p),
        "holds pickled Python objects (torch.nn.modules.conv.Conv2d)",
    ),
    "objects.pkl": (
        lambda p: p.write_bytes(pickle.dumps({"a": nn.ReLU()}, protocol=5)),
        "is a Python pickle (pickle.dump, protocol 5), not a torch.save file: refused unread",
    ),
    "scripted.pt": (write_torchscript, "is a TorchScript archive (torch.jit.save)"),
    "arrays.npz": (
        lambda p: zipfile.ZipFile(p, "w").writestr("a.npy", b"\x93NUMPY"),
        "is a NumPy .npz archive",
    ),
    "packed.pt": (
        lambda p: torch.save({"format": "compress-packed/1", "float": {}}, p),
        "is a 'compress-packed/1' file, not a 'compress/1' checkpoint (pack.py's packed file",
    ),
    "list.pt": (lambda p: torch.save([1, 2, 3], p), "is neither a compress checkpoint"),
}


@pytest.fixture
def wrong_file(tmp_path, request) -> tuple[Path, str]:
    name = request.param
    write, fragment = WRONG_FILES[name]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    write(path)
    return path, fragment


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("wrong_file", list(WRONG_FILES), indirect=True)
def test_a_file_that_is_no_checkpoint_is_named_in_one_line(wrong_file, entry, tmp_path):
    path, fragment = wrong_file
    for reader in (load_checkpoint, load_weights_file):
        with pytest.raises(CheckpointError) as e:
            reader(path)
        msg = one_line(e.value)
        if reader is load_weights_file or "neither" not in fragment:
            assert fragment in msg, msg
        assert str(path) in msg and "weights_only=False" not in msg and "will likely" not in msg
    if "unsafe" in msg:
        assert "save model.state_dict() with torch.save instead" in msg
    err = assert_entry_line(entry("fuse", f"ckpt={path}", run_dir=tmp_path / "run"), 2)
    assert str(path) in err and "weights_only" not in err


def test_a_plain_state_dict_where_a_checkpoint_is_required(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(create_model("resnet20", channels=[4] * 9).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = one_line(e.value)
    assert f"{path} is a plain state_dict (" in msg and "not a compress checkpoint" in msg, msg
    assert load_weights_file(path)[0] == "state_dict"  # where one is accepted it still is


def test_a_csv_as_init_from_is_one_line(entry, tmp_path):
    bad = tmp_path / "log.csv"
    bad.write_text("epoch,acc\n1,50.0\n")
    result = entry("train", *TINY, f"init_from={bad}", run_dir=tmp_path / "run")
    assert_entry_line(result, 2, f"error: init_from={bad}: {bad} is a CSV file")


def test_a_checkpoint_from_a_newer_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", {"arch": {"name": "nin"}, "model": {}})
    state = torch.load(path, weights_only=True)
    state["version"] = 99
    state["checksum"] = checksum(state)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="a version 99 checkpoint, written by a newer"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_checksum_from_before_is_read(tmp_path):
    model = create_model("resnet20", channels=[4] * 9)
    old = {"format": "compress/1", "arch": model.arch, "model": model.state_dict()}
    torch.save(old, tmp_path / "old.pt")  # as save_checkpoint wrote it before version 2
    state = load_checkpoint(tmp_path / "old.pt")
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_a_saved_again_checkpoint_gets_a_new_checksum(tmp_path):
    model = create_model("resnet20", channels=[4] * 9)
    first = save_checkpoint(tmp_path / "a.pt", {"arch": model.arch, "model": model.state_dict()})
    state = load_checkpoint(first)
    state["model"]["fc.bias"] += 1  # a loaded state, changed and saved again (stale checksum)
    again = load_checkpoint(save_checkpoint(tmp_path / "b.pt", {**state, "epoch": 5}))
    assert again["epoch"] == 5 and torch.equal(again["model"]["fc.bias"], state["model"]["fc.bias"])


def test_a_legacy_torch_save_state_dict_still_loads(tmp_path):
    """torch.save's pre-zip format (old torchvision hub files are in it) is read as before."""
    sd = create_model("resnet20", channels=[4] * 9).state_dict()
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    kind, got = load_weights_file(tmp_path / "old.pth")
    assert kind == "state_dict" and all(torch.equal(got[k], v) for k, v in sd.items())
    torch.save(nn.Conv2d(1, 1, 1), tmp_path / "module.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused as unsafe"):
        load_weights_file(tmp_path / "module.pth")


def test_checksum_covers_dtypes_shapes_and_data_and_is_fast():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base = {"w": t, "b": t.bfloat16(), "n": 3, "x": [1.5, None, "s"]}
    same = {"x": [1.5, None, "s"], "n": 3, "b": t.bfloat16().clone(), "w": t.t().contiguous().t()}
    assert checksum(base) == checksum(same)  # key order and memory layout do not matter
    for change in ({"w": t.double()}, {"w": t.reshape(3, 2)}, {"n": 4}, {"x": [1.5, 0, "s"]}):
        assert checksum({**base, **change}) != checksum(base)
    state = {"model": create_model("resnet20").state_dict()}  # 0.27 M parameters
    checksum(state)
    t0 = time.perf_counter()
    checksum(state)
    assert time.perf_counter() - t0 < 0.1


# ---------------------------------------------------------------- corrupted checkpoints
@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    """best.pt of a small VGG trained one epoch: a real checkpoint with config and history."""
    run_dir = tmp_path_factory.mktemp("real")
    cfg = tiny_cfg(epochs=1)
    cfg["model"] = dict(SMALL)
    run_training(cfg, run_dir)
    return run_dir / "best.pt"


def same(a: Any, b: Any) -> bool:
    """Exactly equal: tensors bit for bit with dtype and shape, plain data by value (NaN too)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def data_start(blob: bytes, info: zipfile.ZipInfo) -> int:
    """Offset of a zip member's bytes: after its local header, whose name and extra field
    lengths are its own (they need not match the central directory's)."""
    name_len, extra_len = struct.unpack(
        "<HH", blob[info.header_offset + 26 : info.header_offset + 30]
    )
    return info.header_offset + 30 + name_len + extra_len


def corruptions(blob: bytes, path: Path, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`n` seeded corruptions: truncation at a random offset, 1-4 flipped bytes anywhere, a
    zeroed block, bits flipped in the pickle (data.pkl) and bytes flipped in tensor data."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    pkl = next(i for i in infos if i.filename.endswith("/data.pkl"))
    pkl_range = (data_start(blob, pkl), data_start(blob, pkl) + pkl.file_size)
    tensors = [i for i in infos if "/data/" in i.filename and i.file_size]
    out = []
    for k in range(n):
        b = bytearray(blob)
        mode = ("truncate", "flip", "zero", "pickle", "tensor")[k % 5]
        if mode == "truncate":
            b = b[: rng.randrange(len(b))]
        elif mode == "flip":
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= rng.randint(1, 255)
        elif mode == "zero":
            at, size = rng.randrange(len(b)), rng.randint(1, 512)
            b[at : at + size] = bytes(len(b[at : at + size]))
        elif mode == "pickle":
            for _ in range(rng.randint(1, 2)):
                b[rng.randrange(*pkl_range)] ^= 1 << rng.randrange(8)
        else:  # the case a zip reader that skips CRCs misses: weights silently changed
            info = rng.choice(tensors)
            start = data_start(blob, info)
            for _ in range(rng.randint(1, 2)):
                b[start + rng.randrange(info.file_size)] ^= 1 << rng.randrange(8)
        out.append((mode, bytes(b)))
    return out


def test_random_corruptions_are_refused_by_every_reader(real_ckpt, tmp_path):
    """250 corruptions, each through every library reader the entry points read checkpoints
    with: load_checkpoint (train's resume, prune's reference, pack.py), load_weights_file,
    read_source (ckpt=), source_checkpoint (prune.py, fuse.py), export's load_source
    (export.py, calibrate.py) and build_model (init_from=). Each is refused with one
    CompressError line, or loads exactly the original contents."""
    original = load_checkpoint(real_ckpt)
    blob = real_ckpt.read_bytes()
    data = load_data({"name": "synthetic", "num_train": 16, "num_test": 16}, 0)
    reference = build_model({**tiny_cfg(), "model": dict(SMALL), "init_from": str(real_ckpt)}, data)
    path = tmp_path / "bad.pt"
    run_dir = tmp_path / "run"

    def as_model(m: nn.Module) -> dict[str, Any]:
        return {"model": m.state_dict()}

    readers = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "load_weights_file": lambda: load_weights_file(path)[1],
        "read_source": lambda: read_source({"ckpt": str(path)}, "fuse.py"),
        "source_checkpoint": lambda: source_checkpoint({"ckpt": str(path)}, run_dir, "fuse.py")[1],
        "export.load_source": lambda: load_source({"ckpt": str(path)}, run_dir, "export.py")[1],
        "build_model": lambda: as_model(
            build_model({**tiny_cfg(), "model": dict(SMALL), "init_from": str(path)}, data)[0]
        ),
    }
    expected = {
        "build_model": as_model(reference[0]),
        "load_weights_file": original,
    }
    failures, outcomes = [], {"refused": 0, "damaged": 0, "accepted": 0}
    for k, (mode, bad) in enumerate(corruptions(blob, real_ckpt, 250)):
        path.write_bytes(bad)
        for name, read in readers.items():
            try:
                got = read()
            except CompressError as e:
                msg = str(e)
                if not msg or "\n" in msg or str(path) not in msg or "weights_only" in msg:
                    failures.append(f"{k} {mode} {name}: not one clean line: {msg!r}")
                outcomes["refused"] += 1
                outcomes["damaged"] += "is damaged" in msg
            except Exception as e:  # a traceback for the user: the failure
                failures.append(f"{k} {mode} {name}: {type(e).__name__}: {e}"[:300])
            else:
                outcomes["accepted"] += 1
                want = expected.get(name, original)
                if not same(got, want):
                    failures.append(f"{k} {mode} {name}: accepted with altered contents")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:15])
    assert outcomes["damaged"] >= 50 * len(readers), outcomes  # the checksum did its work
    assert outcomes["refused"] > 0.8 * 250 * len(readers), outcomes


def test_two_flipped_bytes_in_the_weights_are_refused_in_one_line(real_ckpt, entry, tmp_path):
    blob = bytearray(real_ckpt.read_bytes())
    with zipfile.ZipFile(real_ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = data_start(bytes(blob), info)
    blob[start + 5] ^= 0x01
    blob[start + 77] ^= 0x80
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    fragment = f"{bad} is damaged: its tensors or data do not match the checksum written with it"
    assert fragment in one_line(e.value)
    result = entry("fuse", f"ckpt={bad}", run_dir=tmp_path / "run")
    assert_entry_line(result, 2, fragment)
    assert not (tmp_path / "run" / "fused.pt").exists()


# ---------------------------------------------------------------- config typos
# Hydra's own multi-line message stays (it names the key, or the group and its options); the
# entry exits 1 with it, no traceback (test_config.py: train's misspelt keys and wrong types).
def yaml_options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def listed_options(message: str) -> list[str]:
    """The options under Hydra's "Available options in 'GROUP':" (one per tab-indented line)."""
    after = message.split("Available options in ", 1)[1].split("Config search path", 1)[0]
    return [line.strip() for line in after.splitlines()[1:] if line.startswith("\t")]


def test_a_misspelt_quant_lists_the_real_choices_not_the_schema():
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("train", ["quant=w4a5"])
    msg = str(e.value)
    assert "Could not find 'quant/w4a5'" in msg and "Available options in 'quant':" in msg
    assert "w4a4" in listed_options(msg) and "base_quant" not in msg


@pytest.mark.parametrize(
    ("script", "group"),
    [
        *[("train", g) for g in GROUPS["train"]],
        *[(s, g) for s in ("prune", "fuse", "calibrate", "export") for g in ("dataset", "model")],
        ("prune", "pruner"),
    ],
)
def test_a_misspelt_option_of_every_group_lists_exactly_its_files(script, group):
    """No schema (base_quant, ...) among them, and no group where a misspelling is silently
    skipped (an `optional` group: `experiment=quickstrat` trained the defaults for hours)."""
    with pytest.raises(MissingConfigException) as e:
        compose_cfg(script, [f"{group}=nosuch"])
    msg = str(e.value)
    assert f"Could not find '{group}/nosuch'" in msg, msg
    assert listed_options(msg) == yaml_options(group)


@pytest.mark.parametrize(
    ("script", "override", "key", "error"),
    [
        ("prune", "pruner.percnt=0.5", "pruner.percnt", UNKNOWN_KEY),
        ("fuse", "ckpt_path=x.pt", "ckpt_path", UNKNOWN_KEY),
        ("calibrate", "calib.methd=kl", "calib.methd", UNKNOWN_KEY),
        ("calibrate", "calib.batches=many", "calib.batches", ValidationError),
        ("export", "formt=onnx", "formt", UNKNOWN_KEY),
        ("pack", "batchsize=2", "batchsize", UNKNOWN_KEY),
    ],
)
def test_a_misspelt_key_of_every_entry_fails_at_compose_naming_it(script, override, key, error):
    importlib.import_module(script)  # pack.py stores its own schema
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(script, [override])
    assert isinstance(e.value.__cause__, error) and f"full_key: {key}" in str(e.value.__cause__)


@pytest.mark.slow
def test_config_typos_on_the_command_line_exit_1_with_hydras_message(cli, tmp_path):
    proc = cli("train.py", "quant=w4a5", f"hydra.run.dir={tmp_path}/a")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "Could not find 'quant/w4a5'" in proc.stderr and "\tw4a4\n" in proc.stderr
    assert "base_quant" not in proc.stderr
    proc = cli("prune.py", "ckpt=x.pt", "pruner.percnt=0.5", f"hydra.run.dir={tmp_path}/b")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "Key 'percnt' not in 'PrunerConfig'" in proc.stderr, proc.stderr
    assert "full_key: pruner.percnt" in proc.stderr


# ---------------------------------------------------------------- out of range, wrong checkpoints
# train.py's range errors: test_cli.py (schedule.*, quant.*) and test_config.py (validate_run);
# files that are no checkpoint: above; init_from a checkpoint of another model family and a
# fused checkpoint into fuse.py: test_cli.py.
DATA = ("dataset=synthetic", "dataset.num_train=64", "dataset.num_test=32", "dataset.image_size=8")
W4A4 = {
    "name": "w4a4",
    "weight": {"kind": "dorefa", "bits": 4},
    "act": {"kind": "dorefa", "bits": 4},
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Untrained 8-channel ResNet-20s: a checkpoint, its plain state_dict, a w4a4 QAT one."""
    out = tmp_path_factory.mktemp("ckpts")
    model = create_model("resnet20", channels=[8] * 9)
    paths = {
        "fp32": save_checkpoint(out / "fp32.pt", {"arch": model.arch, "model": model.state_dict()})
    }
    torch.save(model.state_dict(), out / "sd.pt")
    paths["state_dict"] = out / "sd.pt"
    qat = quantize_(create_model("resnet20", channels=[8] * 9), W4A4)
    state = {"arch": qat.arch, "model": qat.state_dict(), "quant": W4A4}
    paths["qat"] = save_checkpoint(out / "qat.pt", state)
    return paths


@pytest.mark.parametrize(
    ("script", "overrides", "fragment"),
    [
        (
            "prune",
            ["pruner.percent=1.5"],
            "pruner.percent=1.5 is invalid: expected a fraction in [0, 1)",
        ),
        ("prune", ["pruner=gc"], "pruner=gc is for group-convolution models (nin_gc)"),
        ("calibrate", ["calib.batches=0"], "calib.batches=0 is invalid: expected an integer >= 1"),
        ("calibrate", ["calib.method=kl"], "calib.method='kl' is invalid: expected one of minmax,"),
        ("export", ["format=tflite"], "format=tflite is not built yet: only format=onnx or"),
        ("export", ["opset=9"], "opset=9 is invalid: expected an ONNX opset >= 17"),
    ],
)
def test_an_out_of_range_value_of_every_entry_is_one_line(
    entry, tmp_path, ckpts, script, overrides, fragment
):
    result = entry(script, f"ckpt={ckpts['fp32']}", *DATA, *overrides, run_dir=tmp_path)
    assert_entry_line(result, 2, f"error: {fragment}")


@pytest.mark.parametrize("script", ["prune", "fuse", "calibrate", "export", "pack"])
def test_a_missing_checkpoint_is_one_line_in_every_entry(entry, tmp_path, script):
    result = entry(script, f"ckpt={tmp_path / 'no' / 'best.pt'}", run_dir=tmp_path / "run")
    assert_entry_line(result, 2, f"error: checkpoint {tmp_path / 'no' / 'best.pt'} does not exist")


@pytest.mark.parametrize(
    ("script", "ckpt", "overrides", "fragment"),
    [
        (
            "calibrate",
            "qat",
            [],
            "calibrate.py takes an fp32, pruned or fused checkpoint; {ckpt} was trained with "
            "quant=w4a4",
        ),
        ("pack", "fp32", [], "nothing to pack: {ckpt} holds fp32 weights (its quant is fp32)"),
        (
            "fuse",
            "state_dict",
            [],
            "ckpt={ckpt} is a plain state_dict, which does not say what model it holds: name it",
        ),
        (
            "prune",
            "state_dict",
            ["model=vgg_small"],
            "ckpt={ckpt}: the state_dict does not fit vgg_small: missing keys",
        ),
        (
            "export",
            "state_dict",
            ["model=resnet20", "model.channels=[4,4,4,4,4,4,4,4,4]"],
            "ckpt={ckpt}: the state_dict does not fit resnet20: mis-shaped layers.0.conv1.weight "
            "(file 8x16x3x3, model 4x16x3x3)",
        ),
        (
            "train",
            "fp32",
            ["dataset.channels=1"],
            "init_from={ckpt}: the model was built for 10 classes and 3 input channels, but "
            "dataset=synthetic has 10 and 1",
        ),
    ],
)
def test_a_checkpoint_of_the_wrong_kind_is_one_line(
    entry, tmp_path, ckpts, script, ckpt, overrides, fragment
):
    path = ckpts[ckpt]
    given = {"train": [*TINY, "model=resnet20", f"init_from={path}"], "pack": [f"ckpt={path}"]}
    given = given.get(script, [f"ckpt={path}", *DATA])
    result = entry(script, *given, *overrides, run_dir=tmp_path)
    assert_entry_line(result, 2, "error: " + fragment.format(ckpt=path))


def test_resume_into_a_run_of_another_model_is_one_line(entry, tmp_path):
    nin = create_model("nin")
    save_checkpoint(tmp_path / "last.pt", {"arch": nin.arch, "model": nin.state_dict(), "epoch": 1})
    result = entry("train", *TINY, "model=resnet20", "resume=true", run_dir=tmp_path)
    assert_entry_line(
        result, 2, "checkpoint holds a 'nin' model but model=resnet20; pass model=nin"
    )


# ---------------------------------------------------------------- more calibration images than data
def test_calib_batches_beyond_the_data_are_clamped_with_a_warning(caplog):
    data = load_data({"name": "synthetic", "num_train": 64, "num_test": 16, "image_size": 8}, 0)
    with caplog.at_level(logging.WARNING, logger="compress.deploy.ptq"):
        loader = calibration_loader(data, 100, 32, key="calib.batches")
    assert sum(len(x) for x, _ in loader) == 64
    assert (
        "calib.batches=100 x 32 images is more than the 64 training images: calibrating on all 64"
        " (2 batches)" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress.deploy.ptq"):
        assert sum(len(x) for x, _ in calibration_loader(data, 2, 32)) == 64  # exactly all: quiet
        calibration_loader(data, 5, 32)  # a caller that names no option
    assert caplog.text.count("WARNING") == 1 and "5 calibration batches x 32 images" in caplog.text


def test_calibrate_py_says_it_calibrated_on_fewer_images(entry, tmp_path, ckpts, caplog):
    pytest.importorskip("onnxruntime")
    with caplog.at_level(logging.WARNING, logger="compress.deploy.ptq"):
        code, out, _ = entry(
            "calibrate",
            f"ckpt={ckpts['fp32']}",
            *DATA,
            "calib.batches=100",
            "latency=false",
            run_dir=tmp_path,
        )
    assert code == 0
    assert "calib.batches=100 x 32 images is more than the 64 training images" in caplog.text
    assert json.loads((tmp_path / "metrics.json").read_text())["calib_images"] == 64
    assert "calibration on 64 training images" in out


# ---------------------------------------------------------------- kill -9 (slow: real processes)
# A Ctrl-C or a preemption signal inside a run (in process): test_engine.py, test_pipeline.py,
# test_preemption.py. Here nothing gets to clean up: SIGKILL from outside at whatever moment, and
# one inside a checkpoint write; the resumed run must end with the same weights as a run never
# killed.
KILL_RUN = (
    *TINY,
    "model=resnet20",
    "model.channels=[4,4,4,4,4,4,4,4,4]",
    "dataset.num_train=128",
    "dataset.image_size=16",
    "schedule.epochs=4",
)
KILL_PIPELINE = (
    *TINY,
    "model=vgg_small",
    "model.channels=[8,8,16,16,16,16]",
    "schedule.epochs=2",
    "pruner.percent=0.5",
    "schedule.stages=[train,prune,{stage:finetune,epochs:3}]",
)
# train.py with torch.save patched: the second last.pt is cut in half, then the process kills
# itself, as a SIGKILL in the middle of writing that file would leave it
KILL_IN_SAVE = """
import os, runpy, signal, sys
import torch
real, seen = torch.save, []
def save(obj, f, *args, **kwargs):
    real(obj, f, *args, **kwargs)
    if str(f).endswith("last.pt.tmp"):
        seen.append(f)
        if len(seen) == 2:
            os.truncate(f, os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def start(run_dir: Path, *argv: str) -> subprocess.Popen:
    """train.py (or a -c program) in the background, its output in files beside the run."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    with open(run_dir.parent / f"{run_dir.name}.out", "w") as out:  # the child keeps its copy
        return subprocess.Popen(
            [sys.executable, *argv, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def kill_9_when(proc: subprocess.Popen, path: Path, timeout: float = 600) -> None:
    """SIGKILL the run as soon as `path` exists (polled every few milliseconds)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run had finished before the kill"


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert list(wa) == list(wb)
    changed = [k for k in wa if not same(wa[k], wb[k])]
    assert not changed, f"{a} and {b} differ in {changed[:5]}"


def resume(cli, run_dir: Path, *overrides: str) -> None:
    proc = cli("train.py", *overrides, "resume=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory) -> Path:
    """The run of KILL_RUN without a kill: what every resumed run must end with."""
    run = tmp_path_factory.mktemp("never_killed")
    proc = start(run, str(ROOT / "train.py"), *KILL_RUN)
    assert proc.wait(timeout=900) == 0, (run.parent / f"{run.name}.out").read_text()[-3000:]
    return run


@pytest.mark.slow
def test_kill_9_during_training_then_resume_ends_with_the_same_weights(never_killed, cli, tmp_path):
    run = tmp_path / "run"
    kill_9_when(start(run, str(ROOT / "train.py"), *KILL_RUN), run / "last.pt")
    assert load_checkpoint(run / "last.pt")["epoch"] < 4  # the kill cut the run short
    resume(cli, run, *KILL_RUN)
    assert load_checkpoint(run / "last.pt")["epoch"] == 4
    for name in ("last.pt", "best.pt"):
        assert_same_weights(run / name, never_killed / name)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_then_resume_ends_with_the_same_weights(
    never_killed, cli, tmp_path
):
    run = tmp_path / "run"
    program = KILL_IN_SAVE.format(train=str(ROOT / "train.py"))
    proc = start(run, "-c", program, *KILL_RUN)
    assert proc.wait(timeout=900) == -signal.SIGKILL
    assert (run / "last.pt.tmp").exists()  # the half-written file is left behind
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the one before it is whole
    resume(cli, run, *KILL_RUN)
    for name in ("last.pt", "best.pt"):
        assert_same_weights(run / name, never_killed / name)


@pytest.mark.slow
def test_kill_9_during_a_pipeline_then_resume_ends_with_the_same_weights(cli, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    never = start(reference, str(ROOT / "train.py"), *KILL_PIPELINE)
    kill_9_when(start(run, str(ROOT / "train.py"), *KILL_PIPELINE), run / "02_finetune" / "last.pt")
    assert never.wait(timeout=900) == 0
    assert not (run / "02_finetune" / "stage.json").exists()  # killed inside the last stage
    done = (run / "00_train" / "best.pt").stat().st_mtime_ns
    resume(cli, run, *KILL_PIPELINE)
    assert (run / "00_train" / "best.pt").stat().st_mtime_ns == done  # finished stages kept
    assert_same_weights(run / "01_prune" / "pruned.pt", reference / "01_prune" / "pruned.pt")
    for name in ("last.pt", "best.pt"):
        assert_same_weights(run / "02_finetune" / name, reference / "02_finetune" / name)
