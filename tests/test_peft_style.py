"""``visadapt.merge_and_unload`` and ``visadapt.disable_adapters`` against PEFT's own ``merge_and_unload()``
and ``disable_adapter()`` on the same LoRA weights (a PEFT folder loaded by both libraries), plus what PEFT
has no counterpart for: refusals of adapters that cannot fold, merged adapters, heads, pipelines."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import visadapt
from tests import tiny_models
from visadapt import inject
from visadapt.plugins.lora import LoRAPlugin

pytestmark = pytest.mark.usefixtures("_one_thread")  # fixtures (base_pipe): tests/conftest.py


def randomise(model: nn.Module, seed: int, marker: str = inject.ADAPTERS_ATTR) -> None:
    """Random adapter tensors (a zero-initialised LoRA B would make every comparison trivially equal)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if marker in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def vit_out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def unet_out(unet: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), context).sample


def is_plain(model: nn.Module) -> bool:
    """No visadapt module, hook, parametrization or record left anywhere in ``model``."""
    return (not any("visadapt" in name for name, _ in model.named_modules())
            and not any("visadapt" in key for key in model.state_dict())
            and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
            and not any(hasattr(m, "parametrizations") for m in model.modules())
            and not visadapt.api.records(model))


def peft_folder(model: nn.Module, folder, config: LoraConfig, seed: int):
    """``model`` wrapped by ``get_peft_model``, every LoRA (and modules_to_save) tensor random, saved."""
    peft_model = get_peft_model(copy.deepcopy(model), config)
    randomise(peft_model, seed, "lora_")
    randomise(peft_model, seed + 1, "modules_to_save")
    peft_model.save_pretrained(folder)
    return folder


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()}




def test_timm_vit_merge_and_unload_and_disable_equal_peft(tmp_path):
    torch.manual_seed(0)
    vit = tiny_models.vit().eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1"], modules_to_save=["head"])
    folder = peft_folder(vit, tmp_path / "peft", config, seed=1)
    theirs = PeftModel.from_pretrained(copy.deepcopy(vit), folder).eval()
    ours = copy.deepcopy(vit)
    visadapt.load_adapter(ours, folder)
    adapted = vit_out(ours)
    assert (adapted - vit_out(vit)).abs().max() > 1e-2  # the LoRA and the head change the output
    assert (adapted - vit_out(theirs)).abs().max() <= 1e-5

    # disable: PEFT runs the base layers and the original head; so does visadapt, exactly the base model
    before_flags = flags(ours)
    with theirs.disable_adapter():
        disabled_theirs = vit_out(theirs)
    with visadapt.disable_adapters(ours):
        disabled_ours = vit_out(ours)
        assert flags(ours) == before_flags
    assert torch.equal(disabled_ours, vit_out(vit))
    assert (disabled_ours - disabled_theirs).abs().max() <= 1e-6
    assert torch.equal(vit_out(ours), adapted) and flags(ours) == before_flags

    plain_theirs = theirs.merge_and_unload()
    plain_ours = visadapt.merge_and_unload(ours)
    assert plain_ours is ours and is_plain(plain_ours)
    assert (vit_out(plain_ours) - vit_out(plain_theirs)).abs().max() <= 1e-5
    assert (vit_out(plain_ours) - adapted).abs().max() <= 1e-5
    # the same plain model: same keys, weights within fp32 rounding, the trained head kept by both
    ours_state, theirs_state = plain_ours.state_dict(), plain_theirs.state_dict()
    assert list(ours_state) == list(theirs_state) == list(vit.state_dict())
    assert all((ours_state[k] - theirs_state[k]).abs().max() <= 1e-6 for k in ours_state)
    assert torch.equal(ours_state["head.weight"], theirs_state["head.weight"])
    assert not torch.equal(ours_state["head.weight"], vit.state_dict()["head.weight"])
    # the requires_grad flags from before the first attach are back (all True on a fresh timm model)
    assert all(flags(plain_ours).values())


