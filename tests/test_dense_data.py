"""Multi-task dense data: the procedural scenes' ground truth is consistent and deterministic, the joint transforms
move normals with the image, and the PASCAL-Context loader reads the MTLoRA layout and names every bad file."""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from visadapt.data import DatasetError, dense
from visadapt.data.dense import (
    IGNORE_INDEX,
    PASCAL_PERSON_CLASS,
    SCENE_CLASSES,
    SCENE_PARTS,
    SCENE_PERSON_CLASS,
    DenseTransform,
    PascalContextMultiTask,
    ProceduralDenseScenes,
    hflip_sample,
    render_dense_scene,
    resize_sample,
    scale_rotate_sample,
    scene_rng,
)

torch.set_num_threads(1)

SCENES = [render_dense_scene(scene_rng(0, "train", i), 48) for i in range(40)]


# ------------------------------------------------------------------------------------------ procedural


def test_scene_ground_truth_is_consistent():
    with_person = 0
    for scene in SCENES:
        assert scene.image.shape == (48, 48, 3) and scene.image.dtype == np.uint8
        assert scene.semseg.max() < len(SCENE_CLASSES)
        # Parts exist exactly where the person class is visible, and nowhere in an image without a person.
        person = scene.semseg == SCENE_PERSON_CLASS
        if person.any():
            with_person += 1
            assert scene.human_parts.max() < len(SCENE_PARTS)
            assert np.array_equal(scene.human_parts > 0, person)
        else:
            assert (scene.human_parts == IGNORE_INDEX).all()
        # Saliency is one whole object: the hero, and all of it.
        assert set(np.unique(scene.sal)) <= {0, 1} and scene.sal.sum() > 0
        assert np.array_equal(scene.sal == 1, scene.instances == scene.hero)
        assert scene.hero == scene.instances.max()  # drawn last, in front of everything
        # Normals: unit vectors facing the viewer, with analytic variety (not one flat plane).
        lengths = np.linalg.norm(scene.normals, axis=-1)
        np.testing.assert_allclose(lengths, 1.0, atol=1e-5)
        assert (scene.normals[..., 2] >= -1e-6).all()
        assert np.abs(scene.normals[..., :2]).max() > 0.3
    assert 8 <= with_person <= 32  # about half the scenes hold a person


def test_shading_follows_the_normals():
    # The image is lit from the upper left: pixels turned towards the light are brighter than those turned away.
    toward, away = [], []
    for scene in SCENES:
        brightness = scene.image.astype(float).mean(axis=-1)
        lit = scene.normals @ scene.light
        objects = scene.instances > 0
        toward.append(brightness[objects & (lit > 0.9)])
        away.append(brightness[objects & (lit < 0.2)])
    assert np.concatenate(toward).mean() > 1.5 * np.concatenate(away).mean()


def test_samples_follow_the_shared_interface():
    data = ProceduralDenseScenes("val", size=32, num_samples=6, cache=False)
    assert data.tasks == ("semseg", "human_parts", "sal", "normals")
    assert data.task_outputs == {"semseg": 6, "human_parts": 5, "sal": 1, "normals": 3}
    sample = data[0]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["image"].min() < 0  # ImageNet-normalised by default
    for task in ("semseg", "human_parts", "sal"):
        assert sample[task].shape == (32, 32) and sample[task].dtype == torch.int64
    assert sample["normals"].shape == (3, 32, 32) and sample["normals"].dtype == torch.float32
    torch.testing.assert_close(sample["normals"].norm(dim=0), torch.ones(32, 32))
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    assert batch["normals"].shape == (4, 3, 32, 32)

    subset = ProceduralDenseScenes("val", size=32, num_samples=6, tasks=["normals", "sal"], normalization=None,
                                   cache=False)
    assert subset.tasks == ("sal", "normals") and set(subset[0]) == {"image", "sal", "normals"}
    assert subset[0]["image"].min() >= 0 and subset[0]["image"].max() <= 1
    with pytest.raises(ValueError, match="depth"):
        ProceduralDenseScenes("val", size=32, num_samples=2, tasks=["depth"], cache=False)


def _digest(array) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_scenes_are_deterministic_and_splits_disjoint():
    a = ProceduralDenseScenes("train", size=32, num_samples=30, cache=False)
    b = ProceduralDenseScenes("train", size=32, num_samples=10, cache=False)  # item i does not depend on the count
    for i in range(10):
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key]), key
    other_seed = ProceduralDenseScenes("train", size=32, num_samples=3, seed=1, cache=False)
    assert not torch.equal(a[0]["image"], other_seed[0]["image"])
    val = ProceduralDenseScenes("val", size=32, num_samples=30, cache=False)
    train_images = {_digest(a.raw_sample(i)["image"].numpy()) for i in range(len(a))}
    val_images = {_digest(val.raw_sample(i)["image"].numpy()) for i in range(len(val))}
    assert len(train_images) == 30 and len(val_images) == 30 and not train_images & val_images


