"""torchvision detectors at CPU size (compress.detection.models) and the detection task object
(compress.detection.task): a step of training lowers the loss on a fixed batch, evaluation is
COCO mAP, and the core (backbone, neck, heads) is one traceable module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx as fx

from compress.detection.models import build_detector
from compress.detection.task import DetectionTask, DetectorCore
from compress.errors import ConfigError

SIZE = 96


@pytest.fixture(scope="module")
def det_data(cifar_root, tmp_path_factory):
    """A 16 / 8-canvas cifar10_det at 64 px."""
    from compress.detection.data import load_detection_data

    build = tmp_path_factory.mktemp("det")
    cfg = {"name": "cifar10_det", "root": str(cifar_root), "build_dir": str(build)}
    return load_detection_data(cfg | {"num_train": 16, "num_val": 8, "image_size": 64})


def _det_run_cfg(data, **overrides) -> dict:
    """train.run's config for an SSDlite on `det_data` (its build folder reused)."""
    root = data.train.root
    dataset = {"name": "cifar10_det", "root": str(root), "build_dir": str(root)}
    dataset |= {"num_train": 16, "num_val": 8, "image_size": 64}
    cfg = {
        "seed": 0,
        "device": "cpu",
        "resume": False,
        "init_from": None,
        "model": {"source": "torchvision_det", "name": "ssdlite320_mobilenet_v3_large"},
        "dataset": dataset,
        "quant": {"name": "fp32", "weight": {"kind": "fp32"}, "act": {"kind": "fp32"}},
        "schedule": {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "lr": 0.01},
    }
    cfg["schedule"]["progress"] = False
    return {**cfg, **overrides}


