"""What the train, prune and fuse tasks share: device, data, model building, hooks, metrics."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import load_weights_file
from compress.data import TensorLoader, load_dataset
from compress.detection.data import is_detection_dataset, load_detection_data
from compress.detection.task import DetectionTask
from compress.engine import Callback, ClassificationTask, Task
from compress.errors import CheckpointError, ConfigError, check_choice
from compress.metrics import count_macs, count_params, latency_ms, size_bytes
from compress.models import create_model
from compress.models.pretrained import torchvision_weights_file
from compress.models.registry import accepts
from compress.prune import regularize_bn_, slimming_scales
from compress.quant.api import clip_latent_weights_, latent_clip_params
from compress.quant.int8 import bn_freeze_hook
from compress.spec import arch_name, checkpoint_state, load_state_dict_, model_from_checkpoint

AUGMENT_KEYS = ("crop_padding", "flip")
META_KEYS = ("root_template",)  # recorded with the data set config, not passed to its loader


def resolve_device(name: str) -> torch.device:
    check_choice("device", name, ("auto", "cpu", "cuda"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available: use device=cpu")
    return torch.device(name)


def load_data(dataset_cfg: dict[str, Any], seed: int) -> Any:
    """The `dataset` group's data: a classification DataSet, or a detection one for the
    detection names (coco, cifar10_det), which train detectors (`task_for`)."""
    if is_detection_dataset(dataset_cfg.get("name")):
        return load_detection_data({k: v for k, v in dataset_cfg.items() if k not in META_KEYS})
    kw = {k: v for k, v in dataset_cfg.items() if k not in AUGMENT_KEYS + META_KEYS}
    return load_dataset(seed=seed, **kw)


_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")


def is_detection(data: Any) -> bool:
    return is_detection_dataset(getattr(data, "name", None))


def task_for(data: Any, loss_fn: Any = None, label_smoothing: float = 0.0) -> Task:
    """The task the data set trains: detection for detection data, classification otherwise."""
    if is_detection(data):
        return DetectionTask()
    return ClassificationTask(loss_fn, label_smoothing)


def resolve_root(template: str) -> str:
    """Re-resolve a data root written as `${oc.env:VAR,default}...` against today's environment
    (a checkpoint must not freeze where the data lived when it was trained)."""
    return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), template)


def source_dataset_cfg(cfg: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The data set to evaluate on: `dataset=` when given, else the checkpoint's own, its root
    re-resolved (COMPRESS_DATA_DIR as set now)."""
    if cfg.get("dataset"):
        return dict(cfg["dataset"])
    stored = (state.get("config") or {}).get("dataset")
    if not stored:
        raise ConfigError("the checkpoint does not record its data set: pass dataset=NAME")
    stored = dict(stored)
    if stored.get("root_template"):
        stored["root"] = resolve_root(stored["root_template"])
    return stored


def model_from_cfg(model_cfg: dict[str, Any], data: Any, pretrained: bool = True) -> nn.Module:
    """A fresh model as the `model` group says, fitted to the data set's classes and channels.

    torchvision's `model.weights` (a file or a weights name found in torch hub's cache;
    `model.download=true` lets it download) are loaded unless `pretrained=False`; a class count
    other than theirs gets a fresh head (`model.transfer` records it)."""
    kw = dict(model_cfg)
    name, source, target = kw.pop("name", None), kw.pop("source", "zoo"), kw.pop("target", None)
    wanted = kw.pop("num_classes", None)
    weights = kw.pop("weights", None) if source == "torchvision" else None
    download = bool(kw.pop("download", False)) if source == "torchvision" else False
    if wanted is not None and wanted != data.num_classes:
        raise ConfigError(
            f"model.num_classes={wanted} but dataset={data.name} has {data.num_classes} classes"
        )
    if accepts(source, name, target, "num_classes"):
        kw["num_classes"] = data.num_classes
    if source == "zoo" or (source == "custom" and accepts(source, name, target, "in_channels")):
        kw["in_channels"] = data.in_channels
    if source == "torchvision_det" and kw.get("image_size") is None:  # the data set's size
        kw["image_size"] = data.image_size
    model = create_model(name, source=source, target=target, **kw)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != data.in_channels:
        raise ConfigError(
            f"{arch_name(model.arch)} takes {first.in_channels}-channel images but "
            f"dataset={data.name} has {data.in_channels} channels"
        )
    if weights and pretrained:
        path = torchvision_weights_file(name, str(weights), download)
        kind, sd = load_weights_file(path)
        if kind != "state_dict":
            raise CheckpointError(
                f"model.weights={weights} is a compress checkpoint: pass it as init_from={path}"
            )
        model.transfer = load_state_dict_(model, sd, f"model.weights={weights}")
        model.init_source = {"kind": "torchvision_weights", "weights": str(weights)}
    return model


