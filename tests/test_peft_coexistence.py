"""visadapt next to PEFT: diffusers' ``load_lora_weights`` / PEFT's ``get_peft_model`` before or after visadapt.

Every layout visadapt loads is loaded on a pipeline where diffusers (PEFT backend) already wrapped the layers, and
the other way round; both adapters act, unloading either leaves the other exactly as it acts alone, unloading both
gives every tensor back bit for bit. References come from the owners: diffusers' own ``load_lora_weights`` /
``fuse_lora`` and PEFT's ``get_peft_model`` / ``unload`` on the same tiny models (CPU, 32x32, 2 DDIM steps).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import visadapt
from tests import tiny_models as tm
from tests.pipeline_helpers import assert_same_tensors, every_tensor, generate
from tests.pipeline_helpers import every_tensor as vit_state
from visadapt import inject, io, peft_compat

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

pytestmark = pytest.mark.usefixtures("_one_thread")  # fixtures: tests/conftest.py

#: the diffusers LoRA loaded next to visadapt (an LCM-LoRA stand-in): attention projections and the down/upsampler
#: convolutions ("conv"), so it shares layers with every visadapt adapter below, ResAdapter's LoRA included
LCM_TARGETS = ["to_q", "to_k", "conv"]
#: a layer both adapters touch in every case but ResAdapter's
SHARED = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
SHARED_CONV = "down_blocks.0.downsamplers.0.conv"


# ------------------------------------------------------------------------------------------------- helpers


def randomise_visadapt(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if inject.ADAPTERS_ATTR in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def diffusers_lora_folder(unet: nn.Module, folder: Path, targets, seed: int, rank: int = 4) -> Path:
    """A LoRA written by diffusers' own ``save_lora_weights`` (PEFT layout) with random B."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(unet)
    torch.manual_seed(seed)
    donor.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(donor))
    return folder


def kohya_file(unet: nn.Module, path: Path, seed: int) -> Path:
    """A kohya (sd-scripts) LoRA on every attn1.to_q / to_v, rank 4, alpha 8 (alpha != rank), in a folder under
    the file name diffusers' loaders look for."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
            state[f"{key}.alpha"] = torch.tensor(8.0)
    path.mkdir()
    save_file(state, str(path / "pytorch_lora_weights.safetensors"))
    return path


def resadapter_folder(unet: nn.Module, folder: Path, seed: int = 0) -> tuple[Path, dict]:
    """ResAdapter's official two files (kohya LoRA on the down/upsampler convs + ResNet norms under diffusers
    names, as tests/test_resadapter.py builds them). Returns the folder and the norm state."""
    generator = torch.Generator().manual_seed(seed)
    lora, norms = {}, {}
    for path, module in unet.named_modules():
        if path.endswith(("downsamplers.0.conv", "upsamplers.0.conv")):
            name = "lora_unet_" + path.replace(".", "_")
            lora[f"{name}.lora_down.weight"] = torch.randn(16, module.in_channels, 3, 3, generator=generator) * 0.05
            lora[f"{name}.lora_up.weight"] = torch.randn(module.out_channels, 16, 1, 1, generator=generator) * 0.05
            lora[f"{name}.alpha"] = torch.tensor(8.0)
        if ".resnets." in path and path.endswith((".norm1", ".norm2")):
            norms[f"{path}.weight"] = module.weight.detach() + torch.randn(module.weight.shape, generator=generator) * 0.2
            norms[f"{path}.bias"] = module.bias.detach() + torch.randn(module.bias.shape, generator=generator) * 0.2
    folder.mkdir()
    save_file(lora, str(folder / "pytorch_lora_weights.safetensors"))
    save_file(norms, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder, norms


def visadapt_file(unet: nn.Module, path: Path, plugin: str, seed: int, **config) -> Path:
    unet = copy.deepcopy(unet)
    visadapt.attach(unet, plugin, **config)
    randomise_visadapt(unet, seed)
    return visadapt.save_adapter(unet, path)


@pytest.fixture(scope="module")
def files(base_pipe, tmp_path_factory) -> dict[str, Path]:
    """The diffusers LoRA ("lcm") and one input per layout visadapt loads, each touching LCM_TARGETS' layers."""
    root = tmp_path_factory.mktemp("coexist")
    unet = base_pipe.unet
    return {
        "lcm": diffusers_lora_folder(unet, root / "lcm", LCM_TARGETS, seed=5),
        "diffusers": diffusers_lora_folder(unet, root / "diffusers", ["to_q", "to_v"], seed=6),
        "kohya": kohya_file(unet, root / "kohya", seed=7),
        "resadapter": resadapter_folder(unet, root / "resadapter")[0],
        "selma": visadapt_file(unet, root / "selma_counting.safetensors", "selma", seed=8, rank=4, alpha=4.0,
                               skill="counting"),
        "target_modules": visadapt_file(unet, root / "modules.safetensors", "lora", seed=9, rank=4, alpha=8.0,
                                        target_modules=(SHARED, SHARED_CONV, "to_v")),
        "site_kinds": visadapt_file(unet, root / "kinds.safetensors", "lora", seed=10, rank=4, alpha=4.0,
                                    targets=("q", "v", "conv2", "downsample")),
    }


