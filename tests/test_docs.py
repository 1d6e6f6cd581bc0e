"""Every link and file reference in README.md, docs/*.md and the notebooks resolves inside the repository.

Users get the repository and nothing beside it, so a link to a file outside it (``../<elsewhere>``),
to a file that does not exist, to a git-ignored output (``runs/...``, ``*.ckpt``) or to a heading
that does not exist is a broken promise. Checked:

* markdown links and images ``[text](target)``, reference definitions ``[id]: target`` and HTML
  ``src=``/``href=``: resolved against the document's folder; ``#anchor`` against the target's headings;
* repository paths written as text (``configs/classifier/finetune_target.yaml``, ``lit_finetune/cli.py``):
  resolved against the repository root, where the README's commands run;
* no file of the repository names the design notes that live outside it.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "notebooks").glob("*.ipynb"))]
IDS = [str(p.relative_to(REPO)) for p in DOCUMENTS]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML = re.compile(r"\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']")
#: a path into one of the repository's top-level folders, written as text
REPO_PATH = re.compile(r"(?<![\w./~-])((?:lit_finetune|configs|benchmarks|tests|notebooks|docs|\.ci)/[\w./-]*[\w/])")
#: a relative path that climbs out of the document's folder, written as text
PARENT_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[\w./-]*[\w/])")
#: what follows a path that is a pattern, not a file: {a,b} expansions, <placeholders>, globs
PATTERN_TAIL = re.compile(r"[{<*]")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
FORBIDDEN = ("DESIGN" + ".md", "../" + "shared")  # the team's notes outside the repository (split: not here either)


def prose_and_code(path: Path) -> tuple[str, str]:
    """(markdown text, code text) of a document: a notebook's markdown cells and code cells, else the file."""
    if path.suffix == ".ipynb":
        nb = nbformat.read(path, as_version=4)
        pick = lambda kind: "\n\n".join(c.source for c in nb.cells if c.cell_type == kind)  # noqa: E731
        return pick("markdown"), pick("code")
    return path.read_text(), ""


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors of a markdown document's (or notebook's markdown cells') headings, duplicates numbered."""
    text = prose_and_code(path)[0]
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # '#' in code blocks is no heading
    counts: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        base = slug(heading)
        found.add(base if base not in counts else f"{base}-{counts[base]}")
        counts[base] = counts.get(base, 0) + 1
    return frozenset(found)


@cache
def git_ignored(path: Path) -> bool:
    """True when git ignores ``path`` (a fresh clone lacks it); False outside a git checkout."""
    try:
        done = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def problem(target: Path, anchor: str = "", root: Path = REPO) -> str | None:
    """Why a reference to ``target`` (``#anchor``) from inside ``root`` is broken, or None."""
    target = target.resolve()
    if not target.is_relative_to(root):
        return "points outside the repository"
    if not target.exists():
        return "does not exist"
    if git_ignored(target):
        return "is git-ignored (a fresh clone does not have it)"
    if anchor and target.suffix in (".md", ".ipynb") and anchor not in anchors(target):
        return f"has no heading with anchor #{anchor}"
    return None


def links(text: str) -> list[str]:
    """Every link target of a markdown text (inline, reference and HTML), code blocks and spans excluded."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m for pattern in (LINK, REFERENCE, HTML) for m in pattern.findall(text)]


def repo_paths(text: str) -> list[str]:
    """Repository paths written as text (code spans and blocks included), patterns left out."""
    return [m.group(1) for m in REPO_PATH.finditer(text) if not PATTERN_TAIL.match(text, m.end())]


def broken_references(path: Path, root: Path = REPO) -> list[str]:
    """Every broken link and path of the document ``path`` of the repository ``root``."""
    prose, code = prose_and_code(path)
    broken = []
    for target in links(prose):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = path if not file_part else path.parent / unquote(file_part)
        if file_part.startswith("/"):
            broken.append(f"link {target!r}: an absolute path, not a file of the repository")
        elif reason := problem(resolved, anchor, root):
            broken.append(f"link {target!r} {reason}")
    prose = HTML.sub("", LINK.sub("", prose))  # the links were checked above; paths outside them follow
    for text in (prose, code):
        for ref in repo_paths(text):
            if reason := problem(root / ref, root=root):
                broken.append(f"path {ref!r} {reason}")
        for ref in PARENT_PATH.findall(text):
            if reason := problem(path.parent / ref, root=root):
                broken.append(f"path {ref!r} {reason}")
    return broken


@pytest.mark.parametrize("path", DOCUMENTS, ids=IDS)
def test_links_and_paths_resolve_inside_the_repository(path: Path) -> None:
    broken = broken_references(path)
    assert not broken, f"{path.relative_to(REPO)}:\n  " + "\n  ".join(broken)


def test_architecture_document_exists_and_is_linked() -> None:
    doc = REPO / "docs" / "ARCHITECTURE.md"
    assert doc.is_file()
    assert "docs/ARCHITECTURE.md" in links((REPO / "README.md").read_text())


def repository_text_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored text files (every file outside .git when git is missing)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout.decode().split("\0")  # fmt: skip
        files = [REPO / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in REPO.rglob("*") if ".git" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in {".md", ".py", ".ipynb", ".yaml", ".yml", ".toml", ".txt", ""}]


def test_no_file_names_the_notes_outside_the_repository() -> None:
    offenders = []
    for path in repository_text_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{path.relative_to(REPO)}: {name}" for name in FORBIDDEN if name in text]
    assert not offenders, "files refer to notes users do not have:\n  " + "\n  ".join(offenders)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see [the docs](docs/NOPE.md) and [ok](README.md)", ["docs/NOPE.md", "README.md"]),
        ("![plot](benchmarks/results/x.png 'title')", ["benchmarks/results/x.png"]),
        ("`[not a link](x.md)`\n```\n[nor](y.md)\n```", []),
        ('<img src="a.png"> [r]: ../outside.md', ["a.png"]),
        ("[r]: ../outside.md", ["../outside.md"]),
    ],
)
def test_link_extraction(text: str, expected: list[str]) -> None:
    assert sorted(links(text)) == sorted(expected)


def test_broken_references_are_reported(tmp_path: Path) -> None:
    """The checker fails on each kind of broken reference (so a passing run means something)."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "configs" / "classifier").mkdir(parents=True)
    (root / "configs" / "classifier" / "ok.yaml").write_text("")
    (tmp_path / "outside.md").write_text("# Outside\n")
    doc = root / "docs" / "probe.md"
    doc.write_text(
        "# A Title, with `code`\n[out](../../outside.md) [gone](missing.md) [bad anchor](#nope) "
        "[good anchor](#a-title-with-code) [self](probe.md#a-title-with-code) [web](https://example.org/x.md)\n"
        "run `configs/classifier/nope.yaml` and `configs/classifier/ok.yaml`, not `configs/classifier/{a,b}.yaml`\n"
        "see `../../outside.md` but `../configs/classifier/ok.yaml` is fine\n"
    )
    broken = broken_references(doc, root)
    assert len(broken) == 5, broken
    assert "outside" in broken[0] and "does not exist" in broken[1] and "#nope" in broken[2], broken
    assert "configs/classifier/nope.yaml" in broken[3] and "outside" in broken[4], broken


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_git_ignored_outputs_count_as_broken() -> None:
    assert git_ignored(REPO / "runs" / "classifier" / "best.ckpt")
    assert not git_ignored(REPO / "README.md")
