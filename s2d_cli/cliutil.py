"""What every command shares at the shell boundary: option types, error handling, consoles.

Data goes to stdout; progress, tables and messages go to stderr. A `UsageError` is one line on
stderr and exit code 2; any other failure is one line and exit code 1 (S2D_DEBUG=1 shows the
traceback).
"""
from __future__ import annotations

import contextvars
import copy
import errno
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand

from .errors import UsageError
from .outputs import forget_failure_undos, on_failure, release_locks, undo_failed  # noqa: F401

# On a terminal rich wraps long lines to its width; anywhere else (a log file, nohup, Make, CI) a line
# stays one line, so a path in it is never cut in two and grep finds it.
console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())


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
    """Build the config and run the command with s2d's error contract (or, under --show-config, print the
    config and run nothing; under --help, hand `build_config` to `S2DCommand`, which shows its defaults)."""
    captured = _CAPTURE.get()
    if captured is not None:
        captured.append(build_config)
        return None
    forget_failure_undos()
    try:
        return _execute(run, build_config)
    finally:
        release_locks()


def _execute(run: Callable[[Any], Any], build_config: Callable[[], Any]) -> Any:
    cfg = None
    try:
        if _SHOW_CONFIG.get():
            return show_config(build_config)
        quiet_libraries()
        cfg = build_config()
        return run(cfg)
    except UsageError as e:
        undo_failed()
        fail(existing_flags(str(e).splitlines()[0]) if str(e) else "bad input", 2)
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
DatasetOpt = Annotated[str | None, typer.Option("--dataset", "-d", help="math500, aime24, aime25, amc23, gsm8k, toy, a JSONL/JSON/Parquet file, '-', an artifact, a dataset folder (save_to_disk or parquet) or a hub id; folders and hub ids take :SUBSET and ,split=NAME (openai/gsm8k:main,split=test).")]
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


PROGRESS_EVERY_ENV = "S2D_PROGRESS_EVERY"
PROGRESS_EVERY_DEFAULT = 30.0


def progress_every(every: float | None = None) -> float:
    """Seconds between plain progress lines: `every` (a config key) if given, else $S2D_PROGRESS_EVERY,
    else 30; 0 turns the lines off."""
    if every is not None:
        return float(every)
    raw = os.environ.get(PROGRESS_EVERY_ENV, "")
    try:
        return float(raw) if raw.strip() else PROGRESS_EVERY_DEFAULT
    except ValueError:
        raise UsageError(f"{PROGRESS_EVERY_ENV}={raw!r}: expected a number of seconds (0: off)") from None


def progress(every: float | None = None):
    """Progress on stderr. On a terminal, a rich bar (transient, so logs stay readable). Elsewhere (nohup,
    Make, CI) a transient bar draws nothing but an empty line, and a long command would say nothing until
    it ends: there a `PlainProgress` line every `progress_every(every)` seconds instead."""
    if not console.is_terminal:
        return PlainProgress(progress_every(every))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


_clock = time.monotonic      # PlainProgress's clock (tests put a fake one here)


class PlainProgress:
    """The part of rich's Progress that s2d's commands use (add_task, advance, update), written as one plain
    line every `every` seconds for a log:

        grpo reward_mean 0.31  accuracy 0.25  loss 0.012 | step 12/100 | 1m04s elapsed, ETA 7m50s

    (the description is where the trainer puts its latest metrics). Nothing before the first `every`
    seconds, so a short command adds nothing to its log; a last line when a command that printed one ends.
    The ETA counts only the work done in this process (a resumed run's finished steps cost nothing)."""

    def __init__(self, every: float, *, stream=None, clock: Callable[[], float] | None = None):
        self.every, self.stream, self.clock = every, stream, clock or _clock
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for task in self.tasks:
                if task["lines"] and task["printed_at"] != task["completed"]:
                    self._print(task, self.clock())

    def add_task(self, description: str, total: float | None = None, completed: float = 0, unit: str = "",
                 **_) -> int:
        now = self.clock()
        self.tasks.append({"description": description, "total": total, "completed": completed, "start": now,
                           "unit": f"{unit} " if unit else "",
                           "start_completed": completed, "last": now, "lines": 0, "printed_at": None})
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, description: str | None = None, **_) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task["completed"] = completed
        if advance:
            task["completed"] += advance
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        now = self.clock()
        if self.every > 0 and now - task["last"] >= self.every:
            self._print(task, now)

    def line(self, task: dict[str, Any], now: float) -> str:
        done, total = task["completed"], task["total"]
        elapsed = now - task["start"]
        parts = [task["description"], task["unit"] + (f"{done:g}/{total:g}" if total else f"{done:g}")]
        timing = f"{_duration(elapsed)} elapsed"
        rate = (done - task["start_completed"]) / elapsed if elapsed > 0 else 0.0
        if total and rate > 0 and done < total:
            timing += f", ETA {_duration((total - done) / rate)}"
        parts.append(timing)
        return " | ".join(parts)

    def _print(self, task: dict[str, Any], now: float) -> None:
        stream = self.stream or sys.stderr
        stream.write(self.line(task, now) + "\n")
        stream.flush()
        task["last"], task["printed_at"] = now, task["completed"]
        task["lines"] += 1



