"""``fsseg report``: the page's numbers are `fsseg compare`'s, every picture it names exists, a support-control pair
says how much the method uses its support, old runs without predictions still get their numbers, bad input is
refused with nothing half-written, and the demo's report links every method's pages. Runs are real `fsseg test`
runs (tests/_runs.py); the browser check is in test_htmlreport_browser.py."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from _runs import make_runs
from PIL import Image

from fsseg.cli import run
from fsseg.htmlreport import write_demo_report, write_report
from fsseg.predictions import FIELD, decode_mask


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_embedded) -> dict[str, Path]:
    return make_runs(tmp_path_factory.mktemp("runs"), small_embedded)


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def copy_run(src: Path, dst: Path, keep_predictions: bool = True, config: bool = True, edit=None) -> Path:
    """A copy of a run folder; without predictions it is a run as fsseg wrote them before predictions were kept."""
    dst.mkdir(parents=True)
    (dst / "metrics.json").write_text((src / "metrics.json").read_text())
    if config:
        (dst / "config.yaml").write_text((src / "config.yaml").read_text())
    records = [json.loads(line) for line in (src / "episodes.jsonl").read_text().splitlines()]
    if not keep_predictions:
        records = [{k: v for k, v in r.items() if k != FIELD} for r in records]
    if edit is not None:
        edit(records)
    (dst / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return dst


def local_images(folder: Path) -> list[str]:
    """Every picture the page names; each must be a PNG inside the report folder."""
    html = (folder / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from a network
    srcs = re.findall(r'<img src="([^"]+)"', html)
    for src in srcs:
        assert not src.startswith(("/", "file:")) and (folder / src).is_file(), src
        with Image.open(folder / src) as im:
            assert im.format == "PNG" and im.width > 0
    return srcs


def test_pair_report_shows_the_numbers_of_fsseg_compare(runs, tmp_path, capsys):
    a, b, out = runs["untrained"], runs["own"], tmp_path / "report"
    assert run(["report", str(a), str(b), "--out", str(out), "--n-boot", "300", "--gallery", "3"]) == 0
    assert f"fsseg report: wrote {out / 'index.html'}" in capsys.readouterr().out
    assert run(["compare", str(a), str(b), "--n-boot", "300", "--json", str(tmp_path / "cmp.json")]) == 0
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    rep = json.loads((out / "report.json").read_text())
    assert rep["comparison"] == cmp  # the same computation, the same numbers
    html = (out / "index.html").read_text()
    for key, value in (("miou-a", cmp["miou_a"]), ("miou-b", cmp["miou_b"]), ("fbiou-a", cmp["fbiou_a"]),
                       ("fbiou-b", cmp["fbiou_b"])):  # fmt: skip
        assert f'id="{key}">{value:.2f}<' in html
    assert (
        f'id="miou-diff">{cmp["diff"]:+.2f}<' in html and f'id="miou-lo">{cmp["interval"][0]:+.2f}<' in html
    )
    assert cmp["miou_a"] == pytest.approx(metrics(a)["miou"]) and cmp["fbiou_b"] == pytest.approx(
        metrics(b)["fbiou"]
    )
    srcs = local_images(out)
    assert {
        "images/per_class.png",
        "images/scatter.png",
        "images/diff_hist.png",
        "images/breakdown.png",
    } <= set(srcs)
    # the gallery: gains, losses, a random sample; each card: support, query + ground truth, A's and B's prediction
    sections = {s["key"]: s for s in rep["gallery"]}
    assert list(sections) == ["gains", "losses", "random"] and len(sections["random"]["cards"]) == 3
    ious = {s: [c["iou"] for c in sections[s]["cards"]] for s in sections}
    assert all(float(b_) > float(a_) for a_, b_ in ious["gains"]) and all(
        float(b_) < float(a_) for a_, b_ in ious["losses"]
    )
    card = sections["random"]["cards"][0]
    assert [p["title"] for p in card["panels"]] == [
        "support",
        "query + ground truth",
        "prediction A",
        "prediction B",
    ]
    assert rep["support_use"] is None  # two models, not a support control
    # where the foreground goes, for both runs, from their stored predictions; embedded: by shared attribute
    assert [b_["summary"]["episodes"] for b_ in rep["breakdowns"]] == [24, 24]
    assert "colour" in rep["attributes"] and "other objects sharing colour" in html


def test_a_support_control_pair_says_how_much_the_method_uses_its_support(runs, tmp_path):
    own, other = runs["own"], runs["other_class"]
    write_report(tmp_path / "r", own, other, n_boot=300, gallery=2)
    rep = json.loads((tmp_path / "r/report.json").read_text())
    s = rep["support_use"]
    assert s["control"] == "other_class" and s["same_checkpoint"]
    assert s["own"] == pytest.approx(metrics(own)["miou"]) and s["controlled"] == pytest.approx(
        metrics(other)["miou"]
    )
    assert s["drop"] == pytest.approx(s["own"] - s["controlled"])
    assert s["interval"] == pytest.approx(
        [-rep["comparison"]["interval"][1], -rep["comparison"]["interval"][0]]
    )
    # the masks' agreement, computed here from the stored predictions
    recs = [
        [json.loads(line) for line in (f / "episodes.jsonl").read_text().splitlines()] for f in (own, other)
    ]
    agree = []
    for ra, rb in zip(*recs):
        pa, pb = decode_mask(ra[FIELD]), decode_mask(rb[FIELD])
        agree.append(100 * (pa & pb).sum() / (pa | pb).sum() if (pa | pb).any() else 100.0)
    assert s["agreement"] == pytest.approx(np.mean(agree))
    html = (tmp_path / "r/index.html").read_text()
    assert "How much does PrototypeModule use its support?" in html and f"{s['drop']:.1f}" in html
    card = rep["gallery"][-1]["cards"][0]  # both supports are shown: the control replaced them
    assert [p["title"] for p in card["panels"]][:2] == ["support (A)", "support (B)"]
    # the other way round (the control as A) gives the same answer
    write_report(tmp_path / "r2", other, own, n_boot=300, gallery=0)
    s2 = json.loads((tmp_path / "r2/report.json").read_text())["support_use"]
    assert s2["drop"] == pytest.approx(s["drop"]) and s2["interval"] == pytest.approx(s["interval"])


def test_one_run_and_runs_without_predictions_or_data(runs, tmp_path):
    own = runs["own"]
    write_report(tmp_path / "one", own, n_boot=300, gallery=2)
    rep = json.loads((tmp_path / "one/report.json").read_text())
    h = rep["headline"]
    assert h["miou"] == metrics(own)["miou"] and h["miou_interval"][0] <= h["miou"] <= h["miou_interval"][1]
    assert [s["key"] for s in rep["gallery"]] == ["best", "worst", "random"]
    assert f'id="miou-a">{h["miou"]:.2f}<' in (tmp_path / "one/index.html").read_text()
    local_images(tmp_path / "one")
    # a run made before predictions were kept: the numbers, a note, no breakdown of its own
    old = copy_run(own, tmp_path / "old", keep_predictions=False)
    write_report(tmp_path / "old_report", old, runs["untrained"], n_boot=300, gallery=2)
    rep = json.loads((tmp_path / "old_report/report.json").read_text())
    html = (tmp_path / "old_report/index.html").read_text()
    assert rep["comparison"]["miou_a"] == pytest.approx(metrics(own)["miou"])
    assert "kept no predictions" in rep["gallery_note"] and "kept no predictions" in html
    assert "unavailable" in rep["breakdowns"][0]["summary"] and "precision" in rep["breakdowns"][1]["summary"]
    local_images(tmp_path / "old_report")
    # a run whose data cannot be rebuilt (no config.yaml): numbers only
    bare = copy_run(own, tmp_path / "bare", config=False)
    write_report(tmp_path / "bare_report", bare, n_boot=300)
    rep = json.loads((tmp_path / "bare_report/report.json").read_text())
    assert (
        rep["gallery"] == []
        and "Pictures are unavailable" in rep["gallery_note"]
        and "config.yaml" in rep["gallery_note"]
    )


def test_refusals_leave_nothing_half_written(runs, tmp_path, capsys, monkeypatch):
    own, other, out = runs["own"], runs["untrained"], tmp_path / "r"
    assert run(["report", str(own), "--out", str(out), "--n-boot", "50", "--gallery", "0"]) == 0
    stamp = (out / "index.html").stat().st_mtime_ns
    assert run(["report", str(own), "--out", str(out), "--n-boot", "50"]) == 2
    assert "already holds a report: pass --overwrite" in capsys.readouterr().err
    assert (out / "index.html").stat().st_mtime_ns == stamp
    # a folder of the user's: --overwrite replaces only what fsseg report wrote there
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    (mine / "notes.txt").write_text("keep")
    assert run(["report", str(own), "--out", str(mine), "--n-boot", "50", "--overwrite"]) == 2
    assert "was not written by fsseg report" in capsys.readouterr().err
    assert (mine / "index.html").read_text() == "my page" and (mine / "notes.txt").read_text() == "keep"
    (mine / "index.html").unlink()
    assert run(["report", str(own), "--out", str(mine), "--n-boot", "50", "--gallery", "0"]) == 0
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "report.json").exists()
    assert run(["report", str(own), str(other), "--out", str(out), "--n-boot", "50", "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["comparison"] is not None  # replaced
    # runs on other episodes: refused, and neither the folder nor a temporary one is left
    fewer = copy_run(own, tmp_path / "fewer", edit=lambda recs: recs.pop())
    assert run(["report", str(fewer), str(other), "--out", str(tmp_path / "x"), "--n-boot", "50"]) == 2
    assert "did not evaluate the same episodes" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fewer", "mine", "r"]

    # a stored prediction that no longer gives the recorded counts: the data changed since the run
    def empty_first(recs):
        recs[0][FIELD] = {"size": recs[0][FIELD]["size"], "counts": f"{48 * 48}"}

    changed = copy_run(own, tmp_path / "changed", edit=empty_first)
    assert run(["report", str(changed), "--out", str(tmp_path / "y"), "--n-boot", "50"]) == 2
    err = capsys.readouterr().err
    assert "stored prediction of episode 0" in err and "data changed" in err and not (tmp_path / "y").exists()
    # without matplotlib: one line saying how to install it
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run(["report", str(own), "--out", str(tmp_path / "z")]) == 1
    assert "pip install 'fsseg[report]'" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_demo_report_links_each_method_against_the_baseline_and_its_control(runs, tmp_path):
    def row(config: str, test: Path, other: Path) -> dict:
        m, o = metrics(test), metrics(other)
        return {"config": config, "model": m["model"], "miou": m["miou"], "fbiou": m["fbiou"],
                "miou_other_class": o["miou"], "support_gain": m["miou"] - o["miou"],
                "runs": {"test": str(test), "other_class": str(other)},
                "setting": {k: m[k] for k in ("dataset", "fold", "shot", "episodes", "resolution")}}  # fmt: skip

    summary = {"rows": [row("configs/untrained.yaml", runs["untrained"], runs["untrained_other_class"]),
                        row("configs/demo_baseline.yaml", runs["own"], runs["other_class"])],
               "references": [{"reference": "all foreground", "miou": 4.6, "fbiou": 2.4}], "table": "the table"}  # fmt: skip
    index = write_demo_report(tmp_path / "report", summary, n_boot=100, gallery=1)
    html = index.read_text()
    links = re.findall(r'<a href="([^"]+)"', html)
    assert links == ["untrained_vs_demo_baseline/index.html", "untrained_support/index.html",
                     "demo_baseline_support/index.html"]  # fmt: skip
    for link in links:
        page = index.parent / link
        assert page.is_file() and '<a href="../index.html">' in page.read_text()
        local_images(page.parent)
    vs = json.loads((index.parent / "untrained_vs_demo_baseline/report.json").read_text())["comparison"]
    assert (vs["run_a"], vs["run_b"]) == (
        str(runs["own"]),
        str(runs["untrained"]),
    )  # B: the method, A: the baseline
    support = json.loads((index.parent / "demo_baseline_support/report.json").read_text())["support_use"]
    assert support["own"] == pytest.approx(metrics(runs["own"])["miou"])
    assert 'id="miou-demo_baseline"' in html and "reference: all foreground" in html