def _batch(n: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """Noise images, each with one bright square of a class-coloured channel and its box."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        x = torch.rand(3, SIZE, SIZE, generator=g) * 0.2
        x0, y0 = 10 + 20 * i, 16
        x[i % 3, y0 : y0 + 40, x0 : x0 + 40] = 1.0
        images.append(x)
        box = torch.tensor([[x0, y0, x0 + 40, y0 + 40]], dtype=torch.float32)
        targets.append({"boxes": box, "labels": torch.tensor([1 + i % 3])})
    return images, targets


@pytest.fixture(scope="module")
def ssdlite():
    torch.manual_seed(0)
    return build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=SIZE)


def test_a_detector_reads_images_at_the_configured_size(ssdlite):
    assert ssdlite.transform.fixed_size == (SIZE, SIZE)
    assert ssdlite.detections_per_img == 100  # what COCO mAP counts (torchvision's SSD: 300)
    ssdlite.eval()
    with torch.no_grad():
        out = ssdlite([torch.rand(3, 64, 80), torch.rand(3, SIZE, SIZE)])
    assert [set(o) for o in out] == [{"boxes", "scores", "labels"}] * 2
    # boxes come back in each input image's own pixels
    assert out[0]["boxes"][:, 2].max() <= 80 + 1e-3 and out[0]["boxes"][:, 3].max() <= 64 + 1e-3


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("resnet18", SIZE, "model.name=resnet18 is not a torchvision detector: expected one of"),
        ("ssdlite320_mobilenet_v3_large", 16, "model.image_size=16 is invalid"),
    ],
)
def test_bad_detector_settings_are_one_line(name, size, message):
    with pytest.raises(ConfigError, match=message):
        build_detector(name, num_classes=4, image_size=size)


def test_the_task_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)  # a fresh detector: the shared one may have been trained already
    ssdlite = build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=SIZE)
    task = DetectionTask()
    batch = _batch()
    model = ssdlite.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(8):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_evaluation_is_coco_map_in_percent(ssdlite):
    ssdlite.train()
    metrics = DetectionTask().evaluate(ssdlite, [_batch(2, seed=1)])
    assert {"map", "map50"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("map", "map50"))
    assert ssdlite.training  # left as it was found


@pytest.mark.parametrize(
    ("name", "outputs"),
    [
        ("ssdlite320_mobilenet_v3_large", {"bbox_regression", "cls_logits"}),
        ("fasterrcnn_mobilenet_v3_large_fpn", None),  # the RPN head: (objectness, deltas)
    ],
)
def test_the_core_is_one_traceable_module_sharing_the_detectors_layers(name, outputs):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=4, image_size=SIZE).eval()
    core = DetectionTask().core(model)
    assert isinstance(core, DetectorCore) and core.backbone is model.backbone
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        out = core(x)
        traced = fx.symbolic_trace(core)
        again = traced(x)
    if outputs is not None:
        assert set(out) == outputs and all(torch.equal(out[k], again[k]) for k in outputs)
    else:
        objectness, deltas = out
        assert len(objectness) == len(deltas) == len(model.backbone(x))
        assert all(torch.equal(a, b) for a, b in zip(objectness, again[0], strict=True))


def test_cifar10_det_builds_once_and_reads_as_coco(cifar_root, tmp_path):
    from compress.detection.data import load_detection_data

    cfg = {"name": "cifar10_det", "root": str(cifar_root), "build_dir": str(tmp_path / "det")}
    cfg |= {"num_train": 8, "num_val": 4, "image_size": 64}
    data = load_detection_data(cfg)
    assert (len(data.train), len(data.test)) == (8, 4)
    assert data.num_classes == 11 and data.classes[0] == "airplane"
    stamp = (tmp_path / "det" / "cifar10_det.json").stat().st_mtime_ns
    assert load_detection_data(cfg).num_classes == 11  # the cached build, not a new one
    assert (tmp_path / "det" / "cifar10_det.json").stat().st_mtime_ns == stamp
    train, test = data.loaders(4, 4)
    images, targets = next(iter(test))
    assert [tuple(x.shape) for x in images] == [(3, 64, 64)] * 4
    assert all(t["boxes"].shape[1] == 4 and len(t["boxes"]) == len(t["labels"]) for t in targets)
    assert all(((t["labels"] >= 1) & (t["labels"] <= 10)).all() for t in targets)
    assert (len(train), len(test)) == (2, 1)


def _ids_and_boxes(loader) -> list[tuple[list[int], list[torch.Tensor]]]:
    return [([t["image_id"] for t in ts], [t["boxes"].clone() for t in ts]) for _, ts in loader]


def _same(a: list, b: list) -> bool:
    """The same images in the same batches, with the same (augmented) boxes."""
    ids = [i for i, _ in a] == [i for i, _ in b]
    boxes = [x for _, xs in a for x in xs], [y for _, ys in b for y in ys]
    return ids and all(torch.equal(x, y) for x, y in zip(*boxes, strict=True))


def test_detection_batches_depend_only_on_seed_and_epoch_and_resume_inside_one(det_data):
    """The engine's loader contract: epoch k's order and each image's augmentation (boxes moved
    by the random crop and flip) are the same in every pass, another epoch differs, and
    set_epoch(k, start=1) yields exactly the batches after the first."""
    train, _ = det_data.loaders(4, 4, seed=3)
    train.set_epoch(1)
    first = _ids_and_boxes(train)
    assert _same(first, _ids_and_boxes(train))
    train.set_epoch(2)
    assert [ids for ids, _ in _ids_and_boxes(train)] != [ids for ids, _ in first]
    train.set_epoch(1, start=1)
    assert _same(_ids_and_boxes(train), first[1:])


@pytest.mark.parametrize(
    ("model", "dataset", "message"),
    [
        (
            {"name": "resnet20"},
            "cifar10_det",
            "model=resnet20 is a classifier and dataset=cifar10_det",
        ),
        (
            {"source": "torchvision_det", "name": "ssdlite320_mobilenet_v3_large"},
            "cifar10",
            "model.name=ssdlite320_mobilenet_v3_large is a detector and dataset=cifar10 a "
            "classification data set",
        ),
    ],
)
def test_a_model_of_the_other_task_is_one_line(model, dataset, message):
    from compress.detection.data import check_model_fits_data

    with pytest.raises(ConfigError, match=message):
        check_model_fits_data(model, dataset)
    check_model_fits_data(model, "coco" if model.get("source") else "cifar10")  # the fit: quiet


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "cifar10"}, "dataset=cifar10 is not a detection data set"),
        ({"name": "coco", "image_size": 8}, "dataset.image_size=8 is invalid"),
    ],
)
def test_bad_detection_data_settings_are_one_line(cfg, message):
    from compress.detection.data import load_detection_data

    with pytest.raises(ConfigError, match=message):
        load_detection_data(cfg)


@pytest.mark.slow  # about 8 s on 2 cores (make test-slow)
def test_the_core_keeps_the_detectors_mode_and_prunes_exactly():
    """The backbone and the heads' input channels thin together; the head outputs (anchor
    boxes and class scores per location) stay whole; the thinned core equals the original
    with the removed channels' input columns zeroed."""
    import sys

    from compress.prune import channel_graph, l1_importance, select_channels, thin
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from zoo import columns_zeroed, randomize_norms_

    torch.manual_seed(0)
    model = build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=SIZE)
    randomize_norms_(model)
    core = DetectionTask().core(model.eval())
    assert not core.training
    shape = (3, SIZE, SIZE)
    graph = channel_graph(core, shape, require_bn=False)
    assert not any(m.training for m in model.modules())  # tracing left the detector in eval
    _, _, why = graph.frozen_channels()
    assert set(why) == {"read by an op the channel graph does not follow (getattr)"}  # heads'
    keep = select_channels(graph, percent=0.3, importance=l1_importance, scope="layer")
    small = thin(core, keep, shape, require_bn=False).eval()
    params = [sum(p.numel() for p in m.parameters()) for m in (core, small)]
    assert params[1] < 0.7 * params[0]
    x = torch.randn(2, *shape)
    with torch.no_grad():
        got, want = small(x), columns_zeroed(core, graph, keep)(x)
    for k in ("bbox_regression", "cls_logits"):
        assert got[k].shape == want[k].shape
        assert (got[k] - want[k]).abs().max() <= 1e-4 * want[k].abs().max(), k


