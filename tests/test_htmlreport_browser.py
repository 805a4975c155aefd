"""A generated report opened from disk in a real browser (Debian's headless Chromium; `.ci/run` installs it): no
console errors, every picture loaded, the headline numbers on the page equal metrics.json and `fsseg compare`, and
the screenshot shows something. Without Chromium these tests fail with how to install it: deselect them only on
purpose, with ``-m "not browser"``."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _runs import make_runs
from PIL import Image

from fsseg.compare import compare_runs
from fsseg.htmlreport import write_report
from fsseg.htmlreport.browser import BrowserError, open_page
from fsseg.reproduce.stats import load_run

pytestmark = pytest.mark.browser
HEADLINE = ("miou-a", "miou-b", "fbiou-a", "fbiou-b", "miou-diff", "miou-lo", "miou-hi")


@pytest.fixture(scope="module")
def report(tmp_path_factory, small_embedded) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("report")
    runs = make_runs(tmp, small_embedded)
    return write_report(tmp / "report", runs["own"], runs["other_class"], n_boot=300, gallery=2), runs


def test_the_report_opens_in_chromium_with_its_numbers_and_every_picture(report):
    index, runs = report
    page = open_page(index, HEADLINE, width=1280, height=900)
    assert page.errors == []
    html = index.read_text()
    assert len(page.images) == html.count("<img ") > 10
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in page.images), [i["src"] for i in page.images]
    a, b = (json.loads((runs[k] / "metrics.json").read_text()) for k in ("own", "other_class"))
    shown = page.texts
    assert (shown["miou-a"], shown["miou-b"]) == (f"{a['miou']:.2f}", f"{b['miou']:.2f}")
    assert (shown["fbiou-a"], shown["fbiou-b"]) == (f"{a['fbiou']:.2f}", f"{b['fbiou']:.2f}")
    cmp = compare_runs(load_run(runs["own"]), load_run(runs["other_class"]), n_boot=300)
    assert shown["miou-diff"] == f"{cmp['diff']:+.2f}"
    assert (shown["miou-lo"], shown["miou-hi"]) == (
        f"{cmp['interval'][0]:+.2f}",
        f"{cmp['interval'][1]:+.2f}",
    )
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot)).convert("RGB"))
    assert shot.shape == (900, 1280, 3)
    assert shot.std() > 10 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # not blank: text, charts


def test_the_check_sees_a_broken_picture_and_a_script_error(report, tmp_path):
    index, _ = report
    broken = tmp_path / "broken"
    shutil.copytree(index.parent, broken)
    (broken / "images/scatter.png").unlink()
    html = (
        (broken / "index.html")
        .read_text()
        .replace("<body>", "<body><script>console.error('boom')</script>", 1)
    )
    (broken / "index.html").write_text(html)
    page = open_page(broken / "index.html", ("miou-a", "no-such-id"))
    assert [i["src"].rsplit("/", 1)[-1] for i in page.images if not i["naturalWidth"]] == ["scatter.png"]
    assert any("boom" in e for e in page.errors) and any("scatter.png" in e for e in page.errors)
    assert page.texts["no-such-id"] is None and page.texts["miou-a"]


def test_without_chromium_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.delenv("FSSEG_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on it
    with pytest.raises(BrowserError, match="apt-get install -y chromium"):
        open_page(tmp_path / "index.html")
