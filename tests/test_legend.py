"""The project's one shape legend (docs/contributing.md): every file header's legend and every shape suffix
in the library use only its letters."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torchtitan's own parameter names (w1_EFD: E = experts there), kept as its state-dict keys
EXEMPT = {"profiling/bench/peers.py"}
# what a header's item must say for its letter to mean what the legend says (X: any other dim)
MEANING = {
    "T": "token", "D": "model", "F": "ffn", "H": "shared|hidden", "N": "expert", "K": "top", "R": "rank",
    "L": "slot", "Q": "global slot", "P": "row|pair", "B": "sequence|batch", "S": "per sequence",
    "V": "vocab", "A": "head", "G": "group", "J": "group", "E": "per group", "M": "layer", "Y": "byte",
    "U": "token row", "X": "",
}  # fmt: skip


def legend_letters() -> set[str]:
    text = (ROOT / "docs" / "contributing.md").read_text()
    section = text.split("## Shape legend", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| ([A-Z]) \|", section, flags=re.M))


def header_letters(source: str) -> list[tuple[str, str]]:
    """(letter, its item's text) for each letter a module docstring's "Shape legend:" paragraph defines."""
    m = re.search(r"Shape legend[^:]*:(.*?)(?:\n\s*\n|\"\"\")", source, flags=re.S)
    if not m:
        return []
    letters = []
    # why the lookahead: a comma inside parentheses, "P (token, expert) pairs", does not end an item
    for item in re.split(r",(?![^()]*\))", " ".join(m.group(1).split())):
        words = item.split()
        if words and re.fullmatch(r"[A-Z]'?", words[0]):
            letters.append((words[0].rstrip("'"), item))
        if len(words) > 2 and words[1] == "and" and re.fullmatch(r"[A-Z]", words[2]):
            letters.append((words[2], item))
    return letters


def sources(*wings: str) -> list[Path]:
    return [p for w in wings for p in sorted((ROOT / w).rglob("*.py"))]


def test_legend_is_one_set_of_unique_letters() -> None:
    letters = legend_letters()
    assert {"T", "D", "N", "K", "R", "L", "Q", "P", "S", "M"} <= letters, letters


def test_every_header_legend_is_a_subset() -> None:
    letters = legend_letters()
    bad, seen = [], 0
    for p in sources("moe_dist", "profiling"):
        rel = str(p.relative_to(ROOT))
        if rel in EXEMPT:
            continue
        found = header_letters(p.read_text())
        seen += bool(found)
        for c, item in found:
            if c not in letters or not re.search(MEANING[c], item, flags=re.I):
                bad.append(f"{rel}: {item.strip()!r}")
    assert seen >= 10, "the header legends were not found"
    assert not bad, f"letters used otherwise than in docs/contributing.md's shape legend: {bad}"


def test_every_shape_suffix_in_the_library_uses_legend_letters() -> None:
    letters = legend_letters()
    bad = set()
    for p in sources("moe_dist"):
        for suffix in re.findall(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z]{1,5})\b", p.read_text()):
            if set(suffix) - letters:
                bad.add(f"{p.relative_to(ROOT)}: _{suffix}")
    assert not bad, f"shape suffixes outside the legend: {sorted(bad)}"
