"""s2d rollout-server: a vLLM engine on its own GPUs (or node) that samples a trainer's rollouts.

    s2d rollout-server --model runs/sft/model --host 0.0.0.0 --port 8100 --dtype bf16      # on the rollout GPUs
    s2d grpo --model runs/sft/model ... --backend server --set rollout_server=http://rollouts:8100

The trainer (`--backend server`, grpo and opd) sends each step's prompts as token ids with their per-prompt
seeds, so a completion is the one a colocated vLLM engine of the same dtype samples; after every update its
main process pushes the new weights, one tensor at a time, over a group that it hosts (`engines.weight_group`):
gloo, which this process joins and feeds its engine from (`VLLMEngine.update_weights`: every tensor-parallel
worker takes its shard), or NCCL, which every engine worker joins itself through the worker extension
(`_vllm_worker`) and receives into its GPU. The model the server starts from only fixes the architecture:
the trainer sends its own weights before the first step (a resumed run's included).

HTTP (JSON, standard library; one request at a time, since there is one engine):
  GET  /health           {"model", "tied_embeddings", "device" ("cuda"/"cpu"), "workers" (the engine's)}
  POST /generate         {"prompts": [[ids]], "sampling": {SamplingConfig fields}} -> {"groups": [[completion]]}
  POST /weights/group    {"host", "port", "timeout", "backend" ("gloo"/"nccl"), "world_size"}: join the trainer's
                         group (in the background: the trainer joins its side after the answer); NCCL wants
                         world_size = workers + 1, gloo 2
  POST /weights          {"tensors": [[name, dtype, shape], ...]}: receive those tensors by broadcast, in that
                         order, streaming them into the engine; the next request waits for the load to finish
                         and fails (500) if it did.

No authentication: bind it to a private network. Extra vLLM engine arguments: `--set key=value` (YAML values).
"""
from __future__ import annotations

import json
import sys
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Annotated

import typer


class RolloutServer:
    def __init__(self, engine, model: str):
        self.engine, self.model = engine, model
        self.group = None               # gloo: this process's member of the weight group
        self.backend: str | None = None     # the weight group's, once a trainer asked to join one
        config = engine.llm.llm_engine.vllm_config
        self.workers = int(config.parallel_config.world_size)
        self.device = "cuda" if str(getattr(config.device_config, "device_type", "cpu")) == "cuda" else "cpu"
        self.pending: threading.Thread | None = None    # a group join or a weight load running in the background
        self.failure: str | None = None

    def settle(self) -> None:
        """Wait for the background job; a failed one fails this request (once)."""
        if self.pending is not None:
            self.pending.join()
            self.pending = None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise RuntimeError(failure)

    def background(self, job, what: str) -> None:
        def run():
            try:
                job()
            except Exception as e:   # reported to the next request, which the trainer makes
                self.failure = f"{what}: {type(e).__name__}: {e}"
                print(f"rollout-server: {self.failure}", file=sys.stderr, flush=True)
        self.pending = threading.Thread(target=run, daemon=True)
        self.pending.start()

    def handle(self, path: str, body: dict | None) -> dict:
        self.settle()
        if path == "/health":
            return {"model": self.model, "tied_embeddings": self.engine.tied_embeddings, "device": self.device,
                    "workers": self.workers}
        if path == "/generate":
            from .engines import SamplingConfig

            sampling = SamplingConfig(**body["sampling"])
            groups = self.engine.generate([list(map(int, p)) for p in body["prompts"]], sampling)
            return {"groups": [[asdict(c) for c in group] for group in groups]}
        if path == "/weights/group":
            from .engines.weight_group import WeightGroup, group_size

            address, timeout = (str(body["host"]), int(body["port"])), float(body["timeout"])
            backend, world = str(body.get("backend", "gloo")), int(body.get("world_size", 2))
            if backend not in ("gloo", "nccl") or world != group_size(backend, self.workers):
                raise ValueError(f"a {backend} weight group of {world} members (this engine has {self.workers} "
                                 f"workers: gloo 2, nccl {self.workers + 1})")
            self.group, self.backend = None, backend
            if backend == "gloo":
                self.background(lambda: setattr(self, "group", WeightGroup.join(address, timeout=timeout)),
                                "joining the weight group")
            else:       # every worker joins as rank 1 + its rank in the engine
                self.background(lambda: self.engine.llm.collective_rpc(
                    "s2d_join_weight_group", args=(address[0], address[1], world, timeout)), "joining the NCCL weight group")
            return {"ok": True}
        if path == "/weights":
            if self.backend is None or (self.backend == "gloo" and self.group is None):
                raise RuntimeError("no weight group: POST /weights/group first")
            from .engines.weight_group import DTYPES, receive

            specs = [(str(n), str(d), [int(x) for x in s]) for n, d, s in body["tensors"]]
            for name, dtype, _ in specs:
                if dtype not in DTYPES:
                    raise ValueError(f"{name}: dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
            if self.backend == "gloo":
                self.background(lambda: self.engine.update_weights(receive(self.group, specs)), "receiving weights")
            else:
                self.background(lambda: self._receive_in_workers(specs), "receiving weights over NCCL")
            return {"ok": True, "tensors": len(specs)}
        raise KeyError(path)

    def _receive_in_workers(self, specs) -> None:
        """NCCL: each engine worker receives every tensor onto its GPU and loads its shard of it; the prefix
        cache's KV blocks were computed by the old weights."""
        self.engine.llm.collective_rpc("s2d_receive_weights", args=(specs, self.engine.tied_embeddings))
        self.engine.llm.reset_prefix_cache()


def serve(server: RolloutServer, host: str, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: dict | None):
            try:
                status, answer = 200, server.handle(self.path, body)
            except KeyError as e:
                status, answer = 404 if str(e).strip("'") == self.path else 400, {"message": f"bad request: {e}"}
            except (TypeError, ValueError) as e:
                status, answer = 400, {"message": f"bad request: {e}"}
            except Exception as e:
                status, answer = 500, {"message": f"{type(e).__name__}: {e}"}
            raw = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._answer(None)

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            except ValueError:
                body = None
            self._answer(body if isinstance(body, dict) else {})

        def log_message(self, *args):   # one line per request is noise at thousands of requests
            pass

    httpd = HTTPServer((host, port), Handler)
    print(f"rollout-server: {server.model} on http://{host}:{httpd.server_address[1]}", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


def command(
    model: Annotated[str, typer.Option("--model", help="Checkpoint the engine starts from (the trainer sends its weights).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8100,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (fp32 on a CPU, bf16 on a GPU), bf16, fp16 or fp32.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Engine seed (requests carry their own per-prompt seeds).")] = 0,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", help="GPUs the engine spans.")] = 1,
    gpu_memory_utilization: Annotated[float, typer.Option("--gpu-memory-utilization")] = 0.9,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="Extra vLLM engine argument, key=value.")] = [],  # noqa: B006
):
    """Serve rollouts for `grpo`/`opd --backend server` from a vLLM engine on GPUs of its own.

    Example: s2d rollout-server --model runs/sft/model --host 0.0.0.0 --port 8100
    """
    import yaml

    from .engines.vllm import VLLMEngine

    extra = {}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set: expected key=value, got {item!r}")
        extra[key] = yaml.safe_load(value)
    engine = VLLMEngine(model, seed=seed, dtype=dtype, trust_remote_code=trust_remote_code,
                        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                        **extra)
    try:
        serve(RolloutServer(engine, model), host, port)
    finally:
        engine.close()
