"""What the committed benchmark run measured, shipped with the package: each method's steps to plain DDP's
loss (the time-to-loss factor ``distcomp bench predict`` and ``distcomp train`` use) and the predictor's
error against every measured point. Written from a run's folder by ``distcomp bench --report FOLDER
--set-reference``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("reference.json")


def load() -> dict[str, Any]:
    """The reference, or an empty dict when none was written."""
    try:
        return json.loads(PATH.read_text())
    except (OSError, ValueError):
        return {}


def steps_factors() -> dict[str, float]:
    """``{method: steps to DDP's loss at step N / N}`` from the run's largest host count."""
    return {k: float(v) for k, v in load().get("steps_factors", {}).items()}


def validation_line() -> str:
    """One sentence: how far the predictor was from the committed run's measurements."""
    ref = load()
    v = ref.get("validation")
    if not v:
        return "No committed benchmark run to compare the predictor with."
    return (
        f"Predictor vs the committed run ({ref['run']}): {v['points']} measured points on 2-4 hosts at "
        f"{', '.join(ref['links'])}; median error {v['median_error']:.0%}, largest {v['max_error']:.0%}, "
        f"{v['within']} of {v['points']} within 25%."
    )


def write(run: str, links: list[str], factors: dict[str, float], errors: list[float]) -> None:
    """Replace the reference with a run's figures."""
    errs = sorted(abs(e) for e in errors)
    doc = {
        "run": run,
        "links": links,
        "steps_factors": {k: round(v, 3) for k, v in factors.items()},
        "validation": {
            "points": len(errs),
            "median_error": round(errs[len(errs) // 2], 4),
            "max_error": round(errs[-1], 4),
            "within": sum(e <= 0.25 for e in errs),
        },
    }
    PATH.write_text(json.dumps(doc, indent=1) + "\n")
