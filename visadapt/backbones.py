"""Backbones for the training scripts: any timm model, plus the small ViT and Swin the project pretrains.

``visadapt_procvit_tiny`` is registered with timm like any timm model, so ``timm.create_model(
"visadapt_procvit_tiny", pretrained=True, num_classes=10)`` loads the weights shipped in ``assets/`` (no
download): a 4-block, 96-wide ViT on 32x32 images with 4x4 patches (0.46 M parameters) whose head reads the
average of its patch tokens, trained by ``train/pretrain_backbone.py`` on the procedural scenes of
:mod:`visadapt.data.upstream` with a masked-image, per-patch, presence and layout objective.

``visadapt_procswin_tiny`` is its hierarchical sibling for dense prediction: a timm Swin Transformer on 64x64
images (patch 4, width 24, depths 1/1/2/1, window 4; 0.80 M parameters without its classifier) whose four
stages give feature maps of 16, 8, 4 and 2 pixels with 24, 48, 96 and 192 channels. It was pretrained on the
same scenes with the same four losses, its per-patch heads reading all four stages (``train/pretrain_backbone.py
--model visadapt_procswin_tiny``, the 32x32 renders upsampled to 64x64), and
``timm.create_model("visadapt_procswin_tiny", pretrained=True, num_classes=0)`` loads it from ``assets/``.
"""
from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from visadapt.data.procedural import IMAGE_SIZE
from visadapt.data.upstream import NUM_CATEGORIES, UPSTREAM_VERSION
from visadapt.names import EMBEDDED_CLIP, EMBEDDED_MODEL, EMBEDDED_SD, EMBEDDED_SWIN  # noqa: F401 - also named here

EMBEDDED_WEIGHTS = "procvit_tiny.safetensors"
# The head reads the average of the patch tokens, not the class token: the upstream objective trains every
# patch token (masked pixels, patch labels) and the pooled vector (presence, layout), and the class token of
# a backbone trained so carries little a new head can use (README, "The embedded default").
PROCVIT_TINY_ARGS = {"img_size": IMAGE_SIZE, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3,
                     "mlp_ratio": 4.0, "global_pool": "avg"}

