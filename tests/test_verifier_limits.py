"""Issue 19 item 6: a gold is parsed under the same deadline as a prediction, and a record is bounded."""
from __future__ import annotations

from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.verifier import Verifier

# 10,000 nested parentheses: math-verify's parser needs about 40 s for it (127 s for three records was
# the stall of issue 19, when golds were parsed at pool start without a deadline)
HOSTILE_GOLD = "(" * 10_000 + "1" + ")" * 10_000


def test_a_gold_too_slow_to_parse_times_out_once_and_its_other_items_at_once():
    with Verifier(workers=1, timeout=1.0) as verifier:
        kills = []
        kill = verifier._procs.kill
        verifier._procs.kill = lambda w: (kills.append(w.pid), kill(w))[1]
        items = [(r"\boxed{1}", HOSTILE_GOLD)] * 3 + [(r"\boxed{2}", "2"), (r"\boxed{3}", "4")]
        verdicts = verifier.verify(items)
        assert [v.verdict for v in verdicts] == ["timeout"] * 3 + ["ok", "ok"]
        assert [v.correct for v in verdicts] == [False, False, False, True, False]
        assert len(kills) == 1  # one worker paid the deadline; the gold's other items did not wait
        # a later call remembers the gold
        assert [v.verdict for v in verifier.verify([(r"\boxed{1}", HOSTILE_GOLD)])] == ["timeout"]
        assert len(kills) == 1


def test_a_slow_prediction_does_not_mark_its_gold_as_slow():
    tower = r"\boxed{9^{9^{9^{9^{9}}}}}"
    with Verifier(workers=1, timeout=1.0) as verifier:
        verdicts = verifier.verify([(tower, "5"), (r"\boxed{5}", "5")])
        assert [(v.verdict, v.correct) for v in verdicts] == [("timeout", False), ("ok", True)]


def test_an_endless_record_is_one_clear_line(monkeypatch):
    import s2d_cli.artifacts as artifacts

    monkeypatch.setattr(artifacts, "MAX_RECORD_BYTES", 2**20)  # 64 MiB by default; 1 MiB keeps the test short
    result = CliRunner().invoke(app, ["verify", "/dev/zero", "--out", "-"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == ("s2d: error: /dev/zero:1: a record longer than 1 MiB (no newline within "
                                     "it): expected JSON Lines, one record per line")
    result = CliRunner().invoke(app, ["verify", "-", "--out", "-"], input=b'{"a": 1}\n' + b"0" * (2**20 + 5))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().startswith("s2d: error: <stdin>:2: a record longer than 1 MiB")
