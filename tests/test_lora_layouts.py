"""LoRA files in the diffusers/PEFT, older diffusers, attn-procs and kohya layouts: read, attach, export."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import visadapt
from visadapt import formats
from visadapt.backbones import create_tiny_sd_pipeline
from visadapt.lora_layouts import (
    LoraLayoutError,
    attach_lora_state,
    kohya_to_module_path,
    lora_state_to_peft,
    read_lora_state,
)

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV1 = "down_blocks.0.resnets.0.conv1"
DOWNSAMPLE = "down_blocks.0.downsamplers.0.conv"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the tiny pipeline's ops are far too small to split: on a shared CPU, threads only wait for each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def randomize_adapter(model, seed=1, std=0.1):
    """LoRA B starts at zero (no change); give every adapter tensor random values so the adapter does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visadapt_adapters" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def unet_input(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([10]),
            torch.randn(1, 3, unet.config.cross_attention_dim, generator=gen))


@torch.no_grad()
def run_unet(unet):
    return unet(*unet_input(unet)).sample


def manual_unet_output(unet, deltas: dict[str, torch.Tensor]):
    """The UNet output with ``deltas`` (module path -> weight delta) added to the base weights, then restored."""
    saved = {path: unet.get_submodule(path).weight.detach().clone() for path in deltas}
    with torch.no_grad():
        for path, delta in deltas.items():
            unet.get_submodule(path).weight.add_(delta)
        out = run_unet(unet)
        for path, weight in saved.items():
            unet.get_submodule(path).weight.copy_(weight)
    return out


def random_pair(out_features, in_features, rank, kernel=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kernel:
        return (torch.randn(rank, in_features, kernel, kernel, generator=gen) * 0.1,
                torch.randn(out_features, rank, 1, 1, generator=gen) * 0.1)
    return torch.randn(rank, in_features, generator=gen) * 0.1, torch.randn(out_features, rank, generator=gen) * 0.1


def test_peft_export_loads_in_diffusers_with_the_same_output_and_reads_back():
    pipe = create_tiny_sd_pipeline()
    base = generate(pipe)
    visadapt.attach(pipe.unet, "lora", rank=4, alpha=8.0, targets=("to_q", "to_v", "conv1", "downsample"),
                    rank_pattern={DOWNSAMPLE: 2}, alpha_pattern={CONV1: 2.0})
    randomize_adapter(pipe.unet)
    ours = generate(pipe)
    assert abs(ours - base).max() > 1e-3

    exported = lora_state_to_peft(pipe.unet, "default")
    assert f"unet.{DOWNSAMPLE}.lora_A.weight" in exported
    assert exported[f"unet.{DOWNSAMPLE}.lora_A.weight"].shape == (2, 32, 3, 3)  # conv: 3x3 down, 1x1 up
    assert exported[f"unet.{DOWNSAMPLE}.lora_B.weight"].shape == (32, 2, 1, 1)

    theirs = create_tiny_sd_pipeline()
    theirs.load_lora_weights(exported, adapter_name="exported")
    assert generate(theirs) == pytest.approx(ours, abs=1e-5)

    loras = read_lora_state(exported)
    assert loras.layout == "peft" and not loras.text_encoder
    assert set(loras) == {k[len("unet."):-len(".lora_A.weight")] for k in exported if "lora_A" in k}
    again = create_tiny_sd_pipeline()
    config = attach_lora_state(again.unet, exported, "again")
    assert config.rank_pattern == {DOWNSAMPLE: 2}
    assert generate(again) == pytest.approx(ours, abs=1e-5)


def test_every_layout_reads_to_the_same_modules_and_applies_the_formula():
    pipe = create_tiny_sd_pipeline()
    unet = pipe.unet
    q_down, q_up = random_pair(32, 32, 4, seed=1)
    c_down, c_up = random_pair(32, 32, 2, kernel=3, seed=2)
    expected = {TO_Q: (q_down, q_up, 8.0), CONV1: (c_down, c_up, 1.0)}
    kohya = lambda path: "lora_unet_" + path.replace(".", "_")
    layouts = {
        "peft": {f"unet.{TO_Q}.lora_A.weight": q_down, f"unet.{TO_Q}.lora_B.weight": q_up,
                 f"unet.{TO_Q}.alpha": torch.tensor(8.0), f"{CONV1}.lora_A.weight": c_down,
                 f"{CONV1}.lora_B.weight": c_up, f"{CONV1}.alpha": torch.tensor(1.0)},
        "kohya": {f"{kohya(TO_Q)}.lora_down.weight": q_down, f"{kohya(TO_Q)}.lora_up.weight": q_up,
                  f"{kohya(TO_Q)}.alpha": torch.tensor(8.0), f"{kohya(CONV1)}.lora_down.weight": c_down,
                  f"{kohya(CONV1)}.lora_up.weight": c_up, f"{kohya(CONV1)}.alpha": torch.tensor(1.0)},
    }
    reference = manual_unet_output(unet, {p: alpha / d.shape[0] * (torch.einsum("or,rikl->oikl", u[:, :, 0, 0], d)
                                                                     if d.dim() == 4 else u @ d)
                                          for p, (d, u, alpha) in expected.items()})
    for layout, state in layouts.items():
        loras = read_lora_state(state)
        assert loras.layout == layout
        assert {p: (w.rank, w.alpha) for p, w in loras.items()} == {TO_Q: (4, 8.0), CONV1: (2, 1.0)}
        attach_lora_state(unet, state, layout)
        torch.testing.assert_close(run_unet(unet), reference, atol=1e-5, rtol=0, msg=layout)
        visadapt.detach(unet, layout)

    # layouts without alphas: alpha = rank, scale 1
    old = {f"unet.{TO_Q}.lora.down.weight": q_down, f"unet.{TO_Q}.lora.up.weight": q_up}
    procs = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": q_down,
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": q_up}
    reference = manual_unet_output(unet, {TO_Q: q_up @ q_down})
    for layout, state in (("diffusers_old", old), ("attn_procs", procs)):
        loras = read_lora_state(state)
        assert loras.layout == layout and list(loras) == [TO_Q] and loras[TO_Q].alpha is None
        attach_lora_state(unet, state, layout)
        torch.testing.assert_close(run_unet(unet), reference, atol=1e-5, rtol=0, msg=layout)
        visadapt.detach(unet, layout)
    # an explicit alpha applies to modules whose file has none
    reference = manual_unet_output(unet, {TO_Q: 2 * q_up @ q_down})
    attach_lora_state(unet, old, "scaled", alpha=8.0)
    torch.testing.assert_close(run_unet(unet), reference, atol=1e-5, rtol=0)


def test_kohya_names_rebuild_diffusers_paths_without_the_model():
    cases = {
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": TO_Q,
        "down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj":
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "up_blocks_1_resnets_2_time_emb_proj": "up_blocks.1.resnets.2.time_emb_proj",
        "up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0":
            "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "down_blocks_0_downsamplers_0_conv": DOWNSAMPLE,
        "mid_block_resnets_0_conv_shortcut": "mid_block.resnets.0.conv_shortcut",
    }
    for name, path in cases.items():
        assert kohya_to_module_path(name) == path
    with pytest.raises(LoraLayoutError, match="names no module"):
        kohya_to_module_path("down_blocks_9_conv", ["down_blocks.0.resnets.0.conv1"])


def test_text_encoder_entries_are_reported_apart_and_refused_at_attach():
    q_down, q_up = random_pair(32, 32, 4)
    state = {f"unet.{TO_Q}.lora_A.weight": q_down, f"unet.{TO_Q}.lora_B.weight": q_up,
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": q_down,
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": q_up,
             "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": q_down,
             "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": q_up}
    loras = read_lora_state(state)
    assert list(loras) == [TO_Q]
    assert loras.text_encoder == {
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": loras.text_encoder["text_encoder"][
            "text_model.encoder.layers.0.self_attn.q_proj"]},
        "text_encoder_2": {"text_model.encoder.layers.0.self_attn.k_proj": loras.text_encoder["text_encoder_2"][
            "text_model.encoder.layers.0.self_attn.k_proj"]},
    }
    unet = create_tiny_sd_pipeline().unet
    with pytest.raises(LoraLayoutError, match="text encoder: .*load_lora_weights"):
        attach_lora_state(unet, state, "x")
    assert not visadapt.api.records(unet)