LAYOUTS = ["diffusers", "kohya", "resadapter", "selma", "target_modules", "site_kinds"]


def visadapt_delta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The sum of visadapt's deltas at a host layer, computed from its delta modules alone."""
    return sum(m(x) for per_name in getattr(module, inject.ADAPTERS_ATTR).values() for m in per_name.values())


def peft_delta(wrapper: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The sum of PEFT's LoRA deltas at a tuner layer, computed from its lora_A / lora_B alone."""
    return sum(wrapper.lora_B[n](wrapper.lora_A[n](x)) * wrapper.scaling[n] for n in wrapper.active_adapters)


def check_layer_sums_both(unet: nn.Module, path: str) -> None:
    """At ``path`` PEFT wraps the real layer and visadapt hooks it: output = base + PEFT delta + visadapt delta."""
    wrapper = unet.get_submodule(path)
    assert isinstance(wrapper, BaseTunerLayer)
    base = wrapper.get_base_layer()
    assert inject.ADAPTERS_ATTR in base._modules and inject.ADAPTERS_ATTR not in wrapper._modules
    generator = torch.Generator().manual_seed(3)
    if isinstance(base, nn.Conv2d):
        x = torch.randn(1, base.in_channels, 8, 8, generator=generator)
        plain = nn.functional.conv2d(x, base.weight, base.bias, base.stride, base.padding)
    else:
        x = torch.randn(1, 5, base.in_features, generator=generator)
        plain = nn.functional.linear(x, base.weight, base.bias)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), plain + peft_delta(wrapper, x) + visadapt_delta(base, x),
                                   atol=1e-5, rtol=1e-5)


def load_x(pipe, files, layout: str) -> str:
    return pipe.load_visadapt(str(files[layout]), adapter_name="vis")


# --------------------------------------------------------------------------------------- both load orders


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_load_orders_act_together_and_unload_in_either_order(base_pipe, files, layout):
    pipe = copy.deepcopy(base_pipe)
    before = every_tensor(pipe)
    # the owners' outputs alone: diffusers' LoRA alone, visadapt's alone
    pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    only_lcm = generate(pipe)
    pipe.unload_lora_weights()
    load_x(pipe, files, layout)
    only_x = generate(pipe)
    pipe.unload_visadapt()
    assert_same_tensors(before, every_tensor(pipe))
    # independent reference for both: diffusers' LoRA folded into the weights by diffusers itself
    # (fuse_lora + unload_lora_weights), then visadapt's adapter alone on that model
    folded = copy.deepcopy(base_pipe)
    folded.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    folded.fuse_lora()
    folded.unload_lora_weights()
    load_x(folded, files, layout)
    reference = generate(folded)
    assert (reference - only_lcm).abs().max() > 1e-4 and (reference - only_x).abs().max() > 1e-4

    # order 1: diffusers first, visadapt after (the official ResAdapter + LCM-LoRA order)
    pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    load_x(pipe, files, layout)
    torch.testing.assert_close(generate(pipe), reference, atol=1e-5, rtol=0)
    hosts = {item.host_path for item in inject.attached(pipe.unet, "vis")}
    assert not any("base_layer" in path for path in hosts)
    shared = SHARED_CONV if SHARED_CONV in hosts else SHARED
    assert shared in hosts
    check_layer_sums_both(pipe.unet, shared)
    pipe.unload_lora_weights()  # diffusers' wrappers go, visadapt stays on the layers they held
    assert torch.equal(generate(pipe), only_x)
    pipe.unload_visadapt()
    assert_same_tensors(before, every_tensor(pipe))

    # order 2: visadapt first, diffusers after; unload visadapt first
    load_x(pipe, files, layout)
    pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    check_layer_sums_both(pipe.unet, shared)
    torch.testing.assert_close(generate(pipe), reference, atol=1e-5, rtol=0)
    pipe.unload_visadapt()
    assert torch.equal(generate(pipe), only_lcm)
    pipe.unload_lora_weights()
    assert_same_tensors(before, every_tensor(pipe))