def test_scene_cache_is_reused(tmp_path, monkeypatch):
    first = ProceduralDenseScenes("val", size=24, num_samples=4, cache=tmp_path)
    assert first.cache_path.parent == tmp_path and first.cache_path.is_file()

    def no_rendering(*args, **kwargs):
        raise AssertionError("the cached scenes should have been loaded, not rendered again")

    monkeypatch.setattr(dense, "render_dense_scenes", no_rendering)
    again = ProceduralDenseScenes("val", size=24, num_samples=4, cache=tmp_path)
    for key, value in first[3].items():
        assert torch.equal(value, again[3][key])
    monkeypatch.setenv("VISADAPT_CACHE", str(tmp_path / "home"))
    assert dense.default_scene_cache_dir().parent == tmp_path / "home"


# ------------------------------------------------------------------------------------------ transforms


def _raw_scene_sample(index: int = 0) -> dict[str, torch.Tensor]:
    return ProceduralDenseScenes("train", size=32, num_samples=index + 1, cache=False).raw_sample(index)


def test_flip_mirrors_maps_and_negates_normals_x():
    sample = _raw_scene_sample()
    sample["normals"][:, :2, :3] = IGNORE_INDEX  # a few ignored pixels must stay ignored, not become -255
    flipped = hflip_sample(sample)
    for key in ("image", "semseg", "human_parts", "sal"):
        assert torch.equal(flipped[key], sample[key].flip(-1))
    mirrored = sample["normals"].flip(-1)
    ignored = (mirrored == IGNORE_INDEX).all(dim=0)
    assert torch.equal(flipped["normals"][0][~ignored], -mirrored[0][~ignored])
    assert torch.equal(flipped["normals"][1:], mirrored[1:])
    assert (flipped["normals"][:, ignored] == IGNORE_INDEX).all() and ignored.sum() == 6
    assert torch.equal(hflip_sample(flipped)["normals"], sample["normals"])


def test_rotation_turns_normals_with_the_image():
    size = 33
    normals = torch.zeros(3, size, size)
    normals[0] = 1.0  # every surface faces right
    image = torch.zeros(3, size, size)
    image[:, 16, 26] = 1.0  # a bright dot right of the centre
    labels = torch.zeros(size, size, dtype=torch.long)
    labels[16, 20:] = 3
    out = scale_rotate_sample({"image": image, "semseg": labels, "normals": normals}, angle=90.0, scale=1.0)
    # 90 degrees counter-clockwise on screen: right becomes up (y points down), the dot moves above the centre.
    centre = out["normals"][:, 16, 16]
    torch.testing.assert_close(centre, torch.tensor([0.0, -1.0, 0.0]), atol=1e-5, rtol=0)
    assert torch.nonzero(out["image"][0] == out["image"][0].max()).tolist() == [[6, 16]]
    assert (out["semseg"][:13, 16] == 3).all() and (out["semseg"][17:, 16] == 0).all()

    zoomed_out = scale_rotate_sample({"semseg": labels, "normals": normals}, angle=0.0, scale=0.5)
    assert (zoomed_out["semseg"][0] == IGNORE_INDEX).all()  # what comes from outside the image is ignored
    assert (zoomed_out["normals"][:, 0] == IGNORE_INDEX).all()
    assert zoomed_out["semseg"][16, 16] == 0 and zoomed_out["semseg"][16, 23] == 3


def test_training_transform_keeps_targets_valid():
    sample = _raw_scene_sample(1)
    transform = DenseTransform(40, train=True)
    for seed in range(4):
        torch.manual_seed(seed)
        out = transform(sample)
        assert out["image"].shape == (3, 40, 40) and out["semseg"].shape == (40, 40)
        labels = out["semseg"].unique().tolist()
        assert set(labels) <= set(range(len(SCENE_CLASSES))) | {IGNORE_INDEX}
        normals = out["normals"]
        valid = (normals != IGNORE_INDEX).all(dim=0)
        assert valid.float().mean() > 0.5
        torch.testing.assert_close(normals[:, valid].norm(dim=0), torch.ones(int(valid.sum())))
    resized = resize_sample(sample, 16)
    assert set(resized["sal"].unique().tolist()) <= {0, 1}
    assert "DenseTransform(size=40, train" in repr(transform)


