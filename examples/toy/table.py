"""Print the demo's table (arm, accuracy with 95% CI, labels used, steps, wall time) and write it to disk.

    python examples/toy/table.py runs/toy/seed-0 student-base student-grpo ...

Reads each arm's eval metrics.json and the manifests of the training runs that made it (arms.json);
writes RUN/table.md and prints a rich table on stderr. Then the paper's claims on this seed alone, each a
paired difference over the held-out problems with its 95% interval and verdict (s2d_cli/claims.py), to
RUN/claims.md and stderr; over several seeds: `python -m s2d_cli.claims RUN...`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run: Path, arms: list[str]) -> list[dict]:
    spec = json.loads((run / "arms.json").read_text())
    out = []
    for arm in arms:
        m = json.loads((run / "eval" / arm / "metrics.json").read_text())
        steps = wall = 0.0
        for t in spec[arm]["train"]:
            man = json.loads((Path(t) / "manifest.json").read_text())
            steps += man.get("steps", 0)
            wall += man.get("wall_time_s", 0.0)
        lo, hi = m["accuracy_ci95"]
        out.append({"arm": arm, "accuracy": m["accuracy"], "ci": [lo, hi], "labels": spec[arm]["labels"],
                    "steps": int(steps), "wall_s": wall})
    return out


def main(run: str, arms: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    data = rows(Path(run), arms)
    t = Table(title=f"s2d toy recipe — {run}", title_justify="left")
    for col in ("arm", "accuracy", "95% CI", "labels", "steps", "train time"):
        t.add_column(col, justify="left" if col == "arm" else "right")
    lines = ["| arm | accuracy | 95% CI | labels | steps | train time (s) |", "|---|---|---|---|---|---|"]
    for r in data:
        ci = f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        t.add_row(r["arm"], f"{r['accuracy']:.3f}", ci, str(r["labels"]), str(r["steps"]), f"{r['wall_s']:.0f} s")
        lines.append(f"| {r['arm']} | {r['accuracy']:.3f} | {ci} | {r['labels']} | {r['steps']} | {r['wall_s']:.0f} |")
    Console(stderr=True).print(t)
    (Path(run) / "table.md").write_text("\n".join(lines) + "\n")
    (Path(run) / "table.json").write_text(json.dumps(data, indent=2) + "\n")
    from s2d_cli.claims import claims_markdown, evaluate_claims

    text = claims_markdown(evaluate_claims([Path(run)]), 1)
    (Path(run) / "claims.md").write_text(text)
    sys.stderr.write(text)
    print(Path(run) / "table.md")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
