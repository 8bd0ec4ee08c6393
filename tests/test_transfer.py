"""Transfer learning: model.init from a torchvision file or our checkpoint, head replacement, input channels,
feature extraction (frozen weights and BN statistics) and fine-tuning learning rates."""

import warnings

import pytest
import torch
import torchvision

from deepres.config import ConfigError, load_config
from deepres.engine import build_optimizer, load_checkpoint, train
from deepres.runs import build_model
from deepres.models import create_model
from deepres.models.transfer import freeze_backbone, load_init

from .efficient_helpers import _one_thread, idx_data, overrides, teacher  # noqa: F401


@pytest.fixture(scope="module")
def source(teacher):
    return teacher  # the shared trained ResNet-20: the source model of every transfer test


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def test_a_torchvision_file_initialises_everything_but_a_new_head(torchvision_file):
    path, net = torchvision_file
    model = create_model("resnet18", num_classes=10)
    info = load_init(model, path)
    assert info["init_kind"] == "state_dict" and info["init_head"] == "new" and info["init_adapted"] == []
    theirs = net.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert value.shape[0] == 10
        else:
            assert torch.equal(value, theirs[key]), key
    # 1000 classes fit: the head is kept, and the nets agree.
    same = create_model("resnet18", stride_on="3x3")
    assert load_init(same, path)["init_head"] == "kept"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(same.eval()(x), net(x), atol=1e-5)


