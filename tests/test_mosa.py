"""The mosa plugin: masks, sparse updates, the one-tensor form against an N-copy reference, merge, storage,
draws that agree across processes, and the model families it attaches to."""
from __future__ import annotations

import collections
import copy
import json
import random
from pathlib import Path

import pytest
import timm
import tiny_models
import torch
import torch.nn.functional as F
from torch import nn

import visadapt
from visadapt.inject import AdapterLoadError
from visadapt.plugins.mosa import (
    TRAINING_STATE_PREFIX,
    MoSAPlugin,
    SparseModulesLinear,
    partition_elements,
    stable_hash,
    symmetric_kl,
)

# one intra-op thread: these tiny models' ops are too small to split, and a shared CPU made them 10-20x slower
pytestmark = pytest.mark.usefixtures("_one_thread")

def _vit(num_classes: int = 5, **kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=3, num_classes=num_classes, **kwargs)


def _sparse_layers(model) -> list[tuple[str, SparseModulesLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseModulesLinear)]


def _batch(seed: int = 0, n: int = 4, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("shape, n", [((48, 16), 4), ((7, 5), 3), ((1, 10), 2)])
def test_masks_are_disjoint_covering_equal_and_seeded(shape, n):
    owner = partition_elements(shape, n, seed=11)
    assert owner.shape == shape and owner.dtype == torch.uint8
    masks = [owner == i for i in range(n)]
    assert torch.equal(sum(m.int() for m in masks), torch.ones(shape, dtype=torch.int))  # disjoint and covering
    sizes = [int(m.sum()) for m in masks]
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(owner, partition_elements(shape, n, seed=11))
    assert not torch.equal(owner, partition_elements(shape, n, seed=12))


def test_every_split_matrix_gets_its_own_masks_and_they_travel_with_the_adapter():
    torch.manual_seed(0)
    model = _vit()
    visadapt.attach(model, "mosa", split=("down", "up"), dim=8)
    owners = [layer.owner for _, layer in _sparse_layers(model)]
    assert len(owners) == 4  # 2 blocks x (down, up)
    assert not torch.equal(owners[0][:8, :8], owners[2][:8, :8])  # down of block 0 vs block 1
    state = visadapt.inject.adapter_state(model, "default")
    assert sum(k.endswith(".owner") for k in state) == 4
    # the down projection starts non-zero, so its modules keep a frozen initial value; the up starts at zero
    initial = [k for k in state if k.endswith(".initial")]
    assert len(initial) == 2 and all(".down." in k for k in initial)


def test_a_step_changes_only_the_elements_of_the_drawn_modules():
    torch.manual_seed(0)
    model = _vit()
    visadapt.attach(model, "mosa", split=("down", "up"), dim=8, dropout=0.0, consistency_weight=0.0)
    layers = _sparse_layers(model)
    with torch.no_grad():  # as if trained for a while: a zero up-projection would pass no gradient to down
        for _, layer in layers:
            layer.weight_modules.normal_(std=0.1)
    optimizer = torch.optim.SGD(visadapt.trainable_parameters(model), lr=0.5)  # no momentum: one step, one grad
    model.train()
    x, y = _batch()
    for step in range(3):
        MoSAPlugin().on_step(model, step)
        before = [layer.weight_modules.detach().clone() for _, layer in layers]
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        for (name, layer), old in zip(layers, before):
            changed = layer.weight_modules.detach() != old
            assert changed.any(), name
            assert not (changed & ~layer.module_mask(layer.last_drawn)).any(), name
            bias_changed = (layer.bias_modules.detach() != layer.bias_modules.detach()[layer.last_drawn]).any(1)
            assert bias_changed.sum() <= layer.num_modules - 1


def test_draws_are_a_pure_function_of_seed_block_role_step_and_call():
    torch.manual_seed(0)
    a, b = _vit(), _vit()
    visadapt.attach(a, "mosa", split=("down", "up"))
    visadapt.attach(b, "mosa", split=("down", "up"))
    a.train(), b.train()
    x = torch.randn(2, 3, 32, 32)
    seq_a, seq_b = [], []
    for step in range(12):
        for model, seq in ((a, seq_a), (b, seq_b)):
            MoSAPlugin().on_step(model, step)
            model(x), model(x)
            seq.append(tuple(layer.last_drawn for _, layer in _sparse_layers(model)))
    assert seq_a == seq_b  # another "process" with the same config draws the same modules
    per_layer = list(zip(*seq_a))
    assert all(len(set(draws)) > 1 for draws in per_layer)  # it does vary over steps
    assert len(set(per_layer)) == len(per_layer)  # blocks and roles draw independently
    # a resumed run: re-entering step 5 gives step 5's draws back
    MoSAPlugin().on_step(a, 5)
    a(x), a(x)
    assert tuple(layer.last_drawn for _, layer in _sparse_layers(a)) == seq_a[5]


def _draws_per_pass(model, passes: int) -> dict[str, list[int]]:
    """The module index every split layer drew in each of ``passes`` training passes (one pass per step)."""
    layers = _sparse_layers(model)
    draws = {name: [] for name, _ in layers}
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # not from the global generator
    model.train()
    with torch.no_grad():
        for step in range(passes):
            MoSAPlugin().on_step(model, step)
            model(x)
            for name, layer in layers:
                draws[name].append(layer.last_drawn)
    return draws


@pytest.mark.parametrize("fields, site_a, site_b", [
    ({"base": "lora"}, "blocks.0.attn.qkv.visadapt_adapters.default.q", "blocks.0.attn.qkv.visadapt_adapters.default.v"),
    ({"style": "houlsby"}, "blocks.0.visadapt_adapters.default.attn_residual",
     "blocks.0.visadapt_adapters.default.block_out"),
])
def test_the_sites_of_a_block_draw_their_modules_independently_as_official(fields, site_a, site_b):
    """Official draws: ``vit_mosl.py`` calls ``A, B = randint(0, N-1), randint(0, N-1)`` once for q and again for
    v; ``vit_mosa.py``'s Houlsby calls it for ``A, B`` (attention-side adapter) and ``C, D`` (MLP-side one). So
    every (site, role) index is uniform over N and independent of the others: two sites use different modules
    with probability (N - 1) / N, and every pair of indices occurs. visadapt's draws are hashes, so this fixed
    seed gives a fixed sample; the bounds are 3.5 standard deviations of the official binomial draw. The draws
    touch neither Python's nor torch's global generator (the official numbers, taken from Python's ``random``,
    cannot be reproduced; the distribution is what visadapt keeps)."""
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.attach(model, "mosa", split=("down", "up"), dim=4, blocks=(0,), **fields)
    passes, n = 400, 4
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    draws = _draws_per_pass(model, passes)
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    child = {"adapter": ("down", "up"), "lora": ("A", "B")}[fields.get("base", "adapter")]
    tolerance = 3.5 * ((n - 1) / n**2 / passes) ** 0.5
    for role in child:
        a, b = draws[f"{site_a}.{role}"], draws[f"{site_b}.{role}"]
        differ = sum(i != j for i, j in zip(a, b)) / passes
        assert abs(differ - (n - 1) / n) < tolerance, (role, differ)  # shared draws (per_block) give 0
        pairs = collections.Counter(zip(a, b))
        assert len(pairs) == n * n and min(pairs.values()) >= 0.4 * passes / n**2, (role, pairs)
        for index_sequence in (a, b):  # uniform over the N modules
            counts = collections.Counter(index_sequence)
            assert sorted(counts) == list(range(n)) and min(counts.values()) >= 0.7 * passes / n, counts
    # within a site, down and up are independent too (official A and B)
    down, up = draws[f"{site_a}.{child[0]}"], draws[f"{site_a}.{child[1]}"]
    assert abs(sum(i != j for i, j in zip(down, up)) / passes - (n - 1) / n) < tolerance


def test_per_block_draw_is_the_named_shared_variant():
    """``draw="per_block"`` (visadapt before issue 24): q and v of a block draw the same module number."""
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.attach(model, "mosa", base="lora", split=("down", "up"), dim=4, draw="per_block")
    draws = _draws_per_pass(model, 20)
    for block in (0, 1):
        prefix = f"blocks.{block}.attn.qkv.visadapt_adapters.default"
        for role in ("A", "B"):
            assert draws[f"{prefix}.q.{role}"] == draws[f"{prefix}.v.{role}"]
            assert len(set(draws[f"{prefix}.q.{role}"])) > 1


# ------------------------------------------------------------------ the official block forward (vit_mosa.py)


def _projection(layer, train: bool):
    """``(weight, bias)`` a projection computes with: a shared layer's own; a split layer's drawn module in
    training, its merged weight in eval mode."""
    if not isinstance(layer, SparseModulesLinear):
        return layer.weight, layer.bias
    if train:
        return layer.module_weight(layer.last_drawn), layer.bias_modules[layer.last_drawn]
    return layer.weight, layer.bias


def _official_adapter(adapter, x, act, norm: bool, train: bool, dropout: float = 0.0):
    """``up(dropout(act(down(adapter_norm(x)))))`` with ``adapter_norm = LayerNorm(hidden, eps=1e-6)`` where the
    style has one (vit_mosa.py), from the adapter's own tensors."""
    if norm:
        x = F.layer_norm(x, x.shape[-1:], adapter.norm.weight, adapter.norm.bias, eps=1e-6)
    hidden = act(F.linear(x, *_projection(adapter.down, train)))
    hidden = F.dropout(hidden, p=dropout, training=train)
    return F.linear(hidden, *_projection(adapter.up, train))


def _official_block(block, adapters, style: str, x, train: bool):
    """``MoSABlock.forward`` of ``vit_mosa.py`` restated, on a timm block (no LayerScale, no drop path)."""
    attention = lambda t: block.attn(block.norm1(t))
    mlp = lambda t: block.mlp(block.norm2(t))
    if style == "adaptformer":
        h = x + attention(x)
        m = mlp(h)
        adpt = _official_adapter(adapters["mlp"], h, F.gelu, True, train, dropout=0.1)
        return (adpt * 0.1 + m) + h
    if style == "pfeiffer":
        h = x + attention(x)
        m = mlp(h)
        adpt = _official_adapter(adapters["mlp_out"], m, F.relu, True, train)  # adapter_norm(x): the FFN output
        return (adpt + m) + h
    h = x + attention(x)  # houlsby: on the stream after each residual add, no adapter_norm, no scale, no dropout
    h = _official_adapter(adapters["attn_residual"], h, F.silu, False, train) + h
    o = mlp(h) + h
    return _official_adapter(adapters["block_out"], o, F.silu, False, train) + o


def test_houlsby_on_the_residual_stream_detaches_to_the_exact_model():
    """The attn_residual site hooks the attention branch's last module; detach removes that hook and the
    model computes exactly what it did before."""
    torch.manual_seed(0)
    model = tiny_models.vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        visadapt.attach(model, "mosa", style="houlsby", dim=4)
        for param in visadapt.trainable_parameters(model):
            param.normal_(std=0.3)
        assert model.blocks[0].drop_path1._forward_hooks and not torch.equal(model(x), before)
        visadapt.detach(model)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("family", ["swin", "open_clip"])
def test_houlsby_sits_on_the_residual_stream_on_swin_and_open_clip(family):
    """The same placement on the other families: ``h' = h + f(h)`` after the attention's residual add, the MLP
    branch and its skip both reading ``h'``, and ``g`` on the block output (block forwards written out here)."""
    torch.manual_seed(0)
    model = tiny_models.swin() if family == "swin" else tiny_models.clip()
    visadapt.attach(model, "mosa", style="houlsby", dim=4, blocks=(0,))
    with torch.no_grad():
        for param in visadapt.trainable_parameters(model):
            param.normal_(std=0.3)
    model.eval()
    f, g = (item.module for item in visadapt.inject.attached(model))
    with torch.no_grad():
        if family == "swin":
            block = model.layers[0].blocks[0]
            x = torch.randn(2, 8, 8, 16)
            h = x + block.drop_path1(block._attn(block.norm1(x)))
            h = (h + f(h)).reshape(2, -1, 16)
            o = (h + block.drop_path2(block.mlp(block.norm2(h)))).reshape(2, 8, 8, 16)
        else:
            block = model.visual.transformer.resblocks[0]
            x = torch.randn(2, 17, 32)
            h = x + block.ls_1(block.attention(block.ln_1(x)))
            h = h + f(h)
            o = h + block.ls_2(block.mlp(block.ln_2(h)))
        assert (block(x) - (o + g(o))).abs().max() <= 1e-5


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_swin_adapter_sits_inside_the_mlp_as_official(train):
    """``swin_mosa.py``'s ``MoSAMlp`` restated on a timm Swin block: the adapter reads the MLP's input (LN2 of the
    stream, no adapter_norm), its output times 0.1 joins the MLP output before drop path; dropout 0.1 after GELU
    (the generator reseeded for both, so drop path and dropout masks agree in training)."""
    torch.manual_seed(0)
    model = tiny_models.swin()
    visadapt.attach(model, "mosa", split=("down", "up"), dim=4, blocks=(0,))
    with torch.no_grad():
        for param in visadapt.trainable_parameters(model):
            param.normal_(std=0.3)
    (adapter,) = (item.module for item in visadapt.inject.attached(model))
    block = model.layers[0].blocks[0]
    x = torch.randn(2, 8, 8, 16)
    model.train(train)
    MoSAPlugin().on_step(model, 3)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = block(x)
        torch.manual_seed(7)
        h = (x + block.drop_path1(block._attn(block.norm1(x)))).reshape(2, -1, 16)
        n = block.norm2(h)
        m = type(block.mlp).forward(block.mlp, n)  # the MLP alone, without visadapt's hook
        adpt = _official_adapter(adapter, n, F.gelu, False, train, dropout=0.1)
        official = (h + block.drop_path2(adpt * 0.1 + m)).reshape(2, 8, 8, 16)
    assert (ours - official).abs().max() <= 1e-5


def test_a_swin_header_without_swin_placement_keeps_the_vit_placement(tmp_path):
    """A Swin file saved before issue 24 (simulated: today's file with the old values, the new fields then
    removed from its header) loads with the ViT placement and its LayerNorm, and gives the same outputs."""
    torch.manual_seed(0)
    model = tiny_models.swin()
    old_values = {"draw": "per_block", "houlsby_placement": "branch", "swin_placement": "as_vit",
                  "layer_norm_eps": 1e-5}
    visadapt.attach(model, "mosa", dim=4, layer_norm=True, dropout=0.1, **old_values)
    with torch.no_grad():
        for param in visadapt.trainable_parameters(model):
            param.normal_(std=0.3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    path = visadapt.save_adapter(model, tmp_path / "swin.safetensors")
    tensors, meta = visadapt.io.read_safetensors(path)
    config = {k: v for k, v in json.loads(meta["config"]).items() if k not in old_values}
    meta["config"] = json.dumps(config | {"dropout": None, "layer_norm": True})
    path.write_bytes(visadapt.io.canonical_safetensors_bytes(tensors, meta))
    fresh = tiny_models.swin()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "visadapt_" not in k}, strict=False)
    visadapt.load_adapter(fresh, path)
    assert visadapt.api.get_record(fresh, "default").config.swin_placement == "as_vit"
    with torch.no_grad():
        assert (fresh.eval()(x) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("style", ["adaptformer", "pfeiffer", "houlsby"])
def test_each_style_computes_the_official_block_forward(style, train):
    """Placement, LayerNorm (eps 1e-6), activation, scale and dropout of each style against ``vit_mosa.py``'s
    block forward written out by hand: eval mode with the merged modules, training with the drawn ones (the
    same dropout mask in both: the generator is reseeded, and only AdaptFormer has a dropout)."""
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.attach(model, "mosa", style=style, split=("down", "up"), dim=4, blocks=(0,))
    block = model.blocks[0]
    assert all(isinstance(block.get_submodule(m), nn.Identity) for m in ("ls1", "ls2", "drop_path1", "drop_path2"))
    with torch.no_grad():
        for param in visadapt.trainable_parameters(model):
            param.normal_(std=0.3)
    adapters = {item.kind: item.module for item in visadapt.inject.attached(model)}
    x = torch.randn(2, 17, 32)
    model.train(train)
    MoSAPlugin().on_step(model, 3)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = block(x)
        torch.manual_seed(7)
        official = _official_block(block, adapters, style, x, train)
    assert (ours - official).abs().max() <= 1e-5


# ------------------------------------------------------------------------ files written before issue 24

OLD_FILES = Path(__file__).parent / "fixtures" / "mosa_before_issue24"


@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "adaptformer", "lora"])
def test_files_written_before_issue_24_load_and_train_as_they_were(name):
    """Files saved by visadapt before the official defaults (per-site draws, Houlsby on the residual stream,
    per-style LayerNorm and dropout, LayerNorm eps 1e-6) have none of the new fields in their header: they load
    with the behaviour of that time and give the outputs recorded when they were written (``generate.py`` there,
    run once at commit bcf1cba): in eval mode, and for files with module state in a training pass too (the old
    shared draws at step 7 and, for the adapter styles, the old dropout 0.1 with the generator seeded 5)."""
    path = OLD_FILES / f"{name}.safetensors"
    _, meta = visadapt.read_adapter_file(path)
    assert not {"draw", "houlsby_placement", "layer_norm_eps"} & set(json.loads(meta["config"]))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.load_adapter(model, path)
    config = visadapt.api.get_record(model, "default").config
    assert (config.draw, config.houlsby_placement, config.layer_norm_eps) == ("per_block", "branch", 1e-5)
    with torch.no_grad():
        expected = torch.tensor(json.loads(meta["expected_eval_logits"]))
        assert (model.eval()(images) - expected).abs().max() <= 1e-6
        if config.keep_modules:
            model.train()
            MoSAPlugin().on_step(model, 7)
            torch.manual_seed(5)
            expected = torch.tensor(json.loads(meta["expected_train_logits_step7_seed5"]))
            assert (model(images) - expected).abs().max() <= 1e-6


