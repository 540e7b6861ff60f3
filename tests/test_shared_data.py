"""The shared-data switch: absent data skips a ``shared_data`` test, or fails it with FLEXLORA_REQUIRE_DATA=1."""

from __future__ import annotations

import pytest

from helpers.data import REQUIRE_DATA, check_shared_data


def test_present_data_runs_even_when_required(tmp_path, monkeypatch):
    monkeypatch.setenv(REQUIRE_DATA, "1")
    check_shared_data(tmp_path)  # neither skips nor fails


@pytest.mark.parametrize(("require", "outcome"), [(None, "skipped"), ("0", "skipped"), ("1", "errors")])
def test_absent_data_skips_unless_required(pytester, monkeypatch, require, outcome):
    if require is None:
        monkeypatch.delenv(REQUIRE_DATA, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_DATA, require)
    absent = pytester.path / "absent.jsonl"
    pytester.makepyfile(
        f"""
        from pathlib import Path

        import pytest

        @pytest.fixture
        def data():
            return Path({str(absent)!r}).read_text()  # would raise: the check must come first

        @pytest.mark.shared_data(Path({str(absent)!r}))
        def test_reads(data):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "helpers.data", "-rs")
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines([f"*shared data {absent} is absent*"])
    if outcome == "errors":
        result.stdout.fnmatch_lines([f"*({REQUIRE_DATA}=1)*"])
