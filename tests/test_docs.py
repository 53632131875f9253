"""The docs check: every command in a ```bash block of README.md and docs/*.md is checked statically, so none
can rot. Modules run with ``python -m``/``torchrun -m`` must import, ``moe-dist`` subcommands must exist,
named configs must exist and load with their ``key=value`` overrides (a renamed key fails), repo paths named
anywhere in the docs must exist, and README.md stays a front page (<= 200 lines). Nothing is run.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import tomllib

from moe_dist.training.config import load_config
from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*=")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")
INLINE = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+ )*(?:python -m |torchrun |moe-dist |launch/\S+\.sh)")
# a repo path as the docs write it: a top-level folder of the project, then a file with a known suffix
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:moe_dist|profiling|tests|configs|launch|docker|docs|\.ci)/[\w./-]*\.(?:py|yaml|yml|md|sh))"
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _placeholder(word: str) -> bool:
    """CONFIG.yaml, OUT_DIR, runs/<name>, $EX/a.yaml: names the reader fills in (or a shell variable)."""
    stem = Path(word).stem
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", stem)) or "<" in word or "[" in word or word.startswith("$")


def bash_commands() -> list[tuple[str, str]]:
    """(page, command) for every simple command of every ```bash block, and every inline `command` that starts
    like one (the benchmark pages quote theirs inline, above each table)."""
    out = []
    for page in PAGES:
        text = page.read_text()
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            if INLINE.match(span):
                out.append((page.name, span))
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].strip()
                if not line or line.startswith("#"):
                    continue
                for part in re.split(r"&&|;|\|\|", line):
                    if part.strip():
                        out.append((page.name, part.strip()))
    return out


COMMANDS = bash_commands()


def _words(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    while words and ENV.match(words[0]):
        words.pop(0)
    return words


def _cli_subcommands() -> set[str] | None:
    """The moe-dist subcommands, from moe_dist/cli.py's table; None while the console script is missing."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("project", {}).get("scripts", {})
    cli = ROOT / "moe_dist" / "cli.py"
    if "moe-dist" not in scripts or not cli.is_file():
        return None
    text = cli.read_text()
    # a table {"report": ...} or argparse's add_parser("report", ...): either way of spelling the subcommands
    table = re.findall(r'["\']([a-z][a-z0-9-]*)["\']\s*:', text)
    return set(table) | set(re.findall(r'add_parser\(\s*["\']([a-z][a-z0-9-]*)', text))


def _check_config(words: list[str]) -> None:
    configs = [w for w in words if w.endswith((".yaml", ".yml")) and not w.startswith("-")]
    overrides = [w for w in words if OVERRIDE.match(w)]
    for cfg in configs:
        if _placeholder(cfg):
            continue
        assert (ROOT / cfg).is_file(), f"config {cfg} does not exist"
        load_config(ROOT / cfg, overrides)  # a renamed or misspelt key raises ConfigError
    if not configs and overrides:
        load_config(None, overrides)


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_command(page: str, command: str) -> None:
    words = _words(command)
    if not words:
        return
    prog = words[0]
    if prog in ("pip", "docker", "cd", "ls", "lscpu", "ruff"):
        return
    if prog in ("python", "torchrun"):
        if "-m" in words:
            module = words[words.index("-m") + 1]
            if module == "pytest":
                for w in words[words.index("-m") + 2 :]:
                    if w.startswith("tests/"):
                        assert (ROOT / w.split("::")[0]).exists(), f"{page}: {w} does not exist"
                return
            assert importlib.util.find_spec(module) is not None, f"{page}: no module {module}"
            if module == "moe_dist.train":
                _check_config(words)
        else:
            script = next((w for w in words[1:] if w.endswith(".py")), None)
            if script is None:  # `torchrun --max-restarts=N`: an option named in prose
                return
            assert (ROOT / script).is_file(), f"{page}: {script} does not exist"
        return
    if prog == "moe-dist":
        subs = _cli_subcommands()
        if subs is None:
            pytest.skip("moe_dist/cli.py (the moe-dist console script) is not in this branch yet")
        assert words[1] in subs, f"{page}: moe-dist has no subcommand {words[1]!r} (has {sorted(subs)})"
        return
    if prog.startswith("launch/"):
        assert (ROOT / prog).is_file(), f"{page}: {prog} does not exist"
        _check_config(words)
        return
    raise AssertionError(f"{page}: the docs check does not know the program {prog!r} in: {command}")


def test_commands_were_found() -> None:
    """The extraction itself works: the main job and the offline tools are among the documented commands."""
    progs = {_words(c)[0] for _, c in COMMANDS if _words(c)}
    assert {"torchrun", "python", "moe-dist", "pip"} <= progs, progs
    assert len(COMMANDS) >= 20


def test_repo_paths_named_in_the_docs_exist() -> None:
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path in REPO_PATH.findall(text):
            if not _placeholder(path) and not (ROOT / path).exists():
                missing.append(f"{page.name}: {path}")
        for link in LINK.findall(text):
            if "://" not in link and not (page.parent / link).exists():
                missing.append(f"{page.name}: link {link}")
    assert not missing, "\n".join(missing)


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_layer_page_shows_the_tested_script() -> None:
    """docs/layer.md shows launch/layer_example.py (run by tests/moe/test_layer_library.py) as it is."""
    page = (ROOT / "docs" / "layer.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert (ROOT / "launch" / "layer_example.py").read_text() in blocks
