from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.errors import ConfigError
from compress.models import create_model
from compress.prune import (
    PruneError,
    bn_scale_importance,
    channel_graph,
    mask_,
    select_channels,
    slimming_scales,
    thin,
)
from compress.spec import checkpoint_state, model_from_checkpoint
from compress.tasks import train as train_task
from tests.conftest import TINY
from tests.custom_models import Branchy, Gate
from tests.test_engine import tiny_cfg
from tests.test_fuse import randomize_bn_

SHAPE = (3, 32, 32)


def build(name: str) -> nn.Module:
    if name.startswith("tv_"):
        return create_model(name[3:], source="torchvision", num_classes=10)
    if name == "custom":
        return create_model(source="custom", target="tests.custom_models.small_cnn")
    if name == "nin_bacp":
        return create_model("nin", order="bacp")
    return create_model(name)


CASES = [
    ("nin", "normal", 1),
    ("nin", "regular", 16),
    ("nin_bacp", "normal", 1),
    ("nin_gc", "gc", 1),
    ("vgg_small", "regular", 32),
    ("resnet9", "normal", 1),
    ("resnet20", "normal", 1),
    ("resnet56", "regular", 4),
    ("tv_resnet18", "regular", 8),
    ("tv_mobilenet_v2", "normal", 1),
    ("custom", "normal", 1),
]


@pytest.mark.parametrize(("name", "kind", "base"), CASES)
def test_thinned_model_equals_masked_model(name, kind, base):
    torch.manual_seed(0)
    model = randomize_bn_(build(name))
    graph = channel_graph(model, SHAPE)
    keep = select_channels(graph, kind, 0.5, base=base)
    small = thin(model, keep, SHAPE).eval()
    x = torch.randn(2, *SHAPE)
    full = model(x)
    masked = mask_(graph, keep)(x)
    assert torch.allclose(small(x), masked, atol=1e-5), (small(x) - masked).abs().max()
    assert not torch.allclose(full, masked, atol=1e-3)  # pruning changed something
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    if kind == "regular":
        assert all(len(k) % base == 0 for k in keep)
    # the checkpoint holds per-layer widths that rebuild the thinned model with no code
    again = model_from_checkpoint(checkpoint_state(small)).eval()
    assert torch.equal(again(x), small(x))


def test_residual_streams_are_pruned_together_and_padded_shortcuts_kept():
    tv = channel_graph(build("tv_resnet18"), SHAPE)
    stream = next(g for g in tv.groups if "conv1" in g.layers)
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(stream.layers)
    # option-A shortcuts pad channels with F.pad: the residual streams stay whole
    r20 = channel_graph(build("resnet20"), SHAPE)
    assert [g.layers for g in r20.groups] == [[f"layers.{i}.conv1"] for i in range(9)]


def test_group_convs_and_shuffles_stay_valid():
    model = randomize_bn_(create_model("nin_gc"))
    graph = channel_graph(model, SHAPE)
    small = thin(model, select_channels(graph, "gc", 0.5), SHAPE).eval()
    for m in small.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
    assert small(torch.randn(1, *SHAPE)).shape == (1, 10)
    assert all(len(g.cells) > 1 for g in graph.groups[1:])


