"""Hostile data folders: crafted split files, crafted images, concurrent cache builders and concurrent embedded-data
generation, a cache deleted or cut while in use.

Each case asserts a clear error type (:class:`DatasetError`) whose message names the input (file and line, or
image), and that no partial file is left behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_data import png_claiming, small_fgvc_table, write_fgvc_task, write_image, write_vtab_task

from visadapt.data import DatasetError, fgvc, vtab
from visadapt.data.cache import load_cached_split
from visadapt.data.tasks import VTAB_TASKS
from visadapt.data.transforms import vtab_transform
from visadapt.data.verify import verify_benchmark

# ------------------------------------------------------------------------------------- paths in split files


def _outside_image(tmp_path: Path) -> Path:
    """An image that exists OUTSIDE the data root (so a loader that followed the path would find it)."""
    secret = tmp_path / "outside" / "secret.jpg"
    write_image(secret)
    return secret


@pytest.mark.parametrize("listed", ["../../outside/secret.jpg", "{secret}", "images/../../../outside/secret.jpg",
                                    "./../../outside/secret.jpg"])
def test_split_file_path_leaving_the_data_root_is_an_error_naming_file_and_line(tmp_path, listed):
    root = tmp_path / "data"
    task_dir = write_vtab_task(root, "dtd")
    secret = _outside_image(tmp_path)
    listed = listed.format(secret=secret)
    list_file = task_dir / "train800.txt"
    list_file.write_text(list_file.read_text() + f"{listed} 1\n")  # line 4
    with pytest.raises(DatasetError) as info:
        vtab.load_split(root, "vtab", "dtd", "train800")
    message = str(info.value)
    assert f"{list_file}:4:" in message and repr(listed) in message and "data root" in message
    # verify reports it with file and line too, and keeps checking the rest
    report = verify_benchmark(root, "vtab", tasks=["dtd"], check_images=False)
    hits = [p for p in report.problems if p.file == str(list_file) and p.line == 4]
    assert len(hits) == 1 and "data root" in hits[0].message


def test_paths_inside_the_data_root_are_accepted_even_through_dotdot(tmp_path):
    """The rule is about the data root, not the task folder: ``../<other task>/...`` stays inside and loads."""
    root = tmp_path / "data"
    task_dir = write_vtab_task(root, "dtd")
    write_image(root / "shared" / "a.jpg")
    list_file = task_dir / "train800.txt"
    list_file.write_text(list_file.read_text() + "../shared/a.jpg 1\n")
    dataset = vtab.load_split(root, "vtab", "dtd", "train800")
    assert dataset.samples[-1] == (task_dir / "../shared/a.jpg", 1)


def test_symlinks_inside_the_data_root_are_followed(tmp_path):
    """Documented rule: symlinks are the folder owner's (a dataset linked from another disk, a huggingface_hub
    snapshot whose files link into blobs/ outside it), so a symlinked image is read, not refused."""
    root = tmp_path / "data"
    task_dir = write_vtab_task(root, "dtd")
    secret = _outside_image(tmp_path)
    os.symlink(secret, task_dir / "images" / "linked.jpg")
    list_file = task_dir / "train800.txt"
    list_file.write_text(list_file.read_text() + "images/linked.jpg 1\n")
    dataset = vtab.load_split(root, "vtab", "dtd", "train800")
    assert dataset[len(dataset) - 1][0].size == Image.open(secret).size


def test_fgvc_key_leaving_the_data_root_is_an_error_naming_file_and_line(tmp_path, monkeypatch):
    small_fgvc_table(monkeypatch)
    root = tmp_path / "data"
    _outside_image(tmp_path)
    write_fgvc_task(root, "StanfordDogs", "Images", {"train": {"a/1.jpg": 1, "b/2.jpg": 2},
                                                      "val": {"a/3.jpg": 1}, "test": {"c/4.jpg": 3}})
    train = root / "StanfordDogs" / "train.json"
    train.write_text('{"a/1.jpg": 1,\n "../../../outside/secret.jpg": 2}')
    with pytest.raises(DatasetError) as info:
        fgvc.load_split(root, "stanford_dogs", "train")
    assert f"{train}:2:" in str(info.value) and "outside/secret.jpg" in str(info.value)
    report = verify_benchmark(root, "fgvc", tasks=["stanford_dogs"], check_images=False)
    assert any(p.file == str(train) and p.line == 2 and "data root" in p.message for p in report.problems)


_SEGMENT = st.sampled_from(["..", ".", "images", "a b", "x.jpg", "", "..\\..", "~", "\x00", "é", "/"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(_SEGMENT, min_size=1, max_size=6), label=st.sampled_from(["0", "1", "-1", "99", "x", ""]))
def test_any_split_line_loads_inside_the_root_or_fails_naming_file_and_line(tmp_path, segments, label):
    """Random lines of path pieces and labels: either every sample lies lexically inside the data root, or the
    error is a DatasetError naming the split file and line 2 (the crafted line)."""
    root = tmp_path / "data"
    task_dir = root / "dtd"
    if not task_dir.is_dir():
        write_vtab_task(root, "dtd")
    listed = "/".join(segments)
    list_file = task_dir / "val200.txt"
    list_file.write_text(f"images/val200/000000.jpg 1\n{listed} {label}\n")
    samples = []
    try:
        samples, _ = vtab.read_image_list(list_file, task_dir, VTAB_TASKS["dtd"], root=root)
    except DatasetError as err:
        assert f"{list_file}:" in str(err)
    top = os.path.normpath(root)
    for path, _ in samples:
        assert os.path.commonpath([top, os.path.normpath(path)]) == top


# ------------------------------------------------------------------------------------------ crafted images


def _with_image(root: Path, data: bytes) -> tuple[Path, Path]:
    """A dtd task whose train800 line 2 is an image file holding ``data``; returns (image, split file)."""
    task_dir = write_vtab_task(root, "dtd")
    image = task_dir / "images" / "train800" / "000001.jpg"
    image.write_bytes(data)
    return image, task_dir / "train800.txt"


def _small_png(size: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["bomb-header", "bomb-warning-range", "truncated", "garbage", "empty", "text"])
def test_every_decode_failure_is_a_dataset_error_naming_image_and_line(tmp_path, monkeypatch, kind):
    jpeg = (tmp_path / "ok.jpg")
    write_image(jpeg, size=(64, 64))
    data = {"bomb-header": png_claiming(200_000, 200_000), "bomb-warning-range": _small_png(40),
            "truncated": jpeg.read_bytes()[:200], "garbage": os.urandom(300), "empty": b"",
            "text": b"images/a.jpg 3\n"}[kind]
    if kind == "bomb-warning-range":
        # 1600 pixels: above the limit, below twice it, where PIL only warns (DecompressionBombWarning)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image, list_file = _with_image(tmp_path / "data", data)
    dataset = vtab.load_split(tmp_path / "data", "vtab", "dtd", "train800")
    with pytest.raises(DatasetError) as info:
        dataset[1]
    message = str(info.value)
    assert str(image) in message and f"{list_file}:2" in message
    if kind.startswith("bomb"):
        assert "decompression bomb" in message and "MAX_IMAGE_PIXELS" in message
    report = verify_benchmark(tmp_path / "data", "vtab", tasks=["dtd"])
    assert [(p.file, p.line) for p in report.problems if str(image) in p.message] == [
        (str(list_file), 2), (str(list_file.with_name("train800val200.txt")), 2)]


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_decode_pool_reports_a_bomb_naming_image_and_line_and_leaves_no_file(tmp_path, monkeypatch, workers):
    monkeypatch.setattr("visadapt.data.cache._DECODE_CHUNK", 1)  # 3 chunks: the pool path runs with 2 workers
    image, list_file = _with_image(tmp_path / "data", png_claiming(200_000, 200_000))
    with pytest.raises(DatasetError) as info:
        load_cached_split("vtab", tmp_path / "data", "dtd", "train800", input_size=8, workers=workers)
    assert str(image) in str(info.value) and f"{list_file}:2" in str(info.value)
    assert not [p for p in (tmp_path / "data" / "dtd" / ".visadapt_cache").glob("*")]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), keep=st.integers(0, 2000))
def test_random_bytes_or_cut_images_never_raise_anything_but_dataset_error(tmp_path, data, keep):
    root = tmp_path / "data"
    task_dir = root / "dtd"
    if not task_dir.is_dir():
        write_vtab_task(root, "dtd")
        write_image(tmp_path / "ok.png", size=(32, 32))
    image = task_dir / "images" / "val200" / "000000.jpg"
    # either random bytes, or a valid PNG cut after `keep` bytes
    image.write_bytes(data if keep % 2 else (tmp_path / "ok.png").read_bytes()[:keep])
    dataset = vtab.load_split(root, "vtab", "dtd", "val200")
    try:
        img = dataset[0][0]
    except DatasetError as err:
        assert str(image) in str(err) and f"{task_dir / 'val200.txt'}:1" in str(err)
    else:
        assert img.mode == "RGB" and img.width > 0




# ------------------------------------------------------------------------------- embedded data generation

TINY_SIZES = {"train800": 6, "val200": 3, "test": 4}


def _folder_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (reading each: a missing file raises)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _generate_and_read(args) -> dict[str, str]:
    """One concurrent generator: wait for the others, generate, then read every listed image at once."""
    root, barrier = args
    from visadapt.data.procedural import generate_mini_vtab

    barrier.wait()
    generate_mini_vtab(root, seed=0, split_sizes=TINY_SIZES)
    for task_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        vtab.load_split(root, "mini-vtab", task_dir.name, "train800val200")  # raises if any image is missing
    return _folder_digest(Path(root))


def test_concurrent_generators_all_succeed_and_see_identical_data(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    root = tmp_path / "cache" / "mini-vtab"
    processes = 4
    with context.Manager() as manager:
        barrier = manager.Barrier(processes)
        with context.Pool(processes) as pool:
            digests = pool.map(_generate_and_read, [(str(root), barrier)] * processes)
    assert all(d == digests[0] for d in digests) and len(digests[0]) > 7 * sum(TINY_SIZES.values())
    # one copy, nothing left aside (the lock file is all that stays next to it)
    assert sorted(p.name for p in root.parent.iterdir()) == [".mini-vtab.lock", "mini-vtab"]


def test_killed_generation_leaves_no_partial_suite_and_the_next_one_cleans_up(tmp_path):
    import subprocess
    import sys
    import time

    root = tmp_path / "mini"
    code = ("import sys; from visadapt.data.procedural import generate_mini_vtab; "
            "generate_mini_vtab(sys.argv[1], seed=0, split_sizes={'train800': 400, 'val200': 100, 'test': 100})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)])
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".mini.gen-*.tmp/*/images/train800/*.png")):
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() != 0, "generation finished before it could be killed"
    assert not root.exists()  # built aside: nothing half-written at the data root
    assert list(tmp_path.glob(".mini.gen-*.tmp"))
    from visadapt.data.procedural import generate_mini_vtab

    generate_mini_vtab(root, seed=0, split_sizes=TINY_SIZES)
    assert not list(tmp_path.glob(".mini.gen-*"))
    assert verify_benchmark(root, "mini-vtab").ok


def test_generation_into_a_folder_with_other_content_keeps_it_and_replaces_an_older_suite(tmp_path):
    from visadapt.data.procedural import MANIFEST, generate_mini_vtab

    root = tmp_path / "mixed"
    (root / "mine").mkdir(parents=True)
    (root / "mine" / "notes.txt").write_text("keep me")
    generate_mini_vtab(root, seed=0, split_sizes={"train800": 3, "val200": 2, "test": 2})
    generate_mini_vtab(root, seed=0, split_sizes=TINY_SIZES)  # other sizes: the suite is replaced
    assert (root / "mine" / "notes.txt").read_text() == "keep me"
    assert json.loads((root / MANIFEST).read_text())["split_sizes"] == TINY_SIZES
    assert len((root / "digits" / "train800.txt").read_text().splitlines()) == TINY_SIZES["train800"]
    assert verify_benchmark(root, "mini-vtab").ok
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mixed.lock", "mixed"]


def test_two_main_jobs_started_together_generate_once_and_finish_with_the_same_numbers(tmp_path):
    """The README's main job (embedded default data root, generated on first run), twice at once on one machine:
    both succeed and report the same numbers. The suite is shrunk through SPLIT_SIZES so the test stays short;
    the generation path (default data root under $VISADAPT_CACHE, lock, build aside, rename) is the real one."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = Path(__file__).resolve().parents[1] / "train" / "vtab.py"
    launcher = ("import runpy, sys; from visadapt.data import procedural; "
                f"procedural.SPLIT_SIZES.update({TINY_SIZES!r}); sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, VISADAPT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONHASHSEED="0")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    runs = [subprocess.Popen([sys.executable, "-c", launcher, str(script), "--task", "digits", "--epochs", "2",
                              "--pretrained", "none", "--batch-size", "4", "--no-progress", "--output-dir",
                              str(tmp_path / f"run{i}")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    a, b = (json.loads((tmp_path / f"run{i}" / "digits" / "metrics.json").read_text()) for i in range(2))
    assert a["accuracy_final"] == b["accuracy_final"] and a["history"] == b["history"]
    ta, tb = (load_file(tmp_path / f"run{i}" / "digits" / "adapter.safetensors") for i in range(2))
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)
    generated = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert len(generated) == 1 and generated[0].startswith("mini-vtab-v")


