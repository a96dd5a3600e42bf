"""The test suite itself must fit a fresh CI machine's disk."""

from __future__ import annotations


def test_passed_tests_free_their_tmp_path(pytestconfig, tmp_path_factory):
    """CI ran out of disk (ENOSPC) when every test's tmp_path was kept until the session ended:
    the training tests' checkpoints add up to ~11 GB. A passed test's directory must go at once."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    assert tmp_path_factory._retention_policy == "failed"  # what pytest's tmp_path fixture reads
