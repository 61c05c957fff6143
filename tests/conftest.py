"""Shared fixtures: tiny local models (no downloads), built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("S2D_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Two intra-op threads on two shared cores spin against each other and everything else running:
    10x slower under load, and the numbers are the same with one thread. A module that trains in-process
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _release_output_locks():
    """A test that builds writers or trainers directly (not through a command) holds their output locks
    until the process ends; drop them after each test, as a command does when it ends."""
    yield
    from s2d_cli.artifacts import release_locks
    release_locks()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from s2d_cli.models import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Random-init Qwen3 shape, hidden 64, 2 layers, untied head."""
    from s2d_cli.models import build_tiny_model, load_tokenizer

    return build_tiny_model(tmp_path_factory.mktemp("m") / "qwen3", arch="qwen3",
                            tokenizer=load_tokenizer(str(tokenizer_dir)), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from s2d_cli.models import build_tiny_model, load_tokenizer

    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama",
                            tokenizer=load_tokenizer(str(tokenizer_dir)), seed=1, tie_word_embeddings=True)


# Logits that are hidden @ W^T times a constant: Granite divides by logits_scaling (and scales its
# embeddings, residuals and attention too), Cohere multiplies by logit_scale (tied head). Hidden 64 in
# 2 heads of 32, what vLLM's CPU attention accepts.
SCALED_HEADS = {
    "granite": dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1),
    "cohere": dict(logit_scale=2.0, tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def scaled_head_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A tiny Granite and a tiny Cohere checkpoint on the test tokenizer (see SCALED_HEADS)."""
    from s2d_cli.models import build_tiny_model, load_tokenizer

    root, tok = tmp_path_factory.mktemp("scaled"), load_tokenizer(str(tokenizer_dir))
    return {arch: build_tiny_model(root / arch, arch=arch, tokenizer=tok, seed=2, num_heads=2, num_kv_heads=1, **extra)
            for arch, extra in SCALED_HEADS.items()}


# The longest files first (about in order of their wall time on 2 cores): `make test` runs two pytest
# workers (xdist, whole files per worker, --no-loadscope-reorder), and starting the long ones first keeps
# one worker from being left with a 5-minute file at the end. Order within a file is kept.
LONGEST_FIRST = ("test_rollout_server.py", "test_demo.py", "test_lora.py", "test_scaleout.py",
                 "test_served_teacher.py", "test_grpo.py", "test_artifacts.py", "test_adversarial_artifacts.py",
                 "test_opd.py", "test_eval.py", "test_engines.py", "test_kl_warmup.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: file order kept otherwise
