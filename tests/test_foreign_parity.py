"""Foreign LoRA files load at the producer's scale: visadapt's output equals the owning library's own loader
(diffusers ``pipe.load_lora_weights`` / ``load_lora_adapter``, PEFT ``PeftModel.from_pretrained``) on the same tiny
model and file, max abs difference <= 1e-5 in fp32. Options visadapt cannot represent are refused, naming them,
with the model left exactly as it was."""
from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

import visadapt
from tests import tiny_models
from tests.pipeline_helpers import assert_untouched as assert_unchanged
from tests.pipeline_helpers import every_tensor as unet_tensors
from visadapt import formats
from visadapt.io import AdapterFileError
from visadapt.layers import LoRA
from visadapt.lora_layouts import LoraLayoutError
from visadapt.peft_format import PeftFormat

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
# modules of the tiny SD UNet a diffusers LoRA file adapts: attention projections of both cross-attention levels,
# a feed-forward projection and a 3x3 ResNet convolution
LORA_MODULES = (f"{ATTN}.attn1.to_q", f"{ATTN}.attn1.to_k", f"{ATTN}.attn1.to_v", f"{ATTN}.attn1.to_out.0",
                f"{ATTN}.attn2.to_q", f"{ATTN}.attn2.to_v", f"{ATTN}.ff.net.0.proj",
                "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1")

pytestmark = pytest.mark.usefixtures("_one_thread")  # fixtures (base_pipe): tests/conftest.py


@pytest.fixture(scope="module", autouse=True)
def _diffusers_errors_only():
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": these files are UNet-only
    yield
    logging.getLogger("diffusers").setLevel(logging.WARNING)


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=gen)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=gen),
                                      "time_ids": torch.randn(2, 6, generator=gen)}
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), context, **extra).sample


