"""Polyhistor / Polyhistor-Lite on a tiny timm Swin: generated shapes, task isolation, the parameter formula,
save/load, detach, training, and Lite's Kronecker sum written out with torch.kron."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import visadapt
from visadapt import inject
from visadapt.plugins import polyhistor
from visadapt.plugins.polyhistor import PolyhistorAdapter, PolyhistorConfig

torch.set_num_threads(1)

TASKS = ("semseg", "human_parts", "sal", "normals")
WIDTHS, DEPTHS = (24, 48, 96, 192), (1, 1, 2, 1)
BLOCK_WIDTHS = [24, 48, 96, 96, 192]  # one entry per block, forward order
# small sizes so every test runs in a blink; rho = 4 gives the template bottleneck 6
SMALL = {"tasks": TASKS, "reduction_factor": 4, "task_embedding_dim": 8, "hidden_dim": 16, "projected_dim": 8}
VARIANTS = {
    "polyhistor": {},
    "per_block": {"per_block_hypernet": True},
    "lite": {"variant": "lite"},
}


def tiny_swin():
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, patch_size=4, embed_dim=24,
                             depths=DEPTHS, num_heads=(1, 2, 4, 8), window_size=4, num_classes=0).eval()


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def features(model, x) -> list[torch.Tensor]:
    return model.forward_intermediates(x, intermediates_only=True)


def per_task_features(model, x) -> dict[str, list[torch.Tensor]]:
    out = {}
    with torch.no_grad():
        for task in TASKS:
            polyhistor.set_task(model, task)
            out[task] = features(model, x)
    return out


def randomise(model, std: float = 0.3, seed: int = 1) -> None:
    """Give every adapter tensor a sizeable random value, so tasks differ clearly (the init is near-identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in visadapt.trainable_parameters(model):
            param.copy_(torch.randn(param.shape, generator=g) * std)


def attached(**overrides):
    model = tiny_swin()
    config = visadapt.attach(model, "polyhistor", **{**SMALL, **overrides})
    return model, config


def sites(model) -> list[tuple[str, PolyhistorAdapter]]:
    return [(f"{i.host_path}:{i.kind}", i.module) for i in inject.attached(model) if isinstance(i.module, PolyhistorAdapter)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attention", [False, True])
def test_generated_adapters_have_each_stages_shapes(variant, attention):
    model, _ = attached(attention=attention, adapter_layer_norm="both", **VARIANTS[variant])
    generated = polyhistor.generated_adapters(model, "sal")
    positions = ["attn_out", "mlp_out"] if attention else ["mlp_out"]
    expected = [(width, kind) for width in BLOCK_WIDTHS for kind in positions]
    assert [key.rsplit(":", 1)[1] for key in generated] == [kind for _, kind in expected]
    for (width, _), weights in zip(expected, generated.values()):
        k = width // WIDTHS[0]
        bottleneck = k * (WIDTHS[0] // 4) if variant == "lite" else width // 4
        assert weights.down_weight.shape == (bottleneck, width)
        assert weights.down_bias.shape == (bottleneck,)
        assert weights.up_weight.shape == (width, bottleneck)
        assert weights.up_bias.shape == (width,)
        for gain, bias in (weights.pre_norm, weights.post_norm):
            assert gain.shape == bias.shape == (width,)


def test_generated_weights_are_low_rank():
    model, _ = attached(rank=2, adapter_layer_norm="none")
    for weights in polyhistor.generated_adapters(model, "semseg").values():
        assert torch.linalg.matrix_rank(weights.down_weight) <= 2
        assert torch.linalg.matrix_rank(weights.up_weight) <= 2
    model, _ = attached(rank=-2)  # r = min(n_out, n_in) // 2: the bottleneck // 2 per stage
    ranks = [m.shared.stages[m.stage].generator.down.rank for _, m in sites(model)]
    assert ranks == [w // 4 // 2 for w in BLOCK_WIDTHS]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_changing_one_task_embedding_changes_only_that_tasks_outputs(variant):
    model, _ = attached(**VARIANTS[variant])
    randomise(model)
    x = images()
    before = per_task_features(model, x)
    assert not torch.equal(before["semseg"][-1], before["normals"][-1])  # tasks really get different adapters
    shared = polyhistor.hypernetworks(model)
    with torch.no_grad():
        shared.task_embeddings[shared.task_index("sal")].add_(0.5)
    after = per_task_features(model, x)
    for task in TASKS:
        same = all(torch.equal(a, b) for a, b in zip(before[task], after[task]))
        assert same == (task != "sal"), task


@pytest.mark.parametrize("variant", ["polyhistor", "lite"])
def test_a_blocks_adapter_depends_on_its_own_layer_embedding_only(variant):
    model, _ = attached(**VARIANTS[variant])
    randomise(model)
    before = polyhistor.generated_adapters(model, "normals")
    name, module = sites(model)[3]  # stage 3, first block
    with torch.no_grad():
        module.layer_embedding.add_(1.0)
    after = polyhistor.generated_adapters(model, "normals")
    for key in before:
        assert torch.equal(before[key].down_weight, after[key].down_weight) == (key != name), key


PARAMETER_CONFIGS = [
    {},
    {"attention": True},
    {"adapter_layer_norm": "both", "rank": -2},
    {"per_block_hypernet": True},
    {"per_block_hypernet": True, "attention": True, "adapter_layer_norm": "pre"},
    {"variant": "lite"},
    {"variant": "lite", "attention": True, "adapter_layer_norm": "both", "rank": 3},
    {"variant": "lite", "adapter_layer_norm": "none", "placement": "parallel", "task_embedding_dim": 5},
]


@pytest.mark.parametrize("overrides", PARAMETER_CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_trainable_parameters_match_the_formula(overrides):
    model, config = attached(**overrides)
    count = polyhistor.parameter_count(config, WIDTHS, DEPTHS, num_tasks=len(TASKS))
    assert count["total"] == sum(v for k, v in count.items() if k != "total")
    trainable = sum(p.numel() for p in visadapt.trainable_parameters(model))
    assert trainable == count["total"]
    # every tensor is stored once: the shared module is not registered again under the sites
    stored = visadapt.api.stored_tensors(model, "default")
    assert sum(t.numel() for t in stored.values()) == count["total"]


def test_swin_t_lite_scaling_kernels_match_the_spec_count():
    config = PolyhistorConfig(tasks=TASKS, variant="lite", adapter_layer_norm="none")
    count = polyhistor.parameter_count(config, (96, 192, 384, 768), (2, 2, 6, 2), num_tasks=4)
    # polyhistor_details.md: W-kernels 2*8 + 6*64 + 2*512 = 1424, bias coefficients 2*4 + 6*16 + 2*64 = 232,
    # 46 layer-embedding rows
    assert count["scaling_kernels"] == 1424 + 232
    assert count["layer_embeddings"] == 46 * config.task_embedding_dim
    per_stage = polyhistor.parameter_count(PolyhistorConfig(tasks=TASKS), (96, 192, 384, 768), (2, 2, 6, 2), 4)
    assert count["total"] < per_stage["total"]


def test_save_load_round_trips_every_task_bit_for_bit(tmp_path):
    base = tiny_swin()
    model = copy.deepcopy(base)
    visadapt.attach(model, "polyhistor", **SMALL, variant="lite", attention=True, adapter_layer_norm="both")
    randomise(model)
    x = images()
    expected = per_task_features(model, x)
    path = visadapt.save_adapter(model, tmp_path / "polyhistor.safetensors")

    loaded = copy.deepcopy(base)
    config = visadapt.load_adapter(loaded, path)
    assert config.tasks == TASKS and config.variant == "lite"
    got = per_task_features(loaded, x)
    for task in TASKS:
        assert all(torch.equal(a, b) for a, b in zip(expected[task], got[task])), task


def test_unknown_or_missing_task_is_refused_clearly():
    model, _ = attached()
    with pytest.raises(ValueError, match=r"unknown task 'depth'.*'semseg', 'human_parts', 'sal', 'normals'"):
        polyhistor.set_task(model, "depth")
    with pytest.raises(RuntimeError, match="no task is selected.*set_task"):
        features(model, images())
    with pytest.raises(ValueError, match="no Polyhistor adapter named 'other'.*'default'"):
        polyhistor.set_task(model, "sal", adapter_name="other")


def test_use_task_selects_and_restores():
    model, _ = attached()
    assert polyhistor.get_task(model) is None
    polyhistor.set_task(model, "sal")
    with polyhistor.use_task(model, "normals"):
        assert polyhistor.get_task(model) == "normals"
    assert polyhistor.get_task(model) == "sal"


def test_detach_restores_the_base_model_bit_for_bit():
    model = tiny_swin()
    x = images()
    with torch.no_grad():
        base_out = features(model, x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    visadapt.attach(model, "polyhistor", **SMALL, attention=True)
    randomise(model)
    polyhistor.set_task(model, "semseg")
    with torch.no_grad():
        assert not torch.equal(features(model, x)[-1], base_out[-1])
    visadapt.detach(model)
    state = model.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(features(model, x), base_out))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_step_lowers_the_loss_and_changes_only_trainable_tensors(variant):
    model, _ = attached(**VARIANTS[variant])
    x = images()
    target = [torch.randn(f.shape, generator=torch.Generator().manual_seed(2)) for f in features_of(model, x)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(visadapt.trainable_parameters(model), lr=1e-3)
    polyhistor.set_task(model, "human_parts")

    def loss() -> torch.Tensor:
        return sum(F.mse_loss(f, t) for f, t in zip(features(model, x), target))

    first = loss()
    first.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < first
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    shared = polyhistor.hypernetworks(model)
    embedding_names = {n for n, p in model.named_parameters() if "task_embeddings" in n}
    active = [n for n in embedding_names if n.endswith(f"task_embeddings.{shared.task_index('human_parts')}")]
    # only the trained task's embedding moved: the others got no gradient at all
    assert changed & embedding_names == set(active)


def features_of(model, x):
    with torch.no_grad(), polyhistor.use_task(model, TASKS[0]):
        return features(model, x)


@pytest.mark.parametrize("kernel_front", [True, False])
def test_lite_uses_the_kronecker_sum_of_its_templates(kernel_front):
    model, _ = attached(variant="lite", rank=2, adapter_layer_norm="none", kernel_front=kernel_front)
    randomise(model)
    for name, module in sites(model)[1:]:  # stages 2-4: k = 2, 4, 4, 8
        k = module.scale
        assert k == module.width // WIDTHS[0] > 1, name
        templates = module.templates("sal")
        assert templates.down_weight.shape == (k, 6, 24)

        def kron(a, b):
            return torch.kron(a, b) if kernel_front else torch.kron(b, a)

        down = sum(kron(module.weight_kernel[i], templates.down_weight[i]) for i in range(k))
        up = sum(kron(module.weight_kernel[i], templates.up_weight[i]) for i in range(k))
        down_bias = sum(kron(module.bias_kernel[i][:, None], templates.down_bias[i][:, None]) for i in range(k))[:, 0]
        up_bias = sum(kron(module.bias_kernel[i][:, None], templates.up_bias[i][:, None]) for i in range(k))[:, 0]
        generated = module.generate("sal")
        for got, want in ((generated.down_weight, down), (generated.up_weight, up),
                          (generated.down_bias, down_bias), (generated.up_bias, up_bias)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
        # and the forward computes the adapter with exactly these weights
        x = torch.randn(3, module.width)
        with torch.no_grad(), polyhistor.use_task(model, "sal"):
            delta = module(x)
        hand = F.linear(F.silu(F.linear(x, down, down_bias)), up, up_bias)
        assert torch.allclose(delta, hand, rtol=1e-4, atol=1e-5), name


def test_deepcopy_keeps_the_sharing():
    model, _ = attached()
    clone = copy.deepcopy(model)
    shared = polyhistor.hypernetworks(clone)
    assert shared is not polyhistor.hypernetworks(model)
    assert all(module.shared is shared for _, module in sites(clone))
    randomise(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), clone.parameters()):
            q.copy_(p)
    x = images()
    assert all(torch.equal(a[-1], b[-1]) for a, b in
               zip(per_task_features(model, x).values(), per_task_features(clone, x).values()))


def test_attention_positions_share_the_blocks_layer_embedding():
    model, _ = attached(attention=True)
    modules = sites(model)
    assert len(modules) == 2 * len(BLOCK_WIDTHS)
    for (_, attention), (_, ffn) in zip(modules[::2], modules[1::2]):
        assert attention.position == "attention" and ffn.position == "ffn"
        assert attention.layer_embedding is not None and ffn.layer_embedding is None
        assert ffn.block_owner is attention


def test_parallel_placement_runs_beside_the_mlp():
    model, _ = attached(placement="parallel")
    assert {name.rsplit(":", 1)[1] for name, _ in sites(model)} == {"mlp"}
    randomise(model)
    polyhistor.set_task(model, "sal")
    with torch.no_grad():
        assert all(torch.isfinite(f).all() for f in features(model, images()))


def test_runs_under_autocast():
    model, _ = attached(variant="lite", adapter_layer_norm="both")
    polyhistor.set_task(model, "normals")
    x = images()
    with torch.no_grad():
        full = features(model, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = features(model, x)
    for a, b in zip(full, low):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b.float(), atol=0.15, rtol=0.05)


def test_merge_is_refused_with_the_reason():
    model, _ = attached()
    with pytest.raises(ValueError, match="cannot be merged.*non-linearity"):
        visadapt.merge(model)


@pytest.mark.parametrize("overrides, match", [
    ({"tasks": ()}, "tasks is empty"),
    ({"tasks": ("sal", "sal")}, "names a task twice"),
    ({"attention": True, "placement": "parallel"}, "needs placement='serial'"),
    ({"variant": "lite", "per_block_hypernet": True}, "per_block_hypernet=True applies to variant='polyhistor'"),
    ({"variant": "lite", "reduction_factor": 32}, "leaves no hidden unit at width 24"),
    ({"rank": 0}, "non-zero integer"),
])
def test_bad_configs_are_refused(overrides, match):
    model = tiny_swin()
    with pytest.raises(ValueError, match=match):
        visadapt.attach(model, "polyhistor", **{**SMALL, **overrides})
    assert not inject.attached(model)  # nothing half-attached


def test_adapter_reduction_factor_gives_width_proportional_bottlenecks():
    model = tiny_swin()
    visadapt.attach(model, "adapter", style="pfeiffer", reduction_factor=4)
    assert [i.module.down.out_features for i in inject.attached(model)] == [w // 4 for w in BLOCK_WIDTHS]
    model = tiny_swin()
    visadapt.attach(model, "adapter", style="pfeiffer")  # unset: the fixed bottleneck, as before
    assert {i.module.down.out_features for i in inject.attached(model)} == {8}
    with pytest.raises(ValueError, match="reduction_factor=32 leaves no hidden unit.*24 wide"):
        visadapt.attach(tiny_swin(), "adapter", reduction_factor=32)


# ------------------------------------------------------------------------- batched, kept generation


def generation_counter(model, monkeypatch) -> list[int]:
    """Counts the batched generations of ``model``'s shared module."""
    shared = polyhistor.hypernetworks(model)
    calls = [0]
    original = shared.generate_all

    def counted(task=None):
        calls[0] += 1
        return original(task)

    monkeypatch.setattr(shared, "generate_all", counted)
    return calls


@pytest.mark.parametrize("overrides", [{"variant": "lite", "attention": True, "adapter_layer_norm": "both"},
                                       {"attention": True}, {"per_block_hypernet": True}])
def test_batched_generation_equals_per_position_generation(overrides):
    """Every position's weights from the one batched generation equal its own generate(), and the forward pass
    through them gives the same outputs and the same gradients as the plain per-position path."""
    model, _ = attached(**overrides)
    randomise(model)
    shared = polyhistor.hypernetworks(model)
    modules = [module for _, module in sites(model)]
    assert shared.positions == modules
    with torch.no_grad():
        for batched, module in zip(shared.generate_all("sal"), modules):
            single = module.generate("sal")
            for field in ("down_weight", "down_bias", "up_weight", "up_bias", "pre_norm", "post_norm"):
                a, b = getattr(batched, field), getattr(single, field)
                for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    x = images()
    polyhistor.set_task(model, "sal")
    results = []
    for cached in (True, False):
        shared.cache_generated = cached
        model.zero_grad(set_to_none=True)
        out = features(model, x)
        sum((f * f).mean() for f in out).backward()
        results.append(([f.detach() for f in out],
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out_cached, grads_cached), (out_plain, grads_plain) = results
    for a, b in zip(out_cached, out_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads_cached.keys() == grads_plain.keys() and grads_cached
    for name in grads_cached:
        torch.testing.assert_close(grads_cached[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_kept_weights_are_reused_until_a_step_changes_the_parameters(monkeypatch):
    """Without gradients the generated weights are kept (per task); an optimizer step refreshes them, so the
    next forward equals the plain path; with gradients every forward generates once (its own graph)."""
    model, _ = attached(variant="lite")
    randomise(model)
    calls = generation_counter(model, monkeypatch)
    shared = polyhistor.hypernetworks(model)
    x = images()
    polyhistor.set_task(model, "normals")
    with torch.no_grad():
        first = features(model, x)
        assert calls[0] == 1
        assert all(torch.equal(a, b) for a, b in zip(features(model, x), first))
        assert calls[0] == 1  # reused, not rebuilt
        with polyhistor.use_task(model, "sal"):
            features(model, x)
        features(model, x)
        assert calls[0] == 2  # one generation per task, both kept
    optimizer = torch.optim.SGD(visadapt.trainable_parameters(model), lr=0.5)
    for expected in (3, 4):
        loss = sum((f * f).mean() for f in features(model, x))
        assert calls[0] == expected  # once per forward with gradients, not once per position
        loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = features(model, x)
        assert calls[0] == 5  # the step changed the parameters: regenerated
        shared.cache_generated = False
        plain = features(model, x)
    assert not torch.allclose(after[-1], first[-1])
    for a, b in zip(after, plain):  # the batched generation rounds like the plain one up to summation order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_copies_start_without_kept_weights():
    """A deepcopy taken after a training forward (kept tensors hold a graph) works and regenerates."""
    model, _ = attached(variant="lite")
    randomise(model)
    polyhistor.set_task(model, "semseg")
    x = images()
    with torch.no_grad():
        features(model, x)
    clone = copy.deepcopy(model)
    assert not polyhistor.hypernetworks(clone)._cache.entries
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(features(clone, x), features(model, x)))
