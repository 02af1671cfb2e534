"""ResAdapter: ResCLoRA + ResENorm on the tiny Stable Diffusion pipeline, the official two-file checkpoint layout,
generation off the training resolution, composition with a diffusers LoRA, and the real UNets' parameter counts."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

import visadapt
from tests import pipeline_helpers
from tests.pipeline_helpers import every_tensor as snapshot
from tests.pipeline_helpers import generate_np as generate
from visadapt import formats
from visadapt.backbones import create_tiny_sd_pipeline
from visadapt.lora_layouts import LoraLayoutError
from visadapt.plugins.resadapter import ResAdapterConfig, ResolutionNorm, official_state

SD15_UNET = {
    "sample_size": 64, "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 768, "attention_head_dim": 8,
}
SDXL_UNET = {
    "sample_size": 128, "layers_per_block": 2, "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py


def assert_same_tensors(module, saved):
    """``module``'s tensors are ``saved`` (a :func:`snapshot`) bit for bit."""
    pipeline_helpers.assert_same_tensors(saved, snapshot(module))


def official_files(unet, seed=0):
    """A checkpoint with the official key names for this UNet: kohya LoRA (float16, alpha 8, rank 16) on every
    down/upsampler conv, and perturbed float32 affines of every ResNet norm under diffusers names."""
    gen = torch.Generator().manual_seed(seed)
    lora, norms = {}, {}
    for path, module in unet.named_modules():
        if path.endswith(("downsamplers.0.conv", "upsamplers.0.conv")):
            name = "lora_unet_" + path.replace(".", "_")
            c_in, c_out = module.in_channels, module.out_channels
            lora[f"{name}.lora_down.weight"] = (torch.randn(16, c_in, 3, 3, generator=gen) * 0.05).half()
            lora[f"{name}.lora_up.weight"] = (torch.randn(c_out, 16, 1, 1, generator=gen) * 0.05).half()
            lora[f"{name}.alpha"] = torch.tensor(8.0).half()
        if ".resnets." in path and path.endswith((".norm1", ".norm2")):
            norms[f"{path}.weight"] = module.weight.detach() + torch.randn(module.weight.shape, generator=gen) * 0.2
            norms[f"{path}.bias"] = module.bias.detach() + torch.randn(module.bias.shape, generator=gen) * 0.2
    return lora, norms


def test_default_config_matches_the_released_sd15_layout_and_count_formula_on_the_tiny_unet():
    unet = create_tiny_sd_pipeline().unet
    visadapt.attach(unet, "resadapter")
    items = visadapt.inject.attached(unet)
    loras = {i.host_path: i.module for i in items if isinstance(i.module, visadapt.layers.LoRA)}
    norms = {i.host_path: i.module for i in items if isinstance(i.module, ResolutionNorm)}
    assert set(loras) == {"down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"}
    assert all((m.rank, m.alpha) == (16, 8.0) for m in loras.values())
    # every ResNet norm of down, mid and up blocks; no attention-block norm
    resnet_norms = {p for p, _ in unet.named_modules() if ".resnets." in p and p.endswith((".norm1", ".norm2"))}
    assert set(norms) == resnet_norms and any(p.startswith("mid_block.") for p in norms)
    # formula: r * (C_in * 3 * 3 + C_out) per LoRA conv plus 2 * C per norm
    lora_count = sum(16 * (m.A.in_channels * 9 + m.B.out_channels) for m in loras.values())
    norm_count = sum(2 * unet.get_submodule(p).num_channels for p in norms)
    assert lora_count == 16 * (32 * 9 + 32) + 16 * (64 * 9 + 64)
    assert visadapt.summary(unet).adapter_params == lora_count + norm_count == 17_344


@pytest.mark.parametrize("config, lora_paths, lora_count, norm_count, keys", [
    (SD15_UNET, 6, 870_400, 99_840, (18, 88)),
    (SDXL_UNET, 4, 460_800, 66_560, (12, 68)),
])
def test_sd15_and_sdxl_counts_match_the_readme_and_the_released_files(config, lora_paths, lora_count, norm_count,
                                                                      keys):
    with torch.device("meta"):  # the real architectures, no weights: nothing is downloaded or allocated
        unet = UNet2DConditionModel(**config)
    visadapt.attach(unet, "resadapter")
    items = visadapt.inject.attached(unet)
    assert sum(isinstance(i.module, visadapt.layers.LoRA) for i in items) == lora_paths
    assert sum(p.numel() for i in items if isinstance(i.module, visadapt.layers.LoRA)
               for p in i.module.parameters()) == lora_count
    assert visadapt.summary(unet).adapter_params == lora_count + norm_count  # README: 0.9M (SD1.5), 0.5M (SDXL)
    lora, norms = official_state(unet)
    assert (len(lora), len(norms)) == keys  # tensors in the released pytorch_lora_weights / norm files
    assert lora["lora_unet_down_blocks_1_downsamplers_0_conv.lora_down.weight"].shape == (16, 640, 3, 3)
    assert lora["lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight"].shape == (1280, 16, 1, 1)
    assert "mid_block.resnets.1.norm2.bias" in norms


