"""Paired differences, their 95% intervals and the verdicts of the paper's claims, with numbers by hand."""
from __future__ import annotations

import hashlib
import json
import math

import pytest

from s2d_cli import claims
from s2d_cli.claims import FAILS, HOLDS, UNDECIDED
from s2d_cli.errors import UsageError


def test_interval_by_hand():
    # d = 0.5, 0, 1, 0: mean 0.375; squared deviations 0.015625 + 0.140625 + 0.390625 + 0.140625 = 0.6875,
    # sd = sqrt(0.6875 / 3) = 0.478714, se = sd / 2 = 0.239357, half = 1.959964 * se = 0.469131
    c = claims.compare([0.5, 0.0, 1.0, 0.0], "A", "B")
    assert c.difference == pytest.approx(0.375)
    assert c.lo == pytest.approx(0.375 - 0.469131, abs=1e-6) and c.hi == pytest.approx(0.375 + 0.469131, abs=1e-6)
    assert c.pairs == 4 and c.verdict == UNDECIDED


def test_verdicts_by_hand():
    # the same four differences, nine times over: m = 36, sd = sqrt(0.6875 * 9 / 35) = 0.420459,
    # half = 1.959964 * 0.420459 / 6 = 0.137348 -> [0.2377, 0.5123], above 0
    c = claims.compare([0.5, 0.0, 1.0, 0.0] * 9)
    assert c.lo == pytest.approx(0.375 - 0.137348, abs=1e-6) and c.verdict == HOLDS
    # mirrored: below 0
    assert claims.compare([-0.5, 0.0, -1.0, 0.0] * 9).verdict == FAILS
    # no difference at all: the interval is [0, 0], no gain, so the claim does not hold
    c = claims.compare([0.0, 0.0, 0.0])
    assert (c.lo, c.hi, c.verdict) == (0.0, 0.0, FAILS)
    assert claims.verdict(-0.01, 0.02) == UNDECIDED and claims.verdict(1e-9, 0.1) == HOLDS
    with pytest.raises(UsageError, match="at least 2"):
        claims.compare([0.3])


def test_combined_claim():
    assert claims.combine([HOLDS, HOLDS]) == HOLDS
    assert claims.combine([HOLDS, UNDECIDED]) == UNDECIDED
    assert claims.combine([UNDECIDED, FAILS]) == FAILS


def test_pairs_by_problem_across_seeds():
    # seed 0: A - B = (1 - 0.5), (0 - 0); seed 1: (0.25 - 0.75), (1 - 0) -> ids sorted within each seed
    a = [{"p1": 1.0, "p2": 0.0}, {"q2": 1.0, "q1": 0.25}]
    b = [{"p2": 0.0, "p1": 0.5}, {"q1": 0.75, "q2": 0.0}]
    assert claims.paired_differences(a, b) == [0.5, 0.0, -0.5, 1.0]
    with pytest.raises(UsageError, match="'p3' is in one only"):
        claims.paired_differences([{"p1": 1.0, "p3": 1.0}], [{"p1": 1.0}], names=("A", "B"))


