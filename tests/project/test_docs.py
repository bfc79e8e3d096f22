"""The documentation against the repository: the README's size and set-up commands, every relative
link and anchor of README.md and docs/*.md, the tree of docs/ARCHITECTURE.md, and every ``.md`` file
name the sources and documents mention. Text only: nothing here imports torch or attnc."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 400
#: The comments `.ci/run` finds the README's set-up commands by (the line after each is the command).
SETUP_COMMENTS = ("# install and run the main job", "# install and run the tests")

#: Folders that are not the project's sources or documents.
SKIP_DIRS = {"build", "dist", "__pycache__", "node_modules"}
#: Folders whose files are recorded outputs, not text that names files.
SKIP_PATHS = {("tests", "snapshots")}
#: Words that stand for a name in usage text (``--out FILE.md``, ``results/flex-matrix-DATE.md``).
PLACEHOLDERS = {"DATE", "FILE", "NAME"}
#: ``.md`` names of other projects' files that the text may cite, each with the reason (none today).
OTHER_PROJECTS: dict[str, str] = {}


def docs() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def repository_files(suffixes: tuple[str, ...]) -> list[Path]:
    """The repository's files with these suffixes, outside hidden folders (.git), build outputs and
    recorded snapshots."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT).parts
        dirs[:] = sorted(d for d in dirs if not (d.startswith(".") or d in SKIP_DIRS or d.endswith(".egg-info")
                                                 or (*rel, d) in SKIP_PATHS))
        out += [Path(folder) / f for f in sorted(files) if f.endswith(suffixes)]
    return out


def outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for i, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((i, line))
    return lines


