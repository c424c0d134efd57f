"""Duplicate grouping: copies of one image end with one patient id, unrelated images do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from fundusfm.config.core import SynthConfig
from fundusfm.data.dedup import distances, group_patients, phash
from fundusfm.synthetic.generate import sample_patient
from fundusfm.synthetic.render import render_eye


def eye(seed: int) -> np.ndarray:
    cfg = SynthConfig(size=128, seed=seed)
    return render_eye(128, sample_patient(cfg, 0)[0], cfg.camera, np.random.default_rng(seed)).image


def test_resized_flipped_and_recoloured_copies_join_their_source_patient(tmp_path: Path):
    source = Image.fromarray(eye(0))
    files = {
        "a": source,
        "a_copy_bytes": source,  # saved again below: byte-identical
        "a_small_flipped": source.resize((96, 96)).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "a_brighter": ImageEnhance.Brightness(source).enhance(1.15),
        "b": Image.fromarray(eye(1)),
        "c": Image.fromarray(eye(2)),
    }
    paths = []
    for name, img in files.items():
        paths.append(tmp_path / f"{name}.png")
        img.save(paths[-1])
    ids = list(files)
    patients = ["p1", "p2", "p3", "p4", "p5", "p6"]
    joined, report = group_patients(paths, ids, patients, progress=False)
    assert joined[:4] == ["p1"] * 4  # every copy takes the first member's patient id
    assert joined[4:] == ["p5", "p6"]  # unrelated eyes stay apart
    assert report.exact_pairs == 1 and report.near_pairs >= 2
    assert report.groups_joined == 1 and report.images_in_joined_groups == 4


def test_the_hash_distance_is_flip_invariant_and_separates_other_eyes():
    a, b = eye(3), eye(4)
    ha, hflip, hb = phash(a), phash(a[:, ::-1].copy()), phash(b)
    d = distances(np.stack([ha]), np.stack([hflip, hb]))[0]
    assert d[0] <= 6 < d[1]