def test_a_new_file_records_the_new_fields_and_keeps_them(tmp_path):
    """A file saved now names draw, houlsby_placement and layer_norm_eps, so it reloads with today's values and
    not as an old file."""
    torch.manual_seed(0)
    model = tiny_models.vit()
    visadapt.attach(model, "mosa", style="houlsby", dim=4, draw="per_site")
    path = visadapt.save_adapter(model, tmp_path / "new.safetensors")
    fresh = tiny_models.vit()
    visadapt.load_adapter(fresh, path)
    config = visadapt.api.get_record(fresh, "default").config
    assert (config.draw, config.houlsby_placement, config.layer_norm_eps, config.effective_dropout) == (
        "per_site", "residual_stream", 1e-6, 0.0)


# ------------------------------------------------------------------------------- the N-copy reference
class NCopyLinear(nn.Module):
    """The straightforward formulation: N full copies of the layer, N masks, gradients masked after backward,
    a module's elements outside its mask held at their initial value."""

    def __init__(self, layer: SparseModulesLinear):
        super().__init__()
        n = layer.num_modules
        start = layer.module_weight(0).detach()  # every module starts at the initial weight
        self.weights = nn.ParameterList([nn.Parameter(start.clone()) for _ in range(n)])
        self.biases = nn.ParameterList([nn.Parameter(layer.bias_modules[i].detach().clone()) for i in range(n)])
        self.register_buffer("masks", torch.stack([(layer.owner == i).float() for i in range(n)]))
        self.register_buffer("start", start.clone())
        self.draw_seed, self.draw_key, self.n = layer.draw_seed, layer.draw_key, n
        self.step = self.call = 0

    def forward(self, x):
        i = stable_hash(self.draw_seed, self.draw_key, self.step, self.call) % self.n
        self.call += 1
        return F.linear(x, self.weights[i], self.biases[i])

    def mask_gradients(self):
        for i, weight in enumerate(self.weights):
            weight.grad = torch.zeros_like(weight) if weight.grad is None else weight.grad * self.masks[i]
        for bias in self.biases:
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)

    @torch.no_grad()
    def hold_outside_masks(self):
        for i, weight in enumerate(self.weights):
            weight.copy_(torch.where(self.masks[i].bool(), weight, self.start))


