"""Harvest (gold, answer, expected) triples from peer graders' public test suites as data.

    python bench/harvest_peer_cases.py --math-verify DIR --lighteval DIR > tests/data/verify_peer_cases.jsonl

DIR: a git checkout of huggingface/Math-Verify or huggingface/lighteval. Only the literal arguments of
their `pytest.mark.parametrize` tables are read (with `ast`, never executed); none of their code is
kept. A table qualifies when its parameters include `gold`, `pred` and `expected` (or `result`);
rows with a non-default grading option (precision, strict=False, allow_set_relation_comp) are left
out, since their expected verdict is about that option. Each row keeps the suite's verdict as
`suite_verdict`; `expected` starts equal to it, and `bench/verify_corpus_overrides.json` (our review,
one reason per case) replaces it where a careful human grades differently.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

SUITES = {
    "math-verify": ["tests/test_all.py", "tests/test_boxed.py", "tests/test_numina_cases.py",
                    "tests/test_open_thoughts.py", "tests/test_yujianll.py"],
    "lighteval": ["tests/unit/metrics/test_extractive_match.py"],
}
SKIP_TESTS = {"test_extraction_abc", "test_multilingual_extraction_abc"}  # multiple-choice letters, not math
OPTIONS_OK = {"language", "match_type"}


def _literal(node: ast.AST):
    """A literal's value; an option such as `Language.ENGLISH` as its source text."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def rows(path: Path, rel: str, commit: str, repo: str):
    tree = ast.parse(subprocess.run(["git", "-C", str(path), "show", f"{commit}:{rel}"], check=True,
                                    capture_output=True, text=True).stdout)
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        if fn.name in SKIP_TESTS:
            continue
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize"):
                continue
            names = [n.strip() for n in ast.literal_eval(dec.args[0]).split(",")] \
                if isinstance(dec.args[0], ast.Constant) else list(ast.literal_eval(dec.args[0]))
            verdict = "expected" if "expected" in names else "result" if "result" in names else None
            if not verdict or "gold" not in names or "pred" not in names:
                continue
            if set(names) - {"gold", "pred", verdict} - OPTIONS_OK:
                continue
            for i, elt in enumerate(dec.args[1].elts):
                if not isinstance(elt, ast.Tuple):
                    continue
                values = dict(zip(names, map(_literal, elt.elts)))
                if not all(isinstance(values[k], str) for k in ("gold", "pred")) or values["gold"].startswith("f'"):
                    continue  # a row built by code (an f-string template), not a literal
                options = {k: values[k] for k in names if k in OPTIONS_OK}
                yield {"gold": values["gold"], "answer": values["pred"], "suite_verdict": bool(values[verdict]),
                       "source": f"{repo}@{commit[:10]}:{rel}::{fn.name}[{i}]",
                       **({"options": options} if options else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--math-verify", type=Path, required=True)
    ap.add_argument("--lighteval", type=Path, required=True)
    args = ap.parse_args()
    seen = set()
    for name, path in (("math-verify", args.math_verify), ("lighteval", args.lighteval)):
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
        repo = {"math-verify": "huggingface/Math-Verify", "lighteval": "huggingface/lighteval"}[name]
        for rel in SUITES[name]:
            for row in rows(path, rel, commit, repo):
                key = (row["gold"], row["answer"], json.dumps(row.get("options"), sort_keys=True))
                if key in seen:  # lighteval repeats many of Math-Verify's cases
                    continue
                seen.add(key)
                sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
