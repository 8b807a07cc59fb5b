"""Typed configs: every option of every group composes with typed values, a misspelt key or a
wrong type fails in Hydra's composition, and the range checks of compress.config give one line."""

from __future__ import annotations

import shutil
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from compress import config as C
from compress.errors import ConfigError
from compress.pipeline import plan
from tests.conftest import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import configstore  # noqa: E402

CONF = ROOT / "conf"
UNKNOWN_KEY = (ConfigKeyError, ConfigAttributeError)
GROUPS = {"train": ("model", "dataset", "quant", "pruner", "schedule", "distill", "experiment")}
GROUPS["prune"] = ("pruner", "dataset")
GROUPS["fuse"] = ("dataset",)
SCHEMAS = {  # typed keys of each entry point's composed config
    "train": {
        "quant": C.QuantConfig,
        "schedule": C.ScheduleConfig,
        "pruner": C.PrunerConfig,
        "sparsity": C.SparsityConfig,
    },
    "prune": {"pruner": C.PrunerConfig},
    "fuse": {},
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [
    (script, f"{group}={name}")
    for script, groups in GROUPS.items()
    for group in groups
    for name in options(group)
]


def compose_cfg(script: str, overrides: list[str], conf: Path = CONF):
    configstore.register()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(script, overrides=overrides)


@pytest.mark.parametrize(("script", "override"), CASES)
def test_every_option_composes_typed(script, override):
    cfg = compose_cfg(script, [override])
    for key, schema in SCHEMAS[script].items():
        assert OmegaConf.get_type(cfg, key) is schema, key
    if script == "train":
        assert isinstance(cfg.schedule.epochs, int) and isinstance(cfg.schedule.lr, float)
        assert isinstance(cfg.sparsity.s, float) and isinstance(cfg.seed, int)
        for part in ("weight", "act"):
            q = cfg.quant[part]
            if q.kind in ("dorefa", "pact", "lsq"):
                assert isinstance(q.bits, int), (part, q.bits)
    if "pruner" in cfg:
        assert isinstance(cfg.pruner.percent, float) and isinstance(cfg.pruner.base, int)
    plain = OmegaConf.to_container(cfg, resolve=True)
    C.validate_run(plain)  # every shipped option is in range
    if script == "train" and plain["schedule"].get("stages"):
        # every stage merged and checked as the pipeline will before training (a recipe for a
        # trained model is run with init_from=PATH)
        plan({**plain, "init_from": plain.get("init_from") or "TRAINED.pt"})


def test_readme_commands_compose():
    assert compose_cfg("train", ["quant=w2a2"]).quant.weight.bits == 2
    cfg = compose_cfg("prune", ["pruner=regular", "pruner.base=16"])
    assert (cfg.pruner.name, cfg.pruner.base) == ("regular", 16)
    cfg = compose_cfg("train", ["pruner=gc"])
    assert (cfg.pruner.name, cfg.pruner.percent) == ("gc", 0.4)
    for q in ("w8a8", "w4a4", "w2a2"):
        for m in ("nin", "nin_gc"):
            cfg = compose_cfg("train", [f"quant={q}", f"model={m}"])
            assert cfg.quant.name == q and cfg.model.name == m
    cfg = compose_cfg("train", ["experiment=slim_quant"])
    assert (cfg.pruner.name, cfg.pruner.base, cfg.pruner.percent) == ("regular", 16, 0.5)


def test_defaults_come_from_the_schemas():
    cfg = compose_cfg("train", [])
    assert OmegaConf.to_container(cfg.schedule) == C.defaults(C.ScheduleConfig)
    assert OmegaConf.to_container(cfg.quant) == C.defaults(C.QuantConfig)
    assert OmegaConf.to_container(cfg.pruner) == C.defaults(C.PrunerConfig)
    assert OmegaConf.to_container(cfg.sparsity) == C.defaults(C.SparsityConfig)
    from compress.engine import TrainConfig

    train = {f.name for f in fields(TrainConfig)}
    assert train == {f.name for f in fields(C.ScheduleConfig)} - {"stages"}


@pytest.mark.parametrize(
    ("override", "key", "error"),
    [
        ("schedule.epoch=3", "schedule.epoch", UNKNOWN_KEY),
        ("quant.weight.bitz=3", "quant.weight.bitz", UNKNOWN_KEY),
        ("pruner.percnt=0.5", "pruner.percnt", UNKNOWN_KEY),
        ("sparsity.ss=1", "sparsity.ss", UNKNOWN_KEY),
        ("schedule.epochs=abc", "schedule.epochs", ValidationError),
        ("quant.act.bits=four", "quant.act.bits", ValidationError),
        ("resume=maybe", "resume", ValidationError),
    ],
)
def test_bad_key_or_type_fails_at_compose(override, key, error):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("train", [override])
    cause = info.value.__cause__
    assert isinstance(cause, error), repr(cause)
    assert f"full_key: {key}" in str(cause), str(cause)


def test_misspelt_key_in_a_yaml_file_fails_at_compose(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nschedule:\n  epoch: 3\n")
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("train", ["experiment=typo"], conf)
    assert "epoch" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"quant": {"weight": {"kind": "dorefa", "bits": 1}}},
            "quant.weight.bits=1 is invalid: expected an integer from 2 to 16 for kind=dorefa",
        ),
        (
            {"quant": {"act": {"kind": "pact", "bits": 4, "grad": "ste"}}},
            "quant.act.grad='ste' is invalid: expected saturate_ste for kind=pact",
        ),
        (
            {"pruner": {"percent": 1.0}},
            "pruner.percent=1 is invalid: expected a fraction in [0, 1)",
        ),
        ({"pruner": {"name": "lottery"}}, "pruner.name='lottery' is invalid: expected one of"),
        ({"schedule": {"lr": -1}}, "schedule.lr=-1 is invalid: expected a learning rate > 0"),
        ({"schedule": {"epochs": 0}}, "schedule.epochs=0 is invalid: expected an integer >= 1"),
        ({"sparsity": {"s": -1.0}}, "sparsity.s=-1 is invalid: expected a penalty > 0"),
        ({"schedule": {"typo": 1}}, "schedule.typo is not a known key: expected one of"),
        ({"quant": {"weight": {"gpa": 0.5}}}, "quant.weight.gpa is not a known key"),
        ({"pruner": {"percnt": 0.5}}, "pruner.percnt is not a known key"),
    ],
)
def test_validate_run_range_errors_are_one_line(cfg, message):
    with pytest.raises(ConfigError) as info:
        C.validate_run(cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_validate_run_names_the_stage():
    with pytest.raises(ConfigError, match=r"^schedule.stages\[2\]: schedule.lr=-1 is invalid"):
        C.validate_run({"schedule": {"lr": -1}}, where="schedule.stages[2]")


def test_composed_config_with_bad_range_is_caught_before_training():
    for overrides, message in [
        (["quant=w2a2", "quant.weight.bits=1"], "quant.weight.bits=1 is invalid"),
        (["schedule.lr=-1"], r"schedule.lr=-1 is invalid: expected a learning rate > 0"),
        (["pruner.percent=1"], r"pruner.percent=1 is invalid: expected a fraction in \[0, 1\)"),
    ]:
        cfg = compose_cfg("train", overrides)
        with pytest.raises(ConfigError, match=message):
            C.validate_run(OmegaConf.to_container(cfg, resolve=True))


def test_choices_match_the_library():
    from compress.quant import primitives

    assert tuple(primitives.GRAD_MODES) == C.GRAD_MODES


def test_slurm_recipe_composes_with_the_submitit_launcher():
    configstore.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 600)
    assert cfg.hydra.callbacks.report._target_ == "compress.report.SweepReport"


def test_integral_floats_are_shown_as_ints_up_to_1e15():
    from compress.config import _shown

    assert _shown(999999999999999.0) == 999999999999999 and isinstance(
        _shown(999999999999999.0), int
    )
    assert isinstance(_shown(1e15), float)  # from there on a float is shown as one
    assert _shown(-3.0) == -3 and _shown(2.5) == 2.5 and _shown("x") == "x"