# ----------------------------------------------------------------------------- the cache deleted or cut in use


def _cached_test_split(root: Path):
    import torch

    write_vtab_task(root, "dtd", {"train800": [0, 1, 2], "val200": [1, 0], "test": list(range(9))})
    dataset = load_cached_split("vtab", root, "dtd", "test", input_size=8, workers=1)
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return dataset, expected


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_cache_deleted_before_the_first_item_and_between_epochs_keeps_serving(tmp_path, context):
    import torch
    from torch.utils.data import DataLoader

    write_vtab_task(tmp_path, "dtd", {"train800": [0, 1, 2], "val200": [1, 0], "test": list(range(9))})
    dataset = load_cached_split("vtab", tmp_path, "dtd", "test", input_size=8, workers=1)
    dataset.cache_path.unlink()  # before the first item is read
    loader = DataLoader(dataset, batch_size=4, num_workers=2 if context == "fork" else 1,
                        multiprocessing_context=context)
    first = torch.cat([x for x, _ in loader])
    assert first.shape == (9, 3, 8, 8)
    plain = vtab.load_split(tmp_path, "vtab", "dtd", "test", vtab_transform(8))
    assert torch.equal(dataset.device_transform(first), torch.stack([plain[i][0] for i in range(9)]))
    if context == "fork":
        rebuilt = load_cached_split("vtab", tmp_path, "dtd", "test", input_size=8, workers=1)
        rebuilt.cache_path.unlink()  # between epochs: new workers start on a deleted file
        assert torch.equal(torch.cat([x for x, _ in loader]), first)
        assert torch.equal(torch.cat([x for x, _ in DataLoader(rebuilt, batch_size=4, num_workers=2)]), first)


