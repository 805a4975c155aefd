"""Reproduction tables: published numbers (docs/PROTOCOL.md §5), the refusal listing every missing input, the table writer
on fake runs, evaluation over seeds on real runs, and (slow) the smoke reproduction of Table 1."""

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from test_cli import write_config
from test_compare import write_run

from fsseg.cli import main
from fsseg.cli.trainer import run_cli
from fsseg.compare import EpisodeMismatch, compare_runs
from fsseg.reproduce.__main__ import main as reproduce_main
from fsseg.reproduce.published import published_miou
from fsseg.reproduce.runner import MissingInputs, reproduce
from fsseg.reproduce.stats import load_run
from fsseg.reproduce.tables import Measured, table_lines, to_csv, write_table

REPO = Path(__file__).resolve().parent.parent
TABLE1, TABLE2 = REPO / "configs/reproduce/table1.yaml", REPO / "configs/reproduce/table2.yaml"
# docs/PROTOCOL.md §5, typed in independently of fsseg/reproduce/published.py: (key, benchmark, shot) -> (folds, mean)
PUBLISHED = {
    ("diffews_incontext", "coco20i", 1): (None, 71.3), ("diffews_incontext", "coco20i", 5): (None, 72.2),
    ("diffews_incontext", "pascal5i", 1): (None, 88.3), ("diffews_incontext", "pascal5i", 5): (None, 87.8),
    ("diffews_incontext", "lvis92i", 1): (None, 31.4), ("diffews_incontext", "lvis92i", 5): (None, 35.4),
    ("diffews_strict", "coco20i", 1): ([47.7, 56.4, 51.9, 48.7], 51.2),
    ("diffews_strict", "coco20i", 5): ([52.0, 63.0, 54.5, 54.3], 56.0),
    ("diffseg", "pascal5i", 1): ([70.5, 75.8, 67.9, 63.2], 69.3), ("diffseg", "pascal5i", 5): (None, 72.1),
}  # fmt: skip


def test_published_numbers_are_reference_section_5():
    for (key, bench, shot), (folds, mean) in PUBLISHED.items():
        assert published_miou(key, bench, shot) == mean
        for f in range(4):
            assert published_miou(key, bench, shot, f) == (folds[f] if folds else None)
    assert published_miou(None, "pascal5i", 1) is None and published_miou("diffseg", "coco20i", 1) is None
    assert published_miou("diffews_n_strict", "coco20i", 5) == 60.7
    assert published_miou("diffseg_coco", "coco_40_20_20", 1, 3) == 48.3


