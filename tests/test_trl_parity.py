"""s2d's GRPO losses equal TRL's on the same batch, with TRL's number computed by TRL's own code.

The TRL side is `GRPOTrainer._compute_loss(model, inputs)`: the function TRL's training step calls once
`_generate_and_score_completions` has built the batch dict (left-padded prompts, right-padded
completions, advantages, old log-probs). It computes its own per-token log-probs (its fused chunked
lm head over the padded batch) and its own normalisation. The s2d side is what `s2d grpo` runs: packed
micro-batches (`trainer.pack` + `hidden_at`, in both layouts: padded rows, and the CPU's shared-prompt
rows of `s2d_cli.attention`), `losses.chunked_token_logprobs`, and `grpo.policy_loss` with global
normalisers, summed over micro-batches.

Name mapping (TRL 1.x `loss_type` -> s2d `--loss`), checked below to 1e-5 on the loss and 1e-4
(relative) on every parameter's gradient:
  grpo     per-sequence token mean, then mean over sequences                  -> grpo
  dr_grpo  token sum / (sequences x max_completion_length)                     -> dr_grpo (max_new_tokens)
  dapo     token sum / tokens in the generation batch (1 process, no accumulation) -> dapo
  bnpo     token mean over the local batch (the same number here)              -> dapo
Clip ranges are s2d's per-loss defaults, given to TRL as epsilon_low / epsilon_high. Advantages are an
input on both sides: the two differ in how they compute them (TRL: unbiased std, eps 1e-4; s2d:
population std by default, `group_advantages(correction=1, eps=1e-4)` reproduces TRL's).

trl is in the dev extra, so `make test` runs this; it is skipped only where trl is not installed.
"""
from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402

from s2d_cli import attention  # noqa: E402
from s2d_cli.grpo import CLIP_DEFAULTS, GRPOConfig, policy_loss  # noqa: E402
from s2d_cli.losses import chunked_token_logprobs  # noqa: E402
from s2d_cli.models import load_model, load_tokenizer  # noqa: E402
from s2d_cli.trainer import Sequence, hidden_at, pack  # noqa: E402

MAX_NEW = 12
GROUP = 3
ADV = [1.2, -0.4, -0.8, 0.5, 0.0, -0.5]                  # 2 prompts x 3 completions, not zero-mean overall


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir, tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    tok = load_tokenizer(str(tiny_model_dir))
    tok.padding_side = "left"
    args = TRLConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(ADV), num_generations=GROUP, max_completion_length=MAX_NEW,
                     beta=0.0, save_strategy="no", model_init_kwargs={"dtype": "float32"})
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "1+1"}] * GROUP),
                          processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1   # set by Trainer.train's loop, which we do not enter
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """Prompts of different lengths, completions of different lengths, and old log-probs that put some
    ratios outside every clip range (so clipping and the normalisers both matter)."""
    tok = load_tokenizer(str(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    prompts = [tok("What is 12 + 30?")["input_ids"], tok("Add 7 and 5, then double it.")["input_ids"]]
    lengths = [12, 3, 7, 1, 12, 9]
    seqs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, len(tok), (n,), generator=g).tolist()
        seqs.append(Sequence(list(prompts[i // GROUP]), ids, scalars={"adv": ADV[i], "weight": 1.0}))
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        (mb,) = pack(seqs, 10_000)
        logp_M, _ = chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets)
    noise_M = 0.4 * torch.randn(logp_M.shape, generator=g)
    old_M = logp_M + noise_M
    for k, s in enumerate(mb.sequences):
        s.token_data["old_logp"] = old_M[mb.seq_idx == k]
    return seqs, tok.pad_token_id


def trl_inputs(seqs: list[Sequence], pad_id: int) -> dict:
    pl, cl = max(len(s.prompt_ids) for s in seqs), max(len(s.completion_ids) for s in seqs)
    b = len(seqs)
    out = {"prompt_ids": torch.full((b, pl), pad_id), "prompt_mask": torch.zeros(b, pl, dtype=torch.long),
           "completion_ids": torch.full((b, cl), pad_id), "completion_mask": torch.zeros(b, cl, dtype=torch.long),
           "old_per_token_logps": torch.zeros(b, cl), "advantages": torch.tensor(ADV)}
    for i, s in enumerate(seqs):
        p, c = s.prompt_ids, s.completion_ids
        out["prompt_ids"][i, pl - len(p):] = torch.tensor(p)
        out["prompt_mask"][i, pl - len(p):] = 1
        out["completion_ids"][i, :len(c)] = torch.tensor(c)
        out["completion_mask"][i, :len(c)] = 1
        out["old_per_token_logps"][i, :len(c)] = s.token_data["old_logp"]
    out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


def s2d_loss_and_grads(model_dir, seqs: list[Sequence], loss: str, budget: int, layout: str):
    cfg = GRPOConfig(model="m", out="o", dataset="d", loss=loss, max_new_tokens=MAX_NEW)
    cfg.validate()
    lm = load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    if layout == "shared":
        attention.enable(lm)
    lm.train()
    n_seq, n_tok = float(len(seqs)), float(sum(len(s.completion_ids) for s in seqs))
    total = 0.0
    micro = pack(seqs, budget, layout=layout)
    for mb in micro:
        logp_M, _ = chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets)
        loss_mb, _ = policy_loss(cfg, mb.to_BT(logp_M), mb.to_BT(mb.token_data["old_logp"]),
                                 mb.scalars["adv"], mb.mask_BT(), None, n_seq, n_tok)
        loss_mb.backward()
        total += float(loss_mb.detach())
    return total, {n: p.grad.clone() for n, p in lm.named_parameters()}, len(micro)


@pytest.mark.parametrize("layout", ["padded", "shared"])
@pytest.mark.parametrize("trl_loss,s2d_loss,budget", [
    ("grpo", "grpo", 10_000), ("dr_grpo", "dr_grpo", 10_000), ("dapo", "dapo", 10_000), ("bnpo", "dapo", 10_000),
    ("grpo", "grpo", 40), ("dapo", "dapo", 40),     # several micro-batches: the global normalisers add up
])
def test_grpo_loss_matches_trl(trl_trainer, batch, tiny_model_dir, trl_loss, s2d_loss, budget, layout):
    seqs, pad_id = batch
    lo, hi = CLIP_DEFAULTS[s2d_loss]
    trainer = trl_trainer
    trainer.loss_type, trainer.epsilon_low, trainer.epsilon_high = trl_loss, lo, hi
    trainer.model.zero_grad(set_to_none=True)
    trl_loss_value = trainer._compute_loss(trainer.model, trl_inputs(seqs, pad_id))
    trl_loss_value.backward()
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters()}

    s2d_value, s2d_grads, num_micro = s2d_loss_and_grads(tiny_model_dir, seqs, s2d_loss, budget, layout)
    assert (num_micro == 1) == (budget == 10_000)
    assert abs(float(trl_loss_value)) > 1e-3                       # not a trivially zero loss
    assert s2d_value == pytest.approx(float(trl_loss_value), abs=1e-5)
    for name, g in s2d_grads.items():
        ref = trl_grads[name]
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-6 * max(1.0, float(ref.abs().max()))), name
