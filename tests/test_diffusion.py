"""visadapt.diffusion: the denoising objective, the image-prompt folder, resolution buckets, and fit with them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import visadapt
from visadapt.backbones import create_tiny_sd_pipeline
from visadapt.data.errors import DatasetError
from visadapt.diffusion import (
    BucketBatchSampler,
    ImagePromptFolder,
    TextToImageTrainer,
    denoising_evaluator,
    denoising_loss,
    nearest_buckets,
)
from visadapt.engine import TrainConfig, fit


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a shared machine extra threads
    oversubscribe the cores (a 2-step generation went from 0.2 s to 7 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_folder(root, sizes, prompt="{} red circles"):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (h, w) in enumerate(sizes):
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": prompt.format(i)}) + "\n")
    return root


@pytest.fixture
def pipe():
    pipe = create_tiny_sd_pipeline()
    visadapt.attach(pipe.unet, "lora", rank=4, targets=("to_q", "to_k", "to_v", "to_out"))
    return pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_is_the_scheduler_formula(pipe, tmp_path, prediction_type):
    data = ImagePromptFolder(write_folder(tmp_path / "d", [(32, 32)] * 2), pipe.tokenizer, resolution=32)
    model = TextToImageTrainer.from_pipeline(pipe, prediction_type=prediction_type)
    batch = {k: torch.stack([data[i][0][k] for i in range(2)]) for k in ("pixel_values", "input_ids")}
    prediction, target = model(batch, generator=torch.Generator().manual_seed(3))
    assert prediction.shape == target.shape == (2, 4, 16, 16)
    # the same draws, in the trainer's order, by hand
    g = torch.Generator().manual_seed(3)
    latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    acp = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = noise if prediction_type == "epsilon" else acp.sqrt() * noise - (1 - acp).sqrt() * latents
    torch.testing.assert_close(target, expected)
    noisy = acp.sqrt() * latents + (1 - acp).sqrt() * noise
    text = pipe.text_encoder(batch["input_ids"])[0]
    torch.testing.assert_close(prediction, pipe.unet(noisy, t, text).sample, atol=1e-5, rtol=1e-4)


def test_training_moves_only_the_adapter_and_lowers_the_fixed_noise_loss(pipe, tmp_path):
    data = ImagePromptFolder(write_folder(tmp_path / "d", [(32, 32)] * 4), pipe.tokenizer, resolution=32)
    model = TextToImageTrainer.from_pipeline(pipe)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "visadapt_" not in k}
    evaluator = denoising_evaluator(data, batch_size=4, seed=0)
    config = TrainConfig(epochs=12, lr=3e-3, batch_size=4, warmup_epochs=0, progress=False, weight_decay=0.0)
    result = fit(model, data, None, config, loss_fn=denoising_loss, evaluator=evaluator, metric="neg_denoising_loss")
    losses = [h["denoising_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert not model.vae.training and not model.text_encoder.training


def test_folder_errors_name_the_problem(tmp_path, pipe):
    with pytest.raises(DatasetError, match="does not exist"):
        ImagePromptFolder(tmp_path / "nope", pipe.tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no metadata.jsonl"):
        ImagePromptFolder(tmp_path / "empty", pipe.tokenizer)
    root = write_folder(tmp_path / "d", [(32, 32)])
    for line, message in (('{"file_name": "0.png"}', "lacks a string 'text'"),
                          ("not json", "not valid JSON"),
                          ('{"file_name": "missing.png", "text": "x"}', "missing.png")):
        (root / "metadata.jsonl").write_text(line + "\n")
        with pytest.raises(DatasetError, match=message):
            ImagePromptFolder(root, pipe.tokenizer)


def test_sharded_folders_read_as_one_dataset(tmp_path, pipe):
    write_folder(tmp_path / "d" / "shard_00000", [(32, 32)] * 2, "a {}")
    write_folder(tmp_path / "d" / "shard_00001", [(32, 32)] * 3, "b {}")
    data = ImagePromptFolder(tmp_path / "d", pipe.tokenizer, resolution=16)
    assert data.prompts == ["a 0", "a 1", "b 0", "b 1", "b 2"]
    pixels = data[0][0]["pixel_values"]
    assert pixels.shape == (3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1


def test_bucket_batches_have_one_resolution_and_mix_them_per_epoch():
    buckets = [(32, 32), (32, 48), (48, 32)]
    sampler = BucketBatchSampler(40, 4, buckets=buckets, seed=1)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 10
    assert all(len({(h, w) for _, h, w in batch}) == 1 and len(batch) == 4 for batch in epoch0)
    assert {batch[0][1:] for batch in epoch0} == set(buckets)
    assert sorted(i for batch in epoch0 for i, _, _ in batch) == list(range(40))
    assert list(sampler) == epoch0  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and len(sampler) == 10

    sizes = [(64, 64), (60, 90), (90, 60), (64, 100)] * 3
    fixed = BucketBatchSampler(12, 2, item_buckets=nearest_buckets(sizes, buckets), seed=0)
    assert nearest_buckets(sizes, buckets)[:4] == [(32, 32), (32, 48), (48, 32), (32, 48)]
    for epoch in range(2):
        fixed.set_epoch(epoch)
        assert len(list(fixed)) == len(fixed) == 5  # 3 + 1 + 1: the odd items of a bucket drop
        for batch in fixed:
            assert {nearest_buckets([sizes[i]], buckets)[0] for i, _, _ in batch} == {batch[0][1:]}
    with pytest.raises(ValueError, match="no full batch"):
        BucketBatchSampler(3, 4, buckets=buckets)
    with pytest.raises(ValueError, match="exactly one"):
        BucketBatchSampler(3, 1)


def test_fit_trains_on_bucketed_mixed_resolution_batches(pipe, tmp_path):
    data = ImagePromptFolder(write_folder(tmp_path / "d", [(32, 32), (32, 48)] * 3), pipe.tokenizer, resolution=32)
    sampler = BucketBatchSampler(len(data), 2, buckets=[(32, 32), (32, 48), (48, 32)], seed=0)
    shapes = []
    model = TextToImageTrainer.from_pipeline(pipe)
    model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0]["pixel_values"].shape[-2:])))
    config = TrainConfig(epochs=2, lr=1e-3, batch_size=2, warmup_epochs=0, progress=False)
    fit(model, data, None, config, loss_fn=denoising_loss,
        evaluator=lambda m, a: {"neg_denoising_loss": 0.0}, metric="neg_denoising_loss", batch_sampler=sampler)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += [batch[0][1:] for batch in sampler]
    assert shapes == expected and len(set(shapes)) > 1
