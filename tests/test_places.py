"""Place recognition data: the benchmark folder reader on hand-made folders (coordinates, positives, every kind of
bad folder named in the error), the training triplets (radii, drops, mining checks, determinism), and the
generated mini-places (deterministic, every query has its own place as a positive)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from visadapt.data.errors import DatasetError
from visadapt.data.places import MANIFEST, PlaceSplit, TripletDataset, generate_mini_places, parse_utm

E0, N0 = 500_000.0, 4_500_000.0  # a UTM-like origin, so the tests see coordinates of real magnitude


def utm_name(east, north, tag, ext="png"):
    return f"@{east:.2f}@{north:.2f}@{tag}@.{ext}"


def write_image(path, colour=(10, 200, 30), size=(4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_split(root, split, database, queries):
    """Tiny PNGs named after their (x, y) offsets from the origin, in metres; each image a colour of its own."""
    for kind, offsets in (("database", database), ("queries", queries)):
        for i, (x, y) in enumerate(offsets):
            write_image(root / "images" / split / kind / utm_name(E0 + x, N0 + y, f"{kind}{i:03d}"),
                        (i * 20 % 256, 100 if kind == "database" else 50, 7))
    return root


# --------------------------------------------------------------------------------------------- parse_utm

@pytest.mark.parametrize("name, expected", [
    ("@0543256.96@4178906.70@10@S@037.75643@-122.50954@@.jpg", (543256.96, 4178906.70)),
    ("/data/pitts30k/images/test/queries/@500000@4500000.5@x@.png", (500000.0, 4500000.5)),
    ("@-12.5@7@@.jpeg", (-12.5, 7.0)),
])
def test_parse_utm_reads_east_and_north(name, expected):
    assert parse_utm(name) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["photo.jpg", "@abc@4500000@x@.jpg", "500000@4500000@x@.jpg", "@500000@.jpg",
                                  "@nan@4500000@x@.jpg", "@500000@inf@x@.jpg", ""])
def test_parse_utm_rejects_names_without_coordinates(name):
    with pytest.raises(DatasetError, match="@<utm_east>@<utm_north>") as err:
        parse_utm(name)
    assert repr(name) in str(err.value)


# --------------------------------------------------------------------------------------------- PlaceSplit

def test_place_split_reads_sorted_files_coordinates_and_images(tmp_path):
    write_split(tmp_path, "test", [(0, 0), (30, 0), (0, 40)], [(1, 1), (29, 2)])
    (tmp_path / "images/test/database/notes.txt").write_text("not an image extension: ignored")
    split = PlaceSplit(tmp_path, "test")
    assert split.database_paths == sorted(split.database_paths) and split.num_database == 3
    assert split.num_queries == 2
    assert split.database_utm.dtype == torch.float64 and split.database_utm.shape == (3, 2)
    expected = torch.tensor([parse_utm(p.name) for p in split.query_paths], dtype=torch.float64)
    assert torch.equal(split.query_utm, expected)

    img = split.load_database(1)
    assert img.shape == (3, 4, 4) and img.dtype == torch.float32
    colour = np.array(Image.open(split.database_paths[1]))[0, 0]
    assert torch.allclose(img[:, 0, 0], torch.tensor(colour / 255.0, dtype=torch.float32))
    db, queries = split.database_dataset(), split.query_dataset()
    assert len(db) == 3 and len(queries) == 2
    image, index = queries[1]
    assert index == 1 and torch.equal(image, split.load_query(1))

    sized = PlaceSplit(tmp_path, "test", transform=lambda pil: torch.tensor(pil.size))
    assert sized.load_query(0).tolist() == [4, 4]


def test_positives_match_a_brute_force_search(tmp_path):
    rng = np.random.default_rng(3)
    database = [tuple(p) for p in rng.uniform(0, 120, (25, 2)).round(2)] + [(0.0, 0.0)]
    queries = [tuple(p) for p in rng.uniform(0, 120, (15, 2)).round(2)] + [(15.0, 20.0)]  # exactly 25 m away
    split = PlaceSplit(write_split(tmp_path, "val", database, queries), "val")
    for radius in (25.0, 10.0, 0.0):
        found = split.positives(radius)
        assert len(found) == split.num_queries
        for q, qpath in enumerate(split.query_paths):
            qe, qn = parse_utm(qpath.name)
            reference = [i for i, dpath in enumerate(split.database_paths)
                         if math.hypot(parse_utm(dpath.name)[0] - qe, parse_utm(dpath.name)[1] - qn) <= radius]
            assert found[q].dtype == torch.int64
            assert found[q].tolist() == reference
    assert any(len(p) > 1 for p in split.positives(25.0))  # the random layout does exercise several hits
    boundary = next(q for q, p in enumerate(split.query_paths) if p.name.startswith(f"@{E0 + 15:.2f}@"))
    origin = next(i for i, p in enumerate(split.database_paths) if p.name.startswith(f"@{E0:.2f}@{N0:.2f}@"))
    assert origin in split.positives(25.0)[boundary].tolist()  # the radius is inclusive
    assert origin not in split.positives(24.99)[boundary].tolist()


def test_missing_folders_and_root_are_named(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nowhere"))):
        PlaceSplit(tmp_path / "nowhere", "test")
    write_split(tmp_path, "test", [(0, 0)], [(1, 1)])
    with pytest.raises(DatasetError) as err:
        PlaceSplit(tmp_path, "val")
    message = str(err.value)
    # Both missing folders at once, with the expected layout.
    assert str(tmp_path / "images" / "val" / "database") in message
    assert str(tmp_path / "images" / "val" / "queries") in message
    assert "<root>/images/<split>/database" in message
    with pytest.raises(DatasetError, match="pass its parent"):
        PlaceSplit(tmp_path / "images", "test")
    with pytest.raises(DatasetError, match="unknown place-recognition split 'training'"):
        PlaceSplit(tmp_path, "training")


def test_empty_folder_and_bad_names_are_reported_together(tmp_path):
    (tmp_path / "images/train/database").mkdir(parents=True)
    for i in range(13):
        write_image(tmp_path / "images/train/queries" / f"query_{i:02d}.jpg")
    write_image(tmp_path / "images/train/queries" / utm_name(E0, N0, "ok", "jpg"))
    with pytest.raises(DatasetError) as err:
        PlaceSplit(tmp_path, "train")
    message = str(err.value)
    assert f"folder {tmp_path / 'images/train/database'} holds no" in message
    assert f"13 of 14 file names in {tmp_path / 'images/train/queries'}" in message
    assert "query_00.jpg" in message and "query_09.jpg" in message
    assert "query_10.jpg" not in message and "... and 3 more" in message


def test_unreadable_image_fails_when_loaded_with_its_path(tmp_path):
    write_split(tmp_path, "test", [(0, 0)], [(1, 1)])
    broken = tmp_path / "images/test/database" / utm_name(E0 + 50, N0, "broken", "jpg")
    broken.write_bytes(b"not a jpeg")
    split = PlaceSplit(tmp_path, "test")
    index = split.database_paths.index(broken)
    with pytest.raises(DatasetError, match=re.escape(str(broken))):
        split.load_database(index)


# ------------------------------------------------------------------------------------------ TripletDataset

# Database every 50 m along a street, plus one 20 m past the third (neither positive nor negative for the
# query 8 m past the third). Queries: 3 m from db 0, 8 m from db 2, and one 30 m off the street (dropped).
STREET_DB = [(0, 0), (50, 0), (100, 0), (150, 0), (200, 0), (250, 0), (128, 0)]
STREET_Q = [(3, 0), (108, 0), (75, 30)]


def street(tmp_path):
    return PlaceSplit(write_split(tmp_path, "train", STREET_DB, STREET_Q), "train")


def db_index(split, x):
    return next(i for i, p in enumerate(split.database_paths) if parse_utm(p.name)[0] == pytest.approx(E0 + x))


def distance(split, q, d):
    return float((split.query_utm[q] - split.database_utm[d]).norm())


def test_triplets_have_near_positives_far_negatives_and_report_drops(tmp_path):
    split = street(tmp_path)
    triplets = TripletDataset(split, negatives_per_query=3)
    assert len(triplets) == 2 and triplets.dropped == 1
    assert [parse_utm(split.query_paths[int(q)].name)[0] - E0 for q in triplets.query_indices] == \
        pytest.approx([3, 108])
    assert triplets.positive_indices.tolist() == [db_index(split, 0), db_index(split, 100)]
    for i in range(len(triplets)):
        q = int(triplets.query_indices[i])
        assert all(distance(split, q, int(d)) <= 10 for d in triplets.candidate_positives[i])
        negatives = triplets.negative_indices[i]
        assert len(set(negatives.tolist())) == 3
        assert all(distance(split, q, int(d)) > 25 for d in negatives)
        images, index = triplets[i]
        assert images.shape == (5, 3, 4, 4) and index == i
        assert torch.equal(images[0], split.load_query(q))
        assert torch.equal(images[1], split.load_database(int(triplets.positive_indices[i])))
        assert torch.equal(images[2], split.load_database(int(negatives[0])))
    # The database image 20 m from the second query is neither its positive nor a negative.
    mask = triplets.negative_mask(1)
    assert mask.dtype == torch.bool and mask.shape == (7,)
    assert not mask[db_index(split, 128)] and not mask[db_index(split, 100)] and mask[db_index(split, 150)]


def test_triplet_negatives_are_deterministic_per_seed_and_epoch(tmp_path):
    split = street(tmp_path)
    a, b = TripletDataset(split, seed=5), TripletDataset(split, seed=5)
    assert torch.equal(a.negative_indices, b.negative_indices)
    first = a.negative_indices.clone()
    draws = []
    for epoch in range(1, 6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert torch.equal(a.negative_indices, b.negative_indices)
        draws.append(a.negative_indices.clone())
    assert any(not torch.equal(d, first) for d in draws)
    a.set_epoch(0)
    assert torch.equal(a.negative_indices, first)


def test_set_mined_accepts_valid_choices_and_names_offending_queries(tmp_path):
    split = street(tmp_path)
    triplets = TripletDataset(split, negatives_per_query=2)
    far = [db_index(split, 200), db_index(split, 250)]
    positive = triplets.positive_indices.clone()
    triplets.set_mined(positive, torch.tensor([far, far]))
    assert triplets.mined and triplets.negative_indices.tolist() == [far, far]
    triplets.set_epoch(3)  # mined choices survive an epoch change
    assert triplets.negative_indices.tolist() == [far, far]
    images, _ = triplets[0]
    assert torch.equal(images[3], split.load_database(far[1]))

    second_query = split.query_paths[int(triplets.query_indices[1])].name
    with pytest.raises(ValueError, match=r"usable query 1 .*" + re.escape(second_query) + ".*not within 10.0 m"):
        triplets.set_mined(torch.tensor([positive[0], db_index(split, 150)]), torch.tensor([far, far]))
    with pytest.raises(ValueError, match=r"usable query 1 .*negatives \[\d+\] are within 25.0 m"):
        triplets.set_mined(positive, torch.tensor([far, [far[0], db_index(split, 128)]]))
    with pytest.raises(ValueError, match=r"shape \(2,\) .* \(2, 2\)"):
        triplets.set_mined(positive, torch.tensor([far]))
    with pytest.raises(ValueError, match="out of range"):
        triplets.set_mined(positive, torch.tensor([far, [far[0], 99]]))
    assert triplets.negative_indices.tolist() == [far, far]  # a rejected call changes nothing
    triplets.clear_mined()
    assert not triplets.mined


# ------------------------------------------------------------------------------------------- mini-places

SMALL = {"train": 8, "val": 6, "test": 5}


def place_of(path):
    return path.name.split("@")[4]


def test_generate_mini_places_is_deterministic_and_cached(tmp_path):
    a = generate_mini_places(tmp_path / "a", seed=1, num_places=SMALL, family_size=3)
    b = generate_mini_places(tmp_path / "b", seed=1, num_places=SMALL, family_size=3)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len([f for f in files_a if f.parts[2] == "database"]) == sum(SMALL.values())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    with Image.open(a / files_a[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    # A second call with the same arguments reuses the folder; another seed draws another world.
    stamp = (a / MANIFEST).stat().st_mtime_ns
    assert generate_mini_places(tmp_path / "a", seed=1, num_places=SMALL, family_size=3) == a
    assert (a / MANIFEST).stat().st_mtime_ns == stamp
    c = generate_mini_places(tmp_path / "c", seed=2, num_places=SMALL, family_size=3)
    assert sorted(p.name for p in c.rglob("*.png")) != sorted(p.name for p in a.rglob("*.png"))
    # Other arguments replace a stale mini-places folder; a foreign folder is never replaced.
    generate_mini_places(tmp_path / "a", seed=1, num_places=4, family_size=3, queries_per_place=1)
    assert len(list((a / "images/train/queries").iterdir())) == 4
    foreign = tmp_path / "mine"
    write_image(foreign / "photo.png")
    with pytest.raises(DatasetError, match="not replacing"):
        generate_mini_places(foreign, num_places=2)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_generated_queries_have_their_own_place_as_only_positive(tmp_path):
    root = generate_mini_places(tmp_path / "places", seed=0, num_places=SMALL, family_size=3, queries_per_place=(1, 2))
    for split_name, count in SMALL.items():
        split = PlaceSplit(root, split_name)  # every name parses, or this raises
        assert split.num_database == count and count <= split.num_queries <= 2 * count
        positives = split.positives(25.0)
        for q, qpath in enumerate(split.query_paths):
            assert [place_of(split.database_paths[int(d)]) for d in positives[q]] == [place_of(qpath)]
            assert distance(split, q, int(positives[q][0])) < 10  # usable for training
        assert TripletDataset(split, negatives_per_query=2).dropped == 0
    small = generate_mini_places(tmp_path / "small", num_places=2, image_size=16)
    with Image.open(next((small / "images/val/queries").iterdir())) as img:
        assert img.size == (16, 16)
