"""SelaVPR: the adapted block computes the paper's formula, the place head's shapes, MNN matching against a
brute-force reference, both losses against hand-written ones, retrieval and Recall@K, save/load."""
from __future__ import annotations

import math

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F

import visadapt
from visadapt import inject
from visadapt.plugins import selavpr as S


def randomized(model):
    with torch.no_grad():
        for item in inject.attached(model):
            for param in item.module.parameters():
                param.normal_(0, 0.2)
    return model


def test_block_matches_the_papers_formula():
    model = tm.vit_dinov2().eval()
    visadapt.attach(model, "selavpr", blocks=(0,))
    randomized(model)
    adapters = {item.kind: item.module for item in inject.attached(model)
                if item.kind not in (S.PLACE_HEAD, S.POS_EMBED_SITE)}
    assert set(adapters) == {"attn_branch", "mlp_branch"}
    assert adapters["mlp_branch"].scale == 0.2 and adapters["attn_branch"].scale == 1.0
    assert adapters["attn_branch"].down.out_features == round(0.5 * model.embed_dim)
    block = model.blocks[0]
    x = torch.randn(2, 9, model.embed_dim)
    with torch.no_grad():
        a = block.attn(block.norm1(x))
        x1 = x + type(block.ls1).forward(block.ls1, a + adapters["attn_branch"](a))       # serial, own skip, inside LS1
        h = block.norm2(x1)
        mlp = type(block.mlp).forward(block.mlp, h)
        expected = x1 + type(block.ls2).forward(block.ls2, mlp + adapters["mlp_branch"](h))  # 0.2 inside the module
        assert torch.allclose(block(x), expected, atol=1e-6)


def test_attached_model_starts_equal_to_the_frozen_one_and_only_adapters_train():
    model = tm.vit_dinov2().eval()
    images = torch.randn(2, 3, 28, 28)
    before = model.forward_features(images)
    visadapt.attach(model, "selavpr")
    assert torch.equal(model.forward_features(images), before)  # up-projections start at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("visadapt_adapters" in n for n in trainable)
    assert any("place_head" in n and n.endswith("gem.p") for n in trainable)  # GeM's p is learnt
    with pytest.raises(ValueError, match="cannot be merged"):
        visadapt.merge(model)
    visadapt.detach(model)
    assert not any("visadapt" in n for n, _ in model.named_parameters())


def test_global_and_local_features_have_the_papers_shapes():
    model = tm.vit()  # 32x32 images, patch 8: a 4x4 token map -> 13x13 local map (16 -> 61 on ViT-L/14)
    visadapt.attach(model, "selavpr", local_hidden=16, local_dim=8)
    net = S.PlaceRecognitionModel(model)
    global_desc, local = net(torch.randn(3, 2 + 2, 3, 32, 32))
    assert global_desc.shape == (3, 4, model.embed_dim)
    assert local.shape == (3, 4, 13, 13, 8)
    assert torch.allclose(global_desc.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    assert torch.allclose(local.norm(dim=-1), torch.ones(3, 4, 13, 13), atol=1e-5)


def test_gem_is_mean_pooling_at_p1_and_approaches_max_pooling():
    x = torch.rand(2, 3, 4, 4) + 0.1
    assert torch.allclose(S.GeM(p=1.0)(x), x.mean(dim=(-2, -1)), atol=1e-6)
    assert torch.allclose(S.GeM(p=200.0)(x), x.amax(dim=(-2, -1)), rtol=2e-2)


def brute_force_mutual(query, other):
    sim = other @ query.T
    pairs = set()
    for i in range(other.shape[0]):
        j = int(sim[i].argmax())
        if int(sim[:, j].argmax()) == i:
            pairs.add((i, j))
    return pairs


def test_mutual_nearest_neighbours_equal_a_brute_force_reference():
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(3, 40, 8, generator=generator), dim=-1)
    other = F.normalize(torch.randn(3, 50, 8, generator=generator), dim=-1)
    mutual, match = S.mutual_nearest_neighbours(query, other)
    for b in range(3):
        found = {(i, int(match[b, i])) for i in range(50) if mutual[b, i]}
        assert found == brute_force_mutual(query[b], other[b])
        assert found  # the largest similarity is always a mutual pair
    counts = S.mnn_match_count(query[0], other, chunk=2)
    assert counts.tolist() == [len(brute_force_mutual(query[0], other[b])) for b in range(3)]


