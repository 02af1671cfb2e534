"""The upstream scene corpus of the embedded backbones and the pieces of their masked-image objective.

The objective's model must see exactly what timm's own ViT / Swin sees (same tokens, same order, same head, the
same stage maps), or the backbone written to ``assets/`` would not be the network that was trained; those checks
compare with timm.
"""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from visadapt.data.upstream import (
    BACKGROUND,
    CATEGORIES,
    GLYPHS,
    NUM_CATEGORIES,
    PATCH_GRID,
    _glyph_mask,
    render_scene,
)
from visadapt.train.pretrain_backbone import (
    LAYOUT_GRID,
    MaskedImageModel,
    MaskedSwinModel,
    block_mask,
    layout_target,
    mean_average_precision,
    patchify,
    render_scene_set,
    scene_losses,
    scene_mask,
    to_input,
)


def test_a_scene_is_deterministic_and_typed():
    image, presence, patches = render_scene(np.random.default_rng([3, 11, 5]))
    again = render_scene(np.random.default_rng([3, 11, 5]))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert presence.shape == (NUM_CATEGORIES,) and presence.dtype == np.float32
    assert patches.shape == (PATCH_GRID, PATCH_GRID) and patches.dtype == np.uint8
    for a, b in zip((image, presence, patches), again):
        np.testing.assert_array_equal(a, b)
    other = render_scene(np.random.default_rng([3, 11, 6]))[0]
    assert not np.array_equal(image, other)


def test_patch_labels_name_only_objects_in_the_presence_label():
    """A patch is labelled with a category only if that category was drawn; every scene shows an object."""
    for index in range(60):
        _, presence, patches = render_scene(np.random.default_rng([0, 11, index]))
        assert presence.sum() >= 1
        drawn = set(np.flatnonzero(presence))
        labelled = set(np.unique(patches)) - {BACKGROUND}
        assert labelled <= drawn, (index, labelled, drawn)
        assert patches.max() <= BACKGROUND


def test_the_corpus_covers_every_category():
    seen = np.zeros(NUM_CATEGORIES)
    for index in range(400):
        seen += render_scene(np.random.default_rng([1, 11, index]))[1]
    assert (seen > 0).all(), [CATEGORIES[i] for i in np.flatnonzero(seen == 0)]


def test_every_glyph_draws_and_glyphs_differ():
    masks = {g: _glyph_mask(g, np.random.default_rng(0), 16, 16, 24, 0.0) for g in GLYPHS}
    assert all(m.sum() > 40 for m in masks.values())
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (masks[a] ^ masks[b]).sum() > 20, (a, b)


def test_render_scene_set_is_the_per_item_render():
    images, presence, patches = render_scene_set(seed=2, start=10, count=5, workers=2)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    for k in range(5):
        image, label, grid = render_scene(np.random.default_rng([2, 11, 10 + k]))
        np.testing.assert_array_equal(images[k].permute(1, 2, 0).numpy(), image)
        np.testing.assert_array_equal(presence[k].numpy(), label)
        np.testing.assert_array_equal(patches[k].numpy(), grid.reshape(-1))


@pytest.fixture(scope="module")
def masked_model():
    torch.manual_seed(0)
    return MaskedImageModel(timm.create_model("visadapt_procvit_tiny", num_classes=NUM_CATEGORIES)).eval()


def test_unmasked_forward_is_timms_forward(masked_model):
    x = torch.randn(3, 3, 32, 32)
    logits, pixels, patch_logits, layout_logits = masked_model(x, torch.zeros(3, 64, dtype=torch.bool))
    torch.testing.assert_close(logits, masked_model.backbone(x))
    assert pixels.shape == (3, 64, 48) and patch_logits.shape == (3, 64, NUM_CATEGORIES + 1)
    assert layout_logits.shape == (3, LAYOUT_GRID ** 2)


def test_patchify_follows_the_patch_embeddings_token_order(masked_model):
    """Token n of timm's patch embedding is a linear map of patchify's row n, so pixel targets line up."""
    x = torch.randn(2, 3, 32, 32)
    conv = masked_model.backbone.patch_embed.proj
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (D, p, p, C) as patchify lays out
    expected = patchify(x) @ weight.T + conv.bias
    torch.testing.assert_close(masked_model.backbone.patch_embed(x), expected, rtol=1e-4, atol=1e-5)


