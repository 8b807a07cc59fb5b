"""Packed low-bit checkpoints: dense bit packing, bit-identical round trips for every weight
kind, real file sizes, and the pack.py entry point."""

from __future__ import annotations

import json
import math
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compress import pack
from compress.checkpoint import checksum, save_checkpoint
from compress.errors import CheckpointError, ConfigError
from compress.fuse import fuse_bn_
from compress.models import create_model
from compress.pack import (
    file_bytes,
    load_packed,
    pack_bits,
    pack_checkpoint,
    pack_model,
    packable_layers,
    payload_bytes,
    save_packed,
    to_disk,
    unpack_bits,
    unpack_model,
)
from compress.quant import quantize_
from compress.spec import checkpoint_state


def quantized(name: str, weight: dict, act: dict | None = None, seed: int = 0, **kw) -> nn.Module:
    """A quantized model with random weights and random BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    quantize_(model, {"weight": weight, "act": act or {"kind": "fp32"}})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def assert_round_trip(model: nn.Module, state: dict | None = None) -> nn.Module:
    state = pack_model(model) if state is None else state
    back = unpack_model(state).eval()
    before, after = dict(packable_layers(model)), dict(packable_layers(back))
    assert before and before.keys() == after.keys()
    for name, layer in before.items():
        assert torch.equal(after[name].quantized_weight(), layer.quantized_weight()), name
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    return back


# ---------------------------------------------------------------- bit packing
@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_round_trip_any_width(bits):
    n = 1001  # not a multiple of 8: the last byte is padded
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    codes[:2] = torch.tensor([0, 2**bits - 1])
    data = pack_bits(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(data, bits, n), codes)


def test_pack_bits_layout_is_dense_msb_first():
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]), 1).tolist() == [0b10110001]
    assert pack_bits(torch.tensor([3, 0, 2, 1, 2]), 2).tolist() == [0b11001001, 0b10000000]
    assert pack_bits(torch.tensor([0xA, 0x5, 0xF]), 4).tolist() == [0xA5, 0xF0]
    assert pack_bits(torch.tensor([5, 2, 7]), 3).tolist() == [0b10101011, 0b10000000]
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([4]), 2)


# ---------------------------------------------------------------- round trips
KINDS = [
    pytest.param({"kind": "binary"}, id="binary"),
    pytest.param({"kind": "binary", "scale": False}, id="binary-unscaled"),
    pytest.param({"kind": "binary", "center": True}, id="binary-center"),
    pytest.param({"kind": "ternary"}, id="ternary"),
    pytest.param({"kind": "ternary", "scale": False, "gap": 0.5}, id="ternary-unscaled"),
    *[pytest.param({"kind": "dorefa", "bits": k}, id=f"dorefa{k}") for k in range(2, 9)],
    *[pytest.param({"kind": "lsq", "bits": k}, id=f"lsq{k}") for k in (2, 3, 4, 8)],
    pytest.param({"kind": "int8"}, id="int8"),  # INT8 QAT: per-channel scales of the weight
]


@pytest.mark.parametrize("weight", KINDS)
def test_resnet20_round_trip_is_bit_identical(weight):
    model = quantized("resnet20", weight, {"kind": "dorefa", "bits": 4})
    state = pack_model(model)
    for entry in state["packed"].values():
        bits = weight.get("bits", {"binary": 1, "ternary": 2, "int8": 8}.get(weight["kind"]))
        assert entry["bits"] == bits and entry["codes"].dtype == torch.uint8
        assert entry["codes"].numel() == math.ceil(math.prod(entry["shape"]) * bits / 8)
        assert (entry["scale"] is not None) == weight.get("scale", weight["kind"] != "dorefa")
    back = assert_round_trip(model, state)
    if weight.get("center"):  # the codes hold the centred signs
        assert back.quant_config["weight"]["center"] is False


def test_trained_lsq_packs_its_codes_and_steps_through_a_file(tmp_path):
    """LSQ: b-bit codes (offset by Q_N) and the learned per-channel step, stored once."""
    model = quantized("nin", {"kind": "lsq", "bits": 3}, {"kind": "lsq", "bits": 3})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for seed in range(3):  # steps that are learned, not the initial ones
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    layers = dict(packable_layers(model))
    init = {
        n: 2 * m.weight.detach().abs().mean((1, 2, 3)) / math.sqrt(3) for n, m in layers.items()
    }
    assert not any(torch.allclose(m.weight_quant.step, init[n]) for n, m in layers.items())
    state = pack_model(model)
    for name, entry in state["packed"].items():
        layer = layers[name]
        step = layer.weight_quant.step.detach()
        assert entry["kind"] == "lsq" and entry["bits"] == 3 and torch.equal(entry["scale"], step)
        codes = unpack_bits(entry["codes"], 3, layer.weight.numel()).view(layer.weight.shape)
        want = torch.round(torch.clamp(layer.weight.detach() / step.view(-1, 1, 1, 1), -4, 3))
        assert torch.equal(codes - 4, want.long())  # codes 0..7 stand for -4..3
        assert f"{name}.weight_quant.step" not in state["float"]  # stored once, as the scale
        assert f"{name}.weight_quant.initialized" in state["float"]
    path = save_packed(tmp_path / "packed.pt", state)
    back = assert_round_trip(model, load_packed(path))
    for name, layer in dict(packable_layers(back)).items():
        assert torch.equal(layer.weight_quant.step, layers[name].weight_quant.step)
    assert payload_bytes(state)["codes"] == sum(
        math.ceil(m.weight.numel() * 3 / 8) for m in layers.values()
    )


def test_nin_gc_wbab_through_a_file(tmp_path):
    model = quantized("nin_gc", {"kind": "binary"}, {"kind": "binary"})
    path = save_packed(tmp_path / "packed.pt", pack_model(model, dataset="cifar10"))
    state = torch.load(path, weights_only=True)  # plain tensors and builtins only
    assert state["dataset"] == "cifar10" and set(state["float"]) >= {"features.0.conv.weight"}
    weights = [m.weight for _, m in packable_layers(model)]
    assert state["codes"].dtype == torch.uint8  # one bit per binary weight, all layers at once
    assert state["codes"].numel() == sum(w.numel() for w in weights) // 8
    assert state["scales"].numel() == sum(w.shape[0] for w in weights)
    assert_round_trip(model, load_packed(path))


def test_pruned_and_bias_fused_models_round_trip():
    model = quantized(
        "nin", {"kind": "binary"}, {"kind": "binary"}, channels=[40, 32, 24, 48, 40, 32, 48, 40]
    )
    fuse_bn_(model)  # bias folds: the binary weights stay binary (some channels flipped)
    back = assert_round_trip(model)
    assert back.fused == model.fused and back.arch["channels"] == model.arch["channels"]


def test_ternary_with_an_all_zero_channel():
    model = quantized("resnet20", {"kind": "ternary"})
    with torch.no_grad():
        model.layers[0].conv1.weight[3] = 0.0
    assert_round_trip(model)


# ---------------------------------------------------------------- sizes
def test_nin_gc_binary_layers_are_25x_smaller_on_disk():
    model = quantized("nin_gc", {"kind": "binary"}, {"kind": "binary"})
    state = pack_model(model)
    fp32 = {n: m.weight.detach() for n, m in packable_layers(model)}
    ratio = file_bytes(fp32) / file_bytes(to_disk({"packed": state["packed"]}))
    assert ratio >= 25, ratio


# ---------------------------------------------------------------- the pack task
def test_pack_checkpoint_refuses_what_it_cannot_pack(tmp_path):
    with pytest.raises(ConfigError, match="ckpt is required"):
        pack_checkpoint(None, tmp_path)
    save_checkpoint(tmp_path / "fp32.pt", checkpoint_state(create_model("resnet20")))
    with pytest.raises(CheckpointError, match="nothing to pack: .* train with quant="):
        pack_checkpoint(tmp_path / "fp32.pt", tmp_path)
    model = quantized("resnet20", {"kind": "dorefa", "bits": 2})
    fuse_bn_(model)  # normal folds: w' = Q(w) * gamma / std is float
    save_checkpoint(tmp_path / "fused.pt", checkpoint_state(model))
    with pytest.raises(CheckpointError, match="is fused, .* 18 layers float; pack the"):
        pack_checkpoint(tmp_path / "fused.pt", tmp_path)


def test_pack_cli_writes_packed_file_and_real_sizes(cli, tmp_path):
    model = quantized("resnet20", {"kind": "ternary"}, {"kind": "binary"})
    save_checkpoint(tmp_path / "best.pt", checkpoint_state(model))
    out = tmp_path / "run"
    proc = cli("pack.py", f"ckpt={tmp_path / 'best.pt'}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["size_bytes_packed_file"] == (out / "packed.pt").stat().st_size
    assert m["max_abs_diff"] == 0 and m["quant"] == "wtab" and m["packed_layers"] == 18
    assert m["ratio"] == m["size_bytes_fp32_file"] / m["size_bytes_packed_file"] > 4
    assert 14 < m["packed_layers_ratio"] < 16  # 2 bits + one fp32 scale per channel
    assert_round_trip(model, load_packed(out / "packed.pt"))
    proc = cli("pack.py", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: ckpt is required: python pack.py ckpt=RUN/best.pt"


# ---------------------------------------------------------------- identified and checksummed
def packed_file(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A small LSQ ResNet-20 (codes, steps and float tensors all in the file) packed to disk."""
    model = quantized("resnet20", {"kind": "lsq", "bits": 4}, channels=[4] * 9)
    return save_packed(tmp_path / "packed.pt", pack_model(model, dataset="cifar10")), model


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg and "weights_only" not in msg, msg
    return msg


