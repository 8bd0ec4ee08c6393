"""Activation checkpointing (``model.set_grad_checkpointing()``, ``train.grad_checkpointing``): every family
recomputes its blocks in the backward pass and trains exactly as without it (gradients, BN running statistics and
their batch counts, random masks), in the models, their feature extractors and whole runs through a resume."""

import copy

import pytest
import torch
from torch import nn

from deepres.config import ConfigError, load_config
from deepres.engine import load_checkpoint, train
from deepres.engine.logging import read_metrics
from deepres.models import create_model

from .helpers import make_idx_dataset
from .test_engine import small_overrides

# One net of each family, at a small input, with a module of a checkpointed unit (it runs again in the backward pass).
FAMILIES = [
    ("resnet20", {}, "layer1.0", 32),
    ("resnet50", {}, "layer2.0", 32),
    ("se_resnet18", {}, "layer1.0", 32),
    ("densenet_bc", {"depth": 40, "growth_rate": 12}, "features.denseblock1", 32),
    ("efficientnet_b0", {"small_input": True}, "features.2", 32),  # stage by stage; stochastic depth 0.2 is on
    ("googlenet", {"small_input": True}, "inception3a", 32),
    ("vgg11_bn", {"small_input": True}, "features.4", 32),  # the conv groups between poolings
    ("alexnet", {"small_input": True}, "features.3", 32),
    ("speedrun_resnet9", {}, "stages.0", 32),
]


def _train_steps(model: nn.Module, size: int, steps: int = 2) -> list[float]:
    """``steps`` SGD steps on fixed random batches (the same random masks for both runs: the seed is set before
    each step); the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        images, labels = torch.randn(4, 3, size, size), torch.randint(0, 5, (4,))
        out = model(images)
        loss = nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _count_calls(model: nn.Module, path: str) -> list[int]:
    """A counter of the calls of ``model``'s module ``path`` (its pre-hook: a recomputation may stop early, before
    a forward hook would run)."""
    calls = [0]
    model.get_submodule(path).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name, options, unit, size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_checkpointed_training_equals_plain_training(name, options, unit, size):
    """Two SGD steps with checkpointing give the same losses, weights and buffers (BN running averages and batch
    counts: the recomputation must not update them a second time) as without, and the unit ran twice per step (its
    forward again in the backward pass) where it ran once."""
    torch.manual_seed(0)
    plain = create_model(name, num_classes=5, **options).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    plain_calls, checkpointed_calls = _count_calls(plain, unit), _count_calls(checkpointed, unit)
    assert _train_steps(checkpointed, size) == pytest.approx(_train_steps(plain, size), rel=1e-6)
    assert checkpointed_calls[0] == 2 * plain_calls[0] > 0
    for (key, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=key)
    # Evaluation and no-grad forwards recompute nothing and give the same outputs.
    plain.eval(), checkpointed.eval()
    x = torch.randn(2, 3, size, size)
    before = checkpointed_calls[0]
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(x), plain(x), rtol=1e-6, atol=1e-6)
    assert checkpointed_calls[0] == before + 1


def test_bn_momentum_none_and_features_only_keep_their_counts():
    """A cumulative-average BN (momentum None reads its batch count) and a ResNet feature extractor: the maps and the
    backbone's gradients and buffers equal the plain extractor's, and ``set_grad_checkpointing(False)`` turns it off."""
    torch.manual_seed(0)
    plain = create_model("resnet18", features_only=True, out_indices=(2, 4))
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, checkpointed):
        for _ in range(2):
            sum(f.square().mean() for f in model(x)).backward()
    for (key, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=key)
    assert int(checkpointed.layer1[0].bn1.num_batches_tracked) == 2
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7)
    checkpointed.set_grad_checkpointing(False)
    assert not checkpointed.grad_checkpointing
    hooked = create_model("densenet_bc", depth=40, growth_rate=12, features_only=True)
    hooked.set_grad_checkpointing()
    assert hooked._model.grad_checkpointing and len(hooked(torch.randn(2, 3, 32, 32))) == 3


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("idx-checkpointing"))


def test_a_checkpointed_run_equals_the_plain_run_through_a_resume(idx_data, tmp_path):
    """``train.grad_checkpointing=true``: the same losses and final weights as the plain run, also when the plain run
    stops at step 3 and resumes with checkpointing (a setting of how, not what, so no notice); the summary and the
    start line say so. A captured step and a model without ``set_grad_checkpointing`` refuse it."""
    sets = {"train.iterations": 6, "train.checkpoint_every": 3, "train.eval_every": 3}
    plain = train(load_config(None, small_overrides(idx_data, **sets)), tmp_path / "plain", quiet=True)
    on = {**sets, "train.grad_checkpointing": True}
    checkpointed = train(load_config(None, small_overrides(idx_data, **on)), tmp_path / "on", quiet=True)
    train(load_config(None, small_overrides(idx_data, **sets)), tmp_path / "resumed", quiet=True,
          on_step=lambda step, info: step < 3)
    resumed = train(load_config(None, small_overrides(idx_data, **on)), tmp_path / "resumed", resume="auto",
                    quiet=True)
    rows = [[(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / run / "metrics.jsonl") if "train_loss" in r]
            for run in ("plain", "on", "resumed")]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 6
    assert not plain["grad_checkpointing"] and checkpointed["grad_checkpointing"] and resumed["grad_checkpointing"]
    assert checkpointed["test_top1_error"] == plain["test_top1_error"] == resumed["test_top1_error"]
    assert not any("resumed at step" in notice for notice in resumed["notices"])
    weights = [load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["model"] for run in ("plain", "resumed")]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    with pytest.raises(ConfigError, match="train.grad_checkpointing.*cuda_graph=false"):
        load_config(None, small_overrides(idx_data, **{"train.grad_checkpointing": True, "train.cuda_graph": True}))
    own = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ConfigError, match=r"train.grad_checkpointing.*Sequential.*set_grad_checkpointing"):
        train(load_config(None, small_overrides(idx_data, **on)), tmp_path / "own", quiet=True, model=own)
