"""``visadapt-data verify``: check a VTAB-1k, FGVC or mini-VTAB folder before training, and write its manifest.

For every task folder it checks, and reports ALL defects in one run (each with file and line):

* split files present (VTAB-1k: ``train800/val200/train800val200/test.txt``; FGVC: ``train/val/test.json``)
  and well-formed (parsed by the loaders' own readers, :func:`visadapt.data.vtab.read_image_list` and
  :func:`visadapt.data.fgvc.read_split_json`, in their collect-every-problem mode);
* split sizes as the protocol expects (VTAB-1k 800 / 200 / 1000, the test size where the protocol notes
  confirm it; mini-VTAB the sizes its generator recorded; FGVC the VPT sizes where confirmed);
* labels inside the task's class count (FGVC: the distinct class ids number exactly the class count);
* every listed image path stays inside the data root (no absolute path, no ``..`` climbing out);
* every listed image exists and decodes (PIL ``verify`` then the loaders' full decode, so truncated files and
  decompression bombs fail);
* no image in both a training and an evaluation split, by path and by content (sha256 of the file bytes).

The manifest (JSON) records per task and split the sha256 of the split file, the image count, the count
per class and a digest of the listed images' contents; :meth:`VerifyReport.manifest_sha256` is the one
hash a training run records. The manifest holds no absolute paths or times, so the same data gives the
same hash on every machine.

Exit codes of the CLI: 0 clean, 1 problems found, 2 usage error (unknown benchmark or task, no such root,
manifest not writable).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from visadapt.data import fgvc, procedural, vtab
from visadapt.data.errors import DatasetError
from visadapt.data.tasks import VTAB1K_TEST_SIZES, TaskInfo, benchmark_tasks, resolve_tasks
from visadapt.progress import Progress, add_no_progress_flag, apply_no_progress_flag

BENCHMARKS = ("vtab", "fgvc", "mini-vtab")
MANIFEST_NAME = "visadapt_data_manifest.json"
MANIFEST_FORMAT = "visadapt-data-manifest/1"

# VTAB-1k sizes fixed by the protocol (NOAH get_vtab1k.py); the union is a re-dump of train800 + val200.
VTAB_SPLIT_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
# Full official test splits, as pinned by the benchmark's reference code (see visadapt.data.tasks).
VTAB_TEST_SIZES = VTAB1K_TEST_SIZES
# VPT FGVC splits: only CUB is independently confirmed in the protocol notes.
FGVC_SPLIT_SIZES = {"cub": {"train": 5_394, "val": 600, "test": 5_794}}

# Pairs (training side, evaluation side) that must share no image: the "tune" protocol trains on the first
# and evaluates on the second of (train800, val200); "final" trains on train800val200 and tests on test.
DISJOINT_SPLITS = {
    "image-list": (("train800", "val200"), ("train800", "test"), ("val200", "test"), ("train800val200", "test")),
    "fgvc": (("train", "val"), ("train", "test"), ("val", "test")),
}


class Problem(NamedTuple):
    """One defect: the file it is in, the 1-based line (``None`` for the whole file) and what is wrong."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class _Entry(NamedTuple):
    """One listed image: where it is listed (split file and line) and what it says."""

    path: Path
    label: int
    file: Path
    line: int | None


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify_benchmark` found.

    Attributes:
        benchmark: ``vtab``, ``fgvc`` or ``mini-vtab``.
        root: the data root that was checked.
        problems: every defect, in task and split order.
        manifest: the JSON-able manifest (see the module docstring).
        absent_tasks: tasks of the benchmark with no folder under ``root`` (only when all tasks were asked
            for implicitly; a task named explicitly and absent is a problem).
    """

    benchmark: str
    root: Path
    problems: list[Problem]
    manifest: dict
    absent_tasks: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def manifest_sha256(self) -> str:
        """sha256 of the manifest's canonical JSON (sorted keys, no whitespace): what training records."""
        canonical = json.dumps(self.manifest, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def write_manifest(self, path: str | os.PathLike) -> Path:
        """Write the manifest (with its own hash under ``manifest_sha256``) to ``path``; returns ``path``."""
        path = Path(path)
        path.write_text(json.dumps({**self.manifest, "manifest_sha256": self.manifest_sha256()}, indent=1) + "\n")
        return path


def _sha256_file(path: Path) -> str:
    return _sha256_stream(path)  # a split file may be up to vtab.MAX_SPLIT_FILE_BYTES: not read whole


def _image_problem(path: Path) -> str | None:
    """``None`` if ``path`` decodes as an image, else why not. ``verify`` checks the structure, and the loaders'
    own full decode (:func:`visadapt.data.vtab.decode_rgb`: every exception, decompression bombs included)
    catches truncated pixel data that ``verify`` lets through."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
    except Exception as err:  # noqa: BLE001 -- PIL parsers raise many types on crafted files
        return vtab._decode_failure(path, err)
    try:
        vtab.decode_rgb(path, "")
    except DatasetError as err:
        return vtab._decode_failure(path, err.__cause__ or err)
    return None


def _sha256_stream(path: Path) -> str:
    """sha256 of a file read in 1 MiB pieces (a listed "image" may be any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(2**20):
            digest.update(piece)
    return digest.hexdigest()


def _line_of(origin: str) -> int:
    """The line number of an image-list origin ``"<split file>:<line>"`` (see ``ImageListDataset.origins``)."""
    return int(origin.rsplit(":", 1)[1])


def _expected_image_list_sizes(benchmark: str, root: Path, info: TaskInfo) -> dict[str, int]:
    if benchmark == "mini-vtab":
        # The generator records the sizes it was asked for; the defaults are its SPLIT_SIZES.
        sizes = dict(procedural.SPLIT_SIZES)
        recorded = root / procedural.MANIFEST
        if recorded.is_file():
            try:
                sizes = dict(json.loads(recorded.read_text())["split_sizes"])
            except (ValueError, KeyError, TypeError):
                pass  # a broken generator manifest: the defaults apply, and wrong sizes are then reported
        sizes["train800val200"] = sizes.get("train800", 0) + sizes.get("val200", 0)
        return sizes
    sizes = dict(VTAB_SPLIT_SIZES)
    if info.name in VTAB_TEST_SIZES:
        sizes["test"] = VTAB_TEST_SIZES[info.name]
    return sizes


def _read_image_list_task(benchmark: str, root: Path, task_dir: Path, info: TaskInfo,
                          problems: list[Problem]) -> tuple[dict[str, list[_Entry]], dict[str, Path]]:
    """Parse every split file of one VTAB-1k / mini-VTAB task, collecting defects into ``problems``."""
    splits: dict[str, list[_Entry]] = {}
    files: dict[str, Path] = {}
    for split in vtab.SPLITS:
        list_file = task_dir / f"{split}.txt"
        if not list_file.exists():  # a FIFO or device under the name: read_image_list reports it as such
            found = sorted(p.name for p in task_dir.glob("*.txt"))
            problems.append(Problem(str(list_file), None, (
                f"split file does not exist (found: {', '.join(found) or 'no .txt files'}); expected "
                f"{', '.join(s + '.txt' for s in vtab.SPLITS)} with lines '<relative image path> <integer label>'. "
                f"{vtab._layout_fix(benchmark, task_dir)}")))
            continue
        raw: list = []
        samples, origins = vtab.read_image_list(list_file, task_dir, info, problems=raw, root=task_dir.parent)
        problems.extend(Problem(str(f), line, msg) for f, line, msg in raw)
        if not samples and raw:  # refused or unusable as a whole (reported above): nothing to hash or count
            continue
        files[split] = list_file
        splits[split] = [_Entry(path, label, list_file, _line_of(origin))
                         for (path, label), origin in zip(samples, origins)]
    expected = _expected_image_list_sizes(benchmark, root, info)
    for split, entries in splits.items():
        want = expected.get(split)
        # A file with unparsable lines was already reported line by line; its size would only repeat that.
        if want is not None and len(entries) != want and not any(p.file == str(files[split]) for p in problems):
            problems.append(Problem(str(files[split]), None, (
                f"lists {len(entries)} images; the {benchmark} protocol expects {want} for {split} of "
                f"{info.name!r}. The folder is incomplete or was written by another protocol; re-create it")))
    if {"train800", "val200", "train800val200"} <= splits.keys():
        union = Counter(e.label for e in splits["train800"] + splits["val200"])
        listed = Counter(e.label for e in splits["train800val200"])
        if union != listed:
            diff = sorted(set(union) ^ set(listed) | {k for k in union if union[k] != listed[k]})
            problems.append(Problem(str(files["train800val200"]), None, (
                "is not the union of train800 and val200: the per-class counts differ for classes "
                f"{diff[:10]}{' ...' if len(diff) > 10 else ''}. Re-create the split files together")))
    return splits, files


def _read_fgvc_task(task_dir: Path, info: TaskInfo,
                    problems: list[Problem]) -> tuple[dict[str, list[_Entry]], dict[str, Path]]:
    """Parse the VPT split JSONs of one FGVC dataset, collecting defects into ``problems``."""
    tables: dict[str, dict[str, int]] = {}
    files: dict[str, Path] = {}
    texts: dict[str, str] = {}
    for split in fgvc.SPLITS:
        path = task_dir / f"{split}.json"
        if not path.is_file():
            found = sorted(p.name for p in task_dir.glob("*.json"))
            problems.append(Problem(str(path), None, (
                f"split file does not exist (found: {', '.join(found) or 'no .json files'}); expected the VPT "
                f"layout {', '.join(s + '.json' for s in fgvc.SPLITS)}. {fgvc._FIX}")))
            continue
        raw: list = []
        tables[split] = fgvc.read_split_json(path, problems=raw, image_dir=task_dir / fgvc.IMAGE_DIRS[info.name],
                                             root=task_dir.parent)
        problems.extend(Problem(str(f), line, msg) for f, line, msg in raw)
        files[split] = path
        texts[split] = path.read_text(encoding="utf-8", errors="replace")
    remap = fgvc.class_id_map(list(tables.values()))
    if tables and len(remap) != info.num_classes:
        problems.append(Problem(", ".join(str(f) for f in files.values()), None, (
            f"together hold {len(remap)} distinct class ids but {info.name!r} has {info.num_classes} classes; "
            f"the files belong to another dataset or are incomplete. {fgvc._FIX}")))
    image_dir = task_dir / fgvc.IMAGE_DIRS[info.name]
    splits = {split: [_Entry(image_dir / key, remap[raw_id], files[split], fgvc._key_line(texts[split], key))
                      for key, raw_id in table.items()]
              for split, table in tables.items()}
    for split, want in FGVC_SPLIT_SIZES.get(info.name, {}).items():
        if split in splits and len(splits[split]) != want:
            problems.append(Problem(str(files[split]), None, (
                f"lists {len(splits[split])} images; the VPT split of {info.name!r} has {want}. "
                f"The file is incomplete or from another split. {fgvc._FIX}")))
    return splits, files


def _check_images(splits: dict[str, list[_Entry]], check_images: bool,
                  problems: list[Problem], bar: Progress | None = None) -> dict[Path, str | None]:
    """Existence (always) and decoding + content hash (``check_images``) of every listed image, each file
    read once, each entry counted on ``bar``. Returns ``{path: sha256 or None}`` for the images that exist."""
    hashes: dict[Path, str | None] = {}
    unreadable: set[Path] = set()
    missing: set[Path] = set()
    for entries in splits.values():
        for entry in entries:
            if bar is not None:
                bar.update(1)
            if entry.path in hashes or entry.path in missing:
                if entry.path in missing or entry.path in unreadable:
                    what = "does not exist" if entry.path in missing else "cannot be read (see above)"
                    problems.append(Problem(str(entry.file), entry.line, f"image {entry.path} {what}"))
                continue
            if not entry.path.is_file():
                missing.add(entry.path)
                problems.append(Problem(str(entry.file), entry.line, (
                    f"image {entry.path} does not exist; paths are relative to the task folder. Restore the "
                    "image or remove the entry")))
                continue
            if not check_images:
                hashes[entry.path] = None
                continue
            hashes[entry.path] = _sha256_stream(entry.path)
            why = _image_problem(entry.path)
            if why is not None:
                unreadable.add(entry.path)
                problems.append(Problem(str(entry.file), entry.line, f"cannot read image {entry.path}: {why}"))
    return hashes


def _check_overlap(splits: dict[str, list[_Entry]], pairs: Sequence[tuple[str, str]],
                   hashes: dict[Path, str | None], problems: list[Problem]) -> None:
    """Report every evaluation entry whose image (same path, or same bytes under another name) is also in the
    paired training split."""
    for train_split, eval_split in pairs:
        if train_split not in splits or eval_split not in splits:
            continue
        by_path = {os.path.normpath(e.path): e for e in splits[train_split]}
        by_hash = {hashes[e.path]: e for e in splits[train_split] if hashes.get(e.path)}
        for entry in splits[eval_split]:
            same = by_path.get(os.path.normpath(entry.path))
            if same is not None:
                problems.append(Problem(str(entry.file), entry.line, (
                    f"image {entry.path} of {eval_split} is also in {train_split} ({same.file}:{same.line}): "
                    "the evaluation would test on training data. Remove it from one of the splits")))
                continue
            digest = hashes.get(entry.path)
            same = by_hash.get(digest) if digest else None
            if same is not None:
                problems.append(Problem(str(entry.file), entry.line, (
                    f"image {entry.path} of {eval_split} has the same content (sha256 {digest[:12]}...) as "
                    f"{same.path} in {train_split} ({same.file}:{same.line}): the evaluation would test on "
                    "training data. Remove the duplicate from one of the splits")))


def _split_manifest(entries: list[_Entry], file: Path, num_classes: int,
                    hashes: dict[Path, str | None], check_images: bool) -> dict:
    counts = [0] * num_classes
    for entry in entries:
        if 0 <= entry.label < num_classes:
            counts[entry.label] += 1
    out = {"file": file.name, "sha256": _sha256_file(file), "images": len(entries), "class_counts": counts}
    if check_images:
        # Digest of the listed images' bytes in listing order (a missing image counts as the empty string).
        digest = hashlib.sha256("\n".join(hashes.get(e.path) or "" for e in entries).encode()).hexdigest()
        out["images_sha256"] = digest
    return out


def verify_benchmark(root: str | os.PathLike, benchmark: str, tasks: Sequence[str] | str | None = None,
                     check_images: bool = True, progress: bool = False) -> VerifyReport:
    """Check every task folder of ``benchmark`` under ``root`` and build the manifest.

    Args:
        root: the folder holding the task folders (``<root>/cifar/train800.txt``, ``<root>/cub/train.json``).
        benchmark: ``vtab``, ``fgvc`` or ``mini-vtab``.
        tasks: task names or aliases (or ``"all"``); ``None`` checks every task whose folder exists under
            ``root`` (mini-VTAB: all seven must exist) and lists the absent ones in ``absent_tasks``.
        check_images: decode and hash every image (slow on the full benchmark); ``False`` still checks that
            every listed image exists and that no path is in both a training and an evaluation split.
        progress: show the tasks checked, and each task's images (:mod:`visadapt.progress`); the CLI does.

    Raises:
        DatasetError: ``root`` is not a directory.
        ValueError: unknown benchmark or task name.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    root = Path(root)
    if not root.is_dir():
        fix = (" Generate it with visadapt.data.procedural.generate_mini_vtab()" if benchmark == "mini-vtab"
               else " Pass the folder that holds the task folders")
        raise DatasetError(f"data root {root} does not exist or is not a directory.{fix}")
    explicit = tasks is not None or benchmark == "mini-vtab"
    infos = resolve_tasks(benchmark, tasks) if tasks is not None else list(benchmark_tasks(benchmark).values())
    problems: list[Problem] = []
    absent: list[str] = []
    task_manifests: dict[str, dict] = {}
    with Progress(total=len(infos), desc="visadapt-data verify", unit="tasks", enabled=progress) as tasks_done:
        for info in infos:
            try:
                task_dir = vtab.find_task_dir(root, info)
            except DatasetError as err:
                if explicit:
                    problems.append(Problem(str(root / info.name), None, str(err)))
                else:
                    absent.append(info.name)
                tasks_done.update(1)
                continue
            if benchmark == "fgvc":
                splits, files = _read_fgvc_task(task_dir, info, problems)
                pairs = DISJOINT_SPLITS["fgvc"]
            else:
                splits, files = _read_image_list_task(benchmark, root, task_dir, info, problems)
                pairs = DISJOINT_SPLITS["image-list"]
            listed_count = sum(len(listed) for listed in splits.values())
            with Progress(total=listed_count, desc=f"{info.name} images", unit="images", leave=False,
                          enabled=progress) as images:
                hashes = _check_images(splits, check_images, problems, images)
            _check_overlap(splits, pairs, hashes, problems)
            task_manifests[info.name] = {
                "dir": task_dir.name,
                "num_classes": info.num_classes,
                "image_count": len({e.path for entries in splits.values() for e in entries}),
                "splits": {split: _split_manifest(entries, files[split], info.num_classes, hashes, check_images)
                           for split, entries in splits.items()},
            }
            tasks_done.update(1)
    if not task_manifests and not problems:
        every = ", ".join(n for info in infos for n in info.names)
        problems.append(Problem(str(root), None, (
            f"holds no {benchmark} task folder (looked for {every}); pass the folder that holds the task "
            "folders")))
    manifest = {
        "format": MANIFEST_FORMAT,
        "benchmark": benchmark,
        "images_checked": check_images,
        "problem_count": len(problems),
        "image_count": sum(t["image_count"] for t in task_manifests.values()),
        "tasks": task_manifests,
    }
    return VerifyReport(benchmark, root, problems, manifest, absent)


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.root is None:
        if args.benchmark != "mini-vtab":
            print(f"visadapt-data verify: error: ROOT is required for --benchmark {args.benchmark} (only the "
                  "embedded mini-vtab has a default folder)", file=sys.stderr)
            return 2
        args.root = procedural.default_data_root()
    try:
        report = verify_benchmark(args.root, args.benchmark, args.tasks, check_images=not args.no_images,
                                  progress=True)
    except (DatasetError, ValueError) as err:
        print(f"visadapt-data verify: error: {err}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(problem)
    manifest_path = Path(args.manifest) if args.manifest else report.root / MANIFEST_NAME
    try:
        report.write_manifest(manifest_path)
    except OSError as err:
        print(f"visadapt-data verify: error: cannot write the manifest to {manifest_path} ({err}); pass "
              "--manifest PATH to put it elsewhere", file=sys.stderr)
        return 2
    tasks = report.manifest["tasks"]
    if report.absent_tasks:
        print(f"not present under {report.root} (not checked): {', '.join(report.absent_tasks)}")
    verdict = (f"{len(report.problems)} problem(s) found" if report.problems else "clean")
    print(f"{report.benchmark}: {verdict}; {len(tasks)} task(s), {report.manifest['image_count']} images"
          f"{'' if report.manifest['images_checked'] else ' (not decoded: --no-images)'}; manifest "
          f"{manifest_path} (sha256 {report.manifest_sha256()})")
    return 1 if report.problems else 0


def main(argv: list[str] | None = None) -> int:
    """``visadapt-data verify ROOT --benchmark vtab|fgvc|mini-vtab [--tasks ...] [--no-images] [--manifest F]``."""
    parser = argparse.ArgumentParser(prog="visadapt-data", description="Benchmark data tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check a benchmark folder (split files, sizes, labels, images, leakage) "
                                      "and write its manifest; exit 0 clean, 1 problems, 2 usage error")
    p.add_argument("root", nargs="?", help="folder holding the task folders (default for mini-vtab: the "
                                           "generated folder, visadapt.data.procedural.default_data_root())")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--tasks", nargs="+", help="task names or aliases (default: every task folder present)")
    p.add_argument("--no-images", action="store_true",
                   help="do not decode or hash the images (existence and path overlap are still checked)")
    p.add_argument("--manifest", help=f"where to write the manifest (default: ROOT/{MANIFEST_NAME})")
    add_no_progress_flag(p)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad usage, 0 on --help; return it like every other exit
        return int(exit_.code or 0)
    apply_no_progress_flag(args)
    return _cmd_verify(args)


if __name__ == "__main__":
    sys.exit(main())