def test_a_detection_data_set_trains_a_detector_through_the_train_task(det_data, tmp_path):
    """train.run on cifar10_det: the task follows from the data set, mAP is the metric that
    best.pt follows and metrics.json reports, and a resumed run goes on from last.pt."""
    from compress.checkpoint import load_checkpoint
    from compress.tasks import train

    cfg = _det_run_cfg(det_data)
    cfg["schedule"]["epochs"] = 1  # then resumed to its 2
    metrics = train.run(cfg, tmp_path)
    assert metrics["model"] == "torchvision_det/ssdlite320_mobilenet_v3_large"
    assert {"map", "map50", "map75", "map_small", "best_map"} <= set(metrics)
    assert "test_acc" not in metrics and 0 <= metrics["map"] <= metrics["map50"] <= 100
    row = metrics["history"][0]
    assert row["train_acc"] is None and row["test_map"] == metrics["map"]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["test_map"] == metrics["best_map"] and best["arch"]["image_size"] == 64
    assert metrics["macs"] > 1e6 and metrics["params"] == sum(
        p.numel() for p in build_detector("ssdlite320_mobilenet_v3_large", 11, 64).parameters()
    )
    resumed = train.run(_det_run_cfg(det_data, resume=True), tmp_path)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == row
    assert resumed["best_map"] == max(h["test_map"] for h in resumed["history"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"distill": {"kind": "kd"}}, "distill=kd distils classifiers' logits"),
        ({"schedule": {"tta": True}}, "schedule.tta=true is for classifiers"),
    ],
    ids=["distill", "tta"],
)
def test_what_a_detector_does_not_train_with_yet_is_one_line(
    det_data, tmp_path, overrides, message
):
    from compress.tasks import train

    cfg = _det_run_cfg(det_data)
    if "schedule" in overrides:
        overrides = {"schedule": {**cfg["schedule"], **overrides["schedule"]}}
    with pytest.raises(ConfigError, match=message):
        train.run({**cfg, **overrides}, tmp_path)
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize(
    "quant",
    [
        {
            "name": "int8_qat",
            "weight": {"kind": "int8"},
            "act": {"kind": "int8", "sites": "inputs"},
        },
        pytest.param(
            {
                "name": "w4a4l",
                "weight": {"kind": "lsq", "bits": 4},
                "act": {"kind": "lsq", "bits": 4},
            },
            marks=pytest.mark.slow,
        ),
    ],
    ids=["int8_qat", "w4a4l"],
)
def test_a_detector_trains_quantized_and_its_checkpoint_rebuilds_it(det_data, tmp_path, quant):
    """QAT of the core: the first conv and every prediction conv of the heads (the layers whose
    outputs are the core's) stay float, the rest are quantized; with sites=inputs every one
    reads k-bit input. The checkpoint rebuilds the same quantized detector."""
    from compress.checkpoint import load_checkpoint
    from compress.quant import QConv2d
    from compress.spec import model_from_checkpoint
    from compress.tasks import train

    cfg = _det_run_cfg(det_data, quant=quant)
    cfg["schedule"]["epochs"] = 1
    metrics = train.run(cfg, tmp_path)
    assert (metrics["w_bits"], metrics["a_bits"]) == ((8, 8) if "int8" in quant["name"] else (4, 4))
    state = load_checkpoint(tmp_path / "last.pt")
    model = model_from_checkpoint(state).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    floats = sorted(n for n, m in layers.items() if not isinstance(m, QConv2d))
    heads = [
        f"head.{h}_head.module_list.{i}.1"
        for h in ("classification", "regression")
        for i in range(6)
    ]
    assert floats == sorted(["backbone.features.0.0.0", *heads])
    if "int8" in quant["name"]:
        assert metrics["kbit_input_layers"] == len(layers) - 13
        assert metrics["float_input_layers"] == {}
    plain = model_from_checkpoint(state, quantized=False).eval()  # the same weights, float
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = DetectionTask().core(model)(x), DetectionTask().core(plain)(x)
    assert all(a[k].shape == b[k].shape and not torch.equal(a[k], b[k]) for k in a)
    assert all((a[k] - b[k]).abs().max() < 0.5 * b[k].abs().max() for k in a)  # close, not equal


