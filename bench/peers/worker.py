"""One peer grader in a process of its own: JSON lines in, one verdict line out per case.

    bench/peers/.venv/bin/python bench/peers/worker.py prm800k < cases.jsonl

Each input line is `[gold, answer, form]`; each output line `{"v": true|false}` or `{"err": "..."}` (the
grader raised). The driver (bench/peers/pool.py) waits a fixed time for each line and kills this
process past it: sympy can hang on untrusted text, and only a process boundary stops that. Runs under
bench/peers/.venv's interpreter (the peers' own pins), not s2d's.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    out_file = os.fdopen(os.dup(1), "w")  # the protocol's channel; anything upstream prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    peer = sys.argv[1]
    if peer == "prm800k":
        import prm800k as module
    elif peer == "qwen25_math":
        import qwen25_math as module

        if module.source_dir() is None:
            sys.exit(f"worker: ${module.ENV} names no folder with Qwen2.5-Math's grader.py")
    else:
        sys.exit(f"worker: unknown peer {peer!r} (expected prm800k or qwen25_math)")
    module.grade("1", "1", "answer")  # imports (sympy, the LaTeX parsers) before the first timed case
    print(json.dumps({"ready": peer}), file=out_file, flush=True)
    for line in sys.stdin:
        gold, answer, form = json.loads(line)
        try:
            out = {"v": module.grade(gold, answer, form)}
        except Exception as e:  # upstream code raising on a case is a verdict of its own, not a crash
            out = {"err": f"{type(e).__name__}: {e}"[:200]}
        print(json.dumps(out), file=out_file, flush=True)


if __name__ == "__main__":
    main()
