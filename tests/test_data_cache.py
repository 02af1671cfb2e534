"""Decoded-image cache: the same samples, labels, order and pixels as the decode-every-time path; stale and
corrupt caches are rebuilt (corrupt ones with one warning), an unwritable data folder names --cache-dir, and
two racing builds leave one valid cache."""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from visadapt.data import DatasetError, build_datasets, cache, fgvc, vtab
from visadapt.data.cache import CachedImageDataset, load_cached_split
from visadapt.data.device import DeviceTransform
from visadapt.data.tasks import FGVC_TASKS
from visadapt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, fgvc_transforms

# (width, height): up- and down-scaling, both aspects.
SIZES = [(37, 23), (16, 16), (20, 41), (29, 30), (11, 19)]


def write_jpeg(path, seed, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Smooth noise plus a gradient: resizing has real work to do, and a flip or a shifted crop changes pixels.
    w, h = size
    base = rng.integers(0, 256, size=(h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + np.linspace(0, 60, w, dtype=np.int16)[None, :, None]
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_vtab(root, dirname="dtd", counts=(6, 3, 7)):
    """A NOAH-layout task folder of small JPEGs of assorted sizes; labels cycle through 0..4."""
    task_dir = root / dirname
    lines = {}
    seed = 0
    for split, count in zip(("train800", "val200", "test"), counts):
        lines[split] = []
        for i in range(count):
            rel = f"images/{split}/{i:06d}.jpg"
            write_jpeg(task_dir / rel, seed, SIZES[seed % len(SIZES)])
            seed += 1
            lines[split].append(f"{rel} {(i * 3) % 5}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task_dir / f"{split}.txt").write_text("".join(rows))
    return task_dir


def write_fgvc(root, monkeypatch, counts=(5, 2, 4)):
    """A VPT-layout Stanford Dogs folder with 3 classes (raw ids 7, 3, 11: sparse, remapped in id order)"""
    three = dataclasses.replace(FGVC_TASKS["stanford_dogs"], num_classes=3)
    monkeypatch.setitem(FGVC_TASKS, "stanford_dogs", three)
    task_dir = root / "StanfordDogs"
    seed = 0
    for split, count in zip(fgvc.SPLITS, counts):
        table = {}
        for i in range(count):
            rel = f"n{i % 3}/{split}_{i}.jpg"
            write_jpeg(task_dir / "Images" / rel, seed, SIZES[seed % len(SIZES)])
            seed += 1
            table[rel] = (7, 3, 11)[i % 3]
        (task_dir / f"{split}.json").write_text(json.dumps(table))
    return task_dir


def decoded(dataset) -> torch.Tensor:
    """Every item of a decode-path dataset stacked: ``float32 (N, 3, H, W)``."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def cached(dataset: CachedImageDataset) -> torch.Tensor:
    """Every item of a cached dataset stacked and passed through its device transform on the CPU."""
    items = [dataset[i][0] for i in range(len(dataset))]
    assert all(x.dtype == torch.uint8 for x in items)
    return dataset.device_transform(torch.stack(items))


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(cache.SUFFIX))


@pytest.fixture
def small_chunks(monkeypatch):
    """Two images per decode task, so a handful of images already goes through the process pool."""
    monkeypatch.setattr(cache, "_DECODE_CHUNK", 2)


# ------------------------------------------------------------------------------------------ equal to decode


@pytest.mark.parametrize("normalization", [None, "imagenet"])
def test_vtab_cache_equals_decode_path(tmp_path, small_chunks, normalization):
    write_vtab(tmp_path)
    plain = build_datasets("vtab", tmp_path, "dtd", input_size=16, normalization=normalization)
    fast = build_datasets("vtab", tmp_path, "dtd", input_size=16, normalization=normalization, cache=True,
                          cache_workers=2)
    for slow, quick in zip(plain, fast):
        assert isinstance(quick, CachedImageDataset)
        assert quick.samples == slow.samples and quick.targets == slow.targets
        assert quick.origins == slow.origins
        assert (quick.name, quick.num_classes, len(quick)) == (slow.name, slow.num_classes, len(slow))
        assert torch.equal(cached(quick), decoded(slow))  # bit-identical pixels after the device transform


def test_vtab_cache_is_shared_by_normalisations_and_reused(tmp_path, small_chunks):
    write_vtab(tmp_path)
    _, test_none = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True, cache_workers=2)
    mtime = test_none.cache_path.stat().st_mtime_ns
    _, test_imagenet = build_datasets("vtab", tmp_path, "dtd", input_size=12, normalization="imagenet",
                                      cache=True)
    assert test_imagenet.cache_path == test_none.cache_path
    assert test_none.cache_path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert test_imagenet.device_transform.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    # Another resolution is another cache, next to the first.
    _, test_big = build_datasets("vtab", tmp_path, "dtd", input_size=20, cache=True)
    assert test_big.cache_path != test_none.cache_path and test_none.cache_path.is_file()
    assert test_big[0][0].shape == (3, 20, 20)


def test_cached_dataset_in_dataloader_workers_and_pickled(tmp_path):
    write_vtab(tmp_path)
    _, test = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    expected = cached(test)
    clone = pickle.loads(pickle.dumps(test))
    assert clone._fd is None and len(pickle.dumps(test)) < 20_000  # reopened by path, pixels not pickled
    assert torch.equal(cached(clone), expected)
    loader = DataLoader(test, batch_size=3, num_workers=2, shuffle=False)
    batches = [(test.device_transform(x), y) for x, y in loader]
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)
    assert torch.cat([y for _, y in batches]).tolist() == test.targets


def test_fgvc_eval_cache_equals_decode_path(tmp_path, monkeypatch, small_chunks):
    write_fgvc(tmp_path, monkeypatch)
    _, slow = build_datasets("fgvc", tmp_path, "dogs", input_size=12, normalization="imagenet")
    train, quick = build_datasets("fgvc", tmp_path, "dogs", input_size=12, normalization="imagenet",
                                  cache=True, cache_workers=2)
    assert quick.samples == slow.samples and quick.targets == slow.targets and quick.targets == [1, 0, 2, 1]
    assert torch.equal(cached(quick), decoded(slow))
    assert train.name == "stanford_dogs/train+val" and train.targets == [1, 0, 2, 1, 0, 1, 0]
    assert not quick.device_transform.flip and train.device_transform.flip


def test_fgvc_train_crop_draws_the_numbers_torchvision_draws(tmp_path, monkeypatch, small_chunks):
    write_fgvc(tmp_path, monkeypatch)
    size = 12
    train = load_cached_split("fgvc", tmp_path, "dogs", ("train", "val"), input_size=size, train=True,
                              workers=2)
    source = fgvc.load_split(tmp_path, "dogs", ("train", "val"))
    resize, random_crop = fgvc_transforms(size)[0].transforms[:2]
    for i in range(len(train)):
        resized = np.asarray(resize(source[i][0])).transpose(2, 0, 1)  # (3, h, w): what the cache stores
        assert min(resized.shape[1:]) == round(size * 256 / 224)
        # The crop lies inside the resized image: it is one of its windows, at the offsets torchvision draws.
        torch.manual_seed(100 + i)
        top = torch.randint(0, resized.shape[1] - size + 1, size=(1,)).item()
        left = torch.randint(0, resized.shape[2] - size + 1, size=(1,)).item()
        torch.manual_seed(100 + i)
        crop, label = train[i]
        assert crop.shape == (3, size, size) and crop.dtype == torch.uint8 and label == train.targets[i]
        assert np.array_equal(crop.numpy(), resized[:, top:top + size, left:left + size])
        # ... and equals torchvision's RandomCrop on the decode path under the same seed.
        torch.manual_seed(100 + i)
        reference = np.asarray(random_crop(resize(source[i][0]))).transpose(2, 0, 1)
        assert np.array_equal(crop.numpy(), reference)
    crops = {tuple(train[1][0].flatten()[:50].tolist()) for _ in range(20)}
    assert len(crops) > 1  # the crop is random (image 1 is 41 px tall -> 14x28 after the resize)


def test_device_flip_rate_and_exactness():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2000, 3, 4, 5), dtype=torch.uint8)
    plain = DeviceTransform((IMAGENET_MEAN, IMAGENET_STD))(images)
    out = DeviceTransform((IMAGENET_MEAN, IMAGENET_STD), flip=True)(images)
    flipped = torch.tensor([torch.equal(o, p.flip(-1)) for o, p in zip(out, plain)])
    kept = torch.tensor([torch.equal(o, p) for o, p in zip(out, plain)])
    assert bool((flipped ^ kept).all())  # each sample is exactly itself or its mirror image
    assert 0.45 < flipped.float().mean().item() < 0.55
    with pytest.raises(TypeError, match="expects uint8"):
        DeviceTransform()(images.float())


def test_training_on_the_cache_matches_the_decode_path(tmp_path):
    """The engine applies the dataset's device transform: the same losses and accuracies as decoding."""
    import tiny_models as tm

    import visadapt
    from visadapt.engine import TrainConfig, fit, make_accelerator, seed_everything

    write_vtab(tmp_path, counts=(10, 2, 6))
    histories = []
    for use_cache in (False, True):
        seed_everything(0)
        model = tm.vit(num_classes=47)
        visadapt.attach(model, "adapter", head="head")
        train, test = build_datasets("vtab", tmp_path, "dtd", input_size=32, normalization="imagenet",
                                     cache=use_cache)
        config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, warmup_epochs=0, progress=False)
        result = fit(model, train, test, config, accelerator=make_accelerator(None, log_with=None))
        histories.append(result.history)
    assert histories[0] == histories[1] and len(histories[0]) == 2


# ------------------------------------------------------------------------------------------ stale / corrupt


def test_changed_split_file_rebuilds_and_removes_the_old_cache(tmp_path):
    task_dir = write_vtab(tmp_path)
    _, before = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    folder = task_dir / cache.CACHE_DIRNAME
    assert before.cache_path.parent == folder and before.cache_path.name in cache_files(folder)
    lines = (task_dir / "test.txt").read_text().splitlines(keepends=True)
    (task_dir / "test.txt").write_text("".join(lines[1:] + lines[:1]))  # same images, another order
    _, plain = build_datasets("vtab", tmp_path, "dtd", input_size=12)
    _, after = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    assert after.cache_path != before.cache_path and not before.cache_path.exists()
    assert after.targets == plain.targets and torch.equal(cached(after), decoded(plain))
    assert len([f for f in cache_files(folder) if f.startswith("test.")]) == 1


def test_image_replaced_in_place_rebuilds(tmp_path):
    task_dir = write_vtab(tmp_path)
    _, before = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    write_jpeg(task_dir / "images/test/000000.jpg", 999, (50, 50))  # new content, same path and split file
    _, plain = build_datasets("vtab", tmp_path, "dtd", input_size=12)
    _, after = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    assert after.cache_path != before.cache_path and torch.equal(cached(after), decoded(plain))


def _rewrite_header(path, change):
    """Rewrite a cache file's JSON header with ``change(header)`` applied (trailer length updated)."""
    raw = path.read_bytes()
    length, magic = struct.unpack("<Q8s", raw[-16:])
    data, header = raw[:-16 - length], json.loads(raw[-16 - length:-16])
    change(header)
    blob = json.dumps(header).encode()
    path.write_bytes(data + blob + struct.pack("<Q8s", len(blob), magic))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path):
    raw = bytearray(path.read_bytes())
    length = struct.unpack("<Q", raw[-16:-8])[0]
    raw[-16 - length:-16 - length + 8] = b"#garble#"
    path.write_bytes(bytes(raw))


def _drop_magic(path):
    path.write_bytes(path.read_bytes()[:-8] + b"XXXXXXXX")


def _flip_data_bytes(path):
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    raw[101] ^= 0x01
    path.write_bytes(bytes(raw))


def _cut_data(path):
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[-16:-8])[0]
    path.write_bytes(raw[:50] + raw[-16 - length:])  # header intact, most of the data gone


def _wrong_count(path):
    _rewrite_header(path, lambda h: h.update(count=h["count"] + 1))


def _wrong_labels(path):
    _rewrite_header(path, lambda h: h.update(labels=h["labels"][::-1]))


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "no header at the end of the file"),
    (_drop_magic, "no header at the end of the file"),
    (_garble_header, "the header is not valid JSON"),
    (_flip_data_bytes, "checksum mismatch in 1 of"),
    (_cut_data, "bytes of data, the header expects"),
    (_wrong_count, "the header counts 8 images, the split lists 7"),
    (_wrong_labels, "labels in the header differ"),
])
def test_corrupt_cache_is_detected_warned_and_rebuilt(tmp_path, caplog, damage, reason):
    write_vtab(tmp_path)
    _, plain = build_datasets("vtab", tmp_path, "dtd", input_size=12)
    _, first = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    damage(first.cache_path)
    with caplog.at_level(logging.WARNING, logger="visadapt"):
        _, rebuilt = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert reason in warnings[0].getMessage() and str(first.cache_path) in warnings[0].getMessage()
    assert "rebuilding it" in warnings[0].getMessage()
    assert rebuilt.cache_path == first.cache_path and torch.equal(cached(rebuilt), decoded(plain))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visadapt"):
        build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    assert not caplog.records  # the rebuilt file passes every check