@pytest.fixture(scope="module")
def trained_det(det_data, tmp_path_factory):
    """A detector trained for one epoch on det_data: its run folder."""
    from compress.tasks import train

    run = tmp_path_factory.mktemp("det_run")
    cfg = _det_run_cfg(det_data)
    cfg["schedule"]["epochs"] = 1
    train.run(cfg, run)
    return run


def test_a_detector_checkpoint_prunes_and_its_pruned_file_rebuilds_it(
    det_data, trained_det, tmp_path
):
    """prune.py's task on a detector: the core's channels by L1 (the heads' prediction convs
    keep their outputs), mAP before and after, and pruned.pt rebuilds the thinned detector
    (its mAP evaluated again is the one reported)."""
    from compress.checkpoint import load_checkpoint
    from compress.spec import model_from_checkpoint
    from compress.tasks import prune

    cfg = {"ckpt": str(trained_det / "last.pt"), "device": "cpu", "seed": 0}
    cfg["pruner"] = {"importance": "l1", "percent": 0.3, "scope": "layer"}
    m = prune.run(cfg, tmp_path)
    assert {"map_before", "map", "best_map"} <= set(m) and "test_acc" not in m
    assert m["params"] < 0.8 * m["params_before"] and m["macs"] < m["macs_before"]
    state = load_checkpoint(tmp_path / "pruned.pt")
    assert state["widths"] and state["test_map"] == m["map"]
    small = model_from_checkpoint(state)
    assert sum(p.numel() for p in small.parameters()) == m["params"]
    _, test = det_data.loaders(4, 8)
    assert DetectionTask().evaluate(small, test)["map"] == pytest.approx(m["map"], abs=1e-9)
    with pytest.raises(ConfigError, match="pruner.importance=taylor scores channels by"):
        prune.run({**cfg, "pruner": {"importance": "taylor"}}, tmp_path / "t")


