"""Writing benchmark figures into docs/benchmarks.md: each benchmark owns one section, delimited
by its own markers, and rewrites only that section (creating the file or the section if needed)."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

_HEADER = (
    "# Benchmarks\n\nFigures produced by `make bench` (`.venv/bin/python -m bench.run`; `--quick` "
    "for a short run). Each section is rewritten by its own benchmark; edit the code, not the figures.\n"
)


def replace_section(heading: str, begin_mark: str, end_mark: str, body: str, path: Path = DOCS) -> None:
    """Put `body` between the markers; a missing section is appended under `## heading`."""
    block = f"{begin_mark}\n{body}{end_mark}"
    text = path.read_text() if path.exists() else _HEADER
    if begin_mark in text and end_mark in text:
        head, _, rest = text.partition(begin_mark)
        _, _, tail = rest.partition(end_mark)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(text)
