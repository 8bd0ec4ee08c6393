"""Every registered model: forward, backward, and its stored expected output.

Expected outputs live in tests/expected/<name>.pt, computed in float64 (the same weights and inputs, every op in
double precision), so they do not depend on which CPU kernels ran. The float32 forward is compared with that
reference within a tolerance derived from it: ``FLOAT32_MARGIN`` times the float32 forward's own distance from the
reference measured when the file was written, and never tighter than ``1e-5`` of the output scale. A float32 forward
on another CPU (AVX2, AVX-512, AMX; other oneDNN kernels) rounds differently but lands at a similar distance; a
changed model lands far outside it. Deep nets amplify rounding, and the stored distance records how much.

BN statistics come from the test batch itself, with BN alone in training mode (dropout and stochastic depth would
draw random numbers, and PyTorch releases draw them differently), so eval-mode outputs are well scaled at any depth.
A deep plain net calibrated that way is still chaotic at random init: rounding moves a random plain-110's logits by
a fifth of their spread (measured: 1.47 of 6.74, float32 against float64). Where calibration makes the float32
distance exceed ``CHAOTIC`` of the output's spread, the file records ``calibrated: False`` and the test keeps BN at
its initial statistics (mean 0, variance 1), where plain nets are stable (plain-110: 8e-9).

After an intended change to a model's numerics, regenerate with ``DEEPRES_REGEN_EXPECTED=1 pytest
tests/test_registry.py`` and review the diff.
"""

import os
from pathlib import Path

import pytest
import torch

from deepres.models import create_model, list_models, model_entry, register_model

EXPECTED = Path(__file__).parent / "expected"
REGENERATE = os.environ.get("DEEPRES_REGEN_EXPECTED") == "1"
# Measured on an Intel Xeon (Sapphire Rapids, AMX), where the files were regenerated (default kernels, two threads):
# with oneDNN limited to AVX2 / AVX512_CORE / AVX512_CORE_BF16, ATen's kernels set to avx2 / default / avx512, and
# AVX2 + default on one thread, the float32 forward's distance from the float64 reference stayed within 8.3x the
# stored distance for every model (VGG's, whose stored distances are the smallest); with PyTorch 2.4.1 and 2.11.0
# instead of 2.14.1, within 1.3x. (The files of an earlier calibration, written on an AMD EPYC, stayed within 5.9x.)
FLOAT32_MARGIN = 16.0
CHAOTIC = 1e-2


def _test_input_size(name):
    # Native size for small nets; large nets are fully convolutional, 64x64 keeps the test fast.
    h, w = model_entry(name).input_size
    return (min(h, 64), min(w, 64))


def forward(name: str, dtype: torch.dtype, calibrated: bool = True) -> torch.Tensor:
    """The model's eval-mode output on a fixed input, after one BN calibration pass over that input when
    ``calibrated``, computed in ``dtype``: the float32 weights and inputs are the same numbers in either precision."""
    torch.manual_seed(0)
    model = create_model(name).to(dtype)
    x = torch.randn(4, 3, *_test_input_size(name), generator=torch.Generator().manual_seed(1)).to(dtype)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for module in batchnorms:
        module.momentum = None  # a cumulative average: after one batch, exactly that batch's statistics
    with torch.no_grad():
        if calibrated:
            model.eval()
            for module in batchnorms:
                module.train()
            model(x)
        return model.eval()(x)


def _spread(logits: torch.Tensor) -> float:
    return (logits - logits.mean(dim=1, keepdim=True)).abs().max().item()


