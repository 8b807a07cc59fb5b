"""Real file sizes of packed low-bit checkpoints against ordinary fp32 ones.

python bench/pack_size.py [--runs nin_gc:wbab,nin:w2a2,resnet20:w4a4,resnet20:wtab]

Each model gets random weights (sizes do not depend on the values: torch.save does not
compress), is quantized with conf/quant/NAME.yaml, and is written twice with torch.save into a
temporary folder: its ordinary checkpoint (spec + fp32 latent weights) and its packed file
(compress.pack). The whole-model ratio includes what stays fp32 (first and last layers, BN,
biases); the low-bit-layer columns compare only the quantized layers' weights, as files of
their own (fp32 weights against packed codes + per-channel scales).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from compress.metrics import size_bytes
from compress.models import create_model
from compress.pack import (
    file_bytes,
    fp32_checkpoint_bytes,
    pack_model,
    packable_layers,
    to_disk,
    unpack_model,
)
from compress.quant import quantize_

CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"


def quant_cfg(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    return {k: v for k, v in cfg.items() if k not in ("defaults", "name")}


def measure(model_name: str, quant: str) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name)
    quantize_(model, quant_cfg(quant))
    model.eval()
    state = pack_model(model)
    back = unpack_model(state).eval()  # the round trip is exact: checked here too
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    layers = packable_layers(model)
    fp32_layers = {n: m.weight.detach() for n, m in layers}
    raw = sum(
        e["codes"].numel() + (0 if e["scale"] is None else 4 * e["scale"].numel())
        for e in state["packed"].values()
    )
    return {
        "fp32_file": fp32_checkpoint_bytes(model),
        "packed_file": file_bytes(to_disk(state)),
        "size_bytes": size_bytes(model),
        "layers": len(layers),
        "layers_fp32_file": file_bytes(fp32_layers),
        "layers_packed_file": file_bytes(to_disk({"packed": state["packed"]})),
        "layers_fp32_raw": sum(4 * math.prod(e["shape"]) for e in state["packed"].values()),
        "layers_packed_raw": raw,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="nin_gc:wbab,nin:w2a2,resnet20:w4a4,resnet20:wtab")
    args = ap.parse_args()
    print(
        "| model | quant | fp32 file B | packed file B | ratio | size_bytes (computed) | "
        "low-bit layers | their fp32 file B | their packed file B | ratio (raw bytes) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in args.runs.split(","):
        model_name, quant = run.split(":")
        m = measure(model_name, quant)
        print(
            f"| {model_name} | {quant} | {m['fp32_file']:,} | {m['packed_file']:,} | "
            f"{m['fp32_file'] / m['packed_file']:.1f}x | {m['size_bytes']:,} | {m['layers']} | "
            f"{m['layers_fp32_file']:,} | {m['layers_packed_file']:,} | "
            f"{m['layers_fp32_file'] / m['layers_packed_file']:.1f}x "
            f"({m['layers_fp32_raw'] / m['layers_packed_raw']:.1f}x) |"
        )


if __name__ == "__main__":
    main()
