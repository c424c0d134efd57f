"""Published checkpoints as inits (`models.peers`): for every adapter, a file written in that
source's exact key layout with random tensors, loaded through the adapter, gives the features
of a reference forward pass written from the source's own model definition (here, from its
raw tensors: no timm), to 1e-5; wrong kinds, missing and unexpected keys are refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fundusfm.data.transforms import normalise
from fundusfm.errors import WeightsError
from fundusfm.grid.cells import _init_digest
from fundusfm.models.inits import create_backbone, file_backbone

VFM_MEAN = (0.423737496137619, 0.2609460651874542, 0.128403902053833)  # utils.get_stats
VFM_STD = (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)
EPS = 1e-6  # every source's ViT: partial(nn.LayerNorm, eps=1e-6)
IMAGES = torch.randint(
    0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
)


def vit_state(width: int, depth: int, patch: int, grid: int, layer_scale: bool = False) -> dict:
    """A ViT encoder's tensors as timm, MAE, DINO and DINOv2 all name them (random)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    s = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": r(width, 3, patch, patch),
        "patch_embed.proj.bias": r(width),
        "norm.weight": 1 + r(width),
        "norm.bias": r(width),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        s |= {
            p + "norm1.weight": 1 + r(width), p + "norm1.bias": r(width),
            p + "attn.qkv.weight": r(3 * width, width), p + "attn.qkv.bias": r(3 * width),
            p + "attn.proj.weight": r(width, width), p + "attn.proj.bias": r(width),
            p + "norm2.weight": 1 + r(width), p + "norm2.bias": r(width),
            p + "mlp.fc1.weight": r(4 * width, width), p + "mlp.fc1.bias": r(4 * width),
            p + "mlp.fc2.weight": r(width, 4 * width), p + "mlp.fc2.bias": r(width),
        }  # fmt: skip
        if layer_scale:
            s |= {p + "ls1.gamma": 1 + r(width), p + "ls2.gamma": 1 + r(width)}
    return s


def reference_blocks(s: dict, x: torch.Tensor, heads: int, patch: int) -> list[torch.Tensor]:
    """Each block's output tokens: the ViT forward of MAE's, DINO's and DINOv2's code (with
    DINOv2's register tokens, when the state has them, placed after the class token)."""
    width = s["cls_token"].shape[-1]
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x], dim=1) + s["pos_embed"]
    if "register_tokens" in s:
        registers = s["register_tokens"].expand(len(x), -1, -1)
        x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
    outs, depth = [], len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (width,), s[p + "norm1.weight"], s[p + "norm1.bias"], EPS)
        n, t, _ = h.shape
        qkv = F.linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, t, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
        h = F.linear(
            (a @ v).transpose(1, 2).reshape(n, t, width),
            s[p + "attn.proj.weight"],
            s[p + "attn.proj.bias"],
        )
        x = x + h * s.get(p + "ls1.gamma", 1.0)
        h = F.layer_norm(x, (width,), s[p + "norm2.weight"], s[p + "norm2.bias"], EPS)
        h = F.linear(
            F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
            s[p + "mlp.fc2.weight"],
            s[p + "mlp.fc2.bias"],
        )
        x = x + h * s.get(p + "ls2.gamma", 1.0)
        outs.append(x)
    return outs


def final_norm(s: dict, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], s["norm.weight"], s["norm.bias"], EPS)


def source_input(mean, std) -> torch.Tensor:
    return normalise(IMAGES, mean, std)


def ours(init: str, file: Path, arch: str, img_size: int = 32) -> torch.Tensor:
    backbone = file_backbone(init, file, arch, img_size).eval()
    with torch.no_grad():
        return backbone.pool(normalise(IMAGES))  # fundusfm feeds ImageNet-normalised images


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def mae_checkpoint(encoder: dict, extra: dict | None = None) -> dict:
    """An MAE pretraining checkpoint as RETFound's main_pretrain.py saves it."""
    width = encoder["cls_token"].shape[-1]
    decoder = {
        "mask_token": torch.zeros(1, 1, 32),
        "decoder_embed.weight": torch.randn(32, width),
        "decoder_pos_embed": torch.randn(1, 5, 32),
        "decoder_blocks.0.norm1.weight": torch.ones(32),
        "decoder_norm.weight": torch.ones(32),
        "decoder_pred.weight": torch.randn(3 * 16 * 16, 32),
    }
    args = argparse.Namespace(model="mae_vit_large_patch16", input_size=224, mask_ratio=0.75)
    return {"model": {**encoder, **decoder, **(extra or {})}, "epoch": 799, "args": args}