# ------------------------------------------------------------------------------------------ PASCAL-Context

IDS = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_pascal(root, with_mat: bool):
    """A tiny PASCAL_MT folder: 12x16 images; semseg in VOC12 for one id and pascal-context for the others."""
    height, width = 12, 16
    for split, ids in IDS.items():
        split_file = root / "ImageSets" / "Context" / f"{split}.txt"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("".join(f"{i}\n" for i in ids))
        for k, image_id in enumerate(ids):
            (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (width, height), (40 * k, 100, 200)).save(root / "JPEGImages" / f"{image_id}.jpg")
            semseg = np.zeros((height, width), np.uint8)
            semseg[2:6, 3:9] = PASCAL_PERSON_CLASS
            semseg[0, :] = IGNORE_INDEX
            folder = "VOC12" if k == 0 else "pascal-context"
            _write_png(root / "semseg" / folder / f"{image_id}.png", semseg)
            sal = np.zeros((height, width), np.uint8)
            sal[2:6, 3:9] = 200
            sal[7, 7] = 100  # below the 0.5 threshold
            _write_png(root / "sal_distill" / f"{image_id}.png", sal)
            normals = np.zeros((height, width, 3), np.uint8)
            normals[...] = (255, 128, 128)  # decodes to (1, 0.004, 0.004): pointing right
            _write_png(root / "normals_distill" / f"{image_id}.png", normals)
            if with_mat:
                _write_mat_files(root, image_id, height, width)


def _write_mat_files(root, image_id, height, width):
    import scipy.io

    context = np.full((height, width), 2, np.uint16)  # aeroplane: no normals there
    context[:, 8:] = 440  # wall: NYU-compatible, normals kept
    (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": context})

    def mask(rows, cols):
        m = np.zeros((height, width), np.uint8)
        m[rows, cols] = 1
        return m

    part_dtype = [("part_name", object), ("mask", object)]
    object_dtype = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    person_parts = np.zeros((1, 4), dtype=part_dtype)
    person_parts[0, 0] = ("hair", mask(slice(2, 3), slice(3, 9)))
    person_parts[0, 1] = ("torso", mask(slice(3, 4), slice(3, 9)))
    person_parts[0, 2] = ("llarm", mask(slice(4, 5), slice(3, 9)))
    person_parts[0, 3] = ("rfoot", mask(slice(5, 6), slice(3, 9)))
    horse_parts = np.zeros((1, 1), dtype=part_dtype)
    horse_parts[0, 0] = ("head", mask(slice(8, 10), slice(0, 4)))
    objects = np.zeros((1, 2), dtype=object_dtype)
    objects[0, 0] = ("person", np.array([[PASCAL_PERSON_CLASS]]), mask(slice(2, 6), slice(3, 9)), person_parts)
    objects[0, 1] = ("horse", np.array([[13]]), mask(slice(8, 10), slice(0, 4)), horse_parts)
    if image_id == IDS["train"][1]:
        objects = objects[:, 1:]  # only the horse: no person, parts unlabelled
    (root / "human_parts").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "human_parts" / f"{image_id}.mat", {"anno": {"imname": image_id, "objects": objects}})


def test_pascal_semseg_and_saliency_without_scipy(tmp_path, monkeypatch):
    _write_pascal(tmp_path, with_mat=False)
    data = PascalContextMultiTask(tmp_path, "train", size=24, tasks=("sal", "semseg"), train=False)
    assert len(data) == 2 and data.tasks == ("semseg", "sal") and data.task_outputs == {"semseg": 21, "sal": 1}
    raw = data.raw_sample(1)  # its semseg is under semseg/pascal-context
    assert raw["semseg"][3, 4] == PASCAL_PERSON_CLASS and raw["semseg"][0, 0] == IGNORE_INDEX
    assert raw["sal"].sum() == 24 and raw["sal"][7, 7] == 0
    sample = data[0]
    assert sample["image"].shape == (3, 24, 24) and sample["semseg"].shape == (24, 24)
    assert set(sample["semseg"].unique().tolist()) == {0, PASCAL_PERSON_CLASS, IGNORE_INDEX}

    monkeypatch.setitem(sys.modules, "scipy", None)  # as if scipy were not installed
    with pytest.raises(ImportError, match=r"pip install .visadapt\[pascal\]."):
        PascalContextMultiTask(tmp_path, "train", tasks=("semseg", "human_parts"))


