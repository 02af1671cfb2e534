"""Folder datasets and transforms on tiny generated folders: right samples and labels, and every kind of bad
data fails early with a message that names the file, the line (or JSON key) and the fix."""
from __future__ import annotations

import dataclasses
import json
import re
import struct
import zlib

import pytest
import torch
from PIL import Image

from visadapt.data import DatasetError, ImageListDataset, build_datasets, fgvc, resolve_normalization, vtab
from visadapt.data.tasks import FGVC_TASKS, VTAB_TASKS
from visadapt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, fgvc_transforms, vtab_transform

COLOURS = [(255, 0, 128), (0, 255, 0), (10, 20, 30), (200, 100, 50)]


def write_image(path, colour=(255, 0, 128), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_vtab_task(root, dirname, labels_per_split=None, ext="jpg"):
    """A NOAH-layout task folder; train800val200 lists the train800 and val200 images, as NOAH's dump does."""
    labels_per_split = labels_per_split or {"train800": [0, 1, 2], "val200": [1, 0], "test": [2, 1, 0, 1]}
    task_dir = root / dirname
    lines = {}
    for split, labels in labels_per_split.items():
        lines[split] = []
        for i, label in enumerate(labels):
            rel = f"images/{split}/{i:06d}.{ext}"
            write_image(task_dir / rel, COLOURS[i % len(COLOURS)])
            lines[split].append(f"{rel} {label}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task_dir / f"{split}.txt").write_text("".join(rows))
    return task_dir


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def write_fgvc_task(root, dirname, image_dir, splits):
    """A VPT-layout dataset folder; ``splits`` maps split name -> {relative image path: raw class id}."""
    task_dir = root / dirname
    for split, table in splits.items():
        for rel in table:
            write_image(task_dir / image_dir / rel)
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / f"{split}.json").write_text(json.dumps(table))
    return task_dir


def small_fgvc_table(monkeypatch, name="stanford_dogs", num_classes=3):
    """Give one FGVC task a small class count so a handful of images can cover every class (the remap and the
    count check are what is tested; the real counts are 102-555)."""
    monkeypatch.setitem(FGVC_TASKS, name, dataclasses.replace(FGVC_TASKS[name], num_classes=num_classes))


# ------------------------------------------------------------------------------------------------ VTAB


@pytest.mark.parametrize("protocol, sizes, eval_labels", [
    ("final", (5, 4), [2, 1, 0, 1]),
    ("tune", (3, 2), [1, 0]),
])
def test_vtab_protocols_pick_the_right_splits(tmp_path, protocol, sizes, eval_labels):
    write_vtab_task(tmp_path, "cifar100")
    train, evaluate = build_datasets("vtab", tmp_path, "cifar100", protocol=protocol, input_size=16)
    assert (len(train), len(evaluate)) == sizes
    assert train.num_classes == evaluate.num_classes == 100
    assert evaluate.targets == eval_labels
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    # No normalisation: ToTensor values in [0, 1]; the first image is (255, 0, 128) everywhere.
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-3)


@pytest.mark.parametrize("task, dirname", [("cifar100", "cifar"), ("oxford_iiit_pet", "oxford_pet"),
                                           ("pets", "oxford_iiit_pet"), ("retinopathy", "diabetic_retinopathy")])
def test_vtab_task_folders_are_found_under_aliases(tmp_path, task, dirname):
    write_vtab_task(tmp_path, dirname)
    train, _ = build_datasets("vtab", tmp_path, task, input_size=8)
    assert train.samples[0][0] == tmp_path / dirname / "images/train800/000000.jpg"


def test_vtab_folder_name_case_is_ignored(tmp_path):
    write_vtab_task(tmp_path, "DTD")
    assert vtab.find_task_dir(tmp_path, VTAB_TASKS["dtd"]) == tmp_path / "DTD"


def test_mini_vtab_reads_png_folders(tmp_path):
    write_vtab_task(tmp_path, "digits", {"train800": [9, 0], "val200": [5], "test": [3, 4]}, ext="png")
    train, evaluate = build_datasets("mini-vtab", tmp_path, "digits", input_size=8, normalization="imagenet")
    assert isinstance(train, ImageListDataset)
    assert train.targets == [9, 0, 5] and evaluate.targets == [3, 4] and train.num_classes == 10
    x, _ = evaluate[0]
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 3, 3], expected, atol=1e-3)


