"""Plots: whole-number round ticks; the spectrum plot of a long run stays readable."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from flexlora import plots  # noqa: E402


@pytest.fixture
def kept(monkeypatch):
    """The figures the plot functions make, kept open for inspection."""
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    for fig in figures:
        close(fig)


def test_round_ticks_are_whole_numbers(tmp_path, kept):
    runs = {"a": [{"round": r, "eval": {"loss": 1 / (r + 1)}} for r in range(3)]}
    plots.plot_metric_by_round(runs, "loss", tmp_path / "loss.png")
    ax = kept[-1].axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_spectrum_of_thirty_rounds_draws_at_most_ten_named_curves(tmp_path, kept):
    metrics = [
        {"round": r, "spectrum": {"top_singular_values": {"q_proj": [1.0 / (i + r) for i in range(1, 17)]}}}
        for r in range(1, 31)
    ]
    records = [SimpleNamespace(label=m, distribution="uniform", seed=0, metrics=metrics) for m in ("x", "y")]
    plots.plot_spectrum_by_round(records, tmp_path / "spectrum.png")
    first, second = kept[-1].axes[:2]
    labels = [line.get_label() for line in first.get_lines()]
    assert len(labels) == 10 and labels[0] == "round 1" and labels[-1] == "round 30"
    assert first.get_legend() is not None and second.get_legend() is None
    assert [line.get_color() for line in first.get_lines()] == [
        line.get_color() for line in second.get_lines()
    ]
