"""Loading and saving Hugging Face checkpoints, and building tiny local models for tests and demos.

Weights are loaded from safetensors only and `trust_remote_code` stays off unless asked for.
Checkpoints are written to a temporary directory and renamed into place, so a crash never leaves a
half-written model that a later stage would load.

Tiny models (no hub needed):

    s2d make-tiny runs/tiny --arch qwen3          # or: python -c "from s2d_cli.models import build_tiny_model; ..."

builds a byte-level BPE tokenizer trained locally (ChatML chat template, eos `<|im_end|>`, pad
`<|endoftext|>`, digits split one by one) and a random-init Qwen3, Llama, Granite or Cohere model on top
of it.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch

from .errors import UsageError
from .outputs import replace_dir  # noqa: F401  (re-exported: the trainer's and tests' name)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------
# paths, devices, dtypes

def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """"auto" is bf16 on a GPU and fp32 on a CPU (CPU bf16 matmuls are slower and less exact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    device = device or default_device()
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise UsageError(f"--dtype: expected auto, bf16, fp16 or fp32, got {dtype!r}")
    return table[dtype]


def check_model_ref(name: str, *, expect: tuple[str, ...] = ("config.json",)) -> str:
    """A local directory must exist and hold one of `expect`; anything shaped like a hub id passes through.
    A training run's directory (where TRL's output_dir would be the model) says where its model is."""
    path = Path(name).expanduser()
    try:
        exists = path.exists()
    except OSError as e:             # a symlink loop, a name too long
        raise UsageError(f"{name}: cannot read it ({e.strerror})") from None
    if exists:
        where = run_dir_model(path)
        if where:
            raise UsageError(f"{name}: a training run directory, not a model; {where}")
        if not path.is_dir() or not any((path / f).exists() for f in expect):
            raise UsageError(f"{name}: not a model directory (expected {' or '.join(expect)} inside)")
        check_weight_files(path)
        return str(path)
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") != 1
    if looks_local:
        raise UsageError(f"{name}: model directory not found")
    return name  # hub id such as "Qwen/Qwen3-1.7B"


def run_dir_model(path: Path) -> str | None:
    """'use RUN/model' when `path` is an s2d training run (its config.json is the run's config, not a
    model's); for an unfinished run, its newest checkpoint; None for anything else."""
    if not path.is_dir():
        return None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and "model_type" in config:
        return None                              # a model directory (that may hold a model/ folder too)
    if (path / "model" / "config.json").is_file():
        return f"use {path / 'model'}"
    root = path / "checkpoints"
    steps = sorted(p for p in root.glob("step-*") if (p / "config.json").is_file()) if root.is_dir() else []
    if steps:
        return f"it has no model/ yet (unfinished); its newest checkpoint is {steps[-1]}"
    return None


def check_weight_files(path: Path) -> None:
    """Every safetensors file of a model directory has a whole header (a truncated copy, an HTML error
    page or random bytes saved as model.safetensors fail here, naming the file, instead of deep inside
    transformers), and every shard its index lists is there. Reads headers only: milliseconds."""
    from safetensors import SafetensorError, safe_open

    from .artifacts import unreadable_tensors

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{index}: not a valid safetensors index ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:100]})") from None
        for shard in shards:
            if not (path / str(shard)).is_file():
                raise UsageError(f"{path / str(shard)}: missing (listed in {index.name})")
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as e:
            raise unreadable_tensors(f, e) from None


