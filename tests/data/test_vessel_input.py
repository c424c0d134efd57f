"""The vessel U-Net's input forms and its camera-shift augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.exposure import equalize_adapthist

from fundusfm.config.segment import SegAugmentConfig
from fundusfm.data.vessel_images import VesselImage, VesselTrainSet
from fundusfm.data.vessel_input import CLAHE_CLIP, CameraShift, to_input

OFF = {
    "flip": False,
    "rotate": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "gamma": 0.0,
    "colour_gain": 0.0,
    "blur_sigma": 0.0,
    "blur_p": 0.0,
    "noise": 0.0,
}
SHIFTS = {  # one setting on at a time (blur needs its probability as well)
    "brightness": {"brightness": 0.3},
    "contrast": {"contrast": 0.3},
    "gamma": {"gamma": 0.5},
    "colour_gain": {"colour_gain": 0.2},
    "blur": {"blur_sigma": 1.5, "blur_p": 1.0},
    "noise": {"noise": 0.05},
}


def photo(seed: int = 0, size: int = 48) -> np.ndarray:
    """A fundus-like RGB image with texture, so every shift has something to change."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = 90 + 60 * np.sin(yy / 4) * np.cos(xx / 5)
    rgb = np.stack([base + 40, base, base - 40], axis=2) + rng.normal(0, 8, (size, size, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def test_every_camera_shift_at_zero_is_the_identity():
    image = tensor(photo())
    assert torch.equal(CameraShift(SegAugmentConfig(**OFF))(image), image)
    sharp = SegAugmentConfig(**{**OFF, "blur_sigma": 2.0})  # a sigma, but probability 0
    assert torch.equal(CameraShift(sharp)(image), image)


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_each_camera_shift_changes_the_image(name: str):
    image = tensor(photo())
    shift = CameraShift(SegAugmentConfig(**{**OFF, **SHIFTS[name]}))
    torch.manual_seed(3)
    out = shift(image)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert (out.int() - image.int()).abs().float().mean() > 0.1, name


def test_colour_gain_changes_the_channels_differently():
    image = tensor(np.full((16, 16, 3), 128, np.uint8))
    torch.manual_seed(0)
    out = CameraShift(SegAugmentConfig(**{**OFF, "colour_gain": 0.3}))(image)
    means = out.float().mean(dim=(1, 2))
    assert len(set(means.tolist())) == 3


def test_green_and_clahe_put_one_channel_on_all_three():
    rgb = photo(1)
    image = tensor(rgb)
    assert torch.equal(to_input(image, "rgb"), image)
    green = to_input(image, "green")
    assert all(torch.equal(green[c], image[1]) for c in range(3))
    clahe = to_input(image[None], "clahe")[0]  # a batch too
    expected = np.round(equalize_adapthist(rgb[:, :, 1], clip_limit=CLAHE_CLIP) * 255)
    assert all(np.array_equal(clahe[c].numpy(), expected.astype(np.uint8)) for c in range(3))
    assert not torch.equal(clahe[0], green[0])


def aligned_sample(size: int = 64) -> VesselImage:
    """An image whose red channel is the vessel mask (255 inside, 30 outside)."""
    rng = np.random.default_rng(5)
    vessel = rng.random((size, size)) < 0.3
    vessel[:, : size // 3] = False  # asymmetric, so that a flip of one alone would show
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[..., 0] = np.where(vessel, 255, 30)
    rgb[..., 1] = rng.integers(0, 255, (size, size))
    fov = np.ones((size, size), bool)
    return VesselImage("a", rgb, vessel, fov, (size, size))


@pytest.mark.parametrize("camera", ["off", "on"])
def test_geometric_augmentation_keeps_image_and_masks_aligned(camera: str):
    sample = aligned_sample()
    shifts = {"brightness": 0.2, "contrast": 0.2, "gamma": 0.3, "colour_gain": 0.1, "noise": 0.02}
    aug = SegAugmentConfig(
        **{**OFF, "flip": True, "rotate": 30.0, **(shifts if camera == "on" else {})}
    )
    train = VesselTrainSet([sample], aug, patch=32, patches_per_image=12, seed=1)
    moved = 0
    for i in range(len(train)):
        image, vessel, fov = train[i]
        inside = fov.bool()  # rotation corners are outside the FOV in image and masks alike
        red = image[0].float()
        cut = (red[inside & vessel.bool()].mean() + red[inside & ~vessel.bool()].mean()) / 2
        assert torch.equal((red > cut)[inside], vessel.bool()[inside]), i
        moved += not torch.equal(vessel.bool(), torch.from_numpy(sample.vessel[:32, :32]))
    assert moved >= 6  # the transforms did move things


def test_the_training_set_feeds_the_input_form():
    sample = aligned_sample()
    train = VesselTrainSet([sample], SegAugmentConfig(**OFF), seed=0, input="green")
    image, vessel, _ = train[0]
    assert all(torch.equal(image[c], torch.from_numpy(sample.image[..., 1])) for c in range(3))
    assert torch.equal(vessel.bool(), torch.from_numpy(sample.vessel))
