"""Tiny random-init models of every supported family, built from configs (no network)."""
from __future__ import annotations

import torch


def vit(**overrides):
    import timm

    kw = {"pretrained": False, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
          "num_classes": 5}
    kw.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", **kw)


def vit_dinov2():
    """DINOv2-style: register tokens and LayerScale (ls1/ls2 are real modules, not Identity)."""
    import timm

    return timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, embed_dim=32, depth=2,
                             num_heads=2, num_classes=5)


def swin():
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16,
                             depths=(1, 2), num_heads=(1, 2), window_size=4, num_classes=5)


def clip():
    from open_clip.model import CLIP

    return CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
    )


def convnext_clip(**vision_overrides):
    """An open_clip CLIP with a timm ConvNeXt image tower, configured as open_clip's ``convnext_large_d_320``
    (``timm_pool ""``, ``timm_proj "mlp"``, drop path 0.1) at the size of timm's ``convnext_atto`` (320 channels
    in the last stage; 64 px images give a 2 x 2 final map); text as :func:`clip`, 32 wide = embed_dim."""
    from open_clip.model import CLIP

    vision_cfg = {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "mlp", "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 64}
    vision_cfg.update(vision_overrides)
    return CLIP(embed_dim=32, vision_cfg=vision_cfg,
                text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})


def unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )


def unet_uncond():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8)


def example_input(family: str, model=None, batch: int = 2, seed: int = 0):
    """A deterministic input batch for ``model``; returns ``(args, kwargs)``."""
    g = torch.Generator().manual_seed(seed)
    if family in ("timm_vit", "timm_swin"):
        size = model.patch_embed.img_size if model is not None else (32, 32)
        return (torch.randn(batch, 3, *size, generator=g),), {}
    if family == "open_clip":
        image = torch.randn(batch, 3, 32, 32, generator=g)
        text = torch.randint(0, 64, (batch, 8), generator=g)
        return (image, text), {}
    if family == "diffusers_unet":
        sample = torch.randn(batch, 4, 8, 8, generator=g)
        ctx = torch.randn(batch, 3, 16, generator=g)
        return (sample, torch.tensor([10] * batch)), {"encoder_hidden_states": ctx}
    if family == "diffusers_unet_uncond":
        return (torch.randn(batch, 3, 8, 8, generator=g), torch.tensor([10] * batch)), {}
    raise ValueError(family)


def output_tensor(out) -> torch.Tensor:
    """One tensor from whatever the model returns (CLIP dicts/tuples, diffusers outputs)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, dict):
        return torch.cat([out["image_features"].flatten(), out["text_features"].flatten()])
    return torch.cat([o.flatten() for o in out if isinstance(o, torch.Tensor)])