def model_name(model_cfg: dict[str, Any]) -> str | None:
    return model_cfg.get("name") or model_cfg.get("target")


def model_from_state_dict(
    model_cfg: dict[str, Any], sd: dict[str, torch.Tensor], data: Any, what: str
) -> nn.Module:
    """The configured model holding a plain state_dict (a file trained elsewhere carries no
    architecture: the `model` group names it). Strict, but for a new classifier head."""
    model = model_from_cfg(model_cfg, data, pretrained=False)
    model.transfer = load_state_dict_(
        model, sd, what, num_classes=data.num_classes, in_channels=data.in_channels
    )
    model.init_source = {"kind": "state_dict", "path": what.partition("=")[2]}
    return model


def build_model(cfg: dict[str, Any], data: Any) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model to train: fresh from `model`, or from `init_from`: a compress checkpoint
    (its widths kept) or a plain state_dict of the configured model.

    Returns the model and the checkpoint it came from (None when fresh or a state_dict).
    """
    if cfg.get("refine"):  # the seed project's name for finetuning a pruned model
        if cfg.get("init_from"):
            raise ConfigError("pass init_from=PATH or refine=PATH, not both")
        cfg = {**cfg, "init_from": cfg["refine"]}
    if not cfg.get("init_from"):
        return model_from_cfg(dict(cfg["model"]), data), None
    path = Path(cfg["init_from"])
    try:
        kind, state = load_weights_file(path)
        if kind == "state_dict":
            model = model_from_state_dict(dict(cfg["model"]), state, data, f"init_from={path}")
            return model, None
        model = model_from_checkpoint(state, expect=model_name(cfg["model"]), quantized=False)
    except CheckpointError as e:
        msg = str(e) if str(e).startswith("init_from=") else f"init_from={path}: {e}"
        raise CheckpointError(msg) from None
    head = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    got = (head.out_features if head else None, first.in_channels if first else None)
    if (head and got[0] != data.num_classes) or (first and got[1] != data.in_channels):
        arch = model.arch
        raise CheckpointError(
            f"init_from={path}: the model was built for {arch.get('num_classes')} classes and "
            f"{arch.get('in_channels', 3)} input channels, but dataset={data.name} has "
            f"{data.num_classes} and {data.in_channels}"
        )
    return model, state


@torch.no_grad()
def build_teacher(
    cfg: dict[str, Any], data: Any, start: nn.Module | None, resumed: bool = False
) -> nn.Module:
    """The frozen teacher `distill.teacher` names: `self` (the weights the run starts from:
    `start`, the model before compression, or init_from again when the run resumed) or a
    checkpoint / plain state_dict file of the configured model. Its class count must be the
    student's."""
    teacher_ref = str((cfg.get("distill") or {}).get("teacher", "self"))
    if teacher_ref == "self":
        if not (cfg.get("init_from") or cfg.get("refine")):
            raise ConfigError(
                "distill.teacher=self distills from the weights the run starts from, but the run "
                "starts from scratch: pass init_from=PATH (a trained model) or "
                "distill.teacher=PATH"
            )
        teacher = build_model(cfg, data)[0] if resumed or start is None else copy.deepcopy(start)
    else:
        path = Path(teacher_ref)
        try:
            kind, state = load_weights_file(path)
            if kind == "checkpoint":
                teacher = model_from_checkpoint(state)
            else:
                what = f"distill.teacher={path}"
                teacher = model_from_state_dict(dict(cfg["model"]), state, data, what)
        except CheckpointError as e:
            raise CheckpointError(f"distill.teacher={path}: {e}") from None
    teacher.eval()
    out = teacher(torch.zeros(2, *data.image_shape))
    if out.dim() != 2 or out.shape[1] != data.num_classes:
        raise ConfigError(
            f"distill.teacher={teacher_ref}: the teacher predicts {tuple(out.shape[1:])} "
            f"classes but dataset={data.name} (the student) has {data.num_classes}"
        )
    return teacher