def test_fresh_adapter_is_the_identity_the_weight_scales_the_lora_only_and_merge_is_exact():
    pipe = create_tiny_sd_pipeline()
    base, original = generate(pipe), snapshot(pipe.unet)
    visadapt.attach(pipe.unet, "resadapter")
    assert generate(pipe) == pytest.approx(base, abs=1e-6)  # LoRA up is zero, norms copy the base affine
    lora, norms = official_files(pipe.unet)
    visadapt.detach(pipe.unet)
    norms_only = copy.deepcopy(pipe)  # the official loader at weight 0: the norms load in full, the LoRA adds 0
    norms_only.unet.load_state_dict(norms, strict=False)
    expected_at_zero = generate(norms_only)
    visadapt.plugins.resadapter.load_official(pipe.unet, lora, norms, "res")
    full = generate(pipe)
    assert abs(full - base).max() > 1e-3
    visadapt.set_weight(pipe.unet, "res", 0.0)
    zero = generate(pipe)
    assert zero == pytest.approx(expected_at_zero, abs=1e-6) and abs(zero - base).max() > 1e-3
    visadapt.set_weight(pipe.unet, "res", 0.5)
    half = generate(pipe)
    assert abs(half - zero).max() > 1e-4 and abs(half - full).max() > 1e-4
    visadapt.merge(pipe.unet, "res")
    assert generate(pipe) == pytest.approx(half, abs=1e-5)
    visadapt.unmerge(pipe.unet, "res")
    assert generate(pipe) == pytest.approx(half, abs=1e-6)
    visadapt.merge(pipe.unet, "res")
    visadapt.detach(pipe.unet, "res")  # detach unmerges first
    assert_same_tensors(pipe.unet, original)


def test_norm_weight_blend_is_an_option_off_by_default_that_blends_the_norms_with_the_weight():
    pipe = create_tiny_sd_pipeline()
    base, original = generate(pipe), snapshot(pipe.unet)
    lora, norms = official_files(pipe.unet)
    donor = copy.deepcopy(pipe.unet)
    assert visadapt.plugins.resadapter.load_official(donor, lora, norms, "res").norm_weight_blend is False
    cfg = visadapt.attach(pipe.unet, "resadapter", adapter_name="res", norm_weight_blend=True)
    assert cfg.norm_weight_blend is True
    visadapt.inject.load_adapter_state(pipe.unet, visadapt.inject.adapter_state(donor, "res"), "res")
    visadapt.set_weight(pipe.unet, "res", 0.0)
    assert generate(pipe) == pytest.approx(base, abs=1e-6)  # blended: weight 0 is the base model
    visadapt.set_weight(pipe.unet, "res", 0.5)
    half = generate(pipe)
    visadapt.set_weight(donor, "res", 0.5)
    unblended = generate(type(pipe)(**{**pipe.components, "unet": donor}))
    assert abs(half - unblended).max() > 1e-3  # the two semantics differ at w = 0.5
    visadapt.merge(pipe.unet, "res")
    assert generate(pipe) == pytest.approx(half, abs=1e-5)
    visadapt.detach(pipe.unet, "res")
    assert_same_tensors(pipe.unet, original)


@pytest.mark.parametrize("lora_name, norm_name", [
    ("pytorch_lora_weights.safetensors", "diffusion_pytorch_model.safetensors"),  # current release names
    ("resolution_lora.safetensors", "resolution_normalization.safetensors"),  # March 2024 names
])
def test_load_visadapt_weight_equals_the_official_set_adapters_weight_unfused_and_fused(tmp_path, lora_name,
                                                                                       norm_name):
    pipe = create_tiny_sd_pipeline()
    lora, norms = official_files(pipe.unet)
    folder = tmp_path / "sd1.5"
    folder.mkdir()
    save_file(lora, folder / lora_name)
    save_file(norms, folder / norm_name)
    for weight in (0.5, 1.0):
        # the official flow (resadapter/model_loader.py): the weight goes to set_adapters, the norms load in full
        official = copy.deepcopy(pipe)
        official.load_lora_weights(str(folder), weight_name=lora_name, adapter_name="res_adapter")
        official.set_adapters(["res_adapter"], adapter_weights=[weight])
        official.unet.load_state_dict(norms, strict=False)
        expected = generate(official)
        ours = copy.deepcopy(pipe)
        ours.load_visadapt(str(folder), adapter_name="res", weight=weight)
        assert generate(ours) == pytest.approx(expected, abs=1e-5), weight
        ours.fuse_visadapt()
        assert generate(ours) == pytest.approx(expected, abs=1e-5), weight
        official.fuse_lora()  # and diffusers' fused flow gives the same image
        assert generate(official) == pytest.approx(expected, abs=1e-5), weight
    assert abs(expected - generate(pipe)).max() > 1e-3  # the adapter changes the image: the equalities can fail


