"""The docs describe what exists: every command and option is documented, and nothing else is.

Walks the Click command tree and checks docs/ and README.md against it: every visible command and
long option is documented (each option in its command's section of docs/cli.md, with its default),
the docs name no command or option that does not exist (per command, where a command line is
shown), every command has help with examples, links resolve, environment variables exist, the
Python names the API reference imports exist, and its runnable example runs against the local
server. README's set-up commands are checked verbatim because CI runs them.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click
import pytest

from xnatio.cli.main import cli
from xnatio.errors import EXIT_CODES

if TYPE_CHECKING:
    from xnatio.sandbox import SandboxServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}
DOC_TEXT = "\n".join(DOCS.values())
README = (ROOT / "README.md").read_text(encoding="utf-8")
ALL_TEXT = DOC_TEXT + "\n" + README
CLI_MD = DOCS.get("cli.md", "")

# README's set-up commands, exactly as CI (.ci/run) and users run them.
SETUP_COMMANDS = (
    "python3 -m pip install -c constraints.txt -e . && xio demo",
    "apt-get update && apt-get install -y dcmtk curl iproute2 && "
    "python3 -m pip install -c constraints.txt -e '.[dev]' && python3 -m pytest",
)
TEST_COMMAND_SENTENCE = "The test command is `python3 -m pytest`"

# Options of other programs that the docs legitimately show, by program.
FOREIGN_OPTIONS = {
    "curl": {"--data-binary", "--upload-file"},  # the single-request reference in performance.md
    "storescp": {"--fork"},  # dcmtk's receiver, started with --fork
    "pip": {"--no-deps"},
    "xnatctl": {"--workers"},  # the contender in performance.md
    "mypy": {"--strict"},
    "scripts/update-constraints": {"--upgrade"},  # passed on to uv pip compile
    "sbatch": {"--array", "--requeue"},  # Slurm, in scale-out.md
    "py-spy": {"--gil", "--threads"},  # the profiler of the measurements in performance.md
}


def walk(group: click.Group, prefix: str = "xio") -> Iterator[tuple[str, click.Command]]:
    for name, cmd in group.commands.items():
        path = f"{prefix} {name}"
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from walk(cmd, path)


ALL_COMMANDS = dict(walk(cli))  # hidden ones too: they exist, they need not be documented
COMMANDS = [(p, c) for p, c in ALL_COMMANDS.items() if not c.hidden]
LEAVES = [(p, c) for p, c in COMMANDS if not isinstance(c, click.Group)]


def long_options(cmd: click.Command) -> list[str]:
    out = []
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            out += [o for o in p.opts + p.secondary_opts if o.startswith("--") and o != "--help"]
    return out


def benchmark_options() -> set[str]:
    """Options of benchmarks/run.py (documented in performance.md), read from its argparse code."""
    text = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "benchmarks").glob("*.py"))
    return set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)\"", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def sections(text: str) -> dict[str, str]:
    """Anchor -> the text under that heading, up to the next heading of the same or higher level."""
    heads = [(m.start(), len(m.group(1)), m.group(2)) for m in HEADING.finditer(text)]
    out: dict[str, str] = {}
    for i, (start, level, title) in enumerate(heads):
        end = next((s for s, lv, _ in heads[i + 1 :] if lv <= level), len(text))
        out[slug(title)] = text[start:end]
    return out


HEADING = re.compile(r"^(#{1,6}) +(.+?)\s*$", re.MULTILINE)
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def command_section(path: str) -> str:
    """A command's section of docs/cli.md plus the shared sections it links to."""
    found = sections(CLI_MD)
    own = found.get(slug(f"`{path}`"), "")
    linked = re.findall(r"\]\(#([\w-]+)\)", own)
    return own + "".join(found.get(a, "") for a in linked if a != slug(f"`{path}`"))


def table_row(text: str, option: str) -> str | None:
    """The Markdown table row whose first cell names ``option``."""
    for line in text.splitlines():
        if line.startswith("|"):
            first = line.split("|")[1]
            if re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", first):
                return line
    return None


def default_texts(value: object) -> set[str]:
    if isinstance(value, float):
        return {f"{value:g}", str(value)}
    return {str(value)}


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_command_and_option_is_documented(path: str, cmd: click.Command) -> None:
    assert f"`{path}" in DOC_TEXT, f"{path} is not in docs/"
    missing = [o for o in long_options(cmd) if o not in DOC_TEXT]
    assert not missing, f"{path}: options not in docs/: {missing}"
    assert cmd.help, f"{path} has no --help text"