def test_a_detector_checkpoint_fuses_exactly_and_its_fused_file_rebuilds_it(
    det_data, trained_det, tmp_path
):
    """fuse.py's task on a detector: every BN of the core folds, the heads' raw outputs on the
    val images stay within float rounding, and fused.pt rebuilds the fused detector."""
    from compress.checkpoint import load_checkpoint
    from compress.fuse import count_bn
    from compress.spec import model_from_checkpoint
    from compress.tasks import fuse
    from compress.tasks.fuse import core_outputs

    cfg = {"ckpt": str(trained_det / "last.pt"), "device": "cpu", "seed": 0, "latency": False}
    m = fuse.run(cfg, tmp_path)
    assert m["bn_before"] == 70 and m["bn_after"] == 0 and m["images"] == 8
    assert m["max_rel_diff"] < 1e-5 and m["map"] == pytest.approx(m["map_before"], abs=1e-6)
    assert "top1_agreement" not in m and "max |output diff|" in fuse.table(m)
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "fused.pt"))
    original = model_from_checkpoint(load_checkpoint(trained_det / "last.pt"))
    assert count_bn(rebuilt) == 0
    _, test = det_data.loaders(4, 8)
    got, want = core_outputs(rebuilt, test)[0], core_outputs(original, test)[0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.slow  # about 12 s on 2 cores: the dynamo export of the core (make test-slow)
def test_a_detector_exports_its_core_and_decodes_in_python_to_the_same_boxes(
    det_data, trained_det, tmp_path
):
    """export.py's task on a detector: model.onnx holds the core; ONNX Runtime's raw outputs,
    decoded and NMS'd by the detector's own code, give PyTorch's detections (the same labels
    per image, boxes within a thousandth of a pixel) and its mAP."""
    from compress.tasks import export
    from compress.tasks.export import table

    cfg = {"ckpt": str(trained_det / "last.pt"), "format": "onnx", "latency": False}
    m = export.run(cfg, tmp_path)
    assert (tmp_path / "model.onnx").stat().st_size == m["onnx_bytes"] > 1e6
    assert m["images"] == 8 and m["images_same_detections"] == 8
    assert m["max_rel_diff"] < 1e-4 and m["max_box_diff_px"] < 1e-3
    assert (
        m["map_runtime"] == pytest.approx(m["map_torch"], abs=1e-6) and m["map"] == m["map_runtime"]
    )
    assert "decoding and NMS in Python" in table(m)
    ov = export.run({**cfg, "format": "openvino"}, tmp_path / "ov")  # the IR of the same graph
    assert ov["runtime"] == "openvino" and ov["images_same_detections"] == 8
    assert ov["max_box_diff_px"] < 1e-2 and ov["map_runtime"] == pytest.approx(
        m["map_torch"], abs=1e-6
    )
    assert "OpenVINO" in table(ov)
    with pytest.raises(ConfigError, match="format=ncnn: a detector's core exports as onnx or"):
        export.run({**cfg, "format": "ncnn"}, tmp_path / "ncnn")


def test_box_agreement_matches_detections_as_sets():
    from compress.detection.runtime import box_agreement

    a = {"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]]), "labels": torch.tensor([1, 1])}
    swapped = {"boxes": a["boxes"].flip(0) + 0.25, "labels": a["labels"]}
    other = {"boxes": a["boxes"], "labels": torch.tensor([1, 2])}
    assert box_agreement([a, a], [swapped, other]) == (1, 0.25)


def test_a_detector_the_runtime_path_cannot_decode_is_one_line():
    from compress.detection.runtime import check_exportable

    torch.manual_seed(0)
    two_stage = build_detector("fasterrcnn_mobilenet_v3_large_fpn", num_classes=4, image_size=64)
    with pytest.raises(ConfigError, match="decodes one-stage detectors only .* FasterRCNN needs"):
        check_exportable(two_stage, "faster r-cnn")


FPN = {"backbone": "mobilenet_v3_large", "fpn_channels": 64}


@pytest.mark.parametrize(
    ("backbone", "stages", "widths"),
    [
        ("mobilenet_v3_large", ["6", "12", "16"], [40, 112, 960]),
        ("resnet18", ["layer2", "layer3", "layer4"], [128, 256, 512]),
    ],
)
def test_an_fpn_detector_reads_a_chosen_backbones_stride_8_16_32_stages(backbone, stages, widths):
    torch.manual_seed(0)
    model = build_detector("fcos_resnet50_fpn", 4, SIZE, backbone=backbone, fpn_channels=64)
    body = model.backbone
    assert list(body.body.return_layers) == stages and body.out_channels == 64
    assert [m.in_channels for m in body.fpn.inner_blocks.modules() if hasattr(m, "in_channels")]
    with torch.no_grad():
        maps = body.eval()(torch.zeros(1, 3, 128, 128))
    # P3..P5 from the stages, P6 / P7 from P5: strides 8 .. 128, all 64 channels wide
    assert [tuple(f.shape[1:]) for f in maps.values()] == [(64, 16, 16), (64, 8, 8), (64, 4, 4),
                                                           (64, 2, 2), (64, 1, 1)]  # fmt: skip
    inner = [b[0].in_channels for b in body.fpn.inner_blocks]
    assert inner == widths


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("ssdlite320_mobilenet_v3_large", {"backbone": "resnet18"}, "are for the one-stage FPN"),
        ("fcos_resnet50_fpn", {"fpn_channels": 48}, "fpn_channels=48 is invalid: expected a mult"),
        ("retinanet_resnet50_fpn", {"backbone": "nope"}, "backbone=nope is not a torchvision"),
        ("fcos_resnet50_fpn", {"backbone": "vit_b_16"}, "no stride 8 / 16 / 32 stages among"),
    ],
)
def test_bad_fpn_detector_settings_are_one_line(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_detector(name, num_classes=4, image_size=SIZE, **kwargs)


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("fcos_resnet50_fpn", ("bbox_ctrness", "bbox_regression", "cls_logits")),
        ("retinanet_resnet50_fpn", ("bbox_regression", "cls_logits")),
    ],
)
def test_fpn_detectors_decode_their_cores_outputs_to_their_own_detections(name, keys):
    """RuntimeDetector splits the core's outputs per feature map (A anchors a place) as
    RetinaNet's and FCOS's forward do: the same detections from the core run outside."""
    from compress.detection.runtime import CoreOutputs, RuntimeDetector, output_keys

    torch.manual_seed(0)
    model = build_detector(name, 4, SIZE, **FPN).eval()
    model.score_thresh = 0.0  # an untrained detector's scores are all low: keep 100 an image
    assert output_keys(model, SIZE) == keys
    core = CoreOutputs(model, keys)
    outside = RuntimeDetector(model, lambda x: tuple(t.clone() for t in core(x)), keys)
    images = [torch.rand(3, SIZE, SIZE) for _ in range(2)] + [torch.rand(3, 64, 80)]
    with torch.no_grad():
        want, got = model(images), outside(images)
    assert [len(w["boxes"]) for w in want] == [100] * 3
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w["labels"], g["labels"]) and torch.equal(w["boxes"], g["boxes"])


