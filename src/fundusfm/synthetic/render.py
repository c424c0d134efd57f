"""Draw one procedural fundus photograph with its vessel, field-of-view and lesion masks.

Anatomy is laid out in a right-eye frame in units of the field-of-view radius (origin at the
FOV centre, x to the right, y down), then mirrored for left eyes, rotated slightly and scaled
to pixels. Layers are drawn with Pillow (fast C line and ellipse drawing) and composited in
NumPy. Sizes of lesions and vessels are given in pixels at 256 px and scale with the image.
`generate.py` decides which diseases an eye has; `lesions.py` draws their lesions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from fundusfm.config.core import CameraConfig
from fundusfm.synthetic.canvas import Canvas
from fundusfm.synthetic.lesions import LOOK, draw_lesions


@dataclass
class EyeCase:
    """What to draw: the eye, its diseases with severities in (0, 1], the patient's looks."""

    eye: str
    diseases: dict[str, float]
    pigment: float
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dr_grade: int = 0


@dataclass
class Rendered:
    image: np.ndarray  # HxWx3 uint8
    vessels: np.ndarray  # HxW bool
    fov: np.ndarray  # HxW bool
    lesions: dict[str, np.ndarray] = field(default_factory=dict)  # type -> HxW bool


def _grow_vessels(rng: np.random.Generator, disc: tuple[float, float], fovea: tuple[float, float]):
    """Branching arcades from the disc: segments (u0, v0, u1, v1, width_px256, kind, trunk).

    Trunks 0 and 1 are the temporal arcades that bend around the macula, 2 and 3 the nasal
    vessels. Widths taper along each branch and at every bifurcation.
    """
    du, dv = disc
    trunks = []  # (heading, curvature, kind, trunk id, width)
    for t_id, (heading, curv) in enumerate(
        [(-2.0, -0.028), (2.0, 0.028), (-0.9, 0.0), (0.9, 0.0)]  # ST, IT, SN, IN
    ):
        main = 1.0 if t_id < 2 else 0.7
        trunks.append((heading + rng.normal(0, 0.1), curv, "vein", t_id, 3.6 * main))
        trunks.append((heading + rng.normal(0, 0.1) + 0.15, curv, "artery", t_id, 2.8 * main))
    # breadth first, so that the segment cap trims the finest branches, never a trunk
    stack = deque((du, dv, h, c, kind, t, w, 0) for h, c, kind, t, w in trunks)
    segs: list[tuple] = []
    step = 0.03
    while stack and len(segs) < 1500:
        u, v, h, c, kind, trunk, w, depth = stack.popleft()
        for _ in range(60):
            h += c + rng.normal(0, 0.06)
            c *= 0.97
            nu, nv = u + step * math.cos(h), v + step * math.sin(h)
            if nu * nu + nv * nv > 0.97 or math.hypot(nu - fovea[0], nv - fovea[1]) < 0.08:
                break
            segs.append((u, v, nu, nv, w, kind, trunk))
            u, v = nu, nv
            w *= 0.99
            if w > 0.9 and depth < 6 and rng.random() < 0.11:
                side = rng.choice([-1.0, 1.0])
                stack.append(
                    (
                        u,
                        v,
                        h + side * rng.uniform(0.5, 1.1),
                        rng.normal(0, 0.015),
                        kind,
                        trunk,
                        w * rng.uniform(0.55, 0.75),
                        depth + 1,
                    )
                )
                w *= 0.93
            if w < 0.55:
                break
    return segs


def _draw_vessels(cv: Canvas, segs, occluded: set[int]) -> None:
    """Draw vessel segments as polylines, one call per run of equal width on a branch."""
    seg = np.array([sg[:5] for sg in segs], dtype=np.float64)
    scale = np.array(
        [1.4 if kind == "vein" and trunk in occluded else 1.0 for *_, kind, trunk in segs]
    )
    wp = seg[:, 4] * cv.k * scale
    width = np.maximum(1, np.round(wp)).astype(int)
    fill = (255 * np.minimum(1, wp)).astype(int)
    u = np.concatenate([seg[:, 0], seg[:, 2]]) * cv.mirror
    v = np.concatenate([seg[:, 1], seg[:, 3]])
    x = cv.cx + (u * cv.cos - v * cv.sin) * cv.radius
    y = cv.cy + (u * cv.sin + v * cv.cos) * cv.radius
    n = len(segs)
    start = np.stack([x[:n], y[:n]], 1).tolist()
    end = np.stack([x[n:], y[n:]], 1).tolist()
    run: list = []
    for i in range(n):
        run.append(tuple(start[i]))
        last = i == n - 1 or (
            segs[i + 1][0] != segs[i][2]
            or segs[i + 1][1] != segs[i][3]
            or width[i + 1] != width[i]
            or fill[i + 1] != fill[i]
            or segs[i + 1][5] != segs[i][5]
        )
        if last:
            run.append(tuple(end[i]))
            cv.layer(segs[i][5]).line(run, fill=int(fill[i]), width=int(width[i]), joint="curve")
            run = []