def test_cache_pickled_by_hand_and_deleted_says_so(tmp_path):
    import pickle

    dataset, _ = _cached_test_split(tmp_path)
    clone = pickle.loads(pickle.dumps(dataset))
    dataset.cache_path.unlink()
    with pytest.raises(DatasetError) as info:
        clone[0]
    assert str(dataset.cache_path) in str(info.value) and "deleted" in str(info.value)


def _read_after_truncation(root: str, keep: int, errors) -> None:
    dataset, expected = _cached_test_split(Path(root))
    os.truncate(dataset.cache_path, keep)  # another process cuts the file while it is in use
    outcome = []
    for i in range(len(dataset)):
        try:
            outcome.append(bool((dataset[i][0] == expected[i]).all()))
        except DatasetError as err:
            outcome.append(str(err))
    errors.put(outcome)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.integers(0, 9 * 3 * 8 * 8 + 200))
def test_cache_truncated_while_in_use_gives_a_clear_error_not_sigbus(tmp_path_factory, keep):
    """Run in a forked child: a mapped file cut short kills its reader with SIGBUS, which must not happen."""
    import multiprocessing

    root = tmp_path_factory.mktemp("cut")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_read_after_truncation, args=(str(root), keep, results))
    child.start()
    child.join(60)
    assert child.exitcode == 0, f"the reader died with exit code {child.exitcode} (SIGBUS is -7)"
    outcome = results.get(timeout=5)
    item = 3 * 8 * 8
    for i, result in enumerate(outcome):
        assert isinstance(result, str) and ".vcache" in result
        if (i + 1) * item <= keep:  # bytes still there: the file changed since its check, so none is served
            assert "modified while in use" in result
        else:
            assert "cut short while in use" in result