@pytest.mark.slow  # about 25 s on 2 cores: a QAT epoch, the QDQ conversion, an export
def test_an_fcos_detector_trains_quantized_and_runs_as_an_integer_core_in_onnx_runtime(
    det_data, tmp_path
):
    """The FPN path end to end: FCOS on a MobileNet-v3 FPN, int8 QAT with every layer input
    quantized, exported; every quantized conv of the core (backbone, FPN, both towers) is an
    integer layer and ORT's raw outputs decode through FCOS's own post-processing. (How close
    the detections are is measured on a trained detector, bench/detection_table.py: after one
    epoch from scratch on 16 images BN statistics and scores are not yet worth comparing.)"""
    from compress.tasks import export, train

    model = {"source": "torchvision_det", "name": "fcos_resnet50_fpn", **FPN}
    quant = {"name": "int8_qat", "weight": {"kind": "int8"}}
    quant["act"] = {"kind": "int8", "sites": "inputs"}
    cfg = _det_run_cfg(det_data, model=model, quant=quant)
    cfg["schedule"]["epochs"] = 1
    metrics = train.run(cfg, tmp_path / "qat")
    assert "map" in metrics and metrics["float_input_layers"] == {}
    ckpt = str(tmp_path / "qat" / "last.pt")
    m = export.run({"ckpt": ckpt, "format": "onnx", "latency": False}, tmp_path / "x")
    # every quantized layer is integer in the QDQ model, the 8 shared tower convs too (40
    # calls); float: the first conv and the three prediction convs (float weights)
    heads = ["classification_head.cls_logits", "regression_head.bbox_reg"]
    heads += ["regression_head.bbox_ctrness"]
    floats = {"core.backbone.body.0.0", *(f"core.head.{h}" for h in heads)}
    assert m["int8"] and set(m["qdq_float_layers"]) == floats
    assert m["qdq_integer_layers"] == metrics["kbit_input_layers"] == 77
    assert m["kernels"]["QLinearConv"] >= 100 and m["images"] == 8
    assert 0 <= m["map_runtime"] <= 100 and "max_box_diff_px" in m


@pytest.mark.slow  # about 14 s on 2 cores: QAT, the QDQ conversion, two exports (make test-slow)
def test_a_quantized_detector_exports_an_integer_core_that_runs_in_onnx_runtime(
    det_data, trained_det, tmp_path
):
    """int8 QAT with inputs quantized at every layer: every quantized conv of the core runs as
    QLinearConv in ORT, the first conv and the 12 prediction convs stay float, and the decoded
    detections are the fake-quant detector's."""
    from compress.tasks import export, train

    cfg = _det_run_cfg(det_data, init_from=str(trained_det / "last.pt"))
    cfg["quant"] = {"name": "int8_qat", "weight": {"kind": "int8"}}
    cfg["quant"]["act"] = {"kind": "int8", "sites": "inputs"}
    cfg["schedule"]["epochs"] = 1
    train.run(cfg, tmp_path / "qat")
    ckpt = str(tmp_path / "qat" / "last.pt")
    m = export.run({"ckpt": ckpt, "format": "onnx", "latency": False}, tmp_path / "x")
    assert m["int8"] and (tmp_path / "x" / "model_int8.onnx").exists()
    assert m["kernels"]["QLinearConv"] == 85 and m["kernels"]["Conv"] == 13
    # a float sum's order moves an int8 code now and then (1.3e-7 of the largest output on 1
    # thread, 0.026 on 2: one requantization step); the detections stay the same
    assert m["images_same_detections"] == 8 and m["max_rel_diff"] < 0.05
    assert m["map_runtime"] == pytest.approx(m["map_torch"], abs=0.5)


@pytest.mark.slow  # about 20 s on 2 cores: an export, ORT's calibration, two sessions checked
def test_a_detector_checkpoint_calibrates_to_a_static_int8_core(det_data, trained_det, tmp_path):
    """calibrate.py's task on a detector: the core calibrated by ORT on untransformed training
    images, the int8 file a third of the fp32 one, both run with the detector's decoding; the
    fp32 file gives PyTorch's mAP exactly, the int8 one its own, reported."""
    from compress.tasks import calibrate

    cfg = {"ckpt": str(trained_det / "last.pt"), "latency": False}
    cfg["calib"] = {"method": "minmax", "batches": 2, "batch_size": 8}
    m = calibrate.run(cfg, tmp_path)
    assert m["calib_images"] == 16 and m["bn_folded"] == 70
    assert m["int8_bytes"] < m["onnx_bytes"] / 2.5 and m["quantize_linear"] > 50
    assert m["max_rel_diff"] < 1e-4 and m["map_fp32"] == pytest.approx(m["map_torch"], abs=1e-6)
    assert m["map"] == m["map_int8"] and 0 <= m["map_int8"] <= 100
    assert "ORT int8" in calibrate.table(m)