def _to_reference(model):
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SparseModulesLinear):
                setattr(module, name, NCopyLinear(child))
    return reference


@pytest.mark.parametrize("split", [("up",), ("down", "up")])
def test_one_dense_tensor_follows_the_n_copy_reference_step_for_step(split):
    torch.manual_seed(0)
    model = _vit()
    config = visadapt.attach(model, "mosa", split=split, dim=8, dropout=0.0, head="head")
    reference = _to_reference(model)
    copies = [m for m in reference.modules() if isinstance(m, NCopyLinear)]
    plugin = MoSAPlugin()
    opt_a = torch.optim.AdamW(visadapt.trainable_parameters(model), lr=3e-2, weight_decay=0.1, foreach=False)
    opt_b = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.1,
                              foreach=False)
    model.train(), reference.train()
    for step in range(6):
        x, y = _batch(step)
        plugin.on_step(model, step)
        for c in copies:
            c.step, c.call = step, 0
        loss_a = plugin.training_loss(model, config, x, y, F.cross_entropy)  # two passes + symmetric KL
        loss_b = plugin.training_loss(reference, config, x, y, F.cross_entropy)
        assert torch.equal(loss_a, loss_b), step
        loss_a.backward(), loss_b.backward()
        for c in copies:
            c.mask_gradients()
        opt_a.step(), opt_b.step()
        for c in copies:
            c.hold_outside_masks()
        opt_a.zero_grad(), opt_b.zero_grad(set_to_none=False)
    for (_, layer), c in zip(_sparse_layers(model), copies):
        for i in range(layer.num_modules):
            assert torch.equal(layer.module_weight(i), c.weights[i]), i
            assert torch.equal(layer.bias_modules[i], c.biases[i])
        # merge = the mean of the N copies
        torch.testing.assert_close(layer.weight, torch.stack(list(c.weights)).mean(0), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.head.weight, reference.head.weight, rtol=0, atol=0)