def test_depthwise_convs_shrink_with_their_channels():
    model = randomize_bn_(build("tv_mobilenet_v2"))
    small = thin(model, select_channels(channel_graph(model, SHAPE), "normal", 0.5), SHAPE)
    before = {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    dw = {n: m for n, m in small.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw.values())
    assert sum(m.groups < before[n] for n, m in dw.items()) >= len(dw) // 2  # most shrank


def test_global_threshold_removes_the_weakest_channels():
    model = create_model("vgg_small")
    graph = channel_graph(model, SHAPE)
    bns = [model.get_submodule(bn) for bn in graph.bn_names()]
    with torch.no_grad():
        for bn in bns:
            bn.weight.fill_(1.0)
        model.features[0].bn.weight[:100] = 0.01  # 100 weak channels in the first layer only
    total = sum(g.channels for g in graph.groups)
    keep = select_channels(graph, "normal", 100 / total)
    assert len(keep[0]) == 28 and torch.equal(keep[0], torch.arange(100, 128))
    assert [len(k) for k in keep[1:]] == [g.channels for g in graph.groups[1:]]


def test_importance_is_a_callable():
    model = randomize_bn_(create_model("nin"))
    graph = channel_graph(model, SHAPE)
    first = graph.groups[0]
    gamma = model.get_submodule(first.bns[0][0]).weight.abs()
    assert torch.allclose(bn_scale_importance(model, first), gamma)
    reverse = select_channels(
        graph, "normal", 0.5, importance=lambda m, g: -bn_scale_importance(m, g)
    )
    default = select_channels(graph, "normal", 0.5)
    assert not torch.equal(reverse[0], default[0])


def test_min_channels_floor_and_a_group_emptied():
    model = create_model("resnet20")
    graph = channel_graph(model, SHAPE)
    with torch.no_grad():
        for bn in graph.bn_names():
            model.get_submodule(bn).weight.fill_(0.0)
            model.get_submodule(bn).weight[0] = 1.0
    counts = [len(k) for k in select_channels(graph, "normal", 0.9, min_channels=3)]
    assert min(counts) == 3
    with torch.no_grad():
        for bn in graph.bn_names():
            model.get_submodule(bn).weight.uniform_(0.5, 1.0)
        model.layers[0].bn1.weight.zero_()  # the whole first group is weakest
    with pytest.raises(PruneError, match="would remove every channel of the group at layers.0"):
        select_channels(graph, "normal", 0.3)


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("nin", {"kind": "normal", "percent": 1.0}, ConfigError, "pruner.percent=1 is invalid"),
        ("nin", {"kind": "normal", "percent": -0.1}, ConfigError, "a fraction in \\[0, 1\\)"),
        ("nin", {"kind": "regular", "base": 0}, ConfigError, "pruner.base=0"),
        ("nin", {"kind": "gc"}, ConfigError, "pruner=gc is for group-convolution models"),
        ("nin_gc", {"kind": "regular", "base": 4}, ConfigError, "use pruner=normal or pruner=gc"),
    ],
)
def test_bad_pruning_requests(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        select_channels(channel_graph(create_model(name), SHAPE), **kwargs)


def test_untraceable_model_is_one_clear_message():
    with pytest.raises(PruneError, match=r"cannot trace Branchy: module 'gate' \(Gate\)"):
        channel_graph(Branchy(), SHAPE)
    # marked a leaf, the gate is a black box: the channels it reads are kept
    with pytest.raises(PruneError, match="Branchy has no prunable channels") as e:
        channel_graph(Branchy(), SHAPE, leaves=[Gate])
    assert "read by an op the channel graph does not follow (Gate gate)" in str(e.value)


def test_a_model_without_bn_has_nothing_to_prune():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    with pytest.raises(PruneError, match="has no prunable channels: all 18 conv / linear") as e:
        channel_graph(net, SHAPE)
    assert "8 no BatchNorm scales them (slimming ranks channels by BN scales)" in str(e.value)


def test_pruned_checkpoint_round_trips_through_a_file(tmp_path):
    model = randomize_bn_(create_model("nin_gc"))
    small = thin(model, select_channels(channel_graph(model, SHAPE), "gc", 0.4), SHAPE)
    path = save_checkpoint(tmp_path / "p.pt", checkpoint_state(small))
    state = load_checkpoint(path)
    assert state["widths"]["features.0.bn"]["num_features"] < 256
    assert state["arch"]["channels"] is None  # the builder is called as before, then resized
    again = model_from_checkpoint(state).eval()
    x = torch.randn(2, *SHAPE)
    assert torch.equal(again(x), small.eval()(x))


def mean_abs_gamma(path) -> float:
    model = model_from_checkpoint(load_checkpoint(path))
    return torch.cat([g.abs() for g in slimming_scales(model, SHAPE)]).mean().item()


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_sparse_training_lowers_gamma(tmp_path):
    base = tiny_cfg(epochs=2)
    train_task.run(base, tmp_path / "plain")
    train_task.run({**base, "sparsity": {"enabled": True, "s": 0.5}}, tmp_path / "sparse")
    assert mean_abs_gamma(tmp_path / "sparse" / "last.pt") < 0.9 * mean_abs_gamma(
        tmp_path / "plain" / "last.pt"
    )


@pytest.mark.slow
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
    # vgg_small's classifier output is all that cannot go
    reason = "the model's output (its width is the class count)"
    assert m["frozen_channels"] == {"frozen": 10, "of": 234, "why": {reason: 10}}
    assert f"10 of 234 channels frozen: 10 {reason}" in proc.stdout
    fine = tmp_path / "fine"
    proc = cli(
        "train.py", *TINY, "model=vgg_small", f"refine={pruned}/pruned.pt", f"hydra.run.dir={fine}"
    )
    assert proc.returncode == 0, proc.stderr
    pruned_widths = load_checkpoint(pruned / "pruned.pt")["widths"]
    assert load_checkpoint(fine / "last.pt")["widths"] == pruned_widths
    bn_widths = [w["num_features"] for k, w in pruned_widths.items() if k.endswith(".bn")]
    assert bn_widths == m["channels"]


def test_torchvision_model_prunes_at_imagenet_size():
    model = randomize_bn_(torchvision.models.resnet18(num_classes=10))
    shape = (3, 64, 64)
    small = thin(model, select_channels(channel_graph(model, shape), "normal", 0.3), shape)
    assert small.eval()(torch.randn(1, *shape)).shape == (1, 10)


def test_prune_and_fuse_bad_input_is_one_line(entry, tmp_path):
    model = create_model("nin")
    ckpt = save_checkpoint(
        tmp_path / "nin.pt",
        {**checkpoint_state(model), "config": {"dataset": {"name": "synthetic"}}},
    )
    code, _, err = entry("prune", f"ckpt={ckpt}", "pruner=gc", run_dir=tmp_path / "a")
    assert code == 2 and "error: pruner=gc is for group-convolution models" in err
    code, _, err = entry("prune", f"ckpt={ckpt}", "pruner.percent=0.99", run_dir=tmp_path / "b")
    assert code == 2 and "error: pruner.percent=0.99 would remove every channel" in err, err
    for script in ("prune", "fuse"):
        code, _, err = entry(script, run_dir=tmp_path / script)
        assert code == 2 and f"error: ckpt is required: python {script}.py ckpt=RUN/best.pt" in err


def test_a_quantized_model_is_pruned_with_its_learned_clips(entry, tmp_path):
    from compress.quant import quantize_
    from compress.quant.quantizers import PACTAct

    model = randomize_bn_(create_model("resnet20", channels=[8] * 9))
    pact = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "pact", "bits": 4}}
    quantize_(model, pact)
    with torch.no_grad():
        for q in (m for m in model.modules() if isinstance(m, PACTAct)):
            q.alpha.fill_(2.5)  # as if learned
    state = {**checkpoint_state(model), "config": {"dataset": {"name": "synthetic"}}}
    ckpt = save_checkpoint(tmp_path / "pact.pt", state)
    code, _, err = entry("prune", f"ckpt={ckpt}", "pruner.percent=0.3", run_dir=tmp_path / "p")
    assert code == 0, err
    pruned = load_checkpoint(tmp_path / "p" / "pruned.pt")
    again = model_from_checkpoint(pruned)
    alphas = [m.alpha.item() for m in again.modules() if isinstance(m, PACTAct)]
    assert alphas and all(a == 2.5 for a in alphas)
    float_model = model_from_checkpoint(pruned, quantized=False)  # for finetuning: float again
    assert not any(isinstance(m, PACTAct) for m in float_model.modules())