@pytest.mark.parametrize("name", list_models())
def test_expected_output(name):
    path = EXPECTED / f"{name}.pt"
    if REGENERATE:
        for calibrated in (True, False):
            out, reference = forward(name, torch.float32, calibrated), forward(name, torch.float64, calibrated)
            distance = (out.double() - reference).abs().max().item()
            if distance <= CHAOTIC * _spread(reference):
                break
        EXPECTED.mkdir(exist_ok=True)
        torch.save({"float64": reference.clone(), "float32_distance": distance, "calibrated": calibrated}, path)
        pytest.skip(f"regenerated {path.name}: float32 distance {distance:.3g}, calibrated {calibrated}")
    assert path.exists(), f"no expected output for {name}: run with DEEPRES_REGEN_EXPECTED=1"
    stored = torch.load(path, weights_only=True)
    reference = stored["float64"]
    out = forward(name, torch.float32, stored["calibrated"])
    assert out.shape == reference.shape and reference.dtype == torch.float64
    scale = max(1.0, reference.abs().max().item())
    tolerance = max(FLOAT32_MARGIN * stored["float32_distance"], 1e-5 * scale)
    distance = (out.double() - reference).abs().max().item()
    assert distance <= tolerance, (f"{name}: float32 output is {distance:.3g} from the float64 reference; allowed "
                                   f"{tolerance:.3g} ({FLOAT32_MARGIN:g} x {stored['float32_distance']:.3g})")


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
    # timm's arguments: several patterns, exclude_filters, pretrained; an empty pattern is every model
    assert list_models(["resnet5*", "vgg1?*"], exclude_filters=["*_bn", "vgg13"]) == [
        "resnet50", "resnet56", "vgg11", "vgg16", "vgg19"]
    assert list_models("") == list_models()
    with_weights = list_models(pretrained=True)
    assert "resnet50" in with_weights and "resnet56" not in with_weights and "vgg11_bn" in with_weights
    assert list_models("resnet*", pretrained=True) == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


# One model of each family and builder (the deeper and wider variants share their classes).
FAMILY_MODELS = ("resnet20", "plain20", "resnet18", "resnet50", "plain18", "se_resnet18", "resnext50_32x4d",
                 "wide_resnet50_2", "deform_resnet50", "speedrun_resnet9", "alexnet", "vgg11", "vgg11_bn", "googlenet",
                 "densenet121", "densenet_bc", "efficientnet_b0")


def test_num_classes_zero_gives_the_pooled_features_of_every_family():
    """timm's convention: no classifier, forward returns (N, num_features); no zero-size layer is built (on the meta
    device: no memory, no arithmetic)."""
    import warnings

    assert set(FAMILY_MODELS) <= set(list_models())
    wrong = []
    for name in FAMILY_MODELS:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("error")  # a zero-size Linear warns when initialised
            model = create_model(name, num_classes=0).eval()
            out = model(torch.empty(1, 3, *(getattr(model, "input_size", None) or (224, 224))))
        if tuple(out.shape) != (1, model.num_features):
            wrong.append((name, tuple(out.shape), model.num_features))
    assert not wrong


def test_num_classes_follows_the_classifier_in_every_family():
    """timm's ``model.num_classes``: the logits the model gives, after every reset_classifier."""
    seen = []
    for name in FAMILY_MODELS:
        with torch.device("meta"):
            model = create_model(name, num_classes=7)
            seen.append(model.num_classes)
            model.reset_classifier(0)
            seen.append(model.num_classes)
            model.reset_classifier(3)
            seen.append(model.num_classes)
            seen.append(model(torch.empty(1, 3, *model.input_size)).shape[1])
    assert seen == [7, 0, 3, 3] * len(FAMILY_MODELS)


def test_torch_hub_loads_every_registered_model_from_a_checkout():
    """hubconf.py: torch.hub.load(checkout, NAME, source="local", **kwargs) is create_model(NAME, **kwargs) for every
    registered name (same weights from the same seed); an unknown name and missing weights are torch's and our
    errors."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("deepres_hubconf", root / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert all(callable(getattr(hubconf, name, None)) for name in list_models())
    torch.manual_seed(0)
    hub = torch.hub.load(str(root), "resnet20", source="local", num_classes=7, in_chans=1)
    torch.manual_seed(0)
    ours = create_model("resnet20", num_classes=7, in_chans=1)
    assert type(hub) is type(ours) and hub.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), ours.state_dict().values()))
    assert "resnet56" in hubconf.resnet56.__doc__
    with pytest.raises(RuntimeError, match="resnet21"):
        torch.hub.load(str(root), "resnet21", source="local")
    with pytest.raises(ValueError, match="no pretrained weights for 'resnet20'"):
        torch.hub.load(str(root), "resnet20", source="local", pretrained=True)