def test_unet_merge_and_unload_and_disable_equal_peft(base_pipe, tmp_path):
    unet = base_pipe.unet
    folder = peft_folder(unet, tmp_path / "peft_unet",
                         LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_v", "conv1"],
                                    alpha_pattern={"conv1": 2}), seed=3)
    theirs = PeftModel.from_pretrained(copy.deepcopy(unet), folder)
    ours = copy.deepcopy(unet)
    visadapt.load_adapter(ours, folder)
    adapted = unet_out(ours)
    assert (adapted - unet_out(unet)).abs().max() > 1e-3
    assert (adapted - unet_out(theirs)).abs().max() <= 1e-5

    with theirs.disable_adapter():
        disabled_theirs = unet_out(theirs)
    with visadapt.disable_adapters(ours):
        disabled_ours = unet_out(ours)
    assert torch.equal(disabled_ours, unet_out(unet)) and torch.equal(disabled_ours, disabled_theirs)
    assert torch.equal(unet_out(ours), adapted)

    plain_theirs = theirs.merge_and_unload()
    plain_ours = visadapt.merge_and_unload(ours)
    assert is_plain(plain_ours)
    assert (unet_out(plain_ours) - unet_out(plain_theirs)).abs().max() <= 1e-5
    assert (unet_out(plain_ours) - adapted).abs().max() <= 1e-5
    ours_state, theirs_state = plain_ours.state_dict(), plain_theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert all((ours_state[k] - theirs_state[k]).abs().max() <= 1e-6 for k in ours_state)




@pytest.mark.parametrize(("plugin", "config", "reason"), [
    ("adapter", {}, "non-linearity"),
    ("mosa", {}, "BottleneckAdapter"),  # MoSA's default base merges into one adapter, not into weights
    ("bitadapter", {}, "1-bit adapters"),
])
def test_adapters_that_cannot_fold_are_refused_before_anything_changes(plugin, config, reason):
    model = tiny_models.vit().eval()
    visadapt.attach(model, plugin, head="head", **config)
    randomise(model, 0)
    visadapt.attach(model, "lora", adapter_name="lora_too", rank=2)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    before = vit_out(model)
    with pytest.raises(ValueError, match=reason) as error:
        visadapt.merge_and_unload(model)
    message = str(error.value)
    assert f"adapter 'default' ({plugin})" in message and "visadapt export" in message
    assert "Nothing was changed" in message
    assert list(visadapt.api.records(model)) == ["default", "lora_too"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(vit_out(model), before)


@pytest.mark.parametrize(("plugin", "config"), [
    ("lora", {"rank": 4, "targets": ("q", "v", "fc1")}),
    ("lora", {"rank": 4, "bits": 2}),                       # k-bit factors: their dequantised product folds
    ("mosa", {"base": "lora", "dim": 4, "num_modules": 2}),  # MoSL: the merged LoRA folds into the backbone
    ("linear", {}),                                          # nothing to fold; the head stays
])
def test_foldable_adapters_leave_a_plain_model_with_the_same_output(plugin, config):
    base = tiny_models.vit().eval()
    model = copy.deepcopy(base)
    visadapt.attach(model, plugin, head="head", **config)
    randomise(model, 1)
    trained_head = model.head.weight.detach() + torch.randn(model.head.weight.shape)
    with torch.no_grad():
        model.head.weight.copy_(trained_head)
    adapted = vit_out(model)
    assert (adapted - vit_out(base)).abs().max() > 1e-2
    visadapt.merge_and_unload(model)
    assert is_plain(model)
    assert (vit_out(model) - adapted).abs().max() <= 1e-5
    assert torch.equal(model.head.weight, trained_head)


def test_open_clip_weight_sites_and_a_merged_adapter_fold():
    # open_clip's attention reads in_proj_weight directly: visadapt adds a parametrization there, which must
    # go
    model = tiny_models.clip().eval()
    visadapt.attach(model, "lora", rank=2, targets=("q", "v", "fc1"))
    randomise(model, 2)
    (args, _) = tiny_models.example_input("open_clip")
    with torch.no_grad():
        adapted = tiny_models.output_tensor(model(*args))
    visadapt.merge(model)  # merged already: merge_and_unload keeps the merge
    visadapt.merge_and_unload(model)
    assert is_plain(model)
    with torch.no_grad():
        assert (tiny_models.output_tensor(model(*args)) - adapted).abs().max() <= 1e-5


def test_switched_off_adapters_are_dropped_with_a_warning_and_one_name_keeps_the_others(caplog):
    model = tiny_models.vit().eval()
    visadapt.attach(model, "lora", adapter_name="a", rank=2, targets=("q",))
    visadapt.attach(model, "adapter", adapter_name="off")
    visadapt.attach(model, "adapter", adapter_name="b")
    randomise(model, 3)
    # one name: "a" folds, "b" keeps running as a module, "off" stays attached and switched off
    visadapt.set_active_adapters(model, ["a", "b"])
    adapted = vit_out(model)
    with pytest.raises(ValueError, match="switched off"):
        visadapt.merge_and_unload(model, "off")
    visadapt.merge_and_unload(model, "a")
    assert list(visadapt.api.records(model)) == ["off", "b"]
    assert (vit_out(model) - adapted).abs().max() <= 1e-5
    # all: "b" cannot fold, so nothing happens; after detaching it, "off" is dropped unmerged with a warning
    with pytest.raises(ValueError, match="'b' \\(adapter\\)"):
        visadapt.merge_and_unload(model)
    visadapt.detach(model, "b")
    expected = vit_out(model)
    with caplog.at_level(logging.WARNING, logger="visadapt.peft_style"):
        visadapt.merge_and_unload(model)
    assert "'off'" in caplog.text and is_plain(model)
    assert torch.equal(vit_out(model), expected)


def test_one_name_is_refused_while_another_adapter_is_merged():
    model = tiny_models.vit().eval()
    visadapt.attach(model, "lora", adapter_name="a", rank=2)
    visadapt.attach(model, "lora", adapter_name="b", rank=2)
    randomise(model, 4)
    visadapt.merge(model, "b")
    with pytest.raises(ValueError, match="'b' is merged"):
        visadapt.merge_and_unload(model, "a")
    adapted = vit_out(model)
    visadapt.merge_and_unload(model)
    assert is_plain(model) and (vit_out(model) - adapted).abs().max() <= 1e-5


class _MergeThatLeavesModules(LoRAPlugin):
    """A third-party plugin claiming to merge whose merge folds nothing."""

    name = "lazy_lora"

    def merge(self, model, adapter_name):
        pass


def test_a_plugin_whose_merge_leaves_modules_running_is_refused_and_undone():
    model = tiny_models.vit().eval()
    visadapt.attach(model, "lora", adapter_name="real", rank=2)
    visadapt.attach(model, _MergeThatLeavesModules(), adapter_name="lazy", rank=2)
    randomise(model, 5)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="'lazy' \\(lazy_lora\\) left .* unmerged"):
        visadapt.merge_and_unload(model)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert not any(getattr(item.module, "merged", False) for item in inject.attached(model))