W4A4L = {"weight": {"kind": "lsq", "bits": 4}, "act": {"kind": "lsq", "bits": 4}}


def lsq_model(seed: int = 0) -> nn.Module:
    """An 8-channel ResNet-20 with LSQ weights and activations: activation steps initialised
    from a batch, per-channel weight steps made distinct (as if learned), random BNs."""
    from compress.quant import quantize_
    from compress.quant.quantizers import LSQWeight

    torch.manual_seed(seed)
    model = quantize_(create_model("resnet20", channels=[8] * 9), W4A4L)
    with torch.no_grad():
        model.train()(torch.randn(16, *SHAPE))
        for q in (m for m in model.modules() if isinstance(m, LSQWeight)):
            q.step.mul_(torch.rand_like(q.step) + 0.5)
    return randomize_bn_(model)


def lsq_steps(model: nn.Module) -> dict[str, torch.Tensor]:
    from compress.quant.quantizers import LSQWeight

    return {
        n: m.weight_quant.step.detach().clone()
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight_quant", None), LSQWeight)
    }


def test_an_lsq_model_is_thinned_with_the_steps_of_its_kept_channels():
    """LSQ weights hold one learned step per output channel: thinning a layer keeps exactly the
    kept channels' steps, and the thinned model computes what the unpruned one does with the
    pruned channels' importance (BN scale and shift) zeroed."""
    model = lsq_model()
    steps = lsq_steps(model)
    graph = channel_graph(model, SHAPE)
    keep = select_channels(graph, "normal", 0.4)
    small = thin(model, keep, SHAPE).eval()
    kept: dict[str, torch.Tensor] = {}
    for g, k in zip(graph.groups, keep, strict=True):
        for name, chans, classes in g.producers:
            kept[name] = chans[torch.isin(classes, k)].sort().values
    thinned = lsq_steps(small)
    assert kept and set(kept) <= set(steps)  # the pruned layers are LSQ layers
    for name, idx in kept.items():
        layer = small.get_submodule(name)
        assert len(idx) < 8 and thinned[name].shape == (layer.out_channels,) == idx.shape
        assert torch.equal(thinned[name], steps[name][idx]), name
    for name in set(steps) - set(kept):  # layers whose outputs were not pruned: untouched
        assert torch.equal(thinned[name], steps[name]), name
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        masked = mask_(graph, keep)(x)  # pruned channels at zero importance, unpruned layers
        assert torch.equal(small(x), masked)
        assert not torch.allclose(full, masked, atol=1e-3)  # pruning changed something
        name = next(iter(kept))  # the first channels' steps instead of the kept ones': wrong
        small.get_submodule(name).weight_quant.step.copy_(steps[name][: len(kept[name])])
        assert not torch.equal(small(x), masked)


