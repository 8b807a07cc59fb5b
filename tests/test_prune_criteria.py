"""Pruning a model trained without sparsity: the importance criteria (l1, l2, taylor, fpgm
against hand computations), per-layer scope, floors, MAC targets and iterative pruning."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress import engine
from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.config import PrunerConfig, validate_pruner
from compress.errors import CompressError, ConfigError
from compress.metrics import count_macs
from compress.models import create_model
from compress.pipeline import run_pipeline
from compress.prune import (
    IMPORTANCES,
    PruneError,
    agp_schedule,
    bn_scale_importance,
    build_importance,
    channel_graph,
    fpgm_importance,
    l1_importance,
    l2_importance,
    mask_,
    select_channels,
    taylor_importance,
    thin,
)
from compress.spec import checkpoint_state, model_from_checkpoint
from compress.tasks import prune as prune_task
from tests.test_fuse import randomize_bn_
from tests.test_pipeline import staged
from tests.test_prune import SHAPE, build

# ---------------------------------------------------------------- hand-computed rankings
TINY_SHAPE = (2, 5, 5)
# first conv's three 1x1 filters: L1 3, 4, 1.5; L2 3, 2.83, 1.12; summed distances to the
# others 6.27, 5.59, 7.39: three criteria, three different rankings
FIRST = torch.tensor([[3.0, 0.0], [2.0, 2.0], [-1.0, 0.5]])


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        net[0].weight.copy_(FIRST.view(3, 2, 1, 1))
        scale = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(4, 1, 1, 1)
        net[3].weight.copy_(torch.linspace(-1, 1, 108).view(4, 3, 3, 3).cos() * scale)
    return randomize_bn_(net)


def normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean()


def pairwise_distance_sums(w: torch.Tensor) -> torch.Tensor:
    w = w.flatten(1).double()
    return torch.stack([sum((w[i] - w[j]).norm() for j in range(len(w))) for i in range(len(w))])


def test_the_name_table_is_the_config_choices():
    assert tuple(IMPORTANCES) == PrunerConfig.IMPORTANCES
    for name in IMPORTANCES:
        validate_pruner({"importance": name})


@pytest.mark.parametrize(
    ("name", "raw", "order"),
    [
        ("l1", lambda w: w.flatten(1).abs().sum(1), [1, 0, 2]),
        ("l2", lambda w: w.flatten(1).pow(2).sum(1).sqrt(), [0, 1, 2]),
        ("fpgm", pairwise_distance_sums, [2, 0, 1]),
    ],
)
def test_weight_criteria_equal_hand_computed_scores(name, raw, order):
    net = tiny_net()
    graph = channel_graph(net, TINY_SHAPE)
    assert [g.layers for g in graph.groups] == [["0"], ["3"]]
    importance = build_importance(name, net, graph.groups)
    for group, conv in zip(graph.groups, (net[0], net[3]), strict=True):
        expected = normalised(raw(conv.weight.detach()).float())
        assert torch.allclose(importance(net, group), expected, atol=1e-6)
    assert importance(net, graph.groups[0]).argsort(descending=True).tolist() == order
    # scope=layer, a third of each layer: the first one loses its weakest filter
    keep = select_channels(graph, percent=0.34, scope="layer", importance=importance)
    assert keep[0].tolist() == sorted(order[:2])


def per_sample_mask_gradients(
    net: nn.Module, bns: list[nn.Module], channels: int, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """d loss_n / d m[n, c] for a multiplier m on the outputs of `bns` (shared by all of them:
    one class of coupled channels), at m = 1: what masking each channel costs, to first order,
    computed without the library's hooks."""
    mask = torch.ones(len(x), channels, requires_grad=True)
    hooks = [bn.register_forward_hook(lambda m, i, out: out * mask[:, :, None, None]) for bn in bns]
    try:
        loss = F.cross_entropy(net.eval()(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, mask)
    finally:
        for h in hooks:
            h.remove()
    return grad


def test_taylor_equals_the_gradient_of_a_channel_mask():
    net = tiny_net()
    graph = channel_graph(net, TINY_SHAPE)
    torch.manual_seed(1)
    batches = [(torch.randn(6, *TINY_SHAPE), torch.randint(0, 3, (6,))) for _ in range(3)]
    importance = build_importance("taylor", net, graph.groups, batches)
    for group, bn in zip(graph.groups, (net[1], net[4]), strict=True):
        grads = [per_sample_mask_gradients(net, [bn], group.channels, x, y) for x, y in batches]
        expected = normalised(torch.cat(grads).abs().mean(0))
        assert torch.allclose(importance(net, group), expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())  # the weights are left alone


class Residual(nn.Module):
    """stem -> block -> stem + block: the stream's channels come from two convs and two BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(s)))))
        y += s  # in place, as torchvision's blocks: Taylor must still see bn2's own output
        return self.fc(torch.relu(y).mean((2, 3)))


def test_a_coupled_group_is_scored_once_averaged_over_its_producers():
    torch.manual_seed(0)
    net = randomize_bn_(Residual())
    graph = channel_graph(net, (3, 8, 8))
    streams = [g for g in graph.groups if "stem" in g.layers]
    assert len(streams) == 1 and len(graph.groups) == 2  # the stream, and conv1
    stream = streams[0]
    assert stream.layers == ["stem", "conv2"] and [b for b, _, _ in stream.bns] == ["bn0", "bn2"]
    assert [(name, chans.tolist()) for name, chans, _ in stream.producers] == [
        ("stem", [0, 1, 2, 3]),
        ("conv2", [0, 1, 2, 3]),
    ]
    w0, w2 = net.stem.weight.detach(), net.conv2.weight.detach()
    cases = {
        "l1": (w0.abs().sum((1, 2, 3)) + w2.abs().sum((1, 2, 3))) / 2,
        "l2": (w0.flatten(1).norm(dim=1) + w2.flatten(1).norm(dim=1)) / 2,
        "fpgm": ((pairwise_distance_sums(w0) + pairwise_distance_sums(w2)) / 2).float(),
    }
    for name, raw in cases.items():
        score = build_importance(name, net, graph.groups)(net, stream)
        assert torch.allclose(score, normalised(raw), atol=1e-6), name
    # taylor: masking a stream channel zeroes it at both BNs, one estimate for the pair
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 10, (5,))
    grad = per_sample_mask_gradients(net, [net.bn0, net.bn2], 4, x, y)
    score = taylor_importance(net, graph.groups, [(x, y)])(net, stream)
    assert torch.allclose(score, normalised(grad.abs().mean(0)), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- coupled groups: the mean
# The documented reduction (importance.py): a coupled group's channel is scored by the mean of
# its members' scores (|gamma| over its BNs for bn_scale, the filter criteria over its
# producers). When every channel of a group has the same number of members a sum would only
# scale the group, which the l1 / l2 / fpgm mean-normaliser hides; bn_scale is compared across
# groups as is, so a sum would keep a stream's channels over a single-BN layer's. The values
# below are exact in binary floating point, so the scores are compared with torch.equal.
STREAM_GAMMAS = {"3.1": [0.5, 0.25, 1.0, 0.125], "4.bn2": [0.25, -0.125, 0.5, -0.375]}
STREAM_MEAN = [0.375, 0.1875, 0.75, 0.25]  # a sum: 0.75, 0.375, 1.5, 0.5
SINGLE_GAMMAS = [0.3125, -0.5625, 0.0625, 0.4375]  # 4.bn1, the block's conv1: one BN


def resnet9_with_a_stream() -> tuple[nn.Module, object]:
    """resnet9 at width 2: group 1, the residual stream after the first stage (made by conv
    3.0 and the block's 4.conv2, scaled by BNs 3.1 and 4.bn2), and group 2, the block's conv1
    (BN 4.bn1), with STREAM_GAMMAS / SINGLE_GAMMAS; every other BN's gamma is 8 (kept)."""
    model = create_model("resnet9", width=2)
    graph = channel_graph(model, SHAPE)
    stream, single = graph.groups[1], graph.groups[2]
    assert [b for b, _, _ in stream.bns] == ["3.1", "4.bn2"]
    assert [p for p, _, _ in stream.producers] == ["3.0", "4.conv2"]
    assert [b for b, _, _ in single.bns] == ["4.bn1"] and stream.channels == single.channels == 4
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(8.0)
        for name, gamma in {**STREAM_GAMMAS, "4.bn1": SINGLE_GAMMAS}.items():
            model.get_submodule(name).weight.copy_(torch.tensor(gamma))
    return model, graph


def test_bn_scale_of_a_stream_is_the_mean_over_its_bns_and_ranks_across_groups():
    model, graph = resnet9_with_a_stream()
    stream, single = graph.groups[1], graph.groups[2]
    for score in (bn_scale_importance, build_importance("bn_scale", model, graph.groups)):
        assert torch.equal(score(model, stream), torch.tensor(STREAM_MEAN))
        assert torch.equal(score(model, single), torch.tensor(SINGLE_GAMMAS).abs())
    # scope=global: the 3 weakest of all channels go. Mean: 4.bn1's 0.0625 and the stream's
    # 0.1875 and 0.25 (its channels 1, 3); a sum (0.75, 0.375, 1.5, 0.5) would have dropped
    # 4.bn1's 0.3125 (channel 0) and kept the stream's channel 3
    total = sum(g.channels for g in graph.groups)
    # quantile position 2.5 of 0..total-1: the threshold lies between the 3rd and 4th weakest
    keep = select_channels(graph, percent=2.5 / (total - 1), importance=bn_scale_importance)
    assert keep[1].tolist() == [0, 2] and keep[2].tolist() == [0, 1, 3]
    others = [(k, g) for k, g in zip(keep, graph.groups, strict=True) if g.index not in (1, 2)]
    assert all(k.tolist() == list(range(g.channels)) for k, g in others)


def test_filter_criteria_of_a_stream_are_the_mean_over_its_producers():
    """Each filter of the stream's two producers has one non-zero weight: its L1 and L2 norm
    are that weight's magnitude, and the distance of two filters the difference of theirs."""
    model, graph = resnet9_with_a_stream()
    stream = graph.groups[1]
    a = torch.tensor([2.0, -0.5, 1.0, 0.25], dtype=torch.float64)  # 3.0's filters
    b = torch.tensor([1.0, 3.5, -2.0, 0.75], dtype=torch.float64)  # 4.conv2's filters
    with torch.no_grad():
        for name, v in (("3.0", a), ("4.conv2", b)):
            w = model.get_submodule(name).weight
            w.zero_()
            w[:, 0, 1, 1] = v.float()
    norm = (a.abs() + b.abs()) / 2  # a sum: 3, 4, 3, 1 (same ranking: see above)
    assert norm.tolist() == [1.5, 2.0, 1.5, 0.5]
    dist = ((a[:, None] - a).abs().sum(1) + (b[:, None] - b).abs().sum(1)) / 2
    for fn, name, raw in (
        (l1_importance, "l1", norm),
        (l2_importance, "l2", norm),
        (fpgm_importance, "fpgm", dist),
    ):
        assert torch.equal(fn(model, stream), raw.float()), name
        normalised_score = build_importance(name, model, graph.groups)(model, stream)
        raw32 = raw.float()  # normalised in float32, as the library does: the same roundings
        assert torch.equal(normalised_score, raw32 / raw32.mean()), name


class ThreeBNStream(nn.Module):
    """stem -> block -> block, both blocks adding into the stream: one group, three BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "conv1": nn.Conv2d(4, 6, 3, padding=1, bias=False),
                    "bn1": nn.BatchNorm2d(6),
                    "conv2": nn.Conv2d(6, 4, 3, padding=1, bias=False),
                    "bn2": nn.BatchNorm2d(4),
                }
            )
            for _ in range(2)
        )
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        for b in self.blocks:
            s = torch.relu(s + b["bn2"](b["conv2"](torch.relu(b["bn1"](b["conv1"](s))))))
        return self.fc(s.mean((2, 3)))


def test_bn_scale_of_a_three_bn_stream_is_the_mean_of_three():
    net = ThreeBNStream()
    graph = channel_graph(net, (3, 8, 8))
    (stream,) = [g for g in graph.groups if "stem" in g.layers]
    assert [b for b, _, _ in stream.bns] == ["bn0", "blocks.0.bn2", "blocks.1.bn2"]
    gammas = [[0.75, 0.25, 1.0, 0.125], [0.5, -0.125, 1.0, 0.125], [0.25, 0.0, -0.25, 0.125]]
    with torch.no_grad():
        for (name, _, _), g in zip(stream.bns, gammas, strict=True):
            net.get_submodule(name).weight.copy_(torch.tensor(g))
    # the means 0.5, 0.125, 0.75, 0.125 (sums: 1.5, 0.375, 2.25, 0.375; over 2: 0.75, ...)
    assert torch.equal(bn_scale_importance(net, stream), torch.tensor([0.5, 0.125, 0.75, 0.125]))


# ---------------------------------------------------------------- every criterion, zoo models
def random_batches(n: int = 2, shape: tuple[int, ...] = SHAPE) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, *shape, generator=g), torch.randint(0, 10, (4,), generator=g))] * n


@pytest.mark.parametrize("importance", list(IMPORTANCES))
@pytest.mark.parametrize(("name", "kind"), [("resnet20", "normal"), ("nin_gc", "gc")])
def test_thinned_model_equals_masked_model_for_every_criterion(name, kind, importance):
    torch.manual_seed(0)
    model = randomize_bn_(build(name))
    graph = channel_graph(model, SHAPE)
    score = build_importance(importance, model, graph.groups, random_batches())
    keep = select_channels(graph, kind, 0.5, importance=score)
    small = thin(model, keep, SHAPE).eval()
    x = torch.randn(2, *SHAPE)
    masked = mask_(graph, keep)(x)
    assert torch.allclose(small(x), masked, atol=1e-5), (small(x) - masked).abs().max()
    assert sum(len(k) for k in keep) < sum(g.channels for g in graph.groups)


def test_depthwise_convs_take_no_part_in_filter_criteria():
    model = randomize_bn_(build("tv_mobilenet_v2"))
    graph = channel_graph(model, SHAPE)
    depthwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    producers = {name for g in graph.groups for name, _, _ in g.producers}
    assert depthwise and not depthwise & producers
    # ... but they are thinned with their channels
    keep = select_channels(
        graph, percent=0.4, importance=build_importance("l2", model, graph.groups)
    )
    small = thin(model, keep, SHAPE).eval()
    x = torch.randn(1, *SHAPE)
    assert torch.allclose(small(x), mask_(graph, keep)(x), atol=1e-5)


# ---------------------------------------------------------------- scope, floors, MAC targets
def test_scope_layer_removes_the_same_fraction_of_every_group():
    model = randomize_bn_(create_model("vgg_small", channels=[16, 24, 32, 40, 64, 72]))
    graph = channel_graph(model, SHAPE)
    for importance in ("bn_scale", "l1"):
        score = build_importance(importance, model, graph.groups)
        keep = select_channels(graph, percent=0.3, scope="layer", importance=score)
        for g, k in zip(graph.groups, keep, strict=True):
            assert g.channels - len(k) == math.floor(0.3 * g.channels + 0.5)
    # a global threshold on the same scores does not
    keep = select_channels(graph, percent=0.3, importance=score)
    fractions = {round(len(k) / g.channels, 2) for g, k in zip(graph.groups, keep, strict=True)}
    assert len(fractions) > 1


def weak_first_group(name: str = "resnet20") -> tuple[nn.Module, object]:
    model = create_model(name)
    graph = channel_graph(model, SHAPE)
    with torch.no_grad():
        for bn in graph.bn_names():
            model.get_submodule(bn).weight.uniform_(0.5, 1.0)
        model.get_submodule(graph.groups[0].bns[0][0]).weight.mul_(0.01)  # all weakest
    return model, graph


def test_the_floor_never_empties_a_layer():
    model, graph = weak_first_group()
    first = graph.groups[0].channels
    # today's contract: no floor set, a percent that empties a group is refused
    with pytest.raises(PruneError, match="would remove every channel of the group at layers.0"):
        select_channels(graph, percent=0.3)
    keep = select_channels(graph, percent=0.3, min_ratio=0.25)
    assert len(keep[0]) == math.ceil(0.25 * first)
    keep = select_channels(graph, percent=0.3, scope="layer", min_ratio=0.8)
    assert [len(k) for k in keep] == [math.ceil(0.8 * g.channels) for g in graph.groups]
    # a MAC target always keeps the floor: at least one channel, whatever the criterion
    vgg = randomize_bn_(create_model("vgg_small", channels=[8, 8, 16, 16, 16, 16]))
    vgraph = channel_graph(vgg, SHAPE)
    for importance in IMPORTANCES:
        score = build_importance(importance, vgg, vgraph.groups, random_batches())
        for scope in PrunerConfig.SCOPES:
            keep = select_channels(
                vgraph, percent=0.9, target="macs", scope=scope, importance=score
            )
            assert min(len(k) for k in keep) >= 1, (importance, scope)


def one_channel_costs(graph) -> list[int]:
    """The MACs one channel of each group costs in the unpruned model: an upper bound of what
    it costs once the layers around it are thinner."""
    costs = []
    for i in range(len(graph.groups)):
        keep = [torch.arange(g.channels) for g in graph.groups]
        keep[i] = keep[i][1:]
        costs.append(graph.macs_removed(keep))
    return costs


@pytest.mark.parametrize("scope", PrunerConfig.SCOPES)
@pytest.mark.parametrize(("name", "importance"), [("vgg_small", "l1"), ("tv_mobilenet_v2", "fpgm")])
def test_a_mac_target_is_reached_within_one_channel(name, importance, scope):
    torch.manual_seed(0)
    model = randomize_bn_(build(name))
    graph = channel_graph(model, SHAPE)
    full = count_macs(model, SHAPE)
    score = build_importance(importance, model, graph.groups)
    keep = select_channels(graph, percent=0.4, target="macs", scope=scope, importance=score)
    macs = count_macs(thin(model, keep, SHAPE), SHAPE)
    assert macs == full - graph.macs_removed(keep)  # the bisection's count is count_macs'
    # adjacent thresholds differ by one channel (global: scores have no ties) or by one
    # channel per group (layer), and the nearer of the two bracketing the goal is chosen
    costs = one_channel_costs(graph)
    tolerance = max(costs) if scope == "global" else sum(costs)
    assert abs(macs - 0.6 * full) <= tolerance, (macs / full, tolerance / full)


def test_an_unreachable_mac_target_is_one_line():
    model = randomize_bn_(create_model("vgg_small", channels=[8, 8, 16, 16, 16, 16]))
    graph = channel_graph(model, SHAPE)
    with pytest.raises(PruneError, match=r"pruner.percent=0.95 of the MACs cannot be removed") as e:
        select_channels(graph, percent=0.95, target="macs", min_ratio=0.5)
    assert "\n" not in str(e.value) and "at most 0." in str(e.value)
    # resnet20's residual streams are kept whole (option-A shortcuts): with the first conv of
    # each block down to one channel, the stem and the streams' convs stay
    resnet = channel_graph(create_model("resnet20"), SHAPE)
    with pytest.raises(PruneError, match="leave 1936000 of 40551040, so at most 0.9523 can go"):
        select_channels(resnet, percent=0.99, target="macs")


# ---------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("pruner", "message"),
    [
        (
            {"importance": "magnitude"},
            "pruner.importance='magnitude' is invalid: expected one of "
            "bn_scale, l1, l2, taylor, fpgm",
        ),
        ({"scope": "block"}, "pruner.scope='block' is invalid: expected one of global, layer"),
        ({"target": "flops"}, "pruner.target='flops' is invalid: expected one of channels, macs"),
        ({"min_ratio": 1.0}, r"pruner.min_ratio=1 is invalid: expected a fraction in \[0, 1\)"),
        ({"min_ratio": -0.1}, r"pruner.min_ratio=-0.1 is invalid"),
        ({"batches": 0}, "pruner.batches=0 is invalid: expected an integer >= 1"),
        ({"steps": 0}, "pruner.steps=0 is invalid: expected an integer >= 1"),
        ({"finetune_epochs": 0}, "pruner.finetune_epochs=0 is invalid: expected an integer >= 1"),
    ],
)
def test_bad_pruner_keys_are_one_line(pruner, message):
    with pytest.raises(ConfigError, match=message):
        validate_pruner(pruner)


def test_bad_criterion_requests():
    model = create_model("resnet20")
    graph = channel_graph(model, SHAPE)
    with pytest.raises(ConfigError, match="pruner.importance='magnitude' is invalid"):
        build_importance("magnitude", model, graph.groups)
    with pytest.raises(ConfigError, match="pruner.scope='block' is invalid"):
        select_channels(graph, scope="block")
    with pytest.raises(ConfigError, match="pruner.target='flops' is invalid"):
        select_channels(graph, target="flops")
    no_data = "pruner.importance=taylor needs batches of training data"
    with pytest.raises(CompressError, match=no_data):
        build_importance("taylor", model, graph.groups)
    with pytest.raises(CompressError, match=no_data):
        taylor_importance(model, graph.groups, [])
    with pytest.raises(ConfigError, match="pruner.steps=3 prunes and finetunes in turns.*stage"):
        prune_task.run({"ckpt": "unused.pt", "pruner": {"steps": 3}}, "unused")


# ---------------------------------------------------------------- the prune task and prune.py
@pytest.fixture
def checkpoint(tmp_path):
    model = randomize_bn_(create_model("vgg_small", channels=[8, 8, 16, 16, 16, 16]))
    dataset = {"name": "synthetic", "num_train": 64, "num_test": 32}
    return save_checkpoint(
        tmp_path / "vgg.pt", {**checkpoint_state(model), "config": {"dataset": dataset}}
    )


def test_prune_task_with_taylor_and_a_mac_target(checkpoint, tmp_path):
    pruner = {"importance": "taylor", "target": "macs", "percent": 0.4, "batches": 2}
    m = prune_task.run({"ckpt": str(checkpoint), "pruner": pruner, "device": "cpu"}, tmp_path)
    assert (m["importance"], m["scope"], m["target"]) == ("taylor", "global", "macs")
    graph = channel_graph(model_from_checkpoint(load_checkpoint(checkpoint)), SHAPE)
    assert abs(m["macs"] - 0.6 * m["macs_before"]) <= max(one_channel_costs(graph))
    assert json.loads((tmp_path / "metrics.json").read_text())["macs_ratio"] == m["macs_ratio"]


def test_prune_cli_with_a_criterion(entry, checkpoint, tmp_path):
    args = (f"ckpt={checkpoint}", "pruner.importance=fpgm", "pruner.scope=layer")
    code, out, err = entry("prune", *args, "pruner.percent=0.25", run_dir=tmp_path / "a")
    assert code == 0, err
    assert "pruner normal: importance fpgm, scope layer, 0.25 of the channels removed" in out
    code, _, err = entry("prune", *args, "pruner.steps=2", run_dir=tmp_path / "b")
    assert code == 2 and "error: pruner.steps=2 prunes and finetunes in turns" in err
    code, _, err = entry("prune", f"ckpt={checkpoint}", "pruner.target=flops", run_dir=tmp_path)
    assert code == 2 and "error: pruner.target='flops' is invalid" in err


# ---------------------------------------------------------------- iterative pruning
def test_agp_schedule_is_cubic():
    assert agp_schedule(0.5, 1) == [0.5]
    s = agp_schedule(0.8, 4)
    assert s[-1] == pytest.approx(0.8) and s[0] == pytest.approx(0.8 * (1 - 0.75**3))
    steps = [b - a for a, b in zip([0.0, *s[:-1]], s, strict=True)]
    assert steps == sorted(steps, reverse=True)  # big steps first


def test_iterative_prune_stage_reaches_a_mac_target(tmp_path):
    prune = {"stage": "prune", "pruner": {"steps": 3, "target": "macs", "importance": "l1"}}
    summary = run_pipeline(staged("train", prune), tmp_path)
    stage = tmp_path / "01_prune"
    for k in (1, 2, 3):
        step = stage / f"{k:02d}_step{k}"
        for f in ("pruned.pt", "prune.json", "best.pt", "last.pt", "metrics.json", "step.json"):
            assert (step / f).exists(), step / f
    assert json.loads((stage / "stage.json").read_text())["checkpoint"] == "03_step3/best.pt"
    result = summary["stages"][1]
    assert [c["fraction"] for c in result["cycles"]] == agp_schedule(0.5, 3)
    # every step counts from the original model: each within one channel per layer of its goal
    original = model_from_checkpoint(load_checkpoint(tmp_path / "00_train" / "best.pt"))
    full, tolerance = (
        count_macs(original, SHAPE),
        max(one_channel_costs(channel_graph(original, SHAPE))),
    )
    assert result["macs_before"] == full
    for c in result["cycles"]:
        assert abs(c["macs"] - (1 - c["fraction"]) * full) <= tolerance
    assert abs(result["macs"] - 0.5 * full) <= tolerance
    final = model_from_checkpoint(load_checkpoint(stage / "03_step3" / "best.pt"))
    assert count_macs(final, SHAPE) == result["macs"]


def test_iterative_prune_resumes_after_a_finished_step_with_the_same_weights(tmp_path, monkeypatch):
    prune = {"stage": "prune", "pruner": {"steps": 2, "finetune_epochs": 2, "percent": 0.4}}
    cfg = staged("train", prune)
    full = run_pipeline(cfg, tmp_path / "full")["stages"][1]
    # the channel target, counted from the original model, within one channel per layer
    before, after = sum(full["channels_before"]), sum(full["channels"])
    assert abs(after - 0.6 * before) <= len(full["channels"])

    calls, real = {"n": 0}, engine.evaluate

    def interrupt_step2_epoch2(*args, **kwargs):
        # train: 1; step 1: the prune's 2 (before / after) and 2 finetune epochs; step 2: the
        # prune's 2, epoch 1, then epoch 2
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    broken = tmp_path / "broken"
    monkeypatch.setattr(engine, "evaluate", interrupt_step2_epoch2)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, broken)
    monkeypatch.undo()
    step1, step2 = broken / "01_prune" / "01_step1", broken / "01_prune" / "02_step2"
    assert (step1 / "step.json").exists() and not (step2 / "step.json").exists()
    assert load_checkpoint(step2 / "last.pt")["epoch"] == 1
    stamps = {f: (step1 / f).stat().st_mtime_ns for f in ("pruned.pt", "best.pt", "last.pt")}
    pruned2 = (step2 / "pruned.pt").stat().st_mtime_ns
    run_pipeline({**cfg, "resume": True}, broken)
    assert {f: (step1 / f).stat().st_mtime_ns for f in stamps} == stamps  # step 1 skipped
    assert (step2 / "pruned.pt").stat().st_mtime_ns == pruned2  # not pruned again
    last = load_checkpoint(step2 / "last.pt")
    assert last["epoch"] == 2 and len(last["history"]) == 2  # continued from its last.pt
    for f in ("last.pt", "best.pt"):
        a = load_checkpoint(tmp_path / "full" / "01_prune" / "02_step2" / f)["model"]
        b = load_checkpoint(step2 / f)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_one_step_prune_stage_is_unchanged(tmp_path):
    # a plain prune stage (steps: 1) prunes once and writes pruned.pt, as before
    summary = run_pipeline(staged("train", "prune"), tmp_path)
    assert json.loads((tmp_path / "01_prune" / "stage.json").read_text())["checkpoint"] == (
        "pruned.pt"
    )
    assert summary["stages"][1]["importance"] == "bn_scale"
    assert not list((tmp_path / "01_prune").glob("*_step*"))


def test_bn_scale_importance_averages_over_the_bns_and_scores_an_unscaled_channel_zero():
    from compress.prune.group import Group
    from compress.prune.importance import bn_scale_importance

    model = nn.ModuleDict({"a": nn.BatchNorm2d(3), "b": nn.BatchNorm2d(2)})
    with torch.no_grad():
        model["a"].weight.copy_(torch.tensor([1.0, -2.0, 4.0]))
        model["b"].weight.copy_(torch.tensor([3.0, 6.0]))
    # classes 0-2 scaled by a (channels 0-2), classes 0 and 1 also by b; class 3 by none
    group = Group(0, ["conv"], [10, 11, 12, 13], [torch.arange(4)])
    group.bns = [("a", torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))]
    group.bns.append(("b", torch.tensor([0, 1]), torch.tensor([0, 1])))
    scores = bn_scale_importance(model, group)
    assert scores.tolist() == [2.0, 4.0, 4.0, 0.0]


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 5), (4, 6, 3, 5)])
def test_taylor_products_are_summed_per_channel_for_any_rank(shape):
    """BN1d after a linear layer (N, C), over a sequence (N, C, L), BN2d (N, C, H, W)."""
    from compress.prune.importance import _per_channel

    t = torch.randn(*shape)
    expected = t.reshape(4, 6, -1).sum(2)
    assert torch.allclose(_per_channel(t), expected)


def test_the_mac_count_of_grouped_convs_is_count_macs():
    # nin_gc's grouped (not depthwise) convs: each output channel reads cin / groups inputs
    torch.manual_seed(0)
    model = randomize_bn_(create_model("nin_gc"))
    graph = channel_graph(model, SHAPE)
    assert any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in model.modules())
    keep = select_channels(graph, "gc", 0.4)
    removed = count_macs(model, SHAPE) - count_macs(thin(model, keep, SHAPE), SHAPE)
    assert removed > 0 and graph.macs_removed(keep) == removed
    macs_keep = select_channels(graph, "gc", 0.3, target="macs")
    left = count_macs(thin(model, macs_keep, SHAPE), SHAPE)
    assert left == count_macs(model, SHAPE) - graph.macs_removed(macs_keep)


def test_a_mac_target_takes_the_nearer_of_the_two_levels_around_it():
    # every level of the global threshold (0, 1, 2, ... channels removed) as a channel
    # target; the MAC target must land on the one whose MACs are nearest the goal, on either
    # side of it (several goals, so both sides occur)
    torch.manual_seed(0)
    model = randomize_bn_(create_model("vgg_small", channels=[8, 8, 16, 16, 16, 16]))
    graph = channel_graph(model, SHAPE)
    score = build_importance("l1", model, graph.groups)
    full, total = count_macs(model, SHAPE), sum(g.channels for g in graph.groups)
    levels = set()
    for j in range(total // 2):
        keep = select_channels(graph, percent=j / total, importance=score, min_channels=1)
        levels.add(full - graph.macs_removed(keep))
    sides = set()
    for percent in (0.1, 0.15, 0.2, 0.25, 0.3, 0.35):
        goal = (1 - percent) * full
        keep = select_channels(graph, percent=percent, target="macs", importance=score)
        got = full - graph.macs_removed(keep)
        assert abs(got - goal) == min(abs(m - goal) for m in levels | {got}), percent
        sides.add(got > goal)
    assert sides == {True, False}


def test_a_mac_target_between_two_coarse_levels_takes_the_nearer():
    # two channels per layer and scope=layer: the only levels are "keep all" and "keep one of
    # each pair", MACs apart by a factor of about 3. Goals anywhere between them must land on
    # the nearer one, also where the farther one is more than twice the goal
    torch.manual_seed(0)
    model = randomize_bn_(create_model("vgg_small", channels=[2] * 6))
    graph = channel_graph(model, SHAPE)
    full = count_macs(model, SHAPE)
    half = select_channels(graph, percent=0.5, scope="layer")
    assert all(len(k) == 1 for k in half)
    low = full - graph.macs_removed(half)
    assert 2 * low < full  # the step is coarse
    chosen = set()
    for i in range(1, 100):
        goal = (1 - i / 100) * full
        if goal < low:
            break
        keep = select_channels(graph, percent=i / 100, target="macs", scope="layer")
        got = full - graph.macs_removed(keep)
        assert got in (full, low) and abs(got - goal) <= abs(full + low - got - goal), i
        chosen.add(got)
    assert chosen == {full, low}


class _NoBN(nn.Module):
    """No BatchNorm anywhere, a bias on every layer, and a squeeze-excitation-like gate."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        x = F.adaptive_avg_pool2d(x * gate, 2)
        return self.head(x.flatten(1))


def test_magnitude_criteria_prune_a_model_without_batchnorm():
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from zoo import columns_zeroed

    torch.manual_seed(0)
    model = _NoBN().eval()
    with pytest.raises(PruneError, match="no BatchNorm scales them"):
        channel_graph(model, SHAPE)  # what bn_scale and taylor rank is not there
    graph = channel_graph(model, SHAPE, require_bn=False)
    assert {layer for g in graph.groups for layer in g.layers} >= {"c1", "c2", "fc1"}
    keep = select_channels(graph, percent=0.5, importance=l1_importance, scope="layer")
    small = thin(model, keep, SHAPE, require_bn=False).eval()
    assert (small.c1.out_channels, small.c2.out_channels, small.fc1.out_channels) == (8, 8, 4)
    assert small.head.in_features == 8 * 4  # the flatten follows the kept channels
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():  # deleting channels == zeroing what reads them (biases and all)
        assert torch.allclose(small(x), columns_zeroed(model, graph, keep)(x), atol=1e-5)
    assert prune_task.needs_bn("bn_scale") and prune_task.needs_bn("taylor")
    assert not any(prune_task.needs_bn(c) for c in ("l1", "l2", "fpgm"))


class _TinyConvNeXt(nn.Module):
    """torchvision's ConvNeXt blocks (depthwise 7x7 -> permute -> LayerNorm -> linear -> GELU
    -> linear -> permute -> layer scale, plus the input) behind a stem with LayerNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.convnext import CNBlock, LayerNorm2d

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 2, 2), LayerNorm2d(16))
        self.blocks = nn.Sequential(CNBlock(16, 1.0, 0.0), CNBlock(16, 1.0, 0.0))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_convnext_blocks_prune_their_hidden_channels_and_freeze_the_normalized_stream():
    import sys

    from compress.metrics import count_macs
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from zoo import columns_zeroed, randomize_norms_

    torch.manual_seed(0)
    model = randomize_norms_(_TinyConvNeXt()).eval()  # 1e-6 layer scales would hide a fault
    graph = channel_graph(model, SHAPE, require_bn=False)
    prunable = {layer for g in graph.groups for layer in g.layers}
    assert prunable == {"blocks.0.block.3", "blocks.1.block.3"}  # the 64 hidden of each MLP
    frozen, total, why = graph.frozen_channels()
    # the 16-channel stream (one residual group; depthwise convs pass it on) is read by
    # LayerNorms, and each block's second linear is scaled per channel before the add; the
    # head's outputs are the logits. Either cause alone freezes the stream (the count names
    # one cause per residual group)
    norm = "normalized together (LayerNorm over the channels)"
    scale = "scaled by a per-channel tensor (a layer scale) the graph does not resize"
    assert why.get(norm, 0) + why.get(scale, 0) == 16 * 3  # the stem conv's, the 2 linears'
    assert why["the model's output (its width is the class count)"] == 10 and len(why) <= 3
    keep = select_channels(graph, percent=0.5, importance=l1_importance, scope="layer")
    removed = graph.macs_removed(keep)
    small = thin(model, keep, SHAPE, require_bn=False).eval()
    assert [small.blocks[i].block[3].out_features for i in (0, 1)] == [32, 32]
    assert [small.blocks[i].block[5].in_features for i in (0, 1)] == [32, 32]
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(small(x), columns_zeroed(model, graph, keep)(x), atol=1e-5)
        assert not torch.allclose(small(x), model(x), atol=1e-3)  # the blocks matter here
    # a linear on an (N, H, W, C) tensor runs once per position: the MACs follow
    assert removed == count_macs(model, SHAPE) - count_macs(small, SHAPE) > 0


class _LastThenPool(nn.Module):
    """A channels-last tensor into an op over the spatial dims (here: the wrong ones)."""

    def __init__(self, odd: bool) -> None:
        super().__init__()
        self.odd = odd
        self.c1, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(SHAPE[1] - 2 if odd else 8, 10)

    def forward(self, x):
        y = self.fc2(torch.relu(self.fc1(self.c1(x).permute(0, 2, 3, 1))))
        if self.odd:  # channels last, pooled over (W, C): not a channel-wise op any more
            return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))
        return self.head(y.permute(0, 3, 1, 2).mean((2, 3)))


def test_an_op_over_the_spatial_dims_of_a_channels_last_tensor_freezes_its_channels():
    torch.manual_seed(0)
    good = channel_graph(_LastThenPool(odd=False).eval(), SHAPE, require_bn=False)
    assert {layer for g in good.groups for layer in g.layers} == {"c1", "fc1", "fc2"}
    odd = channel_graph(_LastThenPool(odd=True).eval(), SHAPE, require_bn=False)
    assert {layer for g in odd.groups for layer in g.layers} == {"c1", "fc1"}
    _, _, why = odd.frozen_channels()
    assert why["read by an op the channel graph does not follow (adaptive_avg_pool2d)"] == 8


class _LayerScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.c2(self.scale * torch.relu(self.c1(x))).mean((2, 3)))


def test_a_per_channel_layer_scale_freezes_the_channels_it_scales():
    """A (C, 1, 1) parameter times an (N, C, H, W) tensor is one value per channel, not a
    scalar: the graph cannot resize it, so those channels stay (before: a thinned model whose
    forward failed on the scale's shape)."""
    torch.manual_seed(0)
    model = _LayerScaled().eval()
    graph = channel_graph(model, SHAPE, require_bn=False)
    _, _, why = graph.frozen_channels()
    assert why["scaled by a per-channel tensor (a layer scale) the graph does not resize"] == 8
    assert {layer for g in graph.groups for layer in g.layers} == {"c2"}
    keep = select_channels(graph, percent=0.5, importance=l1_importance, scope="layer")
    small = thin(model, keep, SHAPE, require_bn=False).eval()
    assert (small.c1.out_channels, small.c2.out_channels) == (8, 4)
    with torch.no_grad():
        assert small(torch.randn(2, *SHAPE)).shape == (2, 10)


class _NormalizedStream(nn.Module):
    """conv -> channels last -> LayerNorm -> MLP -> back -> + the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.norm = nn.Conv2d(3, 8, 3), nn.LayerNorm(8)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 10)

    def forward(self, x):
        y = self.c1(x)
        z = self.fc2(F.gelu(self.fc1(self.norm(y.permute(0, 2, 3, 1)))))
        return self.head((y + z.permute(0, 3, 1, 2)).mean((2, 3)))


def test_a_layernorm_over_the_channels_freezes_the_stream_it_normalizes():
    torch.manual_seed(0)
    graph = channel_graph(_NormalizedStream().eval(), SHAPE, require_bn=False)
    _, _, why = graph.frozen_channels()
    assert why["normalized together (LayerNorm over the channels)"] == 8 * 2  # c1's and fc2's
    assert {layer for g in graph.groups for layer in g.layers} == {"fc1"}


class _Tokens(nn.Module):
    """A ViT-like patch embedding: the conv's channels become the last dim of a token tensor
    through flatten + transpose, which the graph does not follow; the linears after it never
    get channels of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).flatten(2).transpose(1, 2)
        return self.fc2(self.fc1(y).relu()).mean(1)


def test_layers_the_walk_never_reaches_are_counted_frozen_with_their_cause():
    """Every conv / linear output channel is in the count, the unreachable ones too (Swin and
    ViT today: all but their patch embedding and head were missing from the total)."""
    from compress.prune.graph import ChannelGraph
    from compress.prune.pruner import example_input

    model = _Tokens()
    graph = ChannelGraph(model, example_input(model, SHAPE), (), False)
    frozen, total, why = graph.frozen_channels()
    assert (frozen, total) == (8 + 16 + 10, 8 + 16 + 10)
    unreached = "a layer whose input comes through an op the channel graph does not follow"
    assert why[unreached] == 16 + 10
    with pytest.raises(PruneError, match=f"all 34 conv / linear output channels.*26 {unreached}"):
        channel_graph(model, SHAPE, require_bn=False)
