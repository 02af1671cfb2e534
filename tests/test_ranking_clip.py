"""The ranking-aware CLIP adapter: pair branch, losses, frozen towers, save/load, rank(), metrics, data."""
from __future__ import annotations

import json
import math

import pytest
import tiny_models as tm
import torch

import visadapt
from visadapt.backbones import EMBEDDED_CLIP, create_clip
from visadapt.data.errors import DatasetError
from visadapt.data.ranking import RankingLists, RankingTable, generate_mini_counting
from visadapt.eval.ranking import (
    average_ranks,
    official_pair_accuracy,
    pairwise_accuracy,
    rank_table,
    ranking_metrics,
)
from visadapt.plugins import ranking_clip as R

SMALL = {"num_heads": 4, "prompt_tokens": 4, "relational_tokens": 3, "num_layers": 1, "post_layers": 1}


def _clip():
    return create_clip(EMBEDDED_CLIP, "none")[0]


def _attached(**settings):
    clip = _clip()
    visadapt.attach(clip, "ranking_clip", {**SMALL, **settings})
    return clip


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    text = R.default_tokenizer(_clip())(["Rank the numbers of circle."]).expand(n, -1)
    return images, text


def test_relational_readout_is_antisymmetric_and_matches_the_literal_form():
    torch.manual_seed(0)
    attention = R.RelationalAttention(width=16, heads=4, tokens=3)
    z = torch.randn(4, 6, 16) * 3  # spread scores: the factorised softmax must stay exact, not just stable
    pairs = R.all_pairs(4)
    fast, literal = attention(z, pairs), attention.literal(z, pairs)
    assert fast.shape == (16, 16)
    torch.testing.assert_close(fast, literal, rtol=1e-5, atol=1e-5)
    r = attention.readout(z, pairs).view(4, 4, 16)
    assert torch.equal(r, -r.transpose(0, 1))  # r_ji = -r_ij, bit for bit
    assert torch.equal(r.diagonal(dim1=0, dim2=1), torch.zeros(16, 4))  # r_ii = 0


def test_pair_logits_shape_and_the_self_pair_is_the_same_constant_for_every_image():
    clip = _attached()
    model = R.RankingModel(clip).train()
    images, text = _batch(5)
    out = model(images, text)
    assert out["scores"].shape == (5,) and out["pair_logits"].shape == (25,) and out["pairs"].shape == (25, 2)
    self_pairs = out["pair_logits"].view(5, 5).diagonal()
    # r_ii = 0, so the head sees the same input for every (i, i): its output cannot depend on the image
    torch.testing.assert_close(self_pairs, self_pairs[:1].expand(5))
    model.eval()
    assert "pair_logits" not in model(images, text)  # inference: scores only


def test_lists_keep_their_pairs_apart_and_pair_sampling_is_linear():
    clip = _attached()
    model = R.RankingModel(clip, pair_partners=2).train()
    images, text = _batch(8)
    out = model(images.view(2, 4, 3, 32, 32), text.view(2, 4, -1))
    assert out["scores"].shape == (2, 4) and out["pair_logits"].shape == (2, 8)
    pairs = out["pairs"]
    assert pairs.shape == (8, 2) and (pairs[:, 0] != pairs[:, 1]).all()
    assert (pairs[:, 0] == torch.arange(4).repeat_interleave(2)).all()
    # the same images as two separate lists: identical scores (no image sees another list); eval mode, as
    # the encoder's dropout would differ between two training passes
    model.eval()
    listed = model(images.view(2, 4, 3, 32, 32), text.view(2, 4, -1), with_pairs=True)
    assert listed["pair_logits"].shape == (2, 8)
    torch.testing.assert_close(model(images[:4], text[:4])["scores"], listed["scores"][0])


def test_pairwise_loss_equals_a_hand_written_reference():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.0, -0.7, 1.1, 0.4, -0.2])
    targets = torch.tensor([3.0, 1.0, 3.0])
    scores = torch.tensor([2.5, 0.0, 4.0])
    outputs = {"scores": scores, "pair_logits": logits, "pairs": R.all_pairs(3)}
    rank = 0.0
    for m, (i, j) in enumerate(R.all_pairs(3).tolist()):
        y = 1.0 if targets[i] > targets[j] else 0.0  # ties and i == j: 0
        p = 1 / (1 + math.exp(-logits[m]))
        rank -= y * math.log(p) + (1 - y) * math.log(1 - p)
    rank /= 9
    smooth = sum((abs(s - t) - 0.5) if abs(s - t) >= 1 else 0.5 * (s - t) ** 2
                 for s, t in zip(scores.tolist(), targets.tolist())) / 3
    expected = rank + 0.2 * math.log1p(smooth)
    assert R.RankingLoss()(outputs, targets).item() == pytest.approx(expected, rel=1e-6)
    zero = -sum(math.log(1 / (1 + math.exp(-s))) for s in scores.tolist()) / 3  # all targets non-zero
    assert R.RankingLoss(zero_weight=1.0)(outputs, targets).item() == pytest.approx(expected + zero, rel=1e-6)