def test_merge_and_unload_and_disable_on_a_peft_model_act_on_visadapt_only():
    vit = tiny_models.vit().eval()
    peft_model = get_peft_model(copy.deepcopy(vit), LoraConfig(r=2, target_modules=["fc2"]))
    randomise(peft_model, 6, "lora_")
    visadapt.attach(peft_model, "lora", adapter_name="ours", rank=2, targets=("fc1",))
    randomise(peft_model, 7)
    adapted = vit_out(peft_model)
    # disable_adapters switches off visadapt's adapter only: the model is then the PEFT model without it
    with visadapt.disable_adapters(peft_model):
        peft_only = vit_out(peft_model)
    without_ours = copy.deepcopy(peft_model)
    visadapt.detach(without_ours)
    assert torch.equal(peft_only, vit_out(without_ours)) and not torch.equal(peft_only, adapted)
    assert torch.equal(vit_out(peft_model), adapted)
    with peft_model.disable_adapter():
        ours_only = vit_out(peft_model)

    assert visadapt.merge_and_unload(peft_model) is peft_model
    assert not any("visadapt" in key for key in peft_model.state_dict())
    assert any("lora_" in key for key in peft_model.state_dict())  # PEFT's adapter is PEFT's
    assert (vit_out(peft_model) - adapted).abs().max() <= 1e-5
    with peft_model.disable_adapter():  # visadapt's LoRA is in the weights now, PEFT's still a module
        assert (vit_out(peft_model) - ours_only).abs().max() <= 1e-5
    plain = peft_model.merge_and_unload()
    assert is_plain(plain) and (vit_out(plain) - adapted).abs().max() <= 1e-5


def test_merge_and_unload_on_a_pipeline_component_forgets_the_pipeline_records(pipe):
    visadapt.attach(pipe.unet, "resadapter", adapter_name="res")
    visadapt.attach(pipe.unet, "lora", adapter_name="style", rank=2, targets=("to_q",))
    randomise(pipe.unet, 8)
    pipe.fuse_visadapt(adapter_names=["res"], lora_scale=0.5)
    adapted = unet_out(pipe.unet)
    visadapt.merge_and_unload(pipe.unet)
    assert is_plain(pipe.unet) and pipe.list_visadapt() == {}
    assert (unet_out(pipe.unet) - adapted).abs().max() <= 1e-5
    assert not {k for k in pipe.unet.__dict__ if k.startswith("_visadapt_fused")}
    pipe.disable_visadapt()  # would refuse on a stale record of a fused adapter


def test_merge_and_unload_without_adapters_says_so():
    with pytest.raises(ValueError, match="no visadapt adapter is attached"):
        visadapt.merge_and_unload(tiny_models.vit())