# files a tokenizer is loaded from; a model directory with none of them has no tokenizer (transformers
# would build an empty one from config.json's model type, which encodes every prompt to no tokens)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    # a checkpoint, or a tokenizer saved on its own (make-tiny --tokenizer, the test fixtures)
    ref = check_model_ref(name, expect=("config.json", "tokenizer_config.json", "tokenizer.json"))
    if Path(ref).is_dir() and not any((Path(ref) / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"{name}: no tokenizer files (expected tokenizer.json or tokenizer_config.json "
                         "inside); copy them from the model this one was trained from")
    try:
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:       # ValueError: no tokenizer file of a kind it knows
        raise UsageError(f"{name}: could not load tokenizer ({(str(e).strip().splitlines() or [''])[0]})") from None
    if not tok("1 a", add_special_tokens=False)["input_ids"]:
        raise UsageError(f"{name}: its tokenizer encodes text to no tokens (tokenizer files incomplete?)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_attn_implementation(name: str | None) -> None:
    """Refuse an attention implementation this machine cannot load, before a command writes anything."""
    if not name or name == "eager" or "/" in name:     # eager: the model's own code; "org/repo": a hub kernel
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS:
        raise UsageError(f"attn_implementation={name}: unknown; expected eager, sdpa, flex_attention, "
                         "flash_attention_2, flash_attention_3 or a name registered with transformers' AttentionInterface")
    if name.startswith("flash_attention_"):
        from transformers import utils

        available = getattr(utils, f"is_flash_attn_{name.rsplit('_', 1)[-1]}_available", None)
        if available is not None and not available():
            raise UsageError(f"attn_implementation={name}: needs a CUDA GPU and the package that provides it "
                             "(flash_attention_2: pip install flash-attn)")


def load_model(name: str, *, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None):
    """A causal LM from a local directory or hub id, safetensors only, in eval mode on `device`, with
    transformers' default attention unless `attn_implementation` names one ("sdpa", "eager",
    "flash_attention_2", ...)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    ref = check_model_ref(name)
    device = torch.device(device) if device is not None else default_device()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=resolve_dtype(dtype, device), use_safetensors=True,
            trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        raise UsageError(f"{name}: could not load model ({str(e).splitlines()[0]})") from e
    except SafetensorError as e:             # a weights file that changed since check_model_ref read it
        raise UsageError(f"{name}: could not load model ({(str(e).splitlines() or [''])[0]})") from None
    except (ImportError, ValueError) as e:       # e.g. a model type without flash-attention support
        first = (str(e).strip().splitlines() or [""])[0]
        if attn_implementation and any(w in first.lower() for w in ("attention", "attn")):
            raise UsageError(f"attn_implementation={attn_implementation}: {first}") from None
        if isinstance(e, ValueError):            # e.g. a config.json with no model type transformers knows
            raise UsageError(f"{name}: could not load model ({first[:200]})") from None
        raise
    model = model.to(device).eval()
    if device.type == "cuda" and FUSED_NORMS:
        fuse_rms_norms(model)
    from .kernels import apply_liger  # S2D_LIGER (off by default): liger-kernel's fused ops, CUDA only
    apply_liger(model, device)
    return model


# ----------------------------------------------------------------------------------------------
# one-kernel RMSNorm on GPUs

FUSED_NORMS = os.environ.get("S2D_FUSED_NORMS", "1") != "0"   # S2D_FUSED_NORMS=0: transformers' own norms


def _hf_rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _code_key(fn) -> tuple:
    c = fn.__code__
    return c.co_code, c.co_consts, c.co_names, c.co_varnames, c.co_argcount


_HF_RMS = _code_key(_hf_rms_forward)   # transformers' RMSNorm forward, kept here verbatim (no docstring)


def _fused_rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if hidden_states.dtype != w.dtype:       # e.g. float32 weights under a bf16 input: the model's own math
        return type(self).forward(self, hidden_states)
    return torch.nn.functional.rms_norm(hidden_states, w.shape, w, self.variance_epsilon)


def rms_norm_fusable(module: torch.nn.Module) -> bool:
    """Whether `module`'s class runs transformers' plain RMSNorm, `weight * (x32 * rsqrt(mean(x32^2) + eps))
    .to(dtype)`: its forward compiles to the same bytecode as `_hf_rms_forward` (Llama, Qwen2/3, Mistral,
    Granite, Phi-3 and some 120 other classes of transformers 5; not Gemma's `1 + weight`, not Cohere's
    LayerNorm). A class whose forward changes in a later transformers simply stops matching."""
    fwd = getattr(type(module), "forward", None)
    return (getattr(fwd, "__code__", None) is not None and _code_key(fwd) == _HF_RMS
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Run every plain RMSNorm of `model` (`rms_norm_fusable`) as `F.rms_norm`; returns how many.

    On CUDA `F.rms_norm` is one kernel forward and one backward (torch's `_fused_rms_norm`) in place of
    transformers' eight and about ten, which upcast the whole activation to float32 in between: for a
    Qwen3-0.6B shape (four norms a layer, two of them over every head) that is some 1,800 fewer kernel
    launches and some 150 GB less memory traffic per 10k-token training step. The statistics stay
    float32; the one difference is rounding: the weight is applied before the result is rounded to a
    half-precision input's dtype, not after (within one unit in the last place; float32 is
    bit-identical). On a CPU `F.rms_norm` is a composite of more, smaller kernels than transformers'
    own, so `load_model` fuses on CUDA only (`S2D_FUSED_NORMS=0`: never). The module keeps its class
    and weights; only its `forward` is replaced."""
    import functools

    n = 0
    for module in model.modules():
        if rms_norm_fusable(module):
            # a partial of a module-level function, not a bound method: torch.save / pickle of the model
            # would look the method up by name on the module, and copy.deepcopy rebinds it to the copy
            module.forward = functools.partial(_fused_rms_forward, module)
            n += 1
    return n


# Causal LMs whose logits are hidden @ lm_head.weight^T times a constant from their config:
# model_type -> (config field, "multiply" or "divide" as transformers applies it). s2d's chunked heads
# take the hidden states with the constant folded in (`trainer.hidden_at`): (c * hidden) @ W^T.
LOGIT_SCALES = {
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                     "granitemoe_swa", "minicpm3"), ("logits_scaling", "divide")),
    "hyperclovax": ("logits_scaling", "multiply"),        # same field as Granite, the other way round
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), ("logit_scale", "multiply")),
    "falcon_h1": ("lm_head_multiplier", "multiply"),
}
# config fields that scale the logits in some transformers model: set on a model type that is not in
# LOGIT_SCALES (or not the field listed there), such a model is refused
SCALE_FIELDS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier",
                "logits_mup_width_multiplier")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def head_scale(model) -> float:
    """The constant c with logits = c * (hidden @ lm_head.weight^T): 1 / logits_scaling for Granite,
    logit_scale for Cohere (see LOGIT_SCALES), 1.0 for a plain head."""
    cfg = _text_config(model)
    field, how = LOGIT_SCALES.get(getattr(cfg, "model_type", None), (None, None))
    value = getattr(cfg, field, None) if field else None
    if value is None:
        return 1.0
    return 1.0 / float(value) if how == "divide" else float(value)


