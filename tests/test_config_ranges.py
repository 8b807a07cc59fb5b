"""Table-driven range checks of every key of every config schema in compress.config.

Every field of every schema dataclass (walked with dataclasses.fields, nested schemas too) has
an entry in RANGES (values that must be refused with a ConfigError naming the key, and values
that must be accepted; every key's default is tried as well) or in EXEMPT (with the reason it
has no range).
test_every_field_is_tested_or_exempt fails for a new key that is in neither, so a key added to a
schema gets its range check tested when it is added.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

import pytest

from compress import config as C
from compress.errors import ConfigError

# the group schemas validate_run checks, by the path of their dict in a run config
SCHEMAS: dict[str, type] = {
    "schedule": C.ScheduleConfig,
    "quant": C.QuantConfig,
    "pruner": C.PrunerConfig,
    "sparsity": C.SparsityConfig,
    "distill": C.DistillConfig,
}
NAN, INF = math.nan, math.inf


@dataclass
class Case:
    """`bad`: values refused; `good`: values accepted (every key's default is tried too, by
    test_default_is_accepted_when_given_explicitly); `ctx`: other keys of the same dict that
    make the key apply (e.g. quant.weight.bits only means something for kind=dorefa / lsq;
    other kinds ignore it, as documented)."""

    bad: list[Any]
    good: list[Any] = field(default_factory=list)
    ctx: dict[str, Any] = field(default_factory=dict)


WRONG_NUMBER = ["1", True, None]  # a string, a bool (an int subclass), null
WRONG_FLOAT = [NAN, INF, -INF, *WRONG_NUMBER]
POS_INT = Case([0, -1, 2.5, *WRONG_NUMBER], [1, 3])
BOOL = Case([0, 1, "true", "false", None], [True, False])


def choice(choices, bad=("nope", "", 1, None)) -> Case:
    return Case(list(bad), list(choices))


# the quantizer kinds that need quant.*.bits (bits=null, the default, is refused for them)
BITS_KINDS = ("dorefa", "pact", "lsq")


def no_bits(kinds):
    return [k for k in kinds if k not in BITS_KINDS]


RANGES: dict[str, Case] = {
    # ------------------------------------------------------------ schedule
    "schedule.epochs": POS_INT,
    "schedule.batch_size": POS_INT,
    "schedule.eval_batch_size": POS_INT,
    "schedule.eval_every": POS_INT,
    "schedule.optimizer": choice(C.OPTIMIZERS, ("nope", "SGD", 1, None)),
    "schedule.lr": Case([0, 0.0, -0.1, *WRONG_FLOAT], [1e-6, 0.1, 10]),
    "schedule.momentum": Case([1, 1.0, 1.5, -0.1, -1e-9, *WRONG_FLOAT], [0, 0.0, 0.5, 0.999]),
    "schedule.nesterov": BOOL,
    "schedule.weight_decay": Case([-1e-4, -1, *WRONG_FLOAT], [0, 0.0, 5e-4]),
    "schedule.lr_schedule": choice(C.LR_SCHEDULES),
    "schedule.warmup_epochs": Case([-1, -0.5, *WRONG_FLOAT], [0, 0.5, 5]),
    "schedule.milestones": Case(
        [100, "100", None, [-1], [1.5], ["100"], [True], [100, None]],
        [[], [0], [100, 150], (3, 5)],
    ),
    # > 1 raises the LR at the milestones (tests/test_resume_best.py relies on it)
    "schedule.gamma": Case([0, -0.1, *WRONG_FLOAT], [0.1, 0.5, 4]),
    "schedule.label_smoothing": Case([1, 1.0, -0.1, *WRONG_FLOAT], [0, 0.1, 0.99]),
    "schedule.precision": choice(C.PRECISIONS, ("fp64", "bfloat16", 16, None)),
    "schedule.channels_last": Case([0, 1, "true"], [None, True, False]),  # null: CUDA only
    "schedule.compile": BOOL,
    "schedule.tta": BOOL,
    "schedule.progress": BOOL,
    "schedule.sync_bn": BOOL,
    "schedule.checkpoint_every": Case([0, -1, 2.5, "10", True], [None, 1, 100]),
    # the list's entries are stages, checked by compress.pipeline.plan (tests/test_pipeline.py)
    "schedule.stages": Case(["train", 3, {"stage": "train"}], [None, [], ["train"]]),
    # ------------------------------------------------------------ quant.weight
    # the kinds that need bits are accepted with them in the quant.*.bits[kind=...] cases
    "quant.weight.kind": choice(no_bits(C.WEIGHT_KINDS), ("pact", "int4", "", 8, None)),
    # quant.weight.bits: per kind, from BITS_RANGES below
    "quant.weight.gap": Case([0, -0.7, *WRONG_FLOAT], [0.05, 0.7, 2], {"kind": "ternary"}),
    "quant.weight.scale": Case(BOOL.bad, BOOL.good, {"kind": "binary"}),
    "quant.weight.center": Case(BOOL.bad, BOOL.good, {"kind": "binary"}),
    "quant.weight.clip": Case(BOOL.bad, BOOL.good, {"kind": "binary"}),
    # ------------------------------------------------------------ quant.act
    "quant.act.kind": choice(no_bits(C.ACT_KINDS), ("relu", "int4", "", 8, None)),
    # quant.act.bits: per kind, from BITS_RANGES below
    "quant.act.threshold": Case([-0.1, *WRONG_FLOAT], [0, 0.5, 2], {"kind": "ternary"}),
    "quant.act.grad": Case(
        ["nope", "STE", 1, None], list(C.GRAD_MODES), {"kind": "dorefa", "bits": 4}
    ),
    "quant.act.clip_init": Case([0, -6, *WRONG_FLOAT], [0.5, 6, 10.0], {"kind": "pact", "bits": 4}),
    "quant.act.signed": Case(BOOL.bad, BOOL.good, {"kind": "lsq", "bits": 4}),
    "quant.act.sites": choice(C.ACT_SITES, ("input", "ReLU", "", 1, None)),
    # ------------------------------------------------------------ quant
    "quant.keep": Case(["conv1", 3, [1], ["conv1", None]], [None, [], ["conv1", "fc"]]),
    "quant.keep_first_last": BOOL,
    "quant.freeze_bn_epoch": Case([0, -1, 1.5, "2", True], [None, 1, 10]),
    # ------------------------------------------------------------ pruner
    "pruner.name": choice(C.PRUNERS, ("slimming", "", 1, None)),
    "pruner.percent": Case([1, 1.0, 1.5, -0.1, *WRONG_FLOAT], [0, 0.0, 0.5, 0.99]),
    "pruner.base": POS_INT,
    "pruner.min_channels": Case([0, -1, 2.5, "2", True], [None, 1, 16]),
    "pruner.importance": choice(C.PrunerConfig.IMPORTANCES, ("l3", "BN_SCALE", 1, None)),
    "pruner.scope": choice(C.PrunerConfig.SCOPES, ("local", 1, None)),
    "pruner.target": choice(C.PrunerConfig.TARGETS, ("flops", 1, None)),
    "pruner.min_ratio": Case([1, 1.0, -0.1, *WRONG_FLOAT], [0, 0.1, 0.99]),
    "pruner.batches": POS_INT,
    "pruner.steps": POS_INT,
    "pruner.finetune_epochs": POS_INT,
    # ------------------------------------------------------------ sparsity
    "sparsity.enabled": BOOL,
    "sparsity.s": Case([0, -1e-4, *WRONG_FLOAT], [1e-5, 1e-4, 1]),
    # ------------------------------------------------------------ distill
    "distill.kind": choice(C.DISTILL_KINDS, ("KD", "fitnet", 1, None)),
    "distill.teacher": Case(["", 3, None, True], ["self", "outputs/teacher/best.pt"]),
    "distill.temperature": Case([0, -4, *WRONG_FLOAT], [0.5, 1, 4.0, 20]),
    "distill.alpha": Case([-0.1, 1.1, 2, *WRONG_FLOAT], [0, 0.0, 0.5, 1, 1.0]),
}

# the bit widths each quantizer kind takes: kind: (refused, accepted)
BITS_RANGES = {
    "dorefa": ([0, 1, 17, 32, 2.5, "4", True, None], [2, 4, 8, 16]),
    "pact": ([0, 1, 17, 2.5, "4", True, None], [2, 4, 16]),
    "lsq": ([0, 1, 9, 16, 2.5, "4", True, None], [2, 4, 8]),
}
assert set(BITS_RANGES) == set(BITS_KINDS)
for _part, _kinds in (("weight", C.WEIGHT_KINDS), ("act", C.ACT_KINDS)):
    _key = f"quant.{_part}.bits"
    for _kind, (_bad, _good) in BITS_RANGES.items():
        if _kind in _kinds:
            RANGES[f"{_key}[kind={_kind}]"] = Case(_bad, _good, {"kind": _kind})

EXEMPT: dict[str, str] = {
    "quant.name": "a free label of the recipe (w2a2, int8_qat, ...) for logs and reports",
    "quant.weight": "a nested schema: each of its keys is tested as quant.weight.*",
    "quant.act": "a nested schema: each of its keys is tested as quant.act.*",
}


def schema_keys(cls: type, prefix: str) -> list[str]:
    """The dotted path of every field of a schema and of the schemas nested in it."""
    out = []
    for f in fields(cls):
        key = f"{prefix}.{f.name}"
        out.append(key)
        if f.default_factory is not MISSING and is_dataclass(f.default_factory()):
            out += schema_keys(type(f.default_factory()), key)
    return out


ALL_KEYS = [k for group, cls in SCHEMAS.items() for k in schema_keys(cls, group)]


def base_key(case_id: str) -> str:
    return case_id.split("[", 1)[0]


def default_of(key: str) -> Any:
    group, *path = key.split(".")
    value: Any = C.defaults(SCHEMAS[group])
    for part in path:
        value = value[part]
    return value


def run_cfg(key: str, value: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """A run config that sets `key` (dotted) to `value`, beside the keys of `ctx`."""
    *parents, name = key.split(".")
    cfg: dict[str, Any] = {**ctx, name: value}
    for part in reversed(parents):
        cfg = {part: cfg}
    return cfg


BAD = [
    pytest.param(case_id, value, id=f"{case_id}={value!r}")
    for case_id, case in RANGES.items()
    for value in case.bad
]
GOOD = [
    pytest.param(case_id, value, id=f"{case_id}={value!r}")
    for case_id, case in RANGES.items()
    for value in case.good
]


def test_every_field_is_tested_or_exempt():
    tested = {base_key(k) for k in RANGES}
    untested = [k for k in ALL_KEYS if k not in tested and k not in EXEMPT]
    assert not untested, f"keys with neither a range case nor an EXEMPT reason: {untested}"
    stale = sorted((tested | set(EXEMPT)) - set(ALL_KEYS))
    assert not stale, f"cases for keys that no schema has: {stale}"
    assert not tested & set(EXEMPT), "a key both tested and exempt"
    assert all(EXEMPT.values())


def test_every_schema_of_the_module_is_covered():
    """A new schema dataclass in compress.config needs a group here (or a nested place)."""
    covered, todo = set(), list(SCHEMAS.values())
    while todo:  # the group schemas, the schemas nested in them, and their base classes
        cls = todo.pop()
        covered |= {base for base in cls.__mro__ if is_dataclass(base)}
        todo += [
            type(f.default_factory())
            for f in fields(cls)
            if f.default_factory is not MISSING and is_dataclass(f.default_factory())
        ]
    assert {C.WeightQuantConfig, C.ActQuantConfig, C.TrainSettings} <= covered
    module = {
        v
        for v in vars(C).values()
        if isinstance(v, type) and is_dataclass(v) and v.__module__ == C.__name__
    }
    assert module <= covered, sorted(c.__name__ for c in module - covered)
    assert set(SCHEMAS) == set(C.VALIDATORS)
    assert {f.name for f in fields(C.TrainSettings)} == {
        f.name for f in fields(C.ScheduleConfig)
    } - {"stages"}


@pytest.mark.parametrize(("case_id", "value"), BAD)
def test_out_of_range_or_wrong_type_is_refused_naming_the_key(case_id, value):
    key = base_key(case_id)
    cfg = run_cfg(key, value, RANGES[case_id].ctx)
    # the message starts with the key itself (not another key that happened to fail first)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* is invalid: expected "):
        C.validate_run(cfg)


@pytest.mark.parametrize(("case_id", "value"), GOOD)
def test_in_range_values_are_accepted(case_id, value):
    C.validate_run(run_cfg(base_key(case_id), value, RANGES[case_id].ctx))


@pytest.mark.parametrize("key", ALL_KEYS)
def test_default_is_accepted_when_given_explicitly(key):
    """Each key set to its schema default (the other keys left out, so at their defaults too:
    quant.weight.bits=null is the default of the default kind fp32)."""
    C.validate_run(run_cfg(key, default_of(key), {}))


def test_whole_default_config_is_accepted():
    C.validate_run({group: C.defaults(cls) for group, cls in SCHEMAS.items()})


@pytest.mark.parametrize("value", [1.5, -0.1, 1.0])
def test_momentum_out_of_range_message(value):
    shown = {1.0: "1"}.get(value, str(value))
    with pytest.raises(
        ConfigError,
        match=rf"^schedule\.momentum={re.escape(shown)} is invalid: expected a value in \[0, 1\)$",
    ):
        C.validate_run({"schedule": {"momentum": value}})


def test_ignored_options_of_other_kinds_stay_ignored():
    """Documented: options that do not apply to a quantizer kind are ignored (bits of an fp32
    weight, clip_init of a dorefa activation), so a recipe can switch kinds without editing
    the rest."""
    C.validate_run({"quant": {"weight": {"kind": "fp32", "bits": 1}}})
    C.validate_run({"quant": {"act": {"kind": "dorefa", "bits": 4, "clip_init": -1}}})


def test_the_defaults_of_the_papers():
    """Defaults a user relies on without setting them: the seed's step schedule (He et al.'s
    epochs 100 and 150 of 200, x0.1) and network slimming's L1 penalty 1e-4 (Liu et al.)."""
    from compress.config import ScheduleConfig, SparsityConfig

    sched = ScheduleConfig()
    assert (sched.epochs, sched.milestones, sched.gamma) == (200, [100, 150], 0.1)
    assert (sched.lr, sched.momentum, sched.weight_decay) == (0.1, 0.9, 5e-4)
    assert SparsityConfig().s == 1e-4 and not SparsityConfig().enabled