def test_a_file_saved_under_peft_wrappers_is_the_file_saved_without(pipe, files, tmp_path):
    plain = copy.deepcopy(pipe)
    load_x(plain, files, "target_modules")
    pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    load_x(pipe, files, "target_modules")
    assert io.site_widths(pipe.unet, "vis") == io.site_widths(plain.unet, "vis")
    sites = [{(e.site, e.key, e.status) for e in visadapt.load_report(p.unet, "vis").entries} for p in (pipe, plain)]
    assert sites[0] == sites[1] and not any("base_layer" in site for site, _, _ in sites[0])
    with_peft = pipe.save_visadapt("vis", tmp_path / "with_peft.safetensors")
    without = plain.save_visadapt("vis", tmp_path / "without.safetensors")
    a, b = load_file(str(with_peft)), load_file(str(without))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all("base_layer" not in key for key in a)
    meta_a, meta_b = io.read_adapter_metadata(with_peft), io.read_adapter_metadata(without)
    assert meta_a["site_widths"] == meta_b["site_widths"] and meta_a["config"] == meta_b["config"]


def test_visadapt_loads_and_acts_after_delete_adapters(pipe, files):
    alone = copy.deepcopy(pipe)
    load_x(alone, files, "diffusers")
    expected = generate(alone)
    pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    pipe.delete_adapters("lcm")  # PEFT's wrappers stay, holding no adapter
    assert isinstance(pipe.unet.get_submodule(SHARED), BaseTunerLayer)
    for layout in ("diffusers", "target_modules"):
        load_x(pipe, files, layout)
        expected = generate(alone) if layout == "diffusers" else None
        if expected is not None:
            torch.testing.assert_close(generate(pipe), expected, atol=1e-6, rtol=0)
        pipe.unload_visadapt()


# ---------------------------------------------------------------------------------- ResAdapter + LCM-LoRA


def test_official_resadapter_after_lcm_lora_equals_the_authors_calls(pipe, files):
    """The official README: LCM-LoRA through load_lora_weights, then ResAdapter. The authors load ResAdapter with
    load_lora_weights + unet.load_state_dict(norms); visadapt's one call must give the same image."""
    folder = files["resadapter"]
    norms = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    authors = copy.deepcopy(pipe)
    authors.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    authors.load_lora_weights(str(folder / "pytorch_lora_weights.safetensors"), adapter_name="res")
    authors.set_adapters(["lcm", "res"], [1.0, 1.0])
    authors.unet.load_state_dict(norms, strict=False)
    expected = generate(authors)

    pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    pipe.load_visadapt(str(folder), adapter_name="res")
    torch.testing.assert_close(generate(pipe), expected, atol=1e-5, rtol=0)


