"""One report page written into a folder: ``index.html`` (Jinja2), its charts and gallery pictures under ``images/``
and ``report.json`` (every number on the page). `Reporter` keeps the runs it opened and their error breakdowns, so
the demo's pages that share a run compute them once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

import fsseg
from fsseg.episodes import RunEpisodes, record_iou
from fsseg.htmlreport import cards, content, plots


def _f(digits: int, signed: bool = False):
    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        return f"{v:{'+' if signed else ''}.{digits}f}"

    return fmt


def environment():
    """The Jinja2 environment of the report templates (autoescaped; number filters f1 f2 s1 s2 pct)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fsseg.htmlreport", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(f1=_f(1), f2=_f(2), s1=_f(1, True), s2=_f(2, True), pct=lambda v: f"{100 * v:.1f}%")
    return env


def run_label(ep: RunEpisodes) -> str:
    m = ep.run.metrics
    control = m.get("support_control") or "none"
    return f"{m.get('model', '?')}" + (f", {control} support" if control != "none" else "")


class Reporter:
    """Writes report pages; ``n_boot`` / ``seed`` / ``level``: the bootstrap (as `fsseg compare`), ``gallery``:
    episodes per gallery section, ``cell``: side of a gallery picture (px), ``command``: the footer's command line."""

    def __init__(self, n_boot: int = 2000, seed: int = 0, level: float = 0.95, gallery: int = 6, cell: int = 144,
                 command: str = "fsseg report") -> None:  # fmt: skip
        if n_boot < 1 or not 0 < level < 1 or gallery < 0 or cell < 16:
            raise ValueError(f"need n_boot >= 1, 0 < level < 1, gallery >= 0, cell >= 16; got {n_boot}, {level}, "
                             f"{gallery}, {cell}")  # fmt: skip
        self.n_boot, self.seed, self.level, self.gallery, self.cell = n_boot, seed, level, gallery, cell
        self.command = command
        self._runs: dict[Path, RunEpisodes] = {}
        self._breakdowns: dict[Path, dict] = {}

    def open(self, path) -> RunEpisodes:
        key = Path(path).resolve()
        if key not in self._runs:
            self._runs[key] = RunEpisodes.open(path)
        return self._runs[key]

    def breakdown(self, ep: RunEpisodes) -> dict:
        key = ep.path.resolve()
        if key not in self._breakdowns:
            self._breakdowns[key] = content.run_breakdown(ep)
        return self._breakdowns[key]

    # ---- one page ----------------------------------------------------------------------------------------------
    def write_page(self, folder: Path, run_a, run_b=None, back_link: str | None = None) -> dict:
        """Write the page of ``run_a`` (alone) or of ``run_a`` against ``run_b`` into the new folder ``folder``;
        returns ``report.json``'s content."""
        a = self.open(run_a)
        b = self.open(run_b) if run_b is not None else None
        runs = [a] if b is None else [a, b]
        labels = [run_label(r) for r in runs]
        images = Path(folder) / "images"
        images.mkdir(parents=True)
        saved: list[str] = []

        def save(name: str, data: bytes) -> str:
            (images / name).write_bytes(data)
            saved.append(f"images/{name}")
            return f"images/{name}"

        ious = [
            np.array([record_iou(r) for r in ep.records]) for ep in runs
        ]  # [N] each, nan: both masks empty
        page: dict = {
            "runs": [content.describe_run(ep, f"{'AB'[k]}: {labels[k]}") for k, ep in enumerate(runs)]
        }
        if b is None:
            page["headline"] = content.single_headline(a, self.n_boot, self.seed, self.level)
            name = content.class_namer(a.run.metrics)
            class_rows = [{"name": name(c), "episodes": int(sum(int(e["class_id"]) == c for e in a.records)),
                           "iou": [float(a.run.metrics["per_class_iou"][str(c)])]} for c in a.class_ids]  # fmt: skip
            ok = ious[0][~np.isnan(ious[0])]
            hist = plots.histogram(ok, "foreground IoU per episode (%)", centre_line=False)
            charts = {"scatter": None, "hist": save("iou_hist.png", hist)}
            page.update(episode_stats=None, comparison=None, agreement=None, support_use=None)
        else:
            pair = content.pair_content(a, b, self.n_boot, self.seed, self.level)
            page.update(pair)
            c = pair["comparison"]
            class_rows = [{"name": n, "episodes": row["episodes"], "iou": [row["iou_a"], row["iou_b"]],
                           "diff": row["diff"]} for n, row in zip(pair["class_names"], c["per_class"])]  # fmt: skip
            ok = ~(np.isnan(ious[0]) | np.isnan(ious[1]))
            diff = ious[1][ok] - ious[0][ok]
            page["episode_stats"] = {"defined": int(ok.sum()), "better": int((diff > 0).sum()),
                                     "worse": int((diff < 0).sum()), "equal": int((diff == 0).sum())}  # fmt: skip
            charts = {
                "scatter": save("scatter.png", plots.scatter(ious[0][ok], ious[1][ok], labels[0], labels[1])),
                "hist": save(
                    "diff_hist.png", plots.histogram(diff, "IoU(B) - IoU(A) per episode (points)", True)
                ),
            }
        page["class_rows"] = class_rows
        charts["per_class"] = save("per_class.png", plots.per_class_bars(
            [r["name"] for r in class_rows], [[r["iou"][k] for r in class_rows] for k in range(len(runs))],
            [f"{'AB'[k]}: {labels[k]}" for k in range(len(runs))]))  # fmt: skip
        page["charts"] = charts

        summaries = [self.breakdown(ep) for ep in runs]
        page["breakdowns"] = [{"label": lab, "summary": s} for lab, s in zip(labels, summaries)]
        page["breakdown_rows"], page["attributes"] = breakdown_rows(summaries)
        made = [(f"{'AB'[k]}: {labels[k]}", s["share_of_prediction"]) for k, s in enumerate(summaries)
                if "share_of_prediction" in s]  # fmt: skip
        page["breakdown_chart"] = (
            save("breakdown.png", plots.shares([m[0] for m in made], [m[1] for m in made])) if made else None
        )
        page["gallery"], page["gallery_note"] = self.gallery_sections(runs, labels, ious, save)

        m = a.run.metrics
        setting = f"{m.get('dataset')} fold {m.get('fold')}, {m.get('shot')}-shot, {len(a.records)} episodes at " \
                  f"{m.get('resolution')} px"  # fmt: skip
        title = labels[0] if b is None else f"B: {labels[1]} against A: {labels[0]}"
        page.update(
            title=f"fsseg report: {title}",
            subtitle=setting,
            pair=b is not None,
            back_link=back_link,
            cell=self.cell,
            version=fsseg.__version__,
            command=self.command,
            images=saved,
        )
        html = environment().get_template("report.html.j2").render(**page)
        (Path(folder) / "index.html").write_text(html)
        (Path(folder) / "report.json").write_text(json.dumps(_jsonable(page), indent=1) + "\n")
        return page

    def gallery_sections(
        self, runs: list[RunEpisodes], labels: list[str], ious, save
    ) -> tuple[list[dict], str | None]:
        """The gallery (sections of cards with their pictures saved) and a note on what is unavailable."""
        missing = [
            f"{'AB'[k]} ({labels[k]}): {ep.unavailable}" for k, ep in enumerate(runs) if ep.dataset is None
        ]
        if missing:
            return [], "Pictures are unavailable: " + "; ".join(missing)
        no_pred = [
            f"{'AB'[k]} ({labels[k]})" for k, ep in enumerate(runs) if not content.has_predictions(ep.records)
        ]
        note = (f"{' and '.join(no_pred)} kept no predictions (a run made before fsseg stored them): its pictures "
                "are unavailable, its numbers are not.") if no_pred else None  # fmt: skip
        if self.gallery == 0:
            return [], note
        name = content.class_namer(runs[0].run.metrics)
        sections = content.pick_gallery(ious[0], ious[1] if len(runs) > 1 else None, self.gallery, self.seed)
        rendered: dict[int, list[dict]] = {}
        for section in sections:
            section["cards"] = []
            for pos in section["positions"]:
                records = [ep.records[pos] for ep in runs]
                r = records[0]
                if pos not in rendered:
                    panels = cards.episode_panels(
                        runs, records, ["AB"[k] for k in range(len(runs))], self.cell
                    )
                    rendered[pos] = [{"title": p["title"], "src": save(f"ep{r['episode']}_{k}.png", cards.png(p["image"]))}
                                     for k, p in enumerate(panels)]  # fmt: skip
                iou = [float(ious[k][pos]) for k in range(len(runs))]
                section["cards"].append({
                    "episode": r["episode"], "class_name": name(int(r["class_id"])), "query": r["query"],
                    "iou": [content.fmt_iou(v) for v in iou],
                    "diff": None if len(runs) == 1 or any(map(math.isnan, iou)) else f"{iou[1] - iou[0]:+.1f}",
                    "panels": rendered[pos],
                })  # fmt: skip
        return sections, note


