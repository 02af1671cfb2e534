"""Train SelaVPR (or any adapter plus SelaVPR's place head) for visual place recognition, then test it.

    accelerate launch train/vpr.py               # embedded default: procedural places, no download
    accelerate launch train/vpr.py --recipe selavpr-msls --data-root /data/msls --output-dir runs/msls
    accelerate launch train/vpr.py --recipe selavpr-pitts30k --data-root /data/pitts30k \
        --init-adapter runs/msls/adapter.safetensors --output-dir runs/pitts30k   # the official second stage

Data: the "Visual Geo-localization Benchmark" layout, ``<data-root>/images/{train,val,test}/{database,queries}``
with UTM coordinates in the file names. Each epoch first mines, with the current model, every training query's
closest positive in descriptor space (among database images within 10 m) and its hardest negatives among a
random pool of database images farther than 25 m; then trains on (query, positive, negatives) tuples with the
global triplet loss plus the local mutual-nearest-neighbour loss; then measures Recall@K on ``val`` (global and
re-ranked). The adapter with the best re-ranked val R@5 is kept (as the official code selects its model) and
tested on ``test``. Outputs in ``--output-dir``: ``adapter.safetensors`` (that adapter, its place head
included), ``metrics.json`` (val history and test recalls for both stages, with timings); the table:
``visadapt-eval --benchmark vpr --adapters <output-dir>``.

The official protocol (``--recipe selavpr-msls`` / ``selavpr-pitts30k``, files in ``assets/recipes``): an epoch is
``--queries-per-epoch`` randomly drawn training queries (official 5,000; 30,000 on MSLS), mined afresh every
``--mining-refresh-every`` queries (official 1,000: each round draws that many queries, one pool of
``--mining-pool`` random database images, and takes each query's best positive and hardest negatives from it);
Adam at a constant learning rate (``--lr-schedule constant``, no warm-up, no weight decay); validation after every
epoch and early stopping after ``--patience`` epochs without a better re-ranked R@5 (official 3). The Pitts30k
stage starts from the MSLS adapter (``--init-adapter``). Without ``--queries-per-epoch`` an epoch is every usable
training query once, mined once per epoch, each query with its own pool.

The embedded recipe (``mini-places``) mines semi-hard negatives (``--mining semihard``, see
:func:`select_negatives`): with the official hardest negatives its look-alike places collapse the global
descriptors. It also gives the local hinge a margin of 0.1 (``--local-margin``; official 0): the tiny backbone's
patch tokens do not tell look-alike places apart, and with margin 0 the hinge is met within two epochs and the
local head learns nothing (re-ranking then barely beats global retrieval; with 0.1 it adds about 10 points of
R@1, README). It keeps the engine's cosine schedule with a short warm-up.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import visadapt
from visadapt.names import EMBEDDED_MODEL
from visadapt.recipes import available_recipes, load_recipe
from visadapt.train.flags import SetOverride, add_run_flags, finish_run_args, run_options, run_script

if TYPE_CHECKING:
    import torch

    from visadapt.data.places import TripletDataset
from visadapt.tracking import tracker_config, tracking_options
from visadapt.train.preflight import check_data_root, report_error, task_output_dir

# The embedded recipe, sized for 2 CPU cores; every value can be overridden by its flag. The published ones are
# recipe files (assets/recipes/selavpr-*.yaml, read by visadapt.recipes).
EMBEDDED_RECIPES = {
    "mini-places": {"model": EMBEDDED_MODEL, "pretrained": "default", "normalize": "model", "input_size": 32,
                    "epochs": 12, "lr": 3e-4, "weight_decay": 0.0, "batch_size": 16, "warmup_epochs": 0.5,
                    "negatives": 2, "rerank_k": 10, "mining_pool": 200, "mining": "semihard", "local_margin": 0.1,
                    # local margin 0.1 (official 0): the tiny backbone's tokens do not tell family members apart,
                    # and with margin 0 the local hinge was met within 2 epochs, teaching the local head nothing
                    # semi-hard mining: the hardest negatives (look-alikes of the same family) collapsed the
                    # global descriptors (triplet loss stuck at the margin, cosine 0.999 between any two places);
                    # a 96-wide backbone: a smaller local head (official 256 -> 128 channels on 1024)
                    "adapter_settings": {"local_hidden": 128, "local_dim": 64}},
}
# Earlier names of recipes, still accepted: the paper's values are now the official two-stage recipe files.
RECIPE_ALIASES = {"selavpr": "selavpr-msls"}
# Values of the remaining settings when neither a flag nor the recipe gives one.
SETTING_DEFAULTS = {"normalize": "model", "pretrained": "default", "margin": 0.1, "local_weight": 1.0,
                    "train_positive_radius": 10.0, "negative_radius": 25.0, "eval_radius": 25.0, "seed": 0,
                    "lr_schedule": "cosine", "patience": None, "queries_per_epoch": None,
                    "mining_refresh_every": None}
# Settings tied to the backbone: a published recipe run on the embedded world (a smoke test) takes the embedded
# recipe's instead, because the recipe's ViT-L/14 is sized for the recipe's data.
BACKBONE_SETTINGS = ("model", "pretrained", "input_size", "normalize")
MINING_FILE = "mined_epoch_{epoch:04d}.pt"


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    """The command line, then the recipe, then :data:`SETTING_DEFAULTS` (a flag wins over the recipe).

    ``ValueError`` for a bad recipe or an inconsistent protocol (``main`` reports it and exits with 2)."""
    p = argparse.ArgumentParser(prog=prog or "train/vpr.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help=f"a recipe file, or a name: shipped {', '.join(available_recipes('vpr'))}, embedded "
                        f"{', '.join(EMBEDDED_RECIPES)} ('selavpr' is selavpr-msls). Default: mini-places for the "
                        f"generated places (no --data-root, or a folder written by generate_mini_places), "
                        f"selavpr-msls otherwise")
    p.add_argument("--data-root", default=None, help="dataset folder holding images/{train,val,test}; default: the "
                                                     "generated procedural places (mini-places)")
    p.add_argument("--dataset-name", default=None, help="label of the test figures (default: the folder name)")
    p.add_argument("--model", default=None, help="timm ViT name (default: the recipe's)")
    p.add_argument("--pretrained", default=None,
                   help="backbone weights: 'default' (timm's for --model), 'none', a local file, or a hub repo id "
                        "(default: the recipe's, else 'default')")
    p.add_argument("--adapter", default=None, help="registered plugin; a plugin other than selavpr is trained "
                                                   "together with SelaVPR's place head (default: the recipe's)")
    p.add_argument("--adapter-config", default=None, help="YAML file with the plugin's config fields")
    p.add_argument("--set", dest="overrides", action=SetOverride, default=[], metavar="KEY=VALUE",
                   help="override one selavpr config field (value parsed as YAML); repeatable")
    p.add_argument("--normalize", default=None, choices=["model", "imagenet", "none"],
                   help="default: the recipe's, else model")
    for flag, kind in (("input-size", int), ("epochs", int), ("lr", float), ("weight-decay", float),
                       ("batch-size", int), ("warmup-epochs", float), ("negatives", int), ("rerank-k", int),
                       ("mining-pool", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="default: the recipe's")
    p.add_argument("--mining", default=None, choices=["partial", "semihard", "random"],
                   help="partial: hardest negatives among --mining-pool random far images, in descriptor space; "
                        "semihard: the hardest of those that are farther than the positive (FaceNet), the "
                        "hardest overall where too few are; random: random far images (no mining). "
                        "Default: the recipe's")
    p.add_argument("--queries-per-epoch", type=int, default=None,
                   help="training queries per epoch, drawn at random (official 5000; 30000 on MSLS); an epoch ends "
                        "with validation. Default: the recipe's, else every usable training query once")
    p.add_argument("--mining-refresh-every", type=int, default=None, metavar="QUERIES",
                   help="mine afresh every this many queries (official cache_refresh_rate 1000; must divide "
                        "--queries-per-epoch). Default: the recipe's, else once per epoch")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many validations without a better re-ranked R@5 (official 3). Default: "
                        "the recipe's, else no early stopping")
    p.add_argument("--local-weight", type=float, default=None, help="weight of the local MNN loss (0 = global "
                                                                    "only); default: the recipe's, else 1")
    p.add_argument("--margin", type=float, default=None, help="triplet margin of the global loss; default: the "
                                                              "recipe's, else 0.1")
    p.add_argument("--local-margin", type=float, default=None,
                   help="margin of the local MNN hinge (official 0); default: the recipe's")
    p.add_argument("--train-positive-radius", type=float, default=None, help="metres; training positives (10)")
    p.add_argument("--negative-radius", type=float, default=None, help="metres; negatives lie farther away (25)")
    p.add_argument("--eval-radius", type=float, default=None, help="metres; a retrieval is correct within it (25)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=None, help="default: the recipe's, else 0")
    p.add_argument("--data-seed", type=int, default=0, help="mini-places only: seed of the generated world")
    p.add_argument("--output-dir", default=None, help="default: runs/vpr-<dataset>-<adapter>")
    add_run_flags(p, init_adapter=True)
    args = p.parse_args(argv)
    from visadapt.data.places import MANIFEST  # after parsing: --help loads no torch

    embedded = args.data_root is None or (Path(args.data_root) / MANIFEST).is_file()
    args.recipe_notice = None
    if args.recipe is None:  # the embedded world (generated, or a folder written by generate_mini_places)
        args.recipe = "mini-places" if embedded else "selavpr-msls"
        if not embedded:
            args.recipe_notice = ("note: no --recipe: using selavpr-msls, the first stage of the official recipe; "
                                  "for the paper's Pitts30k/Tokyo numbers continue with --recipe selavpr-pitts30k "
                                  "--init-adapter <its adapter.safetensors>")
    elif args.recipe in RECIPE_ALIASES:
        args.recipe_notice = (f"note: --recipe {args.recipe} is now {RECIPE_ALIASES[args.recipe]}, the first stage "
                              f"of the official two-stage recipe (selavpr-msls, then selavpr-pitts30k with "
                              f"--init-adapter)")
        args.recipe = RECIPE_ALIASES[args.recipe]
    args.recipe_file = None
    if args.recipe in EMBEDDED_RECIPES:
        values = dict(EMBEDDED_RECIPES[args.recipe])
        overridden = {}
    else:
        recipe = load_recipe(args.recipe, "vpr")
        args.recipe, args.recipe_file = recipe.name, recipe
        if args.adapter is not None and args.adapter != recipe.adapter:
            raise ValueError(f"--adapter {args.adapter} contradicts recipe {recipe.name!r} (adapter "
                             f"{recipe.adapter}); drop one")
        values = {**recipe.settings, "adapter": recipe.adapter, "adapter_settings": recipe.adapter_config}
        overridden = {}
        if embedded:  # a smoke run of a published recipe: the embedded backbone, the recipe's optimisation
            for key in BACKBONE_SETTINGS:
                if getattr(args, key) is None and key in values:
                    overridden[key] = values[key]
                    values[key] = EMBEDDED_RECIPES["mini-places"][key]
    args.recipe_overridden = overridden
    values.setdefault("adapter", "selavpr")
    finish_run_args(p, args, {**SETTING_DEFAULTS, **values})
    check_protocol(args)
    return args


def check_places_root(data_root: str | os.PathLike) -> Path:
    """``data_root`` if it is a readable folder with the database and query folders of every split (folder
    checks only: the images are listed when the splits are loaded); else ``ValueError`` naming what is
    missing."""
    from visadapt.data.places import LAYOUT

    root = check_data_root(data_root, LAYOUT)
    missing = [f"images/{split}/{kind}" for split in ("train", "val", "test")
               for kind in ("database", "queries") if not (root / "images" / split / kind).is_dir()]
    if missing:
        raise ValueError(f"--data-root {root} lacks {', '.join(missing)}; expected {LAYOUT}")
    return root


def check_protocol(args: argparse.Namespace) -> None:
    """Refuse inconsistent epoch, mining and stopping settings (``ValueError`` naming the flags)."""
    for name in ("queries_per_epoch", "mining_refresh_every", "patience"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be a positive integer")
    if args.mining_refresh_every is not None and args.queries_per_epoch is None:
        raise ValueError("--mining-refresh-every counts queries within an epoch of --queries-per-epoch queries; "
                         "give --queries-per-epoch too (official: 5000 with a refresh every 1000)")
    if args.queries_per_epoch is not None and args.queries_per_epoch % refresh_every(args):
        raise ValueError(f"--queries-per-epoch {args.queries_per_epoch} must be a multiple of "
                         f"--mining-refresh-every {refresh_every(args)} (each mining round draws that many queries)")


def refresh_every(args: argparse.Namespace) -> int | None:
    """Queries per mining round: ``--mining-refresh-every``, else ``--queries-per-epoch`` (one round per epoch);
    ``None`` without ``--queries-per-epoch`` (an epoch is every usable query, mined once)."""
    return args.mining_refresh_every or args.queries_per_epoch


def adapter_settings(args: argparse.Namespace) -> dict:
    """Recipe settings, then ``--adapter-config``, then ``--set key=value`` (later wins)."""
    from visadapt.plugin import config_values

    return config_values(args.adapter_config, args.overrides,
                         base=args.adapter_settings if args.adapter == "selavpr" else None)


def attach_place_adapter(model, args: argparse.Namespace) -> None:
    """SelaVPR itself, or another plugin's adapters plus a SelaVPR place head with no block adapters."""
    settings = adapter_settings(args)
    if args.adapter == "selavpr":
        visadapt.attach(model, "selavpr", settings)
        return
    visadapt.attach(model, args.adapter, settings)
    visadapt.attach(model, "selavpr", dict(args.adapter_settings, serial=False, parallel=False),
                    adapter_name="place")


