"""Backbones from timm (`model.arch: timm:NAME`) behind the seam the ResNets have.

Any name `timm.list_models()` knows builds, without its classifier and without downloading
anything (`pretrained=False`; weights come from `models.inits`): ViT-B/16 and ViT-L/16
(RETFound, VisionFM, UrFound), DINOv2 ViTs with registers, ConvNeXt, EfficientNet-B0..B5...
An unknown name is a `ConfigError` listing the closest names timm has.

The seam: `pool` (N x num_features, the features a linear probe and a head see),
`forward_features` (timm's: a ViT's tokens, a CNN's last map), `feature_maps` (CNNs only),
`stages` (five groups in depth order, for partial fine-tuning), `num_features`, `spec` and
`load_net_state`; `input_norm` maps fundusfm's ImageNet-normalised input to the source's. How
features are pooled is the checkpoint's own rule, named in the bundle (`Architecture.pool`):
    timm       timm's `forward_head(pre_logits=True)`: a ViT's class token after the final
               norm, or with `global_pool: avg` the mean of its patch tokens through
               `fc_norm` (RETFound's rule); a CNN's global average
    cls_last4  the class tokens of the last four blocks, each through the final norm,
               concatenated (VisionFM's and DINO's linear-evaluation rule; 4 x width)
A ViT is built at the input resolution (`img_size`); weights made at another size have their
position embeddings resampled on load (bicubic, no antialiasing, as RETFound's
`interpolate_pos_embed`), and `load_net_state` says so.
"""

from __future__ import annotations

import difflib
from itertools import chain, pairwise
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import group_parameters
from torch import nn

from fundusfm.errors import ConfigError, WeightsError
from fundusfm.models.input_norm import InputNorm

TIMM_PREFIX = "timm:"
POOLS = ("timm", "cls_last4")


def timm_name(arch: str) -> str:
    """The timm model name of `timm:NAME`, checked: an unknown one lists close matches."""
    name = arch.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        hint = f"; close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else ""
        raise ConfigError(
            f"timm has no architecture {name!r}{hint} (all names: `timm.list_models()`)"
        )
    return name