@pytest.mark.parametrize("init", ["retfound", "urfound"])
def test_mae_checkpoints_give_the_patch_mean_through_a_fresh_fc_norm(tmp_path, init):
    """RETFound's and UrFound's fine-tuning model: global average of the patch tokens, then
    fc_norm (a fresh LayerNorm); the pretraining `norm` is not used."""
    encoder = vit_state(width=192, depth=12, patch=16, grid=2)
    extra = {"bert_encoder.layer.0.weight": torch.randn(4, 4), "bert_mlp.0.weight": torch.randn(4)}
    file = save(mae_checkpoint(encoder, extra if init == "urfound" else None), tmp_path / "c.pth")
    x = reference_blocks(
        encoder, source_input((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 3, 16
    )[-1]
    expected = F.layer_norm(x[:, 1:].mean(dim=1), (192,), eps=EPS)
    got = ours(init, file, "timm:vit_tiny_patch16_224")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_visionfm_teacher_gives_the_last_four_class_tokens(tmp_path):
    """VisionFM's linear evaluation (DINO's eval_linear, n_last_blocks=4): the class token of
    each of the last four blocks through the final norm, concatenated; its own mean/std."""
    encoder = vit_state(width=192, depth=12, patch=16, grid=2)
    teacher = {f"module.backbone.{k}": v for k, v in encoder.items()}
    teacher |= {
        "module.head.mlp.0.weight": torch.randn(8, 192),
        "module.backbone.masked_embed": torch.zeros(192),
    }
    file = save({"teacher": teacher, "student": teacher, "epoch": 100}, tmp_path / "vfm.pth")
    blocks = reference_blocks(encoder, source_input(VFM_MEAN, VFM_STD), 3, 16)
    expected = torch.cat([final_norm(encoder, b)[:, 0] for b in blocks[-4:]], dim=1)
    got = ours("visionfm", file, "timm:vit_tiny_patch16_224")
    assert got.shape == (2, 4 * 192)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def dinov2_teacher(encoder: dict) -> dict:
    """A DINOv2 training checkpoint (RETFound's DINOv2 release): the teacher's backbone.*,
    with the DINO and iBOT heads and the mask token beside it."""
    teacher = {f"backbone.{k}": v for k, v in encoder.items()}
    teacher |= {
        "backbone.mask_token": torch.zeros(1, encoder["cls_token"].shape[-1]),
        "dino_head.mlp.0.weight": torch.randn(8, 4),
        "ibot_head.mlp.0.weight": torch.randn(8, 4),
    }
    return {"teacher": teacher, "iteration": 5}


def test_retfound_dinov2_gives_the_normed_class_token(tmp_path):
    encoder = vit_state(width=384, depth=12, patch=14, grid=2, layer_scale=True)
    file = save(dinov2_teacher(encoder), tmp_path / "dinov2.pth")
    backbone = file_backbone("retfound-dinov2", file, "timm:vit_small_patch14_dinov2", 28).eval()
    with torch.no_grad():
        got = backbone.pool(normalise(IMAGES[..., :28, :28]))
    expected = final_norm(
        encoder, reference_blocks(encoder, normalise(IMAGES[..., :28, :28]), 6, 14)[-1]
    )[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert backbone.origin["notes"] == []


def test_position_embeddings_of_another_size_are_resampled_and_said(tmp_path):
    encoder = vit_state(width=384, depth=12, patch=14, grid=37, layer_scale=True)  # 518 px
    file = save(dinov2_teacher(encoder), tmp_path / "dinov2.pth")
    backbone = file_backbone("retfound-dinov2", file, "timm:vit_small_patch14_dinov2", 28)
    assert backbone.origin["notes"] == ["position embeddings resampled 37x37 -> 2x2 (bicubic)"]
    torch.testing.assert_close(backbone.net.cls_token, encoder["cls_token"])


def resnet_keys(arch: str) -> dict:
    net = getattr(torchvision.models, arch)()
    torch.manual_seed(2)
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.parametrize("init", ["flair", "keepfit"])
def test_flair_and_keepfit_vision_encoders_on_unnormalised_pixels(tmp_path, init):
    """FLAIR's (and KeepFIT's) image encoder: torchvision's ResNet-50 with fc = Identity, fed
    pixels / 255 without mean/std; the projection, text model and attention are not it."""
    state = resnet_keys("resnet50")
    ckpt = {f"vision_model.model.{k}": v for k, v in state.items()}
    ckpt |= {
        "vision_model.projection_head_vision.projection.weight": torch.randn(512, 2048),
        "text_model.model.embeddings.word_embeddings.weight": torch.randn(10, 8),
        "logit_scale": torch.tensor(4.6),
    }
    if init == "keepfit":
        ckpt |= {f"attention.W_{n}.weight": torch.randn(8, 8) for n in "qkvo"}
    file = save(ckpt, tmp_path / "flair.pth")
    reference = torchvision.models.resnet50()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(state)
    # in float64: a random ResNet-50's float32 features (magnitude ~10) already differ by
    # ~1e-5 between float32 and float64 on one input, so 1e-5 is tested where rounding is not
    pixels = IMAGES.double() / 255
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float64).view(1, 3, 1, 1)
    backbone = file_backbone(init, file, "resnet50", 32).double().eval()
    with torch.no_grad():
        expected = reference.double().eval()(pixels)
        got = backbone.pool((pixels - mean) / std)  # fundusfm's ImageNet-normalised input
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_plain_timm_state_dict_loads_as_file(tmp_path):
    encoder = vit_state(width=192, depth=12, patch=16, grid=2)
    file = save({"state_dict": {**encoder, "head.weight": torch.randn(5, 192)}}, tmp_path / "t.pth")
    # the file carries no preprocessing: timm's pretrained_cfg for the name says mean/std 0.5
    x = reference_blocks(encoder, source_input((0.5,) * 3, (0.5,) * 3), 3, 16)[-1]
    got = ours("file", file, "timm:vit_tiny_patch16_224")  # timm's default: the class token
    torch.testing.assert_close(got, final_norm(encoder, x)[:, 0], atol=1e-5, rtol=0)


def test_a_checkpoint_of_another_kind_is_refused_naming_both(tmp_path):
    encoder = vit_state(width=192, depth=12, patch=16, grid=2)
    vfm = save({"teacher": {f"backbone.{k}": v for k, v in encoder.items()}}, tmp_path / "v.pth")
    with pytest.raises(WeightsError, match=r"expected a retfound checkpoint.*visionfm"):
        file_backbone("retfound", vfm, "timm:vit_tiny_patch16_224", 32)
    mae = save(mae_checkpoint(encoder), tmp_path / "m.pth")
    with pytest.raises(WeightsError, match=r"expected a urfound checkpoint.*retfound"):
        file_backbone("urfound", mae, "timm:vit_tiny_patch16_224", 32)


def test_a_missing_or_unexpected_key_is_named(tmp_path):
    encoder = vit_state(width=192, depth=12, patch=16, grid=2)
    missing = {k: v for k, v in encoder.items() if k != "blocks.3.attn.proj.bias"}
    file = save(mae_checkpoint(missing), tmp_path / "a.pth")
    with pytest.raises(WeightsError, match=r"missing key .blocks\.3\.attn\.proj\.bias."):
        file_backbone("retfound", file, "timm:vit_tiny_patch16_224", 32)
    extra = {**encoder, "blocks.0.attn.q_norm.weight": torch.ones(64)}
    file = save(mae_checkpoint(extra), tmp_path / "b.pth")
    with pytest.raises(WeightsError, match=r"unexpected key .blocks\.0\.attn\.q_norm\.weight."):
        file_backbone("retfound", file, "timm:vit_tiny_patch16_224", 32)


def test_dinov2_chunked_blocks_and_registers(tmp_path):
    """DINOv2's training code keeps blocks in chunks (`blocks.C.I.`, I the block's own index)
    and registers as `register_tokens`, with a position for the class token that timm's
    register models fold into `cls_token`."""
    encoder = vit_state(width=384, depth=12, patch=14, grid=2, layer_scale=True)
    encoder["register_tokens"] = torch.randn(1, 4, 384) * 0.05
    chunked = {
        (f"blocks.{int(k.split('.')[1]) // 3}.{k[len('blocks.') :]}" if k.startswith("blocks.")
         else k): v
        for k, v in encoder.items()
    }  # fmt: skip
    file = save(dinov2_teacher(chunked), tmp_path / "dinov2.pth")
    arch = "timm:vit_small_patch14_reg4_dinov2"
    backbone = file_backbone("retfound-dinov2", file, arch, 28).eval()
    x = normalise(IMAGES[..., :28, :28])
    with torch.no_grad():
        got = backbone.pool(x)
    expected = final_norm(encoder, reference_blocks(encoder, x, 6, 14)[-1])[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_resampled_position_embeddings_are_retfounds_interpolation(tmp_path):
    """RETFound's `interpolate_pos_embed`: the grid's embeddings resized bicubic
    (align_corners False, no antialiasing), the class token's kept."""
    encoder = vit_state(width=192, depth=12, patch=16, grid=14)  # 224 px
    file = save(mae_checkpoint(encoder), tmp_path / "c.pth")
    backbone = file_backbone("retfound", file, "timm:vit_tiny_patch16_224", 64)  # 4x4 grid
    pos = encoder["pos_embed"]
    grid = pos[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(backbone.net.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    assert backbone.origin["notes"] == ["position embeddings resampled 14x14 -> 4x4 (bicubic)"]


def test_flair_and_keepfit_are_told_apart(tmp_path):
    state = {f"vision_model.model.{k}": v for k, v in resnet_keys("resnet18").items()}
    flair = save(state, tmp_path / "flair.pth")
    with pytest.raises(WeightsError, match=r"expected a keepfit checkpoint.*'flair'"):
        file_backbone("keepfit", flair, "resnet18", 32)
    keepfit = save({**state, "attention.W_q.weight": torch.randn(4, 4)}, tmp_path / "k.pth")
    with pytest.raises(WeightsError, match=r"expected a flair checkpoint.*'keepfit'"):
        file_backbone("flair", keepfit, "resnet18", 32)


def test_a_truncated_download_is_not_called_a_pickle(tmp_path):
    whole = save(mae_checkpoint(vit_state(width=192, depth=12, patch=16, grid=2)), tmp_path / "a")
    cut = tmp_path / "RETFound_cfp_weights.pth"
    cut.write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=r"not a readable PyTorch checkpoint.*download"):
        file_backbone("retfound", cut, "timm:vit_tiny_patch16_224", 32)


def test_a_published_init_names_its_file_in_the_init_itself(tmp_path):
    """`retfound:PATH` (a grid's init axis holds several files this way) is the same init
    as `retfound` with `model.init_file=PATH`; the grid's fingerprint follows the file."""
    file = save(mae_checkpoint(vit_state(width=192, depth=12, patch=16, grid=2)), tmp_path / "a")
    named = create_backbone("timm:vit_tiny_patch16_224", f"retfound:{file}", img_size=32)
    given = create_backbone("timm:vit_tiny_patch16_224", "retfound", init_file=file, img_size=32)
    for a, b in zip(named.state_dict().values(), given.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert named.origin == given.origin and named.origin["file"] == "a"
    before = (_init_digest(f"retfound:{file}", None), _init_digest("retfound", None, file))
    save(mae_checkpoint(vit_state(width=192, depth=12, patch=16, grid=3)), file)
    after = (_init_digest(f"retfound:{file}", None), _init_digest("retfound", None, file))
    assert before[0] != after[0] and before[1] != after[1]
    assert _init_digest("scratch", None) == "scratch"  # a name is its own digest, as before