def select_negatives(d_positive: torch.Tensor, d_negatives: torch.Tensor, count: int, semihard: bool = False
                     ) -> torch.Tensor:
    """Indices of the ``count`` negatives to train on, from descriptor distances: ``d_positive`` ``()`` (the
    query to its positive), ``d_negatives`` ``(P,)`` (the query to each negative of the pool).

    Hard: the ``count`` closest. Semi-hard (FaceNet): the closest of those farther than the positive, then,
    if too few are, the closest of the rest. Why it exists: where negatives are look-alikes the backbone
    cannot yet tell apart (the generated places' families), the hardest ones are closer than the positive for
    most queries, and the cheapest way to lower the triplet loss is then to pull every descriptor together;
    the loss settles at the margin and the descriptors end up nearly identical.
    """
    import torch

    if semihard:
        # unit descriptors are at most 2 apart: +4 sends the negatives closer than the positive behind the rest
        d_negatives = torch.where(d_negatives > d_positive, d_negatives, d_negatives + 4.0)
    return d_negatives.topk(count, largest=False).indices


class HardNegativeMiner:
    """``before_epoch`` hook: re-draws the tuples of an epoch from the current model, deterministically.

    The choice of epoch ``e`` is written to ``<output-dir>/mined_epoch_<e>.pt`` so that a run resumed in the
    middle of that epoch trains on exactly the tuples it had chosen, whatever the model looks like on restart.
    """

    def __init__(self, triplets: TripletDataset, args: argparse.Namespace, output_dir: Path, accelerator) -> None:
        self.triplets, self.args, self.output_dir, self.accelerator = triplets, args, output_dir, accelerator

    def __call__(self, model, epoch: int) -> None:
        import torch

        self.triplets.set_epoch(epoch)
        if self.args.mining == "random":
            return
        path = self.output_dir / MINING_FILE.format(epoch=epoch)
        if path.is_file():
            # tensors only: weights_only refuses any pickled object that is not a tensor or plain container
            # (the default before torch 2.6 would run whatever code a planted file carries)
            mined = torch.load(path, weights_only=True)
            self.triplets.set_mined(mined["positive"], mined["negatives"])
            return
        positive, negatives = self.mine(self.accelerator.unwrap_model(model), epoch)
        self.triplets.set_mined(positive, negatives)
        if self.accelerator.is_main_process:
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save({"positive": positive, "negatives": negatives}, tmp)
            os.replace(tmp, path)

    def mine(self, model, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_mine` under ``torch.no_grad()`` (applied here, not as a decorator: importing the job loads no
        torch)."""
        import torch

        with torch.no_grad():
            return self._mine(model, epoch)

    def _mine(self, model, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from visadapt.eval.vpr import extract_place_features

        split, triplets = self.triplets.split, self.triplets
        db_global, _ = extract_place_features(model, split.database_dataset(), self.args.eval_batch_size,
                                              keep_local=False)
        q_global, _ = extract_place_features(model, split.query_dataset(), self.args.eval_batch_size,
                                             keep_local=False)
        generator = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        positive = torch.empty(len(triplets), dtype=torch.long)
        negatives = torch.empty(len(triplets), self.args.negatives, dtype=torch.long)
        for i, query in enumerate(triplets.query_indices.tolist()):
            candidates = triplets.candidate_positives[i]
            d_pos = torch.cdist(q_global[query][None], db_global[candidates])[0]
            positive[i] = candidates[d_pos.argmin()]
            far = triplets.negative_mask(i).nonzero().flatten()
            pool = far[torch.randperm(far.numel(), generator=generator)[: self.args.mining_pool]]
            d_neg = torch.cdist(q_global[query][None], db_global[pool])[0]
            negatives[i] = pool[select_negatives(d_pos.min(), d_neg, self.args.negatives,
                                                 semihard=self.args.mining == "semihard")]
        return positive, negatives


class QueryRounds:  # a map-style dataset (len, getitem); no torch base class, so --help loads no torch
    """The training tuples of one mining round of the official protocol: ``per_round`` usable queries of
    ``triplets`` drawn without replacement from ``(seed, round)`` alone (so a resumed round draws them again),
    each with the positive and negatives a :class:`RoundMiner` chose. Item ``i`` is ``(images, i)`` with
    ``images`` ``(2 + negatives, 3, H, W)`` stacked as ``[query, positive, negative_1, ...]``, as
    :class:`~visadapt.data.places.TripletDataset` gives them.

    The official ``compute_triplets_partial`` draws ``cache_refresh_rate`` queries per round the same way
    (``np.random.choice(queries_num, cache_refresh_rate, replace=False)``); rounds are drawn independently, so a
    query can come back within an epoch.
    """

    def __init__(self, triplets: TripletDataset, per_round: int, seed: int) -> None:
        if per_round > len(triplets):
            raise ValueError(f"--mining-refresh-every {per_round} (queries per mining round) exceeds the "
                             f"{len(triplets)} usable training queries; lower it (or --queries-per-epoch)")
        self.triplets, self.per_round, self.seed = triplets, per_round, seed
        self.set_round(0)

    def set_round(self, round_index: int) -> None:
        """Draw the queries of ``round_index``, with the geographically nearest positive and no negatives yet."""
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + round_index)
        self.round = round_index
        self.queries = torch.randperm(len(self.triplets), generator=generator)[: self.per_round]
        self.positive = self.triplets.default_positives[self.queries].clone()
        self.negatives = None

    def set_mined(self, positive: torch.Tensor, negatives: torch.Tensor) -> None:
        """Use ``positive`` ``(per_round,)`` and ``negatives`` ``(per_round, negatives)`` database indices, checked
        like :meth:`TripletDataset.set_mined` (a positive within the positive radius, negatives beyond the
        negative radius); ``ValueError`` naming the first bad row."""
        triplets = self.triplets
        if positive.shape != (self.per_round,) or negatives.shape != (self.per_round, triplets.negatives_per_query):
            raise ValueError(f"round {self.round}: expected positive ({self.per_round},) and negatives "
                             f"({self.per_round}, {triplets.negatives_per_query}), got {tuple(positive.shape)} and "
                             f"{tuple(negatives.shape)}")
        for row, usable in enumerate(self.queries.tolist()):
            negs = negatives[row]
            if (not bool((triplets.candidate_positives[usable] == positive[row]).any())
                    or bool(((negs < 0) | (negs >= triplets.split.num_database)).any())
                    or not bool(triplets.negative_mask(usable)[negs].all())):
                raise ValueError(f"round {self.round}: the tuple of usable query {usable} is invalid (positive "
                                 f"{int(positive[row])}, negatives {negs.tolist()}); delete the mined file to mine "
                                 f"again")
        self.positive, self.negatives = positive.long().clone(), negatives.long().clone()

    def __len__(self) -> int:
        return self.per_round

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import torch

        if self.negatives is None:
            raise RuntimeError(f"round {self.round} has not been mined; call a RoundMiner before training on it")
        split = self.triplets.split
        images = [split.load_query(int(self.triplets.query_indices[self.queries[i]])),
                  split.load_database(int(self.positive[i]))]
        images += [split.load_database(int(j)) for j in self.negatives[i]]
        return torch.stack(images), i


class RoundMiner:
    """``before_epoch`` hook of the official protocol (an engine epoch is one mining round): draws the round's
    queries, then, as the official partial mining does, draws ONE pool of ``--mining-pool`` random database images
    for the whole round, extracts global descriptors of the round's queries, their candidate positives and that
    pool only, and gives each query its closest positive and its hardest negatives among the pool images farther
    than the negative radius (``--mining semihard``: :func:`select_negatives`). ``--mining random`` extracts
    nothing: the geographically nearest positive and random pool images beyond the radius (the official random
    mining still picks the positive in descriptor space).

    The choice of round ``r`` is written to ``<output-dir>/mined_epoch_<r>.pt`` so a resumed round trains on the
    tuples it had chosen. ``mined_at`` lists, per mining, how many training queries had been seen before it
    (``round * per_round``): the official cache refresh points.
    """

    def __init__(self, rounds: QueryRounds, args: argparse.Namespace, output_dir: Path | None, accelerator) -> None:
        self.rounds, self.args, self.output_dir, self.accelerator = rounds, args, output_dir, accelerator
        self.mined_at: list[int] = []

    def __call__(self, model, round_index: int) -> None:
        import torch

        self.rounds.set_round(round_index)
        path = None if self.output_dir is None else self.output_dir / MINING_FILE.format(epoch=round_index)
        if path is not None and path.is_file():
            mined = torch.load(path, weights_only=True)  # tensors only, see HardNegativeMiner
            if not torch.equal(mined["queries"], self.rounds.queries):
                raise ValueError(f"{path} was mined for other queries than round {round_index} draws (another "
                                 f"--seed or dataset?); delete it to mine again")
            self.rounds.set_mined(mined["positive"], mined["negatives"])
            return
        self.mined_at.append(round_index * self.rounds.per_round)
        positive, negatives = self.mine(self.accelerator.unwrap_model(model), round_index)
        self.rounds.set_mined(positive, negatives)
        if path is not None and self.accelerator.is_main_process:
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save({"queries": self.rounds.queries, "positive": positive, "negatives": negatives}, tmp)
            os.replace(tmp, path)

    def mine(self, model, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_mine` under ``torch.no_grad()`` (applied here, not as a decorator: importing the job loads no
        torch)."""
        import torch

        with torch.no_grad():
            return self._mine(model, round_index)

    def _mine(self, model, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        from torch.utils.data import Subset

        from visadapt.eval.vpr import extract_place_features

        rounds, triplets, args = self.rounds, self.rounds.triplets, self.args
        split = triplets.split
        generator = torch.Generator().manual_seed(args.seed * 100_003 + round_index + 1)
        pool = torch.randperm(split.num_database, generator=generator)[: args.mining_pool]
        usable = rounds.queries.tolist()
        positives = torch.unique(torch.cat([triplets.candidate_positives[i] for i in usable]))
        database = torch.unique(torch.cat([pool, positives]))
        if args.mining == "random":
            features = queries = None
        else:
            features, _ = extract_place_features(model, Subset(split.database_dataset(), database.tolist()),
                                                 args.eval_batch_size, keep_local=False)
            queries, _ = extract_place_features(
                model, Subset(split.query_dataset(), triplets.query_indices[rounds.queries].tolist()),
                args.eval_batch_size, keep_local=False)
        row_of = {int(index): row for row, index in enumerate(database.tolist())}
        positive = torch.empty(len(usable), dtype=torch.long)
        negatives = torch.empty(len(usable), args.negatives, dtype=torch.long)
        for row, i in enumerate(usable):
            far = pool[triplets.negative_mask(i)[pool]]
            if far.numel() < args.negatives:
                raise ValueError(f"round {round_index}: only {far.numel()} of the {pool.numel()} pooled database "
                                 f"images lie beyond {args.negative_radius} m of usable query {i}; raise "
                                 f"--mining-pool")
            candidates = triplets.candidate_positives[i]
            if features is None:
                positive[row] = triplets.default_positives[i]
                negatives[row] = far[torch.randperm(far.numel(), generator=generator)[: args.negatives]]
                continue
            query = queries[row][None]
            d_pos = torch.cdist(query, features[[row_of[int(c)] for c in candidates]])[0]
            positive[row] = candidates[d_pos.argmin()]
            d_neg = torch.cdist(query, features[[row_of[int(n)] for n in far]])[0]
            negatives[row] = far[select_negatives(d_pos.min(), d_neg, args.negatives,
                                                  semihard=args.mining == "semihard")]
        return positive, negatives


def evaluate_places(*args, **kwargs) -> dict:
    """:func:`visadapt.eval.vpr.evaluate_places`, imported on the first call (the job's ``--help`` loads no torch);
    a module attribute, so that a test can stand in for it."""
    from visadapt.eval.vpr import evaluate_places as evaluate

    return evaluate(*args, **kwargs)


def train(args: argparse.Namespace, data_root: Path, out: Path) -> dict:
    from visadapt import api
    from visadapt.backbones import create_backbone
    from visadapt.data import resolve_normalization
    from visadapt.data.places import PlaceSplit, TripletDataset
    from visadapt.data.transforms import vtab_transform
    from visadapt.engine import TrainConfig, fit, init_adapter_from_file, make_accelerator, seed_everything
    from visadapt.io import TRAIN_METADATA, write_json_atomic
    from visadapt.plugins.selavpr import BACKBONE_ARGUMENTS, PlaceRecognitionModel, SelaVPRLoss

    per_round = refresh_every(args)
    # The official protocol as engine epochs: one engine epoch per mining round, validation (and early stopping)
    # every rounds_per_epoch of them, i.e. after every official epoch of --queries-per-epoch queries.
    rounds_per_epoch = 1 if per_round is None else args.queries_per_epoch // per_round
    config = TrainConfig(epochs=args.epochs * rounds_per_epoch, lr=args.lr, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, warmup_epochs=args.warmup_epochs * rounds_per_epoch,
                         eval_every=rounds_per_epoch, patience=args.patience, seed=args.seed,
                         progress=not args.no_progress, **run_options(args))
    accelerator = make_accelerator(out, precision=args.precision, **tracking_options(args))
    seed_everything(args.seed)
    # the pretrained grid, any input size: SelaVPR interpolates the position embedding per forward
    backbone = create_backbone(args.model, args.pretrained, num_classes=0, **BACKBONE_ARGUMENTS)
    transform = vtab_transform(args.input_size, resolve_normalization(args.normalize, backbone))
    splits = {name: PlaceSplit(data_root, name, transform) for name in ("train", "val", "test")}
    triplets = TripletDataset(splits["train"], positive_radius_m=args.train_positive_radius,
                              negative_radius_m=args.negative_radius, negatives_per_query=args.negatives,
                              seed=args.seed)
    if triplets.dropped:
        accelerator.print(f"note: {triplets.dropped} training queries have no database image within "
                          f"{args.train_positive_radius} m and are not used")
    if per_round is None:
        train_set, miner = triplets, HardNegativeMiner(triplets, args, out, accelerator)
    else:
        train_set = QueryRounds(triplets, per_round, args.seed)
        miner = RoundMiner(train_set, args, out, accelerator)
    attach_place_adapter(backbone, args)
    init = None
    if args.init_adapter:
        init_adapter_from_file(backbone, args.init_adapter, "default")
        init = {"file": str(args.init_adapter),
                "sha256": hashlib.sha256(Path(args.init_adapter).read_bytes()).hexdigest()}
        if args.adapter != "selavpr":
            accelerator.print(f"note: --init-adapter filled the {args.adapter} adapter; SelaVPR's place head "
                              f"(adapter 'place') starts fresh")
    model = PlaceRecognitionModel(backbone, "default" if args.adapter == "selavpr" else "place")
    counts = api.summary(backbone)
    name = args.dataset_name or data_root.name
    run = {"benchmark": "vpr", "dataset": name, "data_root": str(data_root), "model": args.model,
           "pretrained": args.pretrained, "normalize": args.normalize, "input_size": args.input_size,
           "recipe": args.recipe, "data_seed": args.data_seed, "seed": args.seed, "adapter": args.adapter,
           "rerank_k": args.rerank_k}
    accelerator.init_trackers("vpr", config=tracker_config({**run, **vars(config)}))
    accelerator.print(f"[vpr] {args.adapter} on {args.model}: {counts.trainable_params:,} trainable of "
                      f"{counts.total_params:,} params; {len(triplets)} usable training queries, "
                      f"{len(train_set)} tuples per {'epoch' if per_round is None else 'mining round'}, "
                      f"{len(splits['val'].query_paths)} val queries")

    best_json = out / "best.json"

    def best_file(adapter_name: str) -> Path:
        return out / f"best_{adapter_name}.safetensors"

    def evaluator(prepared, accelerator) -> dict[str, float]:
        result = evaluate_places(accelerator.unwrap_model(prepared), splits["val"], rerank_k=args.rerank_k,
                                 positive_radius_m=args.eval_radius, batch_size=args.eval_batch_size)
        score = result["reranked"]["5"]
        best = json.loads(best_json.read_text())["R@5"] if best_json.is_file() else -1.0
        if score > best and accelerator.is_main_process:
            for adapter_name in api.records(backbone):
                visadapt.save_adapter(backbone, best_file(adapter_name), adapter_name,
                                      metadata={TRAIN_METADATA: json.dumps(run, sort_keys=True)})
            write_json_atomic(best_json, {"R@5": score})
        accelerator.wait_for_everyone()
        return {"R@1": result["reranked"]["1"], "R@5": score, "R@10": result["reranked"]["10"],
                "R@1_global": result["global"]["1"], "R@5_global": result["global"]["5"],
                "samples": result["queries"]}

    result = fit(model, train_set, None, config, accelerator=accelerator, output_dir=out, resume=args.resume,
                 loss_fn=SelaVPRLoss(margin=args.margin, local_weight=args.local_weight,
                                     local_margin=args.local_margin), evaluator=evaluator,
                 metric="R@5", before_epoch=miner, log_prefix="[vpr] ")
    # Test the val-selected adapter, as the paper does.
    bare = accelerator.unwrap_model(model)
    for adapter_name in list(api.records(backbone)):
        visadapt.detach(backbone, adapter_name)
        visadapt.load_adapter(backbone, best_file(adapter_name), adapter_name)
    test = evaluate_places(bare, splits["test"], rerank_k=args.rerank_k, positive_radius_m=args.eval_radius,
                           batch_size=args.eval_batch_size)
    metrics = {}
    if accelerator.is_main_process:
        for adapter_name in api.records(backbone):
            target = "adapter.safetensors" if adapter_name == "default" else f"adapter_{adapter_name}.safetensors"
            shutil.copyfile(best_file(adapter_name), out / target)
        metrics = {
            **run, "adapter_config": {n: r.config.to_dict() for n, r in api.records(backbone).items()},
            "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "negatives": args.negatives,
            "mining": args.mining, "mining_pool": args.mining_pool, "local_weight": args.local_weight,
            "local_margin": args.local_margin, "margin": args.margin, "weight_decay": args.weight_decay,
            "warmup_epochs": args.warmup_epochs, "lr_schedule": config.lr_schedule,
            "queries_per_epoch": args.queries_per_epoch, "mining_refresh_every": args.mining_refresh_every,
            "mining_rounds_per_epoch": rounds_per_epoch, "patience": args.patience,
            "stopped_early": result.stopped_early, "init_adapter": init,
            "recipe_details": None if args.recipe_file is None else {
                "file": str(args.recipe_file.path), "sha256": args.recipe_file.sha256,
                "overridden": args.recipe_overridden},
            # history entries count engine epochs, i.e. mining rounds: validation every mining_rounds_per_epoch
            "val_best_R@5": result.score_best, "best_epoch": result.best_epoch,
            "test": {name: test},
            "trainable_params": counts.trainable_params, "adapter_params": counts.adapter_params,
            "adapter_bytes": (out / "adapter.safetensors").stat().st_size if (out / "adapter.safetensors").exists()
            else None,
            "wall_time_s": round(result.wall_time_s, 2), "resumed_from": result.resumed_from,
            "num_processes": accelerator.num_processes, "history": result.history,
            "visadapt_version": visadapt.__version__,
        }
        write_json_atomic(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # The cheap checks come first, each one error line and exit 2: flags, recipe, adapter config, the header of
    # --init-adapter, the backbone name and a --pretrained path, the split folders of the data folder, an output
    # folder holding a run. No model is built and the hub is not contacted before they pass.
    try:
        args = parse_args(argv, prog)
        from visadapt.backbones import check_backbone_choice
        from visadapt.engine import check_init_adapter

        visadapt.get_plugin(args.adapter)().Config.from_dict(adapter_settings(args))  # fail before any work
        recipe = args.recipe_file
        if recipe is not None and recipe.starts_from and not args.init_adapter:
            raise ValueError(f"recipe {recipe.name!r} is a second stage: it starts from {recipe.starts_from}; "
                             f"pass that run's adapter.safetensors as --init-adapter")
        if args.init_adapter:  # the header only: the file's plugin and config against this run's
            check_init_adapter(args.init_adapter, args.adapter, adapter_settings(args))
        check_backbone_choice(args.model, args.pretrained)
        if args.data_root is not None:
            check_places_root(args.data_root)
    except (ValueError, KeyError, OSError) as err:  # InitAdapterError and DatasetError are ValueErrors too
        return report_error(err)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from visadapt.backbones import BackboneWeightsError
    from visadapt.data.errors import DatasetError
    from visadapt.data.places import generate_mini_places

    if args.recipe_notice:
        print(args.recipe_notice)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if args.data_root is None:
        with state.main_process_first():  # one process generates, the others then find it complete
            args.data_root = str(generate_mini_places(seed=args.data_seed))
    data_root = Path(args.data_root)
    out = Path(args.output_dir or f"runs/vpr-{args.dataset_name or data_root.name}-{args.adapter}")
    try:
        with task_output_dir(out, resume=args.resume, overwrite=args.overwrite, state=state):
            metrics = train(args, data_root, out)
    # what the cheap checks cannot see: backbone weights that cannot be had, images without coordinates
    except (FileExistsError, BackboneWeightsError, DatasetError) as err:
        return report_error(err, state)
    if state.is_main_process:
        name = next(iter(metrics["test"]))
        test = metrics["test"][name]
        print(f"\n[{name} test] {test['queries']} queries, {test['database']} database images")
        for stage in ("global", "reranked"):
            print(f"  {stage:<9} R@1 {test[stage]['1']:5.1f}  R@5 {test[stage]['5']:5.1f}  R@10 {test[stage]['10']:5.1f}")
        print(f"  re-ranking made {test['top1_fixed']} first answers right and {test['top1_broken']} wrong")
        print(f"table: visadapt-eval --benchmark vpr --adapters {out}")
    return 0


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    sys.exit(run_script(lambda: main(prog=module_prog(__spec__))))