def test_torchvision_bottleneck_weights_into_the_paper_stride_warn(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.warns(UserWarning, match="stride_on=3x3"):
        load_init(create_model("resnet50", num_classes=10), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the v1.5 form matches: no warning
        load_init(create_model("resnet50", num_classes=10, stride_on="3x3"), path)


def test_grey_input_sums_the_rgb_filters(torchvision_file):
    path, net = torchvision_file
    grey = create_model("resnet18", num_classes=10, in_channels=1)
    info = load_init(grey, path)
    assert info["init_adapted"] == ["conv1.weight"]
    assert torch.allclose(grey.conv1.weight, net.conv1.weight.sum(dim=1, keepdim=True))
    # Exactly the RGB net on the grey image repeated over three channels.
    g = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ours = grey.eval().forward_features(g)
        theirs = torch.nn.Sequential(*list(net.children())[:-2])(g.expand(-1, 3, -1, -1))
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_training_from_a_torchvision_file(torchvision_file, idx_data, tmp_path):
    path, _ = torchvision_file
    config = load_config(None, overrides(idx_data, **{"model.name": "resnet18", "model.options": "{}",
                                                      "model.init": path, "train.iterations": 2,
                                                      "train.eval_every": 2, "train.batch_size": 16}))
    summary = train(config, tmp_path / "run", quiet=True)
    assert summary["init_kind"] == "state_dict" and summary["init_adapted"] == ["conv1.weight"]


def test_the_head_is_replaced_only_when_the_classes_differ(source, idx_data):
    config = load_config(None, overrides(idx_data))
    ckpt = load_checkpoint(source)
    model = build_model(config.model, 10, 1)
    assert load_init(model, source, ckpt["classes"])["init_head"] == "kept"
    assert torch.equal(model.fc.weight, ckpt["model"]["fc.weight"])
    other = build_model(config.model, 10, 1)
    fresh = other.fc.weight.clone()
    assert load_init(other, source, [f"c{i}" for i in range(10)])["init_head"] == "new"
    assert torch.equal(other.fc.weight, fresh) and torch.equal(other.conv1.weight, ckpt["model"]["conv1.weight"])
    five = build_model(config.model, 5, 1)
    assert load_init(five, source, list("abcde"))["init_head"] == "new" and five.fc.out_features == 5
    with pytest.raises(ConfigError, match="model.init_head"):
        load_init(build_model(config.model, 5, 1), source, list("abcde"), head="keep")


def test_weights_that_do_not_fit_name_the_key(source, torchvision_file, tmp_path):
    with pytest.raises(ConfigError, match="model.init.*not found"):
        load_init(create_model("resnet20"), tmp_path / "missing.pt")
    misfit = r"model.init.*layer1.0.conv1.weight \(64, 64, 3, 3\) vs \(16, 16, 3, 3\)"
    with pytest.raises(ConfigError, match=misfit) as e:
        load_init(create_model("resnet20"), torchvision_file[0])
    assert "holds the weights of" not in str(e.value)  # a bare state dict does not say what it was
    # One of our checkpoints says which model trained it: the error names the model.name that fits
    with pytest.raises(ConfigError, match=r"does not fit model resnet32: .* it holds the weights of model "
                                          r"resnet20: set model.name=resnet20"):
        load_init(create_model("resnet32", in_channels=1), source)
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(ConfigError, match="model.init.*cannot read"):
        load_init(create_model("resnet20"), tmp_path / "junk.pt")


def test_feature_extraction_leaves_backbone_weights_and_bn_statistics_unchanged(source, idx_data, tmp_path):
    config = load_config(None, overrides(idx_data, **{
        "model.init": source, "model.init_head": "new", "finetune.mode": "feature_extraction",
        "data.preset": "paper_cifar", "train.iterations": 10, "train.eval_every": 3}))  # evaluations in between
    train(config, tmp_path / "fe", quiet=True)
    before = load_checkpoint(source)["model"]
    after = load_checkpoint(tmp_path / "fe" / "checkpoints" / "last.pt")["model"]
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc.bias", "fc.weight"]  # running_mean, running_var, num_batches_tracked included


def test_frozen_bn_stays_in_eval_mode_whatever_train_says():
    model = create_model("resnet20")
    freeze_backbone(model)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    stats = model.bn1.running_mean.clone()
    model(x)
    assert torch.equal(model.bn1.running_mean, stats) and not model.bn1.training
    assert [p.requires_grad for p in model.parameters()].count(True) == 2  # fc weight and bias


def test_the_start_line_says_what_trains(source, idx_data, tmp_path, capsys):
    config = load_config(None, overrides(idx_data, **{"model.init": source, "finetune.backbone_lr_scale": 0.1,
                                                      "train.iterations": 2, "train.eval_every": 2}))
    train(config, tmp_path / "ft")
    err = capsys.readouterr().err
    assert "(kept classifier); the backbone at 0.1x the learning rate) on" in err and "of them train" not in err


def test_fine_tuning_gives_the_backbone_its_own_learning_rate():
    model = create_model("resnet20")
    cfg = load_config(None, ["optim.decay_norm_and_bias=false"]).optim
    groups = build_optimizer(model, cfg, torch.device("cpu"), backbone_lr_scale=0.1).param_groups
    head = {id(p) for p in model.fc.parameters()}
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr_scale"] == (1.0 if in_head == {True} else 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {g["weight_decay"] for g in groups} == {0.0, cfg.weight_decay}


def test_model_init_pretrained_starts_from_the_published_weights(idx_data, tmp_path, monkeypatch, capsys):
    """model.init=pretrained: the published weights of model.name (a file in the torch.hub cache, as a download
    leaves it), the model built as they were trained (ResNet-50: stride on the 3x3), grey input adapted, a new
    classifier; with feature extraction everything else stays the published weights. Checkpoints rebuild the same
    model for eval; ImageNet's normalisation is a data.normalize choice."""
    from deepres.data.loaders import Normalizer
    from deepres.engine.inference import evaluate_checkpoint
    from deepres.models.pretrained import pretrained_cfg

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    published = torchvision.models.resnet50().state_dict()
    torch.save(published, tmp_path / "hub" / "checkpoints" / pretrained_cfg("resnet50")["file_name"])
    config = load_config(None, overrides(idx_data, **{
        "model.name": "resnet50", "model.options": "{}", "model.init": "pretrained", "data.normalize": "imagenet",
        "finetune.mode": "feature_extraction", "train.iterations": 2, "train.eval_every": 2, "train.batch_size": 8}))
    summary = train(config, tmp_path / "run")
    start = "weights from ResNet50_Weights.IMAGENET1K_V2 (new classifier, conv1.weight adapted); 20,490 of them train)"
    assert start in capsys.readouterr().err  # 2048 x 10 weights and 10 biases: the classifier alone
    assert summary["init_kind"] == "pretrained" and summary["init_head"] == "new"
    assert summary["init_adapted"] == ["conv1.weight"] and "IMAGENET1K" in summary["init_weights"]
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    after = last["model"]
    torch.testing.assert_close(after["conv1.weight"], published["conv1.weight"].sum(dim=1, keepdim=True))
    assert all(torch.equal(after[k], v) for k, v in published.items() if not k.startswith(("fc.", "conv1.")))
    assert Normalizer.from_state_dict(last["normalization"]).mean.flatten().tolist() == pytest.approx([0.449])
    model = build_model(load_config(None, overrides(idx_data, **{"model.name": "resnet50", "model.init": "pretrained",
                                                                 "model.options": "{}"})).model, 10, 1)
    assert model.stride_on == "3x3"  # as torchvision trains its ResNet-50; the checkpoint rebuilds it so
    result = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert result["top1_error"] == pytest.approx(summary["test_top1_error"], abs=1e-6)
    with pytest.raises(ConfigError, match="model.init.*resnet20 has no pretrained weights"):
        train(load_config(None, overrides(idx_data, **{"model.init": "pretrained"})), tmp_path / "r20", quiet=True)