def _eval(path, correct_by_id: dict[str, list[bool]], answers: dict[str, str] | None = None):
    """A minimal finished eval artifact: one JSONL shard of (id, correct[, answer]) records and a manifest."""
    path.mkdir(parents=True)
    lines = [json.dumps({"id": i, "sample": k, "correct": c, **({"answer": answers[i]} if i in (answers or {}) else {})})
             for i, cs in correct_by_id.items() for k, c in enumerate(cs)]
    shard = path / "data-00000-of-00001.jsonl"
    shard.write_text("\n".join(lines) + "\n")
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": "eval", "shards": [
        {"file": shard.name, "records": len(lines), "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}]}))


def test_claims_table_and_readme_block_from_eval_artifacts(tmp_path, capsys):
    run = tmp_path / "seed-0"
    # per problem, 2 samples each: A arms all right on x, y; B arms right once on x
    good, bad = {"x": [True, True], "y": [True, True]}, {"x": [True, False], "y": [False, False]}
    for arm in ("teacher-grpo", "bridge-rl", "bridge-rl-grpo"):
        _eval(run / "eval" / arm, good)
    for arm in ("teacher-base", "student-grpo", "student-sft-more", "bridge-base", "kl-rl", "bridge-rl-replay"):
        _eval(run / "eval" / arm, bad)
    _eval(run / "eval" / "opd-rl", good)  # OPD alone as good as the bridge: "KL then OPD > either" fails
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{claims.BEGIN}\nold table\n{claims.END}\noutro\n")
    assert claims.main([str(run), "--readme", str(readme)]) == 0
    out = capsys.readouterr().out
    # d = 1 - 0.5, 1 - 0 -> mean 0.75, sd = sqrt(2 * 0.0625) = 0.353553, half = 1.959964 * 0.25 = 0.489991
    assert "| RL teacher > pre-RL teacher (Stage 1 pays) (teacher-grpo vs teacher-base) | +0.750 (2 pairs) " \
           "| [+0.260, +1.240] | **holds** | 1 of 1 |" in out
    assert "(bridge-rl vs kl-rl) | +0.750 (2 pairs) | [+0.260, +1.240] | holds | 1 of 1 |" in out
    assert "(bridge-rl vs opd-rl) | +0.000 (2 pairs) | [+0.000, +0.000] | does not hold; claim: **does not hold** " \
           "| 0 of 1 |" in out
    text = readme.read_text()
    assert text == f"intro\n{claims.BEGIN}\n{out}{claims.END}\noutro\n"
    assert math.isclose(claims.compare([0.5, 1.0]).hi, 0.75 + 0.489991, abs_tol=1e-6)


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert claims.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval/teacher-grpo: not a finished eval run" in err
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    run = tmp_path / "r"
    for arm in {a for _, pairs in claims.PAPER_CLAIMS for p in pairs for a in p}:
        _eval(run / "eval" / arm, {"x": [True], "y": [False]})
    assert claims.main([str(run), "--readme", str(readme)]) == 2
    assert "README.md: no claims block" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"


def test_s2d_report_claims_prints_the_table_and_rewrites_the_readme(tmp_path):
    """`s2d report --claims SEED_DIR...`: the same table on stdout over problems x seeds, a line per claim on
    stderr, the README block rewritten; misuse is one line, exit 2, the README untouched."""
    from typer.testing import CliRunner

    from s2d_cli.cli import app

    good, bad = {"x": [True, True], "y": [True, True]}, {"x": [True, False], "y": [False, False]}
    runs = [tmp_path / "seed-0", tmp_path / "seed-1"]
    for k, run in enumerate(runs):   # seed 1: the same accuracies on its own problems (other ids)
        g, b = ({f"{i}{k}": v for i, v in good.items()}, {f"{i}{k}": v for i, v in bad.items()})
        for arm in ("teacher-grpo", "bridge-rl", "bridge-rl-grpo", "opd-rl"):
            _eval(run / "eval" / arm, g)
        for arm in ("teacher-base", "student-grpo", "student-sft-more", "bridge-base", "kl-rl", "bridge-rl-replay"):
            _eval(run / "eval" / arm, b)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{claims.BEGIN}\nold\n{claims.END}\n")
    res = CliRunner().invoke(app, ["report", "--claims", *map(str, runs), "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    # 4 pairs: d = 0.5, 1, 0.5, 1 -> mean 0.75, sd = sqrt(4 * 0.0625 / 3) = 0.288675, half = 1.959964 * 0.144338
    # = 0.282898
    row = ("| RL teacher > pre-RL teacher (Stage 1 pays) (teacher-grpo vs teacher-base) | +0.750 (4 pairs) "
           "| [+0.467, +1.033] | **holds** | 2 of 2 |")
    assert row in res.stdout and "paired over problems × 2 seeds" in res.stdout
    assert "claim: KL then OPD > either alone: does not hold" in res.stderr
    assert readme.read_text() == f"intro\n{claims.BEGIN}\n{res.stdout}{claims.END}\n"
    for args, message in ((["--claims"], "--claims needs the seeds' run directories"),
                          (["--claims", str(runs[0]), "--out", str(tmp_path / "r")], "--claims takes only"),
                          ([str(runs[0]), "--out", str(tmp_path / "r"), "--readme", str(readme)],
                           "--readme goes with --claims"),
                          (["--claims", str(tmp_path / "nothing")], "not a finished eval run")):
        res = CliRunner().invoke(app, ["report", *args])
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and message in res.stderr, (args, res.stderr)
    assert readme.read_text().count("+0.750 (4 pairs)") == 7


def test_the_arms_table_over_seeds_by_hand(tmp_path):
    """examples/toy/aggregate.py: mean and sample std of each arm's accuracy over the seeds, the per-seed
    values, and --readme writes the table (without the clock readings) into the README's toy-arms block."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples" / "toy"))
    try:
        import aggregate
    finally:
        sys.path.pop(0)
    accs = {"student-base": [0.5, 0.25, 0.75], "teacher-grpo": [0.6, 0.6, 0.9]}
    reports = []
    for s in range(3):
        (tmp_path / f"seed-{s}").mkdir()
        rows = [{"arm": arm, "accuracy": a[s], "labels": 64 * k, "steps": 1500 + 60 * k, "wall_s": 100.0 + s}
                for k, (arm, a) in enumerate(accs.items())]
        (tmp_path / f"seed-{s}" / "table.json").write_text(json.dumps(rows))
        reports.append(str(tmp_path / f"seed-{s}" / "report"))
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{aggregate.BEGIN}\nold\n{aggregate.END}\nb\n")
    done = subprocess.run([sys.executable, str(root / "examples/toy/aggregate.py"), *reports, "--out",
                           str(tmp_path / "summary.md"), "--readme", str(readme)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # student-base: mean 0.5, sd sqrt((0 + 0.0625 + 0.0625) / 2) = 0.25; teacher-grpo: mean 0.7,
    # sd sqrt((0.01 + 0.01 + 0.04) / 2) = 0.173205
    summary = (tmp_path / "summary.md").read_text()
    assert "| student-base | 0.500 ± 0.250 | 0.500, 0.250, 0.750 | 0 | 1500 | 101 |" in summary
    assert "| teacher-grpo | 0.700 ± 0.173 | 0.600, 0.600, 0.900 | 64 | 1560 | 101 |" in summary
    block = ("| arm | accuracy (mean ± std over 3 seeds) | per seed | labels | steps |\n|---|---|---|---|---|\n"
             "| student-base | 0.500 ± 0.250 | 0.500, 0.250, 0.750 | 0 | 1500 |\n"
             "| teacher-grpo | 0.700 ± 0.173 | 0.600, 0.600, 0.900 | 64 | 1560 |\n")
    assert readme.read_text() == f"a\n{aggregate.BEGIN}\n{block}{aggregate.END}\nb\n"


def test_seeds_with_a_above_b_counts_each_seeds_own_mean(tmp_path):
    """The pooled interval can hold on one lucky seed; the seed count says how many seeds agree. Seed 0:
    teacher-grpo right on both problems, teacher-base on none (+1); seed 1: -0.5; seed 2: 0 (not above)."""
    runs = [tmp_path / f"seed-{s}" for s in range(3)]
    grpo = [{"x": [True], "y": [True]}, {"x": [False], "y": [False]}, {"x": [True], "y": [False]}]
    base = [{"x": [False], "y": [False]}, {"x": [True], "y": [False]}, {"x": [False], "y": [True]}]
    for run, g, b in zip(runs, grpo, base):
        _eval(run / "eval" / "teacher-grpo", g)
        _eval(run / "eval" / "teacher-base", b)
    [(_, [c], verdict)] = claims.evaluate_claims(runs, [("c", [("teacher-grpo", "teacher-base")])])
    # pairs: 1, 1, 0, -1, 1, -1 -> mean 1/6
    assert (c.seeds_above, c.seeds, c.pairs) == (1, 3, 6) and c.difference == pytest.approx(1 / 6)
    assert claims.claims_markdown([("c", [c], verdict)], 3).splitlines()[-1].endswith("| 1 of 3 |")


def test_one_seed_counted_twice_or_unrelated_problems_are_refused(tmp_path):
    """The pooled pairs assume one directory per seed and one problem set per seed: the same directory
    twice, a copy of a seed (identical evaluation shards), or an arm evaluated on another seed's problems
    (the toy's ids repeat from seed to seed with other numbers) is one line naming both, not a table."""
    import shutil

    arms = {a for _, pairs in claims.PAPER_CLAIMS for p in pairs for a in p}
    run = tmp_path / "seed-0"
    for arm in arms:
        _eval(run / "eval" / arm, {"x": [True], "y": [False]})
    with pytest.raises(UsageError, match="given twice"):
        claims.evaluate_claims([run, tmp_path / "." / "seed-0"])
    shutil.copytree(run, tmp_path / "copy")
    with pytest.raises(UsageError, match="copy.* holds the same results as .*seed-0 "):
        claims.evaluate_claims([run, tmp_path / "copy"])
    (tmp_path / "copy" / "eval" / "kl-rl" / "manifest.json").unlink()   # a rerun: other bytes, same results
    shutil.rmtree(tmp_path / "copy" / "eval" / "kl-rl")
    _eval(tmp_path / "copy" / "eval" / "kl-rl", {"y": [False], "x": [True]})
    with pytest.raises(UsageError, match="holds the same results as"):
        claims.evaluate_claims([run, tmp_path / "copy"])
    other = tmp_path / "mixed"
    shutil.copytree(run, other)
    shutil.rmtree(other / "eval" / "teacher-base")
    _eval(other / "eval" / "teacher-base", {"x": [True], "y": [False]}, answers={"x": "17"})  # same ids, other problems
    with pytest.raises(UsageError, match="'x' has the answer '17' in one and 'None' in the other"):
        claims.evaluate_claims([other])
