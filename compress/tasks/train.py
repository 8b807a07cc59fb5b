"""The train task: one training run from a plain config dict (no Hydra here).

Writes into the run directory `last.pt`, `best.pt`, TensorBoard events under `tb/` and
`metrics.json`. TensorBoard's HParams dashboard gets the run's compression settings and final
metrics (`run_hparams`, `log_hparams`), so the runs of a sweep compare there too. Under torchrun
(compress.distributed) every process trains its shard of the data and rank 0 alone writes these
files; the other ranks create nothing in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from compress.checkpoint import load_checkpoint
from compress.cli import write_json
from compress.config import validate_distill
from compress.data.loader import check_flip
from compress.detection.data import check_is_detector, check_model_fits_data
from compress.distill import Distiller, cross_entropy_loss
from compress.distributed import Dist, check_resume_world, init_from_env
from compress.engine import Callback, TrainConfig, fit
from compress.errors import CheckpointError, ConfigError
from compress.quant import bit_widths, is_quantized, quantize_
from compress.quant.api import applied_label, input_report
from compress.quant.api import validate as validate_quant
from compress.spec import arch_name, model_from_checkpoint
from compress.tasks.common import (
    BNSparsity,
    ClipLatentWeights,
    FreezeBN,
    build_model,
    build_teacher,
    is_detection,
    load_data,
    measure_latency,
    model_metrics,
    model_name,
    resolve_device,
    task_for,
)

log = logging.getLogger(__name__)


def run(
    cfg: dict[str, Any], run_dir: str | Path, callbacks: list[Callback] | None = None
) -> dict[str, Any]:
    """Train as `cfg` says and write the run's files; returns the metrics written.

    Under torchrun this joins the process group (unless the caller already has) and leaves it
    again at the end when it joined it here.
    """
    device = resolve_device(cfg.get("device", "auto"))
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = init_from_env(device)
    try:
        return _run(cfg, Path(run_dir), callbacks, device, dist)
    finally:
        if owned:
            dist.shutdown()


def log_float_inputs(inputs: dict[str, Any], quant_cfg: dict[str, Any]) -> None:
    """Warn that some quantized layers read float inputs, which and why (a W4A4 model whose
    layers read float is not one, and its integer export needs float paths)."""
    floats = inputs["float_inputs"]
    total = inputs["kbit_inputs"] + len(floats)
    shown = "; ".join(f"{n}: {why}" for n, why in list(floats.items())[:5])
    more = f"; ... ({len(floats)} in all)" if len(floats) > 5 else ""
    hint = (
        "; quant.act.sites=inputs quantizes them"
        if (quant_cfg.get("act") or {}).get("sites", "relu") == "relu"
        else ""
    )
    log.warning(
        "quant: %d of %d quantized layers read float inputs (%s%s)%s",
        len(floats),
        total,
        shown,
        more,
        hint,
    )


def _run(
    cfg: dict[str, Any],
    run_dir: Path,
    callbacks: list[Callback] | None,
    device: torch.device,
    dist: Dist,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    seed = int(cfg.get("seed", 0))
    sched = TrainConfig.from_dict({k: v for k, v in cfg["schedule"].items() if k != "stages"})
    quant_cfg = dict(cfg.get("quant") or {})
    validate_quant(quant_cfg)
    distill_cfg = dict(cfg.get("distill") or {})
    distilled = validate_distill(distill_cfg) == "kd"
    check_model_fits_data(dict(cfg["model"]), cfg["dataset"].get("name"))
    torch.manual_seed(seed)
    data = load_data(dict(cfg["dataset"]), seed)
    if is_detection(data):
        _check_detection_run(cfg, sched, distilled)
    if dist.is_main:
        log.info(
            "data %s: %d train / %d test images, %d classes",
            data.name,
            len(data.train),
            len(data.test),
            data.num_classes,
        )

    resume_state = None
    if cfg.get("resume"):
        last = run_dir / "last.pt"
        if not last.exists():
            raise CheckpointError(
                f"resume=true but {last} does not exist: point hydra.run.dir at the run to continue"
            )
        resume_state = load_checkpoint(last)
        check_resume_world(resume_state.get("world_size", 1), dist.world, last)
        model = model_from_checkpoint(
            resume_state, expect=model_name(cfg["model"]), quantized=False
        )
        init = resume_state.get("init") or {}
    else:
        model, _ = build_model(cfg, data)
        init = _init_record(model)
    if is_detection(data):
        what = f"model={model_name(cfg['model'])}"
        check_is_detector(model, data.name, what)
    loss_fn = None
    if distilled:  # before quantize_: `self` is the model as it starts, uncompressed
        teacher = build_teacher(cfg, data, model, resumed=resume_state is not None)
        loss_fn = Distiller(
            teacher,
            cross_entropy_loss(sched.label_smoothing),
            float(distill_cfg.get("temperature", 4.0)),
            float(distill_cfg.get("alpha", 0.9)),
        )
        if dist.is_main:
            log.info(
                "distilling from %s (T=%g, alpha=%g)",
                distill_cfg.get("teacher", "self"),
                loss_fn.temperature,
                loss_fn.alpha,
            )
    torch.manual_seed(seed)  # same data/dropout RNG whether or not the model was fresh

    sparsity = dict(cfg.get("sparsity") or {})
    hooks: list[Callback] = []
    if sparsity.get("enabled"):
        hooks.append(BNSparsity(model, float(sparsity.get("s", 1e-4)), data.image_shape))
    inputs = None
    if is_quantized(quant_cfg):
        quantize_(model, quant_cfg)
        # weight-only quantization (wba32, wta32) reads float inputs by design
        if (quant_cfg.get("act") or {}).get("kind", "fp32") != "fp32":
            inputs = input_report(model)
        if inputs and inputs["float_inputs"] and dist.is_main:
            log_float_inputs(inputs, quant_cfg)
    if quant_cfg.get("freeze_bn_epoch"):
        done = resume_state["epoch"] if resume_state else 0
        hooks.append(FreezeBN(model, int(quant_cfg["freeze_bn_epoch"]), done))
    clip = ClipLatentWeights(model)
    if clip.params:
        hooks.append(clip)
    extra = {"dataset": data.name, "config": cfg, "init": init}
    # rank 0 writes TensorBoard; the other ranks a null writer (no tb/ folder of theirs)
    tb = (
        SummaryWriter(
            str(run_dir / "tb"), purge_step=resume_state["epoch"] + 1 if resume_state else None
        )
        if dist.is_main
        else contextlib.nullcontext(None)
    )
    with tb as writer:  # open until the run's hparams and final metrics are logged too
        task = task_for(data, loss_fn, sched.label_smoothing)
        summary = fit(
            model,
            data,
            sched,
            run_dir,
            device,
            seed=seed,
            resume_state=resume_state,
            extra_state=extra,
            callbacks=[*hooks, *(callbacks or [])],
            crop_padding=int(cfg["dataset"].get("crop_padding", 4)),
            flip=check_flip(cfg["dataset"].get("flip", True)),
            writer=writer,
            dist=dist,
            task=task,
        )
        w_bits, a_bits = bit_widths(model)
        metrics = {
            "model": arch_name(model.arch),
            "dataset": data.name,
            "quant": applied_label(model),
            "w_bits": w_bits,
            "a_bits": a_bits,
            **_task_metrics(task.name, summary),
            "epochs": summary["epochs"],
        }
        if inputs:
            metrics["kbit_input_layers"] = inputs["kbit_inputs"]
            metrics["float_input_layers"] = inputs["float_inputs"]
        if init:
            metrics["init"] = init
        if distilled:
            metrics["distill"] = {
                "teacher": str(distill_cfg.get("teacher", "self")),
                "temperature": loss_fn.temperature,
                "alpha": loss_fn.alpha,
            }
        if dist.enabled:
            metrics["world_size"] = dist.world
        if not dist.is_main:  # the same numbers; the files and the model measurements are rank 0's
            dist.barrier()
            return {**metrics, "wall_s": summary["wall_s"], "history": summary["history"]}
        metrics = {
            **metrics,
            **model_metrics(model, data),
            "latency_ms": measure_latency(model, data),
            # size_bytes is computed at the quantized widths; a fake-quant checkpoint is fp32 on
            # disk (pack.py / export.py write the small files)
            "size_bytes_ckpt_file": _file_size(run_dir / "best.pt"),
            "wall_s": summary["wall_s"],
            "run_wall_s": time.perf_counter() - t_start,
            "history": summary["history"],
        }
        write_json(run_dir / "metrics.json", metrics)
        hparams = run_hparams(cfg, sched, model, metrics, dist.world)
        log_hparams(writer, hparams, hparam_metrics(metrics), metrics["epochs"])
    log.info(
        "%s after %d epochs; %d params, %.1f MMACs, %.1f KB",
        headline(metrics, sep="")[0],
        metrics["epochs"],
        metrics["params"],
        metrics["macs"] / 1e6,
        metrics["size_bytes"] / 1024,
    )
    dist.barrier()  # metrics.json is written when any rank returns
    return metrics


def headline(metrics: dict[str, Any], sep: str = ":") -> tuple[str, float]:
    """The run's result in words and as the number a sweep optimizes: test accuracy of a
    classifier, mAP of a detector. `sep` after the name: train.py prints "test accuracy: ..."
    once per run (scripts look for it), the log says it without."""
    if "map" in metrics:
        text = f"test mAP{sep} {metrics['map']:.2f} (best {metrics['best_map']:.2f})"
        return text, metrics["map"]
    text = f"test accuracy{sep} {metrics['test_acc']:.2f}% (best {metrics['best_test_acc']:.2f}%)"
    return text, metrics["test_acc"]


def _task_metrics(task: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The final metrics of metrics.json: test_acc, best_test_acc (and test_acc_tta) of a
    classifier; map, map50, map75, map_small / medium / large and best_map of a detector."""
    if task == "classification":
        keys = ("test_acc", "best_test_acc", "test_acc_tta")
        return {k: summary[k] for k in keys if k in summary}
    out = {k.removeprefix("test_"): v for k, v in summary.items() if k.startswith("test_")}
    return {**out, "best_map": summary["best_test_map"]}


