"""The test suite itself: it must fit a fresh CI machine's disk, and keep the layout that lets any
file run alone (floor folders, unique file names, shared helpers in tests/support.py only)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_passed_tests_free_their_tmp_path(pytestconfig, tmp_path_factory):
    """CI ran out of disk (ENOSPC) when every test's tmp_path was kept until the session ended:
    the training tests' checkpoints add up to ~11 GB. A passed test's directory must go at once."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert tmp_path_factory._retention_policy == "failed"  # what pytest's tmp_path fixture reads


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at any depth (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_imports_conftest_or_another_test_module():
    """Tests share helpers through tests/support.py only. A test that imported another test module
    (test_stats took a writer from test_embed) worked only when pytest had already put that module's
    folder on sys.path, i.e. never when the file ran alone from its own folder."""
    bad = [
        f"{path.relative_to(TESTS)} imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in sorted(_imported_modules(path))
        if name == "conftest" or name.startswith("test_")
    ]
    assert not bad, bad


def test_test_files_sit_in_floor_folders_with_unique_names():
    """tests/ mirrors the package: every test file in a folder one level down, and no two with the
    same file name (the folders are not packages, so pytest imports each test file by its basename)."""
    files = sorted(TESTS.glob("**/test_*.py"))
    assert files and all(p.parent.parent == TESTS for p in files), [str(p) for p in files if p.parent.parent != TESTS]
    names = [p.name for p in files]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
