"""s2d make-tiny — build a tiny random-init model with a locally trained tokenizer (no downloads).

    s2d make-tiny runs/tiny-qwen3 --arch qwen3 --hidden-size 64 --layers 2
    s2d make-tiny runs/tiny-llama --arch llama --tie

For tests, demos and pipelines on a CPU. The tokenizer is a byte-level BPE trained on arithmetic
and math prose, digits split one by one, with a ChatML chat template; both models of a pair built
with the same --tokenizer share it exactly (what kl-warmup and opd require).
"""
from __future__ import annotations

from dataclasses import dataclass

import typer

from . import cliutil as cu
from .config import resolve
from .errors import UsageError


@dataclass
class TinyConfig:
    out: str = ""
    arch: str = "qwen3"           # qwen3 | llama | granite | cohere
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int | None = None   # default 2 x hidden
    tie: bool = False             # tie the lm head to the embedding
    tokenizer: str | None = None  # reuse the tokenizer of this checkpoint/tokenizer dir
    vocab_size: int = 512         # for a newly trained tokenizer
    seed: int = 0

    def validate(self) -> None:
        if not self.out:
            raise UsageError("missing output directory")


def run(cfg: TinyConfig):
    from .models import build_tiny_model, build_tokenizer, load_model, load_tokenizer, num_parameters

    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else build_tokenizer(vocab_size=cfg.vocab_size)
    path = build_tiny_model(cfg.out, arch=cfg.arch, tokenizer=tok, seed=cfg.seed, hidden_size=cfg.hidden_size,
                            num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.kv_heads,
                            intermediate_size=cfg.intermediate_size, tie_word_embeddings=cfg.tie)
    params = num_parameters(load_model(str(path), device="cpu"))
    cu.console.print(f"built {cfg.arch} with {params:,} parameters, vocabulary {len(tok)}")
    print(path)


def command(
    out: str = typer.Argument(None, help="Output checkpoint directory."),
    arch: str = typer.Option(None, "--arch", help="qwen3, llama, granite or cohere."),
    hidden_size: int = typer.Option(None, "--hidden-size"),
    layers: int = typer.Option(None, "--layers"),
    heads: int = typer.Option(None, "--heads"),
    kv_heads: int = typer.Option(None, "--kv-heads"),
    tie: bool = typer.Option(None, "--tie", help="Tie the lm head to the embedding."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Reuse this checkpoint's tokenizer."),
    seed: cu.SeedOpt = None, config: cu.ConfigOpt = None, set_: cu.SetOpt = None,
):
    """Build a tiny random-init Qwen3/Llama/Granite/Cohere model with a local tokenizer.

    Example: s2d make-tiny runs/tiny --arch qwen3 --hidden-size 64 --layers 2
    """
    flags = cu.given(out=out, arch=arch, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads,
                     tie=tie, tokenizer=tokenizer, seed=seed)
    cu.execute(run, lambda: resolve(TinyConfig, config_file=config, sets=set_, flags=flags))
