"""Backbones, inits, bundles and the training loop, on tiny models and generated images."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

import fundusfm
from fundusfm.config.core import (
    FinetuneConfig,
    PretrainConfig,
    SplitConfig,
    TrainConfig,
    load_config,
)
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import fold_sets, make_splits
from fundusfm.errors import (
    BundleError,
    ConfigError,
    DataError,
    TrainingDiverged,
    WeightsError,
    WeightsNotFound,
)
from fundusfm.models.heads import make_head
from fundusfm.models.inits import INITS, create_backbone
from fundusfm.models.loaded import load_bundle
from fundusfm.tasks.classify import finetune, pretrain, run_notes
from fundusfm.tasks.classify_job import make_loss, make_sampler
from fundusfm.tasks.evaluate import evaluate
from fundusfm.tasks.probe import fit_probe
from tests.conftest import TINY_ARCH


@pytest.fixture(scope="module")
def tiny(synth_set: Path, tmp_path_factory) -> dict:
    """The 40-image generated set with splits stratified on `disease`, and a cache root."""
    out = tmp_path_factory.mktemp("tiny")
    m = load_manifest(synth_set)
    splits = make_splits(
        m, SplitConfig(folds=3, fractions=[0.5, 1.0], val_fraction=0.2, task="disease")
    )
    splits.to_csv(out / "splits.csv", index=False)
    return {"manifest": synth_set, "splits": out / "splits.csv", "cache": out / "cache"}


def config(tiny: dict, out: Path, cls=FinetuneConfig, **sets) -> FinetuneConfig:
    base = {
        "data.manifest": tiny["manifest"],
        "data.splits": tiny["splits"],
        "data.cache": tiny["cache"],
        "data.resolution": 64,
        "data.task": "abnormal",
        "model.arch": TINY_ARCH,
        "model.init": "scratch",
        "model.hidden": 16,
        "train.epochs": 1,
        "train.batch_size": 8,
        "train.lr": 0.001,
        "train.select_metric": "loss",  # tiny validation parts may lack a class
        "run.out": out,
        "run.progress": False,
    }
    base.update(sets)
    return load_config(cls, None, [f"{k}={v}" for k, v in base.items()])


def test_backbone_seam():
    b = create_backbone("resnet18", "scratch")
    x = torch.zeros(2, 3, 64, 64)
    maps = b.feature_maps(x)
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    assert [m.shape[1] for m in maps] == [64, 128, 256, 512]
    assert b.pool(x).shape == (2, 512) and b.num_features == 512
    assert create_backbone("resnet50").num_features == 2048
    with pytest.raises(ConfigError, match="resnet18"):
        create_backbone("vgg16")
    with pytest.raises(ConfigError) as err:
        create_backbone("resnet18", "imagenet21k")
    assert all(name in str(err.value) for name in INITS)


def test_paper_mlp_head():
    head = make_head("mlp", 2048, 2)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].out_features == 512 and head[3].out_features == 2


def test_imagenet_weights_offline_or_clear_error(tmp_path: Path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(WeightsNotFound, match="never falls back"):
            create_backbone("resnet18", "imagenet")
        reference = torchvision.models.resnet18()
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        target = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
        target.parent.mkdir(parents=True)
        torch.save(reference.state_dict(), target)
        loaded = create_backbone("resnet18", "imagenet")
        assert torch.equal(loaded.net.conv1.weight, reference.conv1.weight)
        with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
            create_backbone("resnet18", "imagenet", imagenet_version="IMAGENET1K_V2")
    finally:
        torch.hub.set_dir(old)
    explicit = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), explicit)
    assert create_backbone("resnet18", "imagenet", imagenet_file=explicit).num_features == 512


def test_config_contract_keys(tmp_path: Path):
    keys = {
        "data.manifest": "m.csv",
        "data.splits": "s.csv",
        "data.fold": 2,
        "data.fraction": 0.25,
        "data.resolution": 256,
        "model.arch": "resnet34",
        "model.init": "fundus",
        "model.head": "linear",
        "method": "lf",
        "run.out": "r",
    }
    cfg = load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in keys.items()])
    assert (cfg.data.fold, cfg.data.fraction, cfg.method) == (2, 0.25, "lf")
    assert (cfg.model.arch, cfg.model.init, cfg.model.head) == ("resnet34", "fundus", "linear")


@pytest.mark.parametrize("task", ["abnormal", "disease", "diseases"])
@pytest.mark.parametrize("method", ["lf", "ff", "partial"])
def test_finetune_every_method_and_task(tiny, tmp_path, method, task):
    cfg = config(tiny, tmp_path / "run", **{"method": method, "data.task": task})
    torch.manual_seed(0)
    before = create_backbone(TINY_ARCH, "scratch").state_dict()
    out = finetune(cfg)
    for name in ("config.yaml", "metrics.json", "predictions.csv", "bundle/bundle.json"):
        assert (out / name).is_file(), name
    bundle = load_bundle(out / "bundle")
    after = {
        k.removeprefix("backbone."): v
        for k, v in bundle.model.state_dict().items()
        if k.startswith("backbone.")
    }
    changed = {
        k.split(".")[1]
        for k, v in after.items()
        if v.dtype.is_floating_point and not torch.equal(v, before[k])
    }
    expected = {
        "lf": set(),
        "partial": {"layer4"},
        "ff": {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"},
    }[method]
    assert changed == expected  # frozen parts, BatchNorm statistics included, did not move
    preds = pd.read_csv(out / "predictions.csv")
    assert set(preds.split) == {"val", "test"} and (preds.fold == 0).all()
    score_cols = [c for c in preds.columns if c.startswith("score_")]
    assert len(score_cols) == len(bundle.classes)
    # the bundle reproduces the run's own test scores
    test = preds[preds.split == "test"]
    m = load_manifest(tiny["manifest"])
    from fundusfm.data.preprocess import ImageCache, cache_dir

    cache = ImageCache(cache_dir(tiny["cache"], cfg.data.preprocess()))
    rows = m.table.set_index("image_id").loc[test.image_id, "path"]
    images = [cache.read(m.image_path(p).resolve()) for p in rows]
    assert np.allclose(bundle.predict(images), test[score_cols].to_numpy(), atol=1e-5)


def test_pretrain_then_finetune_from_bundle(tiny, tmp_path):
    cfg = config(
        tiny, tmp_path / "pre", PretrainConfig, strategy="fundus", **{"data.splits": "null"}
    )
    out = pretrain(cfg)
    bundle = load_bundle(out / "bundle")
    assert bundle.meta.pretraining.strategy == "fundus"
    assert set(pd.read_csv(out / "predictions.csv").split) == {"val"}
    ft = finetune(config(tiny, tmp_path / "ft", **{"model.init": out / "bundle", "method": "lf"}))
    tuned = load_bundle(ft / "bundle").model.backbone.state_dict()
    for k, v in bundle.model.backbone.state_dict().items():
        assert torch.equal(v, tuned[k]), k  # LF from a bundle keeps its backbone exactly
    with pytest.raises(ConfigError, match="contradicts"):
        pretrain(
            config(
                tiny,
                tmp_path / "x",
                PretrainConfig,
                strategy="fundus",
                **{"model.init": "imagenet"},
            )
        )


def test_named_fundus_init_needs_a_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNDUSFM_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFound, match="fundusfm pretrain"):
        create_backbone("resnet18", "imagenet+fundus")


def test_bundle_round_trip_and_tamper_check(tiny, tmp_path):
    out = finetune(config(tiny, tmp_path / "run"))
    bundle = fundusfm.load_bundle(out / "bundle")
    x = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    first = bundle.predict(x)
    assert first.shape == (3, 2) and np.allclose(first.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(load_bundle(out / "bundle").predict(x), first)
    meta = bundle.meta
    assert meta.preprocessing.resolution == 64
    assert meta.provenance.manifest_sha256 and meta.task.classes == ["0", "1"]
    with pytest.raises(DataError, match="expects 64x64"):
        bundle.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    weights = out / "bundle" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(out / "bundle")


def test_finished_run_drops_checkpoint_and_resume_keeps_it_finished(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "run")
    out = finetune(cfg)
    assert not (out / "checkpoint.pt").exists() and not (out / "best.safetensors").exists()
    assert (out / "bundle" / "model.safetensors").is_file()
    before = (out / "metrics.json").stat().st_mtime_ns
    again = finetune(cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})}))
    assert (again / "metrics.json").stat().st_mtime_ns == before  # nothing retrained


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    def poison(epoch: int, model) -> None:  # weights turn NaN after the first epoch
        for p in model.parameters():
            p.data.fill_(float("nan"))

    cfg = config(tiny, tmp_path / "run", **{"train.epochs": 3})
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        finetune(cfg, on_epoch_end=poison)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_external_evaluate_with_label_map(tiny, tmp_path):
    out = finetune(config(tiny, tmp_path / "run"))
    label_map = tmp_path / "map.yaml"
    label_map.write_text("column: disease\nmap:\n  normal: 0\n  dr: 1\n  amd: 1\n  rvo: null\n")
    metrics = evaluate(
        out / "bundle",
        tiny["manifest"],
        tmp_path / "ext",
        label_map,
        cache=tiny["cache"],
        device="cpu",
        progress=False,
    )
    table = load_manifest(tiny["manifest"]).table
    expected = table["disease"].isin(["normal", "dr", "amd"]).sum()
    assert metrics["images"] == expected
    preds = pd.read_csv(tmp_path / "ext" / "predictions.csv")
    assert len(preds) == expected and (preds.split == "external").all()
    truth = table.set_index("image_id").loc[preds.image_id, "disease"] != "normal"
    assert (preds.y_true.to_numpy() == truth.astype(int).to_numpy()).all()


@pytest.mark.parametrize(
    "sets",
    [
        {"train.optimizer": "sgd", "train.label_smoothing": 0.1},
        {"train.balanced_sampler": True, "train.class_weighted_loss": True},
        {"train.grad_accum": 2, "model.head": "linear", "model.dropout": 0.2},
        {"data.task": "diseases", "train.class_weighted_loss": True},
    ],
    ids=["sgd-smoothing", "balanced-weighted", "accumulate-linear", "multilabel-weighted"],
)
def test_training_options_run(tiny, tmp_path, sets):
    out = finetune(config(tiny, tmp_path / "run", **{"train.epochs": 2, **sets}))
    history = pd.read_json(out / "metrics.json", typ="series")["history"]
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    assert load_bundle(out / "bundle").predict(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).size


def test_balanced_sampler_class_weights_and_smoothing_change_batches_and_loss():
    labels = np.array([0] * 90 + [1] * 10)
    drawn = {}
    for balanced in (False, True):
        sampler = make_sampler(labels, "binary", balanced, torch.Generator().manual_seed(0))
        drawn[balanced] = labels[list(sampler)].mean()
    assert drawn[False] == 0.1  # a permutation: every image once
    assert drawn[True] > 0.35  # drawn in proportion 1/count: about half are the rare class
    logits, y = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 1.0]]), torch.tensor([0, 0, 1])
    plain = TrainConfig()
    weighted = TrainConfig(class_weighted_loss=True)
    smooth = TrainConfig(label_smoothing=0.2)
    base = make_loss("binary", plain, labels, 2)(logits, y)
    # weights len / (classes * count): 100 / 180 for class 0, 100 / 20 for class 1
    w = torch.tensor([100 / 180, 100 / 20])
    nll = -torch.log_softmax(logits, 1)[torch.arange(3), y]
    by_hand = (w[y] * nll).sum() / w[y].sum()
    assert make_loss("binary", weighted, labels, 2)(logits, y) == pytest.approx(float(by_hand))
    target = torch.full((3, 2), 0.1).scatter_(1, y[:, None], 0.9)  # 0.2 spread over 2 classes
    smoothed = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    assert make_loss("binary", smooth, labels, 2)(logits, y) == pytest.approx(float(smoothed))
    assert float(base) != pytest.approx(float(smoothed)) and float(base) != pytest.approx(
        float(by_hand)
    )
    multi = np.array([[1, 0], [0, 0], [1, 1], [0, 0]])
    loss = make_loss("multilabel", weighted, multi, 2)
    assert loss.pos_weight.tolist() == [1.0, 3.0]  # (N - positives) / positives


def test_early_stopping_and_unknown_select_metric(tiny, tmp_path):
    # frozen backbone, linear head, a learning rate too small to matter: no epoch beats the first
    cfg = config(
        tiny,
        tmp_path / "run",
        **{
            "train.epochs": 6,
            "train.patience": 2,
            "train.lr": 1e-12,
            "train.select_metric": "brier",
            "method": "lf",
            "model.head": "linear",
        },
    )
    out = finetune(cfg)
    metrics = pd.read_json(out / "metrics.json", typ="series")
    assert len(metrics["history"]) == 3 and metrics["best_epoch"] == 1
    with pytest.raises(ConfigError, match="select_metric"):
        finetune(config(tiny, tmp_path / "bad", **{"train.select_metric": "dice"}))


def test_resume_refuses_changed_settings_and_stays_stopped(tiny, tmp_path):
    sets = {
        "train.epochs": 6,
        "train.patience": 1,
        "train.lr": 1e-12,
        "method": "lf",
        "model.head": "linear",
    }
    cfg = config(tiny, tmp_path / "run", **sets)
    out = finetune(cfg)
    assert len(pd.read_json(out / "metrics.json", typ="series")["history"]) == 2
    (out / "metrics.json").unlink()  # as if killed after the last epoch
    resumed = finetune(cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})}))
    assert len(pd.read_json(resumed / "metrics.json", typ="series")["history"]) == 2
    other = config(tiny, tmp_path / "run", **{**sets, "data.fold": 1})
    with pytest.raises(ConfigError, match=r"differ from .* in data"):
        finetune(other.model_copy(update={"run": other.run.model_copy(update={"resume": True})}))


def test_undefined_selection_metric_fails_before_training(tiny, tmp_path):
    # fold 0's validation part of the tiny set holds too few images for every disease class
    cfg = config(tiny, tmp_path / "run", **{"data.task": "disease", "train.select_metric": "auroc"})
    with pytest.raises(DataError, match="select_metric=loss"):
        finetune(cfg)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_wrong_inputs_give_clear_errors(tiny, tmp_path):
    out = finetune(config(tiny, tmp_path / "run"))
    bundle = load_bundle(out / "bundle")
    with pytest.raises(DataError, match="uint8"):
        bundle.predict(torch.rand(1, 3, 64, 64))
    wrong = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), wrong)
    with pytest.raises(WeightsError, match="another architecture"):
        create_backbone("resnet18", "imagenet", imagenet_file=wrong)
    whole = tmp_path / "whole.pth"
    torch.save(torchvision.models.resnet18(), whole)  # a pickled model object, not weights
    with pytest.raises(WeightsError, match="not a plain state dict"):
        create_backbone("resnet18", "imagenet", imagenet_file=whole)
    label_map = tmp_path / "map.yaml"
    label_map.write_text("column: eye\nmap: {up: 1}\n")
    with pytest.raises(DataError, match="no value of column 'eye'"):
        evaluate(
            out / "bundle",
            tiny["manifest"],
            tmp_path / "e",
            label_map,
            cache=tiny["cache"],
            device="cpu",
            progress=False,
        )
    label_map.write_text("column: eye\nmap: {left: 1, right: 0, no: 1}\n")  # `no` stays a key
    metrics = evaluate(
        out / "bundle",
        tiny["manifest"],
        tmp_path / "e2",
        label_map,
        cache=tiny["cache"],
        device="cpu",
        progress=False,
    )
    assert metrics["images"] == 40


@pytest.mark.slow  # starts loader worker processes
def test_loader_workers_kept_across_epochs_change_nothing(tiny, tmp_path):
    # workers live across epochs (persistent): they must see each epoch's augmentation
    sets = {"train.epochs": 2, "method": "ff"}
    inline = finetune(config(tiny, tmp_path / "w0", **sets))
    workers = finetune(config(tiny, tmp_path / "w2", **{**sets, "train.workers": 2}))
    pd.testing.assert_frame_equal(
        pd.read_csv(inline / "predictions.csv"), pd.read_csv(workers / "predictions.csv")
    )


def test_holdout_part_is_scored_and_metrics_state_the_labelled_images(tiny, tmp_path):
    m = load_manifest(tiny["manifest"])
    splits = make_splits(
        m, SplitConfig(folds=3, fractions=[0.5, 1.0], val_fraction=0.2, test_fraction=0.2)
    )
    splits.to_csv(tmp_path / "splits.csv", index=False)
    cfg = config(
        tiny, tmp_path / "run", **{"data.splits": tmp_path / "splits.csv", "data.fraction": 0.5}
    )
    out = finetune(cfg)
    preds = pd.read_csv(out / "predictions.csv", dtype={"image_id": str})
    held = set(splits.image_id[splits.holdout == 1])
    assert held and set(preds.image_id[preds.split == "holdout"]) == held
    metrics = pd.read_json(out / "metrics.json", typ="series")
    assert "auroc" in metrics["holdout"]
    labelled = metrics["labelled"]
    assert labelled["train_images"] == len(fold_sets(splits, 0, 0.5)["train"])
    train_part = (splits.fold != 0) & (splits.fold >= 0) & (splits.val_fold != 0)
    assert labelled["train_pool_images"] == train_part.sum()
    assert labelled["labelled_images"] == labelled["train_images"] + labelled["val_images"]
    assert labelled["val_images"] == (preds.split == "val").sum()
    assert labelled["fraction_nominal"] == 0.5
    assert labelled["share"] == labelled["train_images"] / labelled["train_pool_images"]
    both = preds[preds.split == "val"].y_true.nunique() == 2
    assert metrics["thresholds"]["validated"] is both


def test_probe_counts_unconverged_fits_and_runs_say_so():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)), rng.integers(0, 3, 60)
    stopped = fit_probe("multiclass", x, y, x[:20], y[:20], 3, [0.1, 1.0], max_iter=1)
    assert stopped.convergence_warnings == stopped.fits == 2
    converged = fit_probe("multiclass", x, y, x[:20], y[:20], 3, [0.1, 1.0], max_iter=2000)
    assert converged.convergence_warnings == 0 and converged.fits == 2
    notes = run_notes(
        {
            "probe": {"convergence_warnings": 2, "fits": 2},
            "thresholds": {"validated": False, "note": "the validation part holds one class"},
        }
    )
    assert "2 of 2 probe fits stopped at probe.max_iter" in notes[1]
    assert notes[0] == "threshold not validated: the validation part holds one class"
    assert run_notes({"probe": {"convergence_warnings": 0, "fits": 2}}) == []
