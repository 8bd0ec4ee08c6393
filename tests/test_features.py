"""Feature maps of every stage (``features_only``) and our ResNets in torchvision's Faster R-CNN (section 4.3).

No download: pretrained weights are torchvision's randomly initialised nets put into a temporary torch.hub cache.
The detectors run on two 128x128 images with few proposals and regions, so a training step takes seconds on a CPU.
"""

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.misc import FrozenBatchNorm2d

from deepres.models import create_model
from deepres.models.detection import (
    faster_rcnn_c4,
    faster_rcnn_fpn,
    faster_rcnn_vgg,
    freeze_batch_norm,
    freeze_stages,
    resnet_fpn_backbone,
)

from .test_pretrained import _publish, hub  # noqa: F401 (hub: the torch.hub cache fixture)

RESNET50 = {"channels": [64, 256, 512, 1024, 2048], "reductions": [2, 4, 8, 16, 32]}
RESNET20 = {"channels": [16, 16, 32, 64], "reductions": [1, 1, 2, 4]}

# Small detectors: 128-pixel images, few anchors sampled, few proposals and regions per image.
SMALL = dict(min_size=128, max_size=128, rpn_batch_size_per_image=64, rpn_pre_nms_top_n_train=200,
             rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=10,
             box_batch_size_per_image=8)


# ---------------------------------------------------------------------------------------------------------------
# features_only