def _train(model, config, steps: int = 4, lr: float = 3e-2):
    plugin = MoSAPlugin()
    optimizer = torch.optim.AdamW(visadapt.trainable_parameters(model), lr=lr)
    model.train()
    for step in range(steps):
        plugin.on_step(model, step)
        x, y = _batch(step)
        plugin.training_loss(model, config, x, y, F.cross_entropy).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_merged_output_is_the_expectation_over_the_modules():
    torch.manual_seed(0)
    model = _vit()
    config = visadapt.attach(model, "mosa", dim=8, dropout=0.0)
    _train(model, config)
    adapter = model.blocks[0].visadapt_adapters.default.mlp
    h = torch.randn(3, 7, 48)
    with torch.no_grad():
        merged = adapter(h)
        adapter.train()
        per_module = []
        for i in range(4):
            hidden = adapter.dropout(adapter.act(adapter.down(adapter.norm(h))))
            per_module.append(adapter.scale * F.linear(hidden, adapter.up.module_weight(i), adapter.up.bias_modules[i]))
        adapter.eval()
    torch.testing.assert_close(merged, torch.stack(per_module).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["adapter", "lora"])
def test_merge_gives_a_plain_adapter_with_the_same_outputs_and_unmerge_gives_the_modules_back(base):
    torch.manual_seed(0)
    model = _vit()
    config = visadapt.attach(model, "mosa", base=base, split=("down", "up"), dim=8)
    _train(model, config)
    base_weight = model.blocks[0].attn.qkv.weight.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        visadapt.merge(model)
        assert not _sparse_layers(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        if base == "lora":  # folded into the backbone like the lora plugin
            assert not torch.equal(model.blocks[0].attn.qkv.weight, base_weight)
        visadapt.unmerge(model)
        assert len(_sparse_layers(model)) == 8 if base == "lora" else 4
        assert torch.equal(model.blocks[0].attn.qkv.weight, base_weight)
        assert torch.equal(model(x), expected)


def _reload(model, path, **kwargs):
    fresh = _vit(**kwargs)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "visadapt_" not in k}, strict=False)
    visadapt.load_adapter(fresh, path)
    return fresh.eval()