def read_source(cfg: dict[str, Any], script: str, seed: int = 0) -> dict[str, Any]:
    """The checkpoint `ckpt` names, as a checkpoint dict: a compress checkpoint as stored, a
    plain state_dict built into the model that `model=` names (prune.py, fuse.py, export.py and
    calibrate.py then work on a model trained elsewhere, with no training run here)."""
    if cfg.get("ckpt") in (None, "", "???"):  # "???": OmegaConf's missing value
        raise ConfigError(f"ckpt is required: python {script} ckpt=RUN/best.pt")
    path = cfg["ckpt"]
    kind, obj = load_weights_file(path)
    if kind == "checkpoint":
        return obj
    if not cfg.get("model"):
        raise ConfigError(
            f"ckpt={path} is a plain state_dict, which does not say what model it holds: "
            f"name it, e.g. python {script} ckpt={path} model=resnet20 dataset=cifar10"
        )
    if not cfg.get("dataset"):
        raise ConfigError(
            f"ckpt={path} is a plain state_dict, which does not record its data set: "
            "pass dataset=NAME"
        )
    data = load_data(dict(cfg["dataset"]), seed)
    model = model_from_state_dict(dict(cfg["model"]), obj, data, f"ckpt={path}")
    config = {"model": dict(cfg["model"]), "dataset": dict(cfg["dataset"])}
    return checkpoint_state(model, dataset=data.name, config=config, source=str(path))


def model_metrics(model: nn.Module, data: Any) -> dict[str, int]:
    """Parameters, MACs (of a detector: its core, at the data set's image size; the box
    decoding and NMS after it are not counted) and the size at the quantized widths."""
    shape = data.image_shape
    counted = DetectionTask().core(model) if is_detection(data) else model
    return {
        "params": count_params(model),
        "macs": count_macs(counted, shape),
        "size_bytes": size_bytes(model),
    }


DETECTION_EVAL_BATCH = 8  # detection batches are lists of full images with their targets


def eval_loader(data: Any, device: torch.device, batch: int = 500) -> Any:
    """The test split in order; a detection set's in batches of at most DETECTION_EVAL_BATCH."""
    if is_detection(data):
        batch = min(batch, DETECTION_EVAL_BATCH)
    if hasattr(data, "loaders"):  # a streaming data set builds its own
        return data.loaders(batch, batch, device, seed=0)[1]
    return TensorLoader(data.test, batch, data.mean, data.std, device)


@torch.no_grad()
def logits_on(model: nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        outs.append(model(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


def source_checkpoint(
    cfg: dict[str, Any], run_dir: str | Path, script: str
) -> tuple[Path, dict[str, Any]]:
    """Create the run directory and load the unfused checkpoint that `ckpt` names."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = read_source(cfg, script, int(cfg.get("seed", 0)))
    if state.get("fused"):
        raise CheckpointError(
            f"{cfg['ckpt']} is already fused: {script} needs a checkpoint "
            "that still has its BN layers"
        )
    return run_dir, state


class ClipLatentWeights(Callback):
    """BNN's weight clipping after every optimizer step (quant's pure function as a hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = latent_clip_params(model)

    def after_step(self, model: nn.Module) -> None:
        clip_latent_weights_(self.params)


class FreezeBN(Callback):
    """INT8 QAT's batch-norm freeze (quant.freeze_bn_epoch) at the end of each epoch; a run
    resumed past the freeze epoch is frozen from its first step (`start` = epochs done)."""

    def __init__(self, model: nn.Module, epoch: int, start: int = 0) -> None:
        self.hook = bn_freeze_hook(model, epoch)
        self.hook(start)

    def on_epoch_end(self, epoch: int, model: nn.Module, writer: Any) -> None:
        self.hook(epoch, model)


class BNSparsity(Callback):
    """Network slimming's L1 penalty on BN scales after every backward (prune's pure function
    as a hook), and a histogram of |gamma| each epoch."""

    def __init__(self, model: nn.Module, s: float, image_shape: tuple[int, ...]) -> None:
        self.s = s
        self.scales = slimming_scales(model, image_shape)

    def after_backward(self, model: nn.Module) -> None:
        regularize_bn_(self.scales, self.s)

    def on_epoch_end(self, epoch: int, model: nn.Module, writer: Any) -> None:
        if writer is not None:
            gammas = torch.cat([g.detach().abs().flatten() for g in self.scales])
            writer.add_histogram("bn/abs_gamma", gammas.cpu(), epoch)
            writer.add_scalar("bn/mean_abs_gamma", gammas.mean().item(), epoch)


def measure_latency(model: nn.Module, data: Any) -> float:
    return latency_ms(model, data.image_shape, batch_size=1, reps=10)