# ----------------------------------------------------------------------------------------------
# The command class every s2d command is registered with (cli.py): what --help and --show-config show.
# Typer's own options default to None (a flag that was not given must not override the YAML), so its
# help would show no defaults; this class shows the resolved ones, from the command's own config path.

_CAPTURE: contextvars.ContextVar[list | None] = contextvars.ContextVar("s2d_capture", default=None)
_SHOW_CONFIG: contextvars.ContextVar[bool] = contextvars.ContextVar("s2d_show_config", default=False)
_COMMAND: contextvars.ContextVar[S2DCommand | None] = contextvars.ContextVar("s2d_command", default=None)

KEYS_PANEL_TITLE = "Config keys without a flag (--set KEY=VALUE, or KEY: VALUE in --config)"
SHOW_CONFIG_HELP = ("Print the resolved config (defaults <- --config <- --set <- flags) as YAML on stdout "
                    "and exit without running; --config reads the file back.")


def show_config(build_config: Callable[[], Any]) -> Any:
    """--show-config: the config the command would run with, as YAML on stdout; nothing runs. A config
    that is not complete enough to run (no --model yet) is still shown, with what is missing on stderr."""
    from .config import to_yaml, unvalidated

    with unvalidated():
        cfg = build_config()
    problem = None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()                      # also fills derived defaults (grpo's clip range per --loss)
        except UsageError as e:
            problem = str(e).splitlines()[0] if str(e) else "incomplete"
    command = _COMMAND.get()
    name = f"s2d {command.name}" if command is not None else "s2d"
    sys.stdout.write(to_yaml(cfg, header=f"{name}: resolved config (use it with {name} --config FILE)"))
    sys.stdout.flush()
    if problem:
        sys.stderr.write(f"s2d: note: this config does not run as it is: {existing_flags(problem)}\n")
    return cfg


def existing_flags(message: str) -> str:
    """A message naming `--some-key` where the running command has no such flag (checks shared by several
    commands name the flags of some): name the config key `some_key` instead, which --set takes."""
    command = _COMMAND.get()
    if command is None or "--" not in message:
        return message
    flags = command.flag_names()
    fields = command.config_fields()

    def name(m: re.Match) -> str:
        flag, key = m.group(0), m.group(0)[2:].replace("-", "_")
        return key if flag not in flags and key in fields else flag

    return re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", name, message)


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _mark_show_config(ctx, param, value) -> None:
    if value and not ctx.resilient_parsing:
        ctx.meta["s2d.show_config"] = True


