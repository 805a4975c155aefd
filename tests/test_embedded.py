"""The embedded benchmark: PASCAL-5i layout, list formats, determinism, content rules, atomic writing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsseg.data.embedded import (
    EMBEDDED_CLASS_NAMES,
    MARKER_NAME,
    ensure_embedded_benchmark,
    fold_classes,
    generate_embedded_benchmark,
    render_corpus,
)

SMALL = {"image_size": 64, "n_train": 40, "n_val": 40}
LINE = re.compile(r"^(\d{4}_\d{6})__(\d{2})$")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return generate_embedded_benchmark(tmp_path_factory.mktemp("emb") / "seed0", seed=0, **SMALL)


def read_list(root: Path, split: str, fold: int) -> list[tuple[str, int]]:
    """Parse a split list the way a PASCAL-5i reader does."""
    text = (root / "splits" / "pascal5i" / split / f"fold{fold}.txt").read_text()
    assert text.endswith("\n") and "\r" not in text
    pairs = []
    for line in text.splitlines():
        m = LINE.match(line)
        assert m, f"bad line {line!r} in {split}/fold{fold}.txt"
        pairs.append((m.group(1), int(m.group(2))))
    return pairs


def load_mask(root: Path, image_id: str) -> np.ndarray:
    with Image.open(root / "VOC2012" / "SegmentationClassAug" / f"{image_id}.png") as im:
        assert im.format == "PNG" and im.mode == "L"
        return np.asarray(im)


def all_ids(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "VOC2012" / "SegmentationClassAug").glob("*.png"))


def test_same_seed_is_byte_identical_and_other_seed_differs(bench, tmp_path):
    again = generate_embedded_benchmark(tmp_path / "again", seed=0, **SMALL)
    other = generate_embedded_benchmark(tmp_path / "other", seed=1, **SMALL)
    rel = [p.relative_to(bench) for p in sorted(bench.rglob("*")) if p.is_file()]
    assert rel == [p.relative_to(again) for p in sorted(again.rglob("*")) if p.is_file()]
    for r in rel:
        if r.suffix in (".png", ".txt", ".jpg"):
            assert (bench / r).read_bytes() == (again / r).read_bytes(), r
    lists = [(s, f) for s in ("trn", "val") for f in range(4)]
    assert [read_list(bench, s, f) for s, f in lists] != [read_list(other, s, f) for s, f in lists]
    differing = [i for i in all_ids(bench) if not np.array_equal(load_mask(bench, i), load_mask(other, i))]
    assert len(differing) == len(all_ids(bench))


def test_layout_and_list_format(bench):
    ids = all_ids(bench)
    jpgs = sorted(p.stem for p in (bench / "VOC2012" / "JPEGImages").glob("*.jpg"))
    assert ids == jpgs and len(ids) == SMALL["n_train"] + SMALL["n_val"]
    for image_id in (ids[0], ids[-1]):
        with Image.open(bench / "VOC2012" / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
        assert load_mask(bench, image_id).shape == (64, 64)
    trn_ids = {i for f in range(4) for i, _ in read_list(bench, "trn", f)}
    val_ids = {i for f in range(4) for i, _ in read_list(bench, "val", f)}
    assert trn_ids and val_ids and not trn_ids & val_ids
    assert {i[:5] for i in trn_ids} == {"2000_"} and {i[:5] for i in val_ids} == {"2001_"}
    for split in ("trn", "val"):
        for fold in range(4):
            pairs = read_list(bench, split, fold)
            assert len(pairs) == len(set(pairs))
            # the shipped lists: val sorted by line, trn by class then image
            key = (lambda p: f"{p[0]}__{p[1]:02d}") if split == "val" else (lambda p: (p[1], p[0]))
            assert pairs == sorted(pairs, key=key)
            assert {c for _, c in pairs} == set(fold_classes(fold))
            for cls in fold_classes(fold):  # at least a query and a different support per class
                assert sum(c == cls for _, c in pairs) >= 2
    marker = json.loads((bench / MARKER_NAME).read_text())
    assert marker["seed"] == 0 and marker["image_size"] == 64 and marker["n_train"] == 40
    assert [c["name"] for c in marker["classes"]] == list(EMBEDDED_CLASS_NAMES)
    assert marker["counts"]["pairs"]["val/fold2"] == len(read_list(bench, "val", 2))


def test_lists_match_mask_contents(bench):
    listed: dict[str, set[int]] = {}
    for split in ("trn", "val"):
        for fold in range(4):
            for image_id, cls in read_list(bench, split, fold):
                listed.setdefault(image_id, set()).add(cls)
    for image_id in all_ids(bench):
        mask = load_mask(bench, image_id)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(21)) | {255}
        present = values - {0, 255}
        assert len(present) >= 2, f"{image_id} has classes {present}"
        assert listed.get(image_id, set()) == present  # every contained class listed once, nothing else


def test_fold_classes_partition_and_names():
    folds = [set(fold_classes(f)) for f in range(4)]
    assert all(len(f) == 5 for f in folds) and set().union(*folds) == set(range(1, 21))
    assert sum(len(f) for f in folds) == 20
    assert len(set(EMBEDDED_CLASS_NAMES)) == 20
    parts = [n.split("-") for n in EMBEDDED_CLASS_NAMES]
    for a in range(20):  # any two classes differ in at least two of colour, texture, shape
        for b in range(a + 1, 20):
            assert sum(x != y for x, y in zip(parts[a], parts[b])) >= 2, (parts[a], parts[b])
    with pytest.raises(ValueError, match="fold"):
        fold_classes(4)


def test_ignore_boundary_separates_every_label_change(bench):
    for image_id in all_ids(bench):
        mask = load_mask(bench, image_id)
        band = mask == 255
        assert band.any() and band.mean() < 0.2
        # no two differently labelled pixels touch, not even diagonally: the band sits on every contour
        for a, b in (
            (mask[:, :-1], mask[:, 1:]),
            (mask[:-1, :], mask[1:, :]),
            (mask[:-1, :-1], mask[1:, 1:]),
            (mask[:-1, 1:], mask[1:, :-1]),
        ):
            both = (a != 255) & (b != 255)
            assert (a[both] == b[both]).all(), f"{image_id}: labels touch without an ignore pixel"
        # thin: every ignore pixel has a labelled pixel within 2 px
        padded = np.pad(~band, 2)
        near_valid = np.zeros_like(band)
        for dy in range(5):
            for dx in range(5):
                near_valid |= padded[dy : dy + 64, dx : dx + 64]
        assert near_valid[band].all(), image_id


def test_ensure_uses_marker_and_rejects_other_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("FSSEG_CACHE", str(tmp_path / "cache"))
    root = ensure_embedded_benchmark(seed=3, **SMALL)
    assert root == tmp_path / "cache" / "embedded-v1-seed3-s64-n40-40"
    stamp = (root / MARKER_NAME).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_embedded_benchmark(seed=3, **SMALL) == root
    assert time.perf_counter() - t0 < 0.1
    assert (root / MARKER_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_val"):
        ensure_embedded_benchmark(root, seed=3, image_size=64, n_train=40, n_val=41)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temporary left over


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        generate_embedded_benchmark(tmp_path / "x", n_train=10, n_val=40, image_size=64)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="full"):
        generate_embedded_benchmark(tmp_path / "full", **SMALL)
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"


def _start_and_interrupt(tmp_path: Path, sig: int) -> Path:
    """Start a long generation in a child process and send ``sig`` once it has written a few images."""
    root = tmp_path / "bench"
    code = (  # Ctrl-C raises KeyboardInterrupt even when the suite runs in a background job (SIGINT ignored there)
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from pathlib import Path; from fsseg.data.embedded import generate_embedded_benchmark as g; "
        f"g(Path({str(root)!r}), image_size=64, n_train=5000, n_val=40)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = list(tmp_path.glob(".bench.partial-*/VOC2012/JPEGImages/*.jpg"))
            if len(partial) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "generation ended before it could be interrupted"
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return root


def test_killed_generation_leaves_no_final_directory(tmp_path):
    root = _start_and_interrupt(tmp_path, signal.SIGKILL)
    assert not root.exists()
    assert ensure_embedded_benchmark(root, seed=0, **SMALL) == root and (root / MARKER_NAME).is_file()


def test_interrupted_generation_cleans_up(tmp_path):
    root = _start_and_interrupt(tmp_path, signal.SIGINT)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_pascal_reader_loads_episodes(bench):
    from fsseg.data.pascal import PascalFewShot

    test = PascalFewShot(
        bench, split="test", fold=1, shot=2, img_size=64, n_episodes=12, splits_dir=bench / "splits"
    )
    for i in range(len(test)):
        ep = test[i]
        assert 5 <= int(ep["class_id"]) <= 9 and ep["query_name"] not in ep["support_names"]
        assert ep["query_img"].shape == (3, 64, 64) and ep["support_masks"].shape == (2, 64, 64)
        assert (ep["query_mask"] == 1).any() and (ep["query_mask"] == 255).any()
        assert (ep["support_masks"] == 1).flatten(1).any(1).all()
        assert (ep["query_mask"] == 0).any()  # other objects and background are not the target
    train = PascalFewShot(
        bench, split="trn", fold=1, shot=1, img_size=64, n_episodes=8, splits_dir=bench / "splits"
    )
    assert {int(train[i]["class_id"]) for i in range(8)}.isdisjoint(range(5, 10))


def test_concurrent_ensure_calls_agree(tmp_path):
    """Two processes (e.g. DDP ranks) generating at once: both return the same complete root, no leftovers."""
    root = tmp_path / "shared"
    code = (
        "import sys; from pathlib import Path; from fsseg.data.embedded import ensure_embedded_benchmark as e; "
        f"print(e(Path({str(root)!r}), seed=0, image_size=64, n_train=60, n_val=40))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [str(root)] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
    assert json.loads((root / MARKER_NAME).read_text())["n_train"] == 60


def test_render_corpus_holds_only_the_given_classes_and_is_seeded():
    classes = list(range(6, 21))  # the training classes of fold 0
    images, labels = render_corpus(classes, 12, image_size=64, seed=3)
    assert images.shape == (12, 64, 64, 3) and labels.shape == (12, 64, 64)
    present = set(np.unique(labels).tolist()) - {0, 255}
    assert present and present <= set(classes), present
    again, _ = render_corpus(classes, 12, image_size=64, seed=3)
    other, _ = render_corpus(classes, 12, image_size=64, seed=4)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    with pytest.raises(ValueError, match="classes"):
        render_corpus([0, 5], 2)


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["train_tiny_diffews", "train_tiny_diffseg"])
def test_tiny_model_tools_write_loadable_folders(tool, tmp_path):
    """The asset recipes run end to end (a few steps on a small corpus) and write folders the modules load."""
    out = tmp_path / tool
    steps = (
        ["--vae-steps", "2", "--unet-steps", "2"]
        if tool.endswith("diffews")
        else ["--movq-steps", "2", "--clip-steps", "2", "--unet-steps", "2"]
    )
    cmd = [sys.executable, f"tools/{tool}.py", "--out", str(out), "--corpus-size", "24", *steps]
    root = Path(__file__).resolve().parents[1]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, timeout=300)
    card = json.loads((out / "training.json").read_text())
    assert not set(card["classes_seen"]) & set(fold_classes(0))
    if tool.endswith("diffews"):
        from fsseg.models.diffews import DiffewsModule

        DiffewsModule(pretrained=str(out))
    else:
        from fsseg.models.diffseg import DiffSegModule

        DiffSegModule(decoder=str(out / "decoder"), prior=str(out / "prior"), edge_source="sobel")
    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_corpus_tensors_resize_and_one_object_mask_per_image():
    from fsseg.data.corpus import corpus_tensors, random_object_masks, training_classes

    classes = training_classes(0)
    assert classes == list(range(6, 21))
    images, labels = corpus_tensors(classes, 6, size=64, seed=0)
    assert images.shape == (6, 3, 64, 64) and labels.shape == (6, 64, 64) and labels.dtype == torch.uint8
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    masks = random_object_masks(labels, torch.Generator().manual_seed(0))
    for mask, label in zip(masks, labels):  # each mask is exactly one present class's pixels
        classes_under = set(label[mask > 0].tolist())
        assert len(classes_under) == 1 and classes_under <= set(classes)
    assert not random_object_masks(torch.zeros(1, 8, 8, dtype=torch.uint8), torch.Generator()).any()
