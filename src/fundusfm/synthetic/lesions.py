"""Lesions that stand for diseases, drawn into their own layers so each keeps its own mask.

Diabetic retinopathy (microaneurysms; haemorrhages and hard exudates from grade 2; cotton-wool
spots from grade 3; new vessels on the disc at grade 4), drusen for AMD, and flame
haemorrhages along occluded veins for RVO. Glaucoma (enlarged cup) and myopia (tessellation,
peripapillary atrophy) change the anatomy and are drawn in `render.py`. Sizes are pixels at
256 px; positions are in the right-eye frame of the canvas.
"""

from __future__ import annotations

import math

from fundusfm.synthetic.canvas import Canvas

LESION_TYPES = (
    "microaneurysm",
    "haemorrhage",
    "hard_exudate",
    "cotton_wool_spot",
    "neovascularisation",
    "drusen",
    "enlarged_cup",
    "tessellation",
    "peripapillary_atrophy",
    "vein_occlusion",
)


def dr_grade(severity: float) -> int:
    """DR grade 1-4 from severity: mild (microaneurysms only) to proliferative."""
    return 1 if severity < 0.3 else 2 if severity < 0.6 else 3 if severity < 0.85 else 4


# Lesion colour (RGB 0-1), opacity and blur (px at 256 px) when painted into the image.
LOOK = {
    "microaneurysm": ((0.42, 0.03, 0.03), 0.9, 0.3),
    "haemorrhage": ((0.40, 0.04, 0.03), 0.85, 0.6),
    "vein_occlusion": ((0.40, 0.04, 0.03), 0.9, 0.5),
    "hard_exudate": ((1.0, 0.92, 0.45), 0.85, 0.4),
    "cotton_wool_spot": ((0.95, 0.92, 0.85), 0.6, 2.0),
    "neovascularisation": ((0.70, 0.12, 0.10), 0.8, 0.3),
    "drusen": ((0.96, 0.86, 0.52), 0.7, 0.8),
}


def draw_lesions(cv: Canvas, d: dict[str, float], segs, occluded, disc, fovea, rd, rng):
    """Draw the lesions of each disease into their own layers (painted later, masks kept)."""

    def posterior(spread=0.3):
        while True:
            u, v = fovea[0] + rng.normal(0, spread), fovea[1] + rng.normal(0, spread * 0.8)
            if u * u + v * v < 0.8 and math.hypot(u - disc[0], v - disc[1]) > rd * 1.3:
                return u, v

    def clusters(name, n, per_cluster, spread, jitter, radius):
        """`n` clusters of lesions round posterior-pole centres (dot-blot, exudate rings)."""
        for _ in range(n):
            cu, cw = posterior(spread)
            for _ in range(int(rng.integers(*per_cluster))):
                u, v = cu + rng.normal(0, jitter), cw + rng.normal(0, jitter)
                cv.dot(name, u, v, rng.uniform(*radius))

    if "dr" in d:
        s = d["dr"]
        grade = dr_grade(s)
        for _ in range(1 + int(s * 25) if grade > 1 else int(rng.integers(1, 6))):
            cv.dot("microaneurysm", *posterior(), rng.uniform(0.6, 1.3))
        if grade >= 2:
            clusters("haemorrhage", 2 + int(s * 12), (1, 4), 0.35, 0.01, (1.5, 4.5))
            clusters("hard_exudate", 1 + int(s * 4), (3, 14), 0.2, 0.04, (0.7, 2.2))
        if grade >= 3:
            for _ in range(1 + int(s * 4)):
                cv.dot("cotton_wool_spot", *posterior(0.3), rng.uniform(3, 6))
        if grade == 4:  # new vessels on the disc: fine tangles
            for _ in range(int(rng.integers(2, 5))):
                u, v = disc[0] + rng.normal(0, rd), disc[1] + rng.normal(0, rd)
                pts = [cv.px(u + rng.normal(0, 0.03), v + rng.normal(0, 0.03)) for _ in range(8)]
                cv.layer("neovascularisation").line(pts, fill=255, width=max(1, round(cv.k)))
    if "amd" in d:
        s = d["amd"]
        for _ in range(3 + int(s * 40)):
            cv.dot(
                "drusen",
                fovea[0] + rng.normal(0, 0.1),
                fovea[1] + rng.normal(0, 0.08),
                rng.uniform(0.8, 1.5 + 2.0 * s),
            )
    if "rvo" in d:  # flame haemorrhages along the occluded veins, some cotton-wool spots
        s = d["rvo"]
        veins = [sg for sg in segs if sg[5] == "vein" and sg[6] in occluded]
        for idx in rng.choice(len(veins), size=min(len(veins), 8 + int(s * 45)), replace=False):
            u0, v0, u1, v1, *_ = veins[idx]
            ang = math.atan2(v1 - v0, u1 - u0)
            cv.ellipse(
                "vein_occlusion",
                u0 + rng.normal(0, 0.02),
                v0 + rng.normal(0, 0.02),
                rng.uniform(0.015, 0.035),
                rng.uniform(0.005, 0.01),
                angle=ang,
            )
        for _ in range(int(s * 4)):
            u0, v0, *_ = veins[int(rng.integers(len(veins)))]
            cv.dot("cotton_wool_spot", u0, v0, rng.uniform(2.5, 5))