def test_file_holds_the_merged_plain_adapter(tmp_path):
    torch.manual_seed(0)
    model = _vit()
    config = visadapt.attach(model, "mosa", dim=8, head="head")
    _train(model, config)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = visadapt.save_adapter(model, tmp_path / "mosa.safetensors")
    tensors, _ = visadapt.read_adapter_file(path)
    # exactly the tensors of a plain adapter of the same shape
    plain = _vit()
    visadapt.attach(plain, "adapter", bottleneck=8, layer_norm=True, head="head")
    assert sorted(tensors) == sorted(visadapt.api.stored_tensors(plain, "default"))
    fresh = _reload(model, path)
    assert not _sparse_layers(fresh)  # it runs as a plain adapter
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    config = visadapt.api.get_record(fresh, "default").config
    x_train, y_train = _batch()
    with pytest.raises(ValueError, match="keep_modules=True"):
        MoSAPlugin().training_loss(fresh.train(), config, x_train, y_train, F.cross_entropy)


def test_keep_modules_file_continues_training_exactly(tmp_path):
    torch.manual_seed(0)
    model = _vit()
    config = visadapt.attach(model, "mosa", split=("down", "up"), dim=8, keep_modules=True, dropout=0.0, head="head")
    _train(model, config)
    path = visadapt.save_adapter(model, tmp_path / "mosa.safetensors")
    tensors, _ = visadapt.read_adapter_file(path)
    assert any(k.startswith(TRAINING_STATE_PREFIX) and k.endswith(".owner") for k in tensors)
    fresh = _reload(model, path)
    for (_, a), (_, b) in zip(_sparse_layers(model), _sparse_layers(fresh)):
        assert torch.equal(a.weight_modules, b.weight_modules) and torch.equal(a.owner, b.owner)
        assert torch.equal(a.initial, b.initial) if a.initial is not None else b.initial is None
    # one more step from the file = one more step in the original
    _train(model, config, steps=1)
    _train(fresh, config, steps=1)
    for (_, a), (_, b) in zip(_sparse_layers(model), _sparse_layers(fresh)):
        assert torch.equal(a.weight_modules, b.weight_modules)


