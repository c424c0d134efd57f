"""Exact and near-duplicate images, grouped so that a split never puts copies on two sides.

Each image gets a 256-bit perceptual hash (pHash: the signs of the low 16x16 DCT
coefficients of a 64x64 grey thumbnail, standardised, against their median) of itself and of
its horizontal, vertical and double flips; two images are as far apart as the closest of
one's hash to the other's four, so resized, recompressed, flipped and colour-shifted copies
land within a few bits of their source. (64-bit hashes are too coarse for fundus
photographs: unrelated images came within 4 bits of each other on the 4-class eye-disease
set; at 256 bits the closest unrelated pair in a sample of 200 was 22 bits apart.)
Images whose hashes differ in at most `max_distance` bits, or whose bytes are identical,
are joined, and so are images of the same patient; `group_patients` returns the joined
patient id per image and a report. Copies that were also cropped or zoomed may escape the
hash: adapters drop known augmented copies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from tqdm import tqdm

from fundusfm.data.decode import read_rgb
from fundusfm.errors import ImageDecodeError

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def phash(rgb: np.ndarray) -> np.ndarray:
    """256-bit perceptual hashes of an image and its three flips, as 4 x 32 bytes."""
    grey = Image.fromarray(rgb).convert("L").resize((64, 64), Image.Resampling.LANCZOS)
    a = np.asarray(grey, dtype=np.float64)
    a = (a - a.mean()) / (a.std() + 1e-6)
    out = []
    for view in (a, a[:, ::-1], a[::-1, :], a[::-1, ::-1]):
        low = dctn(view, norm="ortho")[:16, :16].ravel()
        out.append(np.packbits(low > np.median(low[1:])))
    return np.stack(out)


def distances(block: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Bits between each image of `block` (B x 4 x 32) and each of `hashes` (N x 4 x 32):
    the unflipped hash of one against the closest flip of the other."""
    x = block[:, None, None, 0, :] ^ hashes[None, :, :, :]
    return POPCOUNT[x].sum(axis=3).min(axis=2)


class _Union:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


@dataclass
class DuplicateReport:
    exact_pairs: int
    near_pairs: int
    groups_joined: int  # groups of more than one patient after joining
    images_in_joined_groups: int
    examples: list[tuple[str, str, int]]  # (image a, image b, bit distance)

    def summary(self) -> str:
        return (
            f"{self.exact_pairs} byte-identical and {self.near_pairs} near-duplicate pairs; "
            f"{self.groups_joined} groups join several patients ({self.images_in_joined_groups} "
            "images)"
        )


def group_patients(
    paths: list[Path],
    ids: list[str],
    patients: list[str],
    max_distance: int = 6,
    progress: bool = True,
) -> tuple[list[str], DuplicateReport]:
    """Patient ids joined across duplicates: a joined group takes its first member's id."""
    n = len(paths)
    digests, hashes, readable = [], np.zeros((n, 4, 32), dtype=np.uint8), np.ones(n, bool)
    for k, p in enumerate(tqdm(paths, desc="hashing", disable=not progress, unit="img")):
        digests.append(hashlib.md5(Path(p).read_bytes()).hexdigest())
        try:  # a thumbnail is all the hash needs: JPEGs decode at reduced size
            hashes[k] = phash(read_rgb(p, draft_size=256))
        except ImageDecodeError:
            readable[k] = False  # left to `fundusfm data check`; joined by bytes only
    union = _Union(n)
    first_of_patient: dict[str, int] = {}
    for k, pid in enumerate(patients):
        union.join(first_of_patient.setdefault(pid, k), k)
    exact, near, examples = 0, 0, []
    first_of_digest: dict[str, int] = {}
    for k, d in enumerate(digests):
        if d in first_of_digest:
            exact += 1
            union.join(first_of_digest[d], k)
        else:
            first_of_digest[d] = k
    for start in range(0, n, 128):  # blocks keep the distance matrix small
        dist = distances(hashes[start : start + 128], hashes)
        dist[:, ~readable] = 999
        dist[~readable[start : start + 128]] = 999
        for i, j in zip(*np.nonzero(dist <= max_distance), strict=True):
            a, b = start + int(i), int(j)
            if a < b and digests[a] != digests[b]:
                near += 1
                if len(examples) < 20:
                    examples.append((ids[a], ids[b], int(dist[i, j])))
                union.join(a, b)
    roots = [union.find(k) for k in range(n)]
    members: dict[int, set[str]] = {}
    for k, r in enumerate(roots):
        members.setdefault(r, set()).add(patients[k])
    joined = {r for r, ps in members.items() if len(ps) > 1}
    report = DuplicateReport(
        exact,
        near,
        len(joined),
        sum(1 for r in roots if r in joined),
        examples,
    )
    return [patients[r] for r in roots], report
