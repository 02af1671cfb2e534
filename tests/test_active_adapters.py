"""set_active_adapters: only the named adapters run (PEFT's set_adapter), the others stay attached and cost nothing."""
from __future__ import annotations

import pytest
import torch

import visadapt
from tests import tiny_models as tm

torch.set_num_threads(1)


def randomize(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f"visadapt_adapters.{name}." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_only_active_adapters_run(family):
    build = {"vit": tm.vit, "clip": tm.clip}[family]
    model = build().eval()
    args, kwargs = tm.example_input("open_clip" if family == "clip" else "timm_vit", model)

    def run():
        with torch.no_grad():
            return tm.output_tensor(model(*args, **kwargs))

    base = run()

    # "qkv"/"q"/"v" on open_clip are weight sites (a parametrization), "mlp" a parallel hook site
    visadapt.attach(model, "lora", rank=4, targets=("q", "v"), adapter_name="a")
    visadapt.attach(model, "adapter", adapter_name="b")
    randomize(model, "a", 0)
    randomize(model, "b", 1)
    both = run()
    visadapt.set_active_adapters(model, "a")
    only_a = run()
    assert visadapt.active_adapters(model) == ["a"]
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for n, m in model.named_modules()
               if ".visadapt_adapters.b." in f".{n}." and not any(True for _ in m.children())]
    run()
    assert handles and not calls  # the inactive adapter's modules are never called
    visadapt.set_active_adapters(model, [])
    # open_clip's attention takes another kernel while its weight is parametrized: equal up to rounding
    assert torch.allclose(run(), base, atol=1e-5, rtol=0)
    visadapt.set_active_adapters(model, None)
    assert torch.equal(run(), both)
    visadapt.detach(model, "b")
    assert torch.allclose(run(), only_a, atol=1e-6)


def test_unknown_names_and_merged_adapters_are_refused():
    model = tm.vit()
    visadapt.attach(model, "lora", adapter_name="a")
    with pytest.raises(KeyError, match="'z'.*attached: 'a'"):
        visadapt.set_active_adapters(model, ["z"])
    visadapt.merge(model)
    with pytest.raises(ValueError, match="unmerge it before switching it off"):
        visadapt.set_active_adapters(model, [])


def test_merged_layers_are_called_without_hooks():
    """A layer whose adapters are all merged (or switched off) has no hooks left: it runs like a plain layer."""
    model = tm.vit().eval()
    args, kwargs = tm.example_input("timm_vit", model)
    visadapt.attach(model, "lora", rank=4, targets=("qkv", "fc1"))
    randomize(model, "default", 0)
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():
        unmerged = model(*args, **kwargs)
    assert qkv._forward_hooks and qkv._forward_pre_hooks
    visadapt.merge(model)
    assert not qkv._forward_hooks and not qkv._forward_pre_hooks
    with torch.no_grad():
        assert torch.allclose(model(*args, **kwargs), unmerged, atol=1e-5)
    visadapt.unmerge(model)
    assert qkv._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs), unmerged)
    visadapt.set_active_adapters(model, [])
    assert not qkv._forward_hooks
    visadapt.set_active_adapters(model, None)
    visadapt.detach(model)
    assert not qkv._forward_hooks and not qkv._forward_pre_hooks


def test_a_weight_set_after_torch_compile_is_not_ignored():
    """A fresh adapter runs at weight 1; setting its weight only after compiling must still take effect (dynamo
    guards a key that exists in a module's __dict__, not the absence of one)."""
    import copy

    torch.manual_seed(0)
    model = tm.vit().eval()
    visadapt.attach(model, "lora", rank=4)
    randomize(model, "default", 3)
    eager = copy.deepcopy(model)
    visadapt.set_weight(eager, "default", 0.5)
    (x,), _ = tm.example_input("timm_vit", model)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(x)  # compiled while the weight is still the default
        visadapt.set_weight(model, "default", 0.5)
        assert torch.equal(compiled(x), eager(x))
        visadapt.set_active_adapters(model, [])
        assert torch.equal(compiled(x), model(x))
