"""Every torchvision classifier through the whole tool: build, prune 40% by filter L1 norms
(thinned vs the model with the removed channels' input columns zeroed in their readers),
quantize 4-bit LSQ at every layer input (distinct values each quantized layer multiplies),
fold BNs (fused vs unfused), export to ONNX and run it in ONNX Runtime (vs PyTorch).

    python bench/zoo.py [--models a b ...] [--out bench/results/zoo]   # resumes model by model

Writes OUT.jsonl (one line per model, as it finishes; a rerun skips the models there) and
OUT.md, the table docs/zoo.md shows. tests/test_zoo.py runs `check` per model (make test-slow).
Errors are results: a stage that fails records its one-line reason and the next stage runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.deploy.onnx_export import cpu_isa, export_onnx, ort_run, session  # noqa: E402
from compress.fuse import fuse_bn_  # noqa: E402
from compress.metrics import count_params  # noqa: E402
from compress.models import create_model  # noqa: E402
from compress.prune import channel_graph, l1_importance, select_channels, thin  # noqa: E402
from compress.quant import QConv2d, QLinear, quantize_  # noqa: E402
from compress.quant.api import input_report  # noqa: E402

SIZE = 64
# models whose input size is part of their architecture, or that need more than SIZE
SIZES = {"inception_v3": 80, "vit_h_14": 70, "maxvit_t": 224}  # maxvit: 7x7 windows at /32
BUILD_KW = {
    "vit_b_16": {"image_size": SIZE},
    "vit_b_32": {"image_size": SIZE},
    "vit_l_16": {"image_size": SIZE},
    "vit_l_32": {"image_size": SIZE},
    "vit_h_14": {"image_size": 70},
    "maxvit_t": {"input_size": (224, 224)},
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "googlenet": {"aux_logits": False, "init_weights": False},
}
PERCENT = 0.4
DEFAULT_OUT = ROOT / "bench" / "results" / "zoo"
DOC_HEAD = """# The torchvision zoo

[README](../README.md) > the torchvision zoo.

Each torchvision classifier (random weights, BN statistics and layer scales randomized, 10
classes) through every stage, by `python bench/zoo.py` (this page is its output;
tests/test_zoo.py checks a sample of it in `make test-slow`, `COMPRESS_ZOO=all` every model):

- **after 40%**: parameters left when each layer loses 40% of its prunable channels by filter
  L1 norm (`pruner.importance=l1 pruner.scope=layer`, at least 10% kept); **frozen**: the share
  of conv / linear output channels no pruning can remove (`prune.py` prints why);
  **thinned vs reference**: the largest logit difference between the thinned model and the
  original with the removed channels' input columns zeroed in their readers, relative to the
  largest logit (float rounding when the thinning is exact).
- **quantized layers / float inputs / max levels**: 4-bit LSQ weights and activations with
  `quant.act.sites=inputs`: how many layers are quantized, how many still read a float input,
  and the most distinct values any quantized layer's input held in one forward pass (a 4-bit
  grid has 16).
- **fused vs unfused**: BN folding; **ORT vs PyTorch**: the float model exported to ONNX and run
  in ONNX Runtime. Both relative to the largest logit.

"""
LSQ4 = {"kind": "lsq", "bits": 4}


def models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, source="torchvision", num_classes=10, **BUILD_KW.get(name, {}))
    return randomize_norms_(model).eval()


@torch.no_grad()
def randomize_norms_(model: nn.Module) -> nn.Module:
    """BN statistics and scales that are not all 1 / 0, layer scales near 1 (ConvNeXt's 1e-6
    would hide its blocks): a wrongly thinned channel then shows in the outputs."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    for name, p in model.named_parameters():
        if name.endswith("layer_scale"):
            p.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def columns_zeroed(model: nn.Module, graph: Any, keep: list[torch.Tensor]) -> nn.Module:
    """`model` with the input columns of every conv / linear layer that reads a dropped channel
    zeroed: what deleting those channels computes, whatever produces them (BN or not, any
    activation). Depthwise layers pass a channel on; their readers are zeroed instead."""
    out = copy.deepcopy(model)
    dropped: set[int] = set()
    for g, k in zip(graph.groups, keep, strict=True):
        kept = set(k.tolist())
        dropped |= {r for i, r in enumerate(g.classes) if i not in kept}
    for name, layer in graph.walker.layers.items():
        m = out.get_submodule(name)
        if not isinstance(m, nn.Conv2d | nn.Linear) or name in graph.walker.depthwise:
            continue
        w = m.weight
        per_group = w.shape[1]  # input channels per conv group (all of them for a linear)
        out_per_group = w.shape[0] // (getattr(m, "groups", 1) or 1)
        for i, a in enumerate(layer.inputs or []):
            if graph.atoms.find(a) in dropped:
                grp = i // per_group
                w[grp * out_per_group : (grp + 1) * out_per_group, i % per_group] = 0.0
    return out


