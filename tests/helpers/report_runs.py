"""Fake run directories with the records a finished (or running) comparison cell leaves, for report tests."""

from __future__ import annotations

import json

import yaml


def fake_run(
    root, label, dist, seed, losses, rouge=None, per_client=None, rounds=None, finished=True, legacy=False
):
    """A run directory with one eval per round (round 0 = base) and a final Rouge-L; ``legacy``: with the
    metric names of records written before the NI scorer (``rougeL`` unstemmed, ``proxy_rougeL``)."""
    run = root / "cells" / label / dist / f"seed{seed}"
    run.mkdir(parents=True)
    rounds = rounds or len(losses)
    method = label.split("@")[0]
    config = {"federation": {"method": method, "distribution": dist, "seed": seed, "rounds": rounds}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "cell.json").write_text(json.dumps({"label": label, "distribution": dist, "seed": seed}))

    def scores(loss, rouge_l, tf):
        if legacy:
            return {"loss": loss, "rougeL": rouge_l, "proxy_rougeL": tf}
        unstemmed = None if rouge_l is None else rouge_l - 1.0
        return {"loss": loss, "rougeL": rouge_l, "rougeL_unstemmed": unstemmed, "tf_argmax_rougeL": tf}

    records = [{"round": 0, "eval": scores(5.0, None, 1.0)}]
    done = losses if finished else losses[:-1]
    for r, loss in enumerate(done, 1):
        ev = scores(loss, rouge if r == rounds else None, 10.0 + r)
        clients = per_client or {"c1": 0.0, "c2": 0.0}
        ev["per_client"] = {c: scores(loss + off, ev["rougeL"], 1.0) for c, off in clients.items()}
        ev["per_category"] = {"qa": scores(loss - 0.1, None, 1.0)}
        spectrum = {
            "top_singular_values": {"q_proj": [3.0 / r, 1.0 / r, 0.0]},
            "energy_beyond_min_rank": 0.1 * r,
        }
        records.append({"round": r, "eval": ev, "spectrum": spectrum})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in records))
    return run
