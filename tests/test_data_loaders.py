"""Loaders and augmentation: determinism, DDP sharding, resume, augmentation statistics, CutMix/Mixup targets,
and build_data choosing and building both loader families."""

from __future__ import annotations

import itertools

import pytest
import torch

from deepres.config import DataConfig
from deepres.data import (
    CutMix,
    DeviceLoader,
    EvalLoader,
    Mixup,
    Normalizer,
    RandAugmentBatch,
    RandomSubset,
    Split,
    TrivialAugmentBatch,
    WorkerEvalLoader,
    WorkerLoader,
    build_data,
    choose_loader,
    pca_lighting,
    random_crop_flip,
    step_generator,
)
from deepres.data import pipeline
from deepres.data.presets import IMAGENET_EIGVAL, IMAGENET_EIGVEC, MixChoice, RandomErasing

from .test_data_common import make_image_folder


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _split(n=64, size=8, channels=3, classes=4, seed=0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return Split(images, torch.arange(n) % classes)


def _loader(split, batch=16, **kw):
    return DeviceLoader(split, batch, normalizer=Normalizer.fit(split.images), **kw)


# ---------------------------------------------------------------------------------------------------------------
# Device loader


def test_device_loader_is_a_function_of_seed_and_step():
    split = _split()
    a, b = _loader(split, seed=3), _loader(split, seed=3)
    for step in (0, 1, 7, 4):  # any order: no hidden state
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], _loader(split, seed=4).batch(0)[0])
    resumed = list(itertools.islice(a.iterate(5), 3))
    for k, (x, y) in enumerate(resumed):
        assert torch.equal(x, b.batch(5 + k)[0]) and torch.equal(y, b.batch(5 + k)[1])


def test_device_loader_epoch_is_a_permutation():
    split = _split(n=64)
    split.labels = torch.arange(64)  # labels identify images
    loader = _loader(split, batch=16, augment=None)
    assert loader.steps_per_epoch == 4
    epoch0 = torch.cat([loader.batch(s)[1] for s in range(4)])
    epoch1 = torch.cat([loader.batch(s)[1] for s in range(4, 8)])
    assert sorted(epoch0.tolist()) == list(range(64)) and sorted(epoch1.tolist()) == list(range(64))
    assert not torch.equal(epoch0, epoch1)