def test_local_loss_on_a_hand_built_example():
    e1, e2, e3 = torch.eye(3)
    query = torch.stack([e1, e2])
    positive = torch.stack([torch.tensor([0.6, 0.0, 0.8]), e3])  # only pair: p0 <-> q0, similarity 0.6
    negative = torch.stack([torch.tensor([0.8, 0.6, 0.0]), e3])  # only pair: n0 <-> q0, similarity 0.8
    assert S.mnn_similarity(query, positive).item() == pytest.approx(0.6)
    assert S.mnn_similarity(query, negative).item() == pytest.approx(0.8)
    loss = S.local_mnn_loss(query[None], positive[None], negative[None, None])
    assert loss.item() == pytest.approx(0.2)  # max(0, 0.8 - 0.6) over 1 query x 1 negative
    assert S.local_mnn_loss(query[None], negative[None], positive[None, None]).item() == 0.0
    # with a margin the satisfied order still costs until the gap exceeds it: max(0, 0.6 - 0.8 + 0.3)
    assert S.local_mnn_loss(query[None], negative[None], positive[None, None], margin=0.3).item() == \
        pytest.approx(0.1)


def test_global_loss_equals_torch_triplet_margin_loss_summed_and_divided():
    generator = torch.Generator().manual_seed(1)
    q, p = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    n = torch.randn(4, 3, 16, generator=generator)
    reference = torch.nn.TripletMarginLoss(margin=0.1, p=2, reduction="sum")
    expected = sum(reference(q, p, n[:, k]) for k in range(3)) / (4 * 3)
    assert S.global_triplet_loss(q, p, n).item() == pytest.approx(expected.item(), rel=1e-6)


def test_training_loss_backpropagates_into_adapters_and_head_only():
    model = tm.vit()
    visadapt.attach(model, "selavpr", local_hidden=16, local_dim=8)
    randomized(model)
    net = S.PlaceRecognitionModel(model)
    loss = S.SelaVPRLoss()(net(torch.randn(2, 4, 3, 32, 32)))
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("attn_branch" in n for n in grads) and any("mlp_branch" in n for n in grads)
    assert any("place_head.local" in n for n in grads)
    with pytest.raises(ValueError, match=r"\(B, 2 \+ K"):
        S.SelaVPRLoss()(net(torch.randn(2, 3, 32, 32)))


def test_global_knn_rerank_and_recall_on_a_hand_made_database():
    database = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    queries = F.normalize(torch.tensor([[0.9, 0.1], [-0.2, 1.0]]), dim=-1)
    ranked = S.global_knn(queries, database, k=3)
    assert ranked.tolist() == [[0, 1, 2], [2, 1, 3]]
    positives = [torch.tensor([1]), torch.tensor([3])]
    recalls = S.recall_at_k(ranked, positives, ks=(1, 2, 3))
    assert recalls == {1: 0.0, 2: 50.0, 3: 100.0}

    # Local features: query 0 shares its 4 points with database image 1 and 1 with image 0.
    points = torch.eye(6)
    db_local = torch.stack([points[[0, 5, 5, 5]], points[[0, 1, 2, 3]], points[[4, 4, 4, 4]], points[[4, 4, 4, 4]]])
    q_local = torch.stack([points[[0, 1, 2, 3]], points[[4, 4, 4, 4]]])
    reranked = S.rerank(q_local, db_local, ranked[:, :2])
    assert reranked[0].tolist() == [1, 0]  # more mutual matches first
    assert reranked[1].tolist() == [2, 1]  # a tie keeps the global order
    assert S.recall_at_k(reranked, positives, ks=(1,)) == {1: 50.0}


