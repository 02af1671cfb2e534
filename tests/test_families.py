"""The adapter and lora plugins on every family: the properties every user relies on."""
from __future__ import annotations

import pytest
import tiny_models as tm
import torch

import visadapt
from visadapt import inject

# (model builder, input kind, plugin, config, head)
CASES = {
    "vit-adaptformer": (tm.vit, "timm_vit", "adapter", {}, "head"),
    "vit-houlsby": (tm.vit, "timm_vit", "adapter", {"style": "houlsby"}, None),
    "dinov2-pfeiffer": (tm.vit_dinov2, "timm_vit", "adapter", {"style": "pfeiffer", "layer_norm": True}, None),
    "vit-lora-qv": (tm.vit, "timm_vit", "lora", {"rank": 4, "alpha": 16.0}, "head"),
    "dinov2-lora-all": (tm.vit_dinov2, "timm_vit", "lora", {"targets": ("qkv", "proj", "fc1", "fc2")}, None),
    "swin-adaptformer": (tm.swin, "timm_swin", "adapter", {}, "head"),
    "swin-houlsby": (tm.swin, "timm_swin", "adapter", {"style": "houlsby"}, None),
    "swin-lora": (tm.swin, "timm_swin", "lora", {"targets": ("q", "v", "fc2")}, None),
    "clip-adaptformer": (tm.clip, "open_clip", "adapter", {"towers": ("visual", "text")}, None),
    "clip-houlsby-text": (tm.clip, "open_clip", "adapter", {"style": "houlsby", "towers": ("text",)}, None),
    "clip-lora": (tm.clip, "open_clip", "lora", {"targets": ("q", "v", "proj", "fc1"), "towers": ("visual", "text")},
                  None),
    "unet-lora-qv": (tm.unet, "diffusers_unet", "lora", {}, None),
    "unet-lora-all": (tm.unet, "diffusers_unet", "lora",
                      {"targets": ("to_q", "to_k", "to_v", "to_out", "conv1", "conv2"), "rank": 2, "alpha": 4.0}, None),
    "unet2d-lora": (tm.unet_uncond, "diffusers_unet_uncond", "lora", {"targets": ("q", "v", "conv2")}, None),
}
LORA_CASES = [k for k, v in CASES.items() if v[2] == "lora"]
ADAPTER_CASES = [k for k, v in CASES.items() if v[2] == "adapter"]


def build(case: str, seed: int = 0):
    builder, input_kind, plugin, config, head = CASES[case]
    torch.manual_seed(seed)
    model = builder().eval()
    args, kwargs = tm.example_input(input_kind, model)
    return model, (args, kwargs), plugin, dict(config), head


def run(model, inputs) -> torch.Tensor:
    args, kwargs = inputs
    return tm.output_tensor(model(*args, **kwargs))