def test_prune_py_prunes_an_lsq_checkpoint(entry, tmp_path):
    model = lsq_model()
    steps = lsq_steps(model)
    state = {**checkpoint_state(model), "config": {"dataset": {"name": "synthetic"}}}
    ckpt = save_checkpoint(tmp_path / "lsq.pt", state)
    code, _, err = entry("prune", f"ckpt={ckpt}", "pruner.percent=0.3", run_dir=tmp_path / "p")
    assert code == 0, err
    again = model_from_checkpoint(load_checkpoint(tmp_path / "p" / "pruned.pt")).eval()
    thinned = lsq_steps(again)
    assert thinned.keys() == steps.keys()
    assert any(len(thinned[n]) < len(steps[n]) for n in steps)
    for name, step in thinned.items():  # each a kept channel's step, in the original order
        assert step.shape == (again.get_submodule(name).out_channels,)
        at = [int((steps[name] == v).nonzero()[0]) for v in step]
        assert at == sorted(set(at)), name
    again(torch.randn(2, *SHAPE))


class SharedConv(nn.Module):
    """One conv applied twice (weight sharing): its channels must keep one width."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.bn1(self.shared(x)))
        x = torch.relu(self.bn2(self.shared(x)))
        return self.fc(x.mean((2, 3)))


def test_a_layer_called_twice_keeps_its_channels():
    # its inputs and outputs are frozen (both calls need one width), which here leaves nothing
    with pytest.raises(PruneError, match="SharedConv has no prunable channels"):
        channel_graph(randomize_bn_(SharedConv()), SHAPE)


class _ShuffleHead(nn.Module):
    """A grouped conv, a channel shuffle (12 channels, 3 groups: the positions are not a
    bitwise pattern), a depthwise conv with a multiplier (kept whole), and a flatten into a
    linear head: what the channel graph must follow channel by channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 12, 1, groups=3), nn.BatchNorm2d(12)
        self.shuffle = nn.ChannelShuffle(3)
        self.conv3, self.bn3 = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.mult, self.bn4 = nn.Conv2d(12, 24, 3, padding=1, groups=12), nn.BatchNorm2d(24)
        self.pool, self.flat, self.head = nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.shuffle(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(self.flat(self.pool(torch.relu(self.bn4(self.mult(x))))))


def _masked(model: nn.Module, graph, keep) -> nn.Module:
    """`model` with every dropped channel's BN scale and shift zeroed: after the ReLU those
    channels are 0, which is what removing them computes."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for g, k in zip(graph.groups, keep, strict=True):
            for bn, channels, classes in g.bns:
                drop = channels[~torch.isin(classes, k)]
                m = masked.get_submodule(bn)
                m.weight[drop], m.bias[drop] = 0.0, 0.0
    return masked


def test_thinning_through_shuffles_multipliers_and_flattens_equals_masking():
    torch.manual_seed(0)
    model = randomize_bn_(_ShuffleHead()).eval()
    graph = channel_graph(model, (3, 8, 8))
    keep = select_channels(graph, "gc", 0.5)
    small = thin(model, keep, (3, 8, 8)).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(small(x), _masked(model, graph, keep)(x), atol=1e-5)
    assert small.conv1.out_channels < 12  # pruned; what feeds the multiplier is kept whole
    assert (small.conv3.out_channels, small.mult.in_channels, small.mult.out_channels) == (
        12,
        12,
        24,
    )
    assert small.head.in_features == 96


@pytest.mark.parametrize(("channels", "groups"), [(12, 3), (12, 4), (8, 2), (30, 5)])
def test_the_graph_moves_channels_as_channel_shuffle_does(channels, groups):
    from compress.prune.graph import _shuffle

    x = torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1)
    moved = nn.ChannelShuffle(groups)(x).flatten().long().tolist()
    assert _shuffle(list(range(channels)), groups) == moved


def test_nothing_is_removed_at_zero_percent():
    model = randomize_bn_(create_model("vgg_small"))
    graph = channel_graph(model, SHAPE)
    keep = select_channels(graph, "normal", 0.0)
    assert [len(k) for k in keep] == [g.channels for g in graph.groups]


def test_grouped_pruning_keeps_about_the_asked_share_of_each_group():
    """nin_gc's groups split into cells that keep equal counts: a quarter removed leaves
    about three quarters of every group, rounded to a multiple of its cell count."""
    model = randomize_bn_(create_model("nin_gc"))
    graph = channel_graph(model, SHAPE)
    keep = select_channels(graph, "gc", 0.25, scope="layer")
    for g, k in zip(graph.groups, keep, strict=True):
        step = len(g.cells)
        assert len(k) % step == 0 and abs(len(k) - 0.75 * g.channels) <= step, (g.layers, len(k))


def test_masking_with_a_keep_list_for_other_groups_is_refused():
    model = randomize_bn_(create_model("vgg_small"))
    graph = channel_graph(model, SHAPE)
    keep = select_channels(graph, "normal", 0.5)
    with pytest.raises(ValueError, match="zip"):
        mask_(graph, keep[:-1])


class _Mixer(nn.Module):
    """conv1 -> `op` -> conv2: an op that mixes or reshapes channels in a way the graph has
    no rule for, which must freeze conv1's channels (pruning them would change the result)."""

    OPS = {
        "cumsum over channels": (8, lambda x: x.cumsum(1)),
        "mean over channels": (1, lambda x: x.mean(1, keepdim=True)),
        "cat along height": (8, lambda x: torch.cat([x, x], dim=2)),
        "cat along the batch": (8, lambda x: torch.cat([x, x], dim=0)),
    }

    def __init__(self, op: str) -> None:
        super().__init__()
        cin, self.op = self.OPS[op]
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.op(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


@pytest.mark.parametrize("op", list(_Mixer.OPS))
def test_ops_the_graph_cannot_follow_freeze_the_channels_they_read(op):
    torch.manual_seed(0)
    model = randomize_bn_(_Mixer(op)).eval()
    graph = channel_graph(model, (3, 8, 8))
    keep = select_channels(graph, "normal", 0.5)
    small = thin(model, keep, (3, 8, 8)).eval()
    assert small.conv1.out_channels == 8 and small.conv2.out_channels == 4
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(small(x), _masked(model, graph, keep)(x), atol=1e-5)


def test_normal_pruning_of_a_grouped_model_keeps_its_groups_and_says_so(caplog):
    model = randomize_bn_(create_model("nin_gc"))
    graph = channel_graph(model, SHAPE)
    with caplog.at_level("INFO", logger="compress.prune.pruner"):
        normal = select_channels(graph, "normal", 0.3)
    assert "removed evenly across its convolution groups (as pruner=gc does)" in caplog.text
    gc = select_channels(graph, "gc", 0.3)
    assert all(torch.equal(a, b) for a, b in zip(normal, gc, strict=True))
    x = torch.randn(2, *SHAPE)
    small = thin(model, normal, SHAPE).eval()
    with torch.no_grad():
        assert torch.allclose(small(x), _masked(model.eval(), graph, normal)(x), atol=1e-4)


@pytest.mark.slow  # heavy for the fast suite (make test-slow)
def test_stochastic_depth_keeps_efficientnets_residual_streams_prunable():
    from compress.prune.graph import CHANNELWISE_FUNCTIONS, CHANNELWISE_MODULES

    torch.manual_seed(0)
    model = randomize_bn_(build("tv_efficientnet_b0")).eval()
    graph = channel_graph(model, (3, 64, 64))
    streams = [g for g in graph.groups if "features.2.0.block.3.0" in g.layers]
    assert streams and streams[0].channels == 24  # stage 2's stream: 2 blocks and their adds
    keep = select_channels(graph, "normal", 0.3, scope="layer")
    small = thin(model, keep, (3, 64, 64)).eval()
    assert small.features[2][0].block[3][0].out_channels < 24
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(small(x), _masked(model, graph, keep)(x), atol=1e-4)
    assert torchvision.ops.StochasticDepth in CHANNELWISE_MODULES
    assert torchvision.ops.stochastic_depth in CHANNELWISE_FUNCTIONS


class _Scaled(nn.Module):
    """A user's channel-wise op whose forward FX cannot trace (a data-dependent branch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 if x.sum() > 0 else x * 2.0


@torch.fx.wrap
def _halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


class _WithUserOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.scaled, self.fc = _Scaled(), nn.Linear(8, 10)

    def forward(self, x):
        x = self.scaled(torch.relu(self.b1(self.c1(x))))
        x = _halve(torch.relu(self.b2(self.c2(x))))
        return self.fc(x.mean((2, 3)))


def test_a_registered_channelwise_op_keeps_its_channels_prunable(monkeypatch):
    from compress.prune import graph as graph_module
    from compress.prune import register_channelwise

    def prunable(model):
        try:
            return {layer for g in channel_graph(model, SHAPE).groups for layer in g.layers}
        except PruneError:
            return set()

    model = randomize_bn_(_WithUserOps()).eval()
    assert prunable(model) == set()  # the module cannot be traced, so nothing can be pruned
    monkeypatch.setattr(graph_module, "CHANNELWISE_MODULES", graph_module.CHANNELWISE_MODULES)
    monkeypatch.setattr(
        graph_module, "CHANNELWISE_FUNCTIONS", set(graph_module.CHANNELWISE_FUNCTIONS)
    )
    register_channelwise(_Scaled)
    assert prunable(model) == {"c1"}
    register_channelwise(_halve)
    assert prunable(model) == {"c1", "c2"}
    with pytest.raises(TypeError, match="takes an nn.Module subclass or a function, not 3"):
        register_channelwise(3)


def test_frozen_channels_are_counted_with_their_reasons():
    from compress.prune.pruner import frozen_summary

    graph = channel_graph(randomize_bn_(build("tv_resnet18")), SHAPE)
    assert graph.frozen_channels() == (
        10,
        4810,
        {"the model's output (its width is the class count)": 10},
    )
    # MobileNet-v3's squeeze-excitation hidden layers have no BN; everything frozen is counted
    graph = channel_graph(build("tv_mobilenet_v3_small"), SHAPE)
    frozen, total, why = graph.frozen_channels()
    assert frozen == sum(why.values()) and total == sum(
        len(v) for v in graph.walker.spaces.values()
    )
    assert why["no BatchNorm scales them (slimming ranks channels by BN scales)"] > 0
    assert frozen_summary(graph).startswith(f"{frozen} of {total} channels frozen: ")
    # ResNet-20's zero-padded shortcuts: the streams they join are kept whole
    _, _, why = channel_graph(build("resnet20"), SHAPE).frozen_channels()
    assert "the output of an op the channel graph does not follow (pad)" in why


def test_only_grouped_convs_that_are_not_depthwise_count_as_group_convolutions(caplog):
    from compress.prune.pruner import has_group_convs

    # 512 channels: above the small ints CPython caches, so identity is not equality there
    n, g = int("512"), int("512")  # equal ints, distinct objects (one literal would be one)
    depthwise = nn.Sequential(nn.Conv2d(3, n, 1), nn.Conv2d(n, n, 3, groups=g))
    assert depthwise[1].groups is not depthwise[1].in_channels
    assert not has_group_convs(depthwise)
    assert has_group_convs(nn.Sequential(nn.Conv2d(3, 512, 1), nn.Conv2d(512, 512, 3, groups=2)))
    graph = channel_graph(randomize_bn_(create_model("nin_gc")), SHAPE)
    with caplog.at_level("INFO", logger="compress.prune.pruner"):
        select_channels(graph, "gc", 0.3)
    assert "as pruner=gc does" not in caplog.text  # said only when normal was asked


def test_a_reference_of_other_groups_is_refused_either_way():
    from compress.prune import Reference

    a = channel_graph(randomize_bn_(create_model("vgg_small")), SHAPE)
    b = channel_graph(randomize_bn_(create_model("nin")), SHAPE)
    for graph, other in ((a, b), (b, a)):  # whichever sorts first
        with pytest.raises(PruneError, match="the reference model's channel groups differ"):
            select_channels(graph, "normal", 0.3, reference=Reference.of(other))
