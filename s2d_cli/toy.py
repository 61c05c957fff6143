"""s2d toy — a synthetic integer-arithmetic task with verifiable answers, for the recipe on a CPU.

    s2d toy --split sft --n 2000 --error-rate 0.3 --out runs/toy/sft.jsonl   # worked solutions, 30% wrong
    s2d toy --split test --n 200 | head -3                                    # JSONL on stdout
    s2d eval --model runs/toy/student --dataset toy:split=test,n=200 --n 4 --max-new-tokens 64

Levels: every solution works column by column, units first, each line one column with the carry
it takes in, so each step is a one-digit fact a tiny model can learn (the tiny tokenizer splits digits):
  1  a + b          two-digit operands     "7 + 8 = 15. 3 + 4 + 1 = 8. The answer is \\boxed{85}."
  2  a + b + c      two-digit operands     "7 + 8 + 5 = 20. 3 + 4 + 2 + 2 = 11. The answer is \\boxed{110}."
  3  a * b          one digit times three  "7 * 8 = 56. 7 * 4 + 5 = 33. 7 * 3 + 3 = 24. The answer is \\boxed{2436}."
  4  (a + b) * c    three-digit sum times one digit (not in the default 1-3): the sum's columns, the
                    sum, then the product's columns.

Splits: `test` (held out), `train` (labelled prompts for GRPO), `pool` (prompts the recipe uses without
their labels: rollouts for kl-warmup, opd) and `sft` (a worked solution in `completion`; with
`error_rate` > 0 that fraction of them makes one arithmetic slip, carried through to a wrong answer,
so a base model trained on them is imperfect). Every record has id, problem, answer, level and the
correct `solution`; sft records add `completion` and `corrupted`.

Held-out by construction: a fixed hash of the problem text puts 1 problem in 5 in the test region;
`test` draws only from it and the other splits never do, whatever their seed, n or levels. Within a
split problems are distinct. Each split draws from its own seeded stream (`s2d-toy:{seed}:{split}`),
and the slips from another one, so changing error_rate never changes which problems are drawn.

Left out on purpose: word problems, negative operands, division, anything whose answer is not an integer.
"""
from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from . import cliutil as cu
from .config import resolve
from .errors import UsageError

SPLITS = ("test", "train", "pool", "sft")
DEFAULT_N = {"test": 200, "train": 500, "pool": 2000, "sft": 2000}
LEVELS = (1, 2, 3, 4)
DEFAULT_LEVELS = "1-3"
TEST_REGION = 5          # 1 problem in TEST_REGION belongs to the test region
MAX_TRIES = 200          # draws per record before giving up on finding a new distinct problem
SLIPS = (-1, 1)  # a column misadded (or mismultiplied) by one