def test_fgvc_train_ragged_cache_corruption_is_detected(tmp_path, monkeypatch, caplog):
    write_fgvc(tmp_path, monkeypatch)
    train, _ = build_datasets("fgvc", tmp_path, "dogs", input_size=12, cache=True)
    torch.manual_seed(3)
    expected = train[0][0]  # read before the header is damaged in place (the dataset refuses reads after)
    _rewrite_header(train.cache_path, lambda h: h["shapes"][0].__setitem__(0, h["shapes"][0][0] + 1))
    with caplog.at_level(logging.WARNING, logger="visadapt"):
        again, _ = build_datasets("fgvc", tmp_path, "dogs", input_size=12, cache=True)
    assert "shapes in the header do not add up" in caplog.text
    torch.manual_seed(3)
    assert torch.equal(again[0][0], expected)


# ------------------------------------------------------------------------------------------ location / races


def test_unwritable_data_folder_names_cache_dir(tmp_path):
    task_dir = write_vtab(tmp_path)
    (task_dir / cache.CACHE_DIRNAME).write_text("a file where the cache folder would go")
    with pytest.raises(DatasetError, match="--cache-dir") as err:
        build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True)
    assert str(task_dir / cache.CACHE_DIRNAME) in str(err.value) and "next to the data" in str(err.value)
    elsewhere = tmp_path / "caches"
    _, test = build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True, cache_dir=elsewhere)
    assert test.cache_path.parent == elsewhere / "vtab" / "dtd"
    with pytest.raises(ValueError, match="pass cache=True"):
        build_datasets("vtab", tmp_path, "dtd", input_size=12, cache_dir=elsewhere)