def test_bad_files_raise_naming_the_keys_and_leave_the_unet_untouched():
    unet = create_tiny_sd_pipeline().unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    q_down, q_up = random_pair(32, 32, 4)
    with pytest.raises(LoraLayoutError, match=r"1 of 3 keys fit no LoRA layout.*\n  some.weird.key"):
        read_lora_state({f"{TO_Q}.lora_A.weight": q_down, f"{TO_Q}.lora_B.weight": q_up,
                         "some.weird.key": q_up})
    with pytest.raises(LoraLayoutError, match="has down but needs both"):
        read_lora_state({f"{TO_Q}.lora_A.weight": q_down})
    with pytest.raises(LoraLayoutError, match="not a LoRA pair"):
        read_lora_state({f"{TO_Q}.lora_A.weight": q_down, f"{TO_Q}.lora_B.weight": q_up.T})
    # right layout, wrong model: a 48-wide LoRA on a 32-wide projection
    wide_down, wide_up = random_pair(48, 48, 4)
    with pytest.raises(LoraLayoutError, match=rf"{TO_Q}.lora_A.weight  file down \(4, 48\) / up \(48, 4\) vs model weight \(32, 32\)"):
        attach_lora_state(unet, {f"{TO_Q}.lora_A.weight": wide_down, f"{TO_Q}.lora_B.weight": wide_up}, "wide")
    with pytest.raises(LoraLayoutError, match="no_such_block"):
        attach_lora_state(unet, {"no_such_block.lora_A.weight": q_down, "no_such_block.lora_B.weight": q_up}, "x")
    with pytest.raises(LoraLayoutError, match="lora_unet_down_blocks_7_conv.lora_down.weight"):
        attach_lora_state(unet, {"lora_unet_down_blocks_7_conv.lora_down.weight": q_down,
                                 "lora_unet_down_blocks_7_conv.lora_up.weight": q_up}, "x")
    assert not visadapt.api.records(unet)
    after = unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_diffusers_lora_format_loads_a_file_and_saves_to_visadapt(tmp_path):
    pipe = create_tiny_sd_pipeline()
    base = generate(pipe)
    q_down, q_up = random_pair(32, 32, 4, seed=3)
    d_down, d_up = random_pair(32, 32, 4, kernel=3, seed=4)
    kohya = "lora_unet_" + DOWNSAMPLE.replace(".", "_")
    save_file({f"unet.{TO_Q}.lora_A.weight": q_down, f"unet.{TO_Q}.lora_B.weight": q_up,
               f"{kohya}.lora_down.weight": d_down, f"{kohya}.lora_up.weight": d_up, f"{kohya}.alpha": torch.tensor(2.0)},
              tmp_path / "pytorch_lora_weights.safetensors")
    files = {p.name: p for p in tmp_path.iterdir()}
    found = formats.find_format(files)
    assert found is not None and found.name == "diffusers_lora"
    assert "pytorch_lora_weights.safetensors" in formats.known_file_names()
    config = found.load(pipe.unet, files, None, "community")
    assert set(config.target_modules) == {TO_Q, DOWNSAMPLE}
    # as diffusers' get_peft_kwargs: when a file's alphas all agree, that alpha is every module's (to_q included)
    assert config.rank_alpha(TO_Q) == (4, 2.0) and config.rank_alpha(DOWNSAMPLE) == (4, 2.0)
    adapted = generate(pipe)
    assert abs(adapted - base).max() > 1e-3

    saved = visadapt.save_adapter(pipe.unet, tmp_path / "community.safetensors", "community")
    visadapt.detach(pipe.unet)
    assert generate(pipe) == pytest.approx(base, abs=0)
    visadapt.load_adapter(pipe.unet, saved, "reloaded")
    assert generate(pipe) == pytest.approx(adapted, abs=1e-6)
    # a folder without any LoRA file is no diffusers_lora checkpoint
    assert not formats.get_format("diffusers_lora").detect({"notes.txt": tmp_path / "notes.txt"}, None)