def test_split_file_paths_may_contain_spaces_and_blank_lines_are_skipped(tmp_path):
    task_dir = tmp_path / "svhn"
    write_image(task_dir / "my images" / "a b.jpg")
    (task_dir / "test.txt").write_text("\nmy images/a b.jpg 7\n\n   \n")
    ds = vtab.load_split(tmp_path, "vtab", "svhn", "test")
    assert ds.samples == [(task_dir / "my images" / "a b.jpg", 7)] and ds.origins == [f"{task_dir / 'test.txt'}:2"]
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 7


def test_missing_task_folder_lists_root_and_close_matches(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "dtd").mkdir()
    with pytest.raises(DatasetError) as err:
        build_datasets("vtab", tmp_path, "cifar100", input_size=8)
    msg = str(err.value)
    assert str(tmp_path) in msg and "tried cifar100, cifar" in msg
    assert "contains: cifar10, dtd" in msg and "Close matches: cifar10" in msg


def test_missing_data_root(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(f"data root {tmp_path / 'nowhere'} does not exist")):
        build_datasets("vtab", tmp_path / "nowhere", "dtd", input_size=8)


def test_task_folder_passed_as_root_gets_a_hint(tmp_path):
    task_dir = write_vtab_task(tmp_path, "dtd")
    with pytest.raises(DatasetError, match="looks like a task folder itself: pass its parent"):
        build_datasets("vtab", task_dir, "dtd", input_size=8)


def test_missing_split_file_names_it_and_the_layout(tmp_path):
    task_dir = write_vtab_task(tmp_path, "dtd")
    (task_dir / "test.txt").unlink()
    with pytest.raises(DatasetError) as err:
        build_datasets("vtab", tmp_path, "dtd", input_size=8)
    msg = str(err.value)
    assert f"split file {task_dir / 'test.txt'} does not exist" in msg
    assert "found: train800.txt, train800val200.txt, val200.txt" in msg
    assert "NOAH VTAB-1k layout" in msg and "get_vtab1k.py" in msg


def test_missing_split_file_of_mini_vtab_points_to_the_generator(tmp_path):
    (tmp_path / "count").mkdir()
    with pytest.raises(DatasetError, match="generate_mini_vtab"):
        vtab.load_split(tmp_path, "mini-vtab", "count", "train800")


@pytest.mark.parametrize("bad_line", ["images/a.jpg", "images/a.jpg three", "images/a.jpg 2.0", "7"])
def test_malformed_line_names_file_and_line(tmp_path, bad_line):
    task_dir = write_vtab_task(tmp_path, "eurosat")
    (task_dir / "val200.txt").write_text(f"images/val200/000000.jpg 1\n\n{bad_line}\n")
    with pytest.raises(DatasetError) as err:
        vtab.load_split(tmp_path, "vtab", "eurosat", "val200")
    msg = str(err.value)
    assert f"{task_dir / 'val200.txt'}:3: malformed line {bad_line!r}" in msg
    assert "'<relative image path> <integer label>'" in msg


@pytest.mark.parametrize("label", [10, -1])
def test_label_out_of_range_names_file_line_and_class_count(tmp_path, label):
    task_dir = write_vtab_task(tmp_path, "svhn")
    (task_dir / "train800.txt").write_text(f"images/train800/000000.jpg 0\nimages/train800/000001.jpg {label}\n")
    with pytest.raises(DatasetError) as err:
        vtab.load_split(tmp_path, "vtab", "svhn", "train800")
    msg = str(err.value)
    assert f"{task_dir / 'train800.txt'}:2: label {label} is outside [0, 10) for task 'svhn'" in msg
    assert "another task" in msg


def test_missing_images_are_reported_with_lines_and_count(tmp_path):
    task_dir = write_vtab_task(tmp_path, "kitti", {"train800": [0], "val200": [1], "test": [0] * 8})
    for i in range(1, 8):
        (task_dir / f"images/test/{i:06d}.jpg").unlink()
    with pytest.raises(DatasetError) as err:
        vtab.load_split(tmp_path, "vtab", "kitti", "test")
    msg = str(err.value)
    assert "7 of 8 images listed for kitti/test do not exist" in msg
    assert f"{task_dir / 'test.txt'}:2: {task_dir / 'images/test/000001.jpg'}" in msg
    assert f"{task_dir / 'test.txt'}:6:" in msg and f"{task_dir / 'test.txt'}:7:" not in msg
    assert "... and 2 more" in msg and "relative to" in msg


