"""Every ``NOTE [name] in path`` points to a file that holds that NOTE (the layout move of
issue 25 had dropped the text of NOTE [batch plans] and NOTE [joined rows] while their
references stayed)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = re.compile(r"NOTE \[([^\]]+)\] in `?([\w/.]+\.py)`?")


def _heading(name: str) -> re.Pattern:
    n = re.escape(name)
    return re.compile(rf"^\s*#?\s*NOTE \[{n}\]", re.M)


def test_every_note_reference_points_to_its_note():
    files = [*ROOT.joinpath("jasper_mmap").rglob("*.py"), *ROOT.joinpath("docs").rglob("*.md")]
    files.append(ROOT / "README.md")
    bad = []
    for f in files:
        for m in REF.finditer(f.read_text()):
            name, rel = re.sub(r"\s*\n\s*#?\s*", " ", m.group(1)), m.group(2)
            target = next(
                (p for p in (ROOT / rel, ROOT / "jasper_mmap" / rel) if p.is_file()), None
            )
            if target is None or not _heading(name).search(target.read_text()):
                bad.append(f"{f.relative_to(ROOT)}: NOTE [{name}] in {rel}")
    assert not bad, "\n".join(bad)
