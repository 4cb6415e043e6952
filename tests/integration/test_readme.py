"""README.md: at most 250 lines, every ```python block runs as a script, every link resolves.

Each snippet runs in a fresh directory holding a tiny synthetic dataset at `./my_dataset` (the
path the snippets use), in its own interpreter, as a user would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINES = 250
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _snippets() -> list[str]:
    return [m.group(2) for m in FENCE.finditer(README.read_text()) if m.group(1) == "python"]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Big enough for full batches of 128 in the train split (1,600 pairs)."""
    return make_pt_dataset(tmp_path_factory.mktemp("readme") / "my_dataset", SyntheticSpec(2000))


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; move detail to docs/ (at most {MAX_LINES})"


def test_readme_has_python_snippets():
    assert len(_snippets()) >= 4


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index, tiny_dataset, tmp_path):
    code = _snippets()[index]
    shutil.copytree(tiny_dataset, tmp_path / "my_dataset")
    script = tmp_path / f"snippet_{index}.py"
    script.write_text(code)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (
        f"README snippet {index} failed:\n{code}\n--- stderr ---\n{run.stderr[-4000:]}"
    )


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_perf_history_is_current():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_perf.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
