"""visadapt.dense: the multi-task dense model, its decoders and losses; the embedded Swin backbone.

Tiny random Swins (the issue-8 test config at 32 px: maps of 8, 4, 2, 1) and a fake collated batch in the
shared dense sample format (255 = ignored).
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import visadapt
from visadapt.backbones import EMBEDDED_SWIN, PROCSWIN_IMAGE_SIZE, embedded_swin_weights_path
from visadapt.dense import (
    IGNORE_INDEX,
    MTLORA_LOSS_WEIGHTS,
    DenseDecoder,
    MultiTaskDenseModel,
    default_decoder_widths,
    dense_loss,
    normals_loss,
    saliency_loss,
    segmentation_loss,
)

torch.set_num_threads(1)

TASK_OUTPUTS = {"semseg": 5, "human_parts": 3, "sal": 1, "normals": 3}
SIZE = 32


def tiny_swin(img_size: int = SIZE) -> torch.nn.Module:
    """The issue-8 tiny test Swin (4 stages, widths 24/48/96/192), at ``img_size``."""
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size,
                             patch_size=4, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                             window_size=4, num_classes=0)


def fake_batch(batch: int = 2, size: int = SIZE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Collated dense samples: ignored pixels in every task; image 0 has no person (human_parts all 255).

    Labels are constant over 4x4 blocks (regions, as in real scenes), which a stage-1 map of stride 4 can fit.
    """
    g = torch.Generator().manual_seed(seed)

    def blocks(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(4, -1).repeat_interleave(4, -2)

    cells = size // 4
    semseg = blocks(torch.randint(0, TASK_OUTPUTS["semseg"], (batch, cells, cells), generator=g))
    semseg[:, :4] = IGNORE_INDEX
    parts = blocks(torch.randint(0, TASK_OUTPUTS["human_parts"], (batch, cells, cells), generator=g))
    parts[0] = IGNORE_INDEX
    sal = blocks((torch.rand(batch, cells, cells, generator=g) < 0.3).long())
    sal[:, :, :3] = IGNORE_INDEX
    normals = blocks(F.normalize(torch.randn(batch, 3, cells, cells, generator=g), dim=1))
    normals[:, :, -5:] = float(IGNORE_INDEX)
    return {"image": torch.randn(batch, 3, size, size, generator=g), "semseg": semseg, "human_parts": parts,
            "sal": sal, "normals": normals}


def all_ignored(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v if k == "image" else torch.full_like(v, IGNORE_INDEX) for k, v in batch.items()}


def count_backbone_passes(backbone: torch.nn.Module) -> list[int]:
    """A one-element list counting backbone passes (each pass embeds the patches once)."""
    calls = [0]
    backbone.patch_embed.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_outputs_per_task_at_input_resolution_from_one_shared_pass():
    backbone = tiny_swin()
    passes = count_backbone_passes(backbone)
    model = MultiTaskDenseModel(backbone, TASK_OUTPUTS).eval()
    assert model.stage_channels == (24, 48, 96, 192)
    with torch.no_grad():
        out = model(fake_batch(batch=3)["image"])
    assert passes[0] == 1
    assert list(out) == list(TASK_OUTPUTS)
    for task, channels in TASK_OUTPUTS.items():
        assert out[task].shape == (3, channels, SIZE, SIZE) and out[task].dtype == torch.float32
    with torch.no_grad():
        only = model(fake_batch()["image"], tasks=["normals", "sal"])
    assert list(only) == ["normals", "sal"]
    with pytest.raises(KeyError, match="'depth'"):
        model(fake_batch()["image"], tasks=["depth"])


def test_select_task_runs_the_backbone_once_per_task_after_selecting_it():
    backbone = tiny_swin()
    passes = count_backbone_passes(backbone)
    seen: list[tuple[str, int]] = []  # (task, passes so far): the selection must come before that task's pass
    model = MultiTaskDenseModel(backbone, TASK_OUTPUTS, select_task=lambda t: seen.append((t, passes[0])))
    with torch.no_grad():
        out = model.eval()(fake_batch()["image"])
    assert passes[0] == len(TASK_OUTPUTS)
    assert seen == [(task, i) for i, task in enumerate(TASK_OUTPUTS)]
    assert set(out) == set(TASK_OUTPUTS)


def test_decoder_is_mtlora_hrnet_head_scaled_to_the_backbone():
    # MTLoRA's widths for Swin-T, and 3/16 of each stage for other widths
    assert default_decoder_widths((96, 192, 384, 768)) == (18, 36, 72, 144)
    assert default_decoder_widths((24, 48, 96, 192)) == (5, 9, 18, 36)
    head = DenseDecoder((96, 192, 384, 768), num_outputs=21)
    widths, fused = (18, 36, 72, 144), 270
    # bias-free projections; 270 -> 1080 conv with bias; BatchNorm(1080); 1080 -> 21 conv with bias
    expected = sum(c * w for c, w in zip((96, 192, 384, 768), widths)) + (fused * 4 * fused + 4 * fused) \
        + 2 * 4 * fused + (4 * fused * 21 + 21)
    assert sum(p.numel() for p in head.parameters()) == expected
    maps = [torch.randn(2, c, 28 // 2**s, 28 // 2**s) for s, c in enumerate((96, 192, 384, 768))]
    assert head.eval()(maps, (112, 112)).shape == (2, 21, 112, 112)
    with pytest.raises(ValueError, match="one positive width per stage"):
        DenseDecoder((24, 48), num_outputs=3, widths=(4,))


def test_losses_are_finite_and_all_ignored_targets_contribute_zero():
    batch = fake_batch()
    model = MultiTaskDenseModel(tiny_swin(), TASK_OUTPUTS)
    total, per_task = dense_loss(model(batch["image"]), batch)
    assert set(per_task) == set(TASK_OUTPUTS)
    assert torch.isfinite(total) and all(torch.isfinite(v) and v > 0 for v in per_task.values())
    assert torch.allclose(total, sum(MTLORA_LOSS_WEIGHTS[t] * v for t, v in per_task.items()))

    predictions = model(batch["image"])
    total, per_task = dense_loss(predictions, all_ignored(batch))
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in per_task.values())
    total.backward()  # a zero loss still has a graph, and its gradients are zeros, not NaN
    grads = [p.grad for p in model.decoders.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_each_loss_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    target[0, :2] = IGNORE_INDEX
    reference = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert torch.allclose(segmentation_loss(logits, target), reference)

    # class-balanced BCE: positives weighted by the background fraction w, background by 1 - w
    sal_logits = torch.randn(1, 1, 2, 2, generator=g)
    sal = torch.tensor([[[1, 0], [0, IGNORE_INDEX]]])
    bce = F.binary_cross_entropy_with_logits(sal_logits[0, 0], sal[0].clamp(max=1).float(), reduction="none")
    w = 2 / 3  # two background pixels of three labelled
    expected = (w * bce[0, 0] + (1 - w) * (bce[0, 1] + bce[1, 0])) / 3
    assert torch.allclose(saliency_loss(sal_logits, sal), expected)
    with pytest.raises(ValueError, match="0, 1 or 255"):
        saliency_loss(sal_logits, torch.full((1, 2, 2), 2))

    normals = F.normalize(torch.randn(2, 3, 5, 5, generator=g), dim=1)
    normals[1, :, 0] = float(IGNORE_INDEX)
    # scale does not matter (the prediction is normalised), the opposite direction costs 2 per pixel
    assert normals_loss(7.0 * torch.where(normals == IGNORE_INDEX, 1.0, normals), normals).item() < 1e-6
    flipped = torch.where(normals == IGNORE_INDEX, 1.0, -normals)
    valid = normals[:, 0] != IGNORE_INDEX
    assert torch.allclose(normals_loss(flipped, normals), 2 * normals.abs().sum(1)[valid].mean() / 3)
    with pytest.raises(ValueError, match="input\\) resolution"):
        normals_loss(torch.randn(2, 3, 4, 4), normals)


def test_training_lowers_the_loss_and_leaves_the_frozen_backbone_bit_identical():
    backbone = tiny_swin()
    visadapt.attach(backbone, "adapter", bottleneck=4, dropout=0.0)
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}
    model = MultiTaskDenseModel(backbone, TASK_OUTPUTS)
    counts = model.trainable_parameter_counts()
    assert counts.adapter == visadapt.summary(backbone).adapter_params > 0
    assert counts.decoders == sum(p.numel() for p in model.decoders.parameters())
    assert counts.stage_norms == len(TASK_OUTPUTS) * 2 * (24 + 48 + 96 + 192)
    assert counts.total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert str(counts).startswith(f"trainable params: {counts.total:,}")

    batch = fake_batch(batch=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(12):
        total, _ = dense_loss(model(batch["image"]), batch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < 0.85 * losses[0], losses
    params = dict(backbone.named_parameters())
    assert all(torch.equal(params[n], frozen[n]) for n in frozen)
    assert any(not torch.equal(params[n], before) for n, before in adapter_before.items())
    assert set(model.head_state_dict()) == {k for k in model.state_dict() if not k.startswith("backbone.")}


def test_one_adapter_per_task_selected_per_pass_gives_each_task_its_own_features():
    backbone = tiny_swin()
    tasks = {"semseg": 3, "human_parts": 3, "normals": 3}  # equal widths, so that all heads can be identical
    for i, task in enumerate(tasks):
        visadapt.attach(backbone, "adapter", adapter_name=task, bottleneck=4, dropout=0.0)
        with torch.no_grad():  # the up-projection starts at zero: give each task's adapter its own effect
            gen = torch.Generator().manual_seed(i)
            for name, p in backbone.named_parameters():
                if f".{task}." in name and p.requires_grad:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    model = MultiTaskDenseModel(backbone, tasks,
                                select_task=lambda t: visadapt.set_active_adapters(backbone, t))
    first = next(iter(tasks))
    for task in tasks:  # the same head for every task: outputs then differ only through the backbone pass
        model.decoders[task].load_state_dict(model.decoders[first].state_dict())
        model.stage_norms[task].load_state_dict(model.stage_norms[first].state_dict())
    model.eval()
    images = fake_batch()["image"]
    with torch.no_grad():
        out = model(images)
        for task in tasks:
            visadapt.set_active_adapters(backbone, task)
            alone = model.decode(task, backbone.forward_intermediates(images, intermediates_only=True),
                                 images.shape[-2:])
            assert torch.equal(out[task], alone)
    names = list(tasks)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert (out[names[a]] - out[names[b]]).abs().max() > 1e-3, (names[a], names[b])


def test_bf16_autocast_forward_and_float32_losses():
    batch = fake_batch()
    backbone = tiny_swin()
    visadapt.attach(backbone, "adapter", bottleneck=4)
    model = MultiTaskDenseModel(backbone, TASK_OUTPUTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predictions = model(batch["image"])
        total, _ = dense_loss(predictions, batch)
    assert predictions["semseg"].dtype == torch.bfloat16
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_embedded_swin_is_registered_and_loads_its_shipped_weights():
    assert EMBEDDED_SWIN in timm.list_models("visadapt_*")
    path = embedded_swin_weights_path()
    assert path.is_file(), "assets/procswin_tiny.safetensors is shipped with the package"
    model = timm.create_model(EMBEDDED_SWIN, pretrained=True, num_classes=0).eval()
    shipped = load_file(str(path))
    state = model.state_dict()
    assert set(state) == {k for k in shipped if not k.startswith("head.")}
    assert all(torch.equal(state[k], shipped[k]) for k in state)
    random_init = timm.create_model(EMBEDDED_SWIN, pretrained=False, num_classes=0)
    assert not torch.equal(random_init.patch_embed.proj.weight, model.patch_embed.proj.weight)
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, PROCSWIN_IMAGE_SIZE, PROCSWIN_IMAGE_SIZE),
                                           intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(24, 16, 16), (48, 8, 8), (96, 4, 4), (192, 2, 2)]
    assert MultiTaskDenseModel(model, TASK_OUTPUTS).stage_channels == (24, 48, 96, 192)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    # the recipe is recorded, with held-out figures above what guessing gives: a presence mAP above the base
    # rate of a category (about 1.7 objects of 32 categories per scene) and patch labels above 1 in 33
    assert meta["model"] == EMBEDDED_SWIN and json.loads(meta["recipe"])["epochs"] > 0
    assert float(meta["upstream_holdout_map"]) > 100 * 1.7 / 32
    assert float(meta["upstream_holdout_patch_accuracy"]) > 100 / 33
