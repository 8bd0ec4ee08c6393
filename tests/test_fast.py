"""The fast path's epoch augmenter: every training image once per epoch, each a pad-4 crop of itself, flipped about
half the time, normalised as the loop normalises (deepres.engine.fast, paper section 4.2)."""

import torch
import torch.nn.functional as F

from deepres.data import Normalizer
from deepres.engine.fast import EpochAugmenter


def _match(out: torch.Tensor, padded: torch.Tensor, size: int) -> tuple[int, int, bool] | None:
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


def test_epoch_is_a_permutation_of_padded_crops_and_flips():
    torch.manual_seed(0)
    n, size = 64, 8
    images = torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8)  # no zeros: padding is recognisable
    labels = torch.arange(n)
    identity = Normalizer(torch.zeros(3, 1, 1), torch.full((3, 1, 1), 1 / 255))  # x -> x (as floats)
    aug = EpochAugmenter(images, labels, identity, batch_size=16, device=torch.device("cpu"), seed=3)

    seen, offsets, flips = [], set(), 0
    for step in range(aug.steps_per_epoch):
        x, y = aug.batch(step)
        assert x.shape == (16, 3, size, size) and x.dtype == torch.float32
        for img, label in zip(x, y):
            padded = F.pad(images[label].float(), (4, 4, 4, 4))
            where = _match(img.round(), padded, size)
            assert where is not None, f"image {int(label)} is not a pad-4 crop (or its flip) of itself"
            offsets.add(where[:2])
            flips += where[2]
            seen.append(int(label))
    assert sorted(seen) == list(range(n))  # each image once per epoch, labels follow their images
    assert seen != list(range(n))  # shuffled
    assert len(offsets) > 20 and 16 <= flips <= 48  # 81 offsets possible; flips ~ Binomial(64, 0.5)

    # The next epoch draws anew; without augmentation the images are only shuffled and normalised.
    first = torch.cat([aug.batch(s)[0] for s in range(4)])
    second = torch.cat([aug.batch(s)[0] for s in range(4, 8)])
    assert not torch.equal(first, second)
    mean = torch.rand(3, size, size)
    plain = EpochAugmenter(images, labels, Normalizer(mean, torch.ones(3, 1, 1)), 16, torch.device("cpu"), seed=3,
                           augment=False)
    x, y = plain.batch(0)
    torch.testing.assert_close(x, images[y].float() / 255 - mean)
