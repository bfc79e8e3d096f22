"""docs/seeds.md: every recipe runs as written (its python blocks, in order, in one namespace; each asserts
its own agreement), and the document has one row for every reference system the project lists."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "seeds.md"


def test_the_recipes_run_and_agree():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (the document's own code)


def test_every_ending_is_one_of_the_four():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and not line.startswith("| system")
            and not line.startswith("|---")]
    endings = [row.split("|")[2].strip() for row in rows if row.count("|") >= 6]
    assert endings and all(e.split(" ")[0] in ("stdlib", "stdlib,", "recipe", "refused", "open") for e in endings), endings
