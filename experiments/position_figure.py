"""The figure of docs/experiments.md's early-late experiment: the chosen and rejected tokens' mean change of
log-prob by offset from the first differing token, one line per point of a sweep, pooled over its seeds.

    python experiments/position_figure.py runs/early-late --evaluation tokens --out docs/images/experiments/early_late_positions.png

Reads each run's ``dpolab eval tokens`` summary (``<evaluation>.json`` in the run's folder, the sweep's
``output:``) and pools ``by_position`` over seeds, each offset weighted by its token count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpolab.eval.tokens import SIDES, plot_positions


def pooled(summaries: list[dict]) -> dict:
    """One summary whose ``by_position`` is the token-weighted mean of the given ones'."""
    totals: dict[int, dict] = {}
    for summary in summaries:
        for entry in summary["by_position"]:
            slot = totals.setdefault(entry["offset"], {s: [0.0, 0] for s in SIDES})
            for side in SIDES:
                if entry[side] is not None:
                    slot[side][0] += entry[side] * entry[f"{side}_tokens"]
                    slot[side][1] += entry[f"{side}_tokens"]
    return {
        "by_position_shows": summaries[0]["by_position_shows"],
        "by_position": [
            {"offset": offset, **{s: (v[s][0] / v[s][1] if v[s][1] else None) for s in SIDES}}
            for offset, v in sorted(totals.items())
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep's folder")
    parser.add_argument("--evaluation", default="tokens", help="the file stem of the tokens summary in each run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines = {}
    for point in sorted((args.sweep / "runs").iterdir()):
        files = sorted(point.glob(f"seed*/{args.evaluation}.json"))
        if files:
            lines[f"{point.name} ({len(files)} seeds)"] = pooled([json.loads(f.read_text()) for f in files])
    if not lines:
        raise SystemExit(f"no {args.evaluation}.json under {args.sweep}/runs/*/seed*/")
    plot_positions(lines, args.out, "change of log-prob by offset from the first differing token")
    print(f"figure in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
