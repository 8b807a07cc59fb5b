"""Packed low-bit checkpoints: every quantized weight stored at its real bit width.

A packed file holds, as plain tensors and builtins (`torch.load(weights_only=True)`), the
model's spec (`compress.spec.model_spec`), the float tensors of everything that is not a
quantized weight (first / last layers kept fp32, BN, biases, PACT alphas) and, per quantized
conv / linear layer, the integer code of every weight packed densely into uint8 bytes, with
one fp32 scale per output channel where the quantizer has one:

    kind     bits  code        value (exactly as compress.quant.primitives computes it)
    binary   1     {0, 1}      (2 code - 1) * scale[c]           (unscaled: 2 code - 1)
    ternary  2     {0, 1, 2}   (code - 1) * scale[c]             (unscaled: code - 1)
    dorefa   k     [0, 2^k-1]  2 * (code / (2^k - 1)) - 1        (per layer, no scale)
    lsq      k     [0, Q_N+Q_P] (code - Q_N) * max(step[c], TINY) (the learned step, per channel)

The scale is read off the quantized weight (|q| per channel), the codes from its signs
(binary, ternary) or its level (DoReFa); LSQ's are its own codes and learned step (which is
stored once, as the scale, not also among the float tensors). `pack_model` checks that the
decoded values are bit-identical to `quantized_weight()` before it writes anything.

Unpacking rebuilds the quantized model from its spec and chooses latent weights that the
layer's own quantizer maps back to the stored values bit-exactly (verified per layer):
- binary / ternary, unscaled: the values themselves (sign and the TWN threshold are idempotent:
  by Markov's inequality the threshold gap * mean|q| stays below 1).
- binary / ternary, scaled: not the values themselves: the quantizer recomputes the scale as
  (sum of |w| over the channel) / count, and n copies of a float do not sum to n times it in
  floating point (about half the channels of a random layer come back one ulp off). Instead
  each channel's magnitudes are integer multiples of g = ulp(T) that differ by at most g and
  sum to a float32 total T, so every partial sum is exact in any summation order (threads,
  vector lanes), and T is bisected over its float bits until T / count rounds to the stored
  scale (the original sum is such a T). The latent weights are within ulp(T) of the values.
- LSQ: the values themselves (codes * step divided by the step rounds back to the codes), and
  the stored step as the quantizer's step.
- DoReFa: atanh(level / 2). DoReFa quantizes tanh(w) / max|tanh(w)|, so the levels themselves
  are not a fixed point (tanh bends them by up to 13 levels at 8 bits); their atanh is.
- binary with `center`: the codes already hold the signs of the centred weights, so the
  unpacked model's quantizer has center=false (in its layers and its quant config), as for a
  BN-fused binary layer.
The fitted latent weights assume IEEE division by the count on the device that evaluates the
quantizer (the CPU does); the stored codes and scales are exact everywhere.

A packed file says what it is, as a checkpoint does (compress.checkpoint, whose helpers write
and read it): its format tag, a `version` and a SHA-256 `checksum` over everything in it.
`load_packed` identifies the file before it trusts it and verifies the checksum, so a text file,
a regular checkpoint, a truncated file or flipped bytes are refused in one line naming the file.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import FORMAT as CKPT_FORMAT
from compress.checkpoint import (
    describe_object,
    is_checkpoint,
    load_checkpoint,
    read_torch_file,
    save_checkpoint,
    verify,
)
from compress.cli import write_json
from compress.errors import CheckpointError, ConfigError
from compress.fuse import apply_fused_structure_
from compress.metrics import size_bytes
from compress.models import create_from_arch
from compress.prune import apply_widths_
from compress.prune.graph import PruneError
from compress.quant import quantize_
from compress.quant.api import applied_label, quant_label
from compress.quant.int8 import W_QMAX, int8_weight_codes
from compress.quant.lsq import TINY, weight_bounds
from compress.quant.modules import QConv2d, QLinear
from compress.spec import (
    arch_name,
    checkpoint_state,
    load_error_line,
    model_from_checkpoint,
    model_spec,
)

FORMAT = "compress-packed/1"
# 1: no checksum (written before packed files carried one; still read); 2: `checksum`
VERSION = 2
WHAT = "packed checkpoint"
EXPECTED = "expected a packed checkpoint (the packed.pt that pack.py writes)"
KINDS = ("binary", "ternary", "dorefa", "lsq", "int8")
_BISECT_SPAN = 1 << 12  # how far (in float32 units in the last place) the sum is searched
_BISECT_STEPS = 16
_DOREFA_TINY = 1e-12  # DoReFa's clamp of max|tanh(w)|


# ---------------------------------------------------------------- bit packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) densely into uint8, most significant bit first: one
    bitstream of numel * bits bits, zero-padded to whole bytes (8 / bits codes per byte for 1, 2,
    4 and 8 bits; codes of other widths straddle bytes)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits={bits}: expected 1..32")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{flat.min()}, {flat.max()}]")
    shifts = torch.arange(bits - 1, -1, -1, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = -stream.numel() % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (stream.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` codes of `bits` bits each from `pack_bits`'s output (int64)."""
    if data.numel() * 8 < n * bits:
        raise ValueError(f"{data.numel()} bytes hold fewer than {n} codes of {bits} bits")
    shifts = torch.arange(7, -1, -1, device=data.device, dtype=torch.uint8)
    stream = ((data.reshape(-1, 1) >> shifts) & 1).reshape(-1)[: n * bits]
    planes = stream.view(n, bits).to(torch.int64)
    place = 1 << torch.arange(bits - 1, -1, -1, device=data.device, dtype=torch.int64)
    return (planes * place).sum(1)


