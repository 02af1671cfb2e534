"""Hostile data folders: crafted split files, crafted images, concurrent cache builders and concurrent embedded-data
generation, a cache deleted or cut while in use.

Each case asserts a clear error type (:class:`DatasetError`) whose message names the input (file and line, or
image), and that no partial file is left behind.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_data import small_fgvc_table, write_fgvc_task, write_image, write_vtab_task

from visadapt.data import DatasetError, fgvc, vtab
from visadapt.data.cache import load_cached_split
from visadapt.data.tasks import VTAB_TASKS
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


def _png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


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
    data = {"bomb-header": _png_claiming(200_000, 200_000), "bomb-warning-range": _small_png(40),
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
    image, list_file = _with_image(tmp_path / "data", _png_claiming(200_000, 200_000))
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


