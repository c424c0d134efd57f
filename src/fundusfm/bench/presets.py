"""The sizes of `fundusfm bench run`: one `Preset` per name (`--preset`, `--quick`).

`default` uses the paper's model and the sizes the issue names; `quick` is a smoke-test
preset (ResNet-10, a handful of images, small memory row); `gpu` runs rows a and c on CUDA
only (AMP + channels_last at 512 px), sized for the few minutes of `benchmarks/gpu_check.py`.
`bench run --set FIELD=VALUE` changes one field of the preset chosen (`with_changes`), e.g.
`--set lf_arch=timm:vit_large_patch16_224 --set lf_resolution=224 --set images=48`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

from fundusfm.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str = "resnet50"
    images: int = 200  # generated photographs for rows a and b (5 patient-grouped folds)
    synth_size: int = 288
    batch_size: int = 32
    workers: int = 0  # the loader's worker processes (train.workers; its default is 0)
    rounds: int = 3  # loader epoch / in-memory epoch pairs, in the order A B, B A, A B ...
    cpu_variant_workers: int = 2  # one more row: this many persistent workers (0: none)
    pipeline_resolutions: tuple[int, ...] = (128, 224)
    lf_arch: str | None = None  # row b's model (any timm:NAME; a ViT at lf_resolution); None: arch
    lf_resolution: int = 224
    lf_folds: int = 5
    lf_fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
    screen_resolutions: tuple[int, ...] = (224, 512)
    screen_batch: int = 8
    screen_rounds: int = 3
    predict_resolution: int = 512  # row c.predict: `fundusfm predict` end to end
    predict_images: int = 48
    predict_synth_size: int = 512
    predict_batch: int = 32  # the command's default
    memory_resolution: int = 512
    memory_sizes: tuple[int, int] = (1_000, 10_000)
    memory_batch: int = 32
    memory_workers: int = 2
    gpu_resolution: int = 512  # rows a on CUDA only
    gpu_batch: int = 64
    gpu_images: int = 1_000
    gpu_workers: tuple[int, ...] = field(default_factory=lambda: (0, min(16, os.cpu_count() or 1)))
    screen_device: str = "cpu"  # rows c; cuda: AMP + channels_last, ONNX Runtime's CUDA provider


PRESETS = {
    "default": Preset("default"),
    "quick": Preset(
        "quick",
        arch="resnet10",
        images=24,
        synth_size=128,
        batch_size=4,
        rounds=2,
        cpu_variant_workers=1,
        pipeline_resolutions=(64, 96),
        lf_resolution=64,
        lf_folds=2,
        lf_fractions=(0.5, 1.0),
        screen_resolutions=(64,),
        screen_batch=2,
        screen_rounds=2,
        predict_resolution=64,
        predict_images=8,
        predict_synth_size=96,
        predict_batch=4,
        memory_resolution=128,
        memory_sizes=(32, 320),
        memory_batch=8,
        memory_workers=1,
        gpu_resolution=128,
        gpu_images=64,
        gpu_batch=8,
    ),
    # Rows a and c on one data-centre GPU in about two minutes (benchmarks/gpu_check.py):
    # no CPU rows, the paper's model at 512 px, fewer images than `default`.
    "gpu": Preset(
        "gpu",
        images=24,  # the CPU workspace rows a and b share; unused without CPU rows
        synth_size=96,
        lf_folds=2,
        lf_fractions=(0.5, 1.0),
        pipeline_resolutions=(),
        cpu_variant_workers=0,
        gpu_images=256,
        gpu_batch=32,
        gpu_workers=(0, min(8, os.cpu_count() or 1)),
        rounds=2,
        screen_resolutions=(512,),
        screen_batch=32,
        screen_device="cuda",
        predict_images=32,
    ),
}


def preset_named(name: str | None, quick: bool = False) -> Preset:
    """The preset of `--preset NAME` (`--quick` is `--preset quick`); default: `default`."""
    if name is not None and quick and name != "quick":
        raise ConfigError(f"--quick and --preset {name}: choose one")
    name = name or ("quick" if quick else "default")
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def _parse(name: str, kind, text: str):
    """`text` as a value of the field's type (`kind`): int, float, str, `X | None` (`none`:
    None), tuples as comma-separated items."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if text.strip().lower() in ("", "none", "null"):
            return None
        return _parse(name, next(a for a in args if a is not type(None)), text)
    if typing.get_origin(kind) is tuple:
        items = [t for t in text.split(",") if t.strip()]
        return tuple(_parse(name, args[0], t) for t in items)
    try:
        return kind(text.strip())
    except ValueError:
        raise ConfigError(f"--set {name}: {text!r} is not a valid {kind.__name__}") from None


def with_changes(preset: Preset, changes: list[str] | None) -> Preset:
    """`preset` with each `FIELD=VALUE` of `bench run --set` applied."""
    hints = typing.get_type_hints(Preset)
    values = {}
    for change in changes or []:
        name, sep, text = change.partition("=")
        name = name.strip()
        if not sep or name not in hints or name == "name":
            fields = ", ".join(f for f in hints if f != "name")
            raise ConfigError(f"--set {change!r}: expected FIELD=VALUE, FIELD one of {fields}")
        values[name] = _parse(name, hints[name], text)
    return dataclasses.replace(preset, **values)