class S2DCommand(TyperCommand):
    """One place for what every command's command line offers beyond its own options:
    - boolean flags take `--x/--no-x` (a YAML `x: true` can be switched off from the shell);
    - `--help` shows each option's default as this command line resolves it (dataclass defaults, then
      --config, --set and the other flags given before --help), and a panel of the config keys that have
      no flag, with their defaults and the comments of their dataclass fields;
    - `--show-config` prints the resolved config as YAML and runs nothing.
    The config comes from the command's own code path: its typer function is called with the parsed
    options while `execute` captures the `build_config` it is handed instead of running it."""

    _show_config_option = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_bool_flag", False) and param.expose_value and not param.secondary_opts:
                long = next((o for o in param.opts if o.startswith("--")), None)
                if long:
                    param.secondary_opts = [f"--no-{long[2:]}"]
            if getattr(param, "is_flag", False):
                param.metavar = ""         # typer would show <bool> beside a flag that takes no value

    # -- the options ------------------------------------------------------------------------------
    def get_params(self, ctx):
        params = super().get_params(ctx)
        help_option = self.get_help_option(ctx)
        if help_option is None:
            return params
        help_option.metavar = ""
        if self._show_config_option is None:
            # a copy of the help option (a flag of whatever option class this typer builds), renamed
            option = copy.copy(help_option)
            option.name, option.opts, option.secondary_opts = "show_config", ["--show-config"], []
            option.is_eager, option.callback, option.help = False, _mark_show_config, SHOW_CONFIG_HELP
            self._show_config_option = option
        rest = [p for p in params if p is not help_option and p is not self._show_config_option]
        return [*rest, self._show_config_option, help_option]

    def flag_names(self) -> set[str]:
        return {o for p in self.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}

    def parse_args(self, ctx, args):
        ctx.meta["s2d.args"] = list(args)      # --help reads the --config / --set given beside it
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        show = _SHOW_CONFIG.set(bool(ctx.meta.pop("s2d.show_config", False)))
        command = _COMMAND.set(self)
        try:
            return super().invoke(ctx)
        finally:
            _SHOW_CONFIG.reset(show)
            _COMMAND.reset(command)

    # -- the config this command line resolves to --------------------------------------------------
    def resolved_config(self, params: dict[str, Any] | None = None) -> Any:
        """The command's config built from `params` (typer's values by parameter name; None: nothing
        given) without validating it, or None (a command without a config, or one that cannot be built)."""
        from .config import unvalidated

        if params is None:
            params = {p.name: None for p in self.params if p.expose_value and p.name}
        builds: list = []
        token = _CAPTURE.set(builds)
        try:
            self.callback(**params)
            if not builds:
                return None
            with unvalidated():
                return builds[0]()
        except Exception:
            return None
        finally:
            _CAPTURE.reset(token)

    def config_fields(self) -> set[str]:
        import dataclasses

        cfg = self.resolved_config()
        return {f.name for f in dataclasses.fields(cfg)} if cfg is not None else set()

    def _help_config(self, ctx) -> Any:
        args = [a for a in ctx.meta.get("s2d.args", []) if a not in ctx.help_option_names]
        if args:
            try:
                sub = self.make_context(ctx.info_name, args, parent=ctx.parent)
                cfg = self.resolved_config(sub.params)
                if cfg is not None:
                    return cfg
            except Exception:       # a bad value beside --help: the defaults without the command line
                pass
        return self.resolved_config()

    # -- help ---------------------------------------------------------------------------------------
    def format_help(self, ctx, formatter):
        import dataclasses

        cfg = self._help_config(ctx)
        if cfg is not None:
            values = dataclasses.asdict(cfg)
            shown = {}
            for param in self.params:
                if param.name in values and values[param.name] is not None and param.expose_value:
                    shown[param.name] = values[param.name]
                    if getattr(param, "is_bool_flag", False):
                        param.default = bool(values[param.name])   # typer reads a flag's default from here
            ctx.default_map = {**(ctx.default_map or {}), **shown}
        super().format_help(ctx, formatter)
        if cfg is not None:
            self._format_config_keys(ctx, formatter, cfg)

    def _format_config_keys(self, ctx, formatter, cfg) -> None:
        import dataclasses

        from .config import field_notes

        flagged = {p.name for p in self.params}
        notes = field_notes(type(cfg))
        rows = [(f.name, _value_text(getattr(cfg, f.name)), notes.get(f.name, ""))
                for f in dataclasses.fields(cfg) if f.name not in flagged]
        if not rows:
            return
        if getattr(typer.core, "HAS_RICH", True) and getattr(self, "rich_markup_mode", None) is not None:
            from rich import box
            from rich.panel import Panel
            from rich.table import Table
            from rich.text import Text
            from typer import rich_utils

            table = Table(show_header=False, box=None, expand=True, padding=(0, 1), pad_edge=False)
            table.add_column(style="bold cyan", no_wrap=True)
            table.add_column(style="dim", max_width=24, overflow="fold")
            table.add_column(ratio=1)
            for key, value, note in rows:
                table.add_row(Text(key), Text(value), Text(note))
            out = rich_utils._get_rich_console() if hasattr(rich_utils, "_get_rich_console") else Console()
            out.print(Panel(table, title=KEYS_PANEL_TITLE, title_align="left", border_style="dim",
                            box=box.ROUNDED))
        else:
            with formatter.section(KEYS_PANEL_TITLE):
                formatter.write_dl([(f"{key} = {value}", note) for key, value, note in rows])