# ---------------------------------------------------------------- codes per layer
def packable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv / linear layers whose weight quantizer is not fp32, in registration order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, QConv2d | QLinear) and m.weight_quant.kind != "fp32"
    ]


def _per_channel(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast against a `dim`-d weight."""
    return scale.reshape(-1, *([1] * (dim - 1)))


def dequantize(entry: dict[str, Any]) -> torch.Tensor:
    """The quantized weight a packed layer entry stands for (bit-identical to the quantizer's
    output: the same float operations in the same order)."""
    kind, bits, shape = entry["kind"], entry["bits"], tuple(entry["shape"])
    dtype = getattr(torch, entry.get("dtype", "float32"))
    codes = unpack_bits(entry["codes"], bits, math.prod(shape)).view(shape)
    if kind == "dorefa":
        n = float(2**bits - 1)
        return 2 * (codes.to(dtype) / n) - 1
    if kind == "lsq":  # as the forward: integer levels times the clamped step, in fp32
        level = (codes - weight_bounds(bits)[0]).float()
        step = entry["scale"].float().clamp_min(TINY)
        return (level * _per_channel(step, level.dim())).to(dtype)
    if kind == "int8":  # as int8_weight: codes times the per-channel scale in fp32
        level = (codes - W_QMAX).float()
        return (level * _per_channel(entry["scale"].float(), level.dim())).to(dtype)
    if kind == "binary":
        level = (2 * codes - 1).to(dtype)
    elif kind == "ternary":
        level = (codes - 1).to(dtype)
    else:
        raise ValueError(f"unknown packed kind {kind!r}: expected one of {', '.join(KINDS)}")
    scale = entry.get("scale")
    return level if scale is None else level * _per_channel(scale.to(dtype), level.dim())


@torch.no_grad()
def pack_layer(layer: nn.Module, name: str = "layer") -> dict[str, Any]:
    """{kind, bits, shape, dtype, codes (uint8), scale (fp32 per channel or None)} of one
    quantized layer, checked to decode to its quantized weight bit-exactly."""
    wq = layer.weight_quant
    kind, bits = wq.kind, int(wq.bits)
    q = layer.quantized_weight().detach()
    per_channel = q.reshape(q.shape[0], -1)
    scale = None
    if kind == "binary":
        codes = (q >= 0).to(torch.int64)
    elif kind == "ternary":
        codes = torch.sign(q).to(torch.int64) + 1
    elif kind == "dorefa":
        n = 2**bits - 1
        codes = torch.round((q.double() + 1) / 2 * n).clamp_(0, n).to(torch.int64)
    elif kind == "lsq":
        codes = wq.codes(layer.weight).to(torch.int64) + wq.qn
        scale = wq.step.detach().float().clone()
    elif kind == "int8":  # [-127, 127] stored as 0 .. 254
        int8_codes, scale = int8_weight_codes(layer.weight)
        codes = int8_codes.to(torch.int64) + W_QMAX
    else:
        raise ValueError(f"{name}: weight quantizer {kind!r} cannot be packed")
    if kind in ("binary", "ternary") and wq.scaled:
        scale = per_channel.abs().amax(1).float()
    entry = {
        "kind": kind,
        "bits": bits,
        "shape": list(q.shape),
        "dtype": str(q.dtype).removeprefix("torch."),
        "codes": pack_bits(codes, bits),
        "scale": scale,
    }
    if not torch.equal(dequantize(entry), q):
        raise ValueError(
            f"{name}: its {kind} weights are not the values a {bits}-bit code represents "
            "(was the model changed after quantization?)"
        )
    return entry


def pack_model(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """The packed state of a quantized model: spec, float tensors, packed layers, `extra`."""
    layers = packable_layers(model)
    packed = {name: pack_layer(m, name) for name, m in layers}
    skip = {f"{name}.weight" for name in packed}
    skip |= {f"{name}.weight_quant.step" for name, e in packed.items() if e["kind"] == "lsq"}
    floats = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in skip}
    return {"format": FORMAT, **model_spec(model), "float": floats, "packed": packed, **extra}


# ---------------------------------------------------------------- latent weights
def _exact_rows(sign: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Rows whose magnitudes sum to `total` (float32, one per row) exactly in any order: the
    nonzero entries of `sign` get integer multiples of g = ulp(total) that differ by at most g,
    so every partial sum is a multiple of g below 2^24 g, which float32 holds exactly."""
    nz = sign != 0
    count = nz.sum(1, dtype=torch.int64)
    t = total.double()
    ulp = torch.ldexp(torch.ones_like(t), torch.frexp(t)[1].to(torch.int64) - 24)
    ulp = torch.where(t > 0, ulp, torch.ones_like(t))
    k = torch.round(t / ulp).to(torch.int64)
    base = k // count.clamp_min(1)
    extra = k - base * count
    rank = torch.cumsum(nz, 1) - 1  # position among the row's nonzero entries
    mult = base[:, None] + (rank < extra[:, None]).to(torch.int64)
    return (sign.double() * mult.double() * ulp[:, None]).float()


@torch.no_grad()
def _fit_scaled(quant: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """Latent weights that the scaled binary / ternary quantizer `quant` maps to `target`
    exactly. The quantizer's scale is (sum of |w| over a channel) / count, so the latent rows
    are built to sum exactly (in any summation order) to a float32 total T, and T is bisected
    over its float bits until T / count rounds to the stored scale; T = the original sum does."""
    c = target.shape[0]
    want = target.reshape(c, -1)
    sign = torch.sign(want)
    count = (want != 0).sum(1)
    scale = want.abs().amax(1)
    start = (scale.double() * count).float().view(torch.int32).to(torch.int64)
    lo, hi = start - _BISECT_SPAN, start + _BISECT_SPAN
    best, done = start.clone(), torch.zeros(c, dtype=torch.bool)
    w = target.clone()
    for step in range(_BISECT_STEPS):
        bits = start if step == 0 else torch.where(done, best, (lo + hi) // 2)
        w.view(c, -1).copy_(_exact_rows(sign, bits.to(torch.int32).view(torch.float32)))
        out = quant(w).detach().reshape(c, -1)
        ok = (out == want).all(1)
        best = torch.where(ok & ~done, bits, best)
        done |= ok
        if bool(done.all()):
            break
        got = out.abs().amax(1)
        lo = torch.where(~done & (got < scale), bits + 1, lo)
        hi = torch.where(~done & (got > scale), bits - 1, hi)
    w.view(c, -1).copy_(_exact_rows(sign, best.to(torch.int32).view(torch.float32)))
    return w


def _fit_int8(target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Latent weights that INT8 QAT's quantizer (scale = max |w| / 127 per channel) maps to
    `target` = codes * scale exactly: the codes' values, with each channel's +-127 entries at
    the float m nearest 127 * scale for which m / 127 rounds back to the scale."""
    c = target.shape[0]
    want = scale.float().reshape(c, 1)
    m = want * W_QMAX
    for _ in range(8):  # at most a few float steps away
        off = m / W_QMAX
        if bool((off == want).all()):
            break
        m = torch.where(off < want, torch.nextafter(m, m + 1), m)
        m = torch.where(off > want, torch.nextafter(m, m - 1), m)
    w = target.clone().reshape(c, -1)
    top = w.abs() == (want * W_QMAX)  # the +-127 codes
    w = torch.where(top, torch.sign(w) * m, w)
    return w.reshape(target.shape).to(target.dtype)


def latent_weight(entry: dict[str, Any], quant: nn.Module) -> torch.Tensor:
    """Latent weights that `quant` (the layer's weight quantizer) maps to the entry's values."""
    target = dequantize(entry)
    kind = entry["kind"]
    if kind == "int8":
        return _fit_int8(target, entry["scale"])
    if kind == "dorefa":
        top = target.abs().max()
        if top == 1:
            return torch.atanh(target / 2)
        return target * _DOREFA_TINY  # all |w| below DoReFa's clamp: tanh is the identity there
    if kind == "lsq" or entry.get("scale") is None:
        return target
    return _fit_scaled(quant, target)


def _unpack_quant_config(quant: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec's quant config with binary centring off (the codes are the centred signs)."""
    if not quant:
        return quant
    quant = copy.deepcopy(dict(quant))
    weight = dict(quant.get("weight") or {})
    if weight.get("kind") == "binary" and weight.get("center"):
        weight["center"] = False
        quant["weight"] = weight
    return quant


@torch.no_grad()
def unpack_model(state: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized model of a packed state; every packed layer's `quantized_weight()`
    equals the stored values bit-exactly (checked; ValueError otherwise)."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"not a packed checkpoint (no '{FORMAT}' format tag)")
    spec = {
        "arch": state["arch"],
        "widths": state.get("widths"),
        "quant": _unpack_quant_config(state.get("quant")),
        "fused": state.get("fused"),
    }
    weights = dict(state["float"])
    model = _structure(spec)
    for name, entry in state["packed"].items():
        layer = model.get_submodule(name)
        if not isinstance(layer, QConv2d | QLinear) or layer.weight_quant.kind != entry["kind"]:
            raise CheckpointError(
                f"packed layer {name} ({entry['kind']}) does not fit the rebuilt "
                f"{arch_name(spec['arch'])}"
            )
        weights[f"{name}.weight"] = latent_weight(entry, layer.weight_quant)
        if entry["kind"] == "lsq":  # the step is stored once, as the scale
            weights[f"{name}.weight_quant.step"] = entry["scale"].clone()
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"packed weights do not fit its {arch_name(spec['arch'])} architecture: "
            + load_error_line(e)
        ) from None
    for name, entry in state["packed"].items():
        layer = model.get_submodule(name)
        if not torch.equal(layer.quantized_weight(), dequantize(entry)):
            raise ValueError(f"{name}: the unpacked quantized weights are not bit-identical")
    return model


def _structure(spec: dict[str, Any]) -> nn.Module:
    """The model that the spec describes, with its initial weights (to read its quantizers)."""
    model = create_from_arch(spec["arch"])
    if spec.get("widths"):
        try:
            apply_widths_(model, spec["widths"])
        except PruneError as e:
            raise CheckpointError(f"widths do not fit {arch_name(spec['arch'])}: {e}") from None
        model.pruned_widths = dict(spec["widths"])
    if spec.get("quant"):
        quantize_(model, spec["quant"])
    if spec.get("fused"):
        apply_fused_structure_(model, spec["fused"])
    return model


def quantized_layer_names(state: dict[str, Any]) -> list[str]:
    """The layers a checkpoint's quant config quantizes (before any BN fold)."""
    if not state.get("quant"):
        return []
    spec = {**{k: state.get(k) for k in ("arch", "widths", "quant")}, "fused": None}
    return [name for name, _ in packable_layers(_structure(spec))]


# ---------------------------------------------------------------- files and sizes
def to_disk(state: dict[str, Any]) -> dict[str, Any]:
    """The file layout of a packed state: the codes of all layers in one uint8 tensor and their
    scales in one fp32 tensor (each layer entry keeps its offsets), so that a file pays the
    per-tensor record overhead of torch.save twice, not twice per layer."""
    entries, codes, scales, at, scale_at = {}, [], [], 0, 0
    for name, e in state["packed"].items():
        meta = {k: v for k, v in e.items() if k not in ("codes", "scale")}
        meta["offset"], meta["nbytes"] = at, e["codes"].numel()
        at += e["codes"].numel()
        codes.append(e["codes"].reshape(-1))
        meta["scale_offset"] = None
        if e["scale"] is not None:
            meta["scale_offset"] = scale_at
            scale_at += e["scale"].numel()
            scales.append(e["scale"].reshape(-1).float())
        entries[name] = meta
    blob = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8)
    scale_blob = torch.cat(scales) if scales else torch.zeros(0)
    return {**state, "packed": entries, "codes": blob, "scales": scale_blob}


def from_disk(state: dict[str, Any]) -> dict[str, Any]:
    """Undo `to_disk`: self-contained layer entries (codes and scale are views of the blobs)."""
    codes, scales = state["codes"], state["scales"]
    entries = {}
    for name, meta in state["packed"].items():
        e = {k: v for k, v in meta.items() if k not in ("offset", "nbytes", "scale_offset")}
        e["codes"] = codes[meta["offset"] : meta["offset"] + meta["nbytes"]]
        e["scale"] = None
        if meta["scale_offset"] is not None:
            e["scale"] = scales[meta["scale_offset"] : meta["scale_offset"] + meta["shape"][0]]
        entries[name] = e
    rest = {k: v for k, v in state.items() if k not in ("codes", "scales")}
    return {**rest, "packed": entries}


def save_packed(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a packed state (`to_disk` layout) atomically, with the format tag, the version and
    the checksum (stale ones in `state`, as when a loaded packed state is saved again, are
    replaced), as `save_checkpoint` writes a checkpoint."""
    return save_checkpoint(path, to_disk(state), fmt=FORMAT, version=VERSION)


def load_packed(path: str | Path) -> dict[str, Any]:
    """Load a file written by `save_packed` (weights_only), as `pack_model` returned it, after
    its bytes say it is a packed file and its checksum says it is the one written. Anything else
    (a missing, truncated or damaged file, a text file, a regular checkpoint, ...) is refused
    with a one-line CheckpointError that names the file."""
    path = Path(path)
    state = read_torch_file(path, "cpu", EXPECTED, what=WHAT)
    # anything that claims to be a file of this project is verified first, so that a damaged
    # format tag is reported as damage, not as some other file
    if isinstance(state, dict) and (
        state.get("format") == FORMAT or isinstance(state.get("checksum"), str)
    ):
        verify(path, state, VERSION, what=WHAT)
    if is_checkpoint(state):
        raise CheckpointError(
            f"{path} is a '{CKPT_FORMAT}' checkpoint, not a '{FORMAT}' {WHAT}: pack it first "
            f"(python pack.py ckpt={path})"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a {WHAT} ({describe_object(state)}; no '{FORMAT}' format tag)"
        )
    return from_disk(state)


def payload_bytes(state: dict[str, Any]) -> dict[str, int]:
    """Raw tensor bytes of a packed state: packed codes + scales, and float tensors."""
    codes = sum(e["codes"].numel() for e in state["packed"].values())
    scales = sum(e["scale"].numel() * 4 for e in state["packed"].values() if e["scale"] is not None)
    floats = sum(v.numel() * v.element_size() for v in state["float"].values())
    return {"codes": codes, "scales": scales, "float": floats, "total": codes + scales + floats}


def file_bytes(obj: Any) -> int:
    """Size on disk of `obj` written with torch.save."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.pt"
        torch.save(obj, path)
        return path.stat().st_size


def fp32_checkpoint_bytes(model: nn.Module) -> int:
    """Size on disk of the model's ordinary (fp32 latent weights) checkpoint: spec + weights."""
    return file_bytes({"format": CKPT_FORMAT, **checkpoint_state(model)})


# ---------------------------------------------------------------- the pack task
def _layer_bytes(state: dict[str, Any]) -> dict[str, int]:
    """fp32 bytes of the packed layers' weights against their packed codes + scales."""
    fp32 = sum(4 * math.prod(e["shape"]) for e in state["packed"].values())
    packed = sum(
        e["codes"].numel() + (0 if e["scale"] is None else 4 * e["scale"].numel())
        for e in state["packed"].values()
    )
    return {"fp32": fp32, "packed": packed}


def _nothing_to_pack(ckpt: str, state: dict[str, Any]) -> CheckpointError:
    quant = state.get("quant") or {}
    kind = (quant.get("weight") or {}).get("kind", "fp32")
    if kind == "fp32":
        return CheckpointError(
            f"nothing to pack: {ckpt} holds fp32 weights (its quant is "
            f"{quant_label(quant or None)}); train with quant=wbab, wtab, w2a2, w4a4, ... "
            "(a quant.weight.kind other than fp32) to get low-bit weights"
        )
    quantized = set(quantized_layer_names(state))
    folded = [c for c, _, mode in state.get("fused") or [] if mode == "normal" and c in quantized]
    if folded:
        return CheckpointError(
            f"nothing to pack: {ckpt} is fused, and its normal BN folds multiplied each "
            "quantized weight by its BN's per-channel scale gamma / std, which made the "
            f"{kind} weights of {len(folded)} layers float; pack the checkpoint fuse.py read "
            "(before fusion) instead"
        )
    return CheckpointError(f"nothing to pack: {ckpt} has no layer with {kind} weights")


@torch.no_grad()
def pack_checkpoint(
    ckpt: str | Path | None,
    run_dir: str | Path,
    seed: int = 0,
    batch: int = 4,
    image_size: int = 32,
) -> dict[str, Any]:
    """Pack checkpoint `ckpt` into run_dir/packed.pt, prove the round trip exact on a random
    batch (max |logit diff| = 0) and write run_dir/metrics.json with the real file sizes."""

    if ckpt in (None, "", "???"):  # "???": OmegaConf's missing value
        raise ConfigError("ckpt is required: python pack.py ckpt=RUN/best.pt")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state).eval()
    if not packable_layers(model):
        raise _nothing_to_pack(str(ckpt), state)
    extra = {k: state[k] for k in ("dataset", "config", "test_acc") if k in state}
    packed_state = pack_model(model, **extra)
    path = save_packed(run_dir / "packed.pt", packed_state)
    unpacked = unpack_model(load_packed(path)).eval()
    gen = torch.Generator().manual_seed(seed)
    channels = int(state["arch"].get("in_channels", 3))
    x = torch.randn(batch, channels, image_size, image_size, generator=gen)
    diff = (model(x) - unpacked(x)).abs().max().item()
    if diff != 0:
        raise RuntimeError(f"pack round trip is not exact: max |logit diff| = {diff:.3g}")
    fp32_file = fp32_checkpoint_bytes(model)
    packed_file = path.stat().st_size
    layers = _layer_bytes(packed_state)
    folded = sorted(set(quantized_layer_names(state)) - {n for n, _ in packable_layers(model)})
    metrics = {
        "model": arch_name(model.arch),
        "quant": applied_label(model),
        "ckpt": str(ckpt),
        "packed_layers": len(packed_state["packed"]),
        "float_layers_after_fusion": folded,
        "size_bytes_ckpt_file": Path(ckpt).stat().st_size,
        "size_bytes_fp32_file": fp32_file,
        "size_bytes_packed_file": packed_file,
        "ratio": fp32_file / packed_file,
        "size_bytes": size_bytes(model),
        "size_bytes_packed_payload": payload_bytes(packed_state)["total"],
        "packed_layers_fp32_bytes": layers["fp32"],
        "packed_layers_packed_bytes": layers["packed"],
        "packed_layers_ratio": layers["fp32"] / max(layers["packed"], 1),
        "round_trip_images": batch,
        "max_abs_diff": diff,
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def table(m: dict[str, Any]) -> str:
    """The size comparison of `pack_checkpoint`'s metrics as a small text table."""
    rows = [
        ("whole model, file", m["size_bytes_fp32_file"], m["size_bytes_packed_file"], m["ratio"]),
        (
            f"{m['packed_layers']} low-bit layers",
            m["packed_layers_fp32_bytes"],
            m["packed_layers_packed_bytes"],
            m["packed_layers_ratio"],
        ),
    ]
    lines = [f"{m['model']} {m['quant']}", f"{'':24s}{'fp32 B':>12s}{'packed B':>12s}{'ratio':>8s}"]
    lines += [f"{k:24s}{a:>12d}{b:>12d}{r:>7.1f}x" for k, a, b, r in rows]
    lines.append(
        f"computed size_bytes {m['size_bytes']}; round trip exact on "
        f"{m['round_trip_images']} random images (max |logit diff| {m['max_abs_diff']:g})"
    )
    if m["float_layers_after_fusion"]:
        lines.append(
            "float after normal BN folds (not packed): " + ", ".join(m["float_layers_after_fusion"])
        )
    return "\n".join(lines)


__all__ = [
    "FORMAT",
    "dequantize",
    "file_bytes",
    "from_disk",
    "fp32_checkpoint_bytes",
    "latent_weight",
    "load_packed",
    "pack_bits",
    "pack_checkpoint",
    "pack_layer",
    "pack_model",
    "packable_layers",
    "payload_bytes",
    "quantized_layer_names",
    "save_packed",
    "table",
    "to_disk",
    "unpack_bits",
    "unpack_model",
]