def test_edited_merged_part_of_a_keep_modules_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = _vit()
    visadapt.attach(model, "mosa", keep_modules=True)
    path = visadapt.save_adapter(model, tmp_path / "mosa.safetensors")
    tensors, meta = visadapt.read_adapter_file(path)
    key = next(k for k in tensors if k.endswith("up.weight") and not k.startswith(TRAINING_STATE_PREFIX))
    tensors[key] = tensors[key] + 1.0
    meta["tensors_sha256"] = visadapt.io.tensors_digest(tensors)
    save_file(tensors, str(path), metadata=meta)
    fresh = _vit()
    with pytest.raises(AdapterLoadError, match="not the merge of its stored modules"):
        visadapt.load_adapter(fresh, path)
    assert not list(visadapt.api.records(fresh))  # left clean


@pytest.mark.parametrize("bits", [1, 4])
def test_merged_adapter_stored_at_k_bits(tmp_path, bits):
    torch.manual_seed(0)
    model = _vit()
    config = visadapt.attach(model, "mosa", dim=8, bits=bits, bias=False, layer_norm=False, head="head")
    _train(model, config)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)  # eval mode before merging already uses the k-bit merged weights
        visadapt.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    path = visadapt.save_adapter(model, tmp_path / "mosa.safetensors")
    tensors, _ = visadapt.read_adapter_file(path)
    weights = 2 * (48 * 8 + 8 * 48)  # down and up of two blocks
    assert tensors["codes"].numel() == weights * bits // 8 and tensors["stats"].shape == (4, 2)
    with torch.no_grad():
        assert torch.equal(_reload(model, path)(x), expected)


