"""Data-parallel training under torchrun: 2 CPU processes (gloo) against 1 process.

The same global batch gives the same steps over the same images (distributed.shard_order),
so a run whose BatchNorm statistics are frozen (LF) ends with the same scores to float
rounding. Fully fine-tuned runs differ by BatchNorm statistics per process (SyncBatchNorm
needs GPUs), which is why the exact comparison uses LF. That comparison, a 2-process job
killed -9 and resumed under torchrun against the uninterrupted 1-process run, is the `ddp`
case of tests/engine/test_resume.py; the helpers it uses live here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler

from fundusfm.config.core import FinetuneConfig, SplitConfig, dump_config, load_config
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import make_splits
from fundusfm.engine.distributed import convert_sync_batchnorm, local_batch, shard_order, wrap
from fundusfm.errors import ConfigError
from fundusfm.models.backbone import build_backbone
from fundusfm.tasks.classify import finetune
from tests.conftest import TINY_ARCH

TOLERANCE = 1e-5  # scores of LF runs, 1 vs 2 processes (float summation order only)


@pytest.fixture(scope="module")
def setup(synth_set: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    splits = make_splits(
        load_manifest(synth_set), SplitConfig(folds=3, val_fraction=0.2, task="abnormal")
    )
    splits.to_csv(out / "splits.csv", index=False)
    return {"manifest": synth_set, "splits": out / "splits.csv", "cache": out / "cache"}


def torchrun(args: list[str], **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "fundusfm", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def finished(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


def workers_of(pid: int) -> list[int]:
    """Child processes of `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def scores(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "predictions.csv")


def assert_same_run(a: Path, b: Path) -> None:
    x, y = scores(a), scores(b)
    assert list(x["image_id"]) == list(y["image_id"])  # every image, in the same order
    cols = [c for c in x.columns if c.startswith("score_")]
    assert np.abs(x[cols].to_numpy() - y[cols].to_numpy()).max() < TOLERANCE
    hx = pd.read_json(a / "metrics.json", typ="series")["history"]
    hy = pd.read_json(b / "metrics.json", typ="series")["history"]
    for ex, ey in zip(hx, hy, strict=True):  # training loss gathered over both ranks
        assert ex["train_loss"] == pytest.approx(ey["train_loss"], abs=TOLERANCE)
        assert ex["val_loss"] == pytest.approx(ey["val_loss"], abs=TOLERANCE)


def test_shards_together_hold_the_single_process_batches():
    order = torch.randperm(103, generator=torch.Generator().manual_seed(5)).tolist()
    world, global_batch = 4, 8
    b = global_batch // world
    shards = [shard_order(order, r, world) for r in range(world)]
    for i in range(103 // global_batch):
        together = sorted(x for s in shards for x in s[i * b : (i + 1) * b])
        assert together == sorted(order[i * global_batch : (i + 1) * global_batch])
    # for a uniform shuffle this is exactly torch's DistributedSampler
    for r in range(world):
        ds = DistributedSampler(range(103), world, r, shuffle=True, seed=11, drop_last=True)
        ds.set_epoch(3)
        random = RandomSampler(range(103), generator=torch.Generator().manual_seed(14))
        assert list(ds) == shard_order(list(random), r, world)


def test_single_process_needs_no_torchrun():
    assert local_batch(6) == 6
    model = torch.nn.Linear(2, 2)
    assert wrap(model, torch.device("cpu"), sync_batchnorm=True) is model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_torchrun_job_joins_a_group_and_trains_through_ddp(monkeypatch):
    """`torchrun --nproc_per_node 1` (what the GPU check runs with NCCL and SyncBatchNorm)
    takes the distributed path: a process group, DDP, sync_batchnorm refused on CPU."""
    import torch.distributed as dist

    from fundusfm.engine.distributed import launched, setup

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    assert not launched()  # WORLD_SIZE=1 set by hand is no torchrun job
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    assert launched()
    try:
        assert setup(torch.device("cpu")) == torch.device("cpu")
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        wrapped = wrap(model, torch.device("cpu"), sync_batchnorm=False)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        assert wrapped.module is model
        with pytest.raises(ConfigError, match="sync_batchnorm needs CUDA"):
            wrap(model, torch.device("cpu"), sync_batchnorm=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def kill_after_first_checkpoint(args: list[str], out: Path) -> None:
    """Start `fundusfm ARGS` under torchrun and kill -9 the whole job (torchrun and both
    workers) once its first checkpoint is in `out`; skip if the run finished first."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds torchrun's workers through /proc")
    proc = torchrun(args)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    for pid in [*workers_of(proc.pid), proc.pid]:  # torchrun starts each worker in its own session
        with contextlib.suppress(ProcessLookupError):  # gone: the run ended before the kill
            os.kill(pid, signal.SIGKILL)
    proc.communicate()
    if (out / "metrics.json").exists():
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def test_global_batch_must_divide_and_sync_batchnorm_needs_gpus(monkeypatch):
    import fundusfm.engine.distributed as ddp

    monkeypatch.setattr(ddp, "world_size", lambda: 2)  # as under torchrun with 2 processes
    assert local_batch(8) == 4
    with pytest.raises(ConfigError, match="divisible by the 2 processes"):
        local_batch(7)
    with pytest.raises(ConfigError, match="sync_batchnorm needs CUDA"):
        wrap(torch.nn.BatchNorm2d(3), torch.device("cpu"), sync_batchnorm=True)


def test_grid_refuses_torchrun_and_points_to_shards(monkeypatch, tmp_path):
    from fundusfm.config.grid import ClassificationGrid
    from fundusfm.grid.runner import run_grid

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--shard"):
        run_grid(ClassificationGrid(out=tmp_path / "grid"))


@pytest.mark.slow
def test_segmentation_under_torchrun_scores_every_test_image(setup, tmp_path):
    from fundusfm.config.segment import SegmentConfig
    from fundusfm.models.loaded import load_bundle
    from fundusfm.models.unet import encoder_state_equal
    from fundusfm.tasks.segment import train_segmentation

    seg = [
        f"data.manifest={setup['manifest']}",
        f"data.splits={setup['splits']}",
        "data.resolution=64",
        f"model.arch={TINY_ARCH}",
        "model.init=scratch",
        "model.encoder=frozen",
        "model.decoder_channels=[64, 32, 16, 16, 8]",
        "train.epochs=2",
        "train.batch_size=8",
        "train.device=cpu",
    ]
    one = train_segmentation(
        load_config(SegmentConfig, None, [*seg, f"run.out={tmp_path / 'one'}", "run.progress=0"])
    )
    two = tmp_path / "two"
    out = finished(torchrun(["segment", "train", "-q", *[a for s in seg for a in ("--set", s)],
                             "--set", f"run.out={two}"]))  # fmt: skip
    assert out.count("run: ") == 1  # rank 0 alone reports
    a, b = pd.read_csv(one / "per_image.csv"), pd.read_csv(two / "per_image.csv")
    assert list(a["image_id"]) == list(b["image_id"])  # every test image, once, in order
    assert np.isfinite(b["dice"]).all()
    assert (two / "probabilities").is_dir() and not (two / "checkpoint.pt").exists()
    history = pd.read_json(two / "metrics.json", typ="series")["history"]
    assert len(history) == 2 and all(np.isfinite(h["val_dice"]) for h in history)
    first, second = (load_bundle(r / "bundle").model for r in (one, two))
    assert encoder_state_equal(second, first.encoder.state_dict())  # frozen under DDP too


@pytest.mark.slow
def test_a_vit_fully_fine_tuned_by_two_processes_equals_one(setup, tmp_path):
    """A timm ViT has no BatchNorm: full fine-tuning by 2 processes (gloo) takes the same
    steps as by 1, so scores and losses agree to float rounding (ResNets only under LF)."""
    sets = {
        "data.manifest": setup["manifest"],
        "data.splits": setup["splits"],
        "data.cache": setup["cache"],
        "data.task": "abnormal",
        "data.resolution": 32,
        "model.arch": "timm:vit_tiny_patch16_224",
        "model.init": "scratch",
        "model.head": "linear",
        "method": "ff",
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.lr": 0.0005,
        "train.select_metric": "loss",
        "train.device": "cpu",
        "run.progress": False,
    }
    one = load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in sets.items()] + [
        f"run.out={tmp_path / 'one'}"])  # fmt: skip
    two = one.model_copy(update={"run": one.run.model_copy(update={"out": tmp_path / "two"})})
    finetune(one)
    args = ["finetune", "-q", "--config", str(dump_config(two, tmp_path / "two.yaml"))]
    finished(torchrun(args))
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_sync_batchnorm_keeps_the_activation_of_timms_batchnorm_act():
    """timm's EfficientNet fuses BatchNorm and activation (BatchNormAct2d); torch's own
    conversion would drop the activation, timm's (the one `wrap` uses) keeps it."""
    net = build_backbone("timm:efficientnet_b0").net
    fused = sum(type(m).__name__ == "BatchNormAct2d" for m in net.modules())
    converted = convert_sync_batchnorm(net)
    kinds = [type(m).__name__ for m in converted.modules()]
    assert fused > 0 and kinds.count("SyncBatchNormAct") == fused
    assert "BatchNormAct2d" not in kinds
