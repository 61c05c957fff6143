"""What every command shares at the shell boundary: option types, error handling, consoles.

Data goes to stdout; progress, tables and messages go to stderr. A `UsageError` is one line on
stderr and exit code 2; any other failure is one line and exit code 1 (S2D_DEBUG=1 shows the
traceback).
"""
from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from .errors import UsageError
from .outputs import forget_failure_undos, on_failure, release_locks, undo_failed  # noqa: F401

console = Console(stderr=True)


def quiet_libraries() -> None:
    """transformers/datasets progress bars and warnings would drown our own stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # vLLM logs to stdout by default, which would corrupt `--out -` JSONL and the printed output path
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"s2d: error: {message}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def execute(run: Callable[[Any], Any], build_config: Callable[[], Any]) -> Any:
    """Build the config and run the command with s2d's error contract."""
    forget_failure_undos()
    try:
        return _execute(run, build_config)
    finally:
        release_locks()


def _execute(run: Callable[[Any], Any], build_config: Callable[[], Any]) -> Any:
    cfg = None
    try:
        quiet_libraries()
        cfg = build_config()
        return run(cfg)
    except UsageError as e:
        undo_failed()
        fail(str(e).splitlines()[0] if str(e) else "bad input", 2)
    except KeyboardInterrupt:
        sys.stderr.write("s2d: interrupted; rerun the same command to resume\n")
        raise typer.Exit(130) from None
    except BrokenPipeError as e:
        if not _stdout_closed():       # some other pipe (a reward server, a subprocess): a real failure
            undo_failed()
            fail(f"internal error: BrokenPipeError: {e} (set S2D_DEBUG=1 for the traceback)", 1)
        # the reader of stdout went away (`s2d verify ... --out - | head`): stop quietly, as Unix filters
        # do, with SIGPIPE's status; what is left to flush goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except typer.Exit:
        raise
    except Exception as e:
        undo_failed()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):   # a full disk: say where
            out = getattr(cfg, "out", None) if cfg is not None else None
            # a failed write() names no file: it was the output the command was writing, stdout for '-'
            where = e.filename or ("<stdout>" if out in (None, "-") else out)
            if where == "<stdout>":               # the exit's own flush would fail again, with a traceback
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            fail(f"{where}: {e.strerror} (errno {e.errno}); free some space or write elsewhere", 1)
        if os.environ.get("S2D_DEBUG"):
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        fail(f"internal error: {type(e).__name__}: {first} (set S2D_DEBUG=1 for the traceback)", 1)


def given(**flags) -> dict[str, Any]:
    """Flags as typer passed them; None means 'not given on the command line'."""
    return {k: v for k, v in flags.items() if v is not None}


# Shared option types: defined once, used by every command that takes them.
ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML file of config keys.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set key=value (repeatable).")]
ForceOpt = Annotated[bool | None, typer.Option("--force", help="Replace a finished output, or a partial one of another config (a partial run of this config resumes).")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Local checkpoint directory or hub id.")]
DatasetOpt = Annotated[str | None, typer.Option("--dataset", "-d", help="math500, aime24, aime25, amc23, gsm8k, toy, a JSONL/JSON/Parquet file, '-' or a hub id.")]
OutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Output directory ('-' streams JSONL to stdout).")]
NOpt = Annotated[int | None, typer.Option("--n", help="Samples per prompt.")]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", help="Completion token budget.")]
TempOpt = Annotated[float | None, typer.Option("--temperature", help="Sampling temperature (0 = greedy).")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Sample among the k likeliest tokens (-1 = off).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use only the first N prompts.")]
PromptFieldOpt = Annotated[str | None, typer.Option("--prompt-field", help="Record field holding the problem (default: problem/question/prompt/input).")]
AnswerFieldOpt = Annotated[str | None, typer.Option("--answer-field", help="Record field holding the gold answer (default: answer/gold/target/solution).")]
IdFieldOpt = Annotated[str | None, typer.Option("--id-field", help="Record field holding the prompt id (default: unique_id/id/idx/line number).")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="auto (vllm on a GPU host that has it, else hf), hf or vllm.")]
# trainers: a run directory (never '-'), and auto rollouts run on the policy in process (hf) unless vllm is asked
# eval: a directory or nothing (metrics JSON on stdout); '-' is refused, so its help must not offer it
EvalOutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Output directory (records, metrics.json); without it the metrics JSON goes to stdout.")]
RunOutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Run directory (config, metrics.jsonl, checkpoints, model).")]
TrainBackendOpt = Annotated[str | None, typer.Option("--backend", help="Rollout engine: hf (the policy itself; what auto picks), vllm (weights pushed after every update) or server (an `s2d rollout-server`, --set rollout_server=URL).")]


def progress():
    """A rich progress bar on stderr (transient, so logs stay readable). Off when stderr is not a terminal:
    there a transient bar draws nothing but leaves an empty line in the log."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
