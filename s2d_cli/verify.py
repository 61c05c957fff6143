"""s2d verify — score completions against gold answers with math-verify, in worker processes.

    s2d verify runs/r1 --out runs/r1-verified
    s2d rollout --model M --dataset gsm8k --limit 8 --out - | s2d verify - --out -
    s2d verify samples.jsonl --out - --workers 2 --timeout 5

    s2d verify samples.jsonl --out - --set grade_boxes=last --set grade_no_box=search   # the old rules

Each record needs `completion` and `answer`; verify adds `reward` (1.0 / 0.0), `correct`,
`extracted` (the answer as read: its box or boxes, or a marked final-answer line), `verdict`
(ok, no_answer, timeout, error) and `multi_box` (the answer spread over several different boxes). A
pathological answer or gold costs at most --timeout seconds and yields verdict "timeout"; model output
is never evaluated as code. The grading rules (`grade_*` keys, see `s2d_cli/grading.py` and the
README) are part of the config, so the manifest records them. The summary on stderr, and the
manifest's `verdict_rates`, give the share of each verdict and of multi-box answers: a run that learns
to game the extractor shows it there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from . import cliutil as cu
from .artifacts import ArtifactWriter, check_shard_size, made_with, read_located, shard_slices
from .config import resolve
from .errors import UsageError, located
from .grading import GradingFields
from .verifier import check_pool_options, gold_type_error


@dataclass
class VerifyConfig(GradingFields):
    input: str = ""           # artifact directory, JSONL file, or '-'
    out: str = "-"            # artifact directory, or '-' for JSONL on stdout
    workers: int | None = None  # verifier processes (default or 0: one per CPU)
    timeout: float = 5.0      # wall-clock seconds per item
    shard_size: int = 1024    # records per output shard
    force: bool = False

    def validate(self) -> None:
        if not self.input:
            raise UsageError("missing input: an artifact directory, a JSONL file or '-'")
        check_pool_options(self.workers, self.timeout)
        check_shard_size(self.shard_size)
        self.grading_rules()  # a bad grade_* value is a usage error now, not in a worker


WORKERS_HELP = "Verifier processes (default, or 0: one per CPU this process may use; negative is an error)."


def check_golds(records: list[dict], source: str, where: list[tuple[str, int | None]] | None = None) -> None:
    """Every gold is non-empty text, an int or a finite float; every completion is text. `where`: each
    record's (file, line) from `read_located` (else the source and the record's position)."""
    for i, rec in enumerate(records, 1):
        at = where[i - 1] if where else (source, i)
        gold = rec.get("answer")
        if gold is None or (isinstance(gold, str) and not gold.strip()):
            raise located(*at, "field 'answer' is empty: no gold answer to verify against")
        problem = gold_type_error(gold)
        if problem:
            raise located(*at, f"field 'answer': {problem}")
        if not isinstance(rec.get("completion"), str):
            raise located(*at, "field 'completion': expected text")


RATED = ("no_answer", "timeout", "error", "multi_box")


def verdict_rates(records: list[dict]) -> dict[str, float]:
    """Share of records with each verdict that is not a plain grade (no_answer, timeout, error), and of
    answers spread over several different boxes (`multi_box`)."""
    n = max(1, len(records))
    rates = {v: sum(r.get("verdict") == v for r in records) / n for v in RATED[:3]}
    rates["multi_box"] = sum(bool(r.get("multi_box")) for r in records) / n
    return rates


def rates_line(rates: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_', '-')} {rates[k]:.1%}" for k in RATED)


def score(records: list[dict], verifier) -> list[dict]:
    """Records with reward, correct, extracted and verdict added (a new list; inputs untouched). Golds go
    to the verifier as they are: str() would write the float 0.00005 as "5e-05", which reads as e - 5."""
    verdicts = verifier.verify([(r["completion"], r["answer"]) for r in records])
    return [{**r, **asdict(v)} for r, v in zip(records, verdicts)]


def run(cfg: VerifyConfig) -> Path | None:
    from .verifier import Verifier

    records, where = read_located(cfg.input, required=("completion", "answer"))
    check_golds(records, cfg.input, where)
    slices = shard_slices(len(records), cfg.shard_size)
    writer = ArtifactWriter(cfg.out, kind="verified", config=asdict(cfg), num_shards=len(slices),
                            inputs=[cfg.input], force=cfg.force)
    todo = writer.pending()
    done: list[dict] = []  # every scored record, this run's and a resumed run's, for the rates
    total = 0
    if todo:
        with Verifier(workers=cfg.workers, timeout=cfg.timeout, rules=cfg.grading_rules()) as verifier, \
                cu.progress() as bar:
            task = bar.add_task("verify", total=sum(len(slices[i]) for i in todo))
            for i in todo:
                scored = score([records[j] for j in slices[i]], verifier)
                writer.write_shard(i, scored)
                done += [{k: r.get(k) for k in ("correct", "verdict", "multi_box")} for r in scored]
                total += len(scored)
                bar.advance(task, len(scored))
    # a resumed run's finished shards count too, also when nothing was left to do (killed at the commit)
    done += [r for i in range(len(slices)) if i not in todo for r in writer.read_finished_shard(i)]
    rates = verdict_rates(done) if done else None
    extra = {"made_with": made_with(cfg.input)} if Path(cfg.input).is_dir() else {}
    if rates:
        extra["verdict_rates"] = rates
    out = writer.commit(extra=extra or None)
    if total:
        correct = sum(bool(r["correct"]) for r in done)
        cu.console.print(f"verified {total} records: {correct} of {len(done)} correct ({correct / len(done):.1%}); "
                         + rates_line(rates), soft_wrap=True)
    if out is not None:
        print(out)
    return out


def command(
    input: str = typer.Argument(None, help="Artifact directory, JSONL file, or '-' for stdin."),
    out: cu.OutOpt = None,
    workers: int = typer.Option(None, "--workers", help=WORKERS_HELP),
    timeout: float = typer.Option(None, "--timeout", help="Wall-clock seconds per item, finite and > 0 (default 5)."),
    force: cu.ForceOpt = None, config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Score completions against gold answers (reward, correct, extracted, verdict).

    Example: s2d verify runs/r1 --out runs/r1-verified
    """
    flags = cu.given(input=input, out=out, workers=workers, timeout=timeout, force=force)
    cu.execute(run, lambda: resolve(VerifyConfig, config_file=config, sets=set_, flags=flags))
