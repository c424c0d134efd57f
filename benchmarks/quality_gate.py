"""How often does the quality gate reject real photographs, and does it catch degraded ones?

Runs the default QualityConfig over the real images under DATA_ROOT (DRIVE, CHASE_DB1 and
the 4-class eye-disease set, as laid out in the team's shared data folder) and over
degraded copies of them (Gaussian blur of 1% of the image side, x0.1 exposure, x3+60
over-exposure), and prints the share judged ungradable per set and per reason.

    python benchmarks/quality_gate.py ../shared/data [--sample 400]
"""

from __future__ import annotations

import argparse
import collections
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from fundusfm.config.screen import QualityConfig
from fundusfm.data.decode import SUPPORTED_SUFFIXES, read_rgb
from fundusfm.screen.quality import assess

DEGRADE = {
    "as is": lambda rgb: rgb,
    "blur": lambda rgb: np.asarray(
        Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(max(rgb.shape[:2]) / 100))
    ),
    "dark": lambda rgb: (rgb * 0.1).astype(np.uint8),
    "bright": lambda rgb: np.clip(rgb.astype(int) * 3 + 60, 0, 255).astype(np.uint8),
}


def images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--sample", type=int, default=400, help="eye-disease images drawn")
    args = parser.parse_args()
    sets = {
        "DRIVE": [p for p in images(args.root / "DRIVE") if "/images/" in p.as_posix()],
        "CHASE_DB1": [p for p in images(args.root / "CHASE_DB1") if "/images/" in p.as_posix()],
    }
    eye = images(args.root / "eye_diseases_classification")
    for path in random.Random(0).sample(eye, min(args.sample, len(eye))):
        sets.setdefault(f"eye_diseases/{path.parent.name}", []).append(path)
    cfg = QualityConfig()
    print(f"{'set':<36}{'images':>7}  " + "  ".join(f"{k:>8}" for k in DEGRADE))
    reasons: collections.Counter = collections.Counter()
    for name, files in sets.items():
        rejected = dict.fromkeys(DEGRADE, 0)
        for path in files:
            rgb = read_rgb(path)
            for kind, fn in DEGRADE.items():
                q = assess(fn(rgb), cfg)
                if not q.gradable:
                    rejected[kind] += 1
                    if kind == "as is":
                        reasons.update(r.split(" (")[0] for r in q.reasons)
        shares = "  ".join(f"{rejected[k] / max(len(files), 1):>8.0%}" for k in DEGRADE)
        print(f"{name:<36}{len(files):>7}  {shares}")
    print("reasons for rejecting unaltered images:", dict(reasons))


if __name__ == "__main__":
    main()
