"""The architecture zoo against torchvision, the papers' numbers and each family's defining behaviour.

Counts and shapes are checked on the meta device (no storage, no arithmetic), so even VGG-19 and EfficientNet-B7 cost
milliseconds there; numeric parity runs real forwards at 64x64, the slowest nets marked ``slow``.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from deepres.models import (
    AuxOutputs,
    BasicBlock,
    Bottleneck,
    DeformConv2d,
    DenseBlock,
    MBConv,
    SEBasicBlock,
    SEBottleneck,
    SqueezeExcite,
    Transition,
    VGG,
    count_macs,
    count_parameters,
    create_model,
    list_models,
    model_entry,
)

# Every zoo model with a torchvision twin, and the keyword arguments that build the twin.
TORCHVISION_TWINS = {
    "alexnet": {},
    **{f"vgg{d}{bn}": {} for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    "googlenet": {"aux_logits": True, "init_weights": True},
    **{f"densenet{d}": {} for d in (121, 161, 169, 201)},
    **{f"efficientnet_b{i}": {} for i in range(8)},
    "resnext50_32x4d": {},
    "wide_resnet50_2": {},
}
# Numeric parity of these takes several seconds each on two cores (large FC layers, deep or wide nets).
SLOW_PARITY = {
    *(f"vgg{d}{bn}" for d in (13, 16, 19) for bn in ("", "_bn")),
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
}

# Published parameter counts (the papers' rounded figures are torchvision's exact ones).
PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b7": 66_347_960,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
}
# Multiply-adds at the native size, in billions: GoogLeNet "1.5 billion" (section 5), ResNeXt-50 4.2 (Table 1),
# SE-ResNet-50 3.87 (Table 2), EfficientNet-B0 0.39 and B7 37 (Table 2), VGG-16 15.5 and AlexNet 0.71 (torchvision).
PUBLISHED_GMACS = {
    "alexnet": 0.71,
    "vgg16": 15.5,
    "googlenet": 1.5,
    "resnext50_32x4d": 4.2,
    "se_resnet50": 3.87,
    "efficientnet_b0": 0.39,
    "efficientnet_b7": 37.0,
}


def meta_model(name, **options):
    with torch.device("meta"):
        return create_model(name, **options)


def shapes(state_dict):
    return {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}


@pytest.mark.parametrize("name", sorted(TORCHVISION_TWINS))
def test_state_dict_names_and_shapes_equal_torchvision(name):
    ours = meta_model(name)
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)(**TORCHVISION_TWINS[name])
    assert shapes(ours.state_dict()) == shapes(theirs.state_dict())


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PARITY else n for n in sorted(TORCHVISION_TWINS)],
)
def test_torchvision_parity_eval_logits(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(**TORCHVISION_TWINS[name])
    with torch.no_grad():
        theirs.train()(torch.randn(4, 3, 64, 64))  # BN statistics from a batch, so they are not the init's 0/1
    ours = create_model(name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs.eval()(x)
        out = ours.eval()(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_equal_published(name):
    assert count_parameters(meta_model(name)) == PUBLISHED_PARAMS[name]


def test_parameter_counts_of_the_papers_without_torchvision_twins():
    # GoogLeNet: 6.6M without the auxiliary heads (torchvision's count); the paper's 5x5 branch adds 0.38M.
    assert count_parameters(meta_model("googlenet", aux_logits=False)) == 6_624_904
    assert count_parameters(meta_model("googlenet", aux_logits=False, branch3_kernel=5)) == 6_624_904 + 380_928
    # Huang et al. Table 2: DenseNet-BC (L=100, k=12) 0.8M; DenseNet (L=40, k=12) 1.0M.
    assert count_parameters(meta_model("densenet_bc")) / 1e6 == pytest.approx(0.8, rel=0.05)
    plain_densenet = meta_model("densenet_bc", depth=40, bottleneck=False, compression=1.0)
    assert count_parameters(plain_densenet) / 1e6 == pytest.approx(1.0, rel=0.05)
    # Hu et al. Table 1: SE-ResNet-50 28.09M (ResNet-50 + 2.53M).
    assert count_parameters(meta_model("se_resnet50")) / 1e6 == pytest.approx(28.09, rel=0.01)


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_multiply_adds_match_published(name):
    model = meta_model(name)
    gmacs = count_macs(model, (3, *model_entry(name).input_size)) / 1e9
    assert gmacs == pytest.approx(PUBLISHED_GMACS[name], rel=0.03)


def test_every_zoo_family_is_registered_with_its_native_size():
    names = set(list_models())
    expected = {"alexnet", "googlenet", "densenet_bc", "deform_resnet50", "resnext50_32x4d", "wide_resnet50_2"}
    expected |= {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
    expected |= {f"densenet{d}" for d in (121, 161, 169, 201)} | {f"se_resnet{d}" for d in (18, 34, 50, 101, 152)}
    expected |= {f"efficientnet_b{i}" for i in range(8)}
    assert expected <= names
    sizes = [224, 240, 260, 300, 380, 456, 528, 600]  # EfficientNet Table 2 / released models
    assert [model_entry(f"efficientnet_b{i}").input_size for i in range(8)] == [(s, s) for s in sizes]
    assert model_entry("densenet_bc").input_size == (32, 32)


# ---------------------------------------------------------------------------------------------------------------
# The shared interface, one model per family, grayscale input


INTERFACE_CASES = [
    ("alexnet", {}, 64),
    ("vgg11_bn", {"small_input": True}, 32),
    ("googlenet", {}, 64),
    ("densenet_bc", {"depth": 40}, 32),
    ("densenet121", {"small_input": True}, 32),
    ("se_resnet18", {"small_input": True}, 32),
    ("efficientnet_b0", {}, 64),
    ("deform_resnet50", {}, 64),
    ("resnext50_32x4d", {"small_input": True}, 32),
]


@pytest.mark.parametrize("name,options,size", INTERFACE_CASES, ids=[c[0] for c in INTERFACE_CASES])
def test_shared_interface_and_reset_classifier(name, options, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1, **options).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.dim() == 4
        assert torch.equal(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


def test_small_input_options_give_the_cifar_stem():
    vgg = meta_model("vgg16", small_input=True, num_classes=10)
    assert count_parameters(vgg) == 14_714_688 + 2 * (512 * 512 + 512) + (512 * 10 + 10)  # convs + 512-wide head
    densenet = create_model("densenet121", small_input=True)
    assert densenet.features.conv0.kernel_size == (3, 3) and "pool0" not in dict(densenet.features.named_children())
    for name in ("se_resnet50", "resnext50_32x4d", "wide_resnet50_2"):
        model = create_model(name, small_input=True)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, nn.Identity)
    with torch.no_grad():
        assert densenet.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    # The paper's own ImageNet nets at CIFAR size: ResNet-18 with the 3x3 stem has the widely quoted 11,173,962
    # parameters for 10 classes.
    resnet18 = create_model("resnet18", small_input=True, num_classes=10)
    assert count_parameters(resnet18) == 11_173_962 and isinstance(resnet18.maxpool, nn.Identity)
    assert count_parameters(meta_model("deform_resnet50", small_input=True)) == count_parameters(
        meta_model("deform_resnet50")
    ) - 64 * 3 * (7 * 7 - 3 * 3)
    alexnet = create_model("alexnet", small_input=True, num_classes=10)
    assert alexnet.features[0].kernel_size == (5, 5) and alexnet.features[0].stride == (1, 1)
    googlenet = create_model("googlenet", small_input=True, num_classes=10)
    assert googlenet.conv1.conv.kernel_size == (3, 3) and isinstance(googlenet.maxpool1, nn.Identity)
    efficientnet = create_model("efficientnet_b0", small_input=True, num_classes=10)
    assert efficientnet.features[0][0].stride == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # Feature maps at the end: AlexNet 3x3 (its head's grid), GoogLeNet 4x4, EfficientNet 2x2 (32 / 16).
        assert alexnet.eval().forward_features(x).shape[-2:] == (3, 3)
        assert googlenet.eval().forward_features(x).shape[-2:] == (4, 4)
        assert efficientnet.eval().forward_features(x).shape[-2:] == (2, 2)
        for model in (alexnet, googlenet, efficientnet, resnet18):
            assert model(x).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------------------
# AlexNet and VGG


def test_alexnet_layers_and_local_response_normalisation():
    plain, lrn = create_model("alexnet"), create_model("alexnet", lrn=True)
    conv1 = plain.features[0]
    assert conv1.kernel_size == (11, 11) and conv1.stride == (4, 4)
    pools = [m for m in plain.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)  # overlapping
    assert sum(isinstance(m, nn.Dropout) for m in plain.classifier) == 2
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in plain.modules())
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in lrn.modules()) == 2
    assert shapes(lrn.state_dict()) == shapes(plain.state_dict())  # parameter-free, same names

    # Section 3.3: b = a / (k + alpha * sum of a^2 over n=5 neighbouring channels)^beta, k=2, alpha=1e-4, beta=0.75.
    norm = lrn.features[1][1]
    a = torch.rand(1, 8, 3, 3) * 10
    squares = F.pad(a.pow(2), (0, 0, 0, 0, 2, 2))
    window = sum(squares[:, i : i + 8] for i in range(5))
    torch.testing.assert_close(norm(a), a / (2.0 + 1e-4 * window) ** 0.75)


@pytest.mark.parametrize("depth,convs", [(11, 8), (13, 10), (16, 13), (19, 16)])
def test_vgg_uses_only_3x3_convs_and_2x2_pools(depth, convs):
    model = meta_model(f"vgg{depth}_bn")
    conv_layers = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(conv_layers) == convs and len(conv_layers) + 3 == depth  # + three fully connected layers
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) for c in conv_layers)
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == convs
    with pytest.raises(ValueError, match="11, 13, 16, 19"):
        VGG(12)


# ---------------------------------------------------------------------------------------------------------------
# GoogLeNet


def test_googlenet_auxiliary_outputs_only_in_training():
    torch.manual_seed(0)
    model = create_model("googlenet", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    assert isinstance(out, AuxOutputs) and len(out) == 3
    assert all(o.shape == (2, 10) for o in out)
    # A training loss as the paper's: main loss + 0.3 x each auxiliary loss; every parameter gets gradient.
    target = torch.tensor([1, 2])
    loss = F.cross_entropy(out.logits, target) + 0.3 * sum(F.cross_entropy(a, target) for a in (out.aux1, out.aux2))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    calls = []
    model.aux1.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        logits = model.eval()(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    assert not calls  # the auxiliary heads do not run at inference

    no_aux = create_model("googlenet", aux_logits=False).train()
    assert isinstance(no_aux(x), torch.Tensor) and no_aux.aux1 is None


def test_googlenet_inception_modules_follow_table1():
    model = meta_model("googlenet", branch3_kernel=5)
    assert [getattr(model, f"inception{n}").out_channels for n in ("3a", "3b", "4a", "4e", "5b")] == [
        256,
        480,
        512,
        832,
        1024,
    ]
    assert model.inception3a.branch3[1].conv.kernel_size == (5, 5)
    assert meta_model("googlenet").inception3a.branch3[1].conv.kernel_size == (3, 3)  # torchvision's


def test_googlenet_reset_classifier_resets_auxiliary_heads():
    model = create_model("googlenet")
    model.reset_classifier(7)
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert [o.shape for o in out] == [(2, 7)] * 3
    model.reset_classifier(0)
    assert not model.aux_logits
    assert model.train()(torch.randn(2, 3, 64, 64)).shape == (2, 1024)


def test_googlenet_transform_input_maps_imagenet_normalisation_to_minus_one_one():
    model = create_model("googlenet", transform_input=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = torch.rand(1, 3, 4, 4)
    normalised = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(model._transform_input(normalised), (pixels - 0.5) / 0.5)



@pytest.mark.parametrize("k", [1.0, 2.0, 200.0])
def test_googlenet_truncated_normal_init_has_the_truncated_moments(k):
    """The init's own sampler (stable across PyTorch releases) draws N(0, std) truncated at +-k std: its values stay in
    the bounds and its standard deviation is std * sqrt(1 - 2 k phi(k) / (2 Phi(k) - 1))."""
    from deepres.models.googlenet import _trunc_normal_

    std = 0.01
    torch.manual_seed(0)
    w = _trunc_normal_(torch.empty(400_000), std=std, a=-k * std, b=k * std)
    phi, cdf = math.exp(-k * k / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(k / math.sqrt(2)))
    expected = std * math.sqrt(1 - 2 * k * phi / (2 * cdf - 1))
    assert w.abs().max().item() <= k * std
    assert abs(w.std().item() - expected) < 0.005 * expected
    assert abs(w.mean().item()) < 0.005 * std


# ---------------------------------------------------------------------------------------------------------------
# DenseNet


def test_dense_block_concatenates_and_transition_compresses():
    torch.manual_seed(0)
    block = DenseBlock(num_layers=4, in_channels=24, growth_rate=12, bn_size=4, drop_rate=0.0).eval()
    x = torch.randn(2, 24, 8, 8)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (2, 24 + 4 * 12, 8, 8)
    assert torch.equal(out[:, :24], x)  # earlier features pass on unchanged
    # Layer l sees the block input and every earlier layer's output.
    assert [layer.norm1.num_features for layer in block.values()] == [24, 36, 48, 60]

    transition = Transition(72, 36)
    assert [type(m) for m in transition] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.AvgPool2d]
    assert transition(out).shape == (2, 36, 4, 4)


def test_densenet_bc_structure_and_depth_check():
    model = meta_model("densenet_bc")  # L=100, k=12: three blocks of 16 bottleneck layers
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert [len(b) for b in blocks] == [16, 16, 16]
    assert model.features.conv0.out_channels == 24  # 2k
    transitions = [m for m in model.modules() if isinstance(m, Transition)]
    assert [t.conv.out_channels * 2 for t in transitions] == [t.conv.in_channels for t in transitions]  # theta=0.5
    basic = meta_model("densenet_bc", depth=40, bottleneck=False)  # (40 - 4) / 3 single-conv layers a block
    assert [len(b) for b in basic.modules() if isinstance(b, DenseBlock)] == [12, 12, 12]
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("densenet_bc", depth=101)


# ---------------------------------------------------------------------------------------------------------------
# SE-ResNet


def test_squeeze_excite_rescales_channels():
    se = SqueezeExcite(32, 2)
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        se.fc2.weight.zero_()
        se.fc2.bias.zero_()
        torch.testing.assert_close(se(x), x * 0.5)  # sigmoid(0)
        se.fc2.bias.copy_(torch.linspace(-20, 20, 32))
        scale = torch.sigmoid(torch.linspace(-20, 20, 32)).view(1, 32, 1, 1)
        torch.testing.assert_close(se(x), x * scale)


@pytest.mark.parametrize("depth", [18, 50])
def test_every_se_resnet_block_has_se_with_reduction_16(depth):
    model = meta_model(f"se_resnet{depth}")
    blocks = [m for m in model.modules() if isinstance(m, (SEBasicBlock, SEBottleneck))]
    assert len(blocks) == (8 if depth == 18 else 16)
    for block in blocks:
        channels = block.last_bn.num_features
        assert block.se.fc1.in_channels == channels and block.se.fc1.out_channels == channels // 16


def test_se_resnet_loads_a_resnet_state_dict_except_se():
    resnet = create_model("resnet50")
    result = create_model("se_resnet50").load_state_dict(resnet.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".se." in k for k in result.missing_keys)


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet


def test_efficientnet_compound_scaling():
    b0, b7 = meta_model("efficientnet_b0"), meta_model("efficientnet_b7")
    # Table 1: stages 2-8 of B0 have 1, 2, 2, 3, 3, 4, 1 layers; B7 scales depth by 3.1 (rounded up).
    assert [len(stage) for stage in b0.features[1:8]] == [1, 2, 2, 3, 3, 4, 1]
    assert [len(stage) for stage in b7.features[1:8]] == [math.ceil(n * 3.1) for n in (1, 2, 2, 3, 3, 4, 1)]
    assert b0.features[0][0].out_channels == 32 and b0.num_features == 1280
    assert b7.features[0][0].out_channels == 64 and b7.num_features == 2560  # width x2.0
    activations = {type(m) for m in b0.modules() if isinstance(m, (nn.ReLU, nn.SiLU, nn.Sigmoid))}
    assert activations == {nn.SiLU, nn.Sigmoid}  # swish everywhere, sigmoid gates in SE


def test_efficientnet_stochastic_depth_rises_linearly_and_is_off_in_eval():
    model = create_model("efficientnet_b0")
    blocks = [m for m in model.modules() if isinstance(m, MBConv)]
    probs = [b.drop_prob for b in blocks]
    assert probs == [0.2 * i / len(blocks) for i in range(len(blocks))]
    torch.manual_seed(0)
    block = next(b for b in blocks if b.use_residual)
    block.drop_prob = 1.0
    x = torch.randn(2, block.block[0][0].in_channels, 8, 8)
    assert torch.equal(block.train()(x), x)  # the branch dropped: identity
    with torch.no_grad():
        assert not torch.equal(block.eval()(x), x)
    model.eval()
    with torch.no_grad():
        y = torch.randn(1, 3, 64, 64)
        assert torch.equal(model(y), model(y))


def test_efficientnet_batch_norm_follows_its_weights():
    assert meta_model("efficientnet_b0").features[0][1].eps == 1e-5
    b5 = meta_model("efficientnet_b5").features[0][1]
    assert (b5.eps, b5.momentum) == (1e-3, 0.01)


# ---------------------------------------------------------------------------------------------------------------
# Deformable ResNet-50


def test_deform_resnet50_with_zero_offsets_is_resnet50():
    torch.manual_seed(0)
    resnet = create_model("resnet50")
    with torch.no_grad():
        resnet.train()(torch.randn(4, 3, 64, 64))
    deform = create_model("deform_resnet50")
    result = deform.load_state_dict(resnet.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith((".offset.weight", ".offset.bias")) for k in result.missing_keys)
    deformable = [name for name, m in deform.named_modules() if isinstance(m, DeformConv2d)]
    assert len(deformable) == 4 + 6 + 3 and all(n.startswith(("layer2", "layer3", "layer4")) for n in deformable)
    assert all(n.endswith("conv2") for n in deformable)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deform.eval()(x), resnet.eval()(x), rtol=0, atol=1e-5)


def test_deformable_conv_samples_at_offsets_and_learns_them():
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    deform = DeformConv2d.from_conv(plain)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(deform(x), plain(x), rtol=0, atol=1e-6)
    # Offsets of exactly (+1 row, 0 columns) at every kernel point: the plain conv of the image shifted up by one
    # row (below the top output row, where the plain conv reads the zero padding and the deformable one row 0).
    with torch.no_grad():
        deform.offset.bias.copy_(torch.tensor([1.0, 0.0] * 9))  # (dy, dx) for each of the 3x3 points
        shifted = F.pad(x[:, :, 1:], (0, 0, 0, 1))
        torch.testing.assert_close(deform(x)[:, :, 1:], plain(shifted)[:, :, 1:], rtol=0, atol=1e-5)
    # Gradient reaches the offset predictor even from its zero start.
    fresh = DeformConv2d.from_conv(plain)
    fresh(x).square().sum().backward()
    assert fresh.offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stride,padding,dilation,groups,offset_groups",
                         [(1, 1, 1, 1, 1), (2, 2, 2, 2, 2), (1, 0, 1, 1, 3), (2, 1, 1, 1, 2)])
def test_the_cpu_deformable_conv_equals_torchvisions_operator(stride, padding, dilation, groups, offset_groups):
    """In float64, forward and every gradient (input, offsets, weight, bias) equal torchvision's deform_conv2d, with
    offsets of up to several pixels (samples beyond every border) and integer ones (the zero start)."""
    from deepres.models import DeformConvCPU

    torch.manual_seed(0)
    n, c, out, side, k = 2, 6, 4, 9, 3
    x = torch.randn(n, c, side, side, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out, c // groups, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out, dtype=torch.float64, requires_grad=True)
    size = (side + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    offset = torch.randn(n, 2 * offset_groups * k * k, size, size, dtype=torch.float64) * 3
    offset[:, :, 0] = offset[:, :, 0].round()  # whole-pixel offsets on one row: the floor's edge
    offset.requires_grad_()
    inputs = (x, offset, weight, bias)
    expected = torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding,
                                             dilation=dilation)
    ours = DeformConvCPU.apply(x, offset, weight, bias, (stride,) * 2, (padding,) * 2, (dilation,) * 2, groups,
                               offset_groups)
    assert ours.dtype == torch.float64 and ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(expected)
    for mine, theirs in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_deformable_conv_runs_in_low_precision_on_the_cpu(dtype):
    """torchvision's CPU kernel has no bf16 / fp16 and no CPU autocast rule: the conv computes in fp32 inside
    autocast (what ``train.amp=auto`` picks on a CPU with native bf16) and in a model cast to ``dtype``."""
    torch.manual_seed(0)
    deform = DeformConv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        deform.offset.weight.normal_(0, 0.1)  # fractional, position-dependent offsets: the bilinear path
    x = torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last)
    reference = deform(x)
    with torch.autocast("cpu", dtype=dtype):
        out = deform(x)
    assert out.dtype == torch.float32  # the input's
    # The offset conv runs in ``dtype`` under autocast: its rounding (2^-8 relative for bf16) moves the sampling points.
    scale = reference.abs().max()
    assert (out - reference).abs().max() <= 0.03 * scale
    deform.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        deform(x).square().mean().backward()
    assert deform.offset.weight.grad.abs().sum() > 0 and torch.isfinite(deform.weight.grad).all()
    cast = DeformConv2d.from_conv(deform).to(dtype)  # a model cast to the low precision
    with torch.no_grad():
        cast.offset.load_state_dict(deform.offset.state_dict())
        low = cast(x.to(dtype))
    assert low.dtype == dtype and (low.float() - reference).abs().max() <= 0.03 * scale


@pytest.mark.parametrize("name,options,size", INTERFACE_CASES + [("resnet56", {}, 32)],
                         ids=[c[0] for c in INTERFACE_CASES] + ["resnet56"])
def test_every_family_trains_under_cpu_bf16_autocast(name, options, size):
    """``train.amp=auto`` is bf16 autocast with channels_last on a CPU with native bf16 (the suite itself runs in fp32,
    ``DEEPRES_CPU_BF16=0``): every family takes a training step there, and its eval logits stay within bf16's
    rounding of fp32's (largest difference measured: 2.1% of the largest logit, ResNet-18's)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **options).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, size, size).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits.float(), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert (low - reference).abs().max() <= 0.1 * reference.abs().max()