def test_resadapter_after_a_fused_lcm_lora_and_fusing_in_reverse_order_is_exact(pipe, files, caplog):
    folder = files["resadapter"]
    norms = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    authors = copy.deepcopy(pipe)
    authors.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    authors.fuse_lora()
    fused_lcm = generate(authors)
    authors.load_lora_weights(str(folder / "pytorch_lora_weights.safetensors"), adapter_name="res")
    authors.set_adapters(["lcm", "res"], [1.0, 1.0])
    authors.unet.load_state_dict(norms, strict=False)
    expected = generate(authors)

    pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
    pipe.fuse_lora()  # what some integrations do right after loading the LCM-LoRA
    fused_weights = every_tensor(pipe)
    pipe.load_visadapt(str(folder), adapter_name="res")
    both = generate(pipe)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)

    # visadapt fused on top of diffusers' fuse, unfused in reverse order: the weights diffusers fused, bit for bit
    pipe.fuse_visadapt()
    torch.testing.assert_close(generate(pipe), both, atol=1e-5, rtol=0)
    pipe.unfuse_visadapt()
    pipe.unload_visadapt()
    assert_same_tensors(fused_weights, every_tensor(pipe))
    assert torch.equal(generate(pipe), fused_lcm)

    # out of order (visadapt fused first, diffusers fused after, visadapt unfused first): visadapt takes off its
    # own delta only, with a warning, instead of putting back weights that would drop diffusers' fused LoRA
    pipe.unfuse_lora()
    unfused = every_tensor(pipe)
    pipe.load_visadapt(str(files["target_modules"]), adapter_name="vis")
    vis_and_lcm = generate(pipe)
    # the other nesting, in reverse order: diffusers' fuse/unfuse round trip inside visadapt's leaves rounding,
    # which visadapt's exact copy removes: every tensor is back bit for bit, with no warning
    before_fuse = every_tensor(pipe)
    pipe.fuse_visadapt()
    pipe.fuse_lora()
    pipe.unfuse_lora()
    with caplog.at_level(logging.WARNING, logger="visadapt.inject"):
        pipe.unfuse_visadapt()
    assert not [r for r in caplog.records if r.name == "visadapt.inject"]
    assert_same_tensors(before_fuse, every_tensor(pipe))
    pipe.fuse_visadapt()
    pipe.fuse_lora()
    with caplog.at_level(logging.WARNING, logger="visadapt.inject"):
        pipe.unfuse_visadapt()
    assert any("changed after adapter 'vis' merged" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(generate(pipe), vis_and_lcm, atol=1e-5, rtol=0)
    pipe.unfuse_lora()
    pipe.unload_visadapt()
    for key, tensor in every_tensor(pipe).items():
        torch.testing.assert_close(tensor, unfused[key], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- adapter names


def test_names_cannot_collide_between_visadapt_and_diffusers(pipe, files):
    pipe.load_lora_weights(str(files["lcm"]), adapter_name="style")
    before = every_tensor(pipe)
    with pytest.raises(ValueError, match=r"'style' is already used by a PEFT/diffusers adapter.*another adapter_name"):
        pipe.load_visadapt(str(files["site_kinds"]), adapter_name="style")
    with pytest.raises(ValueError, match="PEFT/diffusers"):
        visadapt.attach(pipe.unet, "lora", rank=2, adapter_name="style")
    assert_same_tensors(before, every_tensor(pipe))
    assert pipe.list_visadapt() == {}
    # default names never collide: visadapt's default skips diffusers' names and the other way round
    assert pipe.load_visadapt(str(files["site_kinds"])) == "default_1"
    pipe.load_lora_weights(str(files["lcm"]))
    assert set(pipe.unet.peft_config) == {"style", "default_2"}

    other = copy.deepcopy(pipe)
    other.unload_lora_weights()
    other.unload_visadapt()
    other.load_visadapt(str(files["site_kinds"]), adapter_name="vis")
    before = every_tensor(other)
    with pytest.raises(ValueError, match=r"'vis' is already used by a visadapt adapter.*unload_visadapt"):
        other.load_lora_weights(str(files["lcm"]), adapter_name="vis")
    with pytest.raises(ValueError, match="visadapt"):
        other.unet.add_adapter(LoraConfig(r=2, target_modules=["to_k"]), adapter_name="vis")
    assert_same_tensors(before, every_tensor(other))
    assert not getattr(other.unet, "peft_config", None)
    assert not any(isinstance(m, BaseTunerLayer) for m in other.unet.modules())


def test_add_adapter_with_short_target_names_skips_visadapt_modules(pipe, files):
    """PEFT matches target_modules=["to_q"] as a suffix, which visadapt's own module at a to_q site
    (``...to_q.visadapt_adapters.vis.to_q``) also ends with: it is excluded for the injection only."""
    load_x(pipe, files, "site_kinds")  # to_q / to_v sites: modules named ...visadapt_adapters.vis.to_q
    assert any(path.endswith("visadapt_adapters.vis.to_q") for path, _ in pipe.unet.named_modules())
    alone = generate(pipe)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False)
    pipe.unet.add_adapter(config, adapter_name="added")
    wrapped = [path for path, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)]
    to_q = [path for path, _ in peft_compat.named_layers(pipe.unet) if path.endswith("to_q")
            and inject.ADAPTERS_ATTR not in path]
    assert sorted(wrapped) == sorted(to_q)
    assert pipe.unet.peft_config["added"].exclude_modules is None  # the user's config is left as given
    check_layer_sums_both(pipe.unet, SHARED)
    assert (generate(pipe) - alone).abs().max() > 1e-4
    pipe.unet.delete_adapters("added")
    pipe.unet.unload_lora()
    assert torch.equal(generate(pipe), alone)


# ------------------------------------------------------------------------------------------------------ timm