def breakdown_rows(summaries: list[dict]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The error breakdown table's rows (one cell per run) and the shared attributes it lists."""
    made = [s for s in summaries if "share_of_prediction" in s]
    if not made:
        return [("", [s["unavailable"] for s in summaries])], []
    known = all(s["objects_known"] for s in made)

    def cells(fn):
        return [fn(s) if "share_of_prediction" in s else "" for s in summaries]

    rows = [
        ("predicted foreground on the episode's object (precision)", cells(lambda s: pct(s["precision"]))),
        ("... on other objects", cells(lambda s: pct(s["share_of_prediction"]["other_objects"])
                                       if s["objects_known"] else "not known (no label map of every object)")),
        ("... on the background" + ("" if known else " or other objects"),
         cells(lambda s: pct(s["share_of_prediction"]["background"]))),
        ("the object's pixels it covers (recall)", cells(lambda s: pct(s["recall"]))),
    ]  # fmt: skip
    attributes = sorted({k for s in made for k in s["other_object_coverage_by_shared_attribute"]},
                        key=lambda k: (k == "nothing", k.count("+"), k))  # fmt: skip
    for attr in attributes:
        vals = []
        for s in summaries:
            v = s.get("other_object_coverage_by_shared_attribute", {}).get(attr)
            vals.append(f"{pct(v['mean_covered'])} ({v['objects']} objects)" if v else "")
        rows.append((f"other objects sharing {attr} with it: share of their area covered", vals))
    rows.append(("episodes", [f"{s['episodes']}, from the stored predictions" if "share_of_prediction" in s
                              else s["unavailable"] for s in summaries]))  # fmt: skip
    return rows, attributes


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items() if k not in ("config",)}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