def test_k_bit_lora_base_merged_in_train_mode_folds_the_inference_form():
    torch.manual_seed(0)
    model = _vit()
    config = visadapt.attach(model, "mosa", base="lora", split=("down", "up"), dim=4, bits=4)
    _train(model, config)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)  # eval mode: the k-bit merged factors
        model.train()
        visadapt.merge(model)
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_symmetric_kl_is_symmetric_zero_on_equal_and_matches_its_definition():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert symmetric_kl(a, a).abs() < 1e-7
    torch.testing.assert_close(symmetric_kl(a, b), symmetric_kl(b, a))
    p, q = a.softmax(-1), b.softmax(-1)
    kl = lambda u, v: (u * (u / v).log()).sum(-1).mean()
    torch.testing.assert_close(symmetric_kl(a, b), 0.5 * (kl(p, q) + kl(q, p)))


def test_consistency_weight_zero_is_one_forward_pass():
    model = _vit()
    config = visadapt.attach(model, "mosa", consistency_weight=0.0)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    x, y = _batch()
    MoSAPlugin().training_loss(model.train(), config, x, y, F.cross_entropy)
    assert len(calls) == 1
    config = visadapt.api.get_record(model, "default").config
    config.consistency_weight = 1.0
    MoSAPlugin().training_loss(model, config, x, y, F.cross_entropy)
    assert len(calls) == 3