@pytest.mark.parametrize("name, out_indices, expected, size", [
    ("resnet50", None, RESNET50, 64),
    ("resnet50", (1, 2, 3, 4), {k: v[1:] for k, v in RESNET50.items()}, 64),
    ("resnet50", (-1,), {"channels": [2048], "reductions": [32]}, 64),
    ("resnet50", (4, -4), {"channels": [2048, 256], "reductions": [32, 4]}, 64),  # in the order asked
    ("resnet20", None, RESNET20, 32),
    ("resnet20", (-2, -1), {"channels": [32, 64], "reductions": [2, 4]}, 32),
    ("resnet20", (0, 3), {"channels": [16, 64], "reductions": [1, 4]}, 32),
])
def test_feature_maps_have_the_described_channels_and_reductions(name, out_indices, expected, size):
    model = create_model(name, features_only=True, out_indices=out_indices).eval()
    info = model.feature_info
    assert info.channels() == expected["channels"] and info.reduction() == expected["reductions"]
    assert len(info) == len(expected["channels"]) and info.channels(0) == expected["channels"][0]
    dicts = info.get_dicts()
    assert [d["num_chs"] for d in dicts] == info.channels() and [d["reduction"] for d in dicts] == info.reduction()
    children = dict(model.named_children())
    assert all(d["module"] in children for d in dicts) and info.get_dicts(keys=("module",), idx=0) == {
        "module": dicts[0]["module"]}
    with torch.no_grad():
        maps = model(torch.randn(2, 3, size, size))
    assert [tuple(m.shape) for m in maps] == [(2, c, size // r, size // r) for c, r in
                                              zip(expected["channels"], expected["reductions"])]
    # Stages below the deepest map asked for are left out.
    deepest = max(i % (5 if name == "resnet50" else 4) for i in (out_indices or (-1,)))
    assert {n for n in children if n.startswith("layer")} == {f"layer{i}" for i in range(1, deepest + 1)}


@pytest.mark.parametrize("name, size", [("resnet50", 64), ("resnet20", 32), ("plain20", 32)])
def test_features_are_the_full_models_activations(name, size):
    torch.manual_seed(0)
    full = create_model(name).eval()
    torch.manual_seed(0)
    features = create_model(name, features_only=True).eval()
    full_state, state = full.state_dict(), features.state_dict()
    assert set(full_state) - set(state) == {"fc.weight", "fc.bias"}  # the same weights, the classifier aside
    assert all(torch.equal(value, full_state[key]) for key, value in state.items())
    seen = {}
    for index, module in enumerate([full.relu, *full.stages()]):  # full.relu runs once, in the stem
        module.register_forward_hook(lambda m, inputs, output, index=index: seen.setdefault(index, output))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full(x)
        maps = features(x)
    # The same modules on the same input: the same numbers, with no rounding to allow for.
    assert len(maps) == len(seen) and all(torch.equal(maps[i], seen[i]) for i in range(len(maps)))


@pytest.mark.parametrize("name, channels", [
    ("resnext50_32x4d", [64, 256, 512, 1024, 2048]),
    ("se_resnet18", [64, 64, 128, 256, 512]),
    ("deform_resnet50", [64, 256, 512, 1024, 2048]),
    ("plain18", [64, 64, 128, 256, 512]),
])
def test_every_family_built_on_resnet_gives_features(name, channels):
    model = create_model(name, features_only=True, out_indices=(0, 1, -1)).eval()
    assert model.feature_info.channels() == [channels[0], channels[1], channels[-1]]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [64 // m.shape[-1] for m in maps] == model.feature_info.reduction() == [2, 4, 32]


def test_bad_indices_and_unsupported_models_are_errors(hub):
    with pytest.raises(ValueError, match=r"'resnet50' has 5 feature maps.*-5\.\.4.*got \(5,\)"):
        create_model("resnet50", features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match=r"'resnet20' has 4 feature maps.*-4\.\.3.*got \(1, -5\)"):
        create_model("resnet20", features_only=True, out_indices=(1, -5))
    with pytest.raises(ValueError, match=r"the same map twice"):
        create_model("resnet20", features_only=True, out_indices=(1, -3))
    with pytest.raises(ValueError, match="empty"):
        create_model("resnet20", features_only=True, out_indices=())
    with pytest.raises(TypeError, match="sequence of ints"):
        create_model("resnet20", features_only=True, out_indices=3)
    with pytest.raises(ValueError, match="needs features_only=True"):
        create_model("resnet20", out_indices=(1, 2))
    with pytest.raises(ValueError, match="drop_rate"):
        create_model("resnet20", features_only=True, drop_rate=0.2)
    with pytest.raises(ValueError, match="'speedrun_resnet9'.*does not support features_only.*resnet.*densenet"):
        create_model("speedrun_resnet9", features_only=True)
    with pytest.raises(ValueError, match="'vgg16'.*has 6 feature maps"):
        create_model("vgg16", features_only=True, out_indices=(6,))


# The other families: one map per resolution of forward_features, each the output of the last module at it (checked
# against the model's own modules run by hand), the deepest forward_features' output (EfficientNet's forward_stages:
# its last stage, without the head conv, as timm).
HOOKED = {
    "vgg16_bn": ([64, 128, 256, 512, 512, 512], [1, 2, 4, 8, 16, 32], lambda m, x: m.features[:6](x)),
    "alexnet": ([64, 192, 256, 256], [4, 8, 16, 32], lambda m, x: m.features[:2](x)),
    "densenet121": ([64, 256, 512, 1024, 1024], [2, 4, 8, 16, 32], lambda m, x: m.features[:3](x)),
    "efficientnet_b0": ([16, 24, 40, 112, 320], [2, 4, 8, 16, 32], lambda m, x: m.features[:2](x)),
    "googlenet": ([64, 192, 480, 832, 1024], [2, 4, 8, 16, 32], lambda m, x: m.conv1(x)),
}


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_the_other_families_give_one_map_per_resolution(name):
    channels, reductions, first = HOOKED[name]
    torch.manual_seed(0)
    model = create_model(name).eval()
    features = create_model(name, features_only=True).eval()
    assert features.feature_info.channels() == channels and features.feature_info.reduction() == reductions
    weights = model.state_dict()
    own = features.state_dict()
    assert set(own) < set(weights) and not any(k.startswith(("classifier", "fc.", "aux")) for k in own)
    if name.startswith("efficientnet"):  # the head conv's weights stay out (unused, they would trouble DDP)
        assert not any(k.startswith(f"features.{len(model.features) - 1}.") for k in own)
    features.load_state_dict({k: weights[k] for k in own})
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        maps = features(x)
        assert [m.shape[1] for m in maps] == channels
        if name != "alexnet":  # its 11x11 stride-4 stem: 55 of 224, the reduction 4 is nominal
            assert [96 // m.shape[-1] for m in maps] == reductions
        torch.testing.assert_close(maps[0], first(model, x), rtol=0, atol=0)
        trunk = model.forward_stages if name.startswith("efficientnet") else model.forward_features
        torch.testing.assert_close(maps[-1], trunk(x), rtol=0, atol=0)
    picked = create_model(name, features_only=True, out_indices=(-1, 1)).eval()
    picked.load_state_dict({k: weights[k] for k in picked.state_dict()})
    with torch.no_grad():
        deepest, second = picked(x)
    torch.testing.assert_close(deepest, maps[-1], rtol=0, atol=0)
    torch.testing.assert_close(second, maps[1], rtol=0, atol=0)


def test_reading_the_maps_leaves_the_model_as_it_was():
    from deepres.models import feature_info

    model = create_model("vgg11_bn").train()
    model.features[1].eval()  # a frozen BN in a training model
    before = {name: (m.training, m.weight.clone()) for name, m in model.named_modules() if hasattr(m, "weight")}
    assert feature_info(model).channels() == [64, 128, 256, 512, 512, 512]
    after = {name: (m.training, m.weight) for name, m in model.named_modules() if hasattr(m, "weight")}
    assert all(before[n][0] == after[n][0] and torch.equal(before[n][1], after[n][1]) for n in before)
    assert not model.features[1].training and model.training
    assert not any(m._forward_hooks for m in model.modules())  # the probe's hooks are gone


def test_pretrained_features_are_torchvisions_stage_outputs(hub):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50().eval()
    _publish(hub, "resnet50", theirs.state_dict())
    with pytest.warns(UserWarning, match="stride_on='3x3'"):
        ours = create_model("resnet50", pretrained=True, features_only=True, out_indices=(0, 2, 4)).eval()
    assert ours.pretrained_cfg["num_classes"] == 1000 and ours.model_name == "resnet50"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = theirs.relu(theirs.bn1(theirs.conv1(x)))
        layer2 = theirs.layer2(theirs.layer1(theirs.maxpool(stem)))
        layer4 = theirs.layer4(theirs.layer3(layer2))
        for mine, expected in zip(ours(x), (stem, layer2, layer4)):
            torch.testing.assert_close(mine, expected)


# ---------------------------------------------------------------------------------------------------------------
# detection


def _images_and_targets():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=generator) for _ in range(2)]
    boxes = torch.tensor([[10.0, 20.0, 70.0, 90.0], [50.0, 40.0, 120.0, 110.0]])
    targets = [{"boxes": boxes + 4 * i, "labels": torch.tensor([1, 2])} for i in range(2)]
    return images, targets


def _train_step(detector: nn.Module) -> dict:
    images, targets = _images_and_targets()
    torch.manual_seed(0)  # the samplers of anchors and regions draw at random
    losses = detector.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    return losses


def _detect(detector: nn.Module, num_classes: int) -> None:
    images, _ = _images_and_targets()
    with torch.no_grad():
        detections = detector.eval()(images)
    assert isinstance(detections, list) and len(detections) == 2
    for found in detections:
        n = len(found["boxes"])
        assert found["boxes"].shape == (n, 4) and found["scores"].shape == (n,) and found["labels"].shape == (n,)
        assert n <= detector.roi_heads.detections_per_img and all(0 < c < num_classes for c in found["labels"])


def _has_grad(parameter: torch.Tensor) -> bool:
    return parameter.grad is not None and parameter.grad.abs().sum().item() > 0


def test_faster_rcnn_with_fpn_on_resnet50_trains_and_detects():
    torch.manual_seed(0)
    detector = faster_rcnn_fpn("resnet50", num_classes=3, **SMALL)
    assert isinstance(detector.backbone, BackboneWithFPN) and detector.backbone.out_channels == 256
    _train_step(detector)
    body = detector.backbone.body
    # From scratch every stage trains (torchvision's convention), with ordinary BN.
    assert _has_grad(body.conv1.weight) and _has_grad(body.layer1[0].conv1.weight) and _has_grad(body.bn1.weight)
    assert _has_grad(detector.backbone.fpn.inner_blocks[0][0].weight)
    assert any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    _detect(detector, 3)


def test_faster_rcnn_c4_is_the_papers_split_of_resnet50():
    torch.manual_seed(0)
    detector = faster_rcnn_c4("resnet50", num_classes=3, **SMALL)
    backbone, head = detector.backbone, detector.roi_heads.box_head
    # conv1 .. conv4_x share one stride-16 map of 1024 channels; conv5_x runs on each 14x14 region.
    assert backbone.out_channels == 1024 and head.out_channels == 2048 and not hasattr(backbone.body, "layer4")
    assert detector.roi_heads.box_roi_pool.output_size == (14, 14)
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 128, 128))["0"].shape == (1, 1024, 8, 8)
        assert head.eval()(torch.randn(3, 1024, 14, 14)).shape == (3, 2048)
    # Together they are all of ResNet-50 but its classifier: 25,557,032 - 2,049,000 parameters.
    count = sum(p.numel() for p in [*backbone.parameters(), *head.parameters()])
    assert count == 25_557_032 - 2_049_000
    _train_step(detector)
    assert _has_grad(backbone.body.conv1.weight) and _has_grad(backbone.body.layer3[-1].conv3.weight)
    assert _has_grad(head.layer4[0].conv1.weight)
    _detect(detector, 3)


