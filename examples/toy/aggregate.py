"""Mean +- std over seeds of the demo's per-arm accuracy.

    python examples/toy/aggregate.py runs/toy/seed-0/report runs/toy/seed-1/report ... --out runs/toy/summary.md

Reads each seed's table.json (written by table.py beside the report directory) and prints/writes one
markdown table: arm, accuracy mean +- sample std over seeds, per-seed values, labels, steps, train time.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(args: list[str]) -> None:
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    reports = [Path(a) for a in args if a != "--out" and Path(a) != out]
    per_seed = [json.loads((r.parent / "table.json").read_text()) for r in reports]
    lines = [f"| arm | accuracy (mean ± std over {len(per_seed)} seeds) | per seed | labels | steps | train time (s, mean) |",
             "|---|---|---|---|---|---|"]
    for i, row in enumerate(per_seed[0]):
        accs = [s[i]["accuracy"] for s in per_seed]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        seeds = ", ".join(f"{a:.3f}" for a in accs)
        wall = statistics.mean(s[i]["wall_s"] for s in per_seed)
        lines.append(f"| {row['arm']} | {statistics.mean(accs):.3f} ± {std:.3f} | {seeds} | {row['labels']} | "
                     f"{row['steps']} | {wall:.0f} |")
    text = "\n".join(lines) + "\n"
    sys.stderr.write(text)
    if out is not None:
        out.write_text(text)
        print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