def test_save_and_load_round_trip_restores_every_output(tmp_path):
    model = tm.vit_dinov2()
    visadapt.attach(model, "selavpr", local_hidden=16, local_dim=8)
    randomized(model)
    path = visadapt.save_adapter(model, tmp_path / "selavpr.safetensors")
    images = torch.randn(2, 3, 28, 28)
    expected = S.place_features(model.eval(), images)
    fresh = tm.vit_dinov2().eval()
    with torch.no_grad():
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "visadapt" not in k})
    visadapt.load_adapter(fresh, path)
    for got, want in zip(S.place_features(fresh, images), expected):
        assert torch.equal(got, want)


def test_clear_errors():
    model = tm.vit()
    with pytest.raises(ValueError, match="attach\\(model, 'selavpr'\\)"):
        S.place_features(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="ratio"):
        visadapt.attach(model, "selavpr", ratio=0.0)
    with pytest.raises(ValueError, match="supports timm_vit"):
        visadapt.attach(tm.swin(), "selavpr")
    visadapt.attach(model, "selavpr", local_hidden=4, local_dim=4)
    visadapt.attach(model, "selavpr", local_hidden=4, local_dim=4, adapter_name="second")
    with pytest.raises(ValueError, match="pass adapter_name"):
        S.PlaceRecognitionModel(model)
    assert S.PlaceRecognitionModel(model, "second")(torch.randn(1, 3, 32, 32))[0].shape == (1, model.embed_dim)


def test_faiss_search_finds_the_same_neighbours_as_torch():
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is in the dev extra; without it only torch search exists")
    assert faiss is not None
    generator = torch.Generator().manual_seed(2)
    database = F.normalize(torch.randn(300, 24, generator=generator), dim=-1)
    queries = F.normalize(torch.randn(40, 24, generator=generator), dim=-1)
    assert torch.equal(S.global_knn(queries, database, 7, backend="faiss"), S.global_knn(queries, database, 7, chunk=9))
    with pytest.raises(ValueError, match="backend"):
        S.global_knn(queries, database, 7, backend="annoy")


# --------------------------------------------------------------------------- position embeddings (official DINOv2)


def official_interpolate_pos_encoding(pos_embed: torch.Tensor, npatch: int, w: int, h: int,
                                      patch_size: int) -> torch.Tensor:
    """Restatement of DINOv2's `DinoVisionTransformer.interpolate_pos_encoding` (SelaVPR backbone/
    vision_transformer.py; interpolate_offset=0.1, interpolate_antialias=False). `pos_embed` (1, 1 + N, D) holds the
    class entry then the M x M patches; `w`, `h` are the image's dims 2 and 3 (`B, nc, w, h = x.shape`)."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    m = int(math.sqrt(n))
    assert n == m * m
    sx, sy = float(w0 + 0.1) / m, float(h0 + 0.1) / m
    patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                                    antialias=False, scale_factor=(sx, sy))
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _dinov2_vit(**kwargs):
    """A tiny DINOv2-layout ViT (class entry in pos_embed, LayerScale) on an 8 x 8 pre-training grid, taking any
    input size as SelaVPR's backbone does (dynamic_img_size, :data:`S.BACKBONE_ARGUMENTS`)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=32, patch_size=4, embed_dim=16,
                              depth=1, num_heads=2, num_classes=0, **S.BACKBONE_ARGUMENTS, **kwargs)
    with torch.no_grad():  # a smooth embedding, like a trained one (random init is white noise)
        coords = torch.linspace(-1, 1, 8)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        freqs = torch.arange(1, 17).float()[:, None, None] / 4
        smooth = torch.sin(freqs * xx + 0.5 * freqs * yy).flatten(1).T  # (64, 16)
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed[:, prefix:] = smooth
    return model.eval()