def member_start(blob: bytes, info: zipfile.ZipInfo) -> int:
    """Offset of a zip member's bytes (after its local header)."""
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", blob[at + 26 : at + 30])
    return at + 30 + name_len + extra_len


def codes_member(path: Path, codes: torch.Tensor) -> zipfile.ZipInfo:
    """The zip member that holds the packed codes blob."""
    want = codes.numpy().tobytes()
    with zipfile.ZipFile(path) as z:
        return next(i for i in z.infolist() if "/data/" in i.filename and z.read(i) == want)


def test_a_packed_file_carries_its_format_tag_version_and_checksum(tmp_path):
    path, model = packed_file(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "compress-packed/1" and raw["version"] == pack.VERSION == 2
    assert raw["checksum"] == checksum(raw) and len(raw["checksum"]) == 64
    state = load_packed(path)
    assert_round_trip(model, state)
    again = load_packed(save_packed(tmp_path / "again.pt", state))  # stale checksum replaced
    assert checksum(again) == checksum(state)
    before = {k: v for k, v in raw.items() if k not in ("version", "checksum")}
    torch.save(before, tmp_path / "v1.pt")  # as save_packed wrote it before the checksum
    assert_round_trip(model, load_packed(tmp_path / "v1.pt"))


def test_a_truncated_packed_file_is_refused_in_one_line(tmp_path):
    path, _ = packed_file(tmp_path)
    blob = path.read_bytes()
    for cut in (len(blob) // 2, len(blob) - 30, 100):
        path.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError) as e:
            load_packed(path)
        assert one_line(e).startswith(f"packed checkpoint {path} is corrupt or truncated ("), e


def test_flipped_bytes_in_a_packed_file_are_refused_in_one_line(tmp_path):
    path, _ = packed_file(tmp_path)
    raw = torch.load(path, weights_only=True)
    blob = bytearray(path.read_bytes())
    info = codes_member(path, raw["codes"])
    start = member_start(bytes(blob), info)
    blob[start + 3] ^= 0x01  # two codes changed: torch's zip reader does not check its CRCs
    blob[start + info.file_size - 1] ^= 0x80
    path.write_bytes(bytes(blob))
    assert not torch.equal(torch.load(path, weights_only=True)["codes"], raw["codes"])
    with pytest.raises(CheckpointError) as e:
        load_packed(path)
    assert one_line(e) == (
        f"{path} is damaged: its tensors or data do not match the checksum written with it "
        "(use another copy, or write it again)"
    )


def test_random_corruptions_of_a_packed_file_are_refused_or_load_the_original(tmp_path):
    path, _ = packed_file(tmp_path)
    original = checksum(load_packed(path))
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        tensors = [i for i in z.infolist() if "/data/" in i.filename and i.file_size]
    rng = random.Random(0)
    outcomes = {"refused": 0, "damaged": 0, "accepted": 0}
    for k in range(60):
        b = bytearray(blob)
        mode = ("truncate", "flip", "tensor")[k % 3]
        if mode == "truncate":
            b = b[: rng.randrange(len(b))]
        elif mode == "flip":
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= rng.randint(1, 255)
        else:
            info = rng.choice(tensors)
            b[member_start(blob, info) + rng.randrange(info.file_size)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(b))
        try:
            got = load_packed(path)
        except CheckpointError as e:
            msg = str(e)
            assert msg and "\n" not in msg and str(path) in msg, (k, mode, msg)
            outcomes["refused"] += 1
            outcomes["damaged"] += "is damaged" in msg
        else:  # only bytes nobody reads were hit
            assert checksum(got) == original, (k, mode)
            outcomes["accepted"] += 1
    assert outcomes["damaged"] >= 20 and outcomes["refused"] >= 45, outcomes


def test_a_file_that_is_no_packed_file_is_named_in_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    model = quantized("resnet20", {"kind": "lsq", "bits": 4}, channels=[4] * 9)
    ckpt = save_checkpoint(tmp_path / "best.pt", checkpoint_state(model))
    torch.save({"epoch": 3, "acc": 91.0}, tmp_path / "dict.pt")
    expected = "expected a packed checkpoint (the packed.pt that pack.py writes)"
    cases = {
        text: f"{text} is a text file (it begins 'hello'), not a packed checkpoint: {expected}",
        ckpt: f"{ckpt} is a 'compress/1' checkpoint, not a 'compress-packed/1' packed "
        f"checkpoint: pack it first (python pack.py ckpt={ckpt})",
        tmp_path / "dict.pt": f"{tmp_path / 'dict.pt'} is not a packed checkpoint (a dict with "
        "keys epoch, acc; no 'compress-packed/1' format tag)",
        tmp_path / "no.pt": f"packed checkpoint {tmp_path / 'no.pt'} does not exist",
        tmp_path: f"{tmp_path} is a directory, not a packed checkpoint file: {expected}",
    }
    for path, want in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_packed(path)
        assert one_line(e) == want


def test_pack_py_refuses_a_damaged_packed_file_in_one_line(entry, tmp_path, monkeypatch):
    """pack.py reads its packed file back to prove the round trip: damage between the write
    and the read (a bad disk) is one line and exit 2; so is a packed file passed as ckpt=."""
    model = quantized("resnet20", {"kind": "lsq", "bits": 4}, channels=[4] * 9)
    ckpt = save_checkpoint(tmp_path / "best.pt", checkpoint_state(model))
    real = pack.save_packed

    def save_and_damage(path, state):
        path = real(path, state)
        blob = bytearray(path.read_bytes())
        info = codes_member(path, torch.load(path, weights_only=True)["codes"])
        blob[member_start(bytes(blob), info)] ^= 0x10
        path.write_bytes(bytes(blob))
        return path

    monkeypatch.setattr(pack, "save_packed", save_and_damage)
    code, _, err = entry("pack", f"ckpt={ckpt}", run_dir=tmp_path / "run")
    packed = tmp_path / "run" / "packed.pt"
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.strip() == (
        f"error: {packed} is damaged: its tensors or data do not match the checksum written "
        "with it (use another copy, or write it again)"
    )
    assert not (tmp_path / "run" / "metrics.json").exists()
    code, _, err = entry("pack", f"ckpt={packed}", run_dir=tmp_path / "run2")
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.strip() == (
        f"error: {packed} is a 'compress-packed/1' file, not a 'compress/1' checkpoint "
        "(pack.py's packed file: pass the checkpoint pack.py read)"
    )


class _OffScale(nn.Module):
    """A scaled sign quantizer whose scale is the channel mean of |w| times (1 + 2^-20): the
    stored scale is then not what the original total gives, so the latent total must be
    searched for (a few float32 steps below the first guess)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(w.shape[0], -1)
        count = (flat != 0).sum(1).clamp_min(1)
        scale = flat.abs().sum(1) / count * (1 + 2**-20)
        return (torch.sign(flat) * scale[:, None]).reshape(w.shape)


def test_latent_weights_are_found_when_the_first_guess_misses():
    torch.manual_seed(0)
    quant = _OffScale()
    target = quant(torch.randn(16, 8, 3, 3))
    w = pack._fit_scaled(quant, target)
    assert torch.equal(quant(w), target)  # every channel, to the bit
    assert torch.equal(torch.sign(w), torch.sign(target))


def test_payload_bytes_add_codes_scales_and_floats():
    torch.manual_seed(0)
    model = create_model("resnet20", channels=[8] * 9)
    quantize_(model, {"weight": {"kind": "ternary"}, "act": {"kind": "dorefa", "bits": 2}})
    state = pack.pack_model(model)
    sizes = pack.payload_bytes(state)
    packed = state["packed"].values()
    codes = sum(e["codes"].numel() for e in packed)  # uint8 codes: one byte each
    scales = 4 * sum(e["scale"].numel() for e in packed)  # ternary: fp32 scale per channel
    floats = sum(v.numel() * v.element_size() for v in state["float"].values())
    assert scales > 0 and codes > 0 and floats > 0
    assert sizes == {
        "codes": codes,
        "scales": scales,
        "float": floats,
        "total": codes + scales + floats,
    }


@pytest.mark.parametrize("bits", [2, 4])
def test_a_dorefa_layer_of_zero_weights_round_trips(bits):
    # a dead layer: max|tanh(w)| is below DoReFa's clamp, so its quantized weights are not
    # +-1 at the top (2 bits: 1/3 everywhere); the latent weights rebuilt for it must be too
    model = quantized("resnet20", {"kind": "dorefa", "bits": bits}, {"kind": "dorefa", "bits": 4})
    layer = dict(packable_layers(model))["layers.1.conv1"]
    with torch.no_grad():
        layer.weight.zero_()
    assert layer.quantized_weight().abs().max() < 1
    assert_round_trip(model, pack_model(model))


def test_a_packed_layer_of_another_kind_than_the_rebuilt_one_is_refused():
    model = quantized("resnet20", {"kind": "dorefa", "bits": 4}, {"kind": "dorefa", "bits": 4})
    state = pack_model(model)
    name = next(iter(state["packed"]))
    state["packed"][name]["kind"] = "ternary"
    with pytest.raises(CheckpointError, match=rf"packed layer {name} \(ternary\) does not fit"):
        unpack_model(state)
