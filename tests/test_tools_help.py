"""Every script in tools/ and benchmarks/ still imports what it uses and parses its command line: ``--help`` runs
its imports and its argument parser (a moved or removed function fails here, not in a user's hands)."""

from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p for d in ("tools", "benchmarks") for p in (ROOT / d).glob("*.py") if not p.name.startswith("_")
)


@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{p.parent.name}/{p.name}" for p in SCRIPTS])
def test_script_imports_and_prints_its_help(script, monkeypatch):
    monkeypatch.setattr("sys.argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))  # as `python script.py` does: its siblings importable
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None), out.getvalue()
    assert "usage" in out.getvalue().lower(), out.getvalue()
