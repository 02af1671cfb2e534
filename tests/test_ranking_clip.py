"""The ranking-aware CLIP adapter: pair branch, losses, frozen towers, save/load, rank(), metrics, data."""
from __future__ import annotations

import math

import pytest
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
    assert not image_tokens.requires_grad and not text_tokens.requires_grad  # frozen towers: no activations kept
    # open_clip's own output_tokens path (ln_post patch tokens) must give the same tokens before the projection
    clip.visual.output_tokens = True
    _pooled, tokens = clip.visual(images)
    torch.testing.assert_close(image_tokens, tokens @ clip.visual.proj)


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