def test_empty_split_file_is_an_error(tmp_path):
    task_dir = write_vtab_task(tmp_path, "dmlab")
    (task_dir / "test.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match=re.escape(f"{task_dir / 'test.txt'} lists no images")):
        vtab.load_split(tmp_path, "vtab", "dmlab", "test")


def test_corrupt_image_fails_at_getitem_naming_image_and_split_line(tmp_path):
    task_dir = write_vtab_task(tmp_path, "caltech101")
    (task_dir / "images/train800/000001.jpg").write_bytes(b"this is not a jpeg" * 4)
    ds = vtab.load_split(tmp_path, "vtab", "caltech101", "train800")
    ds[0]  # the intact neighbours still load
    with pytest.raises(DatasetError) as err:
        ds[1]
    msg = str(err.value)
    assert f"cannot read image {task_dir / 'images/train800/000001.jpg'}" in msg
    assert f"listed at {task_dir / 'train800.txt'}:2" in msg


def test_unknown_split_benchmark_and_protocol(tmp_path):
    write_vtab_task(tmp_path, "dtd")
    with pytest.raises(DatasetError, match="unknown VTAB split 'train'; choose one of train800, val200"):
        vtab.load_split(tmp_path, "vtab", "dtd", "train")
    with pytest.raises(DatasetError, match="FGVC uses visadapt.data.fgvc.load_split"):
        vtab.load_split(tmp_path, "fgvc", "cub", "test")
    with pytest.raises(ValueError, match="unknown protocol 'dev'; choose one of final, tune"):
        build_datasets("vtab", tmp_path, "dtd", protocol="dev", input_size=8)
    with pytest.raises(ValueError, match="unknown benchmark 'vtab1k'"):
        build_datasets("vtab1k", tmp_path, "dtd", input_size=8)


# ------------------------------------------------------------------------------------------------ FGVC


def test_fgvc_sparse_ids_are_remapped_in_sorted_order_over_all_splits(tmp_path, monkeypatch):
    small_fgvc_table(monkeypatch)
    # Class 3 appears only in test: the map must still cover it, or train and test would disagree.
    task_dir = write_fgvc_task(tmp_path, "StanfordDogs", "Images", {
        "train": {"n1/a.jpg": 42, "n2/b.jpg": 10},
        "val": {"n1/c.jpg": 42},
        "test": {"n3/d.jpg": 3, "n2/e.jpg": 10, "n1/f.jpg": 42},
    })
    train, evaluate = build_datasets("fgvc", tmp_path, "stanford_dogs", input_size=16)
    assert train.num_classes == evaluate.num_classes == 3
    assert [p for p, _ in train.samples] == [task_dir / "Images" / k for k in ("n1/a.jpg", "n2/b.jpg", "n1/c.jpg")]
    assert train.targets == [2, 1, 2] and evaluate.targets == [0, 1, 2]
    assert train.origins[2] == f"{task_dir / 'val.json'} key 'n1/c.jpg'"
    tune_train, tune_eval = build_datasets("fgvc", tmp_path, "dogs", protocol="tune", input_size=16)
    assert tune_train.targets == [2, 1] and tune_eval.targets == [2]


def test_fgvc_with_the_real_class_count(tmp_path):
    # Oxford Flowers: 102 classes, 1-based ids as in the VPT files, images in the dataset folder itself.
    table = {f"jpg/image_{i:05d}.jpg": i for i in range(1, 103)}
    task_dir = write_fgvc_task(tmp_path, "oxford_flowers", "", {"train": table, "val": {"jpg/image_00001.jpg": 1},
                                                               "test": {"jpg/image_00102.jpg": 102}})
    train, evaluate = build_datasets("fgvc", tmp_path, "oxford_flowers", input_size=8)
    assert len(train) == 103 and train.targets[:3] == [0, 1, 2] and evaluate.targets == [101]
    assert train.samples[0][0] == task_dir / "jpg/image_00001.jpg"


@pytest.mark.parametrize("task, dirname, image_dir", [("cub", "CUB_200_2011", "images"),
                                                      ("nabirds", "nabirds", "images"),
                                                      ("stanford_cars", "cars", "")])
def test_fgvc_image_directory_per_dataset(tmp_path, monkeypatch, task, dirname, image_dir):
    small_fgvc_table(monkeypatch, task, num_classes=1)
    task_dir = write_fgvc_task(tmp_path, dirname, image_dir, {"train": {"x.jpg": 5}})
    ds = fgvc.load_split(tmp_path, task, "train")
    assert ds.samples == [(task_dir / image_dir / "x.jpg", 0)]


def test_fgvc_class_count_mismatch_names_files_and_counts(tmp_path):
    task_dir = write_fgvc_task(tmp_path, "cub", "images", {"train": {"a.jpg": 1, "b.jpg": 2}, "test": {"c.jpg": 3}})
    with pytest.raises(DatasetError) as err:
        fgvc.load_split(tmp_path, "cub", "val")
    assert f"split file {task_dir / 'val.json'} does not exist (found: test.json, train.json)" in str(err.value)
    with pytest.raises(DatasetError) as err:
        fgvc.load_split(tmp_path, "cub", "train")
    msg = str(err.value)
    assert f"{task_dir / 'train.json'}, {task_dir / 'test.json'} together hold 3 distinct class ids" in msg
    assert "'cub' has 200 classes" in msg


@pytest.mark.parametrize("content, expected", [
    ('{"a.jpg": 1,', "train.json:1: not valid JSON"),
    ('["a.jpg", 1]', "train.json holds a JSON list, not an object"),
    ("{}", "train.json lists no images"),
    ('{"a.jpg": 1, "b.jpg": "2"}', "train.json: key 'b.jpg' has class id '2' (str)"),
    ('{"a.jpg": 1, "b.jpg": 2.0}', "train.json: key 'b.jpg' has class id 2.0 (float)"),
    ('{"a.jpg": true}', "train.json: key 'a.jpg' has class id True (bool)"),
])
def test_fgvc_bad_json_names_file_and_key(tmp_path, monkeypatch, content, expected):
    small_fgvc_table(monkeypatch, "stanford_cars", num_classes=2)
    task_dir = tmp_path / "stanford_cars"
    task_dir.mkdir()
    (task_dir / "train.json").write_text(content)
    with pytest.raises(DatasetError) as err:
        fgvc.load_split(tmp_path, "stanford_cars", "train")
    assert str(task_dir / expected) in str(err.value)


def test_fgvc_missing_images_name_json_key(tmp_path, monkeypatch):
    small_fgvc_table(monkeypatch, "nabirds", num_classes=2)
    task_dir = write_fgvc_task(tmp_path, "nabirds", "images", {"train": {"a.jpg": 0, "b.jpg": 1}})
    (task_dir / "images/b.jpg").unlink()
    with pytest.raises(DatasetError) as err:
        fgvc.load_split(tmp_path, "nabirds", "train")
    msg = str(err.value)
    assert "1 of 2 images listed for nabirds/train do not exist" in msg
    assert f"{task_dir / 'train.json'} key 'b.jpg': {task_dir / 'images/b.jpg'}" in msg


def test_fgvc_corrupt_image_names_json_key(tmp_path, monkeypatch):
    small_fgvc_table(monkeypatch, "cub", num_classes=1)
    task_dir = write_fgvc_task(tmp_path, "cub", "images", {"test": {"001/x.jpg": 7}})
    (task_dir / "images/001/x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=re.escape(f"listed at {task_dir / 'test.json'} key '001/x.jpg'")):
        fgvc.load_split(tmp_path, "cub", "test")[0]


# ------------------------------------------------------------------------------------------------ transforms


def test_resolve_normalization_choices():
    assert resolve_normalization("imagenet") == (IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_normalization("none") is None

    backbone = torch.nn.Identity()
    backbone.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # as timm sets it
    assert resolve_normalization("model", backbone) == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="Linear has no mean/std in its pretrained_cfg"):
        resolve_normalization("model", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs the model"):
        resolve_normalization("model")
    with pytest.raises(ValueError, match="unknown normalization 'clip'; choose one of model, imagenet, none"):
        resolve_normalization("clip")


def test_vtab_transform_squashes_to_a_square():
    img = Image.new("RGB", (40, 10), (0, 255, 0))
    x = vtab_transform(24, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))(img)
    assert x.shape == (3, 24, 24)
    assert torch.allclose(x[:, 12, 12], torch.tensor([-1.0, 1.0, -1.0]), atol=1e-3)


def test_fgvc_transforms_crop_and_flip():
    # Left half red, right half blue: the eval centre crop keeps both halves in place; random flips
    # of the train transform must put red on the right in some draws.
    img = Image.new("RGB", (64, 48), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 48))
    train, evaluate = fgvc_transforms(28, None)
    assert round(28 * 256 / 224) == 32
    x = evaluate(img)
    assert x.shape == (3, 28, 28) and x[0, 14, 0] > 0.9 and x[2, 14, -1] > 0.9
    outs = [train(img) for _ in range(20)]
    assert all(o.shape == (3, 28, 28) for o in outs)
    assert {bool(o[0, 14, 0] > 0.9) for o in outs} == {True, False}
    with pytest.raises(ValueError, match="3 values each"):
        fgvc_transforms(28, ((0.5,), (0.5,)))
