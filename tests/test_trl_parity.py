"""s2d's GRPO losses equal TRL's on the same batch, with TRL's number computed by TRL's own code.

The TRL side is `GRPOTrainer._compute_loss(model, inputs)`: the function TRL's training step calls once
`_generate_and_score_completions` has built the batch dict (left-padded prompts, right-padded
completions, advantages, old log-probs). It computes its own per-token log-probs (its fused chunked
lm head over the padded batch) and its own normalisation. The s2d side is what `s2d grpo` runs: packed
micro-batches (`trainer.pack` + `hidden_at`, in both layouts: padded rows, and the CPU's shared-prompt
rows of `s2d_cli.attention`), `losses.chunked_token_logprobs`, and `grpo.policy_loss` with global
normalisers, summed over micro-batches.

Name mapping (TRL 1.x settings -> s2d config), checked below to 1e-5 on the loss and 1e-4 (relative)
on every parameter's gradient:
  loss_type grpo     per-sequence token mean, then mean over sequences                 -> --loss grpo
  loss_type dr_grpo  token sum / (sequences x max_completion_length)                    -> dr_grpo (max_new_tokens)
  loss_type dapo     token sum / tokens in the generation batch (1 process, no accumulation) -> dapo
  loss_type bnpo     token mean over the local batch (the same number here)             -> dapo
  loss_type grpo + importance_sampling_level="sequence" (TRL's GSPO recipe)             -> gspo
  use_vllm + vllm_importance_sampling_correction, mode token_truncate, clip_max C       -> is_cap C (TIS: the
      weights w_t = min(exp(old - sampler), C) multiply each token's policy term; TRL's default mode is
      sequence_mask). With GSPO only the values agree: TRL multiplies the sequence's loss by w_t at each
      token, so every token's gradient gets the sequence's mean weight; s2d's GSPO-token form weights each
      token's gradient by its own w_t, as the token-level losses do (`losses.gspo_loss`).
  beta b, use_bias_correction_kl=False (k3 in the loss, DeepSeekMath)                   -> beta b, kl_estimator k3
  beta b, use_bias_correction_kl=True (k3 x the token ratio; TRL 1.16's default)        -> kl_estimator k3_is
      (not with GSPO: TRL multiplies by the sequence ratio there, which is not the unbiased reverse-KL gradient)
  num_iterations 2 (old log-probs from the model before the update)                     -> update_epochs 2
Clip ranges are s2d's per-loss defaults, given to TRL as epsilon_low / epsilon_high. Advantages are an
input on both sides: the two differ in how they compute them (TRL: unbiased std, eps 1e-4; s2d:
population std by default, `group_advantages(correction=1, eps=1e-4)` reproduces TRL's). s2d's
`--kl-estimator k1` (the KL as a per-token reward) has no TRL GRPO counterpart; tests/test_grpo.py
checks it by exact enumeration.

trl is in the dev extra, so `make test` runs this; it is skipped only where trl is not installed.
"""
from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")

from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

from s2d_cli import attention  # noqa: E402
from s2d_cli.grpo import CLIP_DEFAULTS, GRPOConfig, policy_loss  # noqa: E402
from s2d_cli.losses import chunked_token_logprobs, truncated_is_weights  # noqa: E402
from s2d_cli.models import load_model, load_tokenizer  # noqa: E402
from s2d_cli.trainer import Sequence, Trainer, hidden_at, pack  # noqa: E402

MAX_NEW = 12
GROUP = 3
ADV = [1.2, -0.4, -0.8, 0.5, 0.0, -0.5]                  # 2 prompts x 3 completions, not zero-mean overall
NOISE = [0.4, 0.0, 0.4, 2e-4, 0.4, 0.0]                  # old log-probs' distance per sequence: GSPO's clip
                                                         # (3e-4 / 4e-4 on the sequence ratio) leaves some unclipped
BETA = 0.3
IS_CAP = 1.5
LR = 2.0                                                 # SGD between the two update epochs: ratios move ~0.3

# TRL settings (GRPOTrainer attributes; "args.x" on its args) and the s2d config keys they map to
VARIANTS = {
    "grpo": ({"loss_type": "grpo"}, {"loss": "grpo"}),
    "dr_grpo": ({"loss_type": "dr_grpo"}, {"loss": "dr_grpo"}),
    "dapo": ({"loss_type": "dapo"}, {"loss": "dapo"}),
    "bnpo": ({"loss_type": "bnpo"}, {"loss": "dapo"}),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, {"loss": "gspo"}),
}
EXTRAS = {
    "-": ({}, {}),
    "tis": ({"use_vllm": True, "vllm_importance_sampling_correction": True,
             "vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": IS_CAP},
            {"is_cap": IS_CAP}),
    "k3": ({"beta": BETA, "args.use_bias_correction_kl": False}, {"beta": BETA, "kl_estimator": "k3"}),
    "k3_is": ({"beta": BETA, "args.use_bias_correction_kl": True}, {"beta": BETA, "kl_estimator": "k3_is"}),
}


