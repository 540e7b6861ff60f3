"""Peak memory while fuzzed and hostile inputs are read: each module runs alone in a fresh interpreter, so
the check sees what its inputs cost (a header declaring a huge shape must not allocate it), not what the
rest of the test session left allocated."""

from __future__ import annotations

import pytest

from helpers.memory import TESTS, module_peak_growth_mb

LIMIT_MB = 256
MODULES = {
    "test_fuzz_replies.py": (),
    "test_fuzz_readers.py": (),
    # the CLI cases run (and measure) their own child processes
    "test_hostile_replies.py": ("-k", "not test_cli_reads_hostile_adapters"),
}


@pytest.mark.parametrize("module", list(MODULES))
def test_peak_memory_stays_small_in_its_own_process(module, tmp_path):
    grown_mb = module_peak_growth_mb(TESTS / module, *MODULES[module], workdir=tmp_path)
    print(f"\n{module}: peak RSS grew {grown_mb:.1f} MB")
    assert grown_mb < LIMIT_MB, f"peak memory grew by {grown_mb:.0f} MB in {module}"


def test_the_measurement_sees_a_spike_and_not_what_imports_cost(tmp_path):
    module = tmp_path / "test_spike.py"
    module.write_text(
        "KEPT = b'x' * (300 * 2**20)  # allocated at import: before the baseline, and alive throughout\n"
        "def test_spike():\n"
        "    assert len(b'x' * (100 * 2**20)) == 100 * 2**20\n"
    )
    assert 90 < module_peak_growth_mb(module, workdir=tmp_path) < 150
    # a large calling session (the full suite reaches GBs): Linux hands the parent's RSS high-water mark to a
    # forked child's ru_maxrss, which hid the spike (0.0 growth); VmHWM is the child's own
    session, big = b"y" * (1500 * 2**20), tmp_path / "big-parent"
    big.mkdir()
    assert 90 < module_peak_growth_mb(module, workdir=big) < 150
    del session
