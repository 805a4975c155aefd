"""The evaluation episodes reproduce the published protocol (docs/PROTOCOL.md §1): NumPy's global generator seeded with 0,
draws in episode order. The reference loops below are written the way the benchmark code draws; the first episodes
are also pinned as literals."""

import numpy as np
import pytest

from fsseg.data import CocoFewShot, FSS1000FewShot, PascalFewShot
from fsseg.data.splits_io import default_splits_dir


@pytest.fixture
def root(tmp_path):
    for sub in (
        "VOC2012/JPEGImages",
        "VOC2012/SegmentationClassAug",
        "COCO2014/val2014",
        "COCO2014/annotations/val2014",
    ):
        (tmp_path / sub).mkdir(parents=True)
    return tmp_path


def reference_supports(pool, query, shot):
    supports = []
    while True:
        s = np.random.choice(pool, 1, replace=False)[0]
        if query != s:
            supports.append(s)
        if len(supports) == shot:
            return tuple(supports)


@pytest.mark.parametrize("fold,shot", [(0, 1), (2, 5)])
def test_pascal_matches_global_generator_reference(root, fold, shot):
    ds = PascalFewShot(root, "test", fold=fold, shot=shot)
    lines = (default_splits_dir() / "pascal5i" / "val" / f"fold{fold}.txt").read_text().split()
    meta = [(ln.split("__")[0], int(ln.split("__")[1]) - 1) for ln in lines]
    classwise = {c: [n for n, k in meta if k == c] for c in range(20)}
    np.random.seed(0)
    for i in range(1000):
        query, cls = meta[i % len(meta)]
        ep = ds.episodes[i]
        assert (ep.class_id, ep.query) == (cls, query)
        assert ep.supports == reference_supports(classwise[cls], query, shot), f"episode {i}"


@pytest.mark.parametrize("fold,shot", [(0, 1), (3, 5)])
def test_coco_matches_global_generator_reference(root, fold, shot):
    ds = CocoFewShot(root, "test", fold=fold, shot=shot)
    classes = [fold + 4 * k for k in range(20)]
    np.random.seed(0)
    for i in range(1000):
        cls = np.random.choice(classes, 1, replace=False)[0]
        query = np.random.choice(ds.classwise[cls], 1, replace=False)[0]
        ep = ds.episodes[i]
        assert (ep.class_id, ep.query) == (cls, query), f"episode {i}"
        assert ep.supports == reference_supports(ds.classwise[cls], query, shot), f"episode {i}"


def test_first_episodes_pinned(root):
    p = PascalFewShot(root, "test", fold=0, shot=1).episodes
    assert [(e.class_id, e.query, e.supports) for e in p[:3]] == [
        (0, "2007_000033", ("2010_001174",)),
        (3, "2007_000061", ("2007_005705",)),
        (1, "2007_000129", ("2008_003108",)),
    ]
    assert (p[999].class_id, p[999].query, p[999].supports) == (2, "2011_000185", ("2007_007084",))
    p5 = PascalFewShot(root, "test", fold=0, shot=5).episodes
    assert p5[0].supports == ("2010_001174", "2007_001884", "2011_002515", "2010_000238", "2011_001114")
    c = CocoFewShot(root, "test", fold=0, shot=1).episodes
    assert [(e.class_id, e.query, e.supports) for e in c[:2]] == [
        (72, "val2014/COCO_val2014_000000507081.jpg", ("val2014/COCO_val2014_000000486122.jpg",)),
        (44, "val2014/COCO_val2014_000000504005.jpg", ("val2014/COCO_val2014_000000570465.jpg",)),
    ]
    assert (c[999].class_id, c[999].query) == (0, "val2014/COCO_val2014_000000356094.jpg")


def test_fss1000_order_and_supports(tmp_path):
    cats = ["bus", "hotel_slipper", "burj_al"]  # the head of the shipped test list (CRLF endings)
    for cat in cats:
        (tmp_path / "FSS-1000" / cat).mkdir(parents=True)
        for n in range(1, 11):
            (tmp_path / "FSS-1000" / cat / f"{n}.jpg").touch()
    splits = tmp_path / "splits" / "fss1000"
    splits.mkdir(parents=True)
    (splits / "test.txt").write_bytes(b"bus\r\nhotel_slipper\r\nburj_al\r\n")
    ds = FSS1000FewShot(tmp_path, "test", fold=0, shot=1, splits_dir=tmp_path / "splits")
    assert len(ds) == 30
    # sorted categories, then string-sorted file names (1, 10, 2, ...); ids offset by 760
    assert [(e.class_id, e.query) for e in ds.episodes[:3]] == [
        (760, "burj_al/1"),
        (760, "burj_al/10"),
        (760, "burj_al/2"),
    ]
    assert ds.episodes[10].class_id == 761 and ds.class_ids() == [760, 761, 762]
    np.random.seed(0)
    for ep in ds.episodes:
        folder = ep.query.rsplit("/", 1)[0]
        expect = reference_supports([f"{folder}/{n}" for n in range(1, 11)], ep.query, 1)
        assert ep.supports == expect


def test_protocol_does_not_depend_on_anything_but_the_seed(root):
    a = PascalFewShot(root, "test", fold=1, shot=1, seed=0).episodes
    np.random.seed(123)  # the global generator is not used
    b = PascalFewShot(root, "test", fold=1, shot=1, seed=0).episodes
    c = PascalFewShot(root, "test", fold=1, shot=1, seed=1).episodes
    assert a == b and a != c


def test_unknown_fold_and_missing_root(tmp_path, root):
    with pytest.raises(ValueError, match="unknown fold 4"):
        PascalFewShot(root, "test", fold=4)
    with pytest.raises(FileNotFoundError, match="VOC2012/JPEGImages"):
        PascalFewShot(tmp_path / "nowhere", "test", fold=0)