def _check_detection_run(cfg: dict[str, Any], sched: TrainConfig, distilled: bool) -> None:
    """What a detector does not train with yet, each one line (rather than a wrong run)."""
    if distilled:
        raise ConfigError("distill=kd distils classifiers' logits: a detector has none")
    if sched.tta:
        raise ConfigError("schedule.tta=true is for classifiers: a detector has no flip TTA")


# ---------------------------------------------------------------- TensorBoard's HParams
HParam = bool | int | float | str
# metrics.json keys logged as the run's HParams metrics, under hparam/ (scalar tags of their
# own: fit's are train/..., test/...)
HPARAM_METRICS = ("test_acc", "best_test_acc", "map", "map50", "best_map")
HPARAM_METRICS += ("params", "macs", "size_bytes", "latency_ms")
# what a pruner recorded in the metrics of the checkpoint a pruned model starts from
PRUNER_KEYS = {"pruner": "name", "importance": "importance", "percent": "percent"}
PRUNER_KEYS.update(scope="scope", target="target")


def hparam_value(v: Any) -> HParam:
    """`v` as a value TensorBoard's HParams take (bool, int, float, str): None as "none",
    lists and dicts as JSON, anything else as its str."""
    if isinstance(v, bool | int | float | str):
        return v
    if v is None:
        return "none"
    if isinstance(v, list | tuple | dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def flat_hparams(d: dict[str, Any], prefix: str = "") -> dict[str, HParam]:
    """Nested dicts flattened to dotted keys (`quant.weight.kind`), every value an HParam."""
    out: dict[str, HParam] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = hparam_value(v)
    return out


def _pruned_by(cfg: dict[str, Any]) -> dict[str, Any]:
    """The pruner settings that made the checkpoint this run starts from, as prune.py or a
    pipeline's prune stage recorded them beside it (metrics.json; prune.json in an iterative
    stage's step); {} when there is none."""
    start = cfg.get("init_from") or cfg.get("refine")
    if not start:
        return {}
    for name in ("prune.json", "metrics.json"):
        try:
            m = json.loads((Path(start).parent / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and "pruner" in m and "percent" in m:
            return {key: m.get(src) for src, key in PRUNER_KEYS.items()}
    return {}


def run_hparams(
    cfg: dict[str, Any], sched: TrainConfig, model: torch.nn.Module, m: dict[str, Any], world: int
) -> dict[str, HParam]:
    """The run's compression settings, flat, for TensorBoard's HParams dashboard: model, data,
    quantization (label, weight / activation kinds and bits), pruning (the pruner that made a
    pruned model, when its settings are known), distillation, sparsity and the schedule."""
    quant = dict(cfg.get("quant") or {})
    weight, act = dict(quant.get("weight") or {}), dict(quant.get("act") or {})
    sparsity, distill = dict(cfg.get("sparsity") or {}), m.get("distill")
    pruned = bool(getattr(model, "pruned_widths", None))
    hp: dict[str, Any] = {
        "model": m["model"],
        "dataset": m["dataset"],
        "quant": m["quant"],
        "quant.weight.kind": weight.get("kind", "fp32"),
        "quant.weight.bits": m["w_bits"],
        "quant.act.kind": act.get("kind", "fp32"),
        "quant.act.bits": m["a_bits"],
        "pruned": pruned,
        "distill": distill is not None,
        "sparsity": bool(sparsity.get("enabled")),
        "schedule.epochs": sched.epochs,
        "schedule.lr": sched.lr,
        "schedule.batch_size": sched.batch_size,
        "schedule.optimizer": sched.optimizer,
        "schedule.lr_schedule": sched.lr_schedule,
        "schedule.weight_decay": sched.weight_decay,
        "seed": int(cfg.get("seed", 0)),
        "world_size": world,
        "init_from": cfg.get("init_from") or cfg.get("refine") or "",
    }
    if pruned:
        hp.update({f"pruner.{k}": v for k, v in _pruned_by(cfg).items()})
    if distill is not None:
        hp.update({f"distill.{k}": v for k, v in distill.items()})
    if hp["sparsity"]:
        hp["sparsity.s"] = float(sparsity.get("s", 1e-4))
    return flat_hparams(hp)


def hparam_metrics(m: dict[str, Any]) -> dict[str, float]:
    return {f"hparam/{k}": float(m[k]) for k in HPARAM_METRICS if m.get(k) is not None}


def log_hparams(
    writer: SummaryWriter, hparams: dict[str, HParam], metrics: dict[str, float], step: int
) -> None:
    """`SummaryWriter.add_hparams(hparams, metrics, run_name=".")` into `writer`'s own events
    file: the run's folder, no timestamped subfolder and no second events file (one per run,
    rank 0's). Booleans are logged as booleans (add_hparams makes them numbers)."""
    exp, start, end = hparams_summaries(hparams, metrics)
    bools = {k: v for k, v in hparams.items() if isinstance(v, bool)}
    for s in (exp, start):
        value = s.value[0]
        data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for info in data.experiment.hparam_infos:
            if info.name in bools:
                info.type = api_pb2.DATA_TYPE_BOOL
        if data.HasField("session_start_info"):
            for k, v in bools.items():
                data.session_start_info.hparams[k].bool_value = v
        value.metadata.plugin_data.content = data.SerializeToString()
    for s in (exp, start, end):
        writer.file_writer.add_summary(s, step)
    for k, v in metrics.items():
        writer.add_scalar(k, v, step)
    writer.flush()


def _init_record(model: torch.nn.Module) -> dict[str, Any]:
    """Where the starting weights came from (a state_dict file, torchvision's weights) and
    whether the classifier head was replaced (transfer learning), for metrics.json."""
    record = dict(getattr(model, "init_source", None) or {})
    transfer = getattr(model, "transfer", None)
    if transfer:
        record["new_head"] = transfer
    return record


def _file_size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None
