"""The documents cannot drift from the code: commands, flags, links and paths they show must exist.

Read: README.md, every page under docs/, and the Makefile (the recipe behind `make demo`).
- Every command they show -- `hpc-lensiam CMD ...`, `python -m hpc_lensiam CMD ...`, `torchrun ... -m
  hpc_lensiam CMD ...`, `python -m bench.NAME ...`, in fenced code blocks and in inline code -- names a
  real subcommand or script, and each `--flag` after it (its trailing `# comment` included, where the
  docs list optional flags) appears in that command's own `--help`.
- A `--flag` in inline code that follows no command exists in some subcommand's or script's help,
  or belongs to one of the launchers listed in EXTERNAL_FLAGS.
- Every relative link or image resolves to a file in the repository; every repository path shown in
  inline code (`slurm/pretrain.sh`, `hpc_lensiam/downstream/export.py`) exists.
- No document points at files that are not in the repository (a spec, a pitfalls list, issue numbers).
- The README stays a quickstart: at most 200 lines, `make demo` and `make test` in its first code block.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

# Pages other engineers are writing now, linked from the README ahead of their merge. They may be
# missing ONLY until then: the lead empties this list when merging them, after which a missing page
# fails the link test like any other.
PENDING_PAGES: set[str] = set()

# Flags of the launchers the docs show around the package (torchrun, mpiexec, srun/sbatch, pip).
EXTERNAL_FLAGS = {
    "--standalone", "--nproc", "--nnodes", "--rdzv-backend", "--rdzv-endpoint",  # torchrun
    "--oversubscribe", "--mpi",  # mpiexec (openmpi), srun
    "--nodes", "--ntasks-per-node", "--gpus-per-node", "--signal", "--chdir", "--partition",  # sbatch
    "--account", "--time", "--wait", "--wrap", "--batch",  # sbatch, scancel
    "--cpus-per-task", "--mem-per-cpu", "--mem",  # sbatch resources
    "--logdir",  # tensorboard
    "--no-binary", "--no-index", "--no-deps", "--target",  # pip
    "--check",  # ruff format
}  # fmt: skip

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
INVOCATION = re.compile(
    r"(?:hpc-lensiam|\$\(HL\)|-m\s+hpc_lensiam)\s+(?P<cmd>[a-z][a-z-]*)"  # the CLI, also as $(HL) in the Makefile
    r"|-m\s+(?P<bench>bench\.[a-z_]+)"  # a bench script, run as a module from the repository root
)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _logical_lines(block: str) -> list[str]:
    """A code block's lines with backslash continuations joined."""
    return re.sub(r"\\\n", " ", block).splitlines()


def _command_texts(path: Path) -> list[str]:
    """Fenced-block lines and inline code spans: the places a document shows commands."""
    text = path.read_text()
    if path.name == "Makefile":
        return [line for line in _logical_lines(text) if line.startswith("\t")]
    lines = [line for block in FENCE.findall(text) for line in _logical_lines(block)]
    prose = FENCE.sub("", text)
    return lines + INLINE.findall(prose)