def test_pascal_parts_and_normals(tmp_path):
    pytest.importorskip("scipy", reason="human parts and the normals mask are .mat files, read with scipy")
    _write_pascal(tmp_path, with_mat=True)
    data = PascalContextMultiTask(tmp_path, "train", size=16, train=False)
    assert data.task_outputs == {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}
    raw = data.raw_sample(0)
    parts = raw["human_parts"]
    # hair -> head (1), torso -> torso (2), llarm -> lower arm (4), rfoot -> lower leg (6); the horse's head is
    # not a person part, and everything else is background.
    assert parts[2, 4] == 1 and parts[3, 4] == 2 and parts[4, 4] == 4 and parts[5, 4] == 6
    assert parts[9, 1] == 0 and parts[0, 0] == 0
    assert (data.raw_sample(1)["human_parts"] == IGNORE_INDEX).all()  # no person in that image
    normals = raw["normals"]
    assert (normals[:, :, :8] == IGNORE_INDEX).all()  # aeroplane pixels: not an NYU class
    torch.testing.assert_close(normals[:, :, 8:].norm(dim=0), torch.ones(12, 8))
    assert (normals[0, :, 8:] > 0.99).all()
    sample = data[0]
    assert sample["normals"].shape == (3, 16, 16) and sample["human_parts"].shape == (16, 16)

    torch.manual_seed(0)
    augmented = PascalContextMultiTask(tmp_path, "train", size=16, train=True)
    directions = set()
    for _ in range(12):
        normals = augmented[0]["normals"]
        x = normals[0][(normals != IGNORE_INDEX).all(dim=0)]
        assert (x > 0).all() or (x < 0).all()
        directions.add(bool(x[0] > 0))
    assert directions == {True, False}  # flipped samples point left, the others right (rotation keeps the sign)


def test_pascal_errors_name_the_files(tmp_path):
    _write_pascal(tmp_path, with_mat=False)
    with pytest.raises(DatasetError, match="unknown PASCAL-Context split 'test'"):
        PascalContextMultiTask(tmp_path, "test", tasks=("semseg",))
    (tmp_path / "ImageSets" / "Context" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"split file .*ImageSets/Context/val\.txt does not exist.*train\.txt"):
        PascalContextMultiTask(tmp_path, "val", tasks=("semseg",))
    with pytest.raises(DatasetError, match="does not exist or is not a directory"):
        PascalContextMultiTask(tmp_path / "nowhere", "train", tasks=("semseg",))

    for image_id in IDS["train"]:
        (tmp_path / "sal_distill" / f"{image_id}.png").unlink()
    (tmp_path / "semseg" / "pascal-context" / f"{IDS['train'][1]}.png").unlink()
    with pytest.raises(DatasetError) as caught:
        PascalContextMultiTask(tmp_path, "train", tasks=("semseg", "sal"))
    message = str(caught.value)
    assert "sal: 2 missing" in message and "semseg: 1 missing" in message  # every missing file, at once
    for image_id in IDS["train"]:
        assert f"sal_distill/{image_id}.png" in message
    assert f"semseg/VOC12/{IDS['train'][1]}.png or " in message
    assert "PASCAL_MT.tgz" in message


def test_pascal_unreadable_files_are_named(tmp_path):
    _write_pascal(tmp_path, with_mat=False)
    broken = tmp_path / "JPEGImages" / f"{IDS['train'][1]}.jpg"
    broken.write_bytes(b"not a jpeg")
    data = PascalContextMultiTask(tmp_path, "train", size=16, tasks=("semseg",))
    with pytest.raises(DatasetError, match=rf"cannot read image .*{IDS['train'][1]}\.jpg"):
        data[1]
    bad_label = np.full((12, 16), 40, np.uint8)  # not a 21-class map
    _write_png(tmp_path / "semseg" / "VOC12" / f"{IDS['train'][0]}.png", bad_label)
    with pytest.raises(DatasetError) as caught:
        data.verify()
    message = str(caught.value)
    assert "2 of 2 images" in message and f"{IDS['train'][1]}.jpg" in message
    assert f"VOC12/{IDS['train'][0]}.png is not a 21-class label map" in message


def test_pascal_tables_match_mtlora():
    assert len(dense.PASCAL_CLASSES) == 21 and dense.PASCAL_CLASSES[PASCAL_PERSON_CLASS] == "person"
    assert sorted(set(dense.PASCAL_PERSON_PART_GROUPS.values())) == [1, 2, 3, 4, 5, 6]
    assert len(dense.PASCAL_PERSON_PART_GROUPS) == 24
    assert len(dense.PASCAL_NORMALS_VALID_CLASSES) == 170 and 427 in dense.PASCAL_NORMALS_VALID_CLASSES
    assert len(dense.PASCAL_PARTS) == 7 and dense.PASCAL_TASK_OUTPUTS["human_parts"] == 7