@pytest.mark.parametrize("path,cmd", LEAVES, ids=[p for p, _ in LEAVES])
def test_cli_reference_lists_each_option_of_each_command_with_its_default(
    path: str, cmd: click.Command
) -> None:
    section = command_section(path)
    assert section, f"docs/cli.md has no section '## `{path}`'"
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        names = [o for o in param.opts + param.secondary_opts if o.startswith("--")]
        if names == ["--help"]:
            continue
        row = table_row(section, names[0])
        assert row is not None, f"{path}: no table row for {names[0]} in docs/cli.md"
        for other in names[1:]:
            assert other in row, f"{path}: {other} missing from the row of {names[0]}"
        default = param.default  # Click 8.2+ marks "no default" with a sentinel, not None
        if param.is_flag or param.count or not isinstance(default, str | int | float):
            continue
        texts = default_texts(default)
        assert any(t in row for t in texts), (
            f"{path}: default {default!r} of {names[0]} not in {row}"
        )


@pytest.mark.parametrize("path,cmd", LEAVES, ids=[p for p, _ in LEAVES])
def test_every_command_has_help_with_examples(path: str, cmd: click.Command) -> None:
    assert cmd.help and cmd.help.strip(), f"{path} has no help"
    assert cmd.epilog and "Example" in cmd.epilog, f"{path}: --help shows no examples"


def _xio_invocations(text: str) -> Iterator[tuple[str, str]]:
    """(command path, rest of the command line) for each `xio ...` shown in code."""
    lines: list[str] = []
    for block in CODE_BLOCK.findall(text):
        # Join backslash continuations so options on the next line belong to the command.
        lines += block.replace("\\\n", " ").splitlines()
    lines += [m for m in INLINE_CODE.findall(text) if "xio " in m]
    for line in lines:
        # A command line: optional prompt and VAR=value assignments, then `xio`.
        m = re.match(r"\s*(?:\$ )?(?:[A-Z_]+=\S* )*xio((?: [a-z][a-z-]*)*)(.*)", line)
        if not m:
            continue
        words = m.group(1).split()
        # the longest prefix that names a command; the rest are arguments
        while words and "xio " + " ".join(words) not in ALL_COMMANDS:
            words.pop()
        rest = m.group(1)[len(" ".join(words)) + 1 :] + m.group(2)
        rest = re.split(r"\s(?:#|\||&&|;|>)\s?", rest)[0]  # stop at a comment, pipe, redirect
        yield ("xio " + " ".join(words)).strip(), rest


def test_docs_name_only_commands_that_exist() -> None:
    named = set(re.findall(r"`(xio(?: [a-z][a-z-]*)+)", ALL_TEXT))
    unknown = set()
    for n in named:
        words = n.split()
        while len(words) > 1 and " ".join(words) not in ALL_COMMANDS:
            words.pop()
        if len(words) == 1:
            # `xio demo` style names a command; `xio PROJECT` or `xio, version` do not match here
            unknown.add(n)
    assert not unknown, f"docs name commands that do not exist: {sorted(unknown)}"


def _example_invocations() -> Iterator[tuple[str, str]]:
    """`xio ...` command lines of the shell scripts in examples/ (comments left out)."""
    for script in sorted((ROOT / "examples").glob("*.sh")):
        text = script.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for m in re.finditer(r"(?:^|[\s!;&|(])xio((?: [a-z][a-z-]*)*)(.*)", line):
                words = m.group(1).split()
                while words and "xio " + " ".join(words) not in ALL_COMMANDS:
                    words.pop()
                rest = re.split(
                    r"\s(?:#|\||&&|;|>)", m.group(1)[len(" ".join(words)) + 1 :] + m.group(2)
                )[0]
                yield ("xio " + " ".join(words)).strip(), rest


def test_command_lines_in_docs_use_only_that_commands_options() -> None:
    wrong = []
    for path, rest in [*_xio_invocations(ALL_TEXT), *_example_invocations()]:
        cmd = ALL_COMMANDS.get(path)
        allowed = set(long_options(cmd)) | {"--help"} if cmd else {"--help", "--version"}
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if opt not in allowed:
                wrong.append(f"{path} {opt}")
    assert not wrong, f"command lines in the docs use options their command lacks: {wrong}"


def test_docs_name_only_options_that_exist() -> None:
    every = {o for c in ALL_COMMANDS.values() for o in long_options(c)} | {"--help", "--version"}
    foreign = set().union(*FOREIGN_OPTIONS.values())
    benchmarks = benchmark_options()
    unknown = []
    for name, text in [*DOCS.items(), ("README.md", README)]:
        named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", text))
        # performance.md documents the benchmark harness, whose options are its own
        extra = benchmarks if name in ("performance.md", "README.md") else set()
        unknown += [f"{name}: {o}" for o in sorted(named - every - foreign - extra)]
    assert not unknown, f"docs name options that no command has: {unknown}"


