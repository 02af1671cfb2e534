"""Text-to-image training pieces shared by the diffusion train scripts (``train/selma.py``, ``train/resadapter.py``).

Three parts, each usable with :func:`visadapt.engine.fit`:

* :class:`TextToImageTrainer`: an ``nn.Module`` around a Stable-Diffusion-style pipeline's components (frozen VAE,
  frozen text encoder, the UNet carrying the visadapt adapters being trained). ``forward(batch)`` takes
  ``{"pixel_values": (B, 3, H, W) in [-1, 1], "input_ids": (B, L)}`` and returns ``(prediction, target)``, both
  ``(B, C, H/f, W/f)`` latents (``f`` the VAE downsampling factor): the denoising objective of the diffusers
  ``train_text_to_image`` examples. :func:`denoising_loss` is the matching ``loss_fn`` (MSE in fp32).
* :class:`ImagePromptFolder`: (image file, prompt) pairs from a folder in the layout of diffusers' ``imagefolder``
  (below), returned as ``({"pixel_values", "input_ids"}, index)``, the ``(inputs, label)`` pair ``fit`` expects;
  the label is the item index, which the loss ignores.
* :class:`BucketBatchSampler`: multi-resolution batches, one ``(height, width)`` per batch, resolutions and aspect
  ratios mixed over an epoch, deterministic in ``(seed, epoch)``; pass it as ``fit(..., batch_sampler=...)``.

Folder layout read by :class:`ImagePromptFolder` (the one ``train/selma_data.py`` writes)::

    <root>/metadata.jsonl              one JSON object per line: {"file_name": "0001.png", "text": "three circles"}
    <root>/0001.png ...                file_name is relative to the folder holding that metadata.jsonl
    <root>/shard_00000/metadata.jsonl  metadata files in sub-folders are read too (sorted by path), so a sharded
    <root>/shard_00000/00000.png       dataset is one dataset

A minimal run::

    pipe = visadapt.backbones.create_tiny_sd_pipeline()
    visadapt.attach(pipe.unet, "lora", rank=4, targets=("to_q", "to_k", "to_v", "to_out"))
    model = TextToImageTrainer.from_pipeline(pipe)
    data = ImagePromptFolder(root, pipe.tokenizer, resolution=32)
    fit(model, data, None, TrainConfig(...), loss_fn=denoising_loss,
        evaluator=denoising_evaluator(data_val), metric="neg_denoising_loss")
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from visadapt.data.errors import DatasetError
from visadapt.progress import Progress

METADATA_FILE = "metadata.jsonl"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ------------------------------------------------------------------------------------------ the objective


def check_pipeline_choice(name: str, embedded: str | None = None, flag: str = "--pipeline") -> None:
    """Refuse, without loading or downloading anything, a ``name`` that can be no pipeline: a local folder
    without ``model_index.json`` (``ValueError``), a path that does not exist (``FileNotFoundError``), or a
    string that is no hub repo id (``ValueError``). ``embedded`` (default: ``visadapt_tiny_sd``) is accepted as
    is and offered in the messages; ``flag`` is the job's flag that gave ``name``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from visadapt.backbones import EMBEDDED_SD, _looks_like_path

    embedded = embedded or EMBEDDED_SD
    if name == embedded:
        return
    fix = f"give a diffusers pipeline folder (pipe.save_pretrained), a hub repo id (owner/name) or {embedded}"
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")):
            raise ValueError(f"{flag} {name} is a folder without model_index.json, so no diffusers pipeline; {fix}")
        return
    if os.path.exists(name):
        raise ValueError(f"{flag} {name} is a file, not a pipeline folder; {fix}")
    if _looks_like_path(name):
        raise FileNotFoundError(f"{flag} {name} does not exist; {fix}")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(f"{flag} {name!r} is neither a folder nor a hub repo id; {fix}") from None


def load_pipeline(name: str, flag: str = "--pipeline"):
    """``visadapt_tiny_sd`` (the embedded pipeline, :func:`visadapt.backbones.create_tiny_sd_pipeline`), or a
    diffusers pipeline from a local folder or hub id (``DiffusionPipeline.from_pretrained``, fp32, on CPU).

    A hub pipeline that cannot be had (offline and not cached, no such repo, gated) raises
    :class:`visadapt.backbones.BackboneWeightsError`, one line naming ``flag``, the repo and the fixes."""
    from visadapt.backbones import EMBEDDED_SD, create_tiny_sd_pipeline, weights_error

    if name == EMBEDDED_SD:
        return create_tiny_sd_pipeline()
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return DiffusionPipeline.from_pretrained(name)
    except (OSError, EntryNotFoundError) as err:  # diffusers raises OSError for a pipeline it cannot fetch
        if os.path.isdir(name):  # a local folder's own fault: diffusers' message names the file
            raise
        raise weights_error(name, f"hub repo {name}", err, embedded=EMBEDDED_SD, flag=flag,
                            local=f"{flag} FOLDER (a local diffusers pipeline folder)") from err


