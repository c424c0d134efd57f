"""One rendered eye: deterministic for a seed, masks inside the FOV, lesions where drawn."""

from __future__ import annotations

import numpy as np

from fundusfm.config.core import SynthConfig
from fundusfm.synthetic.render import EyeCase, render_eye


def case(**diseases) -> EyeCase:
    return EyeCase(eye="right", diseases=diseases, pigment=0.4, tint=(1.0, 1.0, 1.0))


def test_same_seed_same_eye_and_masks_stay_inside_the_field_of_view():
    camera = SynthConfig().camera
    a = render_eye(96, case(), camera, np.random.default_rng(5))
    b = render_eye(96, case(), camera, np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.vessels, b.vessels)
    assert a.image.shape == (96, 96, 3) and a.image.dtype == np.uint8
    assert not (a.vessels & ~a.fov).any()
    assert a.image[:8, :8].max() == 0 and a.image[~a.fov].mean() < 2  # black outside the FOV
    assert 0.01 < a.vessels[a.fov].mean() < 0.4


def test_diseases_draw_their_lesions_and_a_healthy_eye_has_none_of_them():
    camera = SynthConfig().camera
    healthy = render_eye(128, case(), camera, np.random.default_rng(1))
    sick = render_eye(128, case(myopia=0.8, glaucoma=0.8), camera, np.random.default_rng(1))
    assert {"tessellation", "enlarged_cup", "peripapillary_atrophy"} <= set(sick.lesions)
    assert not {"tessellation", "enlarged_cup"} & set(healthy.lesions)
    for mask in sick.lesions.values():
        assert mask.any() and not (mask & ~sick.fov).any()