def _tokens_entering_blocks(model, images):
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model.forward_features(images)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("size", [(24, 24), (40, 40), (24, 40), (32, 32)])
def test_official_position_embedding_is_dinov2s_interpolation(size):
    model = _dinov2_vit()
    images = torch.randn(2, 3, *size)
    timm_tokens = _tokens_entering_blocks(model, images)
    visadapt.attach(model, "selavpr", local_hidden=4, local_dim=4)  # pos_embed="official" is the default
    tokens = _tokens_entering_blocks(model, images)
    with torch.no_grad():
        patches = type(model.patch_embed).forward(model.patch_embed, images).flatten(1, 2)  # without the hooks
    expected_pos = official_interpolate_pos_encoding(model.pos_embed.detach(), patches.shape[1], *size, 4)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1) + expected_pos
    assert (tokens - expected).abs().max() <= 1e-5
    if size != (32, 32):  # timm's antialiased, size-based resize differs; on the pre-training grid both are exact
        assert (timm_tokens - expected).abs().max() > 1e-3
    else:
        assert torch.equal(tokens, timm_tokens)
    visadapt.detach(model)
    assert torch.equal(_tokens_entering_blocks(model, images), timm_tokens)


def test_official_position_embedding_with_register_tokens():
    """timm's DINOv2-with-registers layout: the class entry folded into cls_token, pos_embed covers patches only."""
    model = _dinov2_vit(reg_tokens=4, no_embed_class=True)
    images = torch.randn(1, 3, 24, 24)
    visadapt.attach(model, "selavpr", local_hidden=4, local_dim=4)
    tokens = _tokens_entering_blocks(model, images)
    with torch.no_grad():
        patches = type(model.patch_embed).forward(model.patch_embed, images).flatten(1, 2)  # without the hooks
    with_class_entry = torch.cat([torch.zeros(1, 1, 16), model.pos_embed.detach()], dim=1)
    expected_pos = official_interpolate_pos_encoding(with_class_entry, patches.shape[1], 24, 24, 4)[:, 1:]
    assert (tokens[:, model.num_prefix_tokens:] - (patches + expected_pos)).abs().max() <= 1e-5


def test_timm_option_is_timms_resample_at_load_and_old_files_keep_it(tmp_path):
    from visadapt.backbones import EMBEDDED_MODEL, create_backbone

    images = torch.randn(2, 3, 24, 24)
    at_load = create_backbone(EMBEDDED_MODEL, "default", img_size=24).eval()  # timm resamples 8x8 -> 6x6 once
    native = create_backbone(EMBEDDED_MODEL, "default", **S.BACKBONE_ARGUMENTS).eval()
    visadapt.attach(at_load, "selavpr", pos_embed="timm")
    visadapt.attach(native, "selavpr", pos_embed="timm")
    randomized(at_load)
    native.load_state_dict({k: v for k, v in at_load.state_dict().items() if "visadapt_" in k}, strict=False)
    with torch.no_grad():
        want = S.place_features(at_load, images)
        got = S.place_features(native, images)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got, want))
    # a file saved before the field existed (no pos_embed in its header) was trained with timm's: it loads so
    import json

    from safetensors.torch import save_file
    tensors, meta = visadapt.read_adapter_file(visadapt.save_adapter(native, tmp_path / "new.safetensors"))
    config = json.loads(meta["config"])
    del config["pos_embed"]
    meta["config"] = json.dumps(config)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    fresh = create_backbone(EMBEDDED_MODEL, "default", **S.BACKBONE_ARGUMENTS).eval()
    visadapt.load_adapter(fresh, tmp_path / "old.safetensors")
    assert visadapt.api.get_record(fresh, "default").config.pos_embed == "timm"
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(S.place_features(fresh, images), got))


def test_official_position_embedding_saves_and_loads(tmp_path):
    model = _dinov2_vit()
    visadapt.attach(model, "selavpr", local_hidden=4, local_dim=4)
    randomized(model)
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        want = S.place_features(model, images)
    path = visadapt.save_adapter(model, tmp_path / "official.safetensors")
    fresh = _dinov2_vit()
    visadapt.load_adapter(fresh, path)
    assert visadapt.api.get_record(fresh, "default").config.pos_embed == "official"
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(S.place_features(fresh, images), want))
    with pytest.raises(ValueError, match="pos_embed"):
        visadapt.attach(_dinov2_vit(), "selavpr", pos_embed="bilinear")
