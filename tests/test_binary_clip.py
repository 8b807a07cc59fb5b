"""BNN latent-weight clipping (quant.weight.clip, binary weights): with clip=true the latent
weights of every binary layer are clamped to [-1, 1] after each optimizer step
(compress.tasks.common.ClipLatentWeights); with clip=false (the default) they are left alone."""

from __future__ import annotations

import pytest
import torch

from compress.checkpoint import load_checkpoint
from compress.models import create_model
from compress.quant import quantize_
from compress.quant.quantizers import BinaryWeight
from compress.spec import model_from_checkpoint
from compress.tasks.common import ClipLatentWeights
from compress.tasks.train import run as run_training
from tests.test_engine import tiny_cfg


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two threads run these tiny models
    many times slower (as in tests/test_resume_best.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def binary_cfg(clip: bool | None) -> dict:
    weight = {"kind": "binary"} if clip is None else {"kind": "binary", "clip": clip}
    return {"name": "wba32", "weight": weight, "act": {"kind": "fp32"}}


def binary_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m for m in model.modules() if isinstance(getattr(m, "weight_quant", None), BinaryWeight)
    ]


def stepped(clip: bool | None) -> tuple[torch.nn.Module, list[torch.Tensor], ClipLatentWeights]:
    """A binary resnet20 after one SGD step (lr 1, no momentum) from latent weights in
    [-0.5, 0.5] along a gradient of -2 sign(w) on even-indexed weights, 0.25 on the others:
    the even ones step to |w| + 2 > 1, the odd ones stay inside. Returns the model, the
    unclipped updated weights and the clipping hook (called after the step, as the loop does)."""
    torch.manual_seed(0)
    model = quantize_(create_model("resnet20", channels=[4] * 9), binary_cfg(clip))
    layers = binary_layers(model)
    assert len(layers) == 18  # the blocks' convs: the stem conv and fc stay float (keep_first_last)
    hook = ClipLatentWeights(model)
    params = [m.weight for m in layers]
    opt = torch.optim.SGD(params, lr=1.0, momentum=0.0)
    with torch.no_grad():
        for p in params:
            p.uniform_(-0.5, 0.5)
            even = (torch.arange(p.numel()) % 2 == 0).view(p.shape)
            p.grad = torch.where(even, -2 * p.sign(), torch.full_like(p, 0.25))
        unclipped = [(p - p.grad).clone() for p in params]
    opt.step()
    hook.after_step(model)
    return model, unclipped, hook


def test_clip_on_clamps_latent_weights_into_minus_one_one_after_a_step():
    model, unclipped, hook = stepped(clip=True)
    params = [m.weight for m in binary_layers(model)]
    assert [id(p) for p in hook.params] == [id(p) for p in params]
    for p, u in zip(params, unclipped, strict=True):
        assert u.abs().max() > 2  # precondition: the step pushed weights outside [-1, 1]
        assert torch.equal(p.detach(), u.clamp(-1, 1))  # outside: to +-1; inside: untouched
        assert p.detach().abs().max() == 1.0


@pytest.mark.parametrize("clip", [False, None], ids=["clip=false", "default"])
def test_clip_off_leaves_latent_weights_outside_the_range(clip):
    model, unclipped, hook = stepped(clip=clip)
    assert hook.params == []
    for m, u in zip(binary_layers(model), unclipped, strict=True):
        assert m.weight_quant.clip is False
        assert torch.equal(m.weight.detach(), u) and u.abs().max() > 1


def latent_range(run_dir) -> float:
    """The largest |latent weight| of the binary layers in the run's last.pt."""
    model = model_from_checkpoint(load_checkpoint(run_dir / "last.pt"))
    layers = binary_layers(model)
    assert layers
    return max(float(m.weight.detach().abs().max()) for m in layers)


def test_the_clip_key_is_honoured_by_a_train_run(tmp_path):
    """Adam at lr 0.5 moves every latent weight by about 0.5 per step, so without the clip
    they leave [-1, 1] within the 4 steps of this run (they start within about +-0.6); with it
    no weight of a binary layer ends outside and some sit on the bound."""
    widths = {}
    for clip in (True, False):
        cfg = tiny_cfg(epochs=1, optimizer="adam", lr=0.5, weight_decay=0.0)
        cfg["dataset"]["image_size"] = 8  # resnet20's global pool takes any size: fast
        cfg["quant"] = binary_cfg(clip)
        run_training(cfg, tmp_path / str(clip))
        state = load_checkpoint(tmp_path / str(clip) / "last.pt")
        assert state["quant"]["weight"]["clip"] is clip  # the key reaches the checkpoint
        widths[clip] = latent_range(tmp_path / str(clip))
    assert widths[True] == 1.0, widths  # clamped, and reached: the clip did something
    assert widths[False] > 1.5, widths
