"""The benchmark report's home: each benchmark writes its own section of docs/benchmarks.md,
between two markers, and leaves the other sections as they are."""

from __future__ import annotations

from pathlib import Path

from qasr.bench.harness import ROOT

DOC = ROOT / "docs" / "benchmarks.md"


def publish(text: str, begin: str, end: str, write: bool = True) -> None:
    """A benchmark's section: printed, and (unless `write` is off: --no-write) put into docs/benchmarks.md."""
    print(text)
    if write:
        write_section(DOC, begin, end, text)


def write_section(doc: Path, begin: str, end: str, text: str) -> None:
    """Replace the text between two markers in `doc` (appending the section if it is new)."""
    current = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
    section = f"{begin}\n{text}\n{end}"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + section + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(current, encoding="utf-8")