def test_a_masked_token_hides_its_pixels(masked_model):
    """Changing the pixels under a masked patch changes nothing the model computes."""
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 9] = True  # row 1, column 1: pixels 4..7 x 4..7
    y = x.clone()
    y[..., 4:8, 4:8] = torch.randn(3, 4, 4)
    for a, b in zip(masked_model(x, mask), masked_model(y, mask)):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(masked_model(x, ~mask)[0], masked_model(y, ~mask)[0])


@pytest.fixture(scope="module")
def masked_swin():
    torch.manual_seed(0)
    return MaskedSwinModel(timm.create_model("visadapt_procswin_tiny", num_classes=NUM_CATEGORIES)).eval()


def test_unmasked_swin_forward_is_timms_forward_and_its_stage_maps(masked_swin):
    """Without a mask the logits are timm's, and the per-patch heads read timm's own ``forward_intermediates``
    maps, each layer-normed and resized to the 8x8 label map."""
    swin = masked_swin.backbone
    x = torch.randn(2, 3, 64, 64)
    logits, pixels, patch_logits, layout_logits = masked_swin(x, torch.zeros(2, 256, dtype=torch.bool))
    torch.testing.assert_close(logits, swin(x))
    maps = swin.forward_intermediates(x, intermediates_only=True)
    resized = [F.adaptive_avg_pool2d(norm(m), PATCH_GRID) if m.shape[-1] > PATCH_GRID
               else F.interpolate(norm(m), size=(PATCH_GRID, PATCH_GRID)) for m, norm in
               zip(maps, masked_swin.stage_norms)]
    column = torch.cat(resized, 1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pixels, masked_swin.decoder(column))
    torch.testing.assert_close(patch_logits, masked_swin.patch_head(column))
    assert pixels.shape == (2, 64, 48) and patch_logits.shape == (2, 64, NUM_CATEGORIES + 1)
    assert layout_logits.shape == (2, LAYOUT_GRID ** 2)


def test_a_masked_swin_block_hides_its_pixels(masked_swin):
    """A masking block is 4x4 tokens (16x16 input pixels = 8x8 of the render): changing the pixels under a
    masked block changes nothing the model computes, and the cells it covers are the ones scored."""
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 4:8, 8:12] = True  # input pixels 16..31 x 32..47
    y = x.clone()
    y[..., 16:32, 32:48] = torch.randn(3, 16, 16)
    for a, b in zip(masked_swin(x, mask.reshape(1, -1)), masked_swin(y, mask.reshape(1, -1))):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(masked_swin(x, ~mask.reshape(1, -1))[0], masked_swin(y, ~mask.reshape(1, -1))[0])
    cells = masked_swin.cell_mask(mask.reshape(1, -1)).reshape(PATCH_GRID, PATCH_GRID)
    expected = torch.zeros(PATCH_GRID, PATCH_GRID, dtype=torch.bool)
    expected[2:4, 4:6] = True  # render pixels 8..15 x 16..23: 4x4 patches 2..3 x 4..5
    assert torch.equal(cells, expected)


def test_mean_average_precision_is_the_mean_of_per_category_average_precision():
    """AP = the mean, over a category's positives, of the precision at each positive's rank (scores descending);
    a category with no positive is left out of the mean rather than counted as 0."""
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.4, 0.2], [0.7, 0.3, 0.9], [0.6, 0.2, 0.1]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    # category 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; category 1: its positive ranked 1st -> 1;
    # category 2 has no positive
    expected = 100.0 * ((1.0 + 2.0 / 3.0) / 2 + 1.0) / 2
    assert mean_average_precision(scores, labels) == pytest.approx(expected)


@pytest.mark.parametrize("wrapper", ["masked_model", "masked_swin"])
def test_scene_losses_score_the_masked_cells_of_the_render(wrapper, request):
    """Both wrappers take the same batch: the pixel loss is the L1 over exactly the masked cells of the 32x32
    render, whatever the model's input size."""
    model = request.getfixturevalue(wrapper)
    images, presence, patches = render_scene_set(0, 0, 4, 1)
    mask = scene_mask(model, 4, 0.5, torch.Generator().manual_seed(1))
    losses = scene_losses(model, images, presence, patches, mask)
    with torch.no_grad():
        pixels = model(to_input(images, model.input_size), mask)[1]
    cells = model.cell_mask(mask)
    assert cells.float().mean() == 0.5
    expected = (pixels - patchify(to_input(images))).abs()[cells].mean()
    torch.testing.assert_close(losses["pixels"], expected)
    assert set(losses) == {"pixels", "patches", "presence", "layout"} and all(torch.isfinite(v) for v in
                                                                               losses.values())