@pytest.mark.parametrize("lora_name, norm_name", [
    ("resolution_lora.safetensors", "resolution_normalization.safetensors"),
    ("pytorch_lora_weights.safetensors", "diffusion_pytorch_model.safetensors"),
])
def test_official_two_files_load_in_one_call_and_equal_the_authors_two_calls(tmp_path, lora_name, norm_name):
    pipe = create_tiny_sd_pipeline()
    base, original = generate(pipe), snapshot(pipe.unet)
    lora, norms = official_files(pipe.unet)
    folder = tmp_path / "sd1.5"
    folder.mkdir()
    save_file(lora, folder / lora_name)
    save_file(norms, folder / norm_name)

    # the authors' way, on a copy: load_lora_weights + unet.load_state_dict(norms, strict=False)
    manual = create_tiny_sd_pipeline()
    manual.load_lora_weights(str(folder / lora_name), adapter_name="res_adapter")
    manual.unet.load_state_dict(norms, strict=False)
    expected = generate(manual)

    files = {p.name: p for p in folder.iterdir()}
    found = formats.find_format(files)
    assert found is not None and found.name == "resadapter"
    config = found.load(pipe.unet, files, None, "res")
    assert config == ResAdapterConfig()  # the released SD1.5 layout is the default config
    ours = generate(pipe)
    assert abs(ours - base).max() > 1e-3
    assert ours == pytest.approx(expected, abs=1e-5)

    saved = visadapt.save_adapter(pipe.unet, tmp_path / "resadapter.safetensors", "res")
    visadapt.detach(pipe.unet, "res")
    assert_same_tensors(pipe.unet, original)
    visadapt.load_adapter(pipe.unet, saved, "reloaded")
    assert generate(pipe) == pytest.approx(ours, abs=0)
    visadapt.detach(pipe.unet)

    # one call on the pipeline, through the loader that dispatches foreign layouts to visadapt.formats
    name = pipe.load_visadapt(str(folder), adapter_name="res")
    assert name == "res" and generate(pipe) == pytest.approx(ours, abs=0)
    pipe.unload_visadapt()
    assert_same_tensors(pipe.unet, original)


def test_interpolation_variant_ships_the_lora_alone(tmp_path):
    pipe = create_tiny_sd_pipeline()
    lora, _ = official_files(pipe.unet)
    save_file(lora, tmp_path / "resolution_lora.safetensors")
    files = {p.name: p for p in tmp_path.iterdir()}
    config = formats.find_format(files).load(pipe.unet, files, None, "res_i")
    assert config.norm is False and config.lora_targets == ("downsample", "upsample")
    assert not any(isinstance(i.module, ResolutionNorm) for i in visadapt.inject.attached(pipe.unet))
    # the same tensors as one in-memory dict (LoRA and norm keys together) load as the full adapter
    visadapt.detach(pipe.unet)
    lora, norms = official_files(pipe.unet)
    found = formats.find_format({}, {**lora, **norms})
    assert found.name == "resadapter" and found.load(pipe.unet, {}, {**lora, **norms}, "res").norm is True


