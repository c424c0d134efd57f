"""How hard are the generated tasks? Train a plain torchvision ResNet-18 on a synthetic set.

Prints normal/abnormal AUROC on a patient-disjoint test part after every epoch, so one can see
that the task is learnable (AUROC climbs) and not trivial (it is not 1.0 after one epoch).

    python benchmarks/synth_learnability.py --n 600 --size 128 --epochs 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image
from sklearn.metrics import roc_auc_score

from fundusfm.config.core import SynthConfig
from fundusfm.data.transforms import normalise, to_tensor
from fundusfm.synthetic.generate import generate


def load(manifest: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    df = pd.read_csv(manifest)
    imgs = torch.stack([to_tensor(np.asarray(Image.open(manifest.parent / p))) for p in df.path])
    return imgs, df["abnormal"].to_numpy(), df["patient_id"].to_numpy()


def run(n: int, size: int, epochs: int, seed: int, say=print) -> list[float]:
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate(SynthConfig(n=n, size=size, seed=seed), Path(tmp), progress=False)
        x, y, patients = load(manifest)
    test_patients = set(np.unique(patients)[::4])  # every 4th patient: 25% test
    test = np.array([p in test_patients for p in patients])
    model = torchvision.models.resnet18(num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scores = []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = np.random.default_rng(epoch).permutation(np.flatnonzero(~test))
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            loss = torch.nn.functional.cross_entropy(
                model(normalise(x[idx])), torch.as_tensor(y[idx])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            p = torch.cat(
                [
                    model(normalise(x[test][i : i + 64])).softmax(1)[:, 1]
                    for i in range(0, int(test.sum()), 64)
                ]
            ).numpy()
        scores.append(float(roc_auc_score(y[test], p)))
        say(f"epoch {epoch + 1}: test AUROC {scores[-1]:.3f} ({time.perf_counter() - start:.0f} s)")
    return scores


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    run(a.n, a.size, a.epochs, a.seed)
