"""The benchmark registry (names on the classes, dotted class paths, lazy imports) and the benchmarks it adds or
fixes: DiffSeg's 40/20/20 COCO split on a small fake COCO in the real layout, and COCO-20i's every-class index."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsseg.data import FewShotDataModule
from fsseg.data.base import FewShotDataset
from fsseg.data.coco import Coco402020FewShot, CocoFewShot, fold_classes
from fsseg.data.registry import benchmark_class, benchmark_classes

NAMES = ["coco20i", "coco_40_20_20", "pascal5i", "embedded", "fss1000", "lvis92i", "ade20k"]


def test_every_benchmark_is_a_named_class():
    classes = benchmark_classes()
    assert list(classes) == NAMES
    for name, cls in classes.items():
        assert issubclass(cls, FewShotDataset) and cls.name == name and cls.title and cls.layout
        assert benchmark_class(name) is cls
    assert benchmark_class("fsseg.data.coco.Coco402020FewShot") is Coco402020FewShot  # a class path works too
    with pytest.raises(ValueError, match="unknown benchmark 'coco'; expected one of .*coco20i"):
        benchmark_class("coco")
    with pytest.raises(ValueError, match="not a subclass of fsseg.data.base.FewShotDataset"):
        benchmark_class("fsseg.data.coco.fold_classes")
    with pytest.raises(ValueError, match="cannot import 'Nope'"):
        benchmark_class("fsseg.data.coco.Nope")


def test_registry_imports_no_pycocotools():
    """LVIS decodes its masks with pycocotools, imported when a mask is read, not when benchmarks are listed."""
    code = "import sys; from fsseg.data.registry import benchmark_classes; benchmark_classes(); print(sorted(m for m in sys.modules if m.startswith('pycocotools')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "[]"


def test_coco20i_every_class_index_for_in_context_training(tmp_path):
    """fold -1 reads the training list of every fold: each class from a fold where it is a training class."""
    ds = CocoFewShot(tmp_path, "trn", fold=-1, index_only=True)
    assert ds.class_ids() == list(range(80)) and all(ds.classwise[c] for c in range(80))
    fold0 = CocoFewShot(tmp_path, "trn", fold=0, index_only=True)
    assert all(ds.classwise[c] == fold0.classwise[c] for c in fold0.class_ids())
    assert ds.classwise[0] == CocoFewShot(tmp_path, "trn", fold=1, index_only=True).classwise[0]


@pytest.mark.parametrize("fold", range(4))
def test_40_20_20_class_split_on_the_shipped_lists(tmp_path, fold):
    trn, val, test = (
        Coco402020FewShot(tmp_path, s, fold=fold, index_only=True) for s in ("trn", "val", "test")
    )
    t, v, e = set(trn.class_ids()), set(val.class_ids()), set(test.class_ids())
    assert (len(t), len(v), len(e)) == (40, 20, 20) and t | v | e == set(range(80))
    assert e == set(fold_classes(fold)) and v == set(fold_classes((fold + 1) % 4))
    assert all(k.startswith("train2014/") for k in trn.keys())
    assert all(k.startswith("val2014/") for k in val.keys() + test.keys())
    coco = CocoFewShot(tmp_path, "trn", fold=fold, index_only=True)  # the same training images per class
    assert all(trn.classwise[c] == coco.classwise[c] for c in t)


def fake_coco(root: Path, per_class: int = 2, size: int = 8) -> Path:
    """A COCO2014 tree in the real layout (JPEG images, value = class + 1 PNG masks) and COCO-20i-format lists
    naming it: ``per_class`` images of each class in train2014 and in val2014, the class in the image's left half."""
    splits = root / "splits"
    keys = {folder: {c: [] for c in range(80)} for folder in ("train2014", "val2014")}
    for folder, by_class in keys.items():
        for c in range(80):
            for j in range(per_class):
                key = f"{folder}/COCO_{folder}_{c * per_class + j:012d}.jpg"
                by_class[c].append(key)
                for path in (
                    root / "COCO2014" / key,
                    root / "COCO2014" / "annotations" / Path(key).with_suffix(".png"),
                ):
                    path.parent.mkdir(parents=True, exist_ok=True)
                label = np.zeros((size, size), np.uint8)
                label[:, : size // 2] = c + 1
                Image.fromarray(np.full((size, size, 3), 3 * c, np.uint8)).save(root / "COCO2014" / key)
                Image.fromarray(label, mode="L").save(
                    root / "COCO2014" / "annotations" / Path(key).with_suffix(".png")
                )
    for fold in range(4):
        test = set(fold_classes(fold))
        for split, folder, own in (("trn", "train2014", False), ("val", "val2014", True)):
            lists = {str(c): keys[folder][c] if (c in test) == own else [] for c in range(80)}
            path = splits / "coco20i" / split / f"fold{fold}.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt") as f:
                json.dump(lists, f)
    return splits


def test_40_20_20_episodes_on_a_fake_coco(tmp_path):
    splits = fake_coco(tmp_path)
    kw = dict(fold=1, shot=1, img_size=8, n_episodes=40, splits_dir=splits)
    test, coco_test = Coco402020FewShot(tmp_path, "test", **kw), CocoFewShot(tmp_path, "test", **kw)
    assert test.episodes == coco_test.episodes  # the test episodes are COCO-20i fold 1's, draw for draw
    val = Coco402020FewShot(tmp_path, "val", **kw)
    assert {ep.class_id for ep in val.episodes} <= set(fold_classes(2)) and len(
        {ep.class_id for ep in val.episodes}
    ) > 5
    assert all(ep.query.startswith("val2014/") and ep.query not in ep.supports for ep in val.episodes)
    assert val.episodes == Coco402020FewShot(tmp_path, "val", **kw).episodes  # seeded
    trn = Coco402020FewShot(tmp_path, "trn", fold=1, shot=1, img_size=8, splits_dir=splits)
    seen = {trn.episode(i).class_id for i in range(200)}
    assert seen <= set(trn.class_ids()) and not seen & (set(fold_classes(1)) | set(fold_classes(2)))
    item = val[3]
    ep = val.episodes[3]
    expected = np.zeros((8, 8), np.int64)
    expected[:, :4] = 1  # the class fills the left half of its images
    np.testing.assert_array_equal(item["query_mask"].numpy(), expected)
    assert int(item["class_id"]) == ep.class_id and item["support_names"] == list(ep.supports)


def test_40_20_20_through_the_data_module(tmp_path):
    splits = fake_coco(tmp_path)
    dm = FewShotDataModule(root=str(tmp_path), benchmark="coco_40_20_20", fold=3, img_size=8, batch_size=4,
                           train_episodes=8, val_episodes=6, test_episodes=6, splits_dir=str(splits))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert dm.eval_class_ids("val") == fold_classes(0) and dm.eval_class_ids("test") == fold_classes(3)
    batch = next(iter(dm.train_dataloader()))
    assert not {int(c) for c in batch["class_id"]} & (set(fold_classes(3)) | set(fold_classes(0)))
    assert {int(c) for c in next(iter(dm.val_dataloader()))["class_id"]} <= set(fold_classes(0))