@dataclass
class ToyConfig:
    split: str = "test"           # test | train | pool | sft
    n: int | None = None          # records; default per split: test 200, train 500, pool 2000, sft 2000
    levels: str = DEFAULT_LEVELS  # "1-3", "2", "1,3" (CLI) or "1+3" (in a toy:... spec)
    seed: int = 0
    error_rate: float = 0.0       # sft only: fraction of worked solutions with one arithmetic slip
    out: str = "-"                # JSONL file, or '-' for stdout

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise UsageError(f"toy: split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.n is not None and self.n < 1:
            raise UsageError(f"toy: n: expected a positive integer, got {self.n}")
        parse_levels(self.levels)
        if not 0.0 <= self.error_rate <= 1.0:
            raise UsageError(f"toy: error_rate: expected a number in [0, 1], got {self.error_rate}")
        if self.error_rate > 0 and self.split != "sft":
            raise UsageError(f"toy: error_rate applies to split=sft only (got split={self.split})")

    @property
    def size(self) -> int:
        return self.n if self.n is not None else DEFAULT_N[self.split]


# ----------------------------------------------------------------------------------------------
# spec parsing

def parse_levels(text: str) -> list[int]:
    """'1-3' -> [1, 2, 3]; '1,3' or '1+3' -> [1, 3]; '2' -> [2]."""
    levels: list[int] = []
    for part in str(text).replace("+", ",").split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            chosen = range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise UsageError(f"toy: levels: expected e.g. 1-3, 2 or 1+3, got {text!r}") from None
        if not chosen or any(level not in LEVELS for level in chosen):
            raise UsageError(f"toy: levels: expected levels within {LEVELS[0]}-{LEVELS[-1]}, got {text!r}")
        levels.extend(level for level in chosen if level not in levels)
    return sorted(levels)


def parse_spec(spec: str) -> ToyConfig:
    """`toy` or `toy:split=test,n=200,levels=1-3,seed=0,error_rate=0.3` -> ToyConfig.

    Pairs are comma-separated, so a level list is written 1+3 (or 1-3); `levels=1,3` is read the same."""
    name, _, rest = spec.partition(":")
    if name != "toy":
        raise UsageError(f"{spec!r}: not a toy spec (expected toy or toy:key=value,...)")
    pairs: dict[str, str] = {}
    last = None
    for piece in (p.strip() for p in rest.split(",")):
        if not piece:
            continue
        if "=" not in piece:
            if last == "levels":  # levels=1,3: the comma belonged to the level list
                pairs["levels"] += "," + piece
                continue
            raise UsageError(f"toy spec {spec!r}: {piece!r}: expected key=value")
        key, value = (s.strip() for s in piece.split("=", 1))
        key = key.replace("-", "_")
        if key not in ("split", "n", "levels", "seed", "error_rate"):
            raise UsageError(f"toy spec {spec!r}: unknown key {key!r} (known keys: split, n, levels, seed, "
                             "error_rate)")
        if key in pairs:
            raise UsageError(f"toy spec {spec!r}: {key!r} given twice")
        pairs[key] = value
        last = key
    try:
        return resolve(ToyConfig, flags=pairs)
    except UsageError as e:
        raise UsageError(f"toy spec {spec!r}: {str(e).removeprefix('flag: ')}") from None


# ----------------------------------------------------------------------------------------------
# problems and worked solutions (pure)

def _draw(level: int, rng: random.Random) -> tuple[int, ...]:
    if level == 1:
        return rng.randint(10, 99), rng.randint(10, 99)
    if level == 2:
        return rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
    if level == 3:
        return rng.randint(2, 9), rng.randint(100, 999)
    return rng.randint(100, 999), rng.randint(100, 999), rng.randint(2, 9)


def problem_text(level: int, nums: tuple[int, ...]) -> str:
    if level == 1:
        return "Compute {} + {}.".format(*nums)
    if level == 2:
        return "Compute {} + {} + {}.".format(*nums)
    if level == 3:
        return "Compute {} * {}.".format(*nums)
    return "Compute ({} + {}) * {}.".format(*nums)


def _digits(x: int, width: int) -> list[int]:
    """Units first: 348 -> [8, 4, 3]; zero-padded to width."""
    return [x // 10 ** i % 10 for i in range(width)]


def _columns(width: int, column, slip) -> tuple[list[str], int]:
    """Units first: `column(i, carry)` gives the line's left side and its value; each line is written
    '<left> = <value>.', keeps the units digit and carries the rest; the last column is written whole."""
    lines, carry, value = [], None, 0
    for i in range(width):
        left, raw = column(i, carry)
        s = slip(raw)
        lines.append(f"{left} = {s}.")
        if i < width - 1:
            value += s % 10 * 10 ** i
            carry = s // 10
        else:
            value += s * 10 ** i
    return lines, value


def _add_columns(terms: tuple[int, ...], slip) -> tuple[list[str], int]:
    """Column addition: 37 + 48 -> ["7 + 8 = 15.", "3 + 4 + 1 = 8."], 85."""
    width = max(len(str(t)) for t in terms)
    cols = [_digits(t, width) for t in terms]

    def column(i: int, carry: int | None) -> tuple[str, int]:
        parts = [c[i] for c in cols] + ([carry] if carry is not None else [])
        return " + ".join(map(str, parts)), sum(parts)
    return _columns(width, column, slip)


def _times_columns(x: int, d: int, slip) -> tuple[list[str], int]:
    """Multiplication by one digit: 7 * 348 -> ["7 * 8 = 56.", "7 * 4 + 5 = 33.", "7 * 3 + 3 = 24."], 2436."""
    width = len(str(x))
    digits = _digits(x, width)

    def column(i: int, carry: int | None) -> tuple[str, int]:
        return f"{d} * {digits[i]}" + (f" + {carry}" if carry is not None else ""), d * digits[i] + (carry or 0)
    return _columns(width, column, slip)


def worked_solution(level: int, nums: tuple[int, ...], slip: tuple[int, int] | None = None) -> tuple[str, int]:
    """(solution text, final answer): the sum or product column by column, units first, each column
    one line with the carry it takes in, then the boxed answer. `slip` = (line, delta) adds delta to
    that line's result; later lines carry the wrong value on, as a student who misadded a column
    would, so the final answer is off by delta * 10**column."""
    counter = iter(range(10 ** 6))

    def slipped(value: int) -> int:
        if slip is None or next(counter) != slip[0]:
            return value
        return value + slip[1] if value + slip[1] >= 0 else value + 1  # no column sums to -1

    if level in (1, 2):
        lines, answer = _add_columns(nums, slipped)
    elif level == 3:
        d, x = nums
        lines, answer = _times_columns(x, d, slipped)
    else:
        a, b, d = nums
        first, total = _add_columns((a, b), slipped)
        second, answer = _times_columns(total, d, slipped)
        lines = first + [f"{a} + {b} = {total}."] + second
    return " ".join([*lines, f"The answer is \\boxed{{{answer}}}."]), answer


def num_steps(level: int) -> int:
    """Lines a slip can land on (the column lines)."""
    return {1: 2, 2: 2, 3: 3, 4: 6}[level]


def in_test_region(problem: str) -> bool:
    """A fixed split of the problem space (no seed): test problems never appear in another split."""
    digest = hashlib.sha256(f"s2d-toy-heldout:{problem}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % TEST_REGION == 0


# ----------------------------------------------------------------------------------------------
# records

def generate(cfg: ToyConfig) -> list[dict]:
    levels = parse_levels(cfg.levels)
    rng = random.Random(f"s2d-toy:{cfg.seed}:{cfg.split}")
    slip_rng = random.Random(f"s2d-toy:{cfg.seed}:{cfg.split}:slips")
    want_test = cfg.split == "test"
    seen: set[str] = set()
    records = []
    for i in range(cfg.size):
        level = levels[i % len(levels)]  # round robin: every level equally often
        for _ in range(MAX_TRIES):
            nums = _draw(level, rng)
            problem = problem_text(level, nums)
            if problem not in seen and in_test_region(problem) == want_test:
                break
        else:
            raise UsageError(f"toy: cannot draw {cfg.size} distinct {cfg.split} problems at level {level} "
                             f"(found {sum(r['level'] == level for r in records)}); lower n or add levels")
        seen.add(problem)
        solution, answer = worked_solution(level, nums)
        rec = {"id": f"toy-{cfg.split}-{i}", "problem": problem, "answer": str(answer), "level": level,
               "solution": solution}
        if cfg.split == "sft":
            corrupted = slip_rng.random() < cfg.error_rate
            slip = (slip_rng.randrange(num_steps(level)), slip_rng.choice(SLIPS))
            rec["completion"] = worked_solution(level, nums, slip)[0] if corrupted else solution
            rec["corrupted"] = corrupted
        records.append(rec)
    return records


def toy_records(spec: str) -> list[dict]:
    """Records of a `toy:...` dataset spec (see `parse_spec`); what `data.load_examples` calls."""
    return generate(parse_spec(spec))


# ----------------------------------------------------------------------------------------------
# the command

def run(cfg: ToyConfig) -> str:
    from .artifacts import _write_atomic, dumps_records, require_stdout

    records = generate(cfg)
    data = dumps_records(records)
    if cfg.out == "-":
        require_stdout("give --out a file name")
        sys.stdout.write(data.decode("utf-8"))
        sys.stdout.flush()
        return "-"
    out = Path(cfg.out)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory (--out takes a .jsonl file name or '-')")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, data)
    except OSError as e:
        raise UsageError(f"{out}: cannot write ({e.strerror})") from None
    wrong = sum(r.get("corrupted", False) for r in records)
    extra = f", {wrong} with a wrong solution" if cfg.split == "sft" else ""
    cu.console.print(f"toy: {len(records)} {cfg.split} records, levels {cfg.levels}, seed {cfg.seed}{extra}")
    print(out)
    return str(out)


def command(
    split: str = typer.Option(None, "--split", help="test, train, pool or sft."),
    n: int = typer.Option(None, "--n", help="Records (default: test 200, train 500, pool 2000, sft 2000)."),
    levels: str = typer.Option(None, "--levels", help="Difficulty levels: 1-3 (default), 2, 1,3 ... (1-4)."),
    error_rate: float = typer.Option(None, "--error-rate", help="sft only: fraction of wrong worked solutions."),
    seed: cu.SeedOpt = None,
    out: str = typer.Option(None, "--out", "-o", help="Output JSONL file ('-' or none: stdout)."),
    config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Write the synthetic arithmetic task (a split of it) as JSONL.

    Example: s2d toy --split sft --n 2000 --error-rate 0.3 --out runs/toy/sft.jsonl
    """
    flags = cu.given(split=split, n=n, levels=levels, error_rate=error_rate, seed=seed, out=out)
    cu.execute(run, lambda: resolve(ToyConfig, config_file=config, sets=set_, flags=flags))