def levels_read(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Distinct values in the input each quantized layer computes with, from one forward."""
    seen: dict[str, int] = {}

    def hook(name: str):
        def record(layer: nn.Module, args: tuple) -> None:
            v = layer.read_input(args[0]).detach()
            seen[name] = max(seen.get(name, 0), int(torch.unique(v).numel()))

        return record

    handles = [
        m.register_forward_pre_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, QConv2d | QLinear)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def check(name: str) -> dict[str, Any]:
    """One model through every stage; each stage's numbers, or its error in one line."""
    size = SIZES.get(name, SIZE)
    shape = (3, size, size)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": name, "input": size}
    try:
        model = build(name)
    except Exception as e:  # a result too: the table says why
        row["build_error"] = _first_line(e)
        return row
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    row["params"] = count_params(model)
    # prune: thinned == masked (BN scale and shift of the dropped channels zeroed)
    try:
        graph = channel_graph(model, shape, require_bn=False)  # l1 needs no BN
        frozen, total, why = graph.frozen_channels()
        row["frozen_share"] = round(frozen / total, 4)
        row["frozen_top"] = next(iter(why), None)
        keep = select_channels(
            graph, "normal", PERCENT, importance=l1_importance, scope="layer", min_ratio=0.1
        )
        small = thin(model, keep, shape, require_bn=False).eval()
        with torch.no_grad():
            row["prune_rel_diff"] = _rel(columns_zeroed(model, graph, keep)(x), small(x))
        row["params_pruned"] = count_params(small)
    except Exception as e:  # a result: why this model does not prune
        row["prune_error"] = _first_line(e)
    # quantize at every layer input: each quantized layer's input at <= 16 levels
    try:
        q = copy.deepcopy(model)
        quantize_(q, {"weight": LSQ4, "act": {**LSQ4, "sites": "inputs"}})
        q.train()
        with torch.no_grad():
            q(x)
        q.eval()
        report = input_report(q) or {"kbit_inputs": 0, "float_inputs": {}}
        levels = levels_read(q, x)
        row["quant_layers"] = len(levels)
        row["quant_float_inputs"] = len(report["float_inputs"])
        row["quant_max_levels"] = max(levels.values()) if levels else None
    except Exception as e:
        row["quant_error"] = _first_line(e)
    # fuse: folded == unfolded
    try:
        fused = copy.deepcopy(model)
        fuse_bn_(fused)
        with torch.no_grad():
            row["fuse_rel_diff"] = _rel(ref, fused.eval()(x))
    except Exception as e:
        row["fuse_error"] = _first_line(e)
    # ONNX -> ONNX Runtime == PyTorch
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / f"{name}.onnx", shape)
            out = torch.from_numpy(ort_run(session(path), x))
        row["onnx_rel_diff"] = _rel(ref, out)
    except Exception as e:
        row["onnx_error"] = _first_line(e)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _cell(row: dict[str, Any], key: str, fmt: str = "{:.1e}") -> str:
    if f"{key}_error" in row:  # the whole line: it says what was frozen and why
        return "error: " + row[f"{key}_error"].replace("|", "/")[:300]
    v = row.get(f"{key}_rel_diff")
    return "" if v is None else fmt.format(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | input | params | after 40% (l1, per layer) | frozen | thinned vs reference | "
        "quantized layers | float inputs | max levels (<= 16) | fused vs unfused | "
        "ORT vs PyTorch |\n|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|\n"
    )
    lines = []
    for r in rows:
        if "build_error" in r:
            error = r["build_error"].replace("|", "/")[:80]
            lines.append(f"| {r['model']} | {r['input']} | error: {error} |" + " |" * 8)
            continue
        pruned = f"{r['params_pruned'] / r['params']:.1%}" if "params_pruned" in r else ""
        frozen = f"{r['frozen_share']:.0%}" if "frozen_share" in r else ""
        quant = (
            ["error: " + r["quant_error"].replace("|", "/")[:80], "", ""]
            if "quant_error" in r
            else [str(r["quant_layers"]), str(r["quant_float_inputs"]), str(r["quant_max_levels"])]
        )
        lines.append(
            f"| {r['model']} | {r['input']} | {r['params'] / 1e6:.1f} M | {pruned} | {frozen} | "
            f"{_cell(r, 'prune')} | {' | '.join(quant)} | {_cell(r, 'fuse')} | "
            f"{_cell(r, 'onnx')} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="default: every torchvision classifier")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done_file = out.with_suffix(".jsonl")
    done = {}
    if done_file.exists():
        for line in done_file.read_text().splitlines():
            r = json.loads(line)
            done[r["model"]] = r
    for name in args.models or models():
        if name in done:
            continue
        row = check(name)
        done[name] = row
        with done_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    rows = [done[n] for n in models() if n in done]  # every model measured so far
    isa = cpu_isa()
    meta = (
        f"{len(rows)} models, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{isa['cpu']} ({isa['isa']}), {torch.get_num_threads()} threads; written by "
        "bench/zoo.py\n\n"
    )
    out.with_suffix(".md").write_text(meta + table(rows))
    if out == DEFAULT_OUT:  # the docs page shows the committed run
        (ROOT / "docs" / "zoo.md").write_text(DOC_HEAD + meta + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
