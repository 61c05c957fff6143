"""Write the arms file of one demo run: arm -> its eval, every training run it depends on, labels spent.

    python examples/toy/arms.py runs/toy/seed-0 64 > runs/toy/seed-0/arms.json

Labels are distinct labelled prompts consumed along the arm's whole chain: the teacher's GRPO spends
the budget once; the bridge spends none; Stage 3 reuses the same labelled prompts (still one budget).
"""
from __future__ import annotations

import json
import sys

CHAINS = {  # arm -> every training run it depends on (the teacher's included), in order
    "student-base": ["student-base"],
    "student-grpo": ["student-base", "student-grpo"],
    "student-sft-more": ["student-base", "student-sft-more"],
    "teacher-base": ["teacher-base"],
    "teacher-grpo": ["teacher-base", "teacher-grpo"],
    "bridge-base": ["teacher-base", "student-base", "kl-base", "bridge-base"],
    "kl-rl": ["teacher-base", "teacher-grpo", "student-base", "kl-rl"],
    "opd-rl": ["teacher-base", "teacher-grpo", "student-base", "opd-rl"],
    "bridge-rl": ["teacher-base", "teacher-grpo", "student-base", "kl-rl", "bridge-rl"],
    "bridge-rl-grpo": ["teacher-base", "teacher-grpo", "student-base", "kl-rl", "bridge-rl", "bridge-rl-grpo"],
    "bridge-rl-replay": ["teacher-base", "teacher-grpo", "student-base", "kl-rl", "bridge-rl", "bridge-rl-replay"],
}
USES_LABELS = {"student-grpo", "teacher-grpo", "bridge-rl-grpo"}


def main(run_dir: str, budget: int) -> None:
    arms = {}
    for arm, chain in CHAINS.items():
        labels = budget if USES_LABELS & set(chain) else 0
        arms[arm] = {"eval": f"{run_dir}/eval/{arm}", "train": [f"{run_dir}/{c}" for c in chain], "labels": labels}
    json.dump(arms, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