def test_activation_checkpointing_is_refused_with_the_fix():
    model = _vit()
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        visadapt.attach(model, "mosa")


@pytest.mark.parametrize("field, value, message", [
    ("num_modules", 1, "num_modules"), ("split", ("left",), "split"), ("base", "prefix", "base"),
    ("bits", 3, "bits"), ("consistency_weight", -1.0, "consistency_weight"), ("activation", "swish", "activation"),
    ("draw", "per_call", "draw"), ("houlsby_placement", "after", "houlsby_placement"),
    ("layer_norm_eps", -1.0, "layer_norm_eps"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        visadapt.attach(_vit(), "mosa", **{field: value})


@pytest.mark.parametrize("style", ["adaptformer", "houlsby"])
def test_swin_trains_merges_and_round_trips(tmp_path, style):
    torch.manual_seed(0)
    model = tiny_models.swin()
    config = visadapt.attach(model, "mosa", dim=4, head="head", style=style)
    assert len(_sparse_layers(model)) == 3 * len(config.site_kinds("timm_swin"))
    optimizer = torch.optim.AdamW(visadapt.trainable_parameters(model), lr=1e-2)
    model.train()
    for step in range(2):
        MoSAPlugin().on_step(model, step)
        x, y = _batch(step)
        MoSAPlugin().training_loss(model, config, x, y, F.cross_entropy).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = visadapt.save_adapter(model, tmp_path / "swin.safetensors")
    fresh = tiny_models.swin()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "visadapt_" not in k}, strict=False)
    visadapt.load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base, style", [("adapter", "adaptformer"), ("adapter", "houlsby"), ("lora", "adaptformer")])
def test_open_clip_visual_tower(base, style, tmp_path):
    torch.manual_seed(0)
    model = tiny_models.clip()
    visadapt.attach(model, "mosa", base=base, style=style, dim=4, split=("down", "up"))
    assert _sparse_layers(model) and all(n.startswith("visual.") for n, _ in _sparse_layers(model))
    optimizer = torch.optim.AdamW(visadapt.trainable_parameters(model), lr=1e-2)
    images = torch.randn(2, 3, 32, 32)
    model.train()
    for step in range(2):
        MoSAPlugin().on_step(model, step)
        loss = model.encode_image(images).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any((layer.weight_modules != 0).any() and layer.initial is None for _, layer in _sparse_layers(model))
    model.eval()
    with torch.no_grad():
        expected = model.encode_image(images)
        visadapt.merge(model)
        torch.testing.assert_close(model.encode_image(images), expected, rtol=1e-5, atol=1e-5)
        visadapt.unmerge(model)
    path = visadapt.save_adapter(model, tmp_path / "clip.safetensors")
    visadapt.detach(model)
    visadapt.load_adapter(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), expected, rtol=1e-5, atol=1e-5)