@functools.cache
def _help_flags(target: str) -> frozenset[str] | None:
    """Flags in `hpc-lensiam CMD --help` or `python -m bench.NAME --help`; None if there is no such command."""
    if target.startswith("bench."):
        if not (REPO / "bench" / f"{target.split('.')[1]}.py").is_file():
            return None
        argv = [sys.executable, "-m", target, "--help"]
    else:
        argv = [sys.executable, "-m", "hpc_lensiam", target, "--help"]
    env = {**os.environ, "COLUMNS": "1000", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if r.returncode != 0:
        return None
    return frozenset(FLAG.findall(r.stdout))


def _subcommands() -> list[str]:
    from hpc_lensiam.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def shown_commands() -> list[tuple[str, str, frozenset[str]]]:
    """(document, command, flags shown after it) for every command invocation the documents show."""
    found = []
    for path in [*DOCS, REPO / "Makefile"]:
        for text in _command_texts(path):
            hits = list(INVOCATION.finditer(text))
            for i, m in enumerate(hits):
                end = hits[i + 1].start() if i + 1 < len(hits) else len(text)
                target = m.group("cmd") or m.group("bench")
                found.append((_rel(path), target, frozenset(FLAG.findall(text[m.end() : end]))))
    return found


def test_the_docs_show_every_subcommand():
    """The parser finds what it should: every subcommand appears in some document."""
    shown = {cmd for _, cmd, _ in shown_commands()}
    assert set(_subcommands()) <= shown, f"subcommands no document shows: {set(_subcommands()) - shown}"


def test_every_shown_command_and_flag_exists():
    problems = []
    for doc, target, flags in shown_commands():
        known = _help_flags(target)
        if known is None:
            problems.append(f"{doc}: `{target}` is not a hpc-lensiam subcommand or a bench script")
        elif flags - known:
            problems.append(f"{doc}: `{target}` has no {', '.join(sorted(flags - known))} in its --help")
    assert not problems, "\n".join(sorted(set(problems)))


BY_PATH = re.compile(r"python[0-9.]*\s+bench/[a-z_]+\.py")


def test_bench_scripts_are_run_as_modules():
    """bench/ is a package whose scripts import their shared helpers relatively: `python bench/NAME.py`
    fails, `python -m bench.NAME` (from the repository root) is the one way to run them."""
    shown = [f"{_rel(p)}: {t}" for p in [*DOCS, REPO / "Makefile"] for t in _command_texts(p) if BY_PATH.search(t)]
    assert not shown, "run bench scripts as `python -m bench.NAME`:\n" + "\n".join(shown)


def refused_spellings() -> set[str]:
    """Old flag spellings the CLI refuses by name, in one line naming the new one: prose may name them
    (to say they are refused), though no --help shows them."""
    from hpc_lensiam.cli import RENAMED
    from hpc_lensiam.train.config import RENAMED as TRAIN_RENAMED

    return {old for renamed in RENAMED.values() for old in renamed} | {
        "--" + key.replace("_", "-") for key in TRAIN_RENAMED
    }


def test_flags_in_prose_exist_somewhere():
    every = set(EXTERNAL_FLAGS) | refused_spellings()
    for target in {t for _, t, _ in shown_commands()} | set(_subcommands()):
        every |= _help_flags(target) or set()
    problems = []
    for path in DOCS:
        prose = FENCE.sub("", path.read_text())
        for span in INLINE.findall(prose):
            if INVOCATION.search(span):
                continue  # checked command by command above
            problems += [f"{_rel(path)}: `{span}`: {f}" for f in FLAG.findall(span) if f not in every]
    assert not problems, "flags in no --help:\n" + "\n".join(problems)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    missing = []
    for path in DOCS:
        for target in LINK.findall(FENCE.sub("", path.read_text())):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            resolved = (path.parent / target.split("#")[0]).resolve()
            rel = resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved
            if not resolved.exists() and str(rel) not in PENDING_PAGES:
                missing.append(f"{_rel(path)}: ({target}) -> {rel}")
    assert not missing, "links to missing files:\n" + "\n".join(missing)


TOP_LEVEL = ("hpc_lensiam/", "slurm/", "configs/", "bench/", "ci/", "tests/", "docs/")


def test_repository_paths_in_inline_code_exist():
    missing = []
    for path in DOCS:
        for span in INLINE.findall(FENCE.sub("", path.read_text())):
            if INVOCATION.search(span):
                continue  # a command's paths are its inputs and outputs, not files the repository holds
            for token in span.split():
                token = token.strip("(),;:")
                if not token.startswith(TOP_LEVEL) or re.search(r"[<>*{}$]|NNN", token):
                    continue  # not a path, or a pattern (docs/science/<tag>.md, shard-NNNNNN.tar)
                if not (REPO / token).exists() and token not in PENDING_PAGES:
                    missing.append(f"{_rel(path)}: `{span}`")
    assert not missing, "paths that are not in the repository:\n" + "\n".join(missing)


OUTSIDE = re.compile(r"SPEC|PITFALLS|ARCHITECTURE\.md|shared/|\bissue\s*#?\d+|#\d{1,3}\b")


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_no_reference_to_files_outside_the_repository(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, f"{_rel(path)} points outside the repository (say the content itself):\n" + "\n".join(hits)


def test_readme_is_a_quickstart():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first_block = FENCE.search(text).group(1)
    assert "make demo" in first_block and "make test" in first_block
    assert "--no-zero-init-residual" in text.split("## The pipeline")[0], "the short-run advice comes first"