def lora_tensors(unet, ranks: dict[str, int], seed: int = 0, layout: str = "peft") -> dict[str, torch.Tensor]:
    """Random down/up tensors (non-zero up, so the LoRA changes the output) for ``{module path: rank}``, in the
    diffusers layout (``<path>.lora_A.weight``) or kohya's (``lora_unet_<path>.lora_down.weight``)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for path, rank in ranks.items():
        weight = unet.get_submodule(path).weight
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank, 1, 1) if weight.dim() == 4 else (weight.shape[0], rank)
        down, up = torch.randn(down_shape, generator=gen) * 0.2, torch.randn(up_shape, generator=gen) * 0.2
        if layout == "kohya":
            name = "lora_unet_" + path.replace(".", "_")
            state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        else:
            state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = down, up
    return state


def save_diffusers_lora(folder, state, config: LoraConfig | None = None):
    """``save_lora_weights`` with the config as ``unet_lora_adapter_metadata`` (its target_modules set to the
    file's modules: diffusers' loader needs them)."""
    from diffusers import StableDiffusionPipeline

    if config is not None:
        config.target_modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})

    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict() if config else None)
    return folder


def assert_same_as_diffusers(base_pipe, folder, expect_lora_effect=True):
    """``pipe.load_lora_weights(folder)`` and ``pipe.load_visadapt(folder)`` give the same UNet output."""
    theirs, ours = copy.deepcopy(base_pipe), copy.deepcopy(base_pipe)
    theirs.load_lora_weights(folder, adapter_name="theirs")
    ours.load_visadapt(folder, adapter_name="ours")
    out_theirs, out_ours = unet_output(theirs.unet), unet_output(ours.unet)
    if expect_lora_effect:
        assert (out_theirs - unet_output(base_pipe.unet)).abs().max() > 1e-3  # the LoRA does something
    assert (out_ours - out_theirs).abs().max().item() <= 1e-5
    return ours


# ---------------------------------------------------------------------------------------------- diffusers files


def test_diffusers_metadata_alpha_differs_from_rank(base_pipe, tmp_path):
    state = lora_tensors(base_pipe.unet, dict.fromkeys(LORA_MODULES, 4))
    folder = save_diffusers_lora(tmp_path / "lora", state, LoraConfig(r=4, lora_alpha=8))
    ours = assert_same_as_diffusers(base_pipe, folder)
    config = visadapt.api.get_record(ours.unet, "ours").config
    assert (config.rank, config.alpha, config.use_rslora) == (4, 8.0, False)
    # the check: the image after 2 DDIM steps, load_lora_weights vs load_visadapt
    theirs = copy.deepcopy(base_pipe)
    theirs.load_lora_weights(folder)
    images = [p("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images for p in (theirs, ours)]
    assert abs(images[0] - images[1]).max() <= 1e-5
    # without the header (the old behaviour) the scale would be 1 instead of 2: the test can tell them apart
    plain = copy.deepcopy(base_pipe)
    plain.load_visadapt(state)
    assert (unet_output(plain.unet) - unet_output(ours.unet)).abs().max() > 1e-3


def test_diffusers_metadata_rank_and_alpha_patterns_follow_peft_regex_first_match(base_pipe, tmp_path):
    ranks = dict.fromkeys(LORA_MODULES, 4)
    ranks[f"{ATTN}.attn1.to_k"] = 2
    ranks["down_blocks.0.resnets.0.conv1"] = 2
    state = lora_tensors(base_pipe.unet, ranks, seed=1)
    # PEFT's get_pattern_key: keys are regexes and the FIRST key matching "(.*\.)?(key)$" wins (diffusers writes
    # them sorted), so every to_q gets alpha 3 from ".*to_q", even the attn1.to_q that "attn1\.to_q" matches too
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"to_k": 2, r"resnets\.\d+\.conv1": 2},
                        alpha_pattern={r".*to_q": 3, r"attn1\.to_q": 5, "ff.net.0.proj": 16})
    folder = save_diffusers_lora(tmp_path / "lora", state, config)
    ours = assert_same_as_diffusers(base_pipe, folder)
    stored = visadapt.api.get_record(ours.unet, "ours").config
    assert stored.rank_alpha(f"{ATTN}.attn1.to_q") == (4, 3.0)
    assert stored.rank_alpha(f"{ATTN}.ff.net.0.proj") == (4, 16.0)
    assert stored.rank_alpha("down_blocks.0.resnets.0.conv1") == (2, 8.0)
    assert all("." in key for key in stored.alpha_pattern)  # explicit full module paths, not PEFT patterns


def test_diffusers_metadata_rslora(base_pipe, tmp_path):
    state = lora_tensors(base_pipe.unet, dict.fromkeys(LORA_MODULES, 4), seed=2)
    folder = save_diffusers_lora(tmp_path / "lora", state, LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    ours = assert_same_as_diffusers(base_pipe, folder)
    module = next(m for m in ours.unet.modules() if isinstance(m, LoRA))
    assert module.rslora and module.scaling == pytest.approx(8 / math.sqrt(4))
    # saved and reloaded as a visadapt file, rsLoRA is kept
    saved = visadapt.save_adapter(ours.unet, tmp_path / "rs.safetensors", "ours")
    again = copy.deepcopy(base_pipe)
    again.load_visadapt(saved)
    assert torch.equal(unet_output(again.unet), unet_output(ours.unet))


def test_diffusers_file_without_metadata_and_mixed_ranks(base_pipe, tmp_path):
    ranks = dict.fromkeys(LORA_MODULES, 4)
    ranks[f"{ATTN}.attn2.to_q"] = 8
    folder = save_diffusers_lora(tmp_path / "lora", lora_tensors(base_pipe.unet, ranks, seed=3))
    assert_same_as_diffusers(base_pipe, folder)


def test_kohya_alpha_differs_from_rank(base_pipe, tmp_path):
    paths = [p for p in LORA_MODULES if "to_out" not in p]
    state = lora_tensors(base_pipe.unet, dict.fromkeys(paths, 4), seed=4, layout="kohya")
    for key in [k for k in state if k.endswith(".lora_down.weight")]:
        state[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(2.0)
    (tmp_path / "kohya").mkdir()
    save_file(state, tmp_path / "kohya" / "pytorch_lora_weights.safetensors")
    ours = assert_same_as_diffusers(base_pipe, tmp_path / "kohya")
    assert visadapt.api.get_record(ours.unet, "ours").config.alpha == 2.0
    report = visadapt.load_report(ours.unet, "ours")
    assert report.ok and set(report.matched) == set(state)  # every key, the alphas included, is accounted for
    # alphas that differ per module: diffusers' get_peft_kwargs keeps the most common one as the default and the
    # others as patterns (its attention-processor alpha names match no module, so those take the default)
    for i, key in enumerate(sorted(k for k in state if k.endswith(".alpha"))):
        state[key] = torch.tensor([2.0, 2.0, 6.0, 1.0][i % 4])
    save_file(state, tmp_path / "kohya" / "pytorch_lora_weights.safetensors")
    ours = assert_same_as_diffusers(base_pipe, tmp_path / "kohya")
    assert visadapt.api.get_record(ours.unet, "ours").config.alpha_pattern  # not one alpha for all


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80)  # 6 time ids x 8 + 32 pooled text


def test_sdxl_kohya_file_loads_through_diffusers_converters(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_sdxl_unet()
    gen = torch.Generator().manual_seed(5)
    # original SDXL (sgm) names, as kohya's sd-scripts writes them: diffusers maps them given the UNet's config
    shapes = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": (64, 64),   # down_blocks.1.attentions.0 ..
        "input_blocks_5_1_transformer_blocks_1_attn2_to_k": (64, 32),   # down_blocks.1.attentions.1, 2nd block
        "input_blocks_5_1_proj_in": (64, 64),
        "middle_block_1_transformer_blocks_0_attn1_to_out_0": (64, 64),
        "middle_block_0_emb_layers_1": (64, 32 * 4),
        "output_blocks_0_1_transformer_blocks_0_ff_net_0_proj": (64 * 8, 64),
        "output_blocks_1_0_out_layers_3": (64, 64, 3),                    # up_blocks.0.resnets.1.conv2
        "input_blocks_1_0_in_layers_2": (32, 32, 3),                      # down_blocks.0.resnets.0.conv1
    }
    state = {}
    for name, shape in shapes.items():
        out_features, in_features = shape[:2]
        kernel = (shape[2], shape[2]) if len(shape) == 3 else ()
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, in_features, *kernel, generator=gen) * 0.2
        up_kernel = (1, 1) if kernel else ()
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out_features, 4, *up_kernel, generator=gen) * 0.2
        state[f"lora_unet_{name}.alpha"] = torch.tensor(8.0)
    save_file(state, tmp_path / "sdxl_kohya.safetensors")

    theirs = copy.deepcopy(unet)
    lora_state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "sdxl_kohya.safetensors"),
                                                                   unet_config=theirs.config)
    theirs.load_lora_adapter(lora_state, network_alphas=alphas, prefix="unet", adapter_name="kohya")
    ours = copy.deepcopy(unet)
    fmt = formats.find_format({"sdxl_kohya.safetensors": tmp_path / "sdxl_kohya.safetensors"})
    assert fmt is not None and fmt.name == "diffusers_lora"
    config = fmt.load(ours, {"sdxl_kohya.safetensors": tmp_path / "sdxl_kohya.safetensors"}, None, "kohya")
    assert "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k" in config.target_modules
    assert "up_blocks.0.resnets.1.conv2" in config.target_modules
    assert (unet_output(theirs) - unet_output(unet)).abs().max() > 1e-3
    assert (unet_output(ours) - unet_output(theirs)).abs().max().item() <= 1e-5


def test_diffusers_options_visadapt_cannot_represent_are_refused_and_the_pipeline_is_unchanged(base_pipe, tmp_path):
    pipe = copy.deepcopy(base_pipe)
    before = unet_tensors(pipe.unet)
    state = lora_tensors(pipe.unet, {f"{ATTN}.attn1.to_q": 4})
    save_diffusers_lora(tmp_path / "dora", state, LoraConfig(r=4, lora_alpha=8, use_dora=True))
    with pytest.raises(LoraLayoutError, match=r"use_dora=True.*pytorch_lora_weights.safetensors|"
                                              r"pytorch_lora_weights.safetensors.*use_dora=True"):
        pipe.load_visadapt(tmp_path / "dora")
    kohya_dora = lora_tensors(pipe.unet, {f"{ATTN}.attn1.to_q": 4}, layout="kohya")
    kohya_dora["lora_unet_" + f"{ATTN}.attn1.to_q".replace(".", "_") + ".dora_scale"] = torch.ones(1, 32)
    with pytest.raises(LoraLayoutError, match="dora_scale"):
        pipe.load_visadapt(kohya_dora)
    # a broken header is one clear error too
    (tmp_path / "bad").mkdir()
    save_file(state, tmp_path / "bad" / "pytorch_lora_weights.safetensors", metadata={
        "format": "pt", "lora_adapter_metadata": "{not json"})
    with pytest.raises(LoraLayoutError, match="lora_adapter_metadata header is not valid JSON"):
        pipe.load_visadapt(tmp_path / "bad")
    assert_unchanged(pipe.unet, before)


def test_in_memory_state_dict_takes_its_header_as_metadata(base_pipe, tmp_path):
    state = lora_tensors(base_pipe.unet, dict.fromkeys(LORA_MODULES, 4), seed=6)
    folder = save_diffusers_lora(tmp_path / "lora", state, LoraConfig(r=4, lora_alpha=2))
    from visadapt.io import read_safetensors_metadata

    header = read_safetensors_metadata(folder / "pytorch_lora_weights.safetensors")
    prefixed = {f"unet.{k}": v for k, v in state.items()}
    from_file = copy.deepcopy(base_pipe)
    from_file.load_visadapt(folder)
    unet = copy.deepcopy(base_pipe.unet)
    fmt = formats.find_format({}, prefixed)
    formats.load_checkpoint(fmt, unet, {}, prefixed, "memory", metadata=header)
    assert torch.equal(unet_output(unet), unet_output(from_file.unet))


# ---------------------------------------------------------------------------------------------- PEFT folders


def peft_vit_folder(tmp_path, seed=0, **config):
    """A timm ViT wrapped by ``get_peft_model``, every LoRA/head tensor random, saved by ``save_pretrained``."""
    torch.manual_seed(seed)
    vit = tiny_models.vit().eval()
    peft_model = get_peft_model(copy.deepcopy(vit), LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    folder = tmp_path / "peft_vit"
    peft_model.save_pretrained(folder)
    return vit, folder


def vit_output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def peft_files(folder):
    return {p.name: p for p in folder.iterdir() if p.name in PeftFormat.file_names}


def load_both(vit, folder):
    theirs = PeftModel.from_pretrained(copy.deepcopy(vit), folder).eval()
    ours = copy.deepcopy(vit)
    fmt = formats.find_format(peft_files(folder))
    assert fmt is not None and fmt.name == "peft"
    config = fmt.load(ours, peft_files(folder), None, "peft")
    return theirs, ours, config


def test_peft_vit_folder_with_patterns_rslora_and_head_gives_peft_outputs(tmp_path):
    vit, folder = peft_vit_folder(
        tmp_path, r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1"], use_rslora=True,
        rank_pattern={r"blocks\.1\.attn\.qkv": 2, "fc1": 6}, alpha_pattern={"proj": 3, r"blocks\.0\.mlp\.fc1": 11},
        modules_to_save=["head"])
    theirs, ours, config = load_both(vit, folder)
    assert (vit_output(theirs) - vit_output(vit)).abs().max() > 1e-3
    assert (vit_output(ours) - vit_output(theirs)).abs().max().item() <= 1e-5
    assert config.use_rslora and config.rank_alpha("blocks.1.attn.qkv") == (2, 8.0)
    assert config.rank_alpha("blocks.0.mlp.fc1") == (6, 11.0) and config.rank_alpha("blocks.1.mlp.fc1") == (6, 8.0)
    assert visadapt.api.get_record(ours, "peft").head == "head"
    # a visadapt file afterwards gives the same model
    saved = visadapt.save_adapter(ours, tmp_path / "vit.safetensors", "peft")
    again = copy.deepcopy(vit)
    visadapt.load_adapter(again, saved)
    assert torch.equal(vit_output(again), vit_output(ours))
    # detach gives back the model's own head, which the PEFT folder's modules_to_save overwrote
    visadapt.detach(ours)
    assert all(torch.equal(value, vit.state_dict()[key]) for key, value in ours.state_dict().items())


def test_peft_vit_regex_target_exclude_and_layers_to_transform(tmp_path):
    vit, folder = peft_vit_folder(tmp_path, seed=2, r=4, lora_alpha=4, target_modules=["qkv", "fc2"],
                                  layers_to_transform=[1], layers_pattern="blocks")
    theirs, ours, config = load_both(vit, folder)
    assert set(config.target_modules) == {"blocks.1.attn.qkv", "blocks.1.mlp.fc2"}
    assert (vit_output(ours) - vit_output(theirs)).abs().max().item() <= 1e-5
    vit, folder = peft_vit_folder(tmp_path / "regex", seed=3, r=2, lora_alpha=5,
                                  target_modules=r".*\.(qkv|fc1)", exclude_modules=["blocks.0.mlp.fc1"])
    theirs, ours, config = load_both(vit, folder)
    assert set(config.target_modules) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"}
    assert (vit_output(ours) - vit_output(theirs)).abs().max().item() <= 1e-5


def test_peft_unet_folder_gives_peft_outputs(base_pipe, tmp_path):
    unet = base_pipe.unet
    peft_unet = get_peft_model(copy.deepcopy(unet), LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "conv1"],
                                                               alpha_pattern={"conv1": 2}))
    with torch.no_grad():
        for name, param in peft_unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    peft_unet.save_pretrained(tmp_path / "peft_unet")
    theirs = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft_unet")
    ours = copy.deepcopy(base_pipe)
    ours.load_visadapt(tmp_path / "peft_unet")
    assert (unet_output(ours.unet) - unet_output(theirs)).abs().max().item() <= 1e-5


def write_peft_folder(folder, config: dict, state: dict | None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config) if isinstance(config, dict) else config)
    if state is not None:
        save_file(state, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LOHA"}, "peft_type='LOHA'"),
    ({"use_dora": True}, "use_dora=True"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
    ({"bias": "all"}, "bias='all'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"target_parameters": ["blocks.0.attn.qkv.weight"]}, "target_parameters="),
    ({"target_modules": "all-linear"}, "target_modules='all-linear'"),
    ({"some_future_option": 3}, r"fields \['some_future_option'\] are unknown"),
    ({"r": 8}, r"config rank 8 vs tensors"),
    ({"target_modules": ["fc2"]}, "blocks.0.attn.qkv.lora_A.weight"),
])
def test_peft_options_visadapt_cannot_represent_are_refused_naming_them(tmp_path, change, message):
    vit, folder = peft_vit_folder(tmp_path, r=4, lora_alpha=8, target_modules=["qkv"])
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(change)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = copy.deepcopy(vit)
    before = unet_tensors(model)
    with pytest.raises(LoraLayoutError, match=message) as info:
        PeftFormat().load(model, peft_files(folder), None, "x")
    assert str(folder) in str(info.value)
    assert_unchanged(model, before)


def test_peft_folder_file_problems_are_one_clear_error(tmp_path):
    vit, folder = peft_vit_folder(tmp_path, r=4, lora_alpha=8, target_modules=["qkv"])
    model = copy.deepcopy(vit)
    before = unet_tensors(model)
    good = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(good[:40])
    with pytest.raises(AdapterFileError, match=r"adapter_config.json is not valid JSON"):
        PeftFormat().load(model, peft_files(folder), None, "x")
    (folder / "adapter_config.json").write_text(good)
    (folder / "adapter_model.safetensors").rename(folder / "elsewhere.safetensors")
    with pytest.raises(AdapterFileError, match="has adapter_config.json but no adapter_model.safetensors"):
        PeftFormat().load(model, peft_files(folder), None, "x")
    # the wrong model: a 48-wide ViT's adapter on this 32-wide one
    peft_wide = get_peft_model(tiny_models.vit(embed_dim=48), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
    peft_wide.save_pretrained(tmp_path / "wide48")
    with pytest.raises(LoraLayoutError, match=r"blocks.0.attn.qkv.lora_A.weight  file down \(4, 48\)"):
        PeftFormat().load(model, peft_files(tmp_path / "wide48"), None, "x")
    assert_unchanged(model, before)


def test_peft_in_memory_state_dict_needs_its_config(tmp_path):
    from safetensors.torch import load_file

    vit, folder = peft_vit_folder(tmp_path, r=4, lora_alpha=8, target_modules=["qkv"])
    state = load_file(folder / "adapter_model.safetensors")
    fmt = formats.find_format({}, state)
    assert fmt is not None and fmt.name == "peft"
    model = copy.deepcopy(vit)
    with pytest.raises(LoraLayoutError, match="adapter_config"):
        fmt.load(model, {}, state, "x")
    assert not visadapt.api.records(model)
    formats.load_checkpoint(fmt, model, {}, state, "x",
                            metadata={"adapter_config": (folder / "adapter_config.json").read_text()})
    theirs = PeftModel.from_pretrained(copy.deepcopy(vit), folder).eval()
    assert (vit_output(model) - vit_output(theirs)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- rsLoRA


def test_rslora_scaling_is_shared_by_forward_merge_and_the_batched_path():
    from visadapt.layers import add_lora_deltas

    torch.manual_seed(0)
    lora = LoRA(16, 24, rank=4, alpha=6.0, rslora=True)
    torch.nn.init.normal_(lora.B.weight, std=0.3)
    assert lora.scaling == pytest.approx(6.0 / 2.0) and LoRA(16, 24, 4, 6.0).scaling == pytest.approx(1.5)
    x = torch.randn(3, 16)
    expected = (x @ lora.A.weight.t() @ lora.B.weight.t()) * 3.0
    torch.testing.assert_close(lora(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(x @ lora.delta_weight().t(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(add_lora_deltas(torch.zeros(3, 24), x, [lora]), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(add_lora_deltas(torch.zeros(3, 24), x, [lora, lora]), 2 * expected, atol=1e-5, rtol=0)

    vit = tiny_models.vit().eval()
    base = vit_output(vit)
    visadapt.attach(vit, "lora", rank=4, alpha=8.0, targets=("qkv", "fc1"), use_rslora=True)
    with torch.no_grad():
        for name, param in vit.named_parameters():
            if "visadapt_adapters" in name:
                param.normal_(std=0.2)
    unmerged = vit_output(vit)
    assert (unmerged - base).abs().max() > 1e-3
    visadapt.merge(vit)
    torch.testing.assert_close(vit_output(vit), unmerged, atol=1e-5, rtol=0)


def test_every_peft_lora_config_field_has_a_decision():
    import dataclasses

    from visadapt import peft_format

    undecided = [f.name for f in dataclasses.fields(LoraConfig) if f"``{f.name}``" not in peft_format.__doc__]
    assert not undecided, f"PEFT LoraConfig fields without a decision in visadapt.peft_format: {undecided}"


def test_peft_modules_to_save_may_only_name_the_classifier(tmp_path):
    """A PEFT folder writes into the LoRA's layers and, through modules_to_save, the classifier only: the rule every
    visadapt file follows (issue 23); a folder saving a backbone module is refused, model unchanged."""
    vit, folder = peft_vit_folder(tmp_path, r=4, lora_alpha=8, target_modules=["qkv"],
                                  modules_to_save=["blocks.1.mlp.fc2"])
    fresh = copy.deepcopy(vit)
    before = unet_tensors(fresh)
    with pytest.raises(LoraLayoutError,
                       match=r"modules_to_save=.*'blocks.1.mlp.fc2'.*not this model's classifier \(head\)"):
        visadapt.load_adapter(fresh, folder)
    assert_unchanged(fresh, before)