def vit_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def dense_reference(vit: nn.Module, peft_model, vis_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``vit`` with PEFT's and visadapt's deltas each folded by its owner into a copy of the weights: PEFT's
    ``merge_and_unload`` on a copy of ``peft_model`` (visadapt-free), visadapt's ``merge`` on ``vis_model``."""
    folded = copy.deepcopy(peft_model).merge_and_unload()
    vis_model = copy.deepcopy(vis_model)
    visadapt.merge(vis_model)
    base, merged = vit.state_dict(), vis_model.state_dict()
    with torch.no_grad():
        for key, tensor in folded.state_dict().items():
            tensor.add_(merged[key] - base[key])
        return folded(x)


def test_timm_peft_model_and_visadapt_act_together_and_unload_either(caplog):
    torch.manual_seed(0)
    vit = tm.vit().eval()
    original = vit_state(vit)
    x = vit_input()
    with torch.no_grad():
        base_out = vit(x)
    # visadapt alone on a copy, for the reference and for "visadapt still acts after PEFT unloads"
    vis_alone = copy.deepcopy(vit)
    visadapt.attach(vis_alone, "lora", rank=4, targets=("q", "v", "fc1"), adapter_name="vis")
    randomise_visadapt(vis_alone, 1)
    with torch.no_grad():
        vis_out = vis_alone(x)

    peft_model = get_peft_model(copy.deepcopy(vit), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"],
                                                               init_lora_weights=False))
    with torch.no_grad():
        peft_out = peft_model(x)
    reference = dense_reference(vit, peft_model, vis_alone, x)
    peft_round_trip = copy.deepcopy(peft_model)  # what PEFT's own merge + unmerge leave (rounding, k rows)
    peft_round_trip.merge_adapter()
    peft_round_trip.unmerge_adapter()
    peft_round_trip = vit_state(peft_round_trip)
    visadapt.attach(peft_model, "lora", rank=4, targets=("q", "v", "fc1"), adapter_name="vis")
    inject.load_adapter_state(peft_model.get_base_model(), inject.adapter_state(vis_alone, "vis"), "vis")
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)  # PEFT's stay trainable
    with torch.no_grad():
        both = peft_model(x)
    torch.testing.assert_close(both, reference, atol=1e-5, rtol=0)
    for out in (base_out, vis_out, peft_out):
        assert (both - out).abs().max() > 1e-4
    qkv = peft_model.get_base_model().blocks[0].attn.qkv
    assert isinstance(qkv, BaseTunerLayer) and inject.ADAPTERS_ATTR in qkv.get_base_layer()._modules

    # merged and unmerged visadapt give the same output under PEFT; PEFT's merge/unmerge nested inside visadapt's:
    # the rows visadapt adapts (q, v of qkv; fc1) come back bit for bit, the k rows as PEFT alone leaves them
    nested = copy.deepcopy(peft_model)
    before_merge = vit_state(nested)
    visadapt.merge(nested)
    with torch.no_grad():
        torch.testing.assert_close(nested(x), both, atol=1e-5, rtol=0)
    nested.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(nested(x), both, atol=1e-5, rtol=0)
    nested.unmerge_adapter()
    visadapt.unmerge(nested)
    after = vit_state(nested)
    assert sorted(after) == sorted(before_merge)
    dim = vit.embed_dim
    for key, tensor in after.items():
        if key.endswith("attn.qkv.base_layer.weight"):
            assert torch.equal(tensor[:dim], before_merge[key][:dim]) and torch.equal(tensor[2 * dim:],
                                                                                     before_merge[key][2 * dim:])
            assert torch.equal(tensor[dim:2 * dim], peft_round_trip[key][dim:2 * dim])
        else:
            assert torch.equal(tensor, before_merge[key]), key

    # PEFT's unload keeps visadapt acting, and detach then restores every tensor bit for bit
    unloaded = peft_model.unload()
    with torch.no_grad():
        assert torch.equal(unloaded(x), vis_out)
    visadapt.detach(unloaded)
    assert {k: v for k, v in vit_state(unloaded).items()}.keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in vit_state(unloaded).items())

    # visadapt merged, PEFT merge_and_unload, visadapt unmerged out of order: PEFT's fold survives (warning)
    peft_model = get_peft_model(copy.deepcopy(vit), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"],
                                                               init_lora_weights=False))
    visadapt.attach(peft_model, "lora", rank=4, targets=("q", "v", "fc1"), adapter_name="vis")
    inject.load_adapter_state(peft_model.get_base_model(), inject.adapter_state(vis_alone, "vis"), "vis")
    with torch.no_grad():
        peft_only = peft_model.get_base_model()
        visadapt.set_active_adapters(peft_only, [])
        peft_out = peft_model(x)
        visadapt.set_active_adapters(peft_only, None)
        both = peft_model(x)
        # merge_and_unload folds PEFT's LoRA only: visadapt's, unmerged, still acts on the layers PEFT gives back
        torch.testing.assert_close(copy.deepcopy(peft_model).merge_and_unload()(x), both, atol=1e-5, rtol=0)
    visadapt.merge(peft_model)
    merged_model = peft_model.merge_and_unload()
    with caplog.at_level(logging.WARNING, logger="visadapt.inject"):
        visadapt.detach(merged_model)
    assert any("changed after adapter 'vis' merged" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(merged_model(x), peft_out, atol=1e-5, rtol=0)


def test_timm_visadapt_first_then_peft_then_unload_both_in_either_order():
    torch.manual_seed(0)
    vit = tm.vit().eval()
    original = vit_state(vit)
    x = vit_input()
    with torch.no_grad():
        base_out = vit(x)
    # visadapt at the fused qkv site: its module is blocks.N.attn.qkv.visadapt_adapters.vis.qkv, which PEFT's
    # short target "qkv" would also match; it must wrap exactly the real qkv layers
    visadapt.attach(vit, "lora", rank=4, targets=("qkv",), adapter_name="vis")
    randomise_visadapt(vit, 2)
    with torch.no_grad():
        vis_out = vit(x)
    vis_state = inject.adapter_state(vit, "vis")
    peft_model = get_peft_model(vit, LoraConfig(r=4, lora_alpha=4, target_modules=["qkv"], init_lora_weights=False))
    wrapped = sorted(p for p, m in peft_model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer))
    assert wrapped == [f"blocks.{i}.attn.qkv" for i in range(len(vit.blocks))]
    assert peft_model.peft_config["default"].exclude_modules is None
    assert all(p.requires_grad for n, p in vit.named_parameters() if inject.ADAPTERS_ATTR in n)
    with torch.no_grad():
        both = peft_model(x)
    # the file's keys and tensors are the same with PEFT's wrappers around the hosts
    state = inject.adapter_state(vit, "vis")
    assert sorted(state) == sorted(vis_state) and all(torch.equal(state[k], vis_state[k]) for k in state)
    assert all(not i.host_path.count("base_layer") for i in inject.attached(vit))

    # visadapt detached first: PEFT alone remains
    visadapt.detach(peft_model, "vis")
    with torch.no_grad():
        peft_out = peft_model(x)
    assert (both - peft_out).abs().max() > 1e-4
    restored = peft_model.unload()
    assert all(torch.equal(v, original[k]) for k, v in vit_state(restored).items())
    assert sorted(vit_state(restored)) == sorted(original)
    with torch.no_grad():
        assert torch.equal(restored(x), base_out)
    # PEFT unloaded first: visadapt alone remains, and detach gives back every tensor
    visadapt.attach(restored, "lora", rank=4, targets=("qkv",), adapter_name="vis")
    inject.load_adapter_state(restored, vis_state, "vis")
    peft_model = get_peft_model(restored, LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    bare = peft_model.unload()
    with torch.no_grad():
        assert torch.equal(bare(x), vis_out)
    visadapt.detach(bare)
    assert sorted(vit_state(bare)) == sorted(original)
    assert all(torch.equal(v, original[k]) for k, v in vit_state(bare).items())


def seeded_vit() -> nn.Module:
    torch.manual_seed(0)
    return tm.vit().eval()


def test_timm_file_saved_with_peft_equals_the_one_without_and_loads_in_both(tmp_path):
    vit = seeded_vit()
    visadapt.attach(vit, "lora", rank=4, targets=("qkv", "proj"), adapter_name="vis")
    randomise_visadapt(vit, 3)
    without = visadapt.save_adapter(vit, tmp_path / "without.safetensors", "vis")
    peft_model = get_peft_model(vit, LoraConfig(r=2, target_modules=["qkv", "proj"]), adapter_name="peft")
    with_peft = visadapt.save_adapter(peft_model, tmp_path / "with_peft.safetensors", "vis")
    a, b = load_file(str(with_peft)), load_file(str(without))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert io.read_adapter_metadata(with_peft)["site_widths"] == io.read_adapter_metadata(without)["site_widths"]
    x = vit_input()
    with torch.no_grad():
        expected = peft_model(x)
    # the file saved under PEFT loads into a PeftModel (PEFT's LoRA is zero-initialised: output = visadapt's) and
    # into a plain model
    for target in (get_peft_model(seeded_vit(), LoraConfig(r=2, target_modules=["qkv", "proj"])), seeded_vit()):
        visadapt.load_adapter(target, with_peft, "vis")
        with torch.no_grad():
            torch.testing.assert_close(target(x), expected, atol=1e-6, rtol=0)


def test_timm_names_cannot_collide_with_peft():
    vit = tm.vit()
    peft_model = get_peft_model(vit, LoraConfig(r=2, target_modules=["qkv"]))  # adapter "default"
    before = vit_state(peft_model)
    with pytest.raises(ValueError, match="'default' is already used by a PEFT"):
        visadapt.attach(peft_model, "lora", rank=2)
    assert sorted(vit_state(peft_model)) == sorted(before)
    visadapt.attach(peft_model, "lora", rank=2, adapter_name="vis")
    with pytest.raises(ValueError, match="'vis' is already used by a visadapt adapter"):
        peft_model.add_adapter("vis", LoraConfig(r=2, target_modules=["proj"]))
    assert "vis" not in peft_model.peft_config

    other = tm.vit()
    visadapt.attach(other, "lora", rank=2)  # visadapt's "default"
    state = vit_state(other)
    with pytest.raises(ValueError, match="'default' is already used by a visadapt adapter"):
        get_peft_model(other, LoraConfig(r=2, target_modules=["qkv"]))
    assert sorted(vit_state(other)) == sorted(state)
    assert not any(isinstance(m, BaseTunerLayer) for m in other.modules())


# -------------------------------------------------------------------------------------------- canonical paths


def test_canonical_paths_drop_only_peft_wrapper_segments():
    vit = tm.vit()
    vit.blocks[0].attn.base_layer = nn.Linear(2, 2)  # a model's own module that happens to be named base_layer
    get_peft_model(vit, LoraConfig(r=2, target_modules=["qkv"]))
    key = "blocks.0.attn.qkv.base_layer.weight"
    assert key in vit.state_dict()
    assert peft_compat.canonical_path(vit, key) == "blocks.0.attn.qkv.weight"
    assert peft_compat.canonical_path(vit, "blocks.0.attn.base_layer.weight") == "blocks.0.attn.base_layer.weight"
    assert peft_compat.resolve(vit, "blocks.0.attn.qkv") is vit.blocks[0].attn.qkv.base_layer
    layers = dict(peft_compat.named_layers(vit))
    assert layers["blocks.0.attn.qkv"] is vit.blocks[0].attn.qkv.base_layer
    assert "blocks.0.attn.base_layer" in layers and "blocks.0.attn.qkv.base_layer" not in layers
    assert not any("lora_" in path for path in layers)


# ------------------------------------------------------------------------------------------------- open_clip


def test_open_clip_mlp_sites_coexist_and_weight_deltas_under_peft_attention_are_refused():
    """open_clip's q/k/v are row slices of nn.MultiheadAttention.in_proj_weight, which visadapt adapts by a weight
    delta; PEFT's MultiheadAttention LoRA swaps that weight at every call. The two cannot share it: refused both
    ways before anything changes. Linear layers (the MLP) coexist like timm's."""
    torch.manual_seed(0)
    clip = tm.clip().eval()
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    peft_model = get_peft_model(clip, LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    wrapped_state = vit_state(clip)
    # PEFT's MultiheadAttention LoRA merges and unmerges at every call, leaving rounding in the weights: the
    # reference is the same calls without visadapt
    peft_alone = copy.deepcopy(peft_model)
    with torch.no_grad():
        for _ in range(2):
            peft_alone.get_base_model().encode_image(image)
    expected = vit_state(peft_alone.unload())
    with pytest.raises(ValueError, match=r"resblocks\.0\.attn:q is a weight of an attention layer PEFT has wrapped"):
        visadapt.attach(peft_model, "lora", rank=2, targets=("q", "v"), adapter_name="vis")
    assert vit_state(clip).keys() == wrapped_state.keys() and not visadapt.api.records(clip)
    visadapt.attach(peft_model, "lora", rank=2, targets=("fc1",), adapter_name="vis")
    randomise_visadapt(clip, 4)
    with torch.no_grad():
        both = clip.encode_image(image)
        visadapt.set_active_adapters(clip, [])
        peft_only = clip.encode_image(image)
        visadapt.set_active_adapters(clip, None)
    assert (both - peft_only).abs().max() > 1e-4
    bare = peft_model.unload()
    visadapt.detach(bare)
    assert sorted(vit_state(bare)) == sorted(expected)
    assert all(torch.equal(v, expected[k]) for k, v in vit_state(bare).items())

    visadapt.attach(bare, "lora", rank=2, targets=("q", "v"), adapter_name="vis")
    before = vit_state(bare)
    with pytest.raises(ValueError, match=r"PEFT would wrap visual\.transformer\.resblocks\.0\.attn"):
        get_peft_model(bare, LoraConfig(r=2, target_modules=["attn"]))
    assert not any(isinstance(m, BaseTunerLayer) for m in bare.modules())
    assert vit_state(bare).keys() == before.keys()


# ------------------------------------------------------------------- foreign formats on models PEFT has touched


def peft_folder(tmp_path: Path) -> Path:
    """A PEFT LoRA on every qkv (rank 4, alpha 8, random B), written by ``PeftModel.save_pretrained``."""
    donor = get_peft_model(seeded_vit(), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"],
                                                    init_lora_weights=False))
    donor.save_pretrained(tmp_path / "peft_lora")
    return tmp_path / "peft_lora"


@pytest.mark.parametrize("wrapping", ["peft_model", "inject_adapter_in_model"])
def test_a_peft_folder_loads_on_a_model_peft_has_wrapped(tmp_path, wrapping):
    """A PEFT folder through visadapt.load_adapter on a ``PeftModel`` (keys must not gain its
    ``base_model.model.`` prefix twice) and on a plain model whose qkv PEFT wrapped (the target is the real Linear
    under the wrapper, not the wrapper or PEFT's own lora_A/lora_B): the output is PEFT's own load of the folder
    (PEFT's adapter here is zero-initialised, so it adds nothing)."""
    from peft import PeftModel, inject_adapter_in_model

    folder = peft_folder(tmp_path)
    x = vit_input()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(seeded_vit(), folder).eval()(x)
    other = LoraConfig(r=2, target_modules=["qkv", "proj"])
    if wrapping == "peft_model":
        target = get_peft_model(seeded_vit(), other, adapter_name="first")
        plain = target.get_base_model()
    else:
        target = plain = inject_adapter_in_model(other, seeded_vit(), adapter_name="first")
    assert isinstance(plain.blocks[0].attn.qkv, BaseTunerLayer)
    visadapt.load_adapter(target, folder, "vis")
    report = visadapt.load_report(plain, "vis")
    assert not report.missing and not report.unexpected and not report.mismatched
    assert sorted(report.matched) == sorted(f"base_model.model.blocks.{i}.attn.qkv.lora_{ab}.weight"
                                            for i in range(len(plain.blocks)) for ab in "AB")
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, atol=1e-5, rtol=0)