def test_readme_keeps_the_setup_commands_verbatim() -> None:
    for command in SETUP_COMMANDS:
        assert command in README, f"README lost the set-up command: {command}"
    assert TEST_COMMAND_SENTENCE in README


def test_exit_codes_are_documented_as_the_code_defines_them() -> None:
    for text, where in ((README, "README.md"), (CLI_MD, "docs/cli.md")):
        rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", text, re.MULTILINE))
        assert {int(c) for c in rows} == set(EXIT_CODES), f"{where}: exit code table differs"


def test_links_resolve() -> None:
    broken = []
    files = [(ROOT / "docs" / n, t) for n, t in DOCS.items()] + [(ROOT / "README.md", README)]
    for path, text in files:
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor and dest.suffix == ".md":
                anchors = {slug(m.group(2)) for m in HEADING.finditer(dest.read_text("utf-8"))}
                if anchor not in anchors:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def test_environment_variables_named_in_docs_exist() -> None:
    code = "".join(
        p.read_text(encoding="utf-8")
        for folder in ("src", "benchmarks")
        for p in (ROOT / folder).rglob("*.py")
    )
    named = set(re.findall(r"\b(XNATIO?_[A-Z][A-Z_]*[A-Z])\b", ALL_TEXT))
    unknown = sorted(v for v in named if v not in code)
    assert not unknown, f"docs name environment variables the code does not read: {unknown}"


def test_python_names_in_the_docs_exist() -> None:
    missing = []
    for block in CODE_BLOCK.findall(ALL_TEXT):
        for module, names in re.findall(r"^\s*from (xnatio[\w.]*) import ([\w, ]+)", block, re.M):
            mod = importlib.import_module(module)
            missing += [
                f"{module}.{n}"
                for n in map(str.strip, names.split(","))
                if n and not hasattr(mod, n)
            ]
    assert not missing, f"docs import names that do not exist: {missing}"


def test_api_reference_table_names_exist_where_it_says() -> None:
    """Each row of the API table, "| `name`, `name` | `module` … |", names importable things."""
    rows = re.findall(
        r"^\| (`\w+`(?:, `\w+`)*)[^|]*\| `(xnatio[\w.]*)`", DOCS["api-reference.md"], re.M
    )
    assert len(rows) >= 8, "the API table of docs/api-reference.md was not found"
    missing = []
    for names, module in rows:
        mod = importlib.import_module(module)
        missing += [f"{module}.{n}" for n in re.findall(r"`(\w+)`", names) if not hasattr(mod, n)]
    assert not missing, f"docs/api-reference.md names what its module lacks: {missing}"


def test_shell_completion_script_is_what_the_docs_say(tmp_path: Path) -> None:
    """`_XIO_COMPLETE=bash_source xio` (docs/cli.md) prints a script that registers `xio`, and
    the completion it asks for offers the options of the command being typed."""
    assert "_XIO_COMPLETE=bash_source xio" in CLI_MD
    env = {**os.environ, "_XIO_COMPLETE": "bash_source"}
    main = [sys.executable, "-c", "from xnatio.cli.main import main; main()"]
    source = subprocess.run(main, env=env, capture_output=True, text=True, timeout=60)
    assert "complete -o nosort -F _xio_completion xio" in source.stdout
    env.update(_XIO_COMPLETE="bash_complete", COMP_WORDS="xio upload-dicom --over", COMP_CWORD="2")
    done = subprocess.run(main, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["plain,--overwrite"]


@pytest.mark.integration
def test_api_reference_example_runs(xnat_server: SandboxServer, tmp_path: Path) -> None:
    """The runnable example of docs/api-reference.md uploads a session and verifies it."""
    from xnatio.synth import generate_session

    match = re.search(
        r"<!-- example: api-upload -->\n```python\n(.*?)^```",
        DOCS["api-reference.md"],
        re.MULTILINE | re.DOTALL,
    )
    assert match, "docs/api-reference.md lost its runnable example"
    script = tmp_path / "example.py"
    script.write_text(match.group(1), encoding="utf-8")
    session = tmp_path / "session"
    generate_session(session, series=2, instances=3, image_size=(32, 32), extras=["txt"])
    env = {
        **os.environ,
        "XNAT_SERVER": xnat_server.url,
        "XNAT_USERNAME": "admin",
        "XNAT_PASSWORD": "admin-secret",
    }
    run = subprocess.run(
        [sys.executable, str(script), "P", "S", "S_MR1", str(session)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "success=True files=6 " in run.stdout
    assert "skipped: " in run.stdout and "verified 6 files; all there: True" in run.stdout
