"""Runs inside each vLLM worker: takes new weights from the trainer process.

vLLM mixes this class into its worker (`LLM(..., worker_extension_cls=...)`), so `self` is the worker
and `self.model_runner` its model runner. Two ways in:
- `s2d_load_weights(blob)`: safetensors bytes through `collective_rpc` (a colocated engine; a rollout
  server fed over gloo). Bytes pickle across process boundaries (multi-process / tensor-parallel
  workers), tensors do not.
- `s2d_join_weight_group` + `s2d_receive_weights`: a rollout server's weights over NCCL, straight from the
  trainer's GPU into this worker's (`weight_group.NcclWeightGroup`): every worker of the engine is a member
  and receives each whole tensor; its model's weight loaders keep this worker's tensor-parallel shard.

No vLLM import at module level: the module is imported by name inside the worker, after vLLM is up.
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
        named_tensors = load_safetensors(blob)
        self._s2d_reload(iter(named_tensors.items()))
        return len(named_tensors)

    def s2d_join_weight_group(self, host: str, port: int, world_size: int, timeout: float) -> int:
        """Join the trainer's NCCL weight group as rank 1 + this worker's rank in its engine (0..W-1, the
        tensor- and pipeline-parallel workers); returns that rank."""
        from s2d_cli.engines.weight_group import NcclWeightGroup

        rank = 1 + int(self.rank)
        self.s2d_weight_group = NcclWeightGroup((host, port), rank=rank, world_size=world_size, device=self.device,
                                                timeout=timeout)
        return rank

    def s2d_receive_weights(self, specs: list, tied_embeddings: bool) -> int:
        """Receive the tensors `specs` ([name, dtype, shape], in the order the trainer sends them) and load
        them as they arrive, in one `reload_weights` pass (a fused layer is processed once all of its parts
        are in). A tied head goes in by name too (vLLM keeps its own copy, which goes stale otherwise).
        Returns how many tensors were loaded."""
        from s2d_cli.engines.weight_group import receive

        loaded = 0

        def named_tensors():
            nonlocal loaded
            embedding, names = None, {name for name, _, _ in specs}
            for name, tensor in receive(self.s2d_weight_group, specs):
                if tied_embeddings and "lm_head.weight" not in names and name.endswith("embed_tokens.weight"):
                    embedding = tensor
                loaded += 1
                yield name, tensor
            if embedding is not None:
                loaded += 1
                yield "lm_head.weight", embedding

        self._s2d_reload(named_tensors())
        return loaded

    def _s2d_reload(self, named_tensors) -> None:
        from vllm.config import set_current_vllm_config  # vLLM is loaded in any process that calls this

        with set_current_vllm_config(self.vllm_config):      # as vLLM's own Worker.reload_weights does
            self.model_runner.reload_weights(weights_iterator=named_tensors)