def _die_in_worker(samples, origins, spec):
    os._exit(3)  # as a decoder crashing the process, or the OOM killer


def test_a_decode_worker_dying_is_a_dataset_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr("visadapt.data.cache._DECODE_CHUNK", 1)
    monkeypatch.setattr("visadapt.data.cache._decode_rgb", _die_in_worker)  # inherited by the forked workers
    write_vtab_task(tmp_path, "dtd")
    with pytest.raises(DatasetError) as info:
        load_cached_split("vtab", tmp_path, "dtd", "test", input_size=8, workers=2)
    assert "dtd/test" in str(info.value) and "decode process died" in str(info.value)
    assert not list((tmp_path / "dtd" / ".visadapt_cache").iterdir())


def _build_and_read(root: str, barrier, results) -> None:
    import torch

    barrier.wait()
    dataset = load_cached_split("vtab", root, "dtd", "test", input_size=8, workers=2)
    results.put((str(dataset.cache_path),
                 torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy().tobytes()))


def test_concurrent_cache_builders_end_with_one_valid_file_and_no_temporary(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setattr("visadapt.data.cache._DECODE_CHUNK", 2)  # each builder runs its own decode pool
    write_vtab_task(tmp_path, "dtd", {"train800": [0, 1, 2], "val200": [1, 0], "test": list(range(9))})
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(3), context.Queue()
    builders = [context.Process(target=_build_and_read, args=(str(tmp_path), barrier, results)) for _ in range(3)]
    for builder in builders:
        builder.start()
    outcomes = [results.get(timeout=60) for _ in builders]
    for builder in builders:
        builder.join(60)
        assert builder.exitcode == 0
    assert len(set(outcomes)) == 1
    folder = tmp_path / "dtd" / ".visadapt_cache"
    assert [p.name for p in folder.iterdir()] == [Path(outcomes[0][0]).name]  # no .tmp left


def test_bomb_in_the_warning_range_is_refused_even_if_the_warning_filter_is_lost(tmp_path, monkeypatch):
    """Another thread leaving catch_warnings can restore the filters under us; the size check still refuses."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(vtab.warnings, "simplefilter", lambda *args, **kwargs: None)
    image, _ = _with_image(tmp_path / "data", _small_png(40))
    dataset = vtab.load_split(tmp_path / "data", "vtab", "dtd", "train800")
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DatasetError, match="decompression bomb") as info:
        dataset[1]
    assert str(image) in str(info.value)


@settings(max_examples=30, deadline=None)
@given(keys=st.lists(st.lists(_SEGMENT, min_size=1, max_size=5).map("/".join), min_size=1, max_size=4))
def test_any_fgvc_key_is_confined_or_reported_with_its_file(keys):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        image_dir = root / "cub" / "images"
        image_dir.mkdir(parents=True)
        split = root / "cub" / "train.json"
        split.write_text(json.dumps({key: i for i, key in enumerate(keys)}, indent=1))
        problems: list = []
        good = fgvc.read_split_json(split, problems=problems, image_dir=image_dir, root=root)
        top = os.path.normpath(root)
        for key in good:
            assert os.path.commonpath([top, os.path.normpath(image_dir / key)]) == top
        assert all(file == split for file, _, _ in problems)
        assert len(good) + len(problems) == len(set(keys))


def test_places_and_ranking_loaders_refuse_a_bomb_naming_the_image(tmp_path):
    """The other image loaders of visadapt.data go through the same decode (decode_image)."""
    from test_places import E0, N0, utm_name, write_split

    from visadapt.data.places import PlaceSplit
    from visadapt.data.ranking import RankingTable

    write_split(tmp_path / "places", "test", [(0, 0)], [(1, 1)])
    bomb = tmp_path / "places" / "images/test/database" / utm_name(E0 + 50, N0, "bomb", "png")
    bomb.write_bytes(png_claiming(200_000, 200_000))
    split = PlaceSplit(tmp_path / "places", "test")
    with pytest.raises(DatasetError, match="decompression bomb") as info:
        split.load_database(split.database_paths.index(bomb))
    assert str(bomb) in str(info.value)

    (tmp_path / "rank" / "images").mkdir(parents=True)
    (tmp_path / "rank" / "images" / "a.png").write_bytes(png_claiming(200_000, 200_000))
    csv = tmp_path / "rank" / "train.csv"
    csv.write_text("filepath\ttitle\tcname\tvalue\nimages/a.png\tRank it.\tcircle\t2\n")
    with pytest.raises(DatasetError, match="decompression bomb") as info:
        RankingTable(csv).load(0)
    assert "a.png" in str(info.value) and f"row 2 of {csv}" in str(info.value)


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab./\\ 09-\n\t\r\x00é\u2028")), max_size=80))
def test_any_split_file_text_parses_or_raises_a_dataset_error_naming_the_file(text):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        task_dir = Path(folder) / "data" / "dtd"
        task_dir.mkdir(parents=True)
        list_file = task_dir / "test.txt"
        list_file.write_text(text, encoding="utf-8")
        try:
            samples, origins = vtab.read_image_list(list_file, task_dir, VTAB_TASKS["dtd"])
        except DatasetError as err:
            assert str(list_file) in str(err)
        else:
            assert samples and len(samples) == len(origins)
            assert all(0 <= label < VTAB_TASKS["dtd"].num_classes for _, label in samples)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spots=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_a_damaged_cache_file_is_rebuilt_never_served_or_raised(tmp_path_factory, spots, cut):
    """Bytes flipped anywhere in the header/trailer/data or the file cut at any point: the next load warns,
    rebuilds and serves the decode path's pixels."""
    import torch

    root = tmp_path_factory.mktemp("damaged")
    dataset, expected = _cached_test_split(root)
    raw = bytearray(dataset.cache_path.read_bytes())
    for back, xor in spots:  # counted from the end: the header and trailer live there
        raw[-min(back, len(raw))] ^= xor
    if cut is not None:
        raw = raw[:len(raw) - cut]
    dataset.cache_path.write_bytes(bytes(raw))
    again = load_cached_split("vtab", root, "dtd", "test", input_size=8, workers=1)
    assert torch.equal(torch.stack([again[i][0] for i in range(len(again))]), expected)


def test_every_rank_of_a_two_process_launch_finds_one_complete_generated_suite(tmp_path):
    """`accelerate launch` with 2 CPU processes on a fresh default data root: the embedded suite is generated
    once, both ranks train on it, and one copy is left (the suite is shrunk by a wrapper, as above)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "train" / "vtab.py"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text("import runpy, sys\nfrom visadapt.data import procedural\n"
                       f"procedural.SPLIT_SIZES.update({TINY_SIZES!r})\nsys.argv[0] = {str(script)!r}\n"
                       f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    env = dict(os.environ, VISADAPT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               ACCELERATE_USE_CPU="true")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    result = subprocess.run([*launch, str(wrapper), "--task", "cells", "--epochs", "1", "--pretrained", "none",
                             "--batch-size", "4", "--no-progress", "--output-dir", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "cells" / "metrics.json").read_text())["num_processes"] == 2
    generated = [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert len(generated) == 1 and verify_benchmark(generated[0], "mini-vtab").ok


# ---------------------------------------------------------------------------------- bounds on split files


def _split_error(root: Path, problems: bool = False) -> str:
    """The message a load of dtd/train800 fails with (or verify's report of the split file)."""
    if problems:
        report = verify_benchmark(root, "vtab", tasks=["dtd"], check_images=False)
        return "\n".join(p.message for p in report.problems if p.file.endswith("train800.txt"))
    with pytest.raises(DatasetError) as info:
        vtab.load_split(root, "vtab", "dtd", "train800")
    return str(info.value)


def test_a_split_file_above_the_byte_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    root = tmp_path / "data"
    list_file = write_vtab_task(root, "dtd") / "train800.txt"
    with open(list_file, "r+b") as f:  # sparse: 1 GiB + 1 of zeros costs no disk
        f.truncate(vtab.MAX_SPLIT_FILE_BYTES + 1)
    # Read, its first "line" (zeros, no newline) would hit the line bound: the byte bound proves it was not.
    message = _split_error(root)
    assert str(list_file) in message and str(vtab.MAX_SPLIT_FILE_BYTES) in message
    assert "MAX_SPLIT_FILE_BYTES" in message
    assert "MAX_SPLIT_FILE_BYTES" in _split_error(root, problems=True)


def test_a_line_above_the_line_bound_is_refused_without_reading_the_rest(tmp_path, monkeypatch):
    root = tmp_path / "data"
    list_file = write_vtab_task(root, "dtd") / "train800.txt"
    good = list_file.read_text()
    list_file.write_text(good + "x" * (vtab.MAX_SPLIT_LINE_BYTES + 10) + " 1\n")
    message = _split_error(root)
    assert f"{list_file}:4:" in message and str(vtab.MAX_SPLIT_LINE_BYTES) in message
    assert "MAX_SPLIT_LINE_BYTES" in _split_error(root, problems=True)


def test_a_split_file_above_the_line_count_bound_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "data"
    list_file = write_vtab_task(root, "dtd") / "train800.txt"
    monkeypatch.setattr(vtab, "MAX_SPLIT_LINES", 2)
    assert list_file.read_text().count("\n") == 3
    message = _split_error(root)
    assert str(list_file) in message and "more than 2 lines" in message and "MAX_SPLIT_LINES" in message


def test_lines_are_numbered_as_splitlines_numbers_them(tmp_path):
    """Streaming keeps the numbering of ``str.splitlines`` ("\\r", "\\r\\n", "\\u2028" all end a line)."""
    task_dir = tmp_path / "data" / "dtd"
    task_dir.mkdir(parents=True)
    list_file = task_dir / "test.txt"
    text = "a.jpg 1\r\nb.jpg 2\rc.jpg 3\u2028d.jpg 4\n\ne.jpg 5"
    list_file.write_bytes(text.encode("utf-8"))
    _, origins = vtab.read_image_list(list_file, task_dir, VTAB_TASKS["dtd"])
    want = [f"{list_file}:{i}" for i, line in enumerate(text.splitlines(), start=1) if line]
    assert origins == want


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_only_a_regular_file_is_read_as_a_split_file(tmp_path, kind):
    """A FIFO (would block the reader forever), /dev/zero behind a symlink (never ends) or a directory under a
    split file's name: refused at once, naming the file, by the loader and by verify."""
    root = tmp_path / "data"
    list_file = write_vtab_task(root, "dtd") / "train800.txt"
    list_file.unlink()
    if kind == "fifo":
        os.mkfifo(list_file)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", list_file)
    else:
        list_file.mkdir()
    message = _split_error(root)
    assert str(list_file) in message and "not a regular file" in message
    assert "not a regular file" in _split_error(root, problems=True)


# ------------------------------------------------------------------------- the cache rewritten in place


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_rewritten_in_place_after_the_open_check_is_an_error_never_wrong_pixels(tmp_path, workers):
    """Another process rewrites one item's bytes at the same size after the open-time check: from then on no
    item is served (in this process, or in forked DataLoader workers): the read raises naming the file, the item
    and the fix, and never returns the changed pixels. Items read before the write were the checked bytes."""
    from torch.utils.data import DataLoader

    dataset, expected = _cached_test_split(tmp_path)
    for i in (0, 3, 5, 8):
        assert (dataset[i][0] == expected[i]).all()
    item = 3 * 8 * 8
    with open(dataset.cache_path, "r+b") as f:  # same size, item 4's pixels inverted
        f.seek(4 * item)
        original = f.read(item)
        f.seek(4 * item)
        f.write(bytes(255 - b for b in original))
    assert os.path.getsize(dataset.cache_path) == dataset._file_bytes
    if workers:
        with pytest.raises(DatasetError) as info:
            list(DataLoader(dataset, batch_size=3, num_workers=workers))
        first = 0  # the first item a worker reads
    else:
        for first in (4, 0):
            with pytest.raises(DatasetError) as info:
                dataset[first]
    message = str(info.value)
    assert str(dataset.cache_path) in message and f"item {first} " in message and "modified" in message
    assert "Delete the file" in message


def test_cache_reads_without_os_pread_use_the_seek_fallback_and_serve_the_same_pixels(tmp_path, monkeypatch):
    """Windows has no os.pread: with it (and preadv) removed, a cache is built, checked on open (in threads,
    sharing one descriptor) and read in this process and in forked DataLoader workers (each its own
    descriptor), giving the pixels the pread path gives; a rewritten item is still caught."""
    import torch
    from torch.utils.data import DataLoader

    from visadapt.data import cache

    _, expected = _cached_test_split(tmp_path / "pread")  # built and read with pread
    monkeypatch.delattr(os, "pread")
    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.setattr(cache, "CHUNK_BYTES", 2 * 3 * 8 * 8)  # several runs: the open check reads in threads
    _, again = _cached_test_split(tmp_path / "seek")  # built, checked and read without pread
    assert torch.equal(again, expected)
    reopened = load_cached_split("vtab", tmp_path / "seek", "dtd", "test", input_size=8, workers=4)
    assert torch.equal(torch.stack([reopened[i][0] for i in range(9)]), expected)
    for _ in range(2):  # workers sharing an inherited descriptor would race on its position
        served = torch.cat([x for x, _ in DataLoader(reopened, batch_size=1, num_workers=2)])
        assert torch.equal(served, expected)
    with open(reopened.cache_path, "r+b") as f:  # item 0's byte 5 inverted, in place
        f.seek(5)
        flipped = bytes([255 - f.read(1)[0]])
        f.seek(5)
        f.write(flipped)
    with pytest.raises(DatasetError, match="modified while in use"):
        reopened[0]


def _flock_fails_as_on_nfs_without_lockd(monkeypatch) -> None:
    """flock(2) on NFS without a reachable lockd fails with ENOLCK ("No locks available"); filelock raises it."""
    import errno

    from filelock._native import _unix

    def no_locks(fd):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(_unix, "lock_fd_nonblocking", no_locks)


def test_generation_on_a_filesystem_without_locks_falls_back_to_a_soft_lock(tmp_path, monkeypatch, caplog):
    from visadapt.data.procedural import generate_mini_vtab

    _flock_fails_as_on_nfs_without_lockd(monkeypatch)
    root = tmp_path / "nfs" / "mini"
    with caplog.at_level("WARNING", logger="visadapt"):
        assert generate_mini_vtab(root, seed=0, split_sizes=TINY_SIZES) == root
    assert "does not support file locks" in caplog.text and str(root.parent) in caplog.text
    vtab.load_split(root, "mini-vtab", "digits", "train800val200")
    assert not (root.parent / ".mini.lock.soft").exists()  # released


def test_generation_where_no_lock_works_is_one_clear_error_naming_folder_and_fix(tmp_path, monkeypatch):
    import filelock

    from visadapt.data.procedural import generate_mini_vtab

    _flock_fails_as_on_nfs_without_lockd(monkeypatch)

    def no_marker(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(filelock.SoftFileLock, "acquire", no_marker)
    root = tmp_path / "nfs" / "mini"
    with pytest.raises(DatasetError) as info:
        generate_mini_vtab(root, seed=0, split_sizes=TINY_SIZES)
    message = str(info.value)
    assert str(root.parent) in message and "VISADAPT_CACHE" in message and "No locks available" in message
    assert not root.exists()
