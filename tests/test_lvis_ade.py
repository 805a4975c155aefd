"""LVIS-92i (Matcher's episode protocol, masks from polygons/RLE) and ADE20K (class index cache, episodes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import fsseg.data.ade as ade_mod
from fsseg.data.ade import ADE20KFewShot, index_paths
from fsseg.data.lvis import LVIS92iDataset
from fsseg.data.tools.lvis_lists import build_lvis_lists, lists_path, read_class_lists

H, W = 6, 8


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def save_rgb(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        path
    )


def lvis_json(n_classes: int, images_per_class, folders=("val2017", "train2017"), n_images: int = 12) -> dict:
    """An LVIS v1-style JSON: class j (category id j + 1) is annotated in ``images_per_class(j)`` images."""
    images = [
        {"id": 100 + i, "height": H, "width": W,
         "coco_url": f"http://images.cocodataset.org/{folders[i % len(folders)]}/{100 + i:012d}.jpg"}
        for i in range(n_images)
    ]  # fmt: skip
    anns = []
    for j in range(n_classes):
        for t in range(images_per_class(j)):
            iid = 100 + (3 * j + t) % n_images
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": iid,
                    "category_id": j + 1,
                    "segmentation": rect(0, 0, 1 + t, 2),
                }
            )
    cats = [{"id": j + 1, "name": f"cat{j + 1}"} for j in range(n_classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def lvis_root(tmp_path: Path) -> Path:
    """23 val classes; class 5 (id 6) has a single image and drops out of the list (needs > shot images)."""
    root = tmp_path / "data"
    data = lvis_json(23, lambda j: 1 if j == 5 else 2 + j % 4)
    # image 100 holds two annotations of class 1 (id 1): a polygon and a compressed RLE; the mask is their union
    extra = np.zeros((H, W), np.uint8)
    extra[4:6, 5:8] = 1
    rle = mask_utils.encode(np.asfortranarray(extra))
    data["annotations"].append({"id": 999, "image_id": 100, "category_id": 1,
                                "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}})  # fmt: skip
    (root / "LVIS").mkdir(parents=True)
    (root / "LVIS" / "lvis_v1_val.json").write_text(json.dumps(data))
    build_lvis_lists(root / "LVIS" / "lvis_v1_val.json", lists_path(root, "val"))
    for im in data["images"]:
        save_rgb(root / "LVIS" / "coco" / "/".join(im["coco_url"].split("/")[-2:]))
    return root


def matcher_draws(classes: list[dict], fold: int, shot: int, n: int) -> list[tuple[int, str, list[str]]]:
    """Matcher's LVIS-92i test loop, transcribed: class list, fold entries, and the seed-0 ``choice`` draws."""
    val = [c for c in classes if len(c["images"]) > shot]
    fold_classes = [val[fold + 10 * v] for v in range(len(val) // 10)]
    rs = np.random.RandomState(0)  # what np.random.seed(0) sets up
    out = []
    for idx in range(n):
        cls = fold_classes[idx % len(fold_classes)]
        names = [e["file"] for e in cls["images"]]
        query = rs.choice(names, 1, replace=False)[0]
        supports = []
        while True:
            s = rs.choice(names, 1, replace=False)[0]
            if s != query:
                supports.append(s)
            if len(supports) == shot:
                break
        out.append((cls["category_id"], str(query), [str(s) for s in supports]))
    return out


@pytest.mark.parametrize("fold,shot", [(0, 1), (3, 1), (1, 2)])
def test_lvis_protocol_matches_matcher_draws(tmp_path, fold, shot):
    root = lvis_root(tmp_path)
    ds = LVIS92iDataset(root, split="test", fold=fold, shot=shot, img_size=16, n_episodes=12)
    classes = read_class_lists(lists_path(root, "val"))
    expected = matcher_draws(classes, fold, shot, 12)
    got = [(ds.category_ids[e.class_id], e.query, list(e.supports)) for e in ds.episodes]
    assert got == expected
    usable = [c for c in classes if len(c["images"]) > shot]
    assert ds.class_ids() == [fold + 10 * k for k in range(len(usable) // 10)]
    n = len(ds.class_ids())
    assert [e.class_id for e in ds.episodes] == [
        ds.class_ids()[i % n] for i in range(12)
    ]  # episode i: class i mod n


def test_lvis_class_list_rule_and_defaults(tmp_path):
    root = lvis_root(tmp_path)
    ds = LVIS92iDataset(root, split="test", fold=0, shot=1, img_size=16)
    assert len(ds) == 2300
    assert 6 not in ds.category_ids  # the single-image class is no class of the 1-shot list
    assert len(ds.category_ids) == 22 and ds.class_ids() == [0, 10]
    ds3 = LVIS92iDataset(root, split="test", fold=0, shot=3, img_size=16, n_episodes=3)
    assert len(ds3.classes) == 11 and all(
        len(c["images"]) > 3 for c in ds3.classes
    )  # the list depends on shot
    with pytest.raises(ValueError, match="only 5 val classes have more than 4 images"):
        LVIS92iDataset(root, split="test", fold=0, shot=4, img_size=16, n_episodes=3)
    with pytest.raises(ValueError, match="unknown fold 10"):
        LVIS92iDataset(root, split="test", fold=10)


def test_lvis_mask_union_and_item(tmp_path):
    root = lvis_root(tmp_path)
    ds = LVIS92iDataset(root, split="test", fold=0, shot=1, img_size=16, eval_size="original", n_episodes=4)
    key = "val2017/000000000100.jpg"
    assert key in ds.classwise[0]
    expected = np.zeros((H, W), np.uint8)
    expected[0:2, 0:1] = 1  # polygon rect(0, 0, 1, 2)
    expected[4:6, 5:8] = 1  # the RLE annotation of the same class
    np.testing.assert_array_equal(ds.load_mask(key, 0), expected)
    item = ds[0]
    assert item["query_img"].shape == (3, 16, 16) and item["support_imgs"].shape == (1, 3, 16, 16)
    assert item["query_mask_eval"].shape == (H, W) and set(item["query_mask"].unique().tolist()) <= {0, 1}
    assert item["query_name"] == ds.episodes[0].query and int(item["class_id"]) == ds.episodes[0].class_id
    with pytest.raises(KeyError, match="no annotation of class"):
        ds.load_mask("val2017/000000000111.jpg", 0)


def test_lvis_train_split_excludes_fold_classes(tmp_path):
    root = lvis_root(tmp_path)
    (root / "LVIS" / "lvis_v1_train.json").write_text(json.dumps(lvis_json(30, lambda j: 3)))
    build_lvis_lists(root / "LVIS" / "lvis_v1_train.json", lists_path(root, "train"))
    test_ds = LVIS92iDataset(root, split="test", fold=2, shot=1, img_size=16, n_episodes=2)
    test_cats = {test_ds.category_ids[i] for i in test_ds.class_ids()}
    ds = LVIS92iDataset(root, split="trn", fold=2, shot=1, img_size=16, n_episodes=5)
    train_cats = {ds.category_ids[i] for i in ds.class_ids()}
    assert train_cats == set(range(1, 31)) - test_cats
    assert ds.episode(3) == ds.episode(3) and ds[1]["support_masks"].shape == (1, 16, 16)
    every = LVIS92iDataset(root, split="trn", fold=-1, shot=1, img_size=16, n_episodes=5)
    assert len(every.class_ids()) == 30


def test_lvis_missing_data_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "LVIS")):
        LVIS92iDataset(tmp_path, split="test")
    (tmp_path / "LVIS" / "coco" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lvis_val.json.gz.*build-lvis"):
        LVIS92iDataset(tmp_path, split="test")


# ---- ADE20K -------------------------------------------------------------------------------------------------------
def save_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def ade_root(tmp_path: Path) -> Path:
    """Four training images: value 1 in a, b, d (one pixel in d); value 2 only in b; value 3 in a and c."""
    root = tmp_path / "data"
    base = root / "ADEChallengeData2016"
    labels = {n: np.zeros((H, W), np.uint8) for n in "abcd"}
    labels["a"][:3, :] = 1
    labels["a"][3:, :4] = 3
    labels["b"][:, :2] = 1
    labels["b"][:, 5:] = 2
    labels["c"][2:4, 2:4] = 3
    labels["d"][0, 0] = 1
    for folder in ("training", "validation"):
        for n, lab in labels.items():
            save_rgb(base / "images" / folder / f"ADE_{n}.jpg")
            save_label(base / "annotations" / folder / f"ADE_{n}.png", lab)
    return root


def test_ade_index_built_once_in_prepare_data_and_only_read_in_setup(tmp_path, monkeypatch):
    root = ade_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="no up-to-date class index of training.*build-ade-index"):
        ADE20KFewShot(root, split="trn", fold=-1, img_size=16)  # setup never scans: it needs the index
    cache = root / "ADEChallengeData2016" / "fsseg_index_training.json.gz"
    assert not cache.exists()
    ADE20KFewShot.prepare_data(root, "trn")  # the one-time scan
    assert cache.is_file()

    def no_scan(path):
        raise AssertionError(f"rescanned {path}")

    monkeypatch.setattr(ade_mod, "scan_mask", no_scan)
    ds = ADE20KFewShot(root, split="trn", fold=-1, shot=1, img_size=16, n_episodes=6)
    ADE20KFewShot.prepare_data(root, "trn")  # up to date: no second scan
    assert ds.classwise == {
        0: ["ADE_a", "ADE_b", "ADE_d"],
        2: ["ADE_a", "ADE_c"],
    }  # value 2 has one image: dropped
    assert (
        len(ds) == 6 and ADE20KFewShot(root, split="trn", fold=0, img_size=16).n_episodes == 4
    )  # every image
    ep = ds.episode(4)
    assert ep == ds.episode(4) and ep.query not in ep.supports and ep.query in ds.classwise[ep.class_id]
    item = ds[4]
    mask = np.array(Image.open(ds.root / "ADEChallengeData2016/annotations/training" / f"{ep.query}.png"))
    expected = (mask == ep.class_id + 1).astype(np.int64)
    np.testing.assert_array_equal(ds.load_mask(ep.query, ep.class_id), expected)
    assert item["query_mask"].shape == (16, 16)
    strict = ADE20KFewShot(root, split="trn", fold=0, shot=1, img_size=16, min_pixels=2)
    assert strict.classwise[0] == ["ADE_a", "ADE_b"]  # ADE_d's single pixel is below min_pixels


def test_ade_stale_index_refused_in_setup_and_rebuilt_in_prepare_data(tmp_path, monkeypatch):
    root = ade_root(tmp_path)
    ADE20KFewShot.prepare_data(root, "trn")
    base = root / "ADEChallengeData2016"
    save_rgb(base / "images" / "training" / "ADE_e.jpg")
    save_label(base / "annotations" / "training" / "ADE_e.png", np.full((H, W), 2))
    with pytest.raises(FileNotFoundError, match="stale \\(4 masks, the folder has 5\\)"):
        ADE20KFewShot(root, split="trn", fold=0, img_size=16)
    ADE20KFewShot.prepare_data(root, "trn")
    assert ADE20KFewShot(root, split="trn", fold=0, img_size=16).classwise[1] == ["ADE_b", "ADE_e"]

    # the data folder refuses the index (a directory sits at its path): it goes to $FSSEG_CACHE/ade20k
    monkeypatch.setenv("FSSEG_CACHE", str(tmp_path / "cache"))
    beside, fallback = index_paths(root, "validation")
    beside.mkdir()
    ADE20KFewShot.prepare_data(root, "val")
    ds = ADE20KFewShot(root, split="val", fold=0, shot=1, img_size=16, n_episodes=5)
    assert fallback.is_file() and fallback.parent == tmp_path / "cache" / "ade20k"
    rs = np.random.RandomState(0)
    for ep in ds.episodes:  # the COCO-style seeded draws: class, query, then supports
        cls = ds.class_ids()[int(rs.choice(2, 1, replace=False)[0])]
        pool = ds.classwise[cls]
        query = pool[int(rs.choice(len(pool), 1, replace=False)[0])]
        assert (ep.class_id, ep.query) == (cls, query)
        while True:
            s = pool[int(rs.choice(len(pool), 1, replace=False)[0])]
            if s != query:
                break
        assert ep.supports == (s,)


def test_datamodule_prepares_ade_once_then_every_setup_only_reads(tmp_path, small_embedded, monkeypatch):
    """The in-context mix with ADE20K: prepare_data (rank 0) scans; setup (every rank) reads the index."""
    from fsseg.data import FewShotDataModule

    root = ade_root(tmp_path)
    (root / "VOC2012").symlink_to(small_embedded / "VOC2012")
    dm = FewShotDataModule(root=str(root), benchmark="pascal5i", train_benchmarks=["ade20k", "pascal5i"], shot=1,
                           img_size=16, splits_dir=str(small_embedded / "splits"), val_episodes=4, test_episodes=4)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="class index"):
        dm.setup("fit")
    dm.prepare_data()  # no trainer: prepares what every stage reads
    scans = []
    monkeypatch.setattr(ade_mod, "scan_mask", lambda path: scans.append(path) or {})
    dm.setup("fit")
    assert not scans and len(dm.datasets["trn"].datasets[0].class_ids()) == 2


def test_ade_missing_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016/images/training"):
        ADE20KFewShot(tmp_path, split="trn", fold=0)


def test_check_counts_agree_with_the_dataset(tmp_path, capsys):
    from fsseg.data.tools import main

    root = lvis_root(tmp_path)
    assert main(["check", "--root", str(root), "--benchmark", "lvis92i"]) == 0
    out = capsys.readouterr().out
    assert "LVIS-92i: OK" in out and "1-shot: 22 classes with > 1 images -> 10 folds of 2 classes" in out
    for fold in (0, 7):
        ds = LVIS92iDataset(root, split="test", fold=fold, shot=1, img_size=16, n_episodes=1)
        n = len({f for c in ds.class_ids() for f in ds.classwise[c]})
        assert f"fold {fold}: test 2 classes / {n} images ({n} checked, all present)" in out
