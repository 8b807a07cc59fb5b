"""The config schemas and their checks: one source of defaults, one place for range checks.

Plain dataclasses (no Hydra here): `configstore.register()` puts them into Hydra's ConfigStore,
so the YAML files in conf/ extend them (they hold only what differs from these defaults) and a
misspelt key or a wrong type fails when Hydra composes the config. Library users who pass plain
dicts get the same checks from the `validate_*` functions below: keys a dict leaves out take
the defaults here, an unknown key or a value out of range raises ConfigError with one line
naming the key and what is allowed.

Groups: `schedule` (ScheduleConfig), `quant` (QuantConfig with WeightQuantConfig and
ActQuantConfig), `pruner` (PrunerConfig), `sparsity` (SparsityConfig); `validate_run` checks
every one of them present in a whole run config (a pipeline checks each stage with it before
the first stage trains).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from compress.errors import ConfigError, check, check_choice

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "step", "onecycle", "constant")
PRECISIONS = ("auto", "fast", "fp32", "bf16", "fp16")
WEIGHT_KINDS = ("fp32", "dorefa", "ternary", "binary", "int8", "lsq")
ACT_KINDS = (*WEIGHT_KINDS, "pact")
ACT_SITES = ("relu", "inputs")  # quant.act.sites
GRAD_MODES = ("ste", "saturate_ste", "soft_ste")  # = compress.quant.primitives.GRAD_MODES
PRUNERS = ("normal", "regular", "gc")
DISTILL_KINDS = ("none", "kd")


# ---------------------------------------------------------------- schemas
@dataclass
class TrainSettings:
    """The `schedule` keys the training loop reads (all of ScheduleConfig but `stages`)."""

    epochs: int = 200
    batch_size: int = 128
    eval_batch_size: int = 500
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # cosine | step | onecycle | constant
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [100, 150])  # lr_schedule=step
    gamma: float = 0.1  # lr_schedule=step: the LR factor at each milestone
    label_smoothing: float = 0.0
    # auto (bf16 on CUDA, fp32 elsewhere) | fast (bf16 on CUDA and on CPUs with native bf16:
    # AVX-512-BF16 or AMX, fp32 elsewhere) | fp32 | bf16 | fp16 (GPU)
    precision: str = "auto"
    channels_last: bool | None = None  # null: on CUDA only (NHWC convs are faster there)
    compile: bool = False  # torch.compile the training step
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    # flip test-time augmentation: each evaluation also reports test_acc_tta (the logits of an
    # image and its mirror image averaged); test_acc and the choice of best.pt stay without it
    tta: bool = False
    progress: bool = True  # a progress bar on a terminal
    # under torchrun: SyncBatchNorm (BN statistics over all processes' batches; CUDA only)
    sync_bn: bool = False
    # save a resumable last.pt every N optimizer steps inside epochs too (null: at epoch ends)
    checkpoint_every: int | None = None


@dataclass
class ScheduleConfig(TrainSettings):
    """The `schedule` group. `stages`: a multi-stage pipeline, each entry a stage kind or a
    dict, e.g. [train, {stage: quantize, quant: {...}}] (see compress.pipeline)."""

    stages: list[Any] = field(default_factory=list)


@dataclass
class WeightQuantConfig:
    """`quant.weight`; options that do not apply to the kind are ignored."""

    kind: str = "fp32"  # fp32 | dorefa | ternary | binary | int8 | lsq
    bits: int | None = None  # dorefa: 2..16, lsq: 2..8
    gap: float = 0.7  # ternary: threshold = gap * mean|w| per output channel
    scale: bool = True  # ternary / binary: per-output-channel scaling factor alpha
    center: bool = False  # binary: subtract the per-channel mean before sign
    clip: bool = False  # binary: clamp latent weights to [-1, 1] after every step (BNN)


@dataclass
class ActQuantConfig:
    """`quant.act`; options that do not apply to the kind are ignored."""

    # fp32 (ReLU) | dorefa (clip [0, 1]) | pact (learned clip) | ternary | binary | int8
    # | lsq (learned step)
    kind: str = "fp32"
    bits: int | None = None  # dorefa, pact: 2..16, lsq: 2..8
    threshold: float = 0.5  # ternary: |x| <= threshold -> 0
    grad: str = "saturate_ste"  # ste | saturate_ste | soft_ste (pact: saturate_ste only)
    clip_init: float = 6.0  # pact: starting value of the learned clip alpha
    # lsq: signed codes [-2^(b-1), 2^(b-1) - 1] (a site whose input can be negative) instead of
    # unsigned [0, 2^b - 1], which clamps at 0 like the ReLU it replaces
    signed: bool = False
    # relu: quantizers replace the ReLU-like activations (Activation slots, nn.ReLU / ReLU6);
    # inputs: also one at the input of every quantized layer that would read a float tensor
    # (one per tensor, signed or unsigned by what produces it; compress.quant.sites)
    sites: str = "relu"


@dataclass
class QuantConfig:
    """The `quant` group."""

    name: str = "fp32"
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    keep: list[str] = field(default_factory=list)  # further conv / linear layers kept float
    keep_first_last: bool = True  # the first conv and the classifier stay full precision
    # BN statistics learn for this many epochs, then stay frozen (running statistics, no
    # updates: INT8 QAT's batch-norm freeze); null: never frozen
    freeze_bn_epoch: int | None = None


@dataclass
class PrunerConfig:
    """The `pruner` group: which channels of a trained model go (network slimming by default;
    l1 / l2 / taylor / fpgm prune a model trained without sparsity)."""

    # the choices (class attributes, not keys); IMPORTANCES = compress.prune.IMPORTANCES' names
    IMPORTANCES = ("bn_scale", "l1", "l2", "taylor", "fpgm")
    SCOPES = ("global", "layer")
    TARGETS = ("channels", "macs")

    name: str = "normal"  # normal | regular | gc
    # fraction to remove, in [0, 1): of the prunable channels (target=channels) or of the MACs
    percent: float = 0.5
    base: int = 1  # (regular) every pruned layer keeps a multiple of base channels
    min_channels: int | None = None  # no layer keeps fewer (null: base)
    # bn_scale (|BN gamma|, after sparse training) | l1 | l2 (filter norms) | taylor (|grad x
    # activation| on `batches` training batches) | fpgm (distance to the geometric median)
    importance: str = "bn_scale"
    scope: str = "global"  # global: one threshold over all layers | layer: each loses `percent`
    target: str = "channels"  # channels | macs (bisects the threshold to hit the MACs)
    # every layer keeps at least this fraction of its channels. 0 (the default, today's
    # results): the floor is min_channels (or base), and with target=channels a percent that
    # would empty a layer is refused unless min_channels or min_ratio is set; target=macs
    # always keeps the floor (at least one channel)
    min_ratio: float = 0.0
    # importance=taylor: training batches the scores are averaged over (of schedule.batch_size
    # images in a pipeline stage; prune.py, which has no schedule: 128)
    batches: int = 8
    # pipeline prune stage: prune-finetune cycles on the cubic schedule (Zhu & Gupta 2017),
    # each followed by finetune_epochs epochs; prune.py prunes once (steps: 1)
    steps: int = 1
    finetune_epochs: int = 1


@dataclass
class SparsityConfig:
    """`sparsity`: network slimming's L1 penalty on the BN scales of prunable layers."""

    enabled: bool = False
    s: float = 1e-4