def test_refuses_before_any_work_listing_every_missing_input(tmp_path, capsys):
    data, ckpts, out = tmp_path / "data", tmp_path / "weights", tmp_path / "reports"
    (ckpts / "stable-diffusion-2-1").mkdir(parents=True)
    with pytest.raises(MissingInputs) as e:
        reproduce(TABLE1, out, str(data), str(ckpts))
    msg = str(e.value)
    expected = [data / "VOC2012/JPEGImages", data / "COCO2014/annotations/val2014", data / "LVIS/coco/val2017",
                ckpts / "diffews-incontext/unet", ckpts / "kandinsky-2-2-prior", ckpts / "hed-bsds500.safetensors",
                ckpts / "diffseg/pascal5i-fold3.ckpt", ckpts / "baseline/pascal5i-fold2/checkpoints/last.ckpt",
                ckpts / "baseline/pascal5i-fold0/config.yaml"]  # fmt: skip
    for path in expected:
        assert f"missing {path}" in msg, path
    assert f"data root {data} does not exist" in msg
    assert f"missing {ckpts / 'stable-diffusion-2-1'}" not in msg  # present, so not listed
    assert "huggingface-cli download kandinsky-community/kandinsky-2-2-prior" in msg  # and where it goes
    assert not out.exists()  # nothing ran, no table
    # without DATA/CKPTS at all (the Makefile passes empty strings): says so and lists the layout under <DATA>
    assert reproduce_main(["table2", "--data", "", "--ckpts", "", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "DATA is not set" in err and "CKPTS is not set" in err
    assert "missing <DATA>/COCO2014/train2014" in err and "missing <CKPTS>/diffews/coco20i-fold3.ckpt" in err
    assert not out.exists()


def test_cells_of_the_full_and_the_smoke_table():
    from fsseg.reproduce.spec import build_cells, load_spec

    spec = load_spec(TABLE1)
    full = build_cells(spec, "/d", "/w", smoke=False)
    assert (
        len(full) == 2 * (4 + 4 + 10) + 2 * 4 + 2 * 4
    )  # DiffewS (COCO, PASCAL, LVIS folds), DiffSeg, baseline
    ds = [c for c in full if c.row == "DiffSeg" and c.fold == 3 and c.shot == 5][0]
    assert ds.seeds == list(range(10)) and ds.ckpt == "/w/diffseg/pascal5i-fold3.ckpt"
    assert ds.args[ds.args.index("--model.init_args.prior") + 1] == "/w/kandinsky-2-2-prior"
    lvis = [c for c in full if c.benchmark == "lvis92i"]
    assert sorted({c.fold for c in lvis}) == list(range(10)) and lvis[0].seeds == [0]
    assert "--data.test_episodes" in lvis[0].args and "null" in lvis[0].args  # the protocol's 2300
    smoke = build_cells(spec, None, None, smoke=True)
    assert {(c.row, c.benchmark, c.shot) for c in smoke} == {(c.row, c.benchmark, c.shot) for c in full}
    assert all(c.evaluated_on == "embedded" and c.fold == 0 and c.train and c.ckpt is None for c in smoke)
    assert {c.row: len(c.seeds) for c in smoke} == {"DiffewS": 1, "DiffSeg": 2, "Prototype baseline": 1}
    assert all(Path(c.config).is_file() for c in smoke)


def test_table_writer_on_fake_runs(tmp_path):
    measured = []
    for fold in range(4):  # DiffSeg-like: 3 seeds per fold -> t intervals
        runs = [write_run(tmp_path / f"ds{fold}s{s}", skill=0.6 + 0.05 * fold, seed=10 * fold + s, fold=fold,
                          data_seed=s) for s in range(3)]  # fmt: skip
        measured.append(Measured("DiffSeg", "strict", "diffseg", "pascal5i", "pascal5i", fold, 1, runs))
    for fold in range(2):  # one seed -> bootstrap over episodes
        run = write_run(tmp_path / f"dw{fold}", skill=0.8, seed=fold, fold=fold)
        measured.append(
            Measured("DiffewS", "in-context", "diffews_incontext", "coco20i", "embedded", fold, 1, [run])
        )
    measured.append(Measured("Baseline", "strict", None, "pascal5i", "pascal5i", 0, 1, [tmp_path / "dw0"]))
    lines = table_lines(measured, n_boot=300)
    by = {(r["method"], r["fold"]): r for r in lines}
    assert len(lines) == 5 + 3 + 2
    for fold, pub in enumerate([70.5, 75.8, 67.9, 63.2]):
        r = by["DiffSeg", str(fold)]
        seeds = [load_run(tmp_path / f"ds{fold}s{s}").metrics["miou"] for s in range(3)]
        assert r["ours"] == pytest.approx(sum(seeds) / 3) and r["published"] == pub
        assert r["diff"] == pytest.approx(r["ours"] - pub) and r["interval"] == "t over 3 seeds"
        assert r["ci_low"] < r["ours"] < r["ci_high"] and r["seeds"] == 3 and r["episodes"] == 60
    mean = by["DiffSeg", "mean(0,1,2,3)"]
    assert mean["published"] == 69.3 and mean["episodes"] == 240
    assert mean["ours"] == pytest.approx(sum(by["DiffSeg", str(f)]["ours"] for f in range(4)) / 4)
    dw = by["DiffewS", "mean(0,1)"]
    assert (
        dw["published"] == 71.3
        and dw["interval"].startswith("bootstrap")
        and dw["ci_low"] < dw["ours"] < dw["ci_high"]
    )
    assert by["DiffewS", "0"]["published"] is None and by["DiffewS", "0"]["diff"] is None
    assert by["Baseline", "mean(0)"]["published"] is None
    assert table_lines(measured, n_boot=300) == lines  # seeded
    md, csv_path = write_table(lines, tmp_path / "reports", "table1", "Table 1", note="test note")
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert csv_path.read_text() == to_csv(lines) and len(rows) == len(lines)
    assert [
        float(r["published"]) for r in rows if r["method"] == "DiffSeg" and r["fold"] != "mean(0,1,2,3)"
    ] == [70.5, 75.8, 67.9, 63.2]
    assert [r["published"] for r in rows if r["method"] == "Baseline"] == ["", ""]
    text = md.read_text()
    assert "test note" in text and "| DiffSeg | strict | PASCAL-5i | 1 | mean(0,1,2,3) |" in text
    assert "COCO-20i (run on embedded)" in text and "| 69.3 |" in text


def test_evaluation_over_seeds_and_compare_on_real_runs(tmp_path, small_embedded, capsys):
    cfg = write_config(tmp_path, small_embedded)
    ckpt = run_cli(["fit", "--config", str(cfg)]).trainer.checkpoint_callback.last_model_path
    with pytest.raises(SystemExit) as e:
        main(["evaluate-seeds", "--seeds", "2", "--out", str(tmp_path / "seeds"), "--config", str(cfg),
              "--ckpt_path", ckpt])  # fmt: skip
    assert e.value.code == 0 and "2 seeds: mIoU" in capsys.readouterr().out
    summary = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    s0, s1 = (load_run(tmp_path / "seeds" / f"seed{s}") for s in (0, 1))
    assert summary["seeds"] == [0, 1] and s0.metrics["seed"] == 0 and s1.metrics["seed"] == 1
    values = [s0.metrics["miou"], s1.metrics["miou"]]
    assert summary["miou"]["values"] == values and summary["miou"]["mean"] == pytest.approx(sum(values) / 2)
    assert summary["miou"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    # seed 0 is the published episodes: the same as a plain test run
    plain = load_run(run_cli(["test", "--config", str(cfg), "--ckpt_path", ckpt]).trainer.log_dir)
    assert [(e["query"], e["supports"]) for e in plain.episodes] == [
        (e["query"], e["supports"]) for e in s0.episodes
    ]
    assert [e["query"] for e in s1.episodes] == [e["query"] for e in s0.episodes]  # PASCAL: queries fixed
    assert [e["supports"] for e in s1.episodes] != [e["supports"] for e in s0.episodes]  # supports redrawn
    assert compare_runs(plain, s0, n_boot=100)["diff"] == 0
    with pytest.raises(EpisodeMismatch, match="supports"):
        compare_runs(s0, s1)


@pytest.mark.slow
def test_smoke_reproduction_of_table1(tmp_path, small_embedded):
    spec = yaml.safe_load(TABLE1.read_text())
    md, csv_path = reproduce(TABLE1, tmp_path / "reports", str(small_embedded), None, smoke=True, n_boot=200)
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    means = {(r["method"], r["benchmark"], int(r["shot"])): r for r in rows if r["fold"].startswith("mean")}
    expected = {(row["name"], b, s) for row in spec["rows"] for b in row["benchmarks"] for s in row["shots"]}
    assert set(means) == expected
    keys = {row["name"]: row["published"] for row in spec["rows"]}
    for (name, bench, shot), r in means.items():
        ref = PUBLISHED.get((keys[name], bench, shot))
        assert (r["published"] == "") if ref is None else (float(r["published"]) == ref[1])
        assert r["evaluated_on"] == "embedded" and 0 <= float(r["ours"]) <= 100
        assert float(r["ci_low"]) <= float(r["ours"]) <= float(r["ci_high"])
    assert means["DiffSeg", "pascal5i", 1]["seeds"] == "2"
    diffseg_f0 = [r for r in rows if r["method"] == "DiffSeg" and r["fold"] == "0" and r["shot"] == "1"]
    assert float(diffseg_f0[0]["published"]) == 70.5
    assert "SMOKE RUN" in md.read_text()
    run = tmp_path / "reports/runs/table1/diffseg-strict/pascal5i/fold0-1shot/seed1"
    assert (run / "metrics.json").is_file() and (run / "episodes.jsonl").is_file()