def randomize_adapters(model, scale: float = 0.05) -> None:
    """Give adapter weights non-trivial values (up/B start at zero, so a fresh adapter changes nothing)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if inject.ADAPTERS_ATTR in name:
                param.add_(torch.randn_like(param) * scale)


def clone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_fresh_adapter_leaves_output_unchanged(case):
    model, inputs, plugin, config, head = build(case)
    # Freeze first, as attach does: with no parameter requiring grad, nn.MultiheadAttention takes
    # PyTorch's native fast path, which rounds differently (~1e-6) from its regular path.
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        before = run(model, inputs)
        visadapt.attach(model, plugin, config, head=head)
        after = run(model, inputs)
    assert inject.attached(model), "nothing was attached"
    assert torch.equal(before, after)


@pytest.mark.parametrize("case", list(CASES))
def test_training_changes_only_adapter_tensors(case):
    model, inputs, plugin, config, head = build(case)
    # Keep the Parameter objects themselves: parametrize (open_clip attention) moves them, unrenamed, to .original
    base = {name: (param, param.detach().clone()) for name, param in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    visadapt.attach(model, plugin, config, head=head)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, _ in model.named_parameters()
                if inject.ADAPTERS_ATTR in name or (head and name.startswith(head + "."))}
    assert trainable == expected

    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    optimizer = torch.optim.AdamW(visadapt.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        loss = run(model, inputs).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for name, (param, value) in base.items():
        if head and name.startswith(head + "."):
            continue
        assert torch.equal(param, value), f"backbone tensor {name} changed"
    for name, value in buffers.items():
        assert torch.equal(model.get_buffer(name), value), f"buffer {name} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])]
    assert any(inject.ADAPTERS_ATTR in n for n in changed), "training did not update any adapter tensor"
    if head:
        assert any(n.startswith(head + ".") for n in changed), "the named head was not trained"


@pytest.mark.parametrize("case", LORA_CASES)
def test_merged_output_equals_unmerged_and_unmerge_restores(case):
    model, inputs, plugin, config, _ = build(case)
    base = clone_state(model)
    visadapt.attach(model, plugin, config)
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = run(model, inputs)
        visadapt.merge(model)
        merged = run(model, inputs)
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0), (merged - unmerged).abs().max()
    visadapt.unmerge(model)
    with torch.no_grad():
        again = run(model, inputs)
    assert torch.equal(again, unmerged)
    visadapt.detach(model)
    restored = model.state_dict()
    for key, value in base.items():
        assert torch.equal(restored[key], value), f"{key} not restored bit for bit"


@pytest.mark.parametrize("case", LORA_CASES)
def test_merge_really_writes_the_base_weights(case):
    model, inputs, plugin, config, _ = build(case)
    visadapt.attach(model, plugin, config)
    randomize_adapters(model)
    before = [a.base_weight.detach().clone() for a in inject.attached(model)]
    visadapt.merge(model)
    after = [a.base_weight.detach().clone() for a in inject.attached(model)]
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    # with the deltas folded in, switching the low-rank paths off must not change the output
    with torch.no_grad():
        merged = run(model, inputs)
        for item in inject.attached(model):
            torch.nn.init.zeros_(item.module.B.weight)
        assert torch.equal(run(model, inputs), merged)


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_plugin_refuses_merge_clearly(case):
    model, _, plugin, config, _ = build(case)
    visadapt.attach(model, plugin, config)
    with pytest.raises(ValueError, match="cannot be merged.*non-linearity"):
        visadapt.merge(model)


@pytest.mark.parametrize("case", list(CASES))
def test_detach_restores_original_state_dict_bit_for_bit(case):
    model, inputs, plugin, config, head = build(case)
    base = clone_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        base_out = run(model, inputs)
    visadapt.attach(model, plugin, config, head=head)
    randomize_adapters(model)
    if plugin == "lora":
        visadapt.merge(model)  # detaching a merged adapter must unmerge it too
    visadapt.detach(model)
    state = model.state_dict()
    assert list(state) == list(base)
    for key, value in base.items():
        assert torch.equal(state[key], value), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name}"
        assert not hasattr(module, "parametrizations"), f"parametrization left on {name}"
    with torch.no_grad():
        assert torch.equal(run(model, inputs), base_out)


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip_is_bit_identical(case, tmp_path):
    model, inputs, plugin, config, head = build(case)
    visadapt.attach(model, plugin, config, head=head)
    randomize_adapters(model)
    if head:
        with torch.no_grad():
            for param in model.get_submodule(head).parameters():
                param.add_(1.0)
    path = visadapt.save_adapter(model, tmp_path / "adapter.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"], "temporary file left behind"

    fresh, _, _, _, _ = build(case)  # same seed: the same base weights, a different object
    visadapt.load_adapter(fresh, path)
    saved = visadapt.api.stored_tensors(model, "default")
    loaded = visadapt.api.stored_tensors(fresh, "default")
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype and torch.equal(saved[key], loaded[key]), key
    with torch.no_grad():
        assert torch.equal(run(fresh, inputs), run(model, inputs))
    assert visadapt.api.records(fresh)["default"].config == visadapt.api.records(model)["default"].config


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_weight_zero_is_the_base_model_and_merging_keeps_the_weight(case):
    model, inputs, plugin, config, _ = build(case)
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        base = run(model, inputs)
        visadapt.attach(model, plugin, config)  # no head: a head is held by the record, not weighted
        randomize_adapters(model)
        full = run(model, inputs)
        visadapt.set_weight(model, "default", 0.0)
        assert torch.allclose(run(model, inputs), base, atol=1e-6)
        visadapt.set_weight(model, "default", 0.5)
        half = run(model, inputs)
        assert visadapt.get_weight(model, "default") == 0.5
        assert not torch.allclose(half, base, rtol=1e-3, atol=0.0)  # relative: DINOv2's LayerScale is tiny
        if plugin == "lora":
            visadapt.merge(model)
            assert torch.allclose(run(model, inputs), half, atol=1e-5)
            with pytest.raises(ValueError, match="unmerge"):
                visadapt.set_weight(model, "default", 1.0)
            visadapt.unmerge(model)
        visadapt.set_weight(model, "default", 1.0)
        assert torch.allclose(run(model, inputs), full, atol=1e-6)


def test_adapter_weight_scales_one_lora_delta_exactly():
    torch.manual_seed(0)
    layer_model = tm.vit()
    visadapt.attach(layer_model, "lora", {"targets": ("fc2",), "blocks": (0,)})
    randomize_adapters(layer_model, 0.5)
    fc2 = layer_model.blocks[0].mlp.fc2
    x = torch.randn(3, fc2.in_features)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, fc2.weight, fc2.bias)
        delta = fc2(x) - base
        visadapt.set_weight(layer_model, "default", -1.5)
        assert torch.allclose(fc2(x), base - 1.5 * delta, atol=1e-5)
    with pytest.raises(ValueError, match="finite"):
        visadapt.set_weight(layer_model, "default", float("nan"))
    with pytest.raises(KeyError, match="no adapter named 'other'"):
        visadapt.set_weight(layer_model, "other", 1.0)


@pytest.mark.parametrize("case", ["vit-lora-qv", "clip-lora", "unet-lora-all"])
@pytest.mark.parametrize("order", ["first-merged-first", "last-merged-first", "detach-all"])
def test_stacked_merged_adapters_come_off_in_any_order_bit_for_bit(case, order):
    model, inputs, plugin, config, _ = build(case)
    base = clone_state(model)
    visadapt.attach(model, plugin, config, adapter_name="a")
    visadapt.attach(model, plugin, dict(config, rank=2), adapter_name="b")  # the same layers: stacked deltas
    randomize_adapters(model, 0.1)
    with torch.no_grad():
        both = run(model, inputs)
        visadapt.merge(model, "a")
        visadapt.merge(model, "b")
        assert torch.allclose(run(model, inputs), both, atol=1e-5)
        if order == "detach-all":
            visadapt.detach(model)
        else:
            first, second = ("a", "b") if order == "first-merged-first" else ("b", "a")
            visadapt.unmerge(model, first)  # one merged, the other back on its hooks: the same function
            assert torch.allclose(run(model, inputs), both, atol=1e-5)
            visadapt.unmerge(model, second)
            assert torch.allclose(run(model, inputs), both, atol=1e-5)  # both unmerged, both active
            visadapt.detach(model)
    after = clone_state(model)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base), [k for k in base if not torch.equal(after[k], base[k])]


@pytest.mark.parametrize("mode", [True, False])
def test_every_call_keeps_the_models_train_or_eval_mode(mode, tmp_path):
    model, _, _, _, _ = build("vit-lora-qv")
    model.train(mode)

    def modes():
        return {name for name, module in model.named_modules() if module.training != mode}

    visadapt.attach(model, "lora", {"rank": 4, "dropout": 0.1})
    assert not modes()
    visadapt.merge(model)
    visadapt.unmerge(model)
    path = visadapt.save_adapter(model, tmp_path / "a.safetensors")
    visadapt.detach(model)
    assert not modes()
    visadapt.load_adapter(model, path)
    assert not modes(), modes()


def test_merge_is_fp32_on_a_bf16_model_and_reports_the_probe_difference():
    torch.manual_seed(0)
    model = tm.vit().to(torch.bfloat16).eval()
    visadapt.attach(model, "lora", {"rank": 4, "targets": ("fc1",)})
    randomize_adapters(model, 0.2)
    fc1 = model.blocks[0].mlp.fc1
    lora = fc1.visadapt_adapters["default"]["fc1"]
    base = fc1.weight.detach().clone()
    expected = (base.float() + lora.delta_weight(torch.float32)).to(torch.bfloat16)  # fp32 sum, one rounding
    probe = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        unmerged = model(probe)
    difference = visadapt.merge(model, probe=probe)
    assert torch.equal(fc1.weight, expected)
    with torch.no_grad():
        merged = model(probe)
    assert difference == (merged.float() - unmerged.float()).abs().max().item()
    assert 0.0 < difference < 0.1  # bf16 rounding of the merged weights shows, and stays small
    visadapt.unmerge(model)
    assert torch.equal(fc1.weight, base)
    assert visadapt.merge(model) is None  # no probe, no report


def test_head_travels_with_the_adapter_and_another_class_count_needs_replace_head(tmp_path):
    torch.manual_seed(0)
    backbone = {k: v for k, v in tm.vit(num_classes=5).state_dict().items() if not k.startswith("head.")}

    def make(num_classes):  # the same backbone weights whatever the class count
        model = tm.vit(num_classes=num_classes).eval()
        model.load_state_dict(backbone, strict=False)
        return model

    trained = make(5)
    visadapt.attach(trained, "lora", {"rank": 4}, head="head")
    randomize_adapters(trained)
    with torch.no_grad():
        trained.head.weight.add_(1.0)
    path = visadapt.save_adapter(trained, tmp_path / "a.safetensors")
    x = torch.randn(2, 3, 32, 32)

    same = make(5)
    visadapt.load_adapter(same, path)
    with torch.no_grad():
        assert torch.equal(same(x), trained(x))  # head restored with the adapter

    other = make(7)
    before = clone_state(other)
    with pytest.raises(inject.AdapterLoadError, match="5 classes, this model's 7.*replace_head=True"):
        visadapt.load_adapter(other, path)
    assert clone_state(other).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in clone_state(other).items())  # untouched
    visadapt.load_adapter(other, path, replace_head=True)
    assert other.head.out_features == 5
    with torch.no_grad():
        assert torch.equal(other(x), trained(x))


def test_detach_gives_back_the_head_a_load_wrote_or_replaced(tmp_path):
    """The README's first snippet: load_adapter then detach is the original model, bit for bit, although the file
    wrote its trained head into the model's head (or, with replace_head=True, swapped the head module)."""
    torch.manual_seed(0)
    trained = tm.vit(num_classes=5).eval()
    visadapt.attach(trained, "lora", {"rank": 4}, head="head")
    randomize_adapters(trained)
    with torch.no_grad():
        trained.head.weight.add_(1.0)
    path = visadapt.save_adapter(trained, tmp_path / "a.safetensors")

    fresh = tm.vit(num_classes=5).eval()
    before = clone_state(fresh)
    visadapt.load_adapter(fresh, path)
    assert not torch.equal(fresh.head.weight, before["head.weight"])  # the file's head is in place
    visadapt.detach(fresh)
    assert clone_state(fresh).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in clone_state(fresh).items())

    other = tm.vit(num_classes=7).eval()
    own_head = other.head
    visadapt.load_adapter(other, path, replace_head=True)
    assert other.head is not own_head and other.head.out_features == 5
    visadapt.detach(other)
    assert other.head is own_head  # the model's own module, not a copy


def test_two_adapters_with_heads_detached_in_any_order_give_the_head_back(tmp_path):
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        trained = tm.vit(num_classes=5).eval()
        visadapt.attach(trained, "lora", {"rank": 4}, head="head")
        randomize_adapters(trained)
        with torch.no_grad():
            trained.head.weight.add_(seed)
        paths.append(visadapt.save_adapter(trained, tmp_path / f"{seed}.safetensors"))
    fresh = tm.vit(num_classes=5).eval()
    before = clone_state(fresh)
    visadapt.load_adapter(fresh, paths[0], "one")
    visadapt.load_adapter(fresh, paths[1], "two")
    visadapt.detach(fresh)  # all at once: last loaded first
    assert all(torch.equal(v, before[k]) for k, v in clone_state(fresh).items())
