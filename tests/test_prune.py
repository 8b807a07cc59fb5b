from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from compress.errors import ConfigError
from compress.experiment import run_training
from compress.models import create_model
from compress.prune import PruneError, mask_, prunable_units, select_channels, thin
from tests.conftest import TINY
from tests.test_engine import tiny_cfg
from tests.test_fuse import randomize_bn_

CASES = [
    ("nin", "normal", 1),
    ("nin", "regular", 16),
    ("vgg_small", "regular", 32),
    ("resnet20", "normal", 1),
    ("resnet56", "regular", 4),
    ("nin_gc", "gc", 1),
]


@pytest.mark.parametrize(("name", "kind", "base"), CASES)
@pytest.mark.parametrize("percent", [0.3, 0.7])
def test_thinned_model_equals_masked_model(name, kind, base, percent):
    torch.manual_seed(0)
    model = randomize_bn_(create_model(name))
    keep = select_channels(model, kind, percent, base=base)
    small = thin(model, keep).eval()
    masked = mask_(model, keep)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(small(x), masked(x), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert small.arch["channels"] == [len(k) for k in keep]


def test_regular_pruning_keeps_multiples_of_base():
    model = randomize_bn_(create_model("nin"))
    counts = [len(k) for k in select_channels(model, "regular", 0.6, base=16)]
    assert all(c % 16 == 0 and c >= 16 for c in counts), counts


def test_global_threshold_removes_the_weakest_channels():
    model = create_model("vgg_small")
    units = prunable_units(model)
    with torch.no_grad():
        for u in units:
            u.bn.weight.fill_(1.0)
        units[0].bn.weight[:100] = 0.01  # 100 weak channels in the first layer only
    total = sum(u.channels for u in units)
    keep = select_channels(model, "normal", 100 / total)
    assert len(keep[0]) == 28 and torch.equal(keep[0], torch.arange(100, 128))
    assert [len(k) for k in keep[1:]] == [u.channels for u in units[1:]]


def test_min_channels_floor():
    model = create_model("resnet20")
    with torch.no_grad():
        for u in prunable_units(model):
            u.bn.weight.fill_(0.0)
            u.bn.weight[0] = 1.0
    counts = [len(k) for k in select_channels(model, "normal", 0.9, min_channels=3)]
    assert min(counts) == 3


def test_gc_pruning_keeps_group_convs_valid():
    model = randomize_bn_(create_model("nin_gc"))
    small = thin(model, select_channels(model, "gc", 0.5)).eval()
    for m in small.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("nin", {"kind": "normal", "percent": 1.0}, ConfigError, "pruner.percent=1.0"),
        ("nin", {"kind": "normal", "percent": -0.1}, ConfigError, "a fraction in \\[0, 1\\)"),
        ("nin", {"kind": "regular", "base": 0}, ConfigError, "pruner.base=0"),
        ("nin", {"kind": "gc"}, ConfigError, "pruner=gc is for group-convolution models"),
        ("nin_gc", {"kind": "normal"}, ConfigError, "use pruner=gc"),
        ("resnet9", {"kind": "normal"}, PruneError, "resnet9 has no prunable BN layers"),
    ],
)
def test_bad_pruning_requests(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        select_channels(create_model(name), **kwargs)


def test_bacp_models_are_refused():
    with pytest.raises(PruneError, match="model.order=cbap"):
        prunable_units(create_model("nin", order="bacp"))


def test_pruned_checkpoint_round_trips(tmp_path):
    model = randomize_bn_(create_model("nin_gc"))
    small = thin(model, select_channels(model, "gc", 0.4))
    path = save_checkpoint(tmp_path / "p.pt", {"arch": small.arch, "model": small.state_dict()})
    again = model_from_checkpoint(load_checkpoint(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), small.eval()(x))


def mean_abs_gamma(path) -> float:
    model = model_from_checkpoint(load_checkpoint(path))
    return torch.cat([u.bn.weight.abs() for u in prunable_units(model)]).mean().item()


def test_sparse_training_lowers_gamma(tmp_path):
    base = tiny_cfg(epochs=2)
    run_training(base, tmp_path / "plain")
    run_training({**base, "sparsity": {"enabled": True, "s": 0.5}}, tmp_path / "sparse")
    assert mean_abs_gamma(tmp_path / "sparse" / "last.pt") < 0.9 * mean_abs_gamma(
        tmp_path / "plain" / "last.pt"
    )


def test_prune_cli_end_to_end_then_finetune(cli, tmp_path):
    train = tmp_path / "train"
    proc = cli(
        "train.py",
        *TINY,
        "model=vgg_small",
        "model.channels=[16,16,32,32,64,64]",
        "sparsity.enabled=true",
        f"hydra.run.dir={train}",
    )
    assert proc.returncode == 0, proc.stderr
    pruned = tmp_path / "pruned"
    proc = cli(
        "prune.py",
        f"ckpt={train}/best.pt",
        "pruner=regular",
        "pruner.percent=0.5",
        "pruner.base=8",
        f"hydra.run.dir={pruned}",
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((pruned / "metrics.json").read_text())
    assert m["dataset"] == "synthetic"  # the checkpoint's own data set by default
    assert all(c % 8 == 0 for c in m["channels"]) and m["params"] < m["params_before"]
    assert m["macs"] < m["macs_before"]
    for key in ("test_acc_before", "test_acc", "params", "macs"):
        assert key in m
    fine = tmp_path / "fine"
    proc = cli(
        "train.py", *TINY, "model=vgg_small", f"refine={pruned}/pruned.pt", f"hydra.run.dir={fine}"
    )
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(fine / "last.pt")["arch"]["channels"] == m["channels"]


def test_prune_cli_bad_input(cli, tmp_path):
    model = create_model("nin")
    ckpt = save_checkpoint(
        tmp_path / "nin.pt",
        {
            "arch": model.arch,
            "model": model.state_dict(),
            "config": {"dataset": {"name": "synthetic"}},
        },
    )
    proc = cli("prune.py", f"ckpt={ckpt}", "pruner=gc", f"hydra.run.dir={tmp_path}/a")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: pruner=gc is for group-convolution models" in proc.stderr
    proc = cli("prune.py", f"ckpt={ckpt}", "pruner.percent=1.5", f"hydra.run.dir={tmp_path}/b")
    assert "error: pruner.percent=1.5 is invalid" in proc.stderr


def test_prune_and_fuse_without_ckpt(cli, tmp_path):
    for script in ("prune.py", "fuse.py"):
        proc = cli(script, f"hydra.run.dir={tmp_path}/{script}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"error: ckpt is required: python {script} ckpt=RUN/best.pt" in proc.stderr