def test_pretrained_detectors_freeze_bn_and_the_early_stages(hub):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18()
    _publish(hub, "resnet18", theirs.state_dict())
    detector = faster_rcnn_c4("resnet18", num_classes=4, pretrained=True, **SMALL)
    body, head = detector.backbone.body, detector.roi_heads.box_head
    assert detector.backbone.out_channels == 256 and head.out_channels == 512
    assert torch.equal(body.layer3[1].conv2.weight, theirs.layer3[1].conv2.weight)
    assert torch.equal(head.layer4[0].bn1.running_var, theirs.layer4[0].bn1.running_var)
    # The paper fixes BN when fine-tuning; torchvision trains the top three stages of a pretrained net.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in detector.modules())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(head.layer4[0].bn2, FrozenBatchNorm2d)
    _train_step(detector)
    assert body.conv1.weight.grad is None and body.layer1[0].conv1.weight.grad is None
    assert _has_grad(body.layer2[0].conv1.weight) and _has_grad(head.layer4[1].conv2.weight)
    # Fewer trainable stages freeze the head (conv5_x) as well.
    detector = faster_rcnn_c4("resnet18", num_classes=4, pretrained=True, trainable_layers=0, frozen_bn=False)
    resnet = [*detector.backbone.parameters(), *detector.roi_heads.box_head.parameters()]
    assert not any(p.requires_grad for p in resnet)
    assert any(isinstance(m, nn.BatchNorm2d) for m in detector.modules())


