"""docs/PROTOCOL.md keeps the §1-§5 numbering the code cites, every citation points at a section that exists, and
the files it names exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"
CITING = ["fsseg", "configs", "docs", "tools", "benchmarks", "tests", "README.md"]


def sections() -> list[str]:
    return re.findall(r"^#{2,3} (§\d+[a-z]?) ", PROTOCOL.read_text(), flags=re.M)


def test_protocol_sections_in_order():
    assert sections() == ["§1", "§2", "§3", "§3a", "§4", "§4b", "§5"]


def test_every_citation_names_an_existing_section():
    found = set(sections())
    cited = {}
    for entry in CITING:
        paths = [ROOT / entry] if (ROOT / entry).is_file() else (ROOT / entry).rglob("*")
        for path in paths:
            if path.is_file() and path.suffix in (".py", ".md", ".yaml"):
                for sec in re.findall(r"PROTOCOL\.md (§\d+[a-z]?)", path.read_text()):
                    cited.setdefault(sec, path)
    assert {"§1", "§2", "§3a", "§4", "§5"} <= set(cited)
    assert set(cited) <= found, {s: str(p) for s, p in cited.items() if s not in found}


def test_files_named_in_the_protocol_exist():
    text = PROTOCOL.read_text()
    named = set(re.findall(r"`((?:configs|fsseg|tools)/[\w./-]+\.(?:yaml|py|md))`", text))
    assert "configs/diffews_released.yaml" in named and "configs/diffseg_coco.yaml" in named
    assert not [p for p in named if not (ROOT / p).is_file()]
