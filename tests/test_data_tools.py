"""Data tools: COCO semantic masks from an instances JSON, LVIS class lists, and `fsseg data check`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from fsseg.data.tools import main
from fsseg.data.tools.coco_masks import build_coco_masks, category_values
from fsseg.data.tools.lvis_lists import build_class_lists, lists_path, read_class_lists

# The 80 real COCO category ids (with their gaps): the contiguous index follows their sorted order.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
PERSON, BICYCLE, DOG, TOOTHBRUSH = 1, 2, 18, 90  # mask values 1, 2, 17, 80


def rect(x0, y0, x1, y1):
    """A polygon covering pixels x0..x1-1, y0..y1-1 (pycocotools' rasterisation of a rectangle)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def rle_str(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def instances_json(path: Path) -> Path:
    """A small instances JSON in the real COCO format: polygons, compressed and uncompressed RLE, crowd, overlaps."""
    small = np.zeros((6, 8), np.uint8)
    small[2:4, 2:4] = 1  # 4 pixels
    data = {
        "info": {}, "licenses": [],
        "categories": [{"id": i, "name": f"c{i}", "supercategory": "x"} for i in reversed(COCO_IDS)],
        "images": [
            {"id": 11, "file_name": "COCO_val2014_000000000011.jpg", "height": 6, "width": 8},
            {"id": 22, "file_name": "COCO_val2014_000000000022.jpg", "height": 5, "width": 5},
            {"id": 33, "file_name": "COCO_val2014_000000000033.jpg", "height": 4, "width": 3},
        ],
        "annotations": [
            # image 11: a big person, then a small dog (compressed RLE) on top of it, then a crowd of
            # bicycles (uncompressed RLE, column-major: 36 zeros then columns 6 and 7) at the right edge.
            {"id": 1, "image_id": 11, "category_id": PERSON, "iscrowd": 0, "segmentation": rect(0, 0, 5, 5)},
            {"id": 2, "image_id": 11, "category_id": DOG, "iscrowd": 0, "segmentation": rle_str(small)},
            {"id": 3, "image_id": 11, "category_id": BICYCLE, "iscrowd": 1,
             "segmentation": {"size": [6, 8], "counts": [36, 12]}},
            # image 22: a small toothbrush first, a big person later over it (the overlap rule matters here)
            {"id": 4, "image_id": 22, "category_id": TOOTHBRUSH, "iscrowd": 0, "segmentation": rect(1, 1, 3, 3)},
            {"id": 5, "image_id": 22, "category_id": PERSON, "iscrowd": 0, "segmentation": rect(0, 0, 4, 4)},
        ],
    }  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.array(im)


def test_category_values_follow_sorted_ids():
    values = category_values([{"id": i} for i in reversed(COCO_IDS)])
    assert values[PERSON] == 1 and values[BICYCLE] == 2 and values[DOG] == 17 and values[TOOTHBRUSH] == 80
    assert sorted(values.values()) == list(range(1, 81))


def test_coco_masks_default_rules(tmp_path):
    ann = instances_json(tmp_path / "instances_val2014.json")
    out = tmp_path / "COCO2014" / "annotations" / "val2014"
    counts = build_coco_masks(ann, out, progress_every=0)
    assert counts == {"written": 3, "skipped": 0}
    m = read_png(out / "COCO_val2014_000000000011.png")
    expected = np.zeros((6, 8), np.uint8)
    expected[0:5, 0:5] = 1  # person
    expected[2:4, 2:4] = 17  # dog, painted later, on top
    expected[:, 6:8] = 2  # crowd bicycles painted with their class
    np.testing.assert_array_equal(m, expected)
    m = read_png(out / "COCO_val2014_000000000022.png")
    expected = np.zeros((5, 5), np.uint8)
    expected[0:4, 0:4] = 1  # the later person covers the earlier toothbrush entirely
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(read_png(out / "COCO_val2014_000000000033.png"), np.zeros((4, 3), np.uint8))
    assert not [p for p in out.iterdir() if p.suffix != ".png"]  # no temporary files left


def test_coco_masks_smaller_on_top_and_crowd_ignore(tmp_path):
    ann = instances_json(tmp_path / "instances_val2014.json")
    out = tmp_path / "masks"
    build_coco_masks(ann, out, overlap="smaller-on-top", crowd="ignore", progress_every=0)
    m = read_png(out / "COCO_val2014_000000000022.png")
    expected = np.zeros((5, 5), np.uint8)
    expected[0:4, 0:4] = 1
    expected[1:3, 1:3] = 80  # the smaller toothbrush wins
    np.testing.assert_array_equal(m, expected)
    m = read_png(out / "COCO_val2014_000000000011.png")
    assert (m[:, 6:8] == 255).all() and m[2, 2] == 17 and m[0, 0] == 1


def test_coco_masks_skip_overwrite_limit_and_cli(tmp_path, capsys):
    root = tmp_path / "root"
    instances_json(tmp_path / "ann.json")
    rc = main(["build-coco-masks", "--root", str(root), "--split", "val2014", "--ann-file", str(tmp_path / "ann.json"),
               "--limit", "2"])  # fmt: skip
    assert rc == 0
    out = root / "COCO2014" / "annotations" / "val2014"
    assert sorted(p.name for p in out.iterdir()) == [
        "COCO_val2014_000000000011.png",
        "COCO_val2014_000000000022.png",
    ]
    assert "val2014: 2 written, 0 skipped" in capsys.readouterr().out
    marker = np.full((2, 2), 9, np.uint8)
    Image.fromarray(marker).save(out / "COCO_val2014_000000000011.png")
    assert build_coco_masks(tmp_path / "ann.json", out, progress_every=0) == {"written": 1, "skipped": 2}
    np.testing.assert_array_equal(read_png(out / "COCO_val2014_000000000011.png"), marker)  # kept
    assert build_coco_masks(tmp_path / "ann.json", out, overwrite=True, progress_every=0)["written"] == 3
    assert read_png(out / "COCO_val2014_000000000011.png").shape == (6, 8)


def test_coco_masks_bad_input_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_coco_masks(tmp_path / "nope.json", tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="'categories'"):
        build_coco_masks(bad, tmp_path / "out")
    assert main(["build-coco-masks", "--root", str(tmp_path), "--split", "train2014"]) == 2  # JSON missing


# ---- LVIS class lists ---------------------------------------------------------------------------------------------
def lvis_json() -> dict:
    def img(i, folder, h=6, w=8):
        return {
            "id": i,
            "height": h,
            "width": w,
            "coco_url": f"http://images.cocodataset.org/{folder}/{i:012d}.jpg",
        }

    return {
        "images": [img(5, "val2017"), img(3, "train2017"), img(9, "val2017", 4, 4)],
        "categories": [{"id": 7, "name": "zebra"}, {"id": 2, "name": "apple"}, {"id": 4, "name": "unused"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 7, "segmentation": rect(0, 0, 2, 2)},
            {"id": 2, "image_id": 5, "category_id": 2, "segmentation": rect(1, 1, 3, 3)},
            {"id": 3, "image_id": 9, "category_id": 7, "segmentation": rect(0, 0, 1, 1)},
            {"id": 4, "image_id": 3, "category_id": 7, "segmentation": rect(4, 4, 6, 6)},
        ],
    }


def test_lvis_class_lists_order_and_format(tmp_path):
    lists = build_class_lists(lvis_json(), "x.json")
    # ascending category id; a category without annotations is left out
    assert [c["category_id"] for c in lists["classes"]] == [2, 7]
    zebra = lists["classes"][1]
    assert zebra["name"] == "zebra"
    assert [e["file"] for e in zebra["images"]] == ["train2017/000000000003.jpg", "val2017/000000000009.jpg"]
    first = zebra["images"][0]
    assert first["instances"] == 2 and (first["height"], first["width"]) == (6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[0:2, 0:2] = 1
    expected[4:6, 4:6] = 1  # the union of both zebra instances
    np.testing.assert_array_equal(
        mask_utils.decode({"size": [6, 8], "counts": first["rle"].encode()}), expected
    )
    assert (zebra["images"][1]["height"], zebra["images"][1]["width"]) == (4, 4)
    src = tmp_path / "LVIS" / "lvis_v1_val.json"
    src.parent.mkdir()
    src.write_text(json.dumps(lvis_json()))
    assert main(["build-lvis", "--root", str(tmp_path)]) == 0
    assert lists_path(tmp_path, "val") == tmp_path / "LVIS" / "lvis_val.json.gz"
    assert read_class_lists(lists_path(tmp_path, "val")) == lists["classes"]


def test_lvis_lists_bad_input_named(tmp_path):
    data = lvis_json()
    data["images"][0]["coco_url"] = "http://example.com/elsewhere.jpg"
    with pytest.raises(ValueError, match="coco_url"):
        build_class_lists(data, "x.json")
    data = lvis_json()
    data["annotations"][0]["category_id"] = 99
    with pytest.raises(ValueError, match="unknown category_id 99"):
        build_class_lists(data, "x.json")
    bad = tmp_path / "bad.json.gz"
    with gzip.open(bad, "wt") as f:
        json.dump({"classes": []}, f)
    with pytest.raises(ValueError, match="format"):
        read_class_lists(bad)
    with pytest.raises(FileNotFoundError, match="build-lvis"):
        read_class_lists(tmp_path / "absent.json.gz")


# ---- check ----------------------------------------------------------------------------------------------------------
def touch_image(path: Path, png: bool = False, values: tuple[int, ...] = (), size: int = 8) -> None:
    """An RGB image, or a mode-L mask (``png``) showing each of ``values`` (the classes its lists give it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not png:
        Image.new("RGB", (size, size)).save(path)
        return
    label = np.zeros(size * size, np.uint8)
    label[: len(values)] = values
    Image.fromarray(label.reshape(size, size), mode="L").save(path)


COCO_VALUES = {
    i: tuple(c + 1 for c in range(80) if c % 3 == i) for i in range(3)
}  # image i holds classes c % 3 == i
VOC_VALUES = {i: tuple(c for c in range(1, 21) if c % 2 == i) for i in range(2)}


def coco_image(c: int, folder: str) -> str:
    """Three images per folder, shared by the classes: class c lives in image c % 3."""
    return f"{folder}/COCO_{folder}_{c % 3:012d}.jpg"


def fake_root(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny data root in the real layout, plus split lists (real formats, real fold rules) naming its files."""
    root, splits = tmp_path / "data", tmp_path / "splits"
    for fold in range(4):
        test = {fold + 4 * k for k in range(20)}
        lists = {  # trn/fold f: the train2014 images of every class outside fold f; val/fold f: fold f's classes
            "trn": {str(c): [] if c in test else [coco_image(c, "train2014")] for c in range(80)},
            "val": {str(c): [coco_image(c, "val2014")] if c in test else [] for c in range(80)},
        }
        for split, data in lists.items():
            p = splits / "coco20i" / split / f"fold{fold}.json.gz"
            p.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(p, "wt") as f:
                json.dump(data, f)
            p = splits / "pascal5i" / split / f"fold{fold}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(f"2007_00003{c % 2}__{c:02d}\n" for c in range(5 * fold + 1, 5 * fold + 6)))
    (splits / "fss1000").mkdir(parents=True)
    for split, cats in (("trn", ["ab_wheel"]), ("val", ["bus"]), ("test", ["zucchini"])):
        (splits / "fss1000" / f"{split}.txt").write_text("\r\n".join(cats) + "\r\n")
    for folder in ("train2014", "val2014"):
        for c in range(3):
            im = coco_image(c, folder)
            touch_image(root / "COCO2014" / im)
            touch_image(
                root / "COCO2014" / "annotations" / Path(im).with_suffix(".png"), True, COCO_VALUES[c]
            )
    for i, name in enumerate(("2007_000030", "2007_000031")):
        touch_image(root / "VOC2012" / "JPEGImages" / f"{name}.jpg")
        touch_image(root / "VOC2012" / "SegmentationClassAug" / f"{name}.png", True, VOC_VALUES[i])
    for cat in ("ab_wheel", "bus", "zucchini"):
        for n in range(1, 11):
            touch_image(root / "FSS-1000" / cat / f"{n}.jpg")
            touch_image(root / "FSS-1000" / cat / f"{n}.png", True, (255,))
    return root, splits


CHECK_THREE = ["--benchmark", "coco20i", "pascal5i", "fss1000"]


def test_check_fake_root_complete_then_missing(tmp_path, capsys):
    root, splits = fake_root(tmp_path)
    args = ["check", "--root", str(root), "--splits-dir", str(splits), *CHECK_THREE]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "COCO-20i: OK" in out and "PASCAL-5i: OK" in out and "FSS-1000: OK" in out
    # counts follow the classes' own fold rules: COCO trains on 60 classes and tests 20, PASCAL 15 / 5
    assert "fold 0: trn 60 classes / 3 images (3 checked, all present); test 20 classes / 3 images" in out
    assert "fold 0: trn 15 classes / 2 images (2 checked, all present); test 5 classes / 2 images" in out
    assert "trn 1 classes / 10 images (10 checked, all present); val 1 classes / 10 images" in out
    assert "all requested benchmarks complete" in out

    gone = [root / "VOC2012" / "SegmentationClassAug" / "2007_000031.png",
            root / "COCO2014" / "annotations" / "train2014" / "COCO_train2014_000000000001.png",
            root / "FSS-1000" / "bus" / "10.png"]  # fmt: skip
    for p in gone:
        p.unlink()
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "COCO-20i: INCOMPLETE (1 missing)" in out and "PASCAL-5i: INCOMPLETE (1 missing)" in out
    for p in gone:
        assert f"missing: {p}" in out
    assert "incomplete, unreadable or with bad masks: COCO-20i, PASCAL-5i, FSS-1000" in out


def test_check_reads_lists_through_the_benchmark_classes(tmp_path, capsys):
    """A list that breaks the class's own rule (a test class without images) fails the check, naming the class."""
    root, splits = fake_root(tmp_path)
    p = splits / "coco20i" / "val" / "fold2.json.gz"
    with gzip.open(p, "rt") as f:
        data = json.load(f)
    data["6"] = []
    with gzip.open(p, "wt") as f:
        json.dump(data, f)
    assert main(["check", "--root", str(root), "--splits-dir", str(splits), "--benchmark", "coco20i"]) == 1
    out = capsys.readouterr().out
    assert "COCO-20i: BAD LISTS (1)" in out and "class 6 of fold 2 has no images" in out
    # the 40/20/20 split: 40 training, 20 validation (the next fold's) and 20 test classes per fold
    assert (
        main(["check", "--root", str(root), "--splits-dir", str(splits), "--benchmark", "coco_40_20_20"]) == 1
    )
    out = capsys.readouterr().out
    assert "fold 0: trn 40 classes / 3 images (3 checked, all present); val 20 classes / 3 images" in out
    assert "test 20 classes" in out


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_check_verify_names_truncated_and_mis_sized_files(tmp_path, capsys):
    root, splits = fake_root(tmp_path)
    rng = np.random.default_rng(0)
    jpg = root / "VOC2012" / "JPEGImages" / "2007_000030.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, quality=95)
    touch_image(root / "VOC2012" / "SegmentationClassAug" / "2007_000030.png", True, VOC_VALUES[0], size=64)
    png = root / "COCO2014" / "annotations" / "val2014" / "COCO_val2014_000000000002.png"
    touch_image(png, True, COCO_VALUES[2], size=64)
    touch_image(root / "COCO2014" / "val2014" / "COCO_val2014_000000000002.jpg")  # 8x8 image, 64x64 mask
    args = ["check", "--root", str(root), "--splits-dir", str(splits), *CHECK_THREE]
    assert main(args) == 0  # every file is there: without --verify nothing is opened
    out = capsys.readouterr().out
    assert main([*args, "--verify"]) == 1  # the 64x64 mask of an 8x8 image
    out = capsys.readouterr().out
    assert f"unreadable: mask file {png} differs in size" in out and "PASCAL-5i: OK" in out
    touch_image(png, True, COCO_VALUES[2])
    assert main([*args, "--verify"]) == 0
    assert "opened" in capsys.readouterr().out
    truncate(jpg)  # a JPEG cut in half: its header still parses, the decode fails
    fss_png = root / "FSS-1000" / "zucchini" / "3.png"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").save(fss_png)
    truncate(fss_png)
    assert main([*args, "--verify", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert (
        "PASCAL-5i: UNREADABLE (1 files)" in out
        and f"unreadable: image file {jpg} is unreadable or corrupt" in out
    )
    assert "FSS-1000: UNREADABLE (1 files)" in out and f"mask file {fss_png} is unreadable or corrupt" in out
    assert "COCO-20i: OK" in out


def test_check_missing_folders_and_shipped_lists(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "VOC2012" / "JPEGImages").mkdir(parents=True)
    args = [
        "check",
        "--root",
        str(root),
        "--quick",
        "--benchmark",
        "pascal5i",
        "coco20i",
        "lvis92i",
        "ade20k",
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"missing: {root / 'VOC2012' / 'SegmentationClassAug'}" in out
    assert f"missing: {root / 'COCO2014' / 'annotations' / 'val2014'}" in out
    assert f"missing: {root / 'LVIS' / 'lvis_val.json.gz'}" in out
    assert f"missing: {root / 'ADEChallengeData2016' / 'images' / 'training'}" in out
    # counts from the lists shipped with fsseg, through the classes' fold rules
    assert "fold 0: trn 15 classes / 8450 images; test 5 classes / 345 images" in out
    assert "fold 1: trn 60 classes" in out and "test 20 classes" in out
    assert main(["check", "--root", str(tmp_path / "absent")]) == 2
    assert "absent does not exist" in capsys.readouterr().err


def test_check_lvis_and_ade_counts(tmp_path, capsys):
    from fsseg.data.ade import ADE20KFewShot

    root = tmp_path / "data"
    (root / "LVIS").mkdir(parents=True)
    (root / "LVIS" / "lvis_v1_val.json").write_text(json.dumps(lvis_json()))
    assert main(["build-lvis", "--root", str(root)]) == 0
    for f in ("train2017/000000000003.jpg", "val2017/000000000005.jpg"):
        touch_image(root / "LVIS" / "coco" / f)
    ade = root / "ADEChallengeData2016"
    for folder in ("training", "validation"):
        for n in "ab":
            touch_image(ade / "images" / folder / f"ADE_{n}.jpg")
            save = ade / "annotations" / folder / f"ADE_{n}.png"
            save.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4), 7, np.uint8), mode="L").save(save)
    assert main(["check", "--root", str(root), "--benchmark", "lvis92i", "ade20k"]) == 1
    out = capsys.readouterr().out
    assert "lvis_val.json.gz: 2 classes, 3 images" in out
    assert (
        "LVIS-92i: only 1 val classes have more than 1 images" in out
    )  # the class's own rule, as a bad list
    assert "ADE20K: OK" in out and "no up-to-date class index of training" in out  # not built yet: a note
    ADE20KFewShot.prepare_data(root, "trn")
    ADE20KFewShot.prepare_data(root, "val")
    assert main(["check", "--root", str(root), "--benchmark", "ade20k"]) == 0
    out = capsys.readouterr().out
    assert "training: class index at" in out and "trn 1 classes / 2 images (2 checked, all present)" in out


def test_coco_masks_worker_processes_match_serial(tmp_path):
    ann = instances_json(tmp_path / "instances_val2014.json")
    build_coco_masks(ann, tmp_path / "serial", overlap="smaller-on-top", progress_every=0)
    assert build_coco_masks(
        ann, tmp_path / "pool", overlap="smaller-on-top", workers=2, progress_every=0
    ) == {
        "written": 3,
        "skipped": 0,
    }
    for p in sorted((tmp_path / "serial").iterdir()):
        np.testing.assert_array_equal(read_png(tmp_path / "pool" / p.name), read_png(p))
