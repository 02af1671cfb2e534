"""The cheap unfused LoRA path (visadapt.layers.add_lora_deltas, run from each host's call plan) computes what the
per-module path computes: same outputs and gradients, merge/unmerge still bit for bit, and the call plan follows
every change of which modules run. Behaviour only; the speed is measured by eval/bench/diffusers_overhead.py."""
from __future__ import annotations

import contextlib

import pytest
import tiny_models as tm
import torch
from torch import nn

import visadapt
from visadapt import inject
from visadapt.layers import LoRA, add_lora_deltas, add_rows, batchable_lora

torch.set_num_threads(1)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-zero B matrices (they start at zero, which would make every delta vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in visadapt.trainable_parameters(model):
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)


@contextlib.contextmanager
def per_module_path():
    """Within this context every LoRA runs through its own forward, one by one (the path before batching)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inject, "batchable_lora", lambda module: False)
        yield


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str = "output") -> None:
    """Equal up to float32 rounding of sums taken in another order: within 1e-5 of the tensor's largest value
    (an element-wise relative bound would trip on elements that are sums cancelling to near zero)."""
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= 1e-5 * scale + 1e-8, f"{what}: max error {error:.3g} at scale {scale:.3g}"


def outputs_and_grads(model: nn.Module, args, kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = tm.output_tensor(model(*args, **kwargs))
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["timm_vit", "diffusers_unet"])
def test_batched_lora_path_equals_the_per_module_path(family):
    """Outputs and every gradient agree, with row slices (q, v of a fused qkv), two adapters on one layer (one of
    them weighted 0.5), alpha != rank, convolutions (UNet ResNet convs) and attention projections."""
    if family == "timm_vit":
        model, targets = tm.vit(), ("q", "v", "fc1")
    else:
        model, targets = tm.unet(), ("to_q", "to_k", "to_v", "to_out", "conv1", "conv2")
    visadapt.attach(model, "lora", rank=4, alpha=8.0, targets=targets)
    visadapt.attach(model, "lora", rank=2, alpha=2.0, targets=targets[:2], adapter_name="second")
    visadapt.set_weight(model, "second", 0.5)
    randomize(model)
    model.train()
    plans = [inject.call_plan(m) for m in model.modules() if inject.call_plan(m) is not None]
    assert plans and all(plan.lora and not plan.linear for plan in plans)  # every LoRA runs batched
    assert any(len(plan.lora) > 1 for plan in plans)

    args, kwargs = tm.example_input(family, model)
    out, grads = outputs_and_grads(model, args, kwargs)
    with per_module_path():
        ref_out, ref_grads = outputs_and_grads(model, args, kwargs)
    assert_close_to_scale(out, ref_out)
    assert grads.keys() == ref_grads.keys() and any("visadapt_adapters" in name for name in grads)
    for name in grads:
        assert_close_to_scale(grads[name], ref_grads[name], name)


@pytest.mark.parametrize("conv", [False, True])
def test_add_lora_deltas_equals_adding_each_lora(conv):
    """One layer, three LoRAs: all outputs, rows [2, 7) and rows [7, 12), with their own scalings and weights."""
    torch.manual_seed(0)
    host = nn.Conv2d(5, 12, 3, stride=2, padding=1) if conv else nn.Linear(5, 12)
    x = torch.randn(2, 5, 7, 7) if conv else torch.randn(2, 3, 5)
    specs = [(None, 3, 6.0, 1.0), ((2, 7), 2, 2.0, 0.25), ((7, 12), 1, 4.0, 2.0)]
    loras = []
    for rows, rank, alpha, weight in specs:
        width = 12 if rows is None else rows[1] - rows[0]
        lora = LoRA(5, width, rank, alpha, conv=host if conv else None)
        nn.init.normal_(lora.B.weight)
        lora.site_rows = rows
        lora.__dict__["adapter_weight"] = weight
        loras.append(lora)
    assert all(batchable_lora(lora) for lora in loras)
    base = host(x)
    expected = base
    for lora, (rows, _, _, weight) in zip(loras, specs):
        expected = add_rows(expected, lora(x) * weight, rows, dim=1 if conv else -1)
    torch.testing.assert_close(add_lora_deltas(base, x, loras), expected, rtol=1e-5, atol=1e-6)
    single = add_lora_deltas(base, x, loras[:1])
    torch.testing.assert_close(single, base + loras[0](x), rtol=1e-5, atol=1e-6)


def test_dropout_and_kbit_loras_take_the_per_module_path(monkeypatch):
    """A dropout draws a mask per LoRA and a k-bit LoRA quantises its weights: neither is batched, and a layer
    holding one runs all its LoRAs one by one (decided at call time: a plugin may swap a LoRA's factors)."""
    model = tm.vit().eval()
    visadapt.attach(model, "lora", rank=4, targets=("fc1", "fc2"), dropout=0.1)
    visadapt.attach(model, "lora", rank=4, targets=("fc2",), bits=2, adapter_name="kbit")
    visadapt.attach(model, "lora", rank=4, targets=("fc1", "fc2"), adapter_name="plain")
    randomize(model)
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    assert not batchable_lora(fc1.visadapt_adapters["default"]["fc1"])
    assert not batchable_lora(fc2.visadapt_adapters["kbit"]["fc2"])
    assert batchable_lora(fc1.visadapt_adapters["plain"]["fc1"])
    called = []
    monkeypatch.setattr(inject, "add_lora_deltas", lambda *a: called.append(a) or add_lora_deltas(*a))
    args, kwargs = tm.example_input("timm_vit", model)
    with torch.no_grad():
        out = model(*args, **kwargs)
        assert not called  # every adapted layer holds a dropout LoRA
        visadapt.set_active_adapters(model, ["kbit", "plain"])
        model(*args, **kwargs)
        batched = [lora for a in called for lora in a[2]]
        assert fc1.visadapt_adapters["plain"]["fc1"] in batched  # fc1 now holds only a plain LoRA
        assert not any(lora in batched for lora in fc2.visadapt_adapters.modules())  # fc2 also a k-bit one
    monkeypatch.undo()
    visadapt.set_active_adapters(model, None)
    with torch.no_grad(), per_module_path():
        assert_close_to_scale(out, model(*args, **kwargs))


def test_merge_unmerge_still_bit_for_bit_and_the_plan_follows():
    """Merging empties the plan and removes the hooks; unmerging restores the base weights bit for bit and the
    unmerged output exactly; switching an adapter off and on and detaching update the plan."""
    model = tm.unet().eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    visadapt.attach(model, "lora", rank=4, targets=("to_q", "to_v", "conv1"))
    randomize(model)
    args, kwargs = tm.example_input("diffusers_unet", model)
    host = model.down_blocks[0].resnets[0].conv1
    with torch.no_grad():
        unmerged = model(*args, **kwargs).sample
        visadapt.merge(model)
        assert inject.call_plan(host) is None and not host._forward_hooks
        merged = model(*args, **kwargs).sample
        visadapt.unmerge(model)
        assert inject.call_plan(host).lora and host._forward_hooks
        assert torch.equal(model(*args, **kwargs).sample, unmerged)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    visadapt.set_active_adapters(model, [])
    assert inject.call_plan(host) is None
    visadapt.set_active_adapters(model, None)
    assert len(inject.call_plan(host).lora) == 1
    visadapt.detach(model)
    assert inject.call_plan(host) is None
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == base_state.keys()
