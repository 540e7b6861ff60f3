"""Progress on stderr: phases, plain lines off a terminal, ``evaluate`` and ``report`` counting their work."""

from __future__ import annotations

import io

from flexlora.cli import main
from flexlora.progress import Progress, advance, reporting
from flexlora.report import collect_runs


def test_plain_lines_per_phase_with_counts_and_eta():
    stream = io.StringIO()  # not a terminal: lines, not a bar
    with reporting(Progress([("scoring", 4), ("generating", 4)], interval=0.0, stream=stream)):
        for _ in range(8):
            advance(1)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("scoring: 1/4 examples") and "ETA" in lines[0]
    assert any(line.startswith("scoring: 4/4 examples") and line.endswith("(done)") for line in lines)
    assert lines[-1].startswith("generating: 4/4 examples") and lines[-1].endswith("(done)")
    assert sum("(done)" in line for line in lines) == 2


def test_unknown_total_counts_and_disabled_shows_nothing():
    stream = io.StringIO()
    with reporting(Progress([("reading runs", None)], unit="run", interval=1e9, stream=stream)):
        advance(3)
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[0]]
    assert stream.getvalue().startswith("reading runs: 3 runs") and "ETA" not in stream.getvalue()
    quiet = io.StringIO()
    with reporting(Progress([("x", 2)], enabled=False, stream=quiet)):
        advance(2)
    assert quiet.getvalue() == ""
    advance(5)  # outside any command: nothing happens


def test_evaluate_reports_examples_scored_and_generated_on_stderr(capsys):
    args = ["evaluate", "--data", "synthetic", "--model", "tiny", "--clients", "2"]
    assert main([*args, "--max-examples-per-client", "2", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "scoring (loss): 4/4 examples" in err and "generating: 4/4 examples" in err
    assert main([*args, "--max-examples-per-client", "2", "--no-generate", "--no-progress"]) == 0
    assert "examples" not in capsys.readouterr().err


def test_report_counts_the_runs_it_reads(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("federation: {rounds: 2}\n")  # unfinished: left out
    stream = io.StringIO()
    with reporting(Progress([("reading runs", None)], unit="run", stream=stream)):
        records, _ = collect_runs([tmp_path])
    assert records == [] and stream.getvalue().startswith("reading runs: 3 runs")