def _shading(cv: Canvas, fovea, camera: CameraConfig, rng: np.random.Generator) -> np.ndarray:
    """Smooth brightness field: choroidal texture, illumination gradient, vignetting, macula.

    Everything here varies slowly, so it is computed on a coarse grid and upsampled.
    """
    g = min(cv.size, 96)
    step = cv.size / g
    coords = (np.arange(g, dtype=np.float32) + 0.5) * step - 0.5
    dx = (coords[None, :] - cv.cx) / cv.radius
    dy = (coords[:, None] - cv.cy) / cv.radius
    rr = np.sqrt(dx * dx + dy * dy)
    low = rng.normal(0, 1, (6, 6)).astype(np.float32)
    low = np.asarray(Image.fromarray(low, "F").resize((g, g), Image.BICUBIC))
    g_dir = rng.uniform(0, 2 * np.pi)
    grad = dx * math.cos(g_dir) + dy * math.sin(g_dir)
    shade = (1 + 0.05 * low + rng.uniform(0.0, 0.12) * grad) * (1 - camera.vignetting * rr**2.5)
    fx, fy = cv.px(*fovea)
    d2 = ((coords[None, :] - fx) ** 2 + (coords[:, None] - fy) ** 2) / cv.radius**2
    shade *= 1 - 0.3 * np.exp(-d2 / (2 * 0.12**2)) - 0.12 * np.exp(-d2 / (2 * 0.025**2))
    shade = shade.astype(np.float32)
    if g == cv.size:
        return shade
    return np.asarray(Image.fromarray(shade, "F").resize((cv.size, cv.size), Image.BICUBIC))


def _tessellation(cv: Canvas, img, rr, fovea, disc, rd, s: float, rng, lesions: dict) -> None:
    """Myopia: choroidal vessels seen through a thin pigment epithelium, and (when marked)
    peripapillary atrophy, a pale crescent on the temporal side of the disc."""
    f32 = np.float32
    for _ in range(40):
        a, r0 = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.3)
        pts = []
        for j in range(12):
            a += rng.normal(0, 0.12)
            pts.append(
                cv.px(
                    fovea[0] + (r0 + j * 0.08) * math.cos(a),
                    fovea[1] + (r0 + j * 0.08) * math.sin(a),
                )
            )
        cv.layer("tess").line(pts, fill=255, width=int(rng.uniform(5, 10) * cv.k))
    gaps = 1 - cv.array("tess", blur=2.0)
    img *= (1 - f32(0.18 + 0.35 * s) * gaps * np.clip(1.2 - rr, 0, 1))[..., None]
    lesions["tessellation"] = (gaps > 0.6) & (rr < 0.95)
    if s > 0.25:
        w = 0.5 + 0.9 * s
        cv.ellipse("ppa", disc[0] - rd * w * 0.6, disc[1], rd * (1 + w * 0.55), rd * 1.2)
        cv.blend(img, "ppa", (0.95, 0.84, 0.68), 0.85, blur=0.8)


def _disc_and_cup(cv: Canvas, img, d: dict, disc, rd: float, rng, lesions: dict) -> None:
    """The optic disc (tilted in myopia) and its cup (enlarged in glaucoma)."""
    tilt = 0.8 if "myopia" in d else 1.0
    cv.ellipse("disc", disc[0], disc[1], rd * tilt, rd * 1.1)
    cdr = 0.6 + 0.32 * d["glaucoma"] if "glaucoma" in d else rng.uniform(0.2, 0.5)
    cv.ellipse(
        "cup", disc[0], disc[1], rd * tilt * cdr, rd * 1.1 * cdr * (1.08 if cdr > 0.6 else 1)
    )
    cv.blend(img, "disc", (0.93, 0.62, 0.40), 0.85, blur=1.2)
    cv.blend(img, "cup", (1.0, 0.93, 0.80), 0.85, blur=0.8)
    if "ppa" in cv.layers:
        lesions["peripapillary_atrophy"] = cv.mask("ppa") & ~cv.mask("disc")
    if "glaucoma" in d:
        lesions["enlarged_cup"] = cv.mask("cup")