def unet_output(unet: nn.Module) -> torch.Tensor:
    """One UNet call (batch 1 at the config's sample size, timestep 10, fixed random text states)."""
    config = unet.config
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    text = torch.randn(1, 4, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text).sample


@pytest.mark.parametrize("loader", ["load_adapter", "load_official"])
def test_official_resadapter_loads_on_a_peft_model_around_the_unet(base_pipe, files, loader):
    """ResAdapter's two files on a ``PeftModel`` wrapping the UNet (its LoRA on the ResAdapter convs too,
    zero-initialised): the same UNet output as the load on the bare UNet, adapter on the wrapped UNet."""
    from visadapt.plugins.resadapter import load_official

    folder = files["resadapter"]
    plain = copy.deepcopy(base_pipe.unet)
    visadapt.load_adapter(plain, folder, "res")
    expected = unet_output(plain)
    wrapped = get_peft_model(copy.deepcopy(base_pipe.unet), LoraConfig(r=2, target_modules=LCM_TARGETS),
                             adapter_name="lcm")
    if loader == "load_adapter":
        visadapt.load_adapter(wrapped, folder, "res")
    else:
        load_official(wrapped, load_file(str(folder / "pytorch_lora_weights.safetensors")),
                      load_file(str(folder / "diffusion_pytorch_model.safetensors")), "res")
    unet = wrapped.get_base_model()
    assert visadapt.load_report(unet, "res").ok
    torch.testing.assert_close(unet_output(unet), expected, atol=1e-5, rtol=0)


