"""What --help and --show-config tell a user: each option's resolved default (YAML and --set included),
--x/--no-x flags, every config key somewhere, and the resolved config as YAML that --config reads back."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest
import typer
import yaml
from typer.testing import CliRunner

from s2d_cli.cli import app
from s2d_cli.config import field_notes


def invoke(*args: str):
    # one option a line: a wide console, so "[default: ...]" is never wrapped away from its option
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})


def commands() -> dict:
    return dict(typer.main.get_command(app).commands)


def option_rows(help_text: str) -> dict[str, str]:
    """'--flag' -> the rest of its row in the options panel."""
    rows = {}
    for line in help_text.splitlines():
        m = re.match(r"^│ (--[a-z-]+)\s(.*)│$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def default_of(help_text: str, flag: str) -> str | None:
    m = re.search(r"\[default: ([^\]]*)\]", option_rows(help_text)[flag])
    return m.group(1) if m else None


def key_rows(help_text: str) -> dict[str, str]:
    """The config-keys panel: key -> its default as shown."""
    panel = help_text.split("Config keys without a flag", 1)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"^│ ([a-z_0-9]+)\s+(\S+)", panel, re.M)}


# ---------------------------------------------------------------------------------------------- defaults

def test_help_shows_the_dataclass_defaults():
    text = invoke("grpo", "--help").stdout
    # GRPOConfig: group_size 8, prompts_per_step 8, loss grpo, max_new_tokens 1024, lr 1e-6, beta 0.0;
    # TrainFields.steps 100; SamplingFields.backend auto
    assert default_of(text, "--group-size") == "8"
    assert default_of(text, "--prompts-per-step") == "8"
    assert default_of(text, "--loss") == "grpo"
    assert default_of(text, "--max-new-tokens") == "1024"
    assert default_of(text, "--lr") == "1e-06"
    assert default_of(text, "--beta") == "0.0"
    assert default_of(text, "--steps") == "100"
    assert default_of(text, "--backend") == "auto"
    assert default_of(text, "--max-labels") is None          # None: no default to show
    assert default_of(text, "--resume") == "no-resume"
    text = invoke("kl-warmup", "--help").stdout
    assert default_of(text, "--targets") == "sampled" and default_of(text, "--batch-size") == "32"


def test_help_defaults_include_the_yaml_and_set_given_beside_it(tmp_path):
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("group_size: 16\nlr: 2.0e-5\nresume: true\nsplit: validation\n")
    text = invoke("grpo", "--config", cfg, "--set", "steps=7", "--help").stdout
    assert default_of(text, "--group-size") == "16"
    assert default_of(text, "--lr") == "2e-05"
    assert default_of(text, "--steps") == "7"
    assert default_of(text, "--resume") == "resume"
    assert default_of(text, "--prompts-per-step") == "8"      # not in the file: the dataclass's
    assert key_rows(text)["split"] == "validation"           # a key without a flag, from the YAML


def test_help_defaults_follow_an_eval_protocol():
    # aime24: avg@16, 16,384 new tokens, temperature 0.6 (evaluate.PROTOCOLS)
    text = invoke("eval", "--protocol", "aime24", "--help").stdout
    assert default_of(text, "--n") == "16"
    assert default_of(text, "--max-new-tokens") == "16384"
    assert default_of(text, "--temperature") == "0.6"
    assert default_of(invoke("eval", "--help").stdout, "--n") == "1"


def test_a_missing_config_file_beside_help_still_shows_the_help():
    result = invoke("grpo", "--config", "no/such.yaml", "--help")
    assert result.exit_code == 0
    assert default_of(result.stdout, "--group-size") == "8"


# ---------------------------------------------------------------------------------------------- flags

def test_boolean_flags_have_a_negative_form_and_show_no_type():
    for name, cmd in commands().items():
        text = invoke(name, "--help").stdout
        assert "<bool>" not in text, name
        for param in cmd.params:
            if getattr(param, "is_bool_flag", False):
                long = next(o for o in param.opts if o.startswith("--"))
                assert f"--no-{long[2:]}" in text, (name, long)


def test_no_flag_switches_off_what_the_yaml_switched_on(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("logprobs: true\nforce: true\n")
    base = ["rollout", "--model", "m", "--dataset", "toy", "--config", cfg, "--show-config"]
    shown = yaml.safe_load(invoke(*base).stdout)
    assert shown["logprobs"] is True and shown["force"] is True
    shown = yaml.safe_load(invoke(*base, "--no-logprobs", "--no-force").stdout)
    assert shown["logprobs"] is False and shown["force"] is False


# ---------------------------------------------------------------------------------------------- every key

def test_every_config_key_is_an_option_or_in_the_keys_panel():
    for name, cmd in commands().items():
        if name == "rollout-server":      # a service with plain flags and no config dataclass
            continue
        cfg = cmd.resolved_config()
        assert cfg is not None, name
        text = invoke(name, "--help").stdout
        options = {p.name for p in cmd.params}
        flagless = [f.name for f in dataclasses.fields(cfg) if f.name not in options]
        if flagless:
            assert set(key_rows(text)) == set(flagless), name
        else:
            assert "Config keys without a flag" not in text, name


def test_keys_panel_shows_defaults_and_field_comments():
    text = invoke("rollout", "--help").stdout
    keys = key_rows(text)
    # RolloutConfig.shard_size 64, SamplingFields.batch_size 64, PromptFields.missing_answer "error"
    assert keys["shard_size"] == "64" and keys["batch_size"] == "64" and keys["missing_answer"] == "error"
    assert keys["max_model_len"] == "null" and keys["trust_remote_code"] == "false"
    row = next(line for line in text.splitlines() if line.startswith("│ shard_size "))
    assert "prompts per shard: the unit of resume" in row


def test_field_notes_read_end_of_line_continued_and_preceding_comments():
    @dataclass
    class Base:
        a: int = 1        # end of line
        # above b,
        # two lines
        b: str = "#"      # no: this one wins
        c: bool = False   # starts here
                          # and goes on
        d: float = 0.5

    @dataclass
    class Child(Base):
        e: int = 2        # child's own

    notes = field_notes(Child)
    assert notes == {"a": "end of line", "b": "no: this one wins", "c": "starts here and goes on",
                     "e": "child's own"}


# ---------------------------------------------------------------------------------------------- --show-config

def test_show_config_prints_the_resolved_config_and_runs_nothing(tmp_path):
    from s2d_cli.config import resolve
    from s2d_cli.grpo import GRPOConfig

    cfg = tmp_path / "stage.yaml"
    cfg.write_text("group_size: 4\nsplit: train\n")
    out = tmp_path / "run"
    args = ["--model", "m", "--dataset", "toy", "--out", out, "--config", cfg, "--set", "save_every=5",
            "--lr", "3e-5", "--loss", "dapo"]
    result = invoke("grpo", *args, "--show-config")
    assert result.exit_code == 0, result.output
    assert not out.exists() and not (tmp_path / ".run.partial").exists()
    shown = yaml.safe_load(result.stdout)
    expected = dataclasses.asdict(resolve(GRPOConfig, config_file=str(cfg), sets=["save_every=5"],
                                          flags={"model": "m", "dataset": "toy", "out": str(out), "lr": 3e-5,
                                                 "loss": "dapo"}))
    assert shown == expected
    assert shown["group_size"] == 4 and shown["save_every"] == 5 and shown["lr"] == 3e-5
    assert (shown["clip_low"], shown["clip_high"]) == (0.2, 0.28)      # dapo's clip range, filled in
    # the file reads back as the same config
    again = tmp_path / "again.yaml"
    again.write_text(result.stdout)
    assert invoke("grpo", "--config", again, "--show-config").stdout.split("\n", 1)[1] == \
        result.stdout.split("\n", 1)[1]


def test_show_config_of_an_incomplete_command_says_what_is_missing():
    result = invoke("grpo", "--show-config")
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout)["group_size"] == 8
    assert result.stderr == "s2d: note: this config does not run as it is: missing required option --model\n"


def test_show_config_with_an_unknown_key_is_the_usual_error():
    result = invoke("rollout", "--set", "shard_sise=3", "--show-config")
    assert result.exit_code == 2 and result.stdout == ""
    assert "did you mean 'shard_size'" in result.stderr


# ---------------------------------------------------------------------------------------------- messages

@pytest.mark.parametrize("args, message", [
    # check_sampling is shared: grpo has no --n flag, so its message names the key --set takes
    (["grpo", "--model", "m", "--dataset", "toy", "--out", "o", "--set", "n=0"],
     "s2d: error: n: expected >= 1, got 0"),
    (["rollout", "--model", "m", "--dataset", "toy", "--n", "0"],
     "s2d: error: --n: expected >= 1, got 0"),
    (["opd", "--student", "s", "--teacher", "t", "--dataset", "toy", "--out", "o", "--set", "top_k=0"],
     "s2d: error: top_k: expected -1 (off) or >= 1, got 0"),
])
def test_errors_name_only_flags_the_command_has(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.strip() == message