class TimmBackbone(nn.Module):
    """A timm model without its classifier (`num_classes=0`), with fundusfm's seam."""

    def __init__(
        self,
        arch: str,
        img_size: int | None = None,
        timm_kwargs: dict[str, Any] | None = None,
        pool: str | None = None,
        input_mean=None,
        input_std=None,
    ):
        super().__init__()
        self.input_norm = InputNorm(input_mean, input_std)
        name = timm_name(arch)
        if (pool or "timm") not in POOLS:
            raise ConfigError(f"unknown feature pooling {pool!r}; choose one of {POOLS}")
        self.arch, self.pool_rule = TIMM_PREFIX + name, pool or "timm"
        self.timm_kwargs = dict(timm_kwargs or {})
        kwargs = {"pretrained": False, "num_classes": 0, **self.timm_kwargs}
        with torch.device("meta"):  # no weights allocated: only which size it is built for
            shape = timm.create_model(name, **kwargs)
        size = getattr(getattr(shape, "patch_embed", None), "img_size", None)
        if img_size and size is not None and tuple(size) != (img_size,) * 2:
            kwargs["img_size"] = img_size  # a fixed-size model (ViT, Swin...) at the run's size
        self.net = timm.create_model(name, **kwargs)
        if self.pool_rule == "cls_last4" and not self.is_vit:
            raise ConfigError(f"pool=cls_last4 needs a ViT; {arch} is not one")
        width = getattr(self.net, "head_hidden_size", None) or self.net.num_features
        self.num_features = width * (4 if self.pool_rule == "cls_last4" else 1)

    @property
    def is_vit(self) -> bool:
        return hasattr(self.net, "patch_embed") and hasattr(self.net, "blocks")

    def spec(self) -> dict[str, Any]:
        """What a bundle records to build this backbone again (`bundle.Architecture`)."""
        n = self.input_norm
        return {
            "arch": self.arch,
            "timm_kwargs": self.timm_kwargs or None,
            "pool": self.pool_rule,
            "input_mean": n.mean,
            "input_std": n.std,
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.input_norm(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The features of the backbone's pooling rule (module docstring), N x num_features."""
        x = self.input_norm(x)
        if self.pool_rule == "cls_last4":
            out = self.net.forward_intermediates(
                x, indices=4, norm=True, return_prefix_tokens=True, output_fmt="NLC",
                intermediates_only=True,
            )  # fmt: skip
            return torch.cat([prefix[:, 0] for _, prefix in out], dim=1)
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A CNN's feature maps, shallow to deep; ViTs have one stride and no pyramid here."""
        if self.is_vit:
            raise ConfigError(
                f"{self.arch} is a ViT: it has no feature pyramid for a U-Net here; segment "
                "with a ResNet encoder (model.arch=resnet18/34/50/101)"
            )
        return self.net.forward_intermediates(self.input_norm(x), intermediates_only=True)

    def stages(self) -> list[nn.Module]:
        """Five groups of layers in depth order (the stem, then four equal runs of timm's
        coarse groups: a ViT's blocks, a CNN's stages; the final norm with the last run)."""
        groups = group_parameters(self.net, self.net.group_matcher(coarse=True))
        ordered = [groups[k] for k in sorted(groups)]
        params = dict(self.net.named_parameters())
        if len(ordered) > 2 and all(params[n].ndim == 1 for n in ordered[-1]):
            ordered[-2:] = [ordered[-2] + ordered[-1]]  # a final norm goes with the last run
        rest = ordered[1:]
        ends = [round(i * len(rest) / 4) for i in range(5)]
        runs = [ordered[0]] + [list(chain(*rest[a:b])) for a, b in pairwise(ends)]
        return [self._modules_of(names) for names in runs]

    def _modules_of(self, names: list[str]) -> nn.ModuleList:
        """The modules owning these parameters (so that eval() reaches their BatchNorms), and
        the parameters held by the model itself (class token, position embedding)."""
        modules, own = {}, []
        for name in names:
            owner, _, _ = name.rpartition(".")
            if owner:
                modules.setdefault(owner, self.net.get_submodule(owner))
            else:
                own.append(self.net.get_parameter(name))
        return nn.ModuleList([*modules.values(), nn.ParameterList(own)])

    def load_net_state(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a timm state dict of this architecture (a classifier head `head.*`/`fc.*`/
        `classifier.*` is ignored); returns notes on what was adapted (position embeddings
        resampled). A missing, unexpected or misshapen key is a `WeightsError` naming it."""
        own = self.net.state_dict()
        state = {k: v for k, v in state.items() if k in own or not _is_head(k)}
        notes = []
        if getattr(self.net, "no_embed_class", False) and "pos_embed" in state:
            state = _fold_class_position(state, own)
        if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
            state["pos_embed"], note = self._resample(state["pos_embed"])
            notes.append(note)
        for key in own:
            if key not in state:
                raise WeightsError(f"weights do not fit {self.arch}: missing key {key!r}")
        for key, value in state.items():
            if key not in own:
                raise WeightsError(f"weights do not fit {self.arch}: unexpected key {key!r}")
            if value.shape != own[key].shape:
                raise WeightsError(
                    f"weights do not fit {self.arch}: {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(own[key].shape)} (weights of another architecture?)"
                )
        self.net.load_state_dict(state)
        return notes

    def _resample(self, pos: torch.Tensor) -> tuple[torch.Tensor, str]:
        net = self.net
        prefix = 0 if getattr(net, "no_embed_class", False) else net.num_prefix_tokens
        grid = list(net.patch_embed.grid_size)
        old = round((pos.shape[1] - prefix) ** 0.5)
        if old * old != pos.shape[1] - prefix:
            raise WeightsError(
                f"weights do not fit {self.arch}: pos_embed holds {pos.shape[1]} positions, "
                f"not {prefix} prefix tokens and a square grid"
            )
        out = resample_abs_pos_embed(
            pos, new_size=grid, num_prefix_tokens=prefix, interpolation="bicubic", antialias=False
        )
        return out, f"position embeddings resampled {old}x{old} -> {grid[0]}x{grid[1]} (bicubic)"


def _is_head(key: str) -> bool:
    return key.split(".")[0] in ("head", "fc", "classifier", "head_dist")


def _fold_class_position(state: dict, own: dict) -> dict:
    """DINOv2 with registers as timm builds it (`no_embed_class`): the class token's own
    position embedding (the first of DINOv2's `pos_embed`) is added to `cls_token` and
    dropped, as timm's DINOv2 conversion does; a state already in timm's layout is kept."""
    pos, grid = state["pos_embed"], own["pos_embed"].shape[1]
    square = round(pos.shape[1] ** 0.5) ** 2 == pos.shape[1]
    if square or pos.shape[1] == grid or "cls_token" not in state:
        return state
    return {**state, "cls_token": state["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}