def code_blocks(text: str) -> list[list[tuple[int, str]]]:
    """(line number, line) of each fenced code block's lines."""
    blocks, current = [], None
    for i, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append((i, line))
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lowercase, every character that is
    not a letter, digit, space, hyphen or underscore dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (a repeated slug numbered -1, -2, ... as GitHub does)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in outside_fences(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code (fences and inline spans)."""
    out = []
    for i, line in outside_fences(path.read_text()):
        line = re.sub(r"`[^`]*`", "code", line)
        out += [(i, m.group(1)) for m in re.finditer(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line)]
    return out


def test_readme_is_short_and_keeps_the_setup_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, more than {README_MAX_LINES}"
    for comment in SETUP_COMMENTS:
        at = [i for i, line in enumerate(lines) if line.startswith(comment)]
        assert at, f"README.md lost the comment {comment!r} (.ci/run finds its command by it)"
        command = lines[at[0] + 1].strip() if at[0] + 1 < len(lines) else ""
        assert command and not command.startswith(("#", "```")), (
            f"README.md: the line after {comment!r} must be its command, not {command!r}")


def test_relative_links_and_anchors_resolve():
    problems, cache = [], {}
    for doc in docs():
        for line, target in links(doc):
            if re.match(r"^(https?:|mailto:)", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT)}:{line}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md":
                if dest not in cache:
                    cache[dest] = anchors(dest)
                if anchor not in cache[dest]:
                    problems.append(f"{where}: no heading with that anchor")
    assert not problems, "\n".join(problems)


def architecture_tree() -> list[tuple[int, str]]:
    """(line, repository path) of every name in docs/ARCHITECTURE.md's tree. The tree's format (the
    file says so under it): a folder's contents indented two spaces under it; an entry's names first,
    separated by single spaces and from its description by two or more; a description's further lines
    start at the description column."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    blocks = [b for b in code_blocks(text) if b and re.match(r"^[\w.-]+/?(\s|$)", b[0][1])]
    assert blocks, "docs/ARCHITECTURE.md: no tree (a code block whose first line names a path)"
    names = []
    for block in blocks:
        column = None
        stack: list[tuple[int, str]] = []  # (indent, folder path)
        for n, line in block:
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            if column is not None and indent >= column:
                continue  # a description's further line
            entry = line.strip()
            head, sep, rest = entry.partition("  ")
            if sep and column is None:
                column = indent + len(entry) - len(rest.lstrip())
            while stack and stack[-1][0] >= indent:
                stack.pop()
            if stack:
                assert indent == stack[-1][0] + 2, (
                    f"docs/ARCHITECTURE.md:{n}: not two spaces under its folder: {line!r}")
            else:
                assert indent == 0, f"docs/ARCHITECTURE.md:{n}: indented under no single folder: {line!r}"
            parent = stack[-1][1] if stack else ""
            tokens = head.split(" ")
            for token in tokens:
                assert re.match(r"^[\w.-]+(/|\.\w+)$", token), (
                    f"docs/ARCHITECTURE.md:{n}: {token!r} does not look like a file or folder name")
                names.append((n, parent + token))
            if len(tokens) == 1 and tokens[0].endswith("/"):
                stack.append((indent, parent + tokens[0]))
    return names


def test_architecture_tree_names_existing_paths():
    names = architecture_tree()
    assert len(names) >= 40, f"the tree parser found only {len(names)} names"
    missing = [f"docs/ARCHITECTURE.md:{n}: {p}" for n, p in names if not (ROOT / p).exists()]
    assert not missing, "docs/ARCHITECTURE.md names paths the repository lacks:\n" + "\n".join(missing)


def mentioned_md_names(text: str) -> list[tuple[int, str]]:
    """(line, name) of each ``.md`` file name the text mentions, less templates (``{...}``, globs,
    placeholder words) and files a command or the code writes (``--out X.md``, ``tmp / "x.md"``)."""
    out = []
    for m in re.finditer(r"(?<![\w.{}*/-])([\w.{}*/-]*[\w}*]\.md)\b", text):
        name, before = m.group(1), text[max(0, m.start() - 12): m.start()]
        if re.search(r"[{}*]", name) or PLACEHOLDERS & set(re.split(r"[-_./]", name)):
            continue
        if re.search(r"--out[= ]\s*$", before) or re.search(r"/\s*[\"']$", before):
            continue
        out.append((text.count("\n", 0, m.start()) + 1, name))
    return out


def test_no_mention_of_a_missing_md_file():
    existing = {p.name for p in repository_files((".md",))}
    existing |= {p.name for p in (ROOT / "tests" / "snapshots").rglob("*.md")}
    problems = []
    for path in repository_files((".py", ".md", ".attn")):
        text = path.read_text(errors="replace")
        if ".md" not in text:
            continue
        for line, name in mentioned_md_names(text):
            base = name.rsplit("/", 1)[-1]
            if base not in existing and base not in OTHER_PROJECTS:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not problems, "files that name a .md file the repository does not have:\n" + "\n".join(problems)


def readme_stdlib_names() -> set[str]:
    """The pattern names the README's stdlib table gives: every backticked name of a row's first cell, a
    ``neighborhood_1d/2d/3d`` spelled out."""
    text = README.read_text()
    start = text.index("\n## The stdlib")
    section = text[start:text.index("\n## ", start + 1)]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        for name in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            base, _, dims = name.partition("_")
            shared = re.fullmatch(r"(\dd)((?:/\dd)+)", dims)
            names |= {f"{base}_{d}" for d in [shared[1], *shared[2].strip("/").split("/")]} if shared else {name}
    return names


def test_readme_stdlib_table_names_every_stdlib_file():
    """The README's stdlib table and ``stdlib_patterns/`` (what ``attnc list`` reads) name the same patterns."""
    files = {path.stem for path in (ROOT / "stdlib_patterns").glob("*.attn")}
    names = readme_stdlib_names()
    assert files - names == set(), f"stdlib patterns missing from the README's table: {sorted(files - names)}"
    assert names - files == set(), f"the README's table names patterns the stdlib lacks: {sorted(names - files)}"
    assert {"neighborhood_1d", "neighborhood_3d", "delta_net", "kda"} <= names  # the shared rows are read whole
