"""The ResNet family against the paper's numbers, torchvision and its own definitions."""

import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from deepres.models import (
    BasicBlock,
    Bottleneck,
    PlainBlock,
    ShortcutA,
    cifar_resnet,
    count_macs,
    count_parameters,
    create_model,
    imagenet_resnet,
    list_models,
    load_torchvision_weights,
)

IMAGENET_DEPTHS = [18, 34, 50, 101, 152]

# Section 4.2: parameters of the CIFAR-10 nets (option A, so no projection parameters).
CIFAR_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
# Table 1: multiply-adds at 224x224 ("FLOPs" in the paper), in billions.
IMAGENET_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS_M))
def test_cifar_parameter_counts_match_the_paper(depth):
    params = count_parameters(create_model(f"resnet{depth}")) / 1e6
    assert params == pytest.approx(CIFAR_PARAMS_M[depth], rel=0.02)


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_imagenet_multiply_adds_match_table1(depth):
    model = create_model(f"resnet{depth}")
    gmacs = count_macs(model, (3, 224, 224)) / 1e9
    assert gmacs == pytest.approx(IMAGENET_GMACS[depth], rel=0.03)


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_option_b_parameter_counts_equal_torchvision(depth):
    ours = count_parameters(create_model(f"resnet{depth}"))
    theirs = count_parameters(getattr(torchvision.models, f"resnet{depth}")())
    assert ours == theirs
    if depth == 50:
        assert ours == 25_557_032


def _calibrated_pair(depth):
    """torchvision's net and ours holding the same weights, with BN statistics from one training batch."""
    torch.manual_seed(depth)
    theirs = getattr(torchvision.models, f"resnet{depth}")()
    with torch.no_grad():
        theirs.train()(torch.randn(4, 3, 64, 64))
    ours = create_model(f"resnet{depth}", stride_on="3x3", shortcut="B")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_torchvision_parity_eval_logits_and_train_gradients(depth):
    ours, theirs = _calibrated_pair(depth)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        diff = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
    assert diff < 1e-5

    weights = torch.randn(2, 1000)
    (ours.train()(x) * weights).sum().backward()
    (theirs.train()(x) * weights).sum().backward()
    reference = dict(theirs.named_parameters())
    worst = max((p.grad - reference[name].grad).abs().max().item() for name, p in ours.named_parameters())
    assert worst < 1e-5


def test_bottleneck_stride_placement():
    paper = imagenet_resnet(50)
    v15 = imagenet_resnet(50, stride_on="3x3")
    assert paper.layer2[0].conv1.stride == (2, 2) and paper.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    # The paper's placement does the 3x3 work at the lower resolution: cheaper (3.86 vs 4.09 GMACs).
    assert count_macs(paper, (3, 224, 224)) < count_macs(v15, (3, 224, 224))
    assert count_parameters(paper) == count_parameters(v15)


def test_option_a_has_no_shortcut_parameters():
    resnet, plain = cifar_resnet(56), cifar_resnet(56, plain=True)
    assert not any("downsample" in name for name, _ in resnet.named_parameters())
    assert count_parameters(resnet) == count_parameters(plain)
    assert sum(isinstance(m, ShortcutA) for m in resnet.modules()) == 2  # the starts of stages 2 and 3


def test_option_b_projects_only_where_dimensions_grow():
    model = imagenet_resnet(34)
    projected = [name for name, m in model.named_modules() if isinstance(m, (BasicBlock,)) and m.downsample is not None]
    assert projected == ["layer2.0", "layer3.0", "layer4.0"]


def test_option_c_projects_every_block():
    for model in (cifar_resnet(20, shortcut="C"), imagenet_resnet(50, shortcut="C")):
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        assert blocks and all(isinstance(b.downsample, nn.Sequential) for b in blocks)
        assert all(isinstance(b.downsample[0], nn.Conv2d) and b.downsample[0].kernel_size == (1, 1) for b in blocks)
    # Table 3's ordering of size: A < B < C.
    a, b, c = (count_parameters(imagenet_resnet(34, shortcut=s)) for s in "ABC")
    assert a < b < c


def _count_additions(model):
    graph = torch.fx.symbolic_trace(model).graph
    adds = {torch.add, "add", "add_", "__add__", "__iadd__"}
    import operator

    return sum(1 for n in graph.nodes if n.target in (operator.add, operator.iadd, torch.add) or n.target in adds)