def check_plain_head(model, name: str) -> None:
    """s2d's chunked log-prob and KL heads compute logits as (c * hidden) @ lm_head.weight^T (over
    temperature), c = `head_scale(model)`: a constant logit scale (Granite's logits_scaling, Cohere's
    logit_scale) is folded into the hidden states. A head with a bias, a final soft-cap or a scale of a
    model type not in LOGIT_SCALES computes other numbers, so such a model is refused rather than trained
    on log-probs that are not its own."""
    cfg = _text_config(model)
    head = model.get_output_embeddings()
    known = LOGIT_SCALES.get(getattr(cfg, "model_type", None), (None,))[0]
    what = None
    if head is None or not hasattr(head, "weight"):
        what = "no linear output head"
    elif getattr(head, "bias", None) is not None:
        what = "a bias on its output head"
    elif getattr(cfg, "final_logit_softcapping", None):
        what = f"final_logit_softcapping={cfg.final_logit_softcapping}"
    else:
        what = next((f"{f}={getattr(cfg, f)}" for f in SCALE_FIELDS
                     if f != known and getattr(cfg, f, None) not in (None, 1, 1.0)), None)
    if what:
        raise UsageError(f"{name}: {cfg.model_type} has {what}, which s2d's training heads do not compute "
                         "(they take logits = c * hidden @ lm_head.weight^T, c a constant: Llama, Qwen, "
                         "Mistral, Gemma 3, Granite, Cohere shapes)")


def save_checkpoint(model, tokenizer, out_dir: str | Path, *, extra_files: dict[str, dict] | None = None,
                    state_dict: dict | None = None) -> Path:
    """save_pretrained into a temp dir beside `out_dir`, then rename: readers never see half a model.
    state_dict: the tensors to save instead of the model's own (a sharded model's, gathered whole).
    A model with LoRA adapters (`s2d_cli.lora`) is saved merged, as the plain model it computes."""
    from .lora import is_lora, merged_state_dict

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    # training turns the KV cache off (Trainer); the saved model is for decoding, where it is wanted
    config = getattr(model, "config", None)
    cache_off = getattr(config, "use_cache", None) is False
    if cache_off:
        config.use_cache = True
    if state_dict is None and is_lora(model):
        state_dict = merged_state_dict(model)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    finally:
        if cache_off:
            config.use_cache = False
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, obj in (extra_files or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    replace_dir(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# tiny local models

def default_tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: arithmetic, the toy task's phrasing and some MATH prose."""
    import random

    rng = random.Random(0)
    lines = []
    words = ("Please reason step by step, and put your final answer within \\boxed{}. "
             "Compute the value of the expression. First we add, then we multiply and subtract. "
             "The answer is so the result equals. Let x be a number such that the sum of its digits "
             "is what is the remainder when divided by find the probability that a triangle has area "
             "user assistant system question solution step carry total therefore").split()
    for _ in range(3000):
        a, b = rng.randint(0, 9999), rng.randint(0, 999)
        op = rng.choice("+-*")
        lines.append(f"{a} {op} {b} = {eval(f'{a}{op}{b}')}")  # noqa: S307 - our own integers, not model output
        lines.append(" ".join(rng.choice(words) for _ in range(12)))
        lines.append(f"\\boxed{{{rng.randint(-99, 999)}}} \\frac{{{a}}}{{{b + 1}}} x^{{2}} + \\sqrt{{{b}}}")
    return lines


def build_tokenizer(corpus: list[str] | None = None, *, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained here, with digits split and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or default_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str, *, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, intermediate_size: int | None = None, tie_word_embeddings: bool = False,
                eos_token_id: int | None = None, pad_token_id: int | None = None, max_position_embeddings: int = 2048,
                **extra):
    """A small config of `arch`; `extra` sets any other field of the transformers config (attention_bias=True,
    Granite's logits_scaling=4.0, Cohere's logit_scale=0.5)."""
    from transformers import CohereConfig, GraniteConfig, LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size or 2 * hidden_size, head_dim=hidden_size // num_heads,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None)
    common.update(extra)
    classes = {"qwen3": Qwen3Config, "llama": LlamaConfig, "granite": GraniteConfig, "cohere": CohereConfig}
    if arch not in classes:
        raise UsageError(f"--arch: expected qwen3, llama, granite or cohere, got {arch!r}")
    return classes[arch](**common)


def build_tiny_model(out_dir: str | Path, *, arch: str = "qwen3", tokenizer=None, seed: int = 0,
                     **config_kwargs) -> Path:
    """Random-init `arch` model on a local tokenizer, saved as a safetensors checkpoint in `out_dir`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = tokenizer if tokenizer is not None else build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_checkpoint(model, tok, out_dir)


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