def test_towers_stay_bit_identical_and_only_the_adapter_trains():
    clip = _attached()
    before = {k: v.clone() for k, v in clip.state_dict().items() if "visadapt_adapters" not in k}
    model = R.RankingModel(clip).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    images, text = _batch(4)
    for _ in range(2):
        loss = R.RankingLoss(zero_weight=1.0)(model(images, text), torch.tensor([1.0, 2.0, 0.0, 4.0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainable = {n for n, p in clip.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("visadapt_adapters.") for n in trainable)
    # the official code trains these three by accident; here they must not move
    for name in ("token_embedding.weight", "positional_embedding", "ln_final.weight"):
        assert clip.get_parameter(name).grad is None
    after = {k: v for k, v in clip.state_dict().items() if "visadapt_adapters" not in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tokens_come_from_stock_open_clip():
    clip = _attached()
    images, text = _batch(2)
    image_tokens, text_tokens = R.clip_tokens(clip, images, text)
    assert image_tokens.shape == (2, 64, 64) and text_tokens.shape == (2, 16, 64)
    assert not text_tokens.requires_grad  # frozen towers: no activations kept
    features = R.image_token_features(clip, images)
    assert not features.requires_grad and image_tokens.requires_grad  # only the image projection trains
    # open_clip's own output_tokens path (ln_post patch tokens) must give the same tokens before the projection,
    # and the projection starts as CLIP's visual.proj
    clip.visual.output_tokens = True
    _pooled, tokens = clip.visual(images)
    torch.testing.assert_close(features, tokens)
    torch.testing.assert_close(image_tokens, tokens @ clip.visual.proj)


def test_visual_proj_trains_as_official_and_the_clip_keeps_its_own():
    clip = _attached()
    adapter = R.ranking_adapter(clip)
    assert visadapt.api.records(clip)["default"].config.image_proj == "train"  # 'auto' resolved for a ViT
    proj = adapter.image_proj.weight
    assert proj.requires_grad and torch.equal(proj, clip.visual.proj) and proj.data_ptr() != clip.visual.proj.data_ptr()
    clip_proj = clip.visual.proj.clone()
    model = R.RankingModel(clip).train()
    images, text = _batch(4)
    R.RankingLoss()(model(images, text), torch.tensor([1.0, 2.0, 0.0, 4.0])).backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    torch.optim.SGD([proj], lr=1.0).step()
    assert not torch.equal(proj, clip_proj) and torch.equal(clip.visual.proj, clip_proj)
    # the trained projection is what the adapter reads, and it travels in the file
    torch.testing.assert_close(R.clip_tokens(clip, images, text)[0], R.image_token_features(clip, images) @ proj)
    assert "visadapt_adapters.ranking_adapter.image_proj.weight" in visadapt.api.stored_tensors(clip, "default")
    # image_proj="frozen": CLIP's own visual.proj, nothing of it trained or stored
    frozen = _attached(image_proj="frozen")
    assert R.ranking_adapter(frozen).image_proj is None
    assert not any("image_proj" in key for key in visadapt.api.stored_tensors(frozen, "default"))
    torch.testing.assert_close(R.clip_tokens(frozen, images, text)[0],
                               R.image_token_features(frozen, images) @ frozen.visual.proj)


def test_a_file_from_before_image_proj_and_activation_loads_as_it_was_trained(tmp_path):
    from safetensors.torch import save_file

    from visadapt import io

    clip = _attached(image_proj="frozen", activation="gelu")  # what every earlier version trained
    for p in R.ranking_adapter(clip).parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    images, _ = _batch(3)
    scores = R.rank(clip, images, "Rank the numbers of circle.")[1]
    path = visadapt.save_adapter(clip, tmp_path / "new.safetensors")
    tensors, meta = io.read_adapter_file(path)
    config = json.loads(meta["config"])
    del config["image_proj"], config["activation"]  # the header an earlier version wrote
    meta = {**meta, "config": json.dumps(config)}
    if "tensors_sha256" in meta:
        meta["tensors_sha256"] = io.tensors_digest(tensors)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    fresh = create_clip(EMBEDDED_CLIP, "none")[0]
    visadapt.load_adapter(fresh, tmp_path / "old.safetensors")
    loaded = visadapt.api.records(fresh)["default"].config
    assert (loaded.image_proj, loaded.activation) == ("frozen", "gelu")
    assert torch.equal(R.rank(fresh, images, "Rank the numbers of circle.")[1], scores)
    # a user leaving the fields out gets the official behaviour; only files fall back
    assert R.RankingCLIPConfig.from_dict({}).image_proj == "auto"


def _official_no_decay(name: str, p: torch.Tensor) -> bool:
    """training/main.py's exclude rule, restated."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def test_official_optimiser_groups():
    clip = _attached()
    model = R.RankingModel(clip)
    groups = R.official_param_groups(model, weight_decay=0.01)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert sorted(by_id) == sorted(id(p) for p in trainable.values())  # each trainable tensor exactly once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    for name, p in trainable.items():
        inner = name.replace("visadapt_adapters.default.", "")
        assert by_id[id(p)]["weight_decay"] == (0.0 if _official_no_decay(inner, p) else 0.01), name
    for group in groups:  # ViT tower: open_clip's get_default_params for "vit" names
        assert (group["betas"], group["eps"], group["amsgrad"]) == ((0.9, 0.98), 1e-6, True)
    adapter = R.ranking_adapter(clip)
    decayed = {id(p) for p in groups[1]["params"]}
    assert {id(adapter.prompts), id(adapter.image_proj.weight), id(adapter.relational.queries)} <= decayed
    assert not {id(adapter.score_norm.weight), id(adapter.fusion[0].ln_1.bias), id(adapter.relational.out.bias)
                } & decayed
    # the adapter's name does not change the groups (the rule reads the name inside the adapter)
    named = _clip()
    visadapt.attach(named, "ranking_clip", SMALL, adapter_name="ln_bn")
    assert [len(g["params"]) for g in R.official_param_groups(named, 0.01)] == [len(g["params"]) for g in groups]
    # a ConvNeXt tower: the non-ViT defaults
    convnext = tm.convnext_clip()
    visadapt.attach(convnext, "ranking_clip", SMALL)
    for group in R.official_param_groups(convnext, 0.01):
        assert (group["betas"], group["eps"], group["amsgrad"]) == ((0.9, 0.999), 1e-8, True)


def test_quick_gelu_clip_models_get_a_quick_gelu_adapter(monkeypatch):
    import open_clip
    from open_clip.model import CLIP
    from open_clip.transformer import QuickGELU

    from visadapt.backbones import TINY_CLIP_CONFIG

    quick = CLIP(**TINY_CLIP_CONFIG, quick_gelu=True)
    visadapt.attach(quick, "ranking_clip", SMALL)
    assert visadapt.api.records(quick)["default"].config.activation == "quick_gelu"
    activations = [block.mlp[1] for block in R.ranking_adapter(quick).fusion]
    assert activations and all(isinstance(a, QuickGELU) for a in activations)
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(activations[0](x), x * torch.sigmoid(1.702 * x))  # open_clip's QuickGELU
    plain = _attached()
    assert visadapt.api.records(plain)["default"].config.activation == "gelu"
    assert all(type(block.mlp[1]) is torch.nn.GELU for block in R.ranking_adapter(plain).fusion)
    # create_clip asks open_clip for the activation a tag's weights were trained with: ViT-B-32 with the OpenAI
    # weights is a QuickGELU model (open_clip 3.x itself only warns). No download: create_model is stubbed by a
    # tiny CLIP built with the flag it was given.
    calls = []

    def record(name, pretrained=None, force_quick_gelu=False):
        calls.append(force_quick_gelu)
        return CLIP(**TINY_CLIP_CONFIG, quick_gelu=force_quick_gelu)

    monkeypatch.setattr(open_clip, "create_model", record)
    assert R.uses_quick_gelu(create_clip("ViT-B-32", "openai")[0]) and calls == [True]
    assert not R.uses_quick_gelu(create_clip("ViT-B-32", "laion2b_s34b_b79k")[0]) and calls == [True, False]
    forced = CLIP(**TINY_CLIP_CONFIG, quick_gelu=True)
    visadapt.attach(forced, "ranking_clip", {**SMALL, "activation": "gelu"})
    assert all(type(block.mlp[1]) is torch.nn.GELU for block in R.ranking_adapter(forced).fusion)


def test_scalar_prompt_form_and_config_errors():
    clip = _attached(prompt_form="scalar")
    assert R.ranking_adapter(clip).prompts.shape == (4, 1)
    with pytest.raises(ValueError, match="prompt_form"):
        visadapt.attach(_clip(), "ranking_clip", {"prompt_form": "wide"})
    with pytest.raises(ValueError, match="does not divide"):
        visadapt.attach(_clip(), "ranking_clip", {"num_heads": 5})
    with pytest.raises(ValueError, match="no ranking adapter"):
        R.RankingModel(_clip())
    from open_clip.model import CLIP

    resnet_clip = CLIP(embed_dim=16, vision_cfg={"layers": (1, 1, 1, 1), "width": 8, "image_size": 32, "head_width": 8},
                       text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1})
    with pytest.raises(ValueError, match="ModifiedResNet"):
        visadapt.attach(resnet_clip, "ranking_clip", SMALL)


def test_save_load_round_trip_and_rank(tmp_path):
    clip = _attached()
    for p in R.ranking_adapter(clip).parameters():  # move away from the init so the file carries information
        p.data.add_(torch.randn_like(p) * 0.1)
    images, _ = _batch(6)
    order, scores = R.rank(clip, images, "Rank the numbers of circle.")
    assert torch.equal(order, torch.sort(scores, descending=True, stable=True).indices)
    # scores do not depend on which other images share the batch
    torch.testing.assert_close(R.rank(clip, images[3:], "Rank the numbers of circle.", batch_size=2)[1], scores[3:])
    visadapt.save_adapter(clip, tmp_path / "rank.safetensors")
    fresh = _clip()
    visadapt.load_adapter(fresh, tmp_path / "rank.safetensors")
    assert torch.equal(R.rank(fresh, images, "Rank the numbers of circle.")[1], scores)
    with pytest.raises(ValueError, match="non-empty"):
        R.rank(fresh, images, " ")


def test_metrics_on_hand_made_scores():
    targets = torch.tensor([1.0, 2.0, 2.0, 4.0])
    assert average_ranks(targets).tolist() == [1.0, 2.5, 2.5, 4.0]
    perfect = ranking_metrics(torch.tensor([0.1, 0.5, 0.5, 0.9]), targets)
    assert perfect["srcc"] == pytest.approx(1.0) and perfect["pair_acc_strict"] == 1.0
    reversed_ = ranking_metrics(-targets, targets)
    assert reversed_["srcc"] == pytest.approx(-1.0) and reversed_["plcc"] == pytest.approx(-1.0)
    # 5 pairs with different targets; scores tie on one of them (counts half) and swap another
    assert pairwise_accuracy(torch.tensor([1.0, 1.0, 3.0, 2.0]), targets) == pytest.approx((3 + 0.5) / 5)
    assert ranking_metrics(torch.tensor([1.2, 2.6, 2.4, 3.4]), targets, ordinal=True)["accuracy"] == 0.5


def _official_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The official evaluate_clip_on_count accuracy, restated: u[i, j] = y_j - y_i, v[i, j] = s_j - s_i, compared
    as ``>= 0`` over tril_indices(n, k=1) (numpy's k is torch's offset)."""
    u = targets.double().view(1, -1) - targets.double().view(-1, 1)
    v = scores.double().view(1, -1) - scores.double().view(-1, 1)
    rows, cols = torch.tril_indices(len(scores), len(scores), offset=1)
    return ((u[rows, cols] >= 0) == (v[rows, cols] >= 0)).double().mean().item()


def test_official_pair_accuracy_is_the_official_formula_and_the_strict_one_is_named_apart():
    targets = torch.tensor([1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0])  # ties: the two definitions part here
    scores = torch.tensor([0.5, 2.2, 1.9, 3.1, 2.8, 3.3, 3.0])
    metrics = ranking_metrics(scores, targets)
    assert metrics["pair_acc_official"] == pytest.approx(_official_accuracy(scores, targets), abs=1e-12)
    assert metrics["pair_acc_official"] == pytest.approx(27 / 34)  # 34 = 7 * 8 / 2 + 6 entries
    # strict: the 17 pairs of different targets; 2 of them misordered (3.0 < 3.1 and 3.0 < 3.3 against 4 > 3)
    assert metrics["pair_acc_strict"] == pytest.approx(15 / 17) == pairwise_accuracy(scores, targets)
    assert "pair_acc" not in metrics  # the ambiguous name is gone from new records
    # the official one depends on the row order (its superdiagonal pairs neighbours), the strict one does not
    flipped = torch.arange(6, -1, -1)
    assert official_pair_accuracy(scores[flipped], targets[flipped]) == pytest.approx(
        _official_accuracy(scores[flipped], targets[flipped])) == pytest.approx(28 / 34)
    assert pairwise_accuracy(scores[flipped], targets[flipped]) == pytest.approx(15 / 17)
    # an old record (strict accuracy under "pair_acc") keeps its meaning in the table; its official cell is empty
    old = {"plcc": 0.5, "srcc": 0.5, "mae": 1.0, "pair_acc": 0.75}
    table = rank_table([("old", {"test": {"all": old}}), ("new", {"test": {"all": metrics}})])
    assert "| old | 0.500 | 0.500 | 1.00 | - | 0.750 | - |" in table
    assert "| new |" in table and "| 0.794 | 0.882 |" in table


def test_counting_world_lists_and_csv_errors(tmp_path):
    root = generate_mini_counting(tmp_path / "count", seed=0, sizes={"train": 24, "val": 8, "test": 8})
    table = RankingTable(root / "train.csv")
    assert len(table) == 24 and set(table.categories) <= {"circle", "square", "triangle", "star"}
    assert table.instruction("circle") == "Rank the numbers of circle."
    lists = RankingLists(table, R.default_tokenizer(_clip()), list_size=5, negative_ratio=0.2, seed=0)
    (images, ids), values = lists[0]
    assert images.shape == (5, 3, 32, 32) and ids.shape == (5, 16) and values[-1] == 0.0
    cname, positives, negatives = lists.draw(0)
    assert all(table.rows[i].cname == cname for i in positives)
    assert all(table.rows[i].cname != cname for i in negatives) and len(negatives) == 1
    assert (ids == ids[0]).all()  # one instruction per list, negatives included
    lists.set_epoch(1)
    assert lists.draw(0) != (cname, positives, negatives) or lists.draw(1) != lists.draw(0)
    again = generate_mini_counting(tmp_path / "count", seed=0, sizes={"train": 24, "val": 8, "test": 8})
    assert again == root  # reused, not rewritten

    bad = tmp_path / "bad.csv"
    bad.write_text("filepath\ttitle\tcname\tvalue\nimages/train_00000.png\tRank it.\tcircle\tmany\n"
                   "missing.png\tRank it.\tcircle\t2\n")
    (tmp_path / "images").symlink_to(root / "images")
    with pytest.raises(DatasetError, match=r"line 2: value 'many' is not a number.*1 image files do not exist"):
        RankingTable(bad)
    commas = tmp_path / "commas.csv"
    commas.write_text("filepath,title,cname,value\n")
    with pytest.raises(DatasetError, match="not tab-separated"):
        RankingTable(commas)


def _convnext_batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(1, 64, (n, 8), generator=g)


def _official_convnext_tokens(clip, projection, images):
    """The official image tokens of a ConvNeXt CLIP, restated with timm itself: the fork's convnext_*-adapter
    config (timm_pool "", timm_proj "") builds the trunk with num_classes=embed_dim and global_pool='', whose head
    is norm -> 1x1 conv; L2RCLIP.forward flattens its (N, D, h, w) output to (N, h*w, D). The checkpoint fills
    everything but that conv (the stock config pools and has no such layer), which keeps its random init: here
    it is given the adapter's projection, so the two paths must agree."""
    import timm

    trunk = clip.visual.trunk
    official = timm.create_model("convnext_atto", pretrained=False, num_classes=projection.weight.shape[1],
                                 global_pool="", drop_path_rate=0.1).eval()
    missing, unexpected = official.load_state_dict(trunk.state_dict(), strict=False)
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight"] and not unexpected
    with torch.no_grad():
        official.head.fc.weight.copy_(projection.weight.T[:, :, None, None])
        official.head.fc.bias.copy_(projection.bias)
        feature_map = official(images)                                                    # (N, D, h, w)
    n, d = feature_map.shape[:2]
    return feature_map.view(n, d, -1).permute(0, 2, 1)


def test_convnext_tower_reads_the_final_feature_map_as_official(tmp_path):
    torch.manual_seed(0)
    clip = tm.convnext_clip()
    visadapt.attach(clip, "ranking_clip", SMALL)
    adapter = R.ranking_adapter(clip)
    assert visadapt.api.records(clip)["default"].config.image_proj == "frozen"  # 'auto' for ConvNeXt
    projection = adapter.image_proj
    # timm's init of that conv (trunc. normal, std 0.02, zero bias), frozen: buffers, stored in the file
    assert projection.weight.shape == (320, 32) and not list(projection.parameters())
    assert 0.018 < projection.weight.std().item() < 0.022 and torch.equal(projection.bias, torch.zeros(32))
    stored = visadapt.api.stored_tensors(clip, "default")
    assert {"visadapt_adapters.ranking_adapter.image_proj.weight",
            "visadapt_adapters.ranking_adapter.image_proj.bias"} <= stored.keys()
    images, text = _convnext_batch()
    model = R.RankingModel(clip).eval()
    image_tokens, text_tokens = R.clip_tokens(clip, images, text)
    official = _official_convnext_tokens(clip, projection, images)
    assert image_tokens.shape == (3, 4, 32)  # 64 px / stride 32: a 2 x 2 map
    assert (image_tokens - official).abs().max() <= 1e-5
    torch.testing.assert_close(model(images, text)["scores"], adapter.score(adapter.fuse(official, text_tokens)),
                               rtol=0, atol=1e-5)
    # in training the trunk keeps its stochastic depth (drop path 0.1 of the config), as the official training
    # runs the locked tower in train mode
    model.train()
    assert not torch.equal(R.image_token_features(clip, images), R.image_token_features(clip, images))
    model.eval()
    # training moves the adapter only: the trunk, its head norm and the frozen projection stay bit-identical
    before = {k: v.clone() for k, v in clip.state_dict().items() if "visadapt_adapters" not in k or "image_proj" in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(any(p is q for q in adapter.parameters()) for p in trainable)
    opt = torch.optim.AdamW(R.official_param_groups(model, 0.01), lr=0.1)
    model.train()
    R.RankingLoss()(model(images, text), torch.tensor([1.0, 3.0, 0.0])).backward()
    opt.step()
    after = clip.state_dict()
    assert all(torch.equal(tensor, after[key]) for key, tensor in before.items())
    # the file carries the projection: a fresh ConvNeXt CLIP (another random projection at attach) scores alike
    path = visadapt.save_adapter(clip, tmp_path / "convnext.safetensors")
    torch.manual_seed(1)
    fresh = tm.convnext_clip()
    fresh.load_state_dict({k: v for k, v in clip.state_dict().items() if "visadapt_adapters" not in k})
    visadapt.load_adapter(fresh, path)
    model.eval()
    torch.testing.assert_close(R.RankingModel(fresh).eval()(images, text)["scores"], model(images, text)["scores"],
                               rtol=0, atol=0)
    # other timm towers are still refused, naming the trunk
    from open_clip.model import CLIP

    resnet_timm = CLIP(embed_dim=16, vision_cfg={"timm_model_name": "resnet10t", "timm_model_pretrained": False,
                                                 "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
                       text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1})
    with pytest.raises(ValueError, match="TimmModel with a ResNet trunk"):
        visadapt.attach(resnet_timm, "ranking_clip", SMALL)


def test_category_mean_is_the_official_per_category_average(tmp_path):
    from visadapt.eval.ranking import evaluate_ranking

    root = generate_mini_counting(tmp_path / "count", seed=0, sizes={"train": 8, "val": 8, "test": 24})
    table = RankingTable(root / "test.csv")
    result = evaluate_ranking(lambda images, instruction: images.mean(dim=(1, 2, 3)), table, batch_size=5)
    per = result["per_category"]
    assert len(per) > 1 and set(result["category_mean"]) == set(result["all"])
    for key in ("plcc", "srcc", "mae", "pair_acc_official"):
        # scripts/inference.py: evaluate_clip_on_count on each cname's rows in file order, then np.mean
        by_hand = [ranking_metrics(torch.stack([table.load(i) for i in rows]).mean(dim=(1, 2, 3)),
                                   table.values[rows])[key] for _, rows in sorted(table.categories.items())]
        assert result["category_mean"][key] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-6)
    assert result["category_mean"]["srcc"] != pytest.approx(result["all"]["srcc"])  # pooled is another figure
