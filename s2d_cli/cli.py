"""The s2d command line: registers the commands, nothing else."""
from __future__ import annotations

import typer

from . import __version__, evaluate, rollout, verify
from .cliutil import S2DCommand

app = typer.Typer(
    name="s2d",
    help="Sparse-to-dense post-training: GRPO for the teacher, a dense KL bridge to the student.\n\n"
         "Stages read and write artifact directories (manifest.json + JSONL/safetensors shards); "
         "'-' reads stdin or writes stdout, so commands chain with pipes or Make.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# S2DCommand: resolved defaults in --help, --x/--no-x flags, the keys without a flag, --show-config
app.command("rollout", no_args_is_help=True, cls=S2DCommand)(rollout.command)
app.command("verify", no_args_is_help=True, cls=S2DCommand)(verify.command)
app.command("eval", no_args_is_help=True, cls=S2DCommand)(evaluate.command)


def _register_optional() -> None:
    """Commands added by later stages of the toolkit register here."""
    import importlib

    for module, name in (("grpo", "grpo"), ("kl_warmup", "kl-warmup"), ("opd", "opd"),
                         ("report", "report"), ("tiny", "make-tiny"), ("toy", "toy"), ("rollout_server", "rollout-server")):
        try:
            mod = importlib.import_module(f"s2d_cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"s2d_cli.{module}":
                raise
            continue
        app.command(name, no_args_is_help=True, cls=S2DCommand)(mod.command)


_register_optional()


def _version(value: bool):
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def main() -> None:
    """The `s2d` console script: typer's own handling, except that a malformed command line (an unknown
    option, a value of the wrong type) is one line on stderr like every other bad input, not a box."""
    import sys

    try:                            # typer >= 0.26 carries its own copy of click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover
        from click import exceptions as cx

    try:
        code = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as e:
        # typer's rich help is printed while the error is built (its message is then empty); plain click
        # carries the help text in the message. Either way the help appears once, on stdout, exit 2.
        text = e.format_message()
        if text:
            print(text)
        sys.exit(e.exit_code)
    except cx.ClickException as e:
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "s2d"
        message = " ".join(e.format_message().split())
        sys.stderr.write(f"s2d: error: {message} (see {where} --help)\n")
        sys.exit(e.exit_code)
    except typer.Abort:             # typer's own class: its copy of click has none
        sys.stderr.write("s2d: aborted\n")
        sys.exit(1)
    else:
        sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # `accelerate launch -m s2d_cli.cli ...` runs the module as a script
    main()
