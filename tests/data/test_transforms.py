"""uint8 images to normalised tensors: the one conversion training and inference share."""

from __future__ import annotations

import numpy as np
import torch

from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise, to_tensor


def test_to_tensor_is_channels_first_and_accepts_read_only_arrays():
    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    arr.flags.writeable = False
    t = to_tensor(arr)
    assert t.shape == (3, 4, 5) and t.dtype == torch.uint8
    assert t[2, 1, 3] == arr[1, 3, 2]


def test_normalise_matches_the_textbook_formula_for_one_image_and_a_batch():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    assert torch.allclose(normalise(x), expected, atol=1e-5)
    assert torch.allclose(normalise(x[0]), expected[0], atol=1e-5)
    own = normalise(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # a bundle's own statistics
    assert torch.allclose(own, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)