@dataclass
class DistillConfig:
    """`distill`: knowledge distillation from a frozen teacher (compress.distill)."""

    kind: str = "none"  # none | kd
    # self: the weights the run starts from (init_from; in a pipeline the model before its
    # first prune / quantize stage), or the path of a checkpoint or plain state_dict
    teacher: str = "self"
    temperature: float = 4.0  # T: logits / T are softened before the KL term
    alpha: float = 0.9  # weight of the KL term; 1 - alpha: the label loss


# ---------------------------------------------------------------- checks
def defaults(cls: type) -> dict[str, Any]:
    """The default value of every field of a schema dataclass (nested ones as dicts)."""
    out = {}
    for f in fields(cls):
        if f.default_factory is not MISSING:
            value = f.default_factory()
            out[f.name] = defaults(type(value)) if hasattr(value, "__dataclass_fields__") else value
        else:
            out[f.name] = f.default
    return out


def check_known(prefix: str, d: dict[str, Any], allowed: Any) -> None:
    """Raise ConfigError for the first key of `d` that is not in `allowed` (names or a schema)."""
    if isinstance(allowed, type):
        allowed = {f.name for f in fields(allowed)}
    extra = set(d) - set(allowed)
    if extra:
        raise ConfigError(
            f"{prefix}.{sorted(extra)[0]} is not a known key: expected one of "
            + ", ".join(sorted(allowed))
        )