class TextToImageTrainer(nn.Module):
    """The denoising objective of a latent text-to-image model, for training adapters on its UNet.

    ``unet``: a diffusers ``UNet2DConditionModel`` (with visadapt adapters attached; its base weights frozen by
    :func:`visadapt.attach`). ``vae`` and ``text_encoder`` are frozen here (``requires_grad=False``, kept in eval
    mode even when the trainer is put in train mode) and run under ``no_grad``. ``noise_scheduler``: a diffusers
    training scheduler (``add_noise``, ``get_velocity``, ``config.num_train_timesteps``, ``config.prediction_type``);
    :meth:`from_pipeline` builds a ``DDPMScheduler`` from the pipeline scheduler's config, as the diffusers examples
    do. ``prediction_type`` overrides the scheduler's (``epsilon``, ``v_prediction`` or ``sample``).
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, noise_scheduler, *,
                 prediction_type: str | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0))
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @classmethod
    def from_pipeline(cls, pipe, *, prediction_type: str | None = None) -> TextToImageTrainer:
        """The trainer for a Stable-Diffusion-style pipeline (``unet``, ``vae``, ``text_encoder``, ``scheduler``)."""
        from diffusers import DDPMScheduler

        missing = [name for name in ("unet", "vae", "text_encoder", "scheduler") if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"{type(pipe).__name__} lacks {', '.join(missing)}: TextToImageTrainer trains the UNet "
                             f"of Stable-Diffusion-style pipelines (one CLIP text encoder and a VAE)")
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError(f"{type(pipe).__name__} has a second text encoder (SDXL-style): its UNet also needs "
                             f"pooled text embeddings and time ids, which TextToImageTrainer does not build; train "
                             f"on an SD1.x/SD2.x pipeline")
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, scheduler, prediction_type=prediction_type)

    def train(self, mode: bool = True) -> TextToImageTrainer:
        super().train(mode)
        self.vae.eval()  # frozen parts never switch dropout/statistics on
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> latents ``(B, C, H/f, W/f)``, sampled and scaled as the pipeline expects."""
        dist = self.vae.encode(pixel_values.to(self._vae_dtype)).latent_dist
        latents = dist.sample(generator=generator)
        return (latents.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` -> text embeddings ``(B, L, D)`` (last hidden state, as SD conditions on)."""
        return self.text_encoder(input_ids)[0]

    @property
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, target)``, each ``(B, C, h, w)``: the UNet's output on noised latents and what it should be.

        Timesteps are uniform over ``[0, num_train_timesteps)``; noise is standard normal. Both come from the
        global RNG (which :func:`visadapt.engine.fit` checkpoints) or from ``generator`` when given (evaluation
        with fixed noise).
        """
        if not isinstance(batch, dict) or not {"pixel_values", "input_ids"} <= set(batch):
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"TextToImageTrainer takes a batch {{'pixel_values': (B, 3, H, W), 'input_ids': (B, L)}}; "
                             f"got {got}")
        pixels, input_ids = batch["pixel_values"], batch["input_ids"]
        latents = self.encode_images(pixels, generator)
        text = self.encode_prompts(input_ids)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=generator,
                                  device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        unet_dtype = next(self.unet.parameters()).dtype
        prediction = self.unet(noisy.to(unet_dtype), timesteps, text.to(unet_dtype)).sample
        return prediction, target


def denoising_loss(outputs: tuple[torch.Tensor, torch.Tensor], labels=None) -> torch.Tensor:
    """Mean squared error of ``(prediction, target)`` in fp32: the ``loss_fn`` for ``fit``; ``labels`` is unused."""
    prediction, target = outputs
    return F.mse_loss(prediction.float(), target.float())


def denoising_evaluator(dataset: Dataset, *, batch_size: int = 8, seed: int = 0,
                        batch_sampler: Sampler | None = None) -> Callable[[nn.Module, object], dict[str, float]]:
    """An ``evaluator(model, accelerator)`` for ``fit``: the denoising loss on ``dataset`` with fixed noise.

    The noise, timesteps and VAE samples come from a generator seeded with ``seed`` for every evaluation, so two
    evaluations differ only through the adapter. Returns ``{"denoising_loss", "neg_denoising_loss", "samples"}``;
    ``fit`` keeps the epoch with the highest ``metric``, so pass ``metric="neg_denoising_loss"``. A
    ``batch_sampler`` (e.g. a :class:`BucketBatchSampler`) is needed for datasets of several resolutions. Runs on
    the main process's share only when one process trains; with several processes every process evaluates the
    whole set (the loss is a mean, so the result is the same everywhere).
    """
    def evaluate(model: nn.Module, accelerator) -> dict[str, float]:
        bare = accelerator.unwrap_model(model)
        was_training = bare.training
        bare.eval()
        loader = (DataLoader(dataset, batch_sampler=batch_sampler) if batch_sampler is not None
                  else DataLoader(dataset, batch_size=batch_size, shuffle=False))
        generator = torch.Generator(device=accelerator.device).manual_seed(seed)
        total, count = 0.0, 0
        with torch.no_grad():
            for inputs, _ in Progress(loader, desc="evaluating denoising loss", unit="batches", leave=False):
                inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
                prediction, target = bare(inputs, generator=generator)
                n = target.shape[0]
                total += denoising_loss((prediction, target)).item() * n
                count += n
        bare.train(was_training)
        loss = total / max(count, 1)
        return {"denoising_loss": loss, "neg_denoising_loss": -loss, "samples": count}

    return evaluate


# ------------------------------------------------------------------------------------------ the dataset


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``(N, tokenizer.model_max_length)``, padded and truncated as Stable Diffusion pipelines do."""
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def read_metadata(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """``[(image path, prompt)]`` from every ``metadata.jsonl`` under ``root`` (sorted by path, lines in order).

    Raises :class:`DatasetError` naming the file and line for a missing folder, no metadata, a line that is not
    a JSON object with string ``file_name`` and ``text``, or an image file that does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image-prompt folder {str(root)!r} does not exist; pass a folder holding {METADATA_FILE}")
    files = sorted(root.rglob(METADATA_FILE))
    if not files:
        raise DatasetError(f"{root} holds no {METADATA_FILE}; an image-prompt folder has one JSON object per line "
                           f'like {{"file_name": "0001.png", "text": "a prompt"}} (diffusers imagefolder layout)')
    items: list[tuple[Path, str]] = []
    for meta in files:
        for line_no, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{meta}:{line_no}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DatasetError(f"{where} is not valid JSON ({err}); each line is one object with "
                                   f"'file_name' and 'text'") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{where} holds a {type(record).__name__}, not an object with 'file_name' and 'text'")
            for field in ("file_name", "text"):
                if not isinstance(record.get(field), str):
                    raise DatasetError(f"{where} lacks a string {field!r} (has {sorted(record)}); each line needs "
                                       f"'file_name' (image path relative to {meta.parent}) and 'text' (the prompt)")
            image = meta.parent / record["file_name"]
            if not image.is_file():
                raise DatasetError(f"{where} names {record['file_name']!r}, but {image} does not exist")
            items.append((image, record["text"]))
    if not items:
        raise DatasetError(f"the {METADATA_FILE} files under {root} list no images")
    return items


def resize_and_crop(image: Image.Image, height: int, width: int, *, random_crop: bool = False,
                    generator: torch.Generator | None = None) -> Image.Image:
    """``image`` scaled (bicubic) to cover ``height x width``, then cropped to it (centred, or at random)."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    if random_crop:
        top = int(torch.randint(0, image.height - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, image.width - width + 1, (1,), generator=generator))
    else:
        top, left = (image.height - height) // 2, (image.width - width) // 2
    return image.crop((left, top, left + width, top + height))


class ImagePromptFolder(Dataset):
    """(image, prompt) pairs from a folder (layout in the module docstring) for :class:`TextToImageTrainer`.

    ``dataset[i]`` is ``({"pixel_values": (3, R, R), "input_ids": (L,)}, i)`` at the square ``resolution`` R;
    ``dataset[(i, height, width)]`` (the keys :class:`BucketBatchSampler` yields) is the same item at
    ``height x width``. Images are scaled to cover the size and cropped (centred; at random with
    ``random_crop``), flipped horizontally with probability 0.5 when ``random_flip``, and mapped to [-1, 1].
    ``tokenizer`` is the pipeline's (``pipe.tokenizer``).
    """

    def __init__(self, root: str | os.PathLike, tokenizer, resolution: int = 512, *, random_crop: bool = False,
                 random_flip: bool = False) -> None:
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution={resolution!r} must be a positive integer (pixels)")
        self.root = Path(root)
        self.items = read_metadata(self.root)
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.input_ids = tokenize_prompts(tokenizer, [text for _, text in self.items])

    def __len__(self) -> int:
        return len(self.items)

    @property
    def prompts(self) -> list[str]:
        return [text for _, text in self.items]

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image, read from the file headers only."""
        sizes = []
        for path, _ in self.items:
            with Image.open(path) as image:
                sizes.append((image.height, image.width))
        return sizes

    def __getitem__(self, key: int | tuple[int, int, int]):
        if isinstance(key, tuple):
            index, height, width = key
        else:
            index, height, width = key, self.resolution, self.resolution
        path, _ = self.items[index]
        with Image.open(path) as image:
            image = resize_and_crop(image.convert("RGB"), height, width, random_crop=self.random_crop)
        pixels = torch.from_numpy(_as_array(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return {"pixel_values": pixels, "input_ids": self.input_ids[index]}, index


def _as_array(image: Image.Image):
    import numpy as np

    return np.asarray(image, dtype=np.uint8).copy()


# ------------------------------------------------------------------------------------------ bucketing


def nearest_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each image ``(height, width)`` the bucket ``(height, width)`` of closest aspect ratio (in log scale;
    ties go to the bucket listed first)."""
    if not buckets:
        raise ValueError("buckets is empty: give at least one (height, width)")
    logs = [math.log(h / w) for h, w in buckets]
    out = []
    for h, w in sizes:
        target = math.log(h / w)
        out.append(tuple(buckets[min(range(len(buckets)), key=lambda j: abs(logs[j] - target))]))
    return out


class BucketBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Batches of keys ``(index, height, width)`` with one ``(height, width)`` per batch.

    Two ways to give items their bucket:

    * ``item_buckets`` (one ``(height, width)`` per item, e.g. :func:`nearest_buckets` of the image sizes): items
      keep their bucket every epoch (aspect-ratio bucketing).
    * otherwise every epoch shuffles all items, cuts them into batches and draws each batch's bucket uniformly
      from ``buckets`` (multi-resolution training: an image is seen at different resolutions and aspect ratios
      over the epochs, as ResAdapter's mixed-resolution training does).

    With ``item_buckets``, items are shuffled within their bucket, cut into batches of ``batch_size`` and the
    batches of all buckets shuffled together, so an epoch mixes resolutions. A smaller last batch (per bucket) is
    dropped when ``drop_last``, which multi-process training needs (every batch is split over the processes).
    The number of batches is the same every epoch (``fit`` sizes its schedule from it). Everything is
    drawn from ``(seed, epoch)`` alone; call :meth:`set_epoch` (``fit`` does) before iterating.
    """

    def __init__(self, num_items: int, batch_size: int, *, buckets: Sequence[tuple[int, int]] | None = None,
                 item_buckets: Sequence[tuple[int, int]] | None = None, seed: int = 0, drop_last: bool = True) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if (buckets is None) == (item_buckets is None):
            raise ValueError("give exactly one of buckets (drawn per item and epoch) or item_buckets (fixed per item)")
        if item_buckets is not None and len(item_buckets) != num_items:
            raise ValueError(f"item_buckets has {len(item_buckets)} entries for {num_items} items; give one per item")
        chosen = [tuple(b) for b in (buckets if buckets is not None else item_buckets)]
        for bucket in chosen:
            if len(bucket) != 2 or not all(isinstance(v, int) and v > 0 for v in bucket):
                raise ValueError(f"bucket {bucket!r} must be a (height, width) pair of positive integers")
        self.num_items = num_items
        self.batch_size = batch_size
        self.buckets = sorted(set(chosen)) if buckets is not None else None
        self.item_buckets = [tuple(b) for b in item_buckets] if item_buckets is not None else None
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(f"{num_items} items in batches of {batch_size} give no full batch per bucket; lower "
                             f"batch_size, use fewer buckets or pass drop_last=False")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunks(self, indices: list[int]) -> list[list[int]]:
        chunks = [indices[start:start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        return [c for c in chunks if len(c) == self.batch_size or not self.drop_last]

    def _batches(self) -> list[list[tuple[int, int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.item_buckets is None:
            order = torch.randperm(self.num_items, generator=generator).tolist()
            chunks = self._chunks(order)
            picks = torch.randint(0, len(self.buckets), (len(chunks),), generator=generator).tolist()
            return [[(i, *self.buckets[p]) for i in chunk] for chunk, p in zip(chunks, picks, strict=True)]
        members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.item_buckets):
            members[bucket].append(index)
        batches = []
        for bucket in sorted(members):
            indices = members[bucket]
            shuffled = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
            batches.extend([(i, *bucket) for i in chunk] for chunk in self._chunks(shuffled))
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        if self.item_buckets is None:
            return len(self._chunks(list(range(self.num_items))))
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for bucket in self.item_buckets:
            counts[bucket] += 1
        return sum(len(self._chunks(list(range(n)))) for n in counts.values())
