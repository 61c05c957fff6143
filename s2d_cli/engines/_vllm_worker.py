"""Runs inside each vLLM worker: takes new weights from the trainer process.

vLLM mixes this class into its worker (`LLM(..., worker_extension_cls=...)`), so `self` is the worker
and `self.model_runner` its model runner. Weights travel as safetensors bytes: bytes pickle across
process boundaries (multi-process / tensor-parallel workers), tensors do not.

No vLLM import here: the module is imported by name inside the worker, after vLLM is up.
"""
from __future__ import annotations

from safetensors.torch import load as load_safetensors


class WeightSyncExtension:
    def s2d_load_weights(self, blob: bytes) -> int:
        """Load HF-named tensors from one safetensors blob in place; returns how many were sent.

        `reload_weights` re-runs each layer's post-load processing (the CPU backend repacks linear
        weights), which a plain `model.load_weights` would skip. A layer whose weights arrive split
        over two blobs would be processed half-filled, so the sender keeps each block in one blob.
        """
        from vllm.config import set_current_vllm_config  # vLLM is loaded in any process that calls this

        named_tensors = load_safetensors(blob)
        with set_current_vllm_config(self.vllm_config):      # as vLLM's own Worker.reload_weights does
            self.model_runner.reload_weights(weights_iterator=iter(named_tensors.items()))
        return len(named_tensors)