def test_keys_that_fit_nothing_are_errors_and_leave_the_unet_untouched(tmp_path):
    pipe = create_tiny_sd_pipeline()
    original = snapshot(pipe.unet)
    lora, norms = official_files(pipe.unet)
    load = visadapt.plugins.resadapter.load_official
    stray = dict(norms, **{"conv_in.weight": torch.zeros(32, 4, 3, 3)})
    with pytest.raises(LoraLayoutError, match="conv_in.weight"):
        load(pipe.unet, lora, stray, "bad")
    partial = {k: v for k, v in norms.items() if not k.startswith("mid_block.resnets.1.norm2")}
    with pytest.raises(LoraLayoutError, match=r"missing    mid_block\.resnets\.1\.norm2\.bias"):
        load(pipe.unet, lora, partial, "bad")
    wide = dict(norms, **{"down_blocks.0.resnets.0.norm1.weight": torch.ones(48)})
    with pytest.raises(LoraLayoutError, match=r"down_blocks\.0\.resnets\.0\.norm1\.weight  file \(48,\) vs model"):
        load(pipe.unet, lora, wide, "bad")
    attention = dict(lora, **{
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4)})
    with pytest.raises(LoraLayoutError, match="(?s)attn1_to_q.lora_down.weight  outside ResAdapter's convolutions"):
        load(pipe.unet, attention, norms, "bad")
    assert not visadapt.api.records(pipe.unet)
    assert_same_tensors(pipe.unet, original)
    # a LoRA with attention modules is no ResAdapter checkpoint: the generic LoRA format takes it
    save_file(attention, tmp_path / "pytorch_lora_weights.safetensors")
    assert formats.find_format({p.name: p for p in tmp_path.iterdir()}).name == "diffusers_lora"


def test_generates_off_the_training_resolution_and_aspect_ratio():
    pipe = create_tiny_sd_pipeline()  # trained size: 16x16 latents = 32x32 pixels
    lora, norms = official_files(pipe.unet)
    bases = {size: generate(pipe, *size) for size in ((48, 32), (64, 64))}
    visadapt.plugins.resadapter.load_official(pipe.unet, lora, norms, "res")
    for (height, width), base in bases.items():
        image = generate(pipe, height, width)
        assert image.shape == (1, height, width, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
        assert abs(image - base).max() > 1e-3


def test_composes_with_a_lora_loaded_by_diffusers():
    pipe = create_tiny_sd_pipeline()
    base = generate(pipe)
    gen = torch.Generator().manual_seed(5)
    # an LCM-LoRA-style attention LoRA in the diffusers/PEFT layout, loaded by diffusers itself
    other = {}
    for path, module in pipe.unet.named_modules():
        if path.endswith(("attn1.to_q", "attn1.to_v")):
            other[f"unet.{path}.lora_A.weight"] = torch.randn(4, module.in_features, generator=gen) * 0.3
            other[f"unet.{path}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.3
    pipe.load_lora_weights(other, adapter_name="lcm")
    lcm_only = generate(pipe)
    lora, norms = official_files(pipe.unet)
    visadapt.plugins.resadapter.load_official(pipe.unet, lora, norms, "res")
    both = generate(pipe)
    pipe.unet.disable_adapters()  # diffusers' LoRA off, ours still on
    res_only = generate(pipe)
    pipe.unet.enable_adapters()
    for alone in (base, lcm_only, res_only):
        assert abs(both - alone).max() > 1e-4
    visadapt.detach(pipe.unet, "res")
    assert pipe.get_active_adapters() == ["lcm"]
    assert generate(pipe) == pytest.approx(lcm_only, abs=1e-6)


def test_config_is_validated_with_the_fix_in_the_message():
    with pytest.raises(ValueError, match="lora_targets=.*choose one or more of"):
        ResAdapterConfig(lora_targets=("to_q",))
    with pytest.raises(ValueError, match="norm_blocks=.*down"):
        ResAdapterConfig(norm_blocks=("middle",))
    unet = copy.deepcopy(create_tiny_sd_pipeline().unet)
    cfg = visadapt.attach(unet, "resadapter", lora_targets=("conv1", "conv2"), norm=False)
    kinds = {i.kind for i in visadapt.inject.attached(unet)}
    assert cfg.norm is False and kinds == {"conv1", "conv2"}


def test_train_script_runs_end_to_end_and_writes_the_adapter_and_sample_grids(tmp_path, monkeypatch):
    from PIL import Image

    from tests.train_scripts import load_train_script

    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path / "cache"))
    script = load_train_script("resadapter")
    out = tmp_path / "run"
    # 8 images in batches of 4: 2 optimiser steps per epoch; 2 resolutions per run, one per batch
    code = script.main(["--images", "8", "--epochs", "1", "--batch-size", "4", "--eval-items", "2",
                        "--buckets", "32x32", "48x32", "--sample-sizes", "32x32", "48x32", "--steps", "2",
                        "--sample-prompts", "a red circle", "a blue star", "--output-dir", str(out),
                        "--no-progress"])
    assert code == 0
    grid = Image.open(out / "samples" / "epoch_001.png")
    # labelled (tests/test_grids.py checks the layout): a column per prompt, a row per resolution, cells of the
    # largest size (48x32) upscaled twice to reach 96 px, labels beside them
    assert grid.width > 2 * 2 * 32 and grid.height > 2 * 2 * 48
    pipe = create_tiny_sd_pipeline()
    base = generate(pipe)
    config = visadapt.load_adapter(pipe.unet, out / "resadapter.safetensors")
    assert config == ResAdapterConfig() and abs(generate(pipe) - base).max() > 0  # training moved the adapter
    metrics = __import__("json").loads((out / "metrics.json").read_text())
    assert metrics["buckets"] == ["32x32", "48x32"] and len(metrics["history"]) == 1
    assert script.parse_size("48x32") == (48, 32)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        script.parse_size("48")