def test_faster_rcnn_vgg16_is_the_papers_baseline_detector():
    """Tables 7 and 8 compare ResNet-101 against Faster R-CNN on VGG-16: conv1_1 .. conv5_3 shared at stride 16,
    each region pooled 7x7 into fc6 and fc7."""
    torch.manual_seed(0)
    detector = faster_rcnn_vgg("vgg16", num_classes=3, **SMALL)
    backbone, head = detector.backbone, detector.roi_heads.box_head
    assert backbone.out_channels == 512 and head.out_channels == 4096
    assert detector.roi_heads.box_roi_pool.output_size == (7, 7)
    assert sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) == 13
    assert not any(isinstance(m, nn.MaxPool2d) for m in backbone.body[-3:])  # pool5 dropped
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 128, 128))["0"].shape == (1, 512, 8, 8)
        assert head.eval()(torch.randn(3, 512, 7, 7)).shape == (3, 4096)
    # All of VGG-16 but its class layer fc8: 138,357,544 - 4,097,000 parameters
    assert sum(p.numel() for p in [*backbone.parameters(), *head.parameters()]) == 138_357_544 - 4_097_000
    _train_step(detector)
    assert _has_grad(backbone.body[0].weight) and _has_grad(head[1].weight)  # from scratch everything trains
    _detect(detector, 3)


