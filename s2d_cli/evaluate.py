"""s2d eval — rollout + verify + metrics in one command (or re-score existing rollouts).

    s2d eval --model Qwen/Qwen3-1.7B --protocol math500 --out runs/eval-math500
    s2d eval --model runs/student --dataset aime24 --n 16 --max-new-tokens 16384 --out runs/eval-aime24
    s2d eval --rollouts runs/r1 --out runs/r1-eval          # no model: re-score
    s2d eval --rollouts runs/r1                             # metrics JSON on stdout, nothing written

Writes DIR/metrics.json (dataset, model, n, num_prompts, accuracy = avg@n with a 95% CI clustered by
prompt, unbiased pass@k for k = 1, 2, 4 ... <= n, maj@n, breakdowns by subject and level) beside the
per-sample artifact (rollout records + verify fields), and `verdict_rates`: the share of no_answer,
timeout and error verdicts and of multi-box answers (a model that games the answer extractor shows
there). The table and the rates go to stderr, the path to stdout. The grading rules are the `grade_*`
keys of `s2d verify` (e.g. `--set grade_boxes=last`), recorded in the manifest's config.

Named protocols (--protocol) fix the paper's evaluation settings; flags still override them:
  math500       MATH-500, avg@4,  temperature 0.6, top-p 0.95, top-k 20, 8,192 new tokens
  aime24/aime25 AIME 2024/2025, avg@16, temperature 0.6, top-p 0.95, top-k 20, 16,384 new tokens
  amc23         AMC 2023, avg@8, same sampling, 8,192 new tokens
  gsm8k         GSM8K test, avg@1, greedy, 1,024 new tokens
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import typer

from . import cliutil as cu
from .artifacts import ArtifactWriter, check_shard_size, made_with, read_located, shard_slices
from .config import resolve
from .data import Example
from .errors import UsageError
from .grading import GradingFields
from .metrics import print_metrics, summarize
from .rollout import (
    PromptFields,
    SamplingFields,
    check_sampling,
    completion_records,
    encode_examples,
    load_fitting_prompts,
    open_engine,
    sampling_config,
)
from .verifier import check_pool_options
from .verify import WORKERS_HELP, check_golds, rates_line, score, verdict_rates

_QWEN3_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
PROTOCOLS = {
    "math500": {"dataset": "math500", "n": 4, "max_new_tokens": 8192, **_QWEN3_SAMPLING},
    "aime24": {"dataset": "aime24", "n": 16, "max_new_tokens": 16384, **_QWEN3_SAMPLING},
    "aime25": {"dataset": "aime25", "n": 16, "max_new_tokens": 16384, **_QWEN3_SAMPLING},
    "amc23": {"dataset": "amc23", "n": 8, "max_new_tokens": 8192, **_QWEN3_SAMPLING},
    "gsm8k": {"dataset": "gsm8k", "n": 1, "max_new_tokens": 1024, "temperature": 0.0},
}


@dataclass
class EvalConfig(PromptFields, SamplingFields, GradingFields):
    model: str = ""                  # checkpoint directory or hub id (not needed with --rollouts)
    rollouts: str | None = None      # re-score an existing rollout artifact / JSONL instead of sampling
    out: str | None = None           # output directory; none: metrics JSON on stdout, nothing written
    split: str = "test"              # eval scores a held-out split (training commands default to train)
    protocol: str | None = None      # a named protocol (see above); recorded in metrics.json
    workers: int | None = None       # verifier processes (default or 0: one per CPU)
    timeout: float = 5.0             # verifier wall-clock seconds per item
    shard_size: int = 64             # prompts per shard (records per shard with --rollouts)
    force: bool = False
    report_to: list[str] = field(default_factory=list)   # trackers that get the metrics (s2d_cli/trackers.py)
    tracker_project: str | None = None                  # their project / experiment name (default: s2d)

    def validate(self) -> None:
        if self.rollouts is None:
            if not self.model:
                raise UsageError("missing required option --model (or --rollouts DIR to re-score)")
            if not self.dataset:
                raise UsageError("missing required option --dataset (or --protocol)")
            check_sampling(self)
        if self.out == "-":
            raise UsageError("--out: eval writes a directory; omit --out to get metrics JSON on stdout")
        check_pool_options(self.workers, self.timeout)
        check_shard_size(self.shard_size)
        from .trackers import names_of
        if "tensorboard" in names_of(self) and self.out is None:
            raise UsageError("report_to: tensorboard writes into the output directory: give --out")
        self.grading_rules()


def _sample_and_score(cfg: EvalConfig, examples: list[Example], slices: list[range], writer: ArtifactWriter | None,
                      verifier) -> list[dict]:
    """Rollout + verify, shard by shard (resumable when writing); returns all scored records."""
    from .models import load_tokenizer

    todo = writer.pending() if writer is not None else list(range(len(slices)))
    done = {i: writer.read_finished_shard(i) for i in range(len(slices)) if i not in todo} if writer else {}
    if todo:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        engine = open_engine(cfg, cfg.model, tokenizer)
        with cu.progress() as bar:
            task = bar.add_task(f"eval {cfg.dataset}", total=len(examples),
                                completed=sum(len(slices[i]) for i in done))
            for i in todo:
                shard = [examples[j] for j in slices[i]]
                texts, ids = encode_examples(tokenizer, shard, cfg)
                groups = engine.generate(ids, sampling_config(cfg, seed=cfg.seed + i))
                done[i] = score(completion_records(shard, texts, groups, cfg.model, logprobs=False, prompt_ids=ids),
                                verifier)
                if writer is not None:
                    writer.write_shard(i, done[i])
                bar.advance(task, len(shard))
        engine.close()
    return [r for i in sorted(done) for r in done[i]]


def _rescore(records: list[dict], slices: list[range], writer: ArtifactWriter | None, verifier) -> list[dict]:
    out = []
    for i, sl in enumerate(slices):
        if writer is not None and writer.done(i):
            out.extend(writer.read_finished_shard(i))
            continue
        scored = score([records[j] for j in sl], verifier)
        if writer is not None:
            writer.write_shard(i, scored)
        out.extend(scored)
    return out


def run(cfg: EvalConfig) -> dict:
    from .models import check_model_ref
    from .verifier import Verifier

    # Every input is read and checked before the output (or its staging dir) exists.
    if cfg.rollouts is not None:
        inputs, where = read_located(cfg.rollouts, required=("id", "completion", "answer"))
        check_golds(inputs, cfg.rollouts, where)
        slices = shard_slices(len(inputs), cfg.shard_size * 16)
    else:
        check_model_ref(cfg.model)
        inputs, skipped = load_fitting_prompts(cfg, cfg.model, require_answer=True)
        slices = shard_slices(len(inputs), cfg.shard_size)
    writer = None
    if cfg.out is not None:
        writer = ArtifactWriter(cfg.out, kind="eval", config=asdict(cfg), num_shards=len(slices),
                                inputs=[cfg.rollouts] if cfg.rollouts else [cfg.dataset, cfg.model],
                                force=cfg.force)
        if writer.complete:
            metrics = json.loads((Path(cfg.out) / "metrics.json").read_text())
            _print_metrics(metrics)
            print(cfg.out)
            return metrics
    # the pool's zygote imports math-verify while the model loads and samples
    with Verifier(workers=cfg.workers, timeout=cfg.timeout, rules=cfg.grading_rules()) as verifier:
        if cfg.rollouts is not None:
            records = _rescore(inputs, slices, writer, verifier)
        else:
            records = _sample_and_score(cfg, inputs, slices, writer, verifier)
    keys = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
    made = _made_with(cfg.rollouts) if cfg.rollouts is not None else {}
    dataset = (made.get("dataset") if cfg.rollouts is not None else cfg.dataset) \
        or (records[0].get("dataset") if records else "") or str(cfg.rollouts)
    model = cfg.model or (records[0].get("model") if records else None)
    metrics = summarize(records, dataset=dataset, model=model)
    if cfg.protocol:
        metrics["protocol"] = cfg.protocol
    if cfg.rollouts is None and skipped:      # long_prompts=skip: these prompts are not in the accuracy
        metrics["skipped_long_prompts"] = skipped
    metrics["verdict_rates"] = verdict_rates(records)
    # re-scored rollouts were sampled as their rollout's manifest says (unknown for a bare file), not
    # with this command's defaults
    metrics["sampling"] = ({k: made[k] for k in keys if k in made} or None) if cfg.rollouts is not None \
        else {k: getattr(cfg, k) for k in keys}
    _print_metrics(metrics)
    if writer is None:
        from .trackers import log_once
        log_once(cfg, metrics, out=None, config=asdict(cfg))
        print(json.dumps(metrics, indent=2))
        return metrics
    writer.write_file("metrics.json", metrics)
    writer.commit(extra={"accuracy": metrics["accuracy"], "num_prompts": metrics["num_prompts"],
                         "skipped_long_prompts": metrics.get("skipped_long_prompts", 0)})
    from .trackers import log_once
    log_once(cfg, metrics, out=cfg.out, config=asdict(cfg))
    print(cfg.out)
    return metrics


def _print_metrics(metrics: dict) -> None:
    """The table, then the verdict rates (an eval written before they existed has none)."""
    print_metrics(cu.console, metrics)
    if "verdict_rates" in metrics:
        cu.console.print("verdicts: " + rates_line(metrics["verdict_rates"]), soft_wrap=True)


def _made_with(source: str) -> dict:
    """How the records of `source` were sampled, from its own manifest only (`artifacts.made_with`): the
    paths a manifest names are information, never followed; {} when unknown (a plain file, stdin)."""
    return made_with(source) if source != "-" and Path(source).is_dir() else {}


def build_config(protocol: str | None, config: str | None, sets: list[str] | None, flags: dict) -> EvalConfig:
    base = {}
    if protocol is not None:
        if protocol not in PROTOCOLS:
            raise UsageError(f"--protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        base = {**PROTOCOLS[protocol], "protocol": protocol}
    return resolve(EvalConfig, config_file=config, sets=sets, flags=flags, base=base)


def command(
    model: cu.ModelOpt = None, dataset: cu.DatasetOpt = None, out: cu.EvalOutOpt = None, n: cu.NOpt = None,
    max_new_tokens: cu.MaxNewOpt = None, temperature: cu.TempOpt = None, top_p: cu.TopPOpt = None,
    top_k: cu.TopKOpt = None, seed: cu.SeedOpt = None, limit: cu.LimitOpt = None, backend: cu.BackendOpt = None,
    prompt_field: cu.PromptFieldOpt = None, answer_field: cu.AnswerFieldOpt = None, id_field: cu.IdFieldOpt = None,
    rollouts: str = typer.Option(None, "--rollouts", help="Re-score existing rollouts instead of sampling."),
    protocol: str = typer.Option(None, "--protocol", help="Named protocol (flags override its settings): " + "; ".join(
        f"{name}: {p['dataset']}, avg@{p['n']}, " + (f"temperature {p['temperature']}" if p.get("temperature") == 0.0
                                                     else f"temperature {p['temperature']}, top-p {p['top_p']}, top-k {p['top_k']}")
        + f", {p['max_new_tokens']:,} new tokens" for name, p in PROTOCOLS.items()) + "."),
    workers: int = typer.Option(None, "--workers", help=WORKERS_HELP),
    force: cu.ForceOpt = None, config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Evaluate a model on a math set: rollout + verify + metrics (avg@n, pass@k, maj@n).

    Example: s2d eval --model runs/tiny --dataset math500 --limit 20 --n 2 --max-new-tokens 64 --out runs/eval
    """
    flags = cu.given(model=model, dataset=dataset, out=out, n=n, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, limit=limit, backend=backend,
                     prompt_field=prompt_field, answer_field=answer_field, id_field=id_field,
                     rollouts=rollouts, workers=workers, force=force)
    cu.execute(run, lambda: build_config(protocol, config, set_, flags))