@pytest.mark.parametrize("name,blocks", [("plain20", 9), ("plain34", 16), ("resnet20", 9), ("resnet34", 16)])
def test_plain_nets_have_no_addition(name, blocks):
    model = create_model(name)
    expected = 0 if name.startswith("plain") else blocks
    assert _count_additions(model) == expected
    residual_blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck)) and m.residual]
    assert len(residual_blocks) == expected
    if expected == 0:
        assert all(isinstance(m, PlainBlock) for m in model.modules() if isinstance(m, BasicBlock))


def _zero_branch(block):
    with torch.no_grad():
        block.last_bn.weight.zero_()
        block.last_bn.bias.zero_()
    return block.eval()


def test_zeroed_branch_returns_relu_of_padded_subsampled_input():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32, 32)
    block = _zero_branch(cifar_resnet(20).layer2[0])  # option A, stride 2, 16 -> 32 channels
    expected = F.relu(torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 16, 16)], dim=1))
    assert torch.equal(block(x), expected)

    identity_block = _zero_branch(cifar_resnet(20).layer1[1])
    assert torch.equal(identity_block(x), F.relu(x))

    projection_block = _zero_branch(cifar_resnet(20, shortcut="B").layer2[0])
    with torch.no_grad():
        assert torch.allclose(projection_block(x), F.relu(projection_block.downsample(x)))

    plain_block = _zero_branch(cifar_resnet(20, plain=True).layer1[1])
    assert torch.equal(plain_block(x), torch.zeros_like(x))  # no shortcut: nothing passes


def test_zero_init_residual_starts_every_block_as_identity():
    model = cifar_resnet(20, zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    x = torch.randn(2, 16, 32, 32).relu()
    assert torch.equal(model.layer1(x), x)
    # Plain nets are never zero-initialised: it would cut the signal.
    plain = cifar_resnet(20, plain=True, zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) > 0 for b in plain.modules() if isinstance(b, BasicBlock))


def test_he_initialisation():
    torch.manual_seed(0)
    conv = imagenet_resnet(50).layer3[0].conv2  # 256 -> 256, 3x3: fan_out = 256 * 9
    std = conv.weight.std().item()
    assert std == pytest.approx((2.0 / (256 * 9)) ** 0.5, rel=0.05)


def test_shared_interface_and_reset_classifier():
    model = cifar_resnet(20, in_channels=1).eval()
    x = torch.randn(3, 1, 28, 28)
    features = model.forward_features(x)
    assert features.shape == (3, 64, 7, 7)
    assert torch.equal(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (3, 64)
    model.reset_classifier(7)
    assert model(x).shape == (3, 7)
    model.reset_classifier(0)
    assert model(x).shape == (3, 64)


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match="A, B, C"):
        create_model("resnet20", shortcut="D")
    with pytest.raises(ValueError, match="1x1, 3x3"):
        create_model("resnet50", stride_on="2x2")
    with pytest.raises(ValueError, match="18, 34, 50, 101, 152"):
        imagenet_resnet(42)


def test_any_6n_plus_2_depth():
    model = cifar_resnet(26)
    assert [len(s) for s in model.stages()] == [4, 4, 4]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_weights_file(tmp_path):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(theirs.state_dict(), path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v15 = create_model("resnet50", stride_on="3x3")
        load_torchvision_weights(v15, path)
    assert torch.equal(v15.fc.weight, theirs.fc.weight)

    with pytest.warns(UserWarning, match="stride_on='3x3'"):
        load_torchvision_weights(create_model("resnet50"), path)

    with pytest.raises(ValueError, match="fc.weight"):
        load_torchvision_weights(create_model("resnet50", num_classes=10, stride_on="3x3"), path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torchvision_weights(v15, tmp_path / "missing.pth")


def test_every_name_of_the_paper_is_registered():
    names = set(list_models())
    paper = {f"resnet{d}" for d in [18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202]}
    paper |= {f"plain{d}" for d in [18, 34, 20, 32, 44, 56, 110]}
    assert paper <= names


def test_layer_responses_follow_every_3x3_layer():
    from deepres.evaluation import layer_responses

    torch.manual_seed(0)
    model = cifar_resnet(20)
    images = torch.randn(8, 3, 32, 32)
    rows = layer_responses(model, images, batch_size=4)
    assert len(rows) == 19  # the first conv and the 18 convs of the 9 blocks: 20 layers less the classifier
    assert [r["index"] for r in rows] == list(range(1, 20))
    # Fresh BN in eval mode is the identity: the response std is the std of the conv output itself.
    with torch.no_grad():
        expected = model.eval().conv1(images).std(unbiased=False).item()
    assert rows[0]["std"] == pytest.approx(expected, rel=1e-5)
    assert len(layer_responses(imagenet_resnet(50), torch.randn(2, 3, 64, 64))) == 1 + 16