def _look_alikes(cv: Canvas, img, segs, rng) -> None:
    """Harmless look-alikes that healthy eyes have too: camera dust, nerve-fibre sheen."""
    if rng.random() < 0.2:
        for _ in range(int(rng.integers(1, 4))):
            cv.dot("dust", rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(1.5, 3))
        cv.blend(img, "dust", (0.0, 0.0, 0.0), 0.25, 1.0)
    if rng.random() < 0.3:
        for sg in segs[:200:3]:
            cv.dot("sheen", sg[0], sg[1], 2.5, fill=60)
        cv.blend(img, "sheen", (0.9, 0.9, 0.9), 0.25, 2.0)


def _camera(img, fov_soft, k: float, camera: CameraConfig, case: EyeCase, rng) -> np.ndarray:
    """Tint, gamma, exposure, blur, noise; black outside the field of view (uint8 image)."""
    f32 = np.float32
    tint = np.array(camera.tint, f32) * np.array(case.tint, f32) * f32(rng.uniform(0.85, 1.1))
    gamma = math.exp(rng.normal(0, camera.gamma_jitter))
    lut = np.round(255 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    img *= (tint * 255)[None, None, :]
    img *= fov_soft[..., None]
    out = Image.fromarray(lut[np.clip(img + 0.5, 0, 255).astype(np.uint8)], "RGB")
    blur = rng.uniform(0, camera.blur_max) * k
    if blur > 0.2:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(out, dtype=f32)
    sigma = f32(rng.uniform(0.003, max(camera.noise_max, 0.003)) * 255)
    noise = rng.standard_normal(arr.shape, dtype=f32) * sigma
    return np.clip(arr + noise * fov_soft[..., None] + 0.5, 0, 255).astype(np.uint8)


def render_eye(
    size: int, case: EyeCase, camera: CameraConfig, rng: np.random.Generator
) -> Rendered:
    """Draw one eye: background, disc and cup, macula, vessels, lesions, then the camera."""
    cv = Canvas(size, case.eye, rng)
    d = case.diseases
    f32 = np.float32
    yy, xx = np.ogrid[0:size, 0:size]
    dx, dy = (xx - cv.cx).astype(f32), (yy - cv.cy).astype(f32)
    rr = np.sqrt(dx * dx + dy * dy) / f32(cv.radius)
    fov_soft = np.clip((1.0 - rr) * f32(cv.radius / 1.5), 0, 1)
    light = np.array([0.86, 0.46, 0.22], f32)
    dark = np.array([0.52, 0.22, 0.10], f32)
    base = light + (dark - light) * f32(case.pigment)
    disc = (rng.normal(0.46, 0.02), rng.normal(-0.03, 0.02))
    fovea = (disc[0] - rng.normal(0.50, 0.02), disc[1] + rng.normal(0.05, 0.015))
    img = base[None, None, :] * _shading(cv, fovea, camera, rng)[..., None]

    rd = rng.normal(0.115, 0.008)
    lesions: dict[str, np.ndarray] = {}
    if "myopia" in d:
        _tessellation(cv, img, rr, fovea, disc, rd, d["myopia"], rng, lesions)
    _disc_and_cup(cv, img, d, disc, rd, rng, lesions)

    # Vessels; a vein occlusion widens and darkens the veins of the occluded trunks.
    segs = _grow_vessels(rng, disc, fovea)
    occluded: set[int] = set()
    if "rvo" in d:
        occluded = set(range(4)) if d["rvo"] > 0.7 else {int(rng.integers(0, 2))}
    _draw_vessels(cv, segs, occluded)
    vessels = cv.mask("vein") | cv.mask("artery")
    cv.blend(img, "vein", (0.38, 0.06, 0.05) if occluded else (0.42, 0.08, 0.06), 0.8, 0.45)
    cv.blend(img, "artery", (0.62, 0.16, 0.10), 0.65, 0.45)

    draw_lesions(cv, d, segs, occluded, disc, fovea, rd, rng)
    _look_alikes(cv, img, segs, rng)
    for name, (colour, alpha, blur) in LOOK.items():
        if name in cv.layers:
            lesions[name] = cv.mask(name)
            cv.blend(img, name, colour, alpha, blur)

    image = _camera(img, fov_soft, cv.k, camera, case, rng)
    fov = rr <= 1.0
    masks = {k: v & fov for k, v in lesions.items()}
    return Rendered(
        image=image,
        vessels=vessels & fov,
        fov=fov,
        lesions={k: v for k, v in masks.items() if v.any()},
    )