def test_timm_visadapt_merged_before_peft_wraps_and_fuses_unmerges_its_own_delta_only(caplog):
    """visadapt merges while no PEFT layer exists, then PEFT wraps the layer and fuses its LoRA into the same weight:
    visadapt's unmerge must take off its own delta and keep PEFT's fold (not put back the weight from before PEFT)."""
    torch.manual_seed(0)
    vit = tm.vit().eval()
    x = vit_input()
    model = copy.deepcopy(vit)
    visadapt.attach(model, "lora", rank=4, targets=("q", "v"), adapter_name="vis")
    randomise_visadapt(model, 1)
    visadapt.merge(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], init_lora_weights=False))
    peft_only = get_peft_model(copy.deepcopy(vit), LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"],
                                                              init_lora_weights=False))
    peft_only.load_state_dict({k: v for k, v in peft_model.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        both = peft_model(x)
        assert (both - peft_only(x)).abs().max() > 1e-3  # visadapt's delta is in the weight
    peft_model.merge_adapter()
    with caplog.at_level(logging.WARNING, logger="visadapt.inject"):
        visadapt.unmerge(peft_model)  # back to its hooks: the output is unchanged
    assert any("changed after adapter 'vis' merged" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), both, atol=1e-5, rtol=0)
    visadapt.detach(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), peft_only(x), atol=1e-5, rtol=0)  # PEFT's fold survived