def test_disable_restores_merged_adapters_bit_for_bit_even_when_the_block_raises():
    base = tiny_models.vit().eval()
    model = copy.deepcopy(base)
    visadapt.attach(model, "lora", adapter_name="a", rank=2, targets=("q", "v"), head="head")
    visadapt.attach(model, "lora", adapter_name="b", rank=3, targets=("v", "fc1"))
    visadapt.attach(model, "adapter", adapter_name="c")
    randomise(model, 9)
    visadapt.merge(model, "b")
    visadapt.merge(model, "a")  # stacked on the same qkv weight in the order b, a
    adapted, state, grads = vit_out(model), copy.deepcopy(model.state_dict()), flags(model)
    with pytest.raises(RuntimeError, match="inside"), visadapt.disable_adapters(model):
        assert torch.equal(vit_out(model), vit_out(base))
        assert flags(model) == grads
        raise RuntimeError("inside")
    assert torch.equal(vit_out(model), adapted) and flags(model) == grads
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    # only "a": the others keep running, merged "b" included; the model equals one that never had "a"
    without_a = copy.deepcopy(model)
    visadapt.detach(without_a, "a")
    with visadapt.disable_adapters(model, "a"):
        assert (vit_out(model) - vit_out(without_a)).abs().max() <= 1e-5
        assert visadapt.active_adapters(model) == ["b", "c"]
    assert torch.equal(vit_out(model), adapted)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    with pytest.raises(KeyError, match="'z'"), visadapt.disable_adapters(model, "z"):
        pass


def test_disable_shows_the_head_from_before_a_load(tmp_path):
    base = tiny_models.vit().eval()
    trained = copy.deepcopy(base)
    visadapt.attach(trained, "lora", rank=2, head="head")
    randomise(trained, 10)
    with torch.no_grad():
        trained.head.weight.mul_(-1.0)
    path = visadapt.save_adapter(trained, tmp_path / "a.safetensors")
    loaded = copy.deepcopy(base)
    visadapt.load_adapter(loaded, path)
    adapted = vit_out(loaded)
    with visadapt.disable_adapters(loaded):
        assert torch.equal(vit_out(loaded), vit_out(base))
    assert torch.equal(vit_out(loaded), adapted)
    # a head trained in place has no other values: it stays (as after detach)
    with visadapt.disable_adapters(trained):
        assert torch.equal(trained.head.weight, -base.head.weight)


def test_disable_on_open_clip():
    base = tiny_models.clip().eval()
    model = copy.deepcopy(base)
    visadapt.attach(model, "lora", rank=2, targets=("q", "v"))
    visadapt.attach(model, "adapter", adapter_name="mlp")
    randomise(model, 11)
    (args, _) = tiny_models.example_input("open_clip")

    def out(m):
        with torch.no_grad():
            return tiny_models.output_tensor(m(*args))

    adapted = out(model)
    # the reference is frozen like the adapted model: with every parameter frozen, torch's attention takes
    # another path and open_clip's output moves by ~2e-7 whatever visadapt does (the flags are not the
    # context's to change)
    frozen_base = copy.deepcopy(base).requires_grad_(False)
    with visadapt.disable_adapters(model):
        assert torch.equal(out(model), out(frozen_base))
    assert torch.equal(out(model), adapted)


def test_disable_on_a_pipeline_with_a_fused_resadapter_and_a_disabled_pipe(pipe, base_pipe, tmp_path):
    # both adapters come in through the pipeline loader, as users load them
    trained = copy.deepcopy(base_pipe.unet)
    visadapt.attach(trained, "resadapter", adapter_name="res")
    visadapt.attach(trained, "lora", adapter_name="style", rank=2, targets=("to_q",))
    randomise(trained, 12)
    for name in ("res", "style"):
        pipe.load_visadapt(visadapt.save_adapter(trained, tmp_path / f"{name}.safetensors", name), name)
    pipe.fuse_visadapt(adapter_names=["res"])
    adapted, grads = unet_out(pipe.unet), flags(pipe.unet)
    state = copy.deepcopy(pipe.unet.state_dict())
    with visadapt.disable_adapters(pipe):
        assert torch.equal(unet_out(pipe.unet), unet_out(base_pipe.unet))
    assert torch.equal(unet_out(pipe.unet), adapted) and flags(pipe.unet) == grads
    assert all(torch.equal(value, state[key]) for key, value in pipe.unet.state_dict().items())
    pipe.unfuse_visadapt()
    pipe.disable_visadapt()  # the pipeline's own switch: the context keeps it as it was
    with visadapt.disable_adapters(pipe.unet):
        pass
    assert torch.equal(unet_out(pipe.unet), unet_out(base_pipe.unet))
    pipe.enable_visadapt()
    assert (unet_out(pipe.unet) - adapted).abs().max() <= 1e-5
    with pytest.raises(TypeError, match="diffusers pipeline"), visadapt.disable_adapters(object()):
        pass