def _shown(v: Any) -> Any:
    """A value as the user wrote it: Hydra turns `gap=0` into 0.0 for a float field."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return int(v)
    return v


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    check(condition, key, _shown(value), allowed)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bool(key: str, v: Any) -> None:
    _check(isinstance(v, bool), key, v, "true or false")


def _as_dict(prefix: str, d: Any) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}={d!r} is invalid: expected a mapping of keys to values")
    return d


def validate_schedule(d: dict[str, Any], prefix: str = "schedule") -> None:
    """Check a `schedule` dict (keys left out take ScheduleConfig's defaults)."""
    d = _as_dict(prefix, d)
    check_known(prefix, d, ScheduleConfig)
    c = {**defaults(ScheduleConfig), **d}
    p = prefix
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
        _check(_int(c[key]) and c[key] >= 1, f"{p}.{key}", c[key], "an integer >= 1")
    _check(_number(c["lr"]) and c["lr"] > 0, f"{p}.lr", c["lr"], "a learning rate > 0")
    wd = c["weight_decay"]
    _check(_number(wd) and wd >= 0, f"{p}.weight_decay", wd, "a value >= 0")
    mom = c["momentum"]
    _check(_number(mom) and 0 <= mom < 1, f"{p}.momentum", mom, "a value in [0, 1)")
    ls = c["label_smoothing"]
    _check(_number(ls) and 0 <= ls < 1, f"{p}.label_smoothing", ls, "a value in [0, 1)")
    we = c["warmup_epochs"]
    _check(_number(we) and we >= 0, f"{p}.warmup_epochs", we, "a value >= 0")
    _check(_number(c["gamma"]) and c["gamma"] > 0, f"{p}.gamma", c["gamma"], "a value > 0")
    ms = c["milestones"]
    _check(
        isinstance(ms, list | tuple) and all(_int(m) and m >= 0 for m in ms),
        f"{p}.milestones",
        ms,
        "a list of epochs (integers >= 0)",
    )
    every = c["checkpoint_every"]
    _check(
        every is None or (_int(every) and every >= 1),
        f"{p}.checkpoint_every",
        every,
        "null (at epoch ends only) or a number of optimizer steps >= 1",
    )
    for key in ("nesterov", "progress", "compile", "tta", "sync_bn"):
        _check_bool(f"{p}.{key}", c[key])
    if c["channels_last"] is not None:
        _check_bool(f"{p}.channels_last", c["channels_last"])
    check_choice(f"{p}.optimizer", c["optimizer"], OPTIMIZERS)
    check_choice(f"{p}.lr_schedule", c["lr_schedule"], LR_SCHEDULES)
    check_choice(f"{p}.precision", c["precision"], PRECISIONS)
    stages = c["stages"]
    _check(
        stages is None or isinstance(stages, list | tuple),
        f"{p}.stages",
        stages,
        "a list of stages",
    )


def validate_quantizer(d: dict[str, Any], prefix: str, kinds: tuple[str, ...]) -> str:
    """Range checks of one quantizer dict (`quant.weight` or `quant.act`); returns its kind."""
    kind = d.get("kind", "fp32")
    check_choice(f"{prefix}.kind", kind, kinds)
    if kind in ("dorefa", "pact"):
        bits = d.get("bits")
        _check(
            _int(bits) and 2 <= bits <= 16,
            f"{prefix}.bits",
            bits,
            f"an integer from 2 to 16 for kind={kind} (use kind=ternary or binary below 2)",
        )
    if kind == "lsq":
        bits = d.get("bits")
        _check(
            _int(bits) and 2 <= bits <= 8,
            f"{prefix}.bits",
            bits,
            "an integer from 2 to 8 for kind=lsq (its codes are 8-bit integers at most)",
        )
        _check(
            d.get("grad", ActQuantConfig.grad) == "saturate_ste",
            f"{prefix}.grad",
            d.get("grad"),
            "saturate_ste for kind=lsq (its gradient is defined by the learned step)",
        )
    if kind == "pact":
        clip = d.get("clip_init", ActQuantConfig.clip_init)
        _check(_number(clip) and clip > 0, f"{prefix}.clip_init", clip, "a starting clip value > 0")
        _check(
            d.get("grad", ActQuantConfig.grad) == "saturate_ste",
            f"{prefix}.grad",
            d.get("grad"),
            "saturate_ste for kind=pact (its gradient is defined by the learned clip)",
        )
    if "grad" in d:
        check_choice(f"{prefix}.grad", d["grad"], GRAD_MODES)
    if "gap" in d:
        gap = d["gap"]
        _check(_number(gap) and gap > 0, f"{prefix}.gap", gap, "a ternary threshold gap > 0")
    if "threshold" in d:
        t = d["threshold"]
        _check(_number(t) and t >= 0, f"{prefix}.threshold", t, "a value >= 0")
    for key in ("scale", "center", "clip", "signed"):
        if key in d:
            _check_bool(f"{prefix}.{key}", d[key])
    if "sites" in d:
        check_choice(f"{prefix}.sites", d["sites"], ACT_SITES)
    return kind


def validate_weight_quant(d: dict[str, Any], prefix: str = "quant.weight") -> str:
    """Check a `quant.weight` dict; returns its kind."""
    d = _as_dict(prefix, d)
    check_known(prefix, d, WeightQuantConfig)
    return validate_quantizer(d, prefix, WEIGHT_KINDS)


def validate_act_quant(d: dict[str, Any], prefix: str = "quant.act") -> str:
    """Check a `quant.act` dict; returns its kind."""
    d = _as_dict(prefix, d)
    check_known(prefix, d, ActQuantConfig)
    return validate_quantizer(d, prefix, ACT_KINDS)


def validate_quant(d: dict[str, Any], prefix: str = "quant") -> None:
    """Check a `quant` dict (keys left out take QuantConfig's defaults)."""
    d = _as_dict(prefix, d)
    check_known(prefix, d, QuantConfig)
    validate_weight_quant(d.get("weight"), f"{prefix}.weight")
    validate_act_quant(d.get("act"), f"{prefix}.act")
    keep = d.get("keep")
    _check(
        keep is None or (isinstance(keep, list | tuple) and all(isinstance(k, str) for k in keep)),
        f"{prefix}.keep",
        keep,
        "a list of layer names",
    )
    if "keep_first_last" in d:
        _check_bool(f"{prefix}.keep_first_last", d["keep_first_last"])
    fbe = d.get("freeze_bn_epoch")
    _check(
        fbe is None or (_int(fbe) and fbe >= 1),
        f"{prefix}.freeze_bn_epoch",
        fbe,
        "null or an integer >= 1 (the epochs that update BN statistics before the freeze)",
    )


def validate_pruner(d: dict[str, Any], prefix: str = "pruner") -> None:
    """Check a `pruner` dict (keys left out take PrunerConfig's defaults)."""
    d = _as_dict(prefix, d)
    check_known(prefix, d, PrunerConfig)
    c = {**defaults(PrunerConfig), **d}
    check_choice(f"{prefix}.name", c["name"], PRUNERS)
    pct = c["percent"]
    _check(_number(pct) and 0 <= pct < 1, f"{prefix}.percent", pct, "a fraction in [0, 1)")
    _check(_int(c["base"]) and c["base"] >= 1, f"{prefix}.base", c["base"], "an integer >= 1")
    mc = c["min_channels"]
    _check(
        mc is None or (_int(mc) and mc >= 1),
        f"{prefix}.min_channels",
        mc,
        "null or an integer >= 1",
    )
    check_choice(f"{prefix}.importance", c["importance"], PrunerConfig.IMPORTANCES)
    check_choice(f"{prefix}.scope", c["scope"], PrunerConfig.SCOPES)
    check_choice(f"{prefix}.target", c["target"], PrunerConfig.TARGETS)
    mr = c["min_ratio"]
    _check(_number(mr) and 0 <= mr < 1, f"{prefix}.min_ratio", mr, "a fraction in [0, 1)")
    for key in ("batches", "steps", "finetune_epochs"):
        _check(_int(c[key]) and c[key] >= 1, f"{prefix}.{key}", c[key], "an integer >= 1")


def validate_sparsity(d: dict[str, Any], prefix: str = "sparsity") -> None:
    """Check a `sparsity` dict (keys left out take SparsityConfig's defaults)."""
    d = _as_dict(prefix, d)
    check_known(prefix, d, SparsityConfig)
    c = {**defaults(SparsityConfig), **d}
    _check_bool(f"{prefix}.enabled", c["enabled"])
    _check(_number(c["s"]) and c["s"] > 0, f"{prefix}.s", c["s"], "a penalty > 0")


def validate_distill(d: dict[str, Any], prefix: str = "distill") -> str:
    """Check a `distill` dict (keys left out take DistillConfig's defaults); returns its kind."""
    d = _as_dict(prefix, d)
    check_known(prefix, d, DistillConfig)
    c = {**defaults(DistillConfig), **d}
    check_choice(f"{prefix}.kind", c["kind"], DISTILL_KINDS)
    t, a = c["temperature"], c["alpha"]
    _check(_number(t) and t > 0, f"{prefix}.temperature", t, "a temperature > 0")
    _check(_number(a) and 0 <= a <= 1, f"{prefix}.alpha", a, "a weight in [0, 1]")
    teacher = c["teacher"]
    _check(
        isinstance(teacher, str) and bool(teacher),
        f"{prefix}.teacher",
        teacher,
        "self (the weights the run starts from) or the path of a checkpoint or state_dict",
    )
    return c["kind"]


VALIDATORS = {
    "schedule": validate_schedule,
    "quant": validate_quant,
    "pruner": validate_pruner,
    "sparsity": validate_sparsity,
    "distill": validate_distill,
}


def validate_run(cfg: dict[str, Any], where: str | None = None) -> None:
    """Check every group of a whole run config (a plain dict) that is present and not null.

    `where` (e.g. "schedule.stages[2]") is put in front of the message, so an error in one
    stage of a pipeline names the stage.
    """
    try:
        for group, validate in VALIDATORS.items():
            if cfg.get(group) is not None:
                validate(cfg[group], group)
    except ConfigError as e:
        if where is None:
            raise
        raise ConfigError(f"{where}: {e}") from None