EMBEDDED_SWIN_WEIGHTS = "procswin_tiny.safetensors"
#: input side of the embedded Swin: the upstream renders (32x32) are upsampled 2x, so that a 4x4 patch
#: embedding still leaves a 16x16 stage-1 map and four stages (16, 8, 4, 2) for a dense decoder
PROCSWIN_IMAGE_SIZE = 2 * IMAGE_SIZE
# Width 24 and depths 1/1/2/1 keep it cheap on a CPU (forward+backward of 64 images: ~0.14 s on one core);
# the heads keep 24 channels per head at every stage. With one block in stages 1-2, and stage maps of 4 and 2
# pixels fitting in one window in stages 3-4, no block shifts its windows: stages 1-2 attend within 4x4
# windows, stages 3-4 globally.
PROCSWIN_TINY_ARGS = {"img_size": PROCSWIN_IMAGE_SIZE, "patch_size": 4, "embed_dim": 24,
                      "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8), "window_size": 4, "mlp_ratio": 4.0}


def embedded_weights_path() -> Path:
    """The shipped upstream checkpoint of ``visadapt_procvit_tiny`` (package data ``visadapt.assets``)."""
    return Path(str(importlib.resources.files("visadapt.assets") / EMBEDDED_WEIGHTS))


def embedded_swin_weights_path() -> Path:
    """The shipped upstream checkpoint of ``visadapt_procswin_tiny`` (package data ``visadapt.assets``)."""
    return Path(str(importlib.resources.files("visadapt.assets") / EMBEDDED_SWIN_WEIGHTS))


# timm reads `default_cfgs` of the module that registers a model to learn its pretrained configs.
default_cfgs = generate_default_cfgs({
    f"{EMBEDDED_MODEL}.upstream_v{UPSTREAM_VERSION}": {
        "file": str(embedded_weights_path()),
        "num_classes": NUM_CATEGORIES,
        "input_size": (3, IMAGE_SIZE, IMAGE_SIZE),
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "mean": (0.5, 0.5, 0.5),  # the upstream run fed [0, 1] images normalised to [-1, 1]
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
    },
    f"{EMBEDDED_SWIN}.upstream_v{UPSTREAM_VERSION}": {
        "file": str(embedded_swin_weights_path()),
        "num_classes": NUM_CATEGORIES,
        "input_size": (3, PROCSWIN_IMAGE_SIZE, PROCSWIN_IMAGE_SIZE),
        "pool_size": (PROCSWIN_IMAGE_SIZE // 32, PROCSWIN_IMAGE_SIZE // 32),
        "fixed_input_size": True,
        "interpolation": "bilinear",  # the upstream run upsampled its 32x32 renders bilinearly
        "crop_pct": 1.0,
        "mean": (0.5, 0.5, 0.5),  # [0, 1] images normalised to [-1, 1], as for the ViT
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "apache-2.0",
    },
})


@register_model
def visadapt_procvit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32x32 inputs (patch 4, width 96, depth 4, 3 heads, average pooling), pretrained on procedural
    scenes."""
    args = dict(PROCVIT_TINY_ARGS, **kwargs)
    return build_model_with_cfg(VisionTransformer, EMBEDDED_MODEL, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **args)


@register_model
def visadapt_procswin_tiny(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """Swin for 64x64 inputs (patch 4, width 24, depths 1/1/2/1, window 4), pretrained on procedural scenes.

    ``forward_intermediates(x, intermediates_only=True)`` gives 4 maps
    ``(B, 24 * 2**s, 16 / 2**s, 16 / 2**s)`` for stages ``s = 0..3``; ``features_only=True`` works as for
    timm's own Swin models (NHWC maps).
    """
    args = dict(PROCSWIN_TINY_ARGS, **kwargs)
    out_indices = args.pop("out_indices", tuple(range(len(args["depths"]))))
    return build_model_with_cfg(SwinTransformer, EMBEDDED_SWIN, pretrained,
                                pretrained_filter_fn=swin_checkpoint_filter_fn,
                                feature_cfg={"flatten_sequential": True, "out_indices": out_indices}, **args)


#: a Hugging Face hub repo id, ``owner/name``
_HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def _looks_like_path(value: str) -> bool:
    """Whether ``--pretrained value`` names a local file, not a hub repo id (``owner/name``) or a tag."""
    if value.endswith(_CHECKPOINT_SUFFIXES) or value.startswith((".", "/", "~")):
        return True
    return os.sep in value and not _HUB_REPO_ID.fullmatch(value)


class BackboneWeightsError(OSError):
    """The weights ``--pretrained`` asks for cannot be had (no network, not in the hub cache under
    ``HF_HUB_OFFLINE``, an unknown or private hub repo); the message names the model, the source and the
    fixes."""


def check_backbone_choice(model: str, pretrained: str | None = "default", *,
                          flags: tuple[str, str] = ("--model", "--pretrained"),
                          embedded: str = f"{EMBEDDED_MODEL} (the embedded default; {EMBEDDED_SWIN} for dense "
                                          f"tasks)") -> None:
    """Refuse an unknown timm ``model`` (``ValueError``) or a ``pretrained`` path that is no file
    (``FileNotFoundError``) without building anything, so that a job can check its flags before any work.
    ``flags``: the job's names of the two flags; ``embedded``: the shipped model the message offers."""
    model_flag, weights_flag = flags
    if model not in timm.list_models(pretrained=False) and model.split(".")[0] not in timm.list_models():
        raise ValueError(f"{model_flag} {model!r} is not a timm model name; see `timm.list_models()`, "
                         f"or use {embedded}")
    choice = (pretrained or "default").strip()
    if choice not in ("default", "none") and not os.path.isfile(choice) and _looks_like_path(choice):
        raise FileNotFoundError(f"{weights_flag} {choice!r} is not an existing file; give a checkpoint path, a "
                                f"hub repo id, 'default' or 'none'")


def weights_error(model: str, source: str, err: BaseException, embedded: str = EMBEDDED_MODEL, *,
                  flag: str = "--model",
                  local: str = "--pretrained PATH (a local checkpoint file) or --pretrained none (random init)"
                  ) -> BackboneWeightsError:
    """The one-line :class:`BackboneWeightsError` for weights of ``model`` from ``source`` (a hub repo id or a
    description) that failed to load with ``err`` (a ``huggingface_hub`` / download error, or a library's error
    raised from one); ``embedded`` is the shipped model of the same kind that the message offers instead,
    ``flag`` the job's flag naming the model and ``local`` the local alternatives the message offers."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = constants.is_offline_mode()
    causes = []  # err and the errors it was raised from (diffusers wraps the hub's in an OSError of its own)
    while err is not None and err not in causes:
        causes.append(err)
        err = err.__cause__ or err.__context__
    err = causes[0]
    if any(isinstance(cause, GatedRepoError) for cause in causes):
        reason = "the hub repo is gated: accept its terms on huggingface.co, then log in (HF_TOKEN)"
    elif any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        reason = "no such hub repo, or a private one (log in: HF_TOKEN)"
    elif offline:
        reason = "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set (nothing is downloaded)"
    elif isinstance(err, FileNotFoundError):  # huggingface_hub's LocalEntryNotFoundError after its retries
        reason = "the hub could not be reached and the file is not in the local Hugging Face cache"
    else:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
    fix = ("run once with network access to cache them" if offline else
           "run once with network access to cache them, then set HF_HUB_OFFLINE=1 to skip the hub")
    return BackboneWeightsError(
        f"cannot load the weights of {flag} {model} from {source}: {reason}. Fix: {fix}; or pass {local}; or "
        f"train the embedded default {flag} {embedded} (shipped with visadapt, no download)")


def _hub_source(model: str) -> str:
    """Where timm takes ``model``'s default weights from, for :func:`weights_error`."""
    try:
        cfg = timm.models.get_pretrained_cfg(model)  # a bare architecture name gives its default tag's
    except Exception:  # noqa: BLE001 - only the wording of an error message depends on it
        cfg = None
    hub, url = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)
    return f"hub repo {hub} (timm's default)" if hub else url or "timm's default weights"


def input_size_options(model: str, input_size: int | None) -> dict[str, int]:
    """The ``timm.create_model`` arguments that build ``model`` for ``input_size`` px square inputs:
    ``{"img_size": input_size}`` for a model of fixed input size (timm's pretrained config says
    ``fixed_input_size``: ViT, DeiT, Swin, ...) whose default size differs, else ``{}`` (a CNN takes any size).
    As with ``timm.create_model(..., img_size=...)`` by hand, timm resamples the pretrained position embedding
    (and Swin's tables) to the new grid while loading the weights."""
    if input_size is None:
        return {}
    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except Exception:  # noqa: BLE001 - a model without a pretrained config keeps timm's own sizing
        cfg = None
    if cfg is None or not cfg.fixed_input_size or int(cfg.input_size[-1]) == int(input_size):
        return {}
    return {"img_size": int(input_size)}


def create_backbone(model: str, pretrained: str | None = "default", num_classes: int = 0, *,
                    input_size: int | None = None, **kwargs) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head, weights chosen by ``pretrained``.

    ``pretrained`` is ``"default"`` (timm's default weights for ``model``, from the hub or timm's cache; the
    embedded model's are in ``assets/``), ``"none"`` (random init), a local checkpoint file (safetensors or
    a torch checkpoint timm can read), or a Hugging Face hub repo id holding timm weights. ``input_size``
    (pixels, square) builds a fixed-size model such as a ViT for that size (:func:`input_size_options`; an
    ``img_size`` in ``kwargs`` wins).

    Raises ``ValueError`` / ``FileNotFoundError`` (see :func:`check_backbone_choice`) before building
    anything, and :class:`BackboneWeightsError` when hub weights cannot be loaded.
    """
    check_backbone_choice(model, pretrained)
    kwargs = {**input_size_options(model, input_size), "num_classes": num_classes, **kwargs}
    choice = (pretrained or "default").strip()
    if choice == "none":
        return timm.create_model(model, pretrained=False, **kwargs)
    if os.path.isfile(choice):
        return timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(choice)},
                                 **kwargs)
    from huggingface_hub.errors import EntryNotFoundError

    # source "hf-hub" is how timm's own "hf-hub:owner/name" model ids load: the repo wins over a weights file in the
    # model's config (the embedded models ship one) and over cached URL weights of its default tag, either of
    # which timm would otherwise load silently instead of the repo asked for
    overlay = {} if choice == "default" else {"pretrained_cfg_overlay": {"hf_hub_id": choice, "source": "hf-hub"}}
    try:
        return timm.create_model(model, pretrained=True, **overlay, **kwargs)
    # huggingface_hub's errors are OSErrors (EntryNotFoundError aside), as are urllib's for URL-hosted weights
    except (OSError, EntryNotFoundError) as err:
        raise weights_error(model, _hub_source(model) if choice == "default" else f"hub repo {choice}",
                            err) from err


# ------------------------------------------------------------------------------------------------- open_clip

# 32 px, patch 4, width 64 both towers, 2 blocks each; the standard 49408-token BPE vocabulary (so open_clip's
# shipped tokenizer works), a 16-token context. Random weights from a fixed seed: it stands in for a real CLIP
# in CPU runs and tests, not for CLIP's knowledge.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_CLIP_SEED = 0


def check_clip_choice(model: str, pretrained: str | None = "default") -> str:
    """The open_clip weights :func:`create_clip` will load for ``pretrained`` (a tag, a file or ``"none"``),
    checked without building or downloading anything: ``ValueError`` for an unknown model or tag,
    ``FileNotFoundError`` for a path that is no file."""
    import open_clip

    choice = (pretrained or "default").strip()
    if model == EMBEDDED_CLIP:
        return choice
    if model not in open_clip.list_models():
        raise ValueError(f"--model {model!r} is not an open_clip model name; see open_clip.list_models(), or use "
                         f"{EMBEDDED_CLIP} (the embedded default)")
    tags = [tag for name, tag in open_clip.list_pretrained() if name == model]
    if choice == "default":
        if not tags:
            raise ValueError(f"open_clip has no pretrained tag for {model!r}; pass --pretrained <file|tag|none>")
        return tags[0]
    if choice == "none" or os.path.isfile(choice):
        return choice
    if _looks_like_path(choice):
        raise FileNotFoundError(f"--pretrained {choice!r} is not an existing file; give a checkpoint path, an "
                                f"open_clip tag, 'default' or 'none'")
    if not open_clip.get_pretrained_cfg(model, choice):  # the lookup open_clip.create_model does
        raise ValueError(f"--pretrained {choice!r} is not an open_clip tag of {model} (its tags: "
                         f"{', '.join(tags) or 'none'}); give one of them, a checkpoint file, 'default' or 'none'")
    return choice


def _download_failure(err: BaseException) -> BaseException | None:
    """The hub or download error (an ``OSError`` or huggingface_hub's ``EntryNotFoundError``) that ``err`` was
    raised from or while handling, if any."""
    from huggingface_hub.errors import EntryNotFoundError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (OSError, EntryNotFoundError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def create_clip(model: str, pretrained: str | None = "default") -> tuple[nn.Module, dict]:
    """An open_clip model and its preprocessing facts ``{"image_size", "mean", "std"}``.

    ``model`` is an open_clip model name (``open_clip.list_models()``) or ``visadapt_tiny_clip`` (built from
    :data:`TINY_CLIP_CONFIG`, seeded, no weights). ``pretrained``: ``"default"`` (open_clip's first listed tag
    for ``model``), ``"none"`` (random init), a tag such as ``laion2b_s32b_b82k``, or a local checkpoint file.
    A tag trained with QuickGELU (``openai`` and the others open_clip marks ``quick_gelu``) gets a QuickGELU
    model whatever the name says (``ViT-B-32`` as ``ViT-B-32-quickgelu``).
    """
    import open_clip
    import torch

    choice = check_clip_choice(model, pretrained)
    if model == EMBEDDED_CLIP:
        with torch.random.fork_rng():
            torch.manual_seed(TINY_CLIP_SEED)
            clip = open_clip.CLIP(**TINY_CLIP_CONFIG)
    else:
        # open_clip 3.x builds a plain name (ViT-B-32) with GELU even for weights trained with QuickGELU (the
        # 'openai' tags and others whose pretrained config says quick_gelu) and only warns; the weights need the
        # activation they were trained with (older open_clip loaded 'openai' through a QuickGELU model)
        tag_cfg = open_clip.get_pretrained_cfg(model, choice) if choice != "none" else {}
        try:
            clip = open_clip.create_model(model, pretrained=None if choice == "none" else choice,
                                          force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
        except RuntimeError as err:  # open_clip wraps a failed download in a RuntimeError
            cause = _download_failure(err)
            if cause is None:
                raise
            hub = tag_cfg.get("hf_hub", "").rstrip("/")
            raise weights_error(model, f"open_clip tag {choice}" + (f" (hub repo {hub})" if hub else ""), cause,
                                embedded=EMBEDDED_CLIP) from err
    cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = clip.visual.image_size
    return clip, {"image_size": int(size[0] if isinstance(size, (tuple, list)) else size),
                  "mean": tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                  "std": tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))}


# ------------------------------------------------------------------------------------------ diffusers pipeline

#: the embedded text-to-image pipeline: a seeded, randomly initialised Stable Diffusion of a few hundred
#: thousand parameters, built from configs with the tokenizer vocabulary shipped in ``assets/`` (no download)
TINY_SD_SEED = 0
TINY_SD_CONFIG = {
    # SD1.5's UNet layout (cross-attention down/up blocks, ResNet blocks with two convolutions and group
    # norms) at widths 32/64, so every site a real SD1.5 adapter targets exists here too
    "unet": {"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
             "attention_head_dim": 8, "norm_num_groups": 8},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32),
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"), "norm_num_groups": 8, "sample_size": 32},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "projection_dim": 32},
}


def tiny_tokenizer_dir() -> Path:
    """The shipped byte-level BPE vocabulary (``vocab.json``, ``merges.txt``) of the embedded pipelines."""
    return Path(str(importlib.resources.files("visadapt.assets") / "tiny_clip_tokenizer"))


def create_tiny_sd_pipeline(seed: int = TINY_SD_SEED):
    """:data:`EMBEDDED_SD`: a ``StableDiffusionPipeline`` built from :data:`TINY_SD_CONFIG`, seeded, on CPU.

    The VAE downsamples by 2 (not SD's 8), so a 32x32 image is a 16x16 latent; it generates 32x32 images in
    well under a second on one CPU core. No safety checker (nothing to check on random weights).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tiny_tokenizer_dir()
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SD_CONFIG["unet"])
        vae = AutoencoderKL(**TINY_SD_CONFIG["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                    bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    **TINY_SD_CONFIG["text_encoder"]))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ------------------------------------------------------------------------------ PPAP world (pixel diffusion)

#: the embedded world of the PPAP guidance demo: 16x16 RGB images of one solid shape on a flat background,
#: the class being the shape; ``train/pretrain_ppap_world.py`` trains both models below on it
PPAP_WORLD_CLASSES = ("circle", "square", "triangle", "cross")
PPAP_WORLD_SIZE = 16
PPAP_WORLD_CLASSIFIER_WEIGHTS = "ppap_world_classifier.safetensors"
PPAP_WORLD_UNET_WEIGHTS = "ppap_world_unet.safetensors"
PPAP_WORLD_CLASSIFIER_ARGS = {"img_size": PPAP_WORLD_SIZE, "patch_size": 2, "embed_dim": 64, "depth": 2,
                              "num_heads": 2, "mlp_ratio": 2.0, "num_classes": len(PPAP_WORLD_CLASSES)}
PPAP_WORLD_UNET_CONFIG = {"sample_size": PPAP_WORLD_SIZE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
                          "block_out_channels": (32, 64, 64), "down_block_types": ("DownBlock2D",) * 3,
                          "up_block_types": ("UpBlock2D",) * 3, "norm_num_groups": 8}
#: the training noise schedule of the world's UNet (diffusers' DDPM defaults: 1000 steps, linear betas)
PPAP_WORLD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                       "clip_sample": True, "prediction_type": "epsilon"}


def assets_dir() -> Path:
    """The folder of the shipped package data ``visadapt.assets``."""
    return Path(str(importlib.resources.files("visadapt.assets")))


def _load_shipped(model: nn.Module, path: Path) -> nn.Module:
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python train/pretrain_ppap_world.py` to recreate it, "
                                f"or pass pretrained=False for random weights")
    state = load_file(str(path))
    expected = model.state_dict()
    if set(state) != set(expected):
        raise RuntimeError(f"{path} does not fit {type(model).__name__}: missing {sorted(set(expected) - set(state))[:5]}"
                           f", unexpected {sorted(set(state) - set(expected))[:5]}; recreate it with "
                           f"train/pretrain_ppap_world.py")
    model.load_state_dict({k: v.to(expected[k].dtype) if torch.is_floating_point(v) else v for k, v in state.items()})
    return model


def create_ppap_world_classifier(pretrained: bool = True, weights: str | os.PathLike | None = None) -> nn.Module:
    """The embedded world's classifier: a timm ViT (16x16 input, 2x2 patches, width 64, 2 blocks, 4 classes).

    It reads images ``(B, 3, 16, 16)`` in [-1, 1], the diffusion model's pixel space, and returns logits
    ``(B, 4)`` over :data:`PPAP_WORLD_CLASSES`. ``pretrained``: the weights shipped in ``assets/`` (or the file
    ``weights``); returned in eval mode.
    """
    model = VisionTransformer(**PPAP_WORLD_CLASSIFIER_ARGS)
    if pretrained or weights is not None:
        _load_shipped(model, Path(weights) if weights is not None else assets_dir() / PPAP_WORLD_CLASSIFIER_WEIGHTS)
    return model.eval()


def create_ppap_world_pipeline(pretrained: bool = True, scheduler: str = "ddpm", weights: str | os.PathLike | None = None):
    """The embedded world's unconditional pixel diffusion model as a diffusers pipeline, on CPU, in eval mode.

    A ``UNet2DModel`` of :data:`PPAP_WORLD_UNET_CONFIG` (1.06 M parameters; weights stored in fp16 in
    ``assets/``, loaded as fp32) generating ``(B, 3, 16, 16)`` images of :data:`PPAP_WORLD_CLASSES`.
    ``scheduler="ddpm"`` gives a ``DDPMPipeline`` with a ``DDPMScheduler``; ``"ddim"`` a ``DDIMPipeline`` with
    a ``DDIMScheduler`` on the same training schedule (:data:`PPAP_WORLD_SCHEDULE`).
    """
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    if scheduler not in ("ddpm", "ddim"):
        raise ValueError(f"scheduler={scheduler!r}: expected 'ddpm' or 'ddim'")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(**PPAP_WORLD_UNET_CONFIG)
    if pretrained or weights is not None:
        _load_shipped(unet, Path(weights) if weights is not None else assets_dir() / PPAP_WORLD_UNET_WEIGHTS)
    unet.eval()
    if scheduler == "ddim":
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**PPAP_WORLD_SCHEDULE))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**PPAP_WORLD_SCHEDULE))

PPAP_WORLD_EXPERTS_WEIGHTS = "ppap_world_experts.safetensors"


def ppap_world_experts_path() -> Path:
    """The shipped PPAP experts (5, rank 16) of :func:`create_ppap_world_classifier`, made by ``python
    train/ppap.py`` at its defaults (seed 0); ``visadapt.load_adapter(classifier, path)`` attaches them."""
    return assets_dir() / PPAP_WORLD_EXPERTS_WEIGHTS