def test_a_pretrained_vgg_detector_fine_tunes_conv3_1_and_up(hub):
    torch.manual_seed(0)
    theirs = torchvision.models.vgg11_bn()
    _publish(hub, "vgg11_bn", theirs.state_dict())
    detector = faster_rcnn_vgg("vgg11_bn", num_classes=4, **SMALL, pretrained=True)
    body, head = detector.backbone.body, detector.roi_heads.box_head
    assert torch.equal(body[-3].weight, theirs.features[-4].weight)  # conv5_2, the last conv
    assert torch.equal(head[1].weight, theirs.classifier[0].weight)
    assert torch.equal(head[4].bias, theirs.classifier[3].bias)  # fc7
    assert not any(isinstance(m, nn.BatchNorm2d) for m in detector.modules())  # fixed, as for the ResNets
    trains = [p.requires_grad for m in body if isinstance(m, nn.Conv2d) for p in m.parameters()]
    assert trains == [False] * 4 + [True] * 12  # conv1_1 and conv2_1 (weights, biases) frozen: Fast R-CNN's choice
    _train_step(detector)
    assert body[0].weight.grad is None and _has_grad(head[1].weight)
    frozen = faster_rcnn_vgg("vgg11", num_classes=4, trainable_layers=0)
    assert not any(p.requires_grad for p in [*frozen.backbone.parameters(), *frozen.roi_heads.box_head.parameters()])
    with pytest.raises(ValueError, match=r"0\.\.6 \(the fc head, then conv5_x"):
        faster_rcnn_vgg("vgg16", num_classes=2, trainable_layers=7)
    with pytest.raises(ValueError, match="'resnet50' is no VGG net"):
        faster_rcnn_vgg("resnet50", num_classes=2, pretrained=True)  # refused before any download


def test_frozen_bn_computes_what_bn_computes_in_eval_mode():
    torch.manual_seed(0)
    model = create_model("resnet20", features_only=True).double()
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16, dtype=torch.float64))  # running statistics other than 0 and 1
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        expected = model.eval()(x)
        frozen = freeze_batch_norm(model)
        assert frozen is model and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 19  # 1 + 9 blocks x 2
        # Two float64 formulas of one affine map per channel: they differ by rounding only.
        for mine, reference in zip(model.train()(x), expected):
            torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-10)


def test_trainable_layers_follow_torchvisions_range():
    model = create_model("resnet20", features_only=True)
    with pytest.raises(ValueError, match=r"0\.\.4 \(stages layer3, layer2, layer1, conv1"):
        freeze_stages(model, 5)
    freeze_stages(model, 2)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3"}
    with pytest.raises(ValueError, match=r"0\.\.5"):
        faster_rcnn_c4("resnet18", num_classes=2, trainable_layers=6)
    with pytest.raises(ValueError, match="'speedrun_resnet9'"):
        faster_rcnn_c4("speedrun_resnet9", num_classes=2)
    # A family with feature maps but no ResNet stages, refused before any download (no file in the cache, no network)
    with pytest.raises(ValueError, match="'vgg16' is no ResNet"):
        faster_rcnn_fpn("vgg16", num_classes=2, pretrained=True)


def test_fpn_backbone_on_a_cifar_resnet_and_chosen_layers():
    backbone = resnet_fpn_backbone("resnet20", returned_layers=(0, 2, 3), out_channels=32)
    with torch.no_grad():
        maps = backbone.eval()(torch.randn(1, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "0": (1, 32, 32, 32), "1": (1, 32, 16, 16), "2": (1, 32, 8, 8), "pool": (1, 32, 4, 4)}
    with pytest.raises(ValueError, match="shallow to deep"):
        resnet_fpn_backbone("resnet20", returned_layers=(3, 1))


def test_torchvisions_fasterrcnn_weights_load_and_compute_the_same_features():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = faster_rcnn_fpn("resnet50", num_classes=91, model_options={"stride_on": "3x3"})
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes everywhere
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = theirs.backbone.double().eval()(x)
        mine = ours.backbone.double().eval()(x)
    assert list(mine) == list(expected) == ["0", "1", "2", "3", "pool"]
    for key in expected:  # float64: only rounding separates the two, if anything
        torch.testing.assert_close(mine[key], expected[key], rtol=1e-9, atol=1e-9 * expected[key].abs().max())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