def test_deformable_multiply_adds_count_offsets_once():
    resnet, deform = meta_model("resnet50"), meta_model("deform_resnet50")
    offsets = 0
    for stage, blocks in ((2, 4), (3, 6), (4, 3)):
        # stride_on="1x1" (the paper's): every 3x3 conv of a stage runs at the stage's resolution (28, 14, 7).
        side, channels = 56 // 2 ** (stage - 1), 64 * 2 ** (stage - 1)
        offsets += blocks * side * side * 18 * channels * 9  # 18 = 2 x 3 x 3 offsets, each from a 3x3 conv
    assert count_macs(deform, (3, 224, 224)) - count_macs(resnet, (3, 224, 224)) == offsets


# ---------------------------------------------------------------------------------------------------------------
# ResNeXt and wide ResNet


def test_resnext_and_wide_bottlenecks():
    resnext, wide = meta_model("resnext50_32x4d"), meta_model("wide_resnet50_2")
    for model, groups, width in ((resnext, 32, 128), (wide, 1, 128)):
        first = model.layer1[0]
        assert isinstance(first, Bottleneck)
        assert first.conv2.groups == groups and first.conv2.in_channels == width
        assert first.conv3.out_channels == 256  # the block's output width is ResNet-50's
        assert model.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3 (their papers, torchvision)
    with pytest.raises(ValueError, match="BasicBlock"):
        BasicBlock(64, 64, groups=32)


def test_the_shipped_models_table_is_current():
    """`deepres models` answers from a table shipped with the package; after an architecture change rewrite it with
    python -c "from deepres.models.complexity import write_models_table; write_models_table()"."""
    from deepres.models.complexity import describe_model, models_table

    table = models_table()
    assert sorted(table) == sorted(n for n in list_models() if model_entry(n).family != "test")
    for name, row in table.items():
        assert describe_model(name) == row, name
