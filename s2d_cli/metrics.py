"""Evaluation metrics over verified records: avg@n with a 95% CI, unbiased pass@k, maj@n, breakdowns."""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for c correct out of n samples."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_ci95(per_prompt: list[float], num_samples: int) -> tuple[float, float, float]:
    """Mean over prompts with a normal-approximation 95% interval. Samples of one prompt are not
    independent, so the standard error is taken over per-prompt accuracies (clustered by prompt)."""
    p = len(per_prompt)
    mean = sum(per_prompt) / p
    if p > 1:
        var = sum((x - mean) ** 2 for x in per_prompt) / (p - 1)
        se = math.sqrt(var / p)
    else:
        se = math.sqrt(mean * (1 - mean) / max(num_samples, 1))
    return mean, max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)


_CORRECT = object()  # the vote of every correct sample (no text can equal it)


def majority_correct(samples: list[dict]) -> bool:
    """maj@n: is the most voted answer the right one?

    Every correct sample is equivalent to the gold, so all of them are one answer (0.5, \\frac12 and
    \\dfrac{1}{2} against gold 0.5 are three votes for it). Wrong answers are grouped by their
    normalised text (`verifier.answer_key`: spacing, thousands separators, \\dfrac vs \\frac do not
    split them). A sample without an extracted answer casts no vote. Ties go to the answer seen first
    (the lowest sample index), so a tie between the right answer and a wrong one is right only when a
    correct sample comes before every sample of that wrong answer."""
    from .verifier import answer_key

    votes: dict[object, list[int]] = {}  # answer -> [votes, index of its first sample]
    for i, s in enumerate(samples):
        if s.get("correct"):
            key: object = _CORRECT
        elif s.get("extracted") is None:
            continue
        else:
            key = answer_key(s["extracted"])
        votes.setdefault(key, [0, i])[0] += 1
    if _CORRECT not in votes:
        return False
    right, first = votes.pop(_CORRECT)
    return all(n < right or (n == right and f > first) for n, f in votes.values())


def summarize(records: list[dict], *, dataset: str, model: str | None) -> dict[str, Any]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r["id"])].append(r)
    n = min(len(g) for g in groups.values())
    per_prompt = [sum(bool(s["correct"]) for s in g) / len(g) for g in groups.values()]
    acc, lo, hi = mean_ci95(per_prompt, len(records))
    out: dict[str, Any] = {
        "dataset": dataset, "model": model, "n": n, "num_prompts": len(groups), "num_samples": len(records),
        "accuracy": acc, "accuracy_ci95": [lo, hi],
        "pass@k": {}, "maj@n": sum(majority_correct(g) for g in groups.values()) / len(groups),
    }
    k = 1
    while k <= n:
        out["pass@k"][str(k)] = sum(pass_at_k(len(g), sum(bool(s["correct"]) for s in g), k)
                                    for g in groups.values()) / len(groups)
        k *= 2
    lengths = [len(r["completion_ids"]) for r in records if isinstance(r.get("completion_ids"), list)]
    if lengths:
        out["mean_completion_tokens"] = sum(lengths) / len(lengths)
    if any("finish_reason" in r for r in records):
        out["truncation_rate"] = sum(r.get("finish_reason") == "length" for r in records) / len(records)
    out["verdicts"] = dict(Counter(r.get("verdict", "ok") for r in records))
    for key in ("subject", "level"):
        if any(key in g[0] for g in groups.values()):
            table: dict[str, list[float]] = defaultdict(list)
            for g, acc_g in zip(groups.values(), per_prompt):
                table[str(g[0].get(key))].append(acc_g)
            out[f"by_{key}"] = {name: {"accuracy": sum(v) / len(v), "num_prompts": len(v)}
                                for name, v in sorted(table.items())}
    return out


def print_metrics(console, m: dict[str, Any], title: str | None = None) -> None:
    """The eval table on `console`, under a title line of its own that is never wrapped or cut: a
    table's own title wraps to the table's width and would break a model path in the middle."""
    from rich.text import Text

    console.print(Text(title or f"{m['dataset']} — {m.get('model') or 'rollouts'}", style="italic"),
                  soft_wrap=True)
    console.print(metrics_table(m))


def metrics_table(m: dict[str, Any]):
    from rich.table import Table

    t = Table()
    t.add_column("metric")
    t.add_column("value", justify="right")
    lo, hi = m["accuracy_ci95"]
    t.add_row(f"accuracy (avg@{m['n']})", f"{m['accuracy']:.3f}  [{lo:.3f}, {hi:.3f}]")
    for k, v in m["pass@k"].items():
        t.add_row(f"pass@{k}", f"{v:.3f}")
    t.add_row(f"maj@{m['n']}", f"{m['maj@n']:.3f}")
    t.add_row("prompts x samples", f"{m['num_prompts']} x {m['n']}")
    if "mean_completion_tokens" in m:
        t.add_row("mean completion tokens", f"{m['mean_completion_tokens']:.1f}")
    if "truncation_rate" in m:
        t.add_row("truncated", f"{m['truncation_rate']:.1%}")
    for key in ("by_subject", "by_level"):
        for name, v in m.get(key, {}).items():
            t.add_row(f"  {key[3:]} {name}", f"{v['accuracy']:.3f} ({v['num_prompts']})")
    return t