# ------------------------------------------------------------------ train/resadapter.py --init-adapter

# the smallest run: 4 images, one batch at one resolution, one 1-step sample grid
TINY_RUN = ["--images", "4", "--epochs", "1", "--batch-size", "4", "--eval-items", "1", "--buckets", "32x32",
            "--sample-sizes", "32x32", "--steps", "1", "--sample-prompts", "a red circle", "--no-progress"]


def trained_looking_file(path, plugin="resadapter", **config):
    """An adapter file for the embedded UNet whose every adapter tensor is moved off its fresh value (a fresh
    LoRA B is zero and fresh norm affines copy the base's, so a run that ignored the file could not match it)."""
    unet = create_tiny_sd_pipeline().unet
    visadapt.attach(unet, plugin, **config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "visadapt_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    visadapt.save_adapter(unet, path)
    return path


def test_train_script_starts_from_an_init_adapter_file(tmp_path, monkeypatch):
    """--init-adapter: at a negligible learning rate the trained adapter is the file's (LoRA factors and norm
    affines, to 1e-6), where a fresh start would keep LoRA B at zero."""
    from safetensors.torch import load_file

    from tests.train_scripts import load_train_script

    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path / "cache"))
    start = trained_looking_file(tmp_path / "start.safetensors")
    out = tmp_path / "run"
    script = load_train_script("resadapter")
    assert script.main([*TINY_RUN, "--output-dir", str(out), "--lr", "1e-12", "--init-adapter", str(start)]) == 0
    before, after = load_file(start), load_file(out / "resadapter.safetensors")
    assert before.keys() == after.keys() and max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6
    lora_b = [k for k in before if ".B." in k]
    assert lora_b and all(before[k].abs().max() > 1e-3 for k in lora_b)  # not what a fresh start holds
    assert __import__("json").loads((out / "metrics.json").read_text())["init_adapter"] == str(start)


def test_train_script_refuses_an_init_adapter_of_another_config_or_plugin_before_any_output(tmp_path, capsys):
    from tests.train_scripts import load_train_script

    start = trained_looking_file(tmp_path / "start.safetensors")
    out = tmp_path / "run"
    script = load_train_script("resadapter")
    base = [*TINY_RUN, "--output-dir", str(out), "--init-adapter"]
    assert script.main([*base, str(start), "--set", "rank=8"]) == 2
    err = capsys.readouterr().err
    assert f"error: --init-adapter {start}" in err and "rank: file 16, run 8" in err and "--set rank=16" in err
    selma = trained_looking_file(tmp_path / "selma.safetensors", "selma", rank=4)
    assert script.run_script(lambda: script.main([*base, str(selma)])) == 2
    assert "holds a 'selma' adapter; this run trains 'resadapter'" in capsys.readouterr().err
    assert script.main([*base, str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_init_adapter_load_leaves_the_unet_as_it_was(tmp_path):
    """A file whose header is right but whose tensors fail their checksum: refused by the load, and the UNet
    keeps its fresh adapter (every tensor, ResNet norm affines included) and what trains."""
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_tensors

    from visadapt.engine import InitAdapterError, init_adapter_from_file
    from visadapt.io import read_adapter_metadata

    start = trained_looking_file(tmp_path / "start.safetensors")
    tensors = {k: v + 1 for k, v in load_file(start).items()}
    broken = tmp_path / "broken.safetensors"
    save_tensors(tensors, str(broken), metadata=read_adapter_metadata(start))
    unet = create_tiny_sd_pipeline().unet
    visadapt.attach(unet, "resadapter")
    saved = snapshot(unet)
    trains = {k: p.requires_grad for k, p in unet.named_parameters()}
    with pytest.raises(InitAdapterError, match=f"--init-adapter {broken}: .*corrupted"):
        init_adapter_from_file(unet, broken)
    assert_same_tensors(unet, saved)
    assert trains == {k: p.requires_grad for k, p in unet.named_parameters()}
    assert list(visadapt.api.records(unet)) == ["default"]