@pytest.mark.slow  # two training runs and a prune: about 12 s alone (make test-slow)
def test_network_slimming_of_a_detector_sparse_trains_then_prunes_by_bn_scales(det_data, tmp_path):
    """Slimming on a detector: L1 on the core's prunable BN scales during training (they
    shrink against a run without it), then prune.py by bn_scale thins the detector."""
    from compress.checkpoint import load_checkpoint
    from compress.prune.slimming import slimming_scales
    from compress.spec import model_from_checkpoint
    from compress.tasks import prune, train

    def gammas(run) -> float:
        model = model_from_checkpoint(load_checkpoint(run / "last.pt"))
        return float(sum(g.detach().abs().sum() for g in slimming_scales(model, (3, 64, 64))))

    cfg = _det_run_cfg(det_data)
    cfg["schedule"]["epochs"] = 1
    train.run(cfg, tmp_path / "plain")
    train.run({**cfg, "sparsity": {"enabled": True, "s": 0.01}}, tmp_path / "sparse")
    assert gammas(tmp_path / "sparse") < gammas(tmp_path / "plain") - 1.0
    ckpt = str(tmp_path / "sparse" / "last.pt")
    m = prune.run({"ckpt": ckpt, "pruner": {"percent": 0.3}}, tmp_path / "pruned")
    assert m["importance"] == "bn_scale" and m["params"] < m["params_before"]


def custom_ssdlite(num_classes: int = 11) -> torch.nn.Module:
    """A user's own builder (model=custom model.target=tests.test_detection.custom_ssdlite)."""
    return build_detector("ssdlite320_mobilenet_v3_large", num_classes, 64)


@pytest.mark.slow  # a training epoch: about 4 s (make test-slow)
def test_a_users_own_detector_builder_trains_on_detection_data(det_data, tmp_path):
    from compress.tasks import train

    model = {"source": "custom", "target": "tests.test_detection.custom_ssdlite"}
    cfg = _det_run_cfg(det_data, model=model)
    cfg["schedule"]["epochs"] = 1
    m = train.run(cfg, tmp_path)
    assert m["model"] == "custom/tests.test_detection.custom_ssdlite" and "map" in m


def test_a_custom_model_that_is_no_detector_is_one_line_on_detection_data(det_data, tmp_path):
    from compress.tasks import train

    model = {"source": "custom", "target": "compress.models.resnet.resnet20"}
    with pytest.raises(ConfigError, match="built a .*, and dataset=cifar10_det trains detectors"):
        train.run(_det_run_cfg(det_data, model=model), tmp_path)


def test_detection_loaders_shard_like_tensor_loaders(det_data):
    """torchrun: the two ranks' training batches are the halves (positions 0, 2, ... and 1, 3,
    ... of each 2 x 4-image step) of the one-process run's 8-image steps, with the same crops
    and flips; evaluation splits the val images between the ranks, none read twice."""
    one, one_test = det_data.loaders(8, 8, seed=3)
    ranks = [det_data.loaders(4, 4, seed=3, shard=(r, 2)) for r in range(2)]
    for loader in (one, *(t for t, _ in ranks)):
        loader.set_epoch(1)
    assert len(ranks[0][0]) == len(ranks[1][0]) == len(one) == 2
    for (images, targets), *halves in zip(one, *(t for t, _ in ranks), strict=True):
        for r, (im, tg) in enumerate(halves):
            assert [t["image_id"] for t in tg] == [t["image_id"] for t in targets[r::2]]
            assert all(torch.equal(a, b) for a, b in zip(im, images[r::2], strict=True))
    ids = [[t["image_id"] for _, tg in test for t in tg] for _, test in ranks]
    assert sorted(ids[0] + ids[1]) == sorted(t["image_id"] for _, tg in one_test for t in tg)
    assert not set(ids[0]) & set(ids[1])