def configure(trainer, monkeypatch, variant: str, extra: str) -> dict:
    """Set TRL's side of (variant, extra) on the shared trainer for one test; return s2d's config keys."""
    (trl_v, s2d_v), (trl_x, s2d_x) = VARIANTS[variant], EXTRAS[extra]
    lo, hi = CLIP_DEFAULTS[s2d_v["loss"]]
    for key, value in {**trl_v, **trl_x, "epsilon_low": lo, "epsilon_high": hi}.items():
        target = trainer.args if key.startswith("args.") else trainer
        monkeypatch.setattr(target, key.removeprefix("args."), value)
    return {**s2d_v, **s2d_x}


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
    scale_M = torch.tensor(NOISE)[mb.seq_idx]
    old_M = logp_M + scale_M * torch.randn(logp_M.shape, generator=g)
    sampler_M = old_M + 0.3 * torch.randn(logp_M.shape, generator=g)      # vLLM's log-probs of the same tokens
    ref_M = logp_M + 0.5 * torch.randn(logp_M.shape, generator=g)         # a reference that is not the policy
    for k, s in enumerate(mb.sequences):
        at = mb.seq_idx == k
        s.token_data.update(old_logp=old_M[at], rollout_logp=sampler_M[at], ref_logp=ref_M[at])
    return seqs, tok.pad_token_id


def trl_inputs(seqs: list[Sequence], pad_id: int, old: bool = True) -> dict:
    pl, cl = max(len(s.prompt_ids) for s in seqs), max(len(s.completion_ids) for s in seqs)
    b = len(seqs)
    out = {"prompt_ids": torch.full((b, pl), pad_id), "prompt_mask": torch.zeros(b, pl, dtype=torch.long),
           "completion_ids": torch.full((b, cl), pad_id), "completion_mask": torch.zeros(b, cl, dtype=torch.long),
           "advantages": torch.tensor(ADV)}
    padded = {key: torch.zeros(b, cl) for key in ("old_logp", "rollout_logp", "ref_logp")}
    for i, s in enumerate(seqs):
        p, c = s.prompt_ids, s.completion_ids
        out["prompt_ids"][i, pl - len(p):] = torch.tensor(p)
        out["prompt_mask"][i, pl - len(p):] = 1
        out["completion_ids"][i, :len(c)] = torch.tensor(c)
        out["completion_mask"][i, :len(c)] = 1
        for key, x in padded.items():
            x[i, :len(c)] = s.token_data[key]
    mask = out["completion_mask"]
    if old:
        out["old_per_token_logps"] = padded["old_logp"]
        # TRL's _generate_and_score_completions, vllm_importance_sampling_mode="token_truncate"
        out["importance_sampling_ratio"] = torch.clamp(torch.exp((padded["old_logp"] - padded["rollout_logp"]) * mask),
                                                       max=IS_CAP)
    out["ref_per_token_logps"] = padded["ref_logp"]
    out["num_items_in_batch"] = mask.sum()
    return out


def s2d_config(keys: dict) -> GRPOConfig:
    cfg = GRPOConfig(model="m", out="o", dataset="d", max_new_tokens=MAX_NEW, **keys)
    cfg.validate()
    return cfg


def s2d_model(model_dir, layout: str):
    lm = load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    if layout == "shared":
        attention.enable(lm)
    return lm.train()


def s2d_pass(lm, micro, cfg: GRPOConfig, n_seq: float, n_tok: float, tis: bool = False):
    """What grpo's loss_fn does for each micro-batch (with `tis`, as behind a vllm engine: truncated IS
    weights from the sampler's log-probs; the reference's log-probs when beta > 0), summed; returns
    (loss, largest ratio)."""
    total, ratio_max = 0.0, 0.0
    for mb in micro:
        logp_M, _ = chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets)
        mask_BT, old_BT = mb.mask_BT(), mb.to_BT(mb.token_data["old_logp"])
        is_BT = truncated_is_weights(old_BT, mb.to_BT(mb.token_data["rollout_logp"]), mask_BT, cap=cfg.is_cap) \
            if tis else None
        ref_BT = mb.to_BT(mb.token_data["ref_logp"]) if cfg.beta > 0 else None
        loss_mb, m = policy_loss(cfg, mb.to_BT(logp_M), old_BT, mb.scalars["adv"], mask_BT, is_BT, n_seq, n_tok,
                                 ref_BT)
        loss_mb.backward()
        total += float(loss_mb.detach())
        ratio_max = max(ratio_max, float(m["ratio_max"]))
    return total, ratio_max


def s2d_loss_and_grads(model_dir, seqs: list[Sequence], keys: dict, budget: int, layout: str, tis: bool):
    cfg = s2d_config(keys)
    lm = s2d_model(model_dir, layout)
    n_seq, n_tok = float(len(seqs)), float(sum(len(s.completion_ids) for s in seqs))
    micro = pack(seqs, budget, layout=layout)
    total, _ = s2d_pass(lm, micro, cfg, n_seq, n_tok, tis)
    return total, {n: p.grad.clone() for n, p in lm.named_parameters()}, len(micro)


