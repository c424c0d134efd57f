"""Layer-wise learning-rate decay (`train.layer_decay`) for fine-tuning timm ViTs.

Each parameter's learning rate is checked against RETFound's rule (`util/lr_decay.py`,
after BEiT), written out here on its own: with L = number of blocks + 1, the class token,
position embedding and patch embedding are layer 0, block k is layer k + 1, everything else
(final norm, fc_norm, the head) is layer L, and lr = base_lr * decay ** (L - layer). Weight
decay follows timm's rule: none on 1-d parameters and on what the ViT names in
`no_weight_decay()` (class token, position embedding); the head keeps the usual weight decay.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fundusfm.config.core import TrainConfig
from fundusfm.engine.loop import Trainer, runtime
from fundusfm.models.backbone import build_backbone
from fundusfm.models.heads import Classifier, make_head
from fundusfm.tasks.classify_job import classification_job
from tests.conftest import TINY_ARCH

VIT = "timm:vit_tiny_patch16_224"
BASE_LR, DECAY, WD = 1e-3, 0.65, 0.05


def classifier(arch: str = VIT, **timm_kwargs) -> Classifier:
    torch.manual_seed(0)
    backbone = build_backbone(arch, 32, timm_kwargs or None)
    return Classifier(backbone, make_head("linear", backbone.num_features, 2))


def fold_data() -> SimpleNamespace:
    """What `classification_job` reads of a fold, for a job that is not trained here."""
    return SimpleNamespace(
        task=SimpleNamespace(kind="binary", class_names=["normal", "abnormal"]),
        labels=np.array([0, 1, 0, 1]),
        parts={"train": np.array([0, 1]), "val": np.array([2, 3])},
        dataset=lambda part, *args: [],
    )


def config(**extra) -> TrainConfig:
    sets = {"lr": BASE_LR, "weight_decay": WD, "select_metric": "loss", "device": "cpu"}
    return TrainConfig(**(sets | extra))


def trainer(model: Classifier, cfg: TrainConfig, method: str = "ff", stages: int = 1) -> Trainer:
    job = classification_job(model, fold_data(), cfg, method, stages)
    return Trainer(job, cfg, runtime(cfg), batches_per_epoch=2)


def retfound_lr(name: str, blocks: int) -> float:
    num_layers = blocks + 1
    name = name.removeprefix("backbone.net.")
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:  # norm, fc_norm, the head
        layer = num_layers
    return BASE_LR * DECAY ** (num_layers - layer)


def expected_wd(name: str, param: torch.nn.Parameter) -> float:
    if name.startswith("head."):
        return WD  # the head: weight decay as without layer decay
    no_decay = name.removeprefix("backbone.net.") in {"cls_token", "pos_embed"}
    return 0.0 if param.ndim <= 1 or no_decay else WD


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """Parameter id -> its group; each parameter is in one group only."""
    where: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in where, "a parameter is in two groups"
            where[id(p)] = group
    return where


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("pool", [{}, {"global_pool": "avg"}], ids=["token-norm", "avg-fc_norm"])
def test_each_parameter_gets_retfounds_layer_decayed_lr(optimizer, pool):
    model = classifier(**pool)
    blocks = len(model.backbone.net.blocks)
    assert blocks == 12
    optim = trainer(model, config(layer_decay=DECAY, optimizer=optimizer)).optimizer
    where = group_of(optim)
    named = dict(model.named_parameters())
    assert set(where) == {id(p) for p in named.values()}  # all trainable, each once
    for name, p in named.items():
        group = where[id(p)]
        assert group["initial_lr"] == pytest.approx(retfound_lr(name, blocks), rel=1e-12), name
        assert group["weight_decay"] == expected_wd(name, p), name
    # the rule is not vacuous: the stem trains 0.65**13 slower than the top, the last block
    # (not the final norm's layer) at lr * 0.65
    lr_of = {name: where[id(p)]["initial_lr"] for name, p in named.items()}
    assert lr_of["backbone.net.pos_embed"] == pytest.approx(BASE_LR * DECAY**13)
    assert lr_of["backbone.net.blocks.11.mlp.fc2.weight"] == pytest.approx(BASE_LR * DECAY)
    assert lr_of["head.0.weight"] == BASE_LR


def test_without_layer_decay_the_optimiser_is_one_group_of_all_trainable_params():
    model = classifier()
    cfg = config()
    assert cfg.layer_decay is None
    run = trainer(model, cfg)
    assert run.job.param_groups is None
    (group,) = run.optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert (group["initial_lr"], group["weight_decay"]) == (BASE_LR, WD)
    assert "lr_scale" not in group


def test_layer_decay_on_a_resnet_decays_by_stage():
    """So that a grid mixing ResNets and ViTs can set it once: stem layer 0, stage k layer k,
    the head on top; every parameter in one group, weight decay as without it."""
    model = classifier(TINY_ARCH)
    groups = trainer(model, config(layer_decay=DECAY)).optimizer.param_groups
    lr = {id(p): g["initial_lr"] for g in groups for p in g["params"]}  # before the warm-up
    layer = {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}
    for name, p in model.named_parameters():
        part = name.split(".")[2] if name.startswith("backbone.") else "head"
        expected = BASE_LR * DECAY ** (5 - layer[part]) if part in layer else BASE_LR
        assert lr[id(p)] == pytest.approx(expected), name
    assert len(lr) == len(list(model.parameters()))


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_layer_decay_must_be_in_zero_one(value):
    with pytest.raises(ValidationError):
        config(layer_decay=value)
    assert config(layer_decay=1.0).layer_decay == 1.0


@pytest.mark.parametrize("method", ["partial", "lf"])
def test_frozen_parameters_are_in_no_group(method):
    model = classifier()
    optim = trainer(model, config(layer_decay=DECAY), method, stages=1).optimizer
    where = group_of(optim)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trained
    assert not any(id(p) in where for n, p in model.named_parameters() if n in frozen)
    assert set(where) == {id(p) for p in trained.values()}
    assert all(g["params"] for g in optim.param_groups)  # no empty group
    if method == "partial":  # the last run of blocks trains, at its layer's lr
        assert "backbone.net.blocks.11.attn.qkv.weight" in trained
        assert "backbone.net.blocks.0.attn.qkv.weight" in frozen
    for name, p in trained.items():
        assert where[id(p)]["initial_lr"] == pytest.approx(retfound_lr(name, 12)), name


def test_a_layer_decayed_optimiser_state_resumes():
    cfg = config(layer_decay=DECAY, warmup_epochs=0)
    first = trainer(classifier(), cfg)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    first.epoch([(images, torch.tensor([0, 1]))] * 2)
    state = first.state_dict()
    again = trainer(classifier(), cfg)  # a new process: the groups are built again
    again.load_state_dict(state)
    saved, loaded = first.optimizer.state_dict(), again.optimizer.state_dict()
    assert len(loaded["param_groups"]) == len(saved["param_groups"]) > 2
    for a, b in zip(saved["param_groups"], loaded["param_groups"], strict=True):
        assert (a["params"], a["lr"], a["initial_lr"]) == (b["params"], b["lr"], b["initial_lr"])
    for key, value in saved["state"].items():
        assert torch.equal(value["exp_avg"], loaded["state"][key]["exp_avg"])