class _Oracle(torch.nn.Module):
    """Detects exactly the ground truth of the images in `ids`, nothing in the others (what
    it is shown: `told`)."""

    def __init__(self, ids: set) -> None:
        super().__init__()
        self.ids, self.targets = ids, []

    def forward(self, images):
        none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
        return [
            {"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]}
            if t["image_id"] in self.ids
            else {**none, "labels": none["labels"].long()}
            for t in self.targets
        ]

    def told(self, loader):
        for images, targets in loader:
            self.targets = targets
            yield images, targets


def _det_worker(rank: int, world: int, port: int, run_dir: str, data_cfg: dict) -> None:
    from compress.detection.data import load_detection_data
    from compress.distributed import init_from_env
    from compress.engine import TrainConfig, fit
    from compress.models import create_model
    from tests.test_distributed import torchrun_env

    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    dist = init_from_env("cpu")
    try:
        torch.manual_seed(0)
        model = create_model(
            "ssdlite320_mobilenet_v3_large", source="torchvision_det", num_classes=11, image_size=64
        )
        data = load_detection_data(data_cfg)
        cfg = TrainConfig(epochs=1, batch_size=4, lr=0.01, progress=False)
        summary = fit(model, data, cfg, run_dir, torch.device("cpu"), dist=dist,
                      task=DetectionTask())  # fmt: skip
        # rank 0's images detected perfectly, rank 1's not at all: the mAP of both halves
        _, test = data.loaders(4, 4, shard=dist.shard)
        ids = {t["image_id"] for _, tg in test for t in tg} if rank == 0 else set()
        oracle = _Oracle(ids)
        summary["oracle"] = DetectionTask().evaluate(oracle, oracle.told(test), dist=dist)
        torch.save(summary, Path(run_dir).parent / f"summary{rank}.pt")
    finally:
        dist.shutdown()


@pytest.mark.slow  # two processes training SSDlite for an epoch: about 15 s
def test_a_detector_trains_under_torchrun_and_its_map_is_over_all_ranks(det_data, tmp_path):
    """2 gloo processes x 4 images: DDP trains the detector, each rank detects on half the
    val set, and the gathered mAP every rank reports is the one-process mAP of the saved
    model on the whole val set."""
    import socket

    from compress.checkpoint import load_checkpoint
    from compress.spec import model_from_checkpoint

    root = det_data.train.root
    data_cfg = {"name": "cifar10_det", "root": str(root), "build_dir": str(root)}
    data_cfg |= {"num_train": 16, "num_val": 8, "image_size": 64}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp" / "run"
    run.mkdir(parents=True)
    torch.multiprocessing.spawn(
        _det_worker, args=(2, port, str(run), data_cfg), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / "ddp" / f"summary{r}.pt") for r in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]  # gathered: every rank agrees
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt"]  # rank 0 writes
    state = load_checkpoint(run / "last.pt")
    assert state["world_size"] == 2
    _, test = det_data.loaders(4, 8)
    alone = DetectionTask().evaluate(model_from_checkpoint(state), test)
    assert ranks[0]["test_map"] == pytest.approx(alone["map"], abs=1e-9)
    assert ranks[0]["test_map50"] == pytest.approx(alone["map50"], abs=1e-9)
    # the gathered mAP is over both ranks' images: half detected perfectly, half not at all
    _, half = det_data.loaders(4, 4, shard=(0, 2))
    oracle = _Oracle({t["image_id"] for _, tg in half for t in tg})
    want = DetectionTask().evaluate(oracle, oracle.told(test))["map"]
    assert 20.0 < want < 80.0
    assert ranks[0]["oracle"]["map"] == ranks[1]["oracle"]["map"] == pytest.approx(want, abs=1e-9)


@pytest.mark.slow  # five stages on 16 canvases: about 40 s on 2 cores
def test_a_detector_runs_as_a_pipeline_train_prune_finetune_quantize_fuse(det_data, tmp_path):
    """schedule.stages on a detection data set: each stage reads the last one's checkpoint
    and reports mAP; the pruned detector stays thin through QAT and fusion."""
    from compress.pipeline import run_pipeline

    cfg = _det_run_cfg(det_data)
    cfg["schedule"]["epochs"] = 1
    cfg["pruner"] = {"importance": "l1", "percent": 0.3}
    quant = {"name": "int8_qat", "weight": {"kind": "int8"}}
    quant["act"] = {"kind": "int8", "sites": "inputs"}
    cfg["schedule"]["stages"] = [
        "train",
        "prune",
        {"stage": "finetune", "epochs": 1},
        {"stage": "quantize", "epochs": 1, "quant": quant},
        "fuse",
    ]
    m = run_pipeline(cfg, tmp_path)
    stages = {s["kind"]: s for s in m["stages"]}
    assert list(stages) == ["train", "prune", "finetune", "quantize", "fuse"]
    assert all("map" in s and "test_acc" not in s for s in stages.values())
    assert stages["prune"]["params"] < 0.8 * stages["train"]["params"]
    assert stages["quantize"]["params"] == stages["prune"]["params"]  # thin through QAT
    assert stages["quantize"]["quant"] == "int8_qat" and m["bn_after"] == 0
    assert m["map"] == pytest.approx(stages["quantize"]["map"], abs=1e-6)  # fusion keeps it
