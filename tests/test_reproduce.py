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
    ("diffews_n_strict", "coco20i", 1): ([47.1, 56.6, 53.8, 48.3], 52.2),  # the extended paper's Table 2
    ("diffews_n_strict", "coco20i", 5): ([57.3, 66.5, 60.3, 58.8], 60.7),
    ("diffseg", "pascal5i", 1): ([70.5, 75.8, 67.9, 63.2], 69.3), ("diffseg", "pascal5i", 5): ([72.8, 77.6, 68.7, 69.3], 72.1),
    ("diffseg_coco", "coco_40_20_20", 1): ([45.2, 54.1, 47.9, 48.3], 48.9),
    ("diffseg_coco", "coco_40_20_20", 5): ([50.7, 58.9, 51.6, 52.4], 53.4),
}  # fmt: skip


def test_published_numbers_are_protocol_section_5():
    for (key, bench, shot), (folds, mean) in PUBLISHED.items():
        assert published_miou(key, bench, shot) == mean
        for f in range(4):
            assert published_miou(key, bench, shot, f) == (folds[f] if folds else None)
    assert published_miou(None, "pascal5i", 1) is None and published_miou("diffseg", "coco20i", 1) is None
    # DiffewS-n's fold 0 is Table 7's "train 1-7 shot" row (1-shot 47.1, 5-shot 57.3): N = 7
    assert (
        published_miou("diffews_n_strict", "coco20i", 1, 0),
        published_miou("diffews_n_strict", "coco20i", 5, 0),
    ) == (47.1, 57.3)
    for key, bench, shot in [
        ("diffseg", "pascal5i", 5),
        ("diffseg_coco", "coco_40_20_20", 5),
        ("diffews_strict", "coco20i", 5),
    ]:
        folds = [published_miou(key, bench, shot, f) for f in range(4)]
        assert round(sum(folds) / 4, 1) == published_miou(key, bench, shot)  # the per-fold values read right


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
    assert "hf download kandinsky-community/kandinsky-2-2-prior" in msg  # and where it goes
    assert not out.exists()  # nothing ran, no table
    # without DATA/CKPTS at all (the Makefile passes empty strings): says so and lists the layout under <DATA>
    assert reproduce_main(["table2", "--data", "", "--ckpts", "", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "DATA is not set" in err and "CKPTS is not set" in err
    assert "missing <DATA>/COCO2014/train2014" in err and "missing <CKPTS>/diffews/coco20i-fold3.ckpt" in err
    assert not out.exists()


def test_a_second_reproduction_into_the_same_folder_is_refused_unless_overwrite(
    tmp_path, small_embedded, capsys
):
    """Refused before any work, in one line naming the folder and the flag; --overwrite replaces every earlier run."""
    cfg = write_config(tmp_path, small_embedded)
    ckpt = run_cli(["fit", "--config", str(cfg)]).trainer.checkpoint_callback.last_model_path
    spec = tmp_path / "mini.yaml"
    row = {"name": "baseline", "config": str(cfg), "ckpt": ckpt, "benchmarks": {"embedded": [0]}, "shots": [1],
           "args": {"data.test_episodes": 6}}  # fmt: skip
    spec.write_text(yaml.safe_dump({"title": "mini", "rows": [row]}))
    out = tmp_path / "reports"
    argv = [str(spec), "--data", str(small_embedded), "--ckpts", str(tmp_path), "--out", str(out)]
    assert reproduce_main(argv) == 0
    first = out / "runs/mini/baseline/embedded/fold0-1shot/seed0/metrics.json"
    stamp = first.stat().st_mtime_ns
    (out / "runs/mini/stray.txt").write_text("from the first run")
    assert reproduce_main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"{out} already holds results of an earlier fsseg reproduce mini" in err
        and "--overwrite" in err
    )
    assert first.stat().st_mtime_ns == stamp  # nothing ran
    assert reproduce_main([*argv, "--overwrite"]) == 0
    assert first.is_file() and not (out / "runs/mini/stray.txt").exists()  # replaced as a whole
    assert (out / "mini.md").is_file() and (out / "mini.csv").is_file()


def test_table_specs_are_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert reproduce_main(["table2", "--data", "", "--ckpts", "", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert (
        "DATA is not set" in err and "does not exist" not in err
    )  # found, then refused for the missing inputs
    assert reproduce_main(["tabel2", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean: reproduce/table2" in capsys.readouterr().err


def test_cells_of_the_full_and_the_smoke_table():
    from fsseg.reproduce.spec import build_cells, load_spec

    spec = load_spec(TABLE1)
    full = build_cells(spec, "/d", "/w", smoke=False)
    # DiffewS (COCO, PASCAL, LVIS folds), DiffSeg PASCAL, DiffSeg COCO 40/20/20, baseline, DIFT PASCAL and COCO
    assert len(full) == 2 * (4 + 4 + 10) + 2 * 4 + 2 * 4 + 2 * 4 + 2 * 4 + 2 * 4
    ds = [c for c in full if c.row == "DiffSeg" and c.fold == 3 and c.shot == 5][0]
    assert ds.seeds == list(range(10)) and ds.ckpt == "/w/diffseg/pascal5i-fold3.ckpt"
    assert ds.args[ds.args.index("--model.init_args.prior") + 1] == "/w/kandinsky-2-2-prior"
    assert ds.args[:2] == ["--trainer.precision", "32-true"]  # fp32 evaluation, before the row's own args
    lvis = [c for c in full if c.benchmark == "lvis92i"]
    assert sorted({c.fold for c in lvis}) == list(range(10)) and lvis[0].seeds == [0]
    assert "--data.test_episodes" in lvis[0].args and "null" in lvis[0].args  # the protocol's 2300
    assert [Path(c).name for c in lvis[0].configs] == [
        "diffews.yaml",
        "diffews_incontext.yaml",
    ]  # base + overlay
    coco40 = [c for c in full if c.benchmark == "coco_40_20_20"]
    assert {c.row for c in coco40} == {"DiffSeg (40/20/20)"} and coco40[0].published == "diffseg_coco"
    assert [Path(c).name for c in coco40[0].configs] == ["diffseg.yaml", "diffseg_coco.yaml"]
    assert all(not c.controls for c in full)
    smoke = build_cells(spec, None, None, smoke=True)
    assert {(c.row, c.benchmark, c.shot) for c in smoke} == {(c.row, c.benchmark, c.shot) for c in full}
    assert all(c.evaluated_on == "embedded" and c.fold == 0 and c.ckpt is None for c in smoke)
    assert all(c.train == (not c.row.startswith("DIFT")) for c in smoke)  # the training-free rows: --no_ckpt
    assert all(c.controls == ["other_class"] for c in smoke)
    assert {c.row: len(c.seeds) for c in smoke} == {"DiffewS": 1, "DiffSeg": 2, "DiffSeg (40/20/20)": 2,
                                                    "Prototype baseline": 1, "DIFT matching": 1,
                                                    "DIFT matching (COCO-20i)": 1}  # fmt: skip
    assert all(Path(c).is_file() for cell in smoke for c in cell.configs)


def test_table2_has_the_diffews_n_row():
    from fsseg.reproduce.spec import build_cells, load_spec

    cells = build_cells(load_spec(TABLE2), "/d", "/w", smoke=False)
    n = [c for c in cells if c.row == "DiffewS-n (1-7)"]
    assert len(n) == 8 and {c.fold for c in n} == {0, 1, 2, 3} and {c.shot for c in n} == {1, 5}
    assert [Path(c).name for c in n[0].configs] == ["diffews.yaml", "train_shots_1to7.yaml"]
    assert yaml.safe_load(Path(n[0].configs[1]).read_text())["model"]["init_args"]["train_shots"] == 7
    assert n[0].ckpt == "/w/diffews-n/coco20i-fold0.ckpt" and n[0].published == "diffews_n_strict"
    smoke = [c for c in build_cells(load_spec(TABLE2), None, None, smoke=True) if c.row == "DiffewS-n (1-7)"]
    assert smoke[0].fit_args == ["--model.init_args.train_shots", "7", "--data.shot", "7"]


def test_spec_rows_are_checked(tmp_path):
    from fsseg.reproduce.spec import load_spec

    spec = yaml.safe_load(TABLE2.read_text())
    spec["rows"][1]["name"] = spec["rows"][0]["name"]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="row names must be unique"):
        load_spec(tmp_path / "t.yaml")
    spec["rows"][1]["config"] = [None]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="'config' must be a config path or a list"):
        load_spec(tmp_path / "t.yaml")


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


def test_table_writer_control_column(tmp_path):
    """Cells also tested under data.support_control get a column with that mIoU (mean over its seed runs; the fold
    mean averages the folds); tables without controls keep their columns."""
    measured = []
    for fold in range(2):
        runs = [
            write_run(tmp_path / f"n{fold}s{s}", skill=0.9, seed=fold * 10 + s, fold=fold) for s in range(2)
        ]
        other = [
            write_run(tmp_path / f"o{fold}s{s}", skill=0.55, seed=50 + fold * 10 + s, fold=fold)
            for s in range(2)
        ]
        measured.append(
            Measured("Tiny", "smoke", None, "pascal5i", "embedded", fold, 1, runs, {"other_class": other})
        )
    lines = table_lines(measured, n_boot=100)
    by = {r["fold"]: r for r in lines}
    for fold in range(2):
        expected = sum(load_run(tmp_path / f"o{fold}s{s}").miou() for s in range(2)) / 2
        assert by[str(fold)]["other_class"] == pytest.approx(expected) and by[str(fold)]["empty_mask"] is None
        assert by[str(fold)]["other_class"] < by[str(fold)]["ours"]
    assert by["mean(0,1)"]["other_class"] == pytest.approx(
        (by["0"]["other_class"] + by["1"]["other_class"]) / 2
    )
    md, csv_path = write_table(lines, tmp_path / "out", "t", "T")
    text = md.read_text()
    assert "| Other-class supports |" in text and "Empty support masks" not in text
    assert f"| {by['mean(0,1)']['other_class']:.1f} |" in text
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert (
        float(rows[0]["other_class"]) == pytest.approx(by["0"]["other_class"], abs=1e-4)
        and rows[0]["empty_mask"] == ""
    )
    plain = table_lines(
        [Measured("Tiny", "s", None, "pascal5i", "pascal5i", 0, 1, [tmp_path / "n0s0"])], n_boot=50
    )
    assert "Other-class" not in write_table(plain, tmp_path / "plain", "t", "T")[0].read_text()


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
    text = md.read_text()
    assert "SMOKE RUN" in text and "Sobel" in text and "| Other-class supports |" in text
    run = tmp_path / "reports/runs/table1/diffseg-strict/pascal5i/fold0-1shot/seed1"
    assert (run / "metrics.json").is_file() and (run / "episodes.jsonl").is_file()
    control = json.loads((run.parent / "other_class" / "seed1" / "metrics.json").read_text())
    assert control["support_control"] == "other_class" and control["seed"] == 1
    for r in means.values():  # every smoke row shows the other-class control of the same checkpoint
        assert 0 <= float(r["other_class"]) <= 100
    base = means["Prototype baseline", "pascal5i", 1]
    assert float(base["other_class"]) < float(base["ours"])  # the baseline segments from its support