@pytest.mark.parametrize("mix", [None, "cutmix"])
def test_ddp_ranks_are_disjoint_and_complete(mix):
    split = _split(n=96)
    split.labels = torch.arange(96) % 10
    hook = CutMix(1.0, 10) if mix else None
    whole = _loader(split, batch=32, seed=1, mix=hook)
    ranks = [_loader(split, batch=32, seed=1, mix=hook, rank=r, world_size=2) for r in range(2)]
    for step in (0, 3, 5):
        x, y = whole.batch(step)
        parts = [r.batch(step) for r in ranks]
        assert all(p[0].shape[0] == 16 for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        _loader(split, batch=32, world_size=3)


def test_eval_loader_shards_cover_the_split_once():
    split = _split(n=53)
    split.labels = torch.arange(53)
    norm = Normalizer.fit(split.images)
    for world in (1, 2, 3, 4):
        seen = []
        for rank in range(world):
            for x, y in EvalLoader(split, 8, normalizer=norm, rank=rank, world_size=world):
                assert x.dtype == torch.float32
                seen += y.tolist()
        assert seen == list(range(53)), world


def test_crop_offsets_and_flip_rate():
    """Pad 4 and crop 32 back: every offset 0..8 in both axes, flip half the time (PAPER.md section 5)."""
    n, size, pad = 4000, 8, 4
    base = (torch.arange(size * size, dtype=torch.uint8) + 1).view(1, 1, size, size)
    out = random_crop_flip(base.expand(n, 1, size, size).contiguous(), step_generator(0, 1, 0), padding=pad)
    padded = torch.nn.functional.pad(base, (pad,) * 4)[0, 0]
    candidates = {}
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[oy : oy + size, ox : ox + size]
            candidates[(oy, ox, False)] = crop
            candidates[(oy, ox, True)] = crop.flip(1)
    keys = list(candidates)
    stack = torch.stack([candidates[k] for k in keys])  # (162, 8, 8), all distinct
    match = (out[:, 0, None] == stack[None]).flatten(2).all(-1)  # (n, 162)
    assert (match.sum(1) == 1).all(), "every output is exactly one padded crop (or its flip)"
    found = [keys[i] for i in match.float().argmax(1).tolist()]
    assert {k[0] for k in found} == set(range(9)) and {k[1] for k in found} == set(range(9))
    flips = sum(k[2] for k in found) / n
    assert abs(flips - 0.5) < 0.04
    offsets = torch.tensor([k[0] for k in found]).bincount(minlength=9).float() / n
    assert (offsets - 1 / 9).abs().max() < 0.03, "uniform offsets"


def test_randaugment_is_deterministic_and_leaves_global_rng_alone():
    images = _split(n=8, size=16).images
    ra = RandAugmentBatch(2, 9)
    state = torch.get_rng_state()
    a = ra(images, step_generator(0, 1, 3))
    assert torch.equal(torch.get_rng_state(), state)
    b = ra(images, step_generator(0, 1, 3))
    c = ra(images, step_generator(0, 1, 4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.uint8
    with pytest.raises(ValueError, match="magnitude"):
        RandAugmentBatch(2, 31)


def test_trivialaugment_is_deterministic_and_changes_images():
    images = _split(n=16, size=16).images
    ta = TrivialAugmentBatch()
    state = torch.get_rng_state()
    a = ta(images, step_generator(0, 1, 3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, ta(images, step_generator(0, 1, 3)))
    assert not torch.equal(a, ta(images, step_generator(0, 1, 4)))
    assert a.dtype == torch.uint8 and (a != images).flatten(1).any(1).sum() >= 8  # identity is 1 of 14 operations


def _auto_augment_reference():
    """torchvision's functional operation for each of RandAugment's and TrivialAugment's 14, given a magnitude, as
    its auto-augment transforms call them."""
    import math

    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    nearest = InterpolationMode.NEAREST

    def shear(im, m, axis):
        angle = [0.0, 0.0]
        angle[axis] = math.degrees(math.atan(m))
        return TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0, shear=angle, interpolation=nearest, center=[0, 0])

    def translate(im, m, axis):
        shift = [0, 0]
        shift[axis] = int(m)
        return TF.affine(im, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)

    return {
        "Identity": lambda im, m: im,
        "ShearX": lambda im, m: shear(im, m, 0), "ShearY": lambda im, m: shear(im, m, 1),
        "TranslateX": lambda im, m: translate(im, m, 0), "TranslateY": lambda im, m: translate(im, m, 1),
        "Rotate": lambda im, m: TF.rotate(im, angle=m, interpolation=nearest),
        "Brightness": lambda im, m: TF.adjust_brightness(im, 1 + m),
        "Color": lambda im, m: TF.adjust_saturation(im, 1 + m),
        "Contrast": lambda im, m: TF.adjust_contrast(im, 1 + m),
        "Sharpness": lambda im, m: TF.adjust_sharpness(im, 1 + m),
        "Posterize": lambda im, m: TF.posterize(im, int(m)),
        "Solarize": lambda im, m: TF.solarize(im, 255.0 * m),
        "AutoContrast": lambda im, m: TF.autocontrast(im),
        "Equalize": lambda im, m: TF.equalize(im),
    }


def test_every_policy_pickles_for_spawned_workers():
    """macOS and Windows start DataLoader workers by spawning: the per-image policies travel pickled and draw as
    before."""
    import pickle

    from deepres.config import AUGMENT_OPS, augment_ops

    image = _smooth(1, 12, 12)[0]
    for policy in (RandAugmentBatch(2, 9), TrivialAugmentBatch(), RandomSubset(augment_ops(list(AUGMENT_OPS)), 0.5)):
        one = policy.one_image()
        copy = pickle.loads(pickle.dumps(one))
        outputs = []
        for transform in (one, copy):
            torch.manual_seed(5)
            outputs.append(transform(image))
        assert torch.equal(*outputs), policy


def test_the_auto_augment_operations_equal_torchvision_s():
    """Each of RandAugment's and TrivialAugment's 14 operations, batched with a magnitude per image, equals
    torchvision's functional operation image by image, on RGB, grey and flat images (uint8, bit for bit). Magnitudes
    avoid nearest-neighbour ties (a sampling point exactly between two pixels, as shear 0.2 puts row 2), which the two
    float32 grids may resolve either way."""
    from deepres.data.policies import AUTO_AUGMENT_OPS

    reference = _auto_augment_reference()
    magnitudes = {
        "geometric": [0.09, -0.3, 0.99, -0.45, 0.13, 0.0], "Rotate": [9.0, -30.0, 135.0, -77.3, 12.5, 0.0],
        "translate": [4.35, -4.35, 32.0, -7.9, 0.5, 10.0], "colour": [0.27, -0.9, 0.99, -0.5, 0.1, 0.0],
        "Posterize": [7, 4, 2, 8, 5, 6], "Solarize": [0.7, 1.0, 0.0, 0.5, 0.33, 0.9],
    }
    kind = {"ShearX": "geometric", "ShearY": "geometric", "TranslateX": "translate", "TranslateY": "translate",
            "Brightness": "colour", "Color": "colour", "Contrast": "colour", "Sharpness": "colour"}
    rgb = torch.randint(0, 256, (6, 3, 16, 20), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for name, (op, *_) in AUTO_AUGMENT_OPS.items():
        m = torch.tensor(magnitudes.get(kind.get(name, name), [0.0] * 6), dtype=torch.float64)
        flat = torch.full((6, 3, 16, 20), 77, dtype=torch.uint8)  # AutoContrast and Equalize leave it alone
        for images in (rgb, _smooth(6, 16, 20), rgb[:, :1].contiguous(), flat):
            ours = op(images.clone(), m)
            theirs = torch.stack([reference[name](images[i], float(m[i])) for i in range(len(images))])
            assert ours.dtype == torch.uint8 and torch.equal(ours, theirs), (name, images.shape)


def test_randaugment_and_trivialaugment_draw_as_torchvision_does():
    """Operations uniform over the 14 (14,000 draws: each share's standard error 0.0022), RandAugment at its bin M,
    TrivialAugment at a uniform bin, signed magnitudes negated half the time; over 1,500 images the share left
    unchanged and the mean change per pixel match torchvision's transforms applied image by image."""
    from torchvision.transforms import v2

    from deepres.data.policies import AUTO_AUGMENT_OPS

    names = list(AUTO_AUGMENT_OPS)
    (layer,) = TrivialAugmentBatch().draw(14_000, (3, 32, 32), torch.Generator().manual_seed(0))
    share = layer["op"].bincount(minlength=14).double() / 14_000
    assert (share - 1 / 14).abs().max() < 0.009
    rotate = layer["magnitude"][layer["op"] == names.index("Rotate")]
    assert rotate.abs().max() == pytest.approx(135.0) and 0.45 < (rotate < 0).double().mean() < 0.55
    assert set(rotate.abs().div(4.5).round().long().tolist()) == set(range(31))  # bins of 135/30 degrees
    bits = layer["magnitude"][layer["op"] == names.index("Posterize")]
    assert set(bits.tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}
    layers = RandAugmentBatch(2, 9).draw(2000, (3, 32, 32), torch.Generator().manual_seed(1))
    assert len(layers) == 2
    for layer in layers:
        rotate = layer["magnitude"][layer["op"] == names.index("Rotate")]
        assert len(rotate) > 100 and torch.allclose(rotate.abs(), torch.tensor(9.0, dtype=torch.float64))
        assert set(layer["magnitude"][layer["op"] == names.index("Posterize")].tolist()) == {7.0}

    images = _smooth(1500, 12, 12, seed=3)
    for ours, theirs in ((TrivialAugmentBatch(), v2.TrivialAugmentWide()), (RandAugmentBatch(2, 9), v2.RandAugment())):
        a = ours(images, torch.Generator().manual_seed(2))
        torch.manual_seed(2)
        b = torch.stack([theirs(image) for image in images])
        for out in (a, b):
            assert out.dtype == torch.uint8
        same_a, same_b = ((out == images).flatten(1).all(1).double().mean().item() for out in (a, b))
        change_a, change_b = ((out.float() - images.float()).abs().mean().item() for out in (a, b))
        assert same_a == pytest.approx(same_b, abs=0.04), repr(ours)  # standard error about 0.011 each
        assert change_a == pytest.approx(change_b, rel=0.08), repr(ours)


def _subset(items, p=1.0):
    from deepres.config import load_config
    from deepres.data.policies import random_subset

    return random_subset(load_config(None, [f"data.augment={items}", f"data.augment_p={p}"]).data)


def _smooth(n=4, h=17, w=23, seed=0):
    """uint8 RGB images without sharp edges (bilinear resampling of them is not decided by a rounding tie)."""
    coarse = torch.rand(n, 3, 5, 6, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").mul(255).round().to(torch.uint8)


def test_the_random_subset_operations_equal_torchvision_s():
    """Each data.augment operation with given parameters against torchvision's functional op on the same image:
    rotation, shear and perspective equal (the perspective's corners given in pixel-centre coordinates, +0.5 in
    torchvision's); brightness, contrast, saturation and hue within 1 (torchvision truncates, we round)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from deepres.data.policies import AUGMENT_OPERATIONS as ops

    bilinear = InterpolationMode.BILINEAR
    x = _smooth()

    def ours(name, **params):
        params = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in params.items()}
        return ops[name].apply(x.float(), params).round().to(torch.uint8)

    def theirs(fn):
        return torch.stack([fn(i, x[i]) for i in range(len(x))])

    angles = [10.0, -25.0, 3.0, 40.0]
    assert torch.equal(ours("rotate", angle=angles), theirs(lambda i, im: TF.rotate(im, angles[i], bilinear)))
    shears = [[10.0, 5.0], [-20.0, 0.0], [0.0, 15.0], [7.0, -7.0]]
    assert torch.equal(ours("shear", shear=shears), theirs(
        lambda i, im: TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0, shear=shears[i], interpolation=bilinear)))
    moves = torch.rand(4, 4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    h, w = x.shape[-2:]
    corners = torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=torch.float64)
    ends = corners + torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * moves * torch.tensor([w // 2, h // 2])
    assert torch.equal(ours("perspective", moves=moves), theirs(
        lambda i, im: TF.perspective(im, (corners + 0.5).tolist(), (ends[i] + 0.5).tolist(), bilinear)))

    factors, hues = [0.6, 1.0, 1.3, 1.4], [0.1, -0.05, 0.25, -0.5]
    keep, still = [1.0] * 4, [0.0] * 4
    x = torch.randint(0, 256, (4, 3, 9, 9), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    for got, fn in (
        (ours("brightness", brightness=factors), lambda i, im: TF.adjust_brightness(im, factors[i])),
        (ours("color_jitter", brightness=keep, contrast=factors, saturation=keep, hue=still),
         lambda i, im: TF.adjust_contrast(im, factors[i])),
        (ours("color_jitter", brightness=keep, contrast=keep, saturation=factors, hue=still),
         lambda i, im: TF.adjust_saturation(im, factors[i])),
        (ours("color_jitter", brightness=keep, contrast=keep, saturation=keep, hue=hues),
         lambda i, im: TF.adjust_hue(im, hues[i])),
    ):
        assert (got.int() - theirs(fn).int()).abs().max() <= 1
    assert torch.equal(ours("color_jitter", brightness=keep, contrast=keep, saturation=keep, hue=still), x)
    grey = x[:, :1]
    assert torch.equal(ops["color_jitter"].apply(grey.float(), {"brightness": torch.ones(4), "contrast": torch.ones(4),
                                                                "saturation": torch.full((4,), 0.5),
                                                                "hue": torch.full((4,), 0.2)}), grey.float())


def test_the_random_subset_draws_each_operation_with_its_probability_and_strength():
    """data.augment (PAPER.md section 7: a random subset of the lecture's operations per image): each operation is
    chosen with probability p (2,000 images: standard error 0.011) independently of the others, its parameters drawn
    within its strength; strength 0 is the identity; a batch is a function of the generator's state only (the
    global RNG untouched) and equal on a batch of one image (the worker loader's form)."""
    draws = _subset("[shear:10, rotate:20, perspective, brightness:0.4, color_jitter, noise:0.1]", p=0.3).draw(
        2000, (3, 8, 8), torch.Generator().manual_seed(0))
    chosen = torch.stack([d["chosen"] for d in draws]).float()
    assert chosen.mean(1).sub(0.3).abs().max() < 0.045
    assert (chosen[0] * chosen[1]).mean().item() == pytest.approx(0.09, abs=0.03)
    shear, angle, moves = draws[0]["shear"], draws[1]["angle"], draws[2]["moves"]
    assert shear.abs().max() <= 10 and shear.abs().max() > 9.9 and angle.abs().max() <= 20 and angle.abs().max() > 19.9
    assert moves.min() >= 0 and moves.max() <= 0.3 and moves.max() > 0.29
    assert draws[3]["brightness"].min() >= 0.6 and draws[3]["brightness"].max() <= 1.4
    assert draws[4]["hue"].abs().max() <= 0.1 and draws[4]["hue"].abs().max() > 0.099
    assert draws[5]["noise"].std().item() == pytest.approx(25.5, rel=0.02)

    g = lambda step: step_generator(0, 1, step)  # noqa: E731
    images = _split(n=32, size=16).images
    identity = _subset("[shear:0, rotate:0, perspective:0, brightness:0, color_jitter:0, noise:0]")
    assert torch.equal(identity(images, g(0)), images)
    policy = _subset("[perspective, color_jitter, noise:0.02]", p=0.5)
    state = torch.get_rng_state()
    a = policy(images, g(6))
    assert torch.get_rng_state().equal(state) and a.dtype == torch.uint8
    assert torch.equal(a, policy(images, g(6))) and not torch.equal(a, policy(images, g(7)))
    assert 0.75 < (a != images).flatten(1).any(1).float().mean().item() < 0.97  # 1 - 0.5^3
    one = policy.one_image()
    torch.manual_seed(3)
    b = one(images[0])
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    assert torch.equal(b, policy(images[:1], generator)[0])


def test_random_erasing_draws_as_torchvision_does():
    """The boxes' rate and areas against torchvision's RandomErasing at p=0.5 on 32x32 (4,000 draws each: the
    erased rate's standard error is 0.008, the mean area's 0.0025); every box lies inside the image and exactly it
    becomes 0."""
    from torchvision.transforms import v2

    boxes = RandomErasing(0.5).boxes(4000, 32, 32, torch.Generator().manual_seed(0))
    erased = boxes[:, 2] > 0
    assert torch.equal(erased, boxes[:, 3] > 0)
    assert ((boxes[:, 0] + boxes[:, 2] <= 32) & (boxes[:, 1] + boxes[:, 3] <= 32)).all()
    ours_area = (boxes[erased, 2] * boxes[erased, 3]).float().mean().item() / 1024
    torch.manual_seed(0)
    theirs = torch.stack([v2.RandomErasing(p=0.5, value=0)(torch.ones(1, 32, 32)) for _ in range(4000)]) == 0
    theirs_rate, theirs_area = theirs.flatten(1).any(1), theirs.flatten(1).float().mean(1)
    assert erased.float().mean().item() == pytest.approx(theirs_rate.float().mean().item(), abs=0.04)
    assert ours_area == pytest.approx(theirs_area[theirs_rate].mean().item(), abs=0.0125)
    x = RandomErasing.apply(torch.ones(2, 3, 8, 8), torch.tensor([[1, 2, 3, 4], [5, 5, 0, 0]]))
    expected = torch.ones(2, 3, 8, 8)
    expected[0, :, 1:4, 2:6] = 0
    assert torch.equal(x, expected)
    with pytest.raises(ValueError, match="probability"):
        RandomErasing(1.5)


@pytest.mark.parametrize("mix", [None, "cutmix"])
def test_random_erasing_in_the_device_loader_is_the_same_for_any_world_size(mix):
    """Erasing after normalising (the erased pixels are exactly 0, the mean), boxes drawn for the global batch: two
    ranks' slices are the whole batch, with or without CutMix after it; p=1 erases every image."""
    split = _split(n=96, size=16)
    split.labels = torch.arange(96) % 10
    hook = CutMix(1.0, 10) if mix else None
    whole = _loader(split, batch=32, seed=1, mix=hook, erase=RandomErasing(1.0))
    ranks = [_loader(split, batch=32, seed=1, mix=hook, erase=RandomErasing(1.0), rank=r, world_size=2)
             for r in range(2)]
    plain = _loader(split, batch=32, seed=1, mix=hook)
    for step in (0, 3):
        x, y = whole.batch(step)
        parts = [r.batch(step) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        if mix is None:
            changed = (x != plain.batch(step)[0]).any(1)  # (N, H, W): where erasing changed a pixel
            assert changed.flatten(1).any(1).all() and (x.permute(0, 2, 3, 1)[changed] == 0).all()


def test_cutmix_label_weights_equal_the_pasted_area():
    n, k, h, w = 64, 64, 12, 10
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    y = torch.arange(n)
    cutmix = CutMix(1.0, k)
    areas = set()
    for step in range(40):
        out, targets = cutmix(x, y, step_generator(0, 1, step))
        assert targets.shape == (n, k) and torch.allclose(targets.sum(1), torch.ones(n))
        y0, y1, x0, x1 = cutmix.last_box
        area = (y1 - y0) * (x1 - x0) / (h * w)
        areas.add(round(area, 4))
        for i in range(n):
            pasted = (out[i, 0] != i).float().mean().item()  # pixels that came from another image
            if pasted > 0:
                j = int(out[i, 0][out[i, 0] != i][0])
                assert targets[i, j].item() == pytest.approx(pasted) and pasted == pytest.approx(area)
                assert targets[i, i].item() == pytest.approx(1 - pasted)
            else:  # paired with itself, or an empty box
                assert targets[i, i].item() == pytest.approx(1.0)
    assert len(areas) > 10, "boxes of many sizes, clipped at the borders"


def test_mixup_targets_match_the_pixels():
    n, k = 16, 16
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    out, targets = Mixup(0.4, k)(x, torch.arange(n), step_generator(0, 1, 0))
    expected = (targets * torch.arange(k, dtype=torch.float32)).sum(1)  # the mixed value implied by the weights
    assert torch.allclose(out[:, 0, 0, 0], expected, atol=1e-5)
    assert torch.allclose(targets.sum(1), torch.ones(n))


def test_mix_choice_uses_both():
    x = torch.zeros(8, 3, 4, 4)
    calls = []
    choice = MixChoice([lambda a, b, g: calls.append(0) or (a, b), lambda a, b, g: calls.append(1) or (a, b)])
    for step in range(30):
        choice(x, torch.zeros(8, dtype=torch.long), step_generator(0, 1, step))
    assert set(calls) == {0, 1}


def test_pca_lighting_matches_the_alexnet_formula():
    images = torch.rand(5, 3, 4, 4)
    g = step_generator(0, 2, 0)
    out = pca_lighting(images, g, alphastd=0.1)
    alpha = torch.randn(5, 3, generator=step_generator(0, 2, 0)) * 0.1
    for n in range(5):
        shift = torch.stack([sum(IMAGENET_EIGVEC[c, j] * alpha[n, j] * IMAGENET_EIGVAL[j] for j in range(3))
                             for c in range(3)])
        assert torch.allclose(out[n] - images[n], shift.view(3, 1, 1).expand(3, 4, 4), atol=1e-6)


def test_normalizer_fit_batches_matches_fit():
    images = _split(n=40).images
    for mode in ("pixel_mean", "channel"):
        a = Normalizer.fit(images, mode)
        b = Normalizer.fit_batches(images.split(7), mode)
        assert torch.allclose(a.mean, b.mean, atol=1e-6) and torch.allclose(a.std, b.std, atol=1e-5)
        c = Normalizer.from_state_dict(a.state_dict())
        assert torch.equal(c(images), a(images))


# ---------------------------------------------------------------------------------------------------------------
# Worker loader


def _folder(tmp_path, **kw):
    kw.setdefault("classes", ("a", "b", "c", "d"))
    kw.setdefault("n_train", 12)
    kw.setdefault("n_test", 5)
    return make_image_folder(tmp_path / "folder", **kw)


def _worker_cfg(root, tmp_path, **kw):
    kw.setdefault("val_size", 8)
    kw.setdefault("loader", "workers")
    return DataConfig(source="imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "c"), **kw)


def test_worker_loader_resumes_exactly(tmp_path):
    root = _folder(tmp_path)
    bundle = build_data(_worker_cfg(root, tmp_path, num_workers=2), batch_size=8, eval_batch_size=16, seed=5)
    assert bundle.loader == "workers" and isinstance(bundle.train, WorkerLoader)
    assert bundle.train.steps_per_epoch == 40 // 8
    straight = list(itertools.islice(bundle.train.iterate(0), 8))
    resumed = list(itertools.islice(bundle.train.iterate(5), 3))
    for (xa, ya), (xb, yb) in zip(straight[5:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(straight[0][0], straight[1][0])
    x, y = bundle.train.batch(6)  # in-process, no workers: the same batch
    assert torch.equal(x, straight[6][0]) and torch.equal(y, straight[6][1])
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_worker_loader_ddp_slices(tmp_path):
    root = _folder(tmp_path)
    cfg = _worker_cfg(root, tmp_path, num_workers=0)
    whole = build_data(cfg, batch_size=8, eval_batch_size=16, seed=2)
    ranks = [build_data(cfg, batch_size=8, eval_batch_size=16, seed=2, rank=r, world_size=2) for r in range(2)]
    for step in (0, 4, 9):
        x, y = whole.train.batch(step)
        parts = [r.train.batch(step) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    labels = [torch.cat([yb for _, yb in r.test]) for r in ranks]
    assert torch.equal(torch.cat(labels), torch.cat([yb for _, yb in whole.test]))
    assert len(torch.cat(labels)) == 20


def test_worker_and_device_eval_agree_on_the_same_folder(tmp_path):
    root = _folder(tmp_path)
    device = build_data(_worker_cfg(root, tmp_path, loader="device"), batch_size=8, eval_batch_size=16, seed=0)
    workers = build_data(_worker_cfg(root, tmp_path, num_workers=2), batch_size=8, eval_batch_size=16, seed=0)
    assert isinstance(workers.test, WorkerEvalLoader) and isinstance(device.test, EvalLoader)
    assert len(workers.dataset.val) == len(device.dataset.val) == 8
    assert torch.equal(workers.dataset.val.labels, device.dataset.val.labels), "the same validation images"
    xd = torch.cat([x for x, _ in device.test])
    xw = torch.cat([x for x, _ in workers.test])
    assert xw.shape == xd.shape
    # Normalisation statistics come from the whole train split (device) or a sample of it (workers): here all of it.
    assert torch.allclose(xw, xd, atol=1e-5)


def test_paper_imagenet_preset_through_workers(tmp_path):
    root = _folder(tmp_path, size=48)
    cfg = _worker_cfg(root, tmp_path, preset="paper_imagenet", image_size=16, num_workers=0, loader="auto",
                      randaugment_n=1, mixup_alpha=0.2)
    assert choose_loader(cfg) == "workers"
    bundle = build_data(cfg, batch_size=8, eval_batch_size=16, seed=0)
    x, y = bundle.train.batch(0)
    assert x.shape == (8, 3, 16, 16) and y.shape == (8, 4) and y.dtype == torch.float32
    assert bundle.train.lighting == pytest.approx(0.1)
    xt, yt = next(iter(bundle.test))
    assert xt.shape == (16, 3, 16, 16) and yt.dtype == torch.int64
    assert bundle.dataset.image_size == (16, 16)
    with pytest.raises(ValueError, match="no device-resident implementation"):
        build_data(_worker_cfg(root, tmp_path, preset="paper_imagenet", loader="device"), batch_size=8,
                   eval_batch_size=8, seed=0)


def test_trivialaugment_and_random_erasing_through_workers(tmp_path):
    """The worker loader runs TrivialAugment per image and erases after normalising (p=1: a zero rectangle in every
    image); the ImageNet preset takes TrivialAugment before its crop."""
    root = _folder(tmp_path, size=16)
    cfg = _worker_cfg(root, tmp_path, num_workers=0, trivialaugment=True, random_erasing=1.0)
    bundle = build_data(cfg, batch_size=8, eval_batch_size=16, seed=0)
    plain = build_data(_worker_cfg(root, tmp_path, num_workers=0), batch_size=8, eval_batch_size=16, seed=0)
    assert repr(bundle.train.dataset.transform.transforms[-1]) == "OneImage(TrivialAugmentBatch())"
    x, _ = bundle.train.batch(0)
    assert (x == 0).all(1).flatten(1).any(1).all() and not torch.equal(x, plain.train.batch(0)[0])
    imagenet = _worker_cfg(root, tmp_path, preset="paper_imagenet", image_size=8, num_workers=0, trivialaugment=True)
    names = [type(t).__name__ for t in build_data(imagenet, batch_size=8, eval_batch_size=16, seed=0)
             .train.dataset.transform.transforms]
    assert names == ["RandomResize", "OneImage", "RandomCrop", "RandomHorizontalFlip"]


def test_the_random_subset_through_workers(tmp_path):
    """The worker loader runs data.augment's operations per image after the crop and flip (noise at p=1 changes
    every image against the same run without it)."""
    root = _folder(tmp_path, size=16)
    cfg = _worker_cfg(root, tmp_path, num_workers=0, augment=["rotate:10", "noise"], augment_p=1.0)
    bundle = build_data(cfg, batch_size=8, eval_batch_size=16, seed=0)
    plain = build_data(_worker_cfg(root, tmp_path, num_workers=0), batch_size=8, eval_batch_size=16, seed=0)
    names = [type(t).__name__ for t in bundle.train.dataset.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "OneImage"]
    x, _ = bundle.train.batch(0)
    assert (x != plain.train.batch(0)[0]).flatten(1).any(1).all()
    assert torch.equal(x, build_data(cfg, batch_size=8, eval_batch_size=16, seed=0).train.batch(0)[0])


def test_worker_loader_skips_bad_files_with_a_log(tmp_path, caplog):
    root = _folder(tmp_path)
    (root / "train" / "a" / "0003.png").write_bytes(b"")
    cfg = _worker_cfg(root, tmp_path, num_workers=0, on_bad_image="skip", val_size=0, preset="none")
    bundle = build_data(cfg, batch_size=48, eval_batch_size=16, seed=0)
    with caplog.at_level("WARNING", logger="deepres.data"):
        x, y = bundle.train.batch(0)
    assert x.shape[0] == 47 and caplog.text.count("0003.png") == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="deepres.data"):  # the next epoch draws it again: left out, not renamed
        assert bundle.train.batch(1)[0].shape[0] == 47 and "0003.png" not in caplog.text
    with pytest.raises(ValueError, match="0003.png"):  # while fitting normalisation, or at the batch
        strict = build_data(_worker_cfg(root, tmp_path, num_workers=0, val_size=0, preset="none"), batch_size=48,
                            eval_batch_size=16, seed=0)
        strict.train.batch(0)


def _explode(image):
    raise KeyError("no such operation")


def test_errors_in_worker_processes_come_back_as_one_line(tmp_path):
    """A bad file met in a worker process is raised in the main process as the same BadImageError (its file, the
    switch that skips it), not a worker's traceback folded into a message; any other worker failure is one line."""
    import torch.nn as nn

    from deepres.data.folders import FileSplit
    from deepres.data.images import BadImageError
    from deepres.data.workers import FileSamples
    from deepres.evaluation.views import centre_view, evaluate_views

    root = _folder(tmp_path)
    bad = root / "train" / "a" / "0003.png"
    bad.write_bytes(b"not a png")
    paths = sorted(str(p) for p in (root / "train").rglob("*.png"))
    samples = FileSamples(FileSplit(paths, torch.zeros(len(paths), dtype=torch.int64)))
    norm = Normalizer.fit(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), "channel")
    runs = {"train": lambda: next(WorkerLoader(samples, len(paths), normalizer=norm, num_workers=1).iterate(0)),
            "eval": lambda: list(WorkerEvalLoader(samples, 16, normalizer=norm, num_workers=1)),
            "views": lambda: evaluate_views(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), samples,
                                            centre_view(8, 8), norm, workers=1)}
    for name, run in runs.items():
        with pytest.raises(BadImageError) as info:
            run()
        assert info.value.path == str(bad) and "\n" not in str(info.value), name
    good = FileSamples(FileSplit([p for p in paths if p != str(bad)][:8], torch.zeros(8, dtype=torch.int64)))
    with pytest.raises(RuntimeError, match=r"^a data loading worker failed: KeyError: 'no such operation'$"):
        next(WorkerLoader(good, 8, normalizer=norm, transform=_explode, num_workers=1).iterate(0))


# ---------------------------------------------------------------------------------------------------------------
# build_data


def test_build_data_auto_picks_device_for_small_folders(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    cfg = _worker_cfg(root, tmp_path, loader="auto", cutmix_alpha=1.0, randaugment_n=2)
    bundle = build_data(cfg, batch_size=8, eval_batch_size=16, seed=0)
    assert bundle.loader == "device" and isinstance(bundle.train, DeviceLoader)
    x, y = bundle.train.batch(0)
    assert x.shape == (8, 3, 8, 8) and y.shape == (8, 4) and torch.allclose(y.sum(1), torch.ones(8))
    assert torch.equal(bundle.train.batch(3)[0], bundle.train.batch(3)[0])
    monkeypatch.setattr(pipeline, "DEVICE_LIMIT_BYTES", 100)  # pretend the folder is larger than memory
    fresh = _worker_cfg(root, tmp_path / "other", loader="auto")
    assert choose_loader(fresh) == "workers"
    assert build_data(fresh, batch_size=8, eval_batch_size=16, seed=0).loader == "workers"


def test_build_data_in_memory_source_with_workers(tmp_path):
    from deepres.data import Dataset

    split = _split(n=40, size=8, classes=4)
    dataset = Dataset("toy", ["a", "b", "c", "d"], split, _split(n=12, size=8, classes=4, seed=1))
    cfg = DataConfig(loader="workers", num_workers=0)
    bundle = build_data(cfg, batch_size=8, eval_batch_size=16, seed=0, dataset=dataset)
    x, y = bundle.train.batch(0)
    assert x.shape == (8, 3, 8, 8) and bundle.loader == "workers"
    assert sum(len(yb) for _, yb in bundle.test) == 12
    device = build_data(DataConfig(loader="device"), batch_size=8, eval_batch_size=16, seed=0, dataset=dataset)
    assert torch.equal(device.normalizer.mean, bundle.normalizer.mean)


# ---------------------------------------------------------------------------------------------------------------
# Whole-epoch gather (data.gather=epoch)


def _crop_of(out: torch.Tensor, padded: torch.Tensor, size: int) -> tuple[int, int, bool] | None:
    """The (row, column, flipped) of the crop of ``padded`` that equals ``out``, or None."""
    span = padded.shape[-1] - size + 1
    for dy in range(span):
        for dx in range(span):
            crop = padded[:, dy:dy + size, dx:dx + size]
            if torch.equal(crop, out):
                return dy, dx, False
            if torch.equal(crop.flip(-1), out):
                return dy, dx, True
    return None


def test_epoch_gather_gives_each_image_once_per_epoch_as_a_pad4_crop_or_its_flip():
    """Section 4.2's augmentation, drawn for the whole epoch at once: every image once, a pad-4 crop of itself,
    flipped about half the time, normalised as every batch is."""
    torch.manual_seed(0)
    n, size = 64, 8
    images = torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8)  # no zeros: padding is recognisable
    identity = Normalizer(torch.zeros(3, 1, 1), torch.full((3, 1, 1), 1 / 255))  # x -> x (as floats)
    loader = DeviceLoader(Split(images, torch.arange(n)), 16, normalizer=identity, seed=3, gather="epoch")
    seen, offsets, flips = [], set(), 0
    for step in range(loader.steps_per_epoch):
        x, y = loader.batch(step)
        assert x.shape == (16, 3, size, size) and x.dtype == torch.float32
        for img, label in zip(x, y):
            where = _crop_of(img.round(), torch.nn.functional.pad(images[label].float(), (4,) * 4), size)
            assert where is not None, f"image {int(label)} is not a pad-4 crop (or its flip) of itself"
            offsets.add(where[:2])
            flips += where[2]
            seen.append(int(label))
    assert sorted(seen) == list(range(n)) and seen != list(range(n))  # each image once, shuffled
    assert len(offsets) > 20 and 16 <= flips <= 48  # 81 offsets possible; flips ~ Binomial(64, 0.5)
    assert not torch.equal(torch.cat([loader.batch(s)[0] for s in range(4)]),
                           torch.cat([loader.batch(s)[0] for s in range(4, 8)]))  # the next epoch draws anew


@pytest.mark.parametrize("gather", ["epoch", "batch"])
def test_batches_are_a_function_of_seed_epoch_and_step(gather):
    """Any order of access, a fresh loader (a resumed run) or another loader give the same batches; both modes share
    each epoch's order."""
    split = _split(n=80)
    split.labels = torch.arange(80)
    a, b = _loader(split, seed=5, gather=gather), _loader(split, seed=5, gather=gather)
    steps = [9, 0, 4, 5, 9, 1]  # 5 steps per epoch: crosses epochs both ways
    first = {s: a.batch(s) for s in steps}
    for s in reversed(steps):
        x, y = b.batch(s)
        assert torch.equal(x, first[s][0]) and torch.equal(y, first[s][1])
    resumed = list(itertools.islice(_loader(split, seed=5, gather=gather).iterate(7), 3))
    for k, (x, y) in enumerate(resumed):
        assert torch.equal(x, a.batch(7 + k)[0]) and torch.equal(y, a.batch(7 + k)[1])
    other = _loader(split, seed=5, gather="batch" if gather == "epoch" else "epoch")
    assert all(torch.equal(other.batch(s)[1], a.batch(s)[1]) for s in range(10))  # the same order
    assert not torch.equal(other.batch(0)[0], a.batch(0)[0])  # crops drawn per epoch vs per step


def test_epoch_gather_ddp_ranks_are_disjoint_and_complete():
    split = _split(n=96)
    whole = _loader(split, batch=32, seed=1, gather="epoch")
    ranks = [_loader(split, batch=32, seed=1, rank=r, world_size=2, gather="epoch") for r in range(2)]
    for step in (0, 2, 4):
        x, y = whole.batch(step)
        parts = [r.batch(step) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