def test_two_layouts_naming_one_tensor_are_reported_not_silently_overwritten():
    unet = create_tiny_sd_pipeline().unet
    q_down, q_up = random_pair(32, 32, 4)
    state = {f"unet.{TO_Q}.lora_A.weight": q_down, f"unet.{TO_Q}.lora_B.weight": q_up,
             f"unet.{TO_Q}.lora.down.weight": q_down * 2}
    with pytest.raises(LoraLayoutError, match=rf"unet.{TO_Q}.lora(_A|.down).weight  names the same LoRA tensor"):
        attach_lora_state(unet, state, "x")
    assert not visadapt.api.records(unet)


@pytest.mark.parametrize("layout", ["diffusers_old", "no_unet_prefix"])
def test_older_layouts_load_like_diffusers_own_loader(layout):
    """The older diffusers names (``unet.<path>.lora.down.weight``) against ``pipe.load_lora_weights``, and keys
    without the ``unet.`` prefix against ``unet.load_lora_adapter(prefix=None)`` (``load_lora_weights`` itself skips
    such keys with a warning and loads nothing): the same UNet output. (The attn-procs and ``lora_linear_layer``
    names are no longer read by diffusers 0.42 at all; test_every_layout_reads_to_the_same_modules_and_applies_the_formula
    checks them against the formula of the diffusers versions that wrote them.)"""
    import copy

    pipe = create_tiny_sd_pipeline()
    unet = pipe.unet
    state = {}
    for seed, path in enumerate((TO_Q, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0", CONV1)):
        host = unet.get_submodule(path)
        kernel = host.kernel_size[0] if isinstance(host, torch.nn.Conv2d) else None
        out_f, in_f = host.weight.shape[:2]
        down, up = random_pair(out_f, in_f, 4, kernel=kernel, seed=seed)
        prefix = "unet." if layout == "diffusers_old" else ""
        state[f"{prefix}{path}.lora.down.weight"] = down * 3
        state[f"{prefix}{path}.lora.up.weight"] = up * 3
    theirs, ours = copy.deepcopy(pipe), copy.deepcopy(pipe)
    if layout == "diffusers_old":
        theirs.load_lora_weights(dict(state), adapter_name="theirs")
    else:
        theirs.unet.load_lora_adapter(dict(state), prefix=None, adapter_name="theirs")
    ours.load_visadapt(dict(state), adapter_name="ours")
    base = run_unet(unet)
    assert (run_unet(theirs.unet) - base).abs().max() > 1e-3  # the owner loaded something
    assert (run_unet(ours.unet) - run_unet(theirs.unet)).abs().max().item() <= 1e-5