def assert_same(s2d_value, s2d_grads, trl_value, trl_grads):
    assert abs(float(trl_value)) > 1e-3                       # not a trivially zero loss
    assert s2d_value == pytest.approx(float(trl_value), abs=1e-5)
    for name, g in s2d_grads.items():
        ref = trl_grads[name]
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-6 * max(1.0, float(ref.abs().max()))), name


@pytest.mark.parametrize("layout", ["padded", "shared"])
@pytest.mark.parametrize("variant,extra,budget", [
    ("grpo", "-", 10_000), ("dr_grpo", "-", 10_000), ("dapo", "-", 10_000), ("bnpo", "-", 10_000),
    ("grpo", "-", 40), ("dapo", "-", 40),     # several micro-batches: the global normalisers add up
    ("gspo", "-", 10_000), ("gspo", "-", 40),
    ("grpo", "tis", 10_000), ("dapo", "tis", 40), ("gspo", "tis", 10_000),
    ("grpo", "k3", 10_000), ("dr_grpo", "k3", 40), ("dapo", "k3", 10_000), ("gspo", "k3", 40),
    ("grpo", "k3_is", 40), ("dapo", "k3_is", 10_000), ("bnpo", "k3_is", 10_000),
])
def test_grpo_loss_matches_trl(trl_trainer, batch, tiny_model_dir, monkeypatch, variant, extra, budget, layout):
    seqs, pad_id = batch
    keys = configure(trl_trainer, monkeypatch, variant, extra)
    trl_trainer.model.zero_grad(set_to_none=True)
    trl_value = trl_trainer._compute_loss(trl_trainer.model, trl_inputs(seqs, pad_id))
    trl_value.backward()
    trl_grads = {n: p.grad for n, p in trl_trainer.model.named_parameters()}

    s2d_value, s2d_grads, num_micro = s2d_loss_and_grads(tiny_model_dir, seqs, keys, budget, layout, extra == "tis")
    assert (num_micro == 1) == (budget == 10_000)
    if (variant, extra) == ("gspo", "tis"):
        # the values agree; the gradients differ by design (see the module docstring)
        assert s2d_value == pytest.approx(float(trl_value), abs=1e-5)
        return
    assert_same(s2d_value, s2d_grads, trl_value.detach(), trl_grads)


@pytest.mark.parametrize("variant,extra", [("grpo", "-"), ("dapo", "k3_is"), ("gspo", "k3"), ("dr_grpo", "k3")])
def test_two_update_epochs_match_trl(trl_trainer, batch, tiny_model_dir, monkeypatch, variant, extra):
    """update_epochs 2 against TRL's num_iterations 2, one SGD step (lr LR) between the passes on both
    sides. The old log-probs come from each side's own pass before the update -- TRL's
    `_get_per_token_logps_and_entropies` as its generation step calls it, s2d's `Trainer._store_old_logprobs`
    -- and so does the reference (the starting weights). Pass 1 is on-policy (ratio 1, KL 0); pass 2's
    ratios have moved past the clip, and its loss and gradients must agree."""
    seqs, pad_id = batch
    keys = configure(trl_trainer, monkeypatch, variant, extra)
    model = trl_trainer.model
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = trl_inputs(seqs, pad_id, old=False)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    try:
        with torch.no_grad():
            old, _, _ = trl_trainer._get_per_token_logps_and_entropies(model, ids, attn, inputs["completion_ids"].size(1))
        inputs["old_per_token_logps"] = inputs["ref_per_token_logps"] = old
        trl_values = []
        for epoch in range(2):
            model.zero_grad(set_to_none=True)
            value = trl_trainer._compute_loss(model, inputs)
            value.backward()
            trl_values.append(float(value.detach()))
            if epoch == 0:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= LR * p.grad
        trl_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])

    cfg = s2d_config(keys)
    lm = s2d_model(tiny_model_dir, "padded")
    micro = pack([Sequence(s.prompt_ids, s.completion_ids, scalars=dict(s.scalars)) for s in seqs], 40)
    Trainer._old_logprobs(SimpleNamespace(lm=lm, cfg=SimpleNamespace(chunk_size=cfg.chunk_size)), micro)
    for mb in micro:
        mb.token_data["ref_logp"] = mb.token_data["old_logp"]
    n_seq, n_tok = float(len(seqs)), float(sum(len(s.completion_ids) for s in seqs))
    s2d_values = []
    for epoch in range(2):
        lm.zero_grad(set_to_none=True)
        value, ratio_max = s2d_pass(lm, micro, cfg, n_seq, n_tok)
        s2d_values.append(value)
        if epoch == 0:
            assert ratio_max == pytest.approx(1.0, abs=1e-5)
            with torch.no_grad():
                for p in lm.parameters():
                    p -= LR * p.grad
    assert len(micro) > 1 and ratio_max > 1.3                  # pass 2 is off-policy, past every clip
    assert s2d_values[0] == pytest.approx(trl_values[0], abs=1e-5)
    assert_same(s2d_values[1], {n: p.grad for n, p in lm.named_parameters()}, torch.tensor(trl_values[1]), trl_grads)