def test_block_mask_masks_whole_blocks_at_the_ratio():
    mask = block_mask(16, 8, 2, 0.5, torch.Generator().manual_seed(0)).reshape(16, 4, 2, 4, 2)
    assert (mask.float().mean(dim=(1, 2, 3, 4)) == 0.5).all()
    # every 2x2 block is all masked or all kept
    blocks = mask.permute(0, 1, 3, 2, 4).reshape(16, 16, 4)
    assert ((blocks.all(-1)) | (~blocks.any(-1))).all()


def test_layout_target_is_the_object_fraction_per_region():
    patches = torch.full((1, PATCH_GRID, PATCH_GRID), BACKGROUND)
    patches[0, 0, 0] = 3          # one of the four patches of region (0, 0)
    patches[0, 6:8, 6:8] = 5      # all of region (3, 3)
    target = layout_target(patches.reshape(1, -1)).reshape(LAYOUT_GRID, LAYOUT_GRID)
    expected = torch.zeros(LAYOUT_GRID, LAYOUT_GRID)
    expected[0, 0], expected[3, 3] = 0.25, 1.0
    torch.testing.assert_close(target, expected)


def test_to_input_maps_uint8_to_minus_one_one():
    images = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2).expand(1, 3, 1, 2)
    torch.testing.assert_close(to_input(images, size=2)[..., 0, :], torch.tensor([-1.0, 1.0]).expand(1, 3, 2))


@pytest.mark.parametrize("model", ["visadapt_procvit_tiny", "visadapt_procswin_tiny"])
def test_pretraining_writes_a_backbone_timm_loads_with_its_recipe(tmp_path, model):
    """A tiny run of each embedded backbone's recipe writes a file that timm loads as the registered model's
    weights, with the recipe and the held-out figure in its metadata."""
    import json

    from safetensors import safe_open

    from visadapt.train.pretrain_backbone import main

    out = tmp_path / "backbone.safetensors"
    main(["--model", model, "--samples", "128", "--holdout", "64", "--epochs", "1", "--batch-size", "64",
          "--warmup-steps", "1", "--workers", "1", "--output", str(out)])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["recipe"])
    assert recipe["samples"] == 128 and recipe["batch_size"] == 64 and recipe["mim_weight"] == 1.0
    assert all(0.0 <= float(meta[f"upstream_holdout_{k}"]) <= 100.0 for k in ("map", "patch_accuracy"))
    loaded = timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": str(out)}, num_classes=7)
    from safetensors.torch import load_file

    state = load_file(str(out))
    own = loaded.state_dict()
    body = [k for k in state if not k.startswith("head")]
    assert body and all(torch.equal(own[k], state[k]) for k in body)


@pytest.mark.parametrize("model", ["visadapt_procvit_tiny", "visadapt_procswin_tiny"])
def test_each_shipped_backbone_is_the_scripts_default_recipe(monkeypatch, model):
    """``python train/pretrain_backbone.py --model M`` with no other flag is the recipe recorded in M's shipped
    file, so running it reproduces the asset (up to floating-point order)."""
    import json

    from safetensors import safe_open

    from visadapt.data.upstream import UPSTREAM_VERSION
    from visadapt.train.pretrain_backbone import EMBEDDED_BACKBONES, main

    with safe_open(str(EMBEDDED_BACKBONES[model]["output"]()), "pt") as f:
        meta = f.metadata()
    recorded = json.loads(meta["recipe"])
    captured = {}

    def capture(args, spec, start):  # stop before any rendering: only the resolved flags matter here
        captured.update(vars(args))
        raise SystemExit(0)

    monkeypatch.setattr("visadapt.train.pretrain_backbone.train_scenes", capture)
    with pytest.raises(SystemExit):
        main(["--model", model])
    assert {k: captured[k] for k in recorded} == recorded
    assert meta["upstream_version"] == str(UPSTREAM_VERSION) and meta["model"] == model