def test_unreadable_image_fails_the_build_and_leaves_no_file(tmp_path, small_chunks):
    task_dir = write_vtab(tmp_path)
    (task_dir / "images/test/000003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot read image .*000003\.jpg \(listed at .*test\.txt:4\)"):
        build_datasets("vtab", tmp_path, "dtd", input_size=12, cache=True, cache_workers=2)
    folder = task_dir / cache.CACHE_DIRNAME
    assert not [p for p in folder.iterdir() if p.name.startswith("test.")]


def _race_build(root, barrier, results):
    real_build = cache._build

    def build_after_barrier(*args, **kwargs):
        barrier.wait(timeout=30)  # both processes have missed the cache and are about to build it
        return real_build(*args, **kwargs)

    cache._build = build_after_barrier
    dataset = load_cached_split("vtab", root, "dtd", "test", input_size=12, workers=1)
    results.put((str(dataset.cache_path), cached(dataset).numpy().tobytes()))


def test_two_racing_builds_leave_one_valid_cache(tmp_path, caplog):
    write_vtab(tmp_path)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_build, args=(tmp_path, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    _, plain = build_datasets("vtab", tmp_path, "dtd", input_size=12)
    (path_a, pixels_a), (path_b, pixels_b) = outcomes
    assert path_a == path_b and pixels_a == pixels_b == decoded(plain).numpy().tobytes()
    folder = tmp_path / "dtd" / cache.CACHE_DIRNAME
    assert [p.name for p in folder.iterdir() if p.name.startswith("test.")] == [path_a.rsplit("/", 1)[1]]
    with caplog.at_level(logging.WARNING, logger="visadapt"):
        again = load_cached_split("vtab", tmp_path, "dtd", "test", input_size=12)
    assert not caplog.records and torch.equal(cached(again), decoded(plain))


# ------------------------------------------------------------------------------------------ synthetic suite


def test_synthetic_vtab_layout_sizes_labels_and_reuse(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "synthetic_vtab", Path(__file__).resolve().parents[1] / "eval" / "bench" / "synthetic_vtab.py")
    synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic)
    assert sum(synthetic.VTAB1K_TEST_SIZES.values()) == 387_904
    root = synthetic.make_synthetic_vtab(tmp_path, scale=0.01, image_size=16, tasks="kitti", workers=1)
    sizes = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 8}  # 711 x 0.01 -> 2 per class
    for split, count in sizes.items():
        ds = vtab.load_split(root, "vtab", "kitti", split)
        assert len(ds) == count and set(ds.targets) == {0, 1, 2, 3}
    with Image.open(ds.samples[0][0]) as img:
        assert img.format == "JPEG" and img.size == (16, 16)
    marker = root / "kitti" / synthetic.MARKER
    stamp = marker.stat().st_mtime_ns
    synthetic.make_synthetic_vtab(tmp_path, scale=0.01, image_size=16, tasks="kitti", workers=1)
    assert marker.stat().st_mtime_ns == stamp  # a complete task folder is reused
