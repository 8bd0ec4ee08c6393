"""Every registered model: forward, backward, and its stored expected output.

Expected outputs live in tests/expected/<name>.pt. After an intended change to a model's numerics, regenerate them
with ``DEEPRES_REGEN_EXPECTED=1 pytest tests/test_registry.py`` and review the diff.
"""

import os
from pathlib import Path

import pytest
import torch

from deepres.models import create_model, list_models, model_entry, register_model

EXPECTED = Path(__file__).parent / "expected"
REGENERATE = os.environ.get("DEEPRES_REGEN_EXPECTED") == "1"


def _test_input_size(name):
    # Native size for small nets; large nets are fully convolutional, 64x64 keeps the test fast.
    h, w = model_entry(name).input_size
    return (min(h, 64), min(w, 64))


@pytest.mark.parametrize("name", list_models())
def test_expected_output(name):
    torch.manual_seed(0)
    model = create_model(name)
    size = _test_input_size(name)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(4, 3, *size, generator=generator)
    x = torch.randn(2, 3, *size, generator=generator)
    with torch.no_grad():
        model.train()(calibration)  # BN statistics from a batch, so eval-mode outputs are well scaled
        out = model.eval()(x)
    path = EXPECTED / f"{name}.pt"
    if REGENERATE:
        EXPECTED.mkdir(exist_ok=True)
        torch.save(out.clone(), path)
        pytest.skip(f"regenerated {path.name}")
    assert path.exists(), f"no expected output for {name}: run with DEEPRES_REGEN_EXPECTED=1"
    expected = torch.load(path, weights_only=True)
    assert out.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_finite_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, *_test_input_size(name))
    out = model.train()(x)
    outputs = [out] if isinstance(out, torch.Tensor) else list(out)  # GoogLeNet in training: (logits, aux1, aux2)
    assert all(o.shape == (2, 7) for o in outputs)
    sum(o.logsumexp(dim=1).sum() for o in outputs).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


def test_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @register_model(family="resnet")
        def resnet50():  # noqa: F811
            raise AssertionError("never built")


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="resnet50") as info:
        create_model("resnet5O")
    assert "unknown model 'resnet5O'" in str(info.value)


def test_list_models_pattern():
    assert list_models("plain*") == ["plain18", "plain20", "plain32", "plain34", "plain44", "plain56", "plain110"]
