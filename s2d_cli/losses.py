"""Loss functions for every s2d regime, as pure tensor functions (no model, no I/O).

The paper's regimes are one family that differs in reward density:

- sparse sequence reward -> group advantage -> clipped policy gradient:
  `group_advantages`, `grpo_loss`, `dr_grpo_loss`, `dapo_loss`, `gspo_loss`, plus `kl_term` (k3 in
  the loss) or `kl_reward_advantages` (k1 in the reward), `truncated_is_weights` and
  `zero_variance_groups` for the caller to compose;
- dense targets on teacher data (kl-warmup): `forward_kl_sampled`, `forward_kl_topk`, `chunked_kl`,
  and `fused_kl_loss` (the same full-vocabulary KL with its gradient computed in the forward pass);
- dense per-token reward from the teacher on student samples (opd): `opd_sampled_loss` (sampled reverse
  KL as an advantage), `fused_kl_loss(direction="reverse")` and `reverse_kl_topk` (exact / top-K), and
  `reverse_kl_on_support` (top-K on the teacher's ids: what a served teacher returns, `topk_logprobs`).

Conventions. Shapes are suffixes: B sequences, T tokens, P prompts, G group size, N flattened positions,
H hidden size, V vocabulary, K top-K, C chunk. `mask_BT` is 1 (or True) on completion tokens; every
masked position is excluded with `torch.where`, so padding holding -inf or garbage never leaks a NaN
into the loss or its gradient. Loss functions return `(loss, metrics)` with metrics as detached Python
floats; per-position functions return a tensor and leave the reduction to the caller.

Memory. Nothing here materialises `[N, V]` logits for all positions: the KLs and log-probs over the
vocabulary come from the chunked lm-head kernels of `s2d_cli.heads` (re-exported here), which compute a
chunk's logits at a time from the final hidden states and recompute them in backward.

Deliberately left out: value functions / GAE, entropy bonuses (the entropy is reported, not trained),
fused Triton kernels (liger-kernel can replace `chunked_token_logprobs` on GPUs), and any reduction
across data-parallel ranks -- pass `num_sequences` / `num_tokens` to use a global normaliser.
"""
from __future__ import annotations

import torch

# The chunked lm-head kernels, re-exported: the loss functions' callers import them from here.
from .heads import (  # noqa: F401
    TINY,
    chunked_kl,
    chunked_token_logprobs,
    forward_kl_topk,
    fused_kl_loss,
    reverse_kl_on_support,
    reverse_kl_topk,
    reverse_kl_topk_and_logprobs,
    topk_logprobs,
)

# ----------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------

def masked_sum(x_BT: torch.Tensor, mask_BT: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of x over positions where mask is set; masked positions may hold inf/NaN (they are dropped)."""
    x_BT = torch.where(mask_BT.bool(), x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))
    return x_BT.sum() if dim is None else x_BT.sum(dim)


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(mask * x) / max(sum(mask), 1), over everything (dim=None) or along `dim`."""
    count = mask_BT.bool().sum() if dim is None else mask_BT.bool().sum(dim)
    return masked_sum(x_BT, mask_BT, dim) / count.clamp_min(1).to(x_BT.dtype)


def _metric(x: torch.Tensor) -> torch.Tensor:
    """A metric as a detached float32 0-d tensor, left on its device: the trainer turns a step's metrics
    into floats with one host sync after the last micro-batch (a float() per metric would stall the
    CPU on the GPU in every micro-batch). Compares like a float (`m["clip_frac"] == 0.0`)."""
    return x.detach().float()


# ----------------------------------------------------------------------------------------------------
# sparse sequence reward: group advantages and policy-gradient surrogates
# ----------------------------------------------------------------------------------------------------

def group_advantages(
    rewards_PG: torch.Tensor, *, scale: str = "std", eps: float = 1e-6, correction: int = 0
) -> torch.Tensor:
    """Group-relative advantages for P prompts with G completions each.

        scale="std":  A = (r - mean_G r) / (std_G r + eps)     (GRPO)
        scale="none": A =  r - mean_G r                         (Dr. GRPO: no std division)

    The std is the population std (`correction=0`, divide by G) by default; TRL and the DeepSeekMath
    code use the unbiased std (`correction=1`, divide by G-1), which gives advantages smaller by
    sqrt((G-1)/G). A group whose rewards are all equal gets advantage 0 under both scales.
    """
    mean_P1 = rewards_PG.mean(-1, keepdim=True)
    adv_PG = rewards_PG - mean_P1
    if scale == "std":
        return adv_PG / (rewards_PG.std(-1, keepdim=True, correction=correction) + eps)
    if scale == "none":
        return adv_PG
    raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")


def zero_variance_groups(rewards_PG: torch.Tensor, *, tol: float = 0.0) -> torch.Tensor:
    """True for groups whose rewards are all equal (max - min <= tol): they carry no GRPO signal.

    DAPO's dynamic sampling keeps only the others: `keep_P = ~zero_variance_groups(rewards_PG)`.
    """
    return (rewards_PG.amax(-1) - rewards_PG.amin(-1)) <= tol


def truncated_is_weights(
    old_logp_BT: torch.Tensor, rollout_logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance weights for trainer/sampler mismatch (e.g. vLLM bf16 vs trainer fp32).

        w_t = min(exp(old_logp_t - rollout_logp_t), cap)        detached; 1 on masked positions

    `old_logp` is the trainer's log-prob of the sampled token before the update, `rollout_logp` the
    sampler's. Multiply the per-token policy-gradient loss by w (the `is_weight_BT` argument).
    """
    with torch.no_grad():
        diff_BT = torch.where(mask_BT.bool(), old_logp_BT - rollout_logp_BT, 0.0)
        return diff_BT.exp().clamp(max=cap).to(old_logp_BT.dtype)


def kl_penalty(
    logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from the sampled tokens' log-probs; 0 on masked positions.

        k1 = logp - ref_logp
        k2 = (logp - ref_logp)^2 / 2
        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1       (>= 0; GRPO's choice)

    As *values*, k1 and k3 are unbiased for KL(pi || pi_ref) on tokens sampled from pi (k3 with the
    lower variance: it is k1 plus the zero-mean control variate rho - 1, rho = pi_ref / pi); k2 is
    biased. As *loss terms*, differentiated through `logp` with the sampled tokens held fixed, their
    expected gradients on-policy are (per sampled context, E over y ~ pi):

        k1: E[grad logp]                    = 0                          (no signal at all)
        k2: E[(logp - ref_logp) grad logp]  = grad KL(pi || pi_ref)
        k3: E[(1 - rho) grad logp]          = -E_ref[grad logp] = grad KL(pi_ref || pi)

    so k3 in the loss (DeepSeekMath) regularises the *forward* KL; times the importance ratio
    pi / pi_old (differentiable, value 1 on-policy: `kl_term(..., estimator="k3_is")`) it follows
    grad KL(pi || pi_ref). k1 belongs in the reward (`kl_reward_advantages`), where
    E[(logp - ref_logp) grad logp] = grad KL(pi || pi_ref). `tests/test_losses.py` checks all of this
    by exact enumeration on a small categorical policy.
    """
    log_ratio_BT = torch.where(mask_BT.bool(), ref_logp_BT - logp_BT, 0.0)
    if estimator == "k1":
        return -log_ratio_BT
    if estimator == "k2":
        return 0.5 * log_ratio_BT.square()
    if estimator == "k3":
        return log_ratio_BT.exp() - log_ratio_BT - 1.0
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def kl_term(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k3",
) -> torch.Tensor:
    """The KL-to-reference term of GRPO's per-token loss, beta * KL estimate; 0 on masked positions.

        k3:     beta * k3_t                                  (DeepSeekMath; TRL use_bias_correction_kl=False)
        k3_is:  beta * k3_t * exp(logp_t - old_logp_t)        (DeepSeek-V3.2; TRL 1.16's default)

    Pass it as `kl_term_BT` to a policy loss, which adds it to each token's loss (outside the clip and
    the truncated IS weight) before its own normaliser. Expected gradient on-policy: k3 follows
    beta * grad KL(pi_ref || pi), k3_is beta * grad KL(pi || pi_ref): the ratio's value is 1 there, but
    its gradient adds k3_t grad logp_t, which turns E[(1 - rho) grad logp] into
    E[(k3 + 1 - rho) grad logp] = E[-log(rho) grad logp]. See `kl_penalty`; k1 goes in the reward.
    """
    k3_BT = kl_penalty(logp_BT, ref_logp_BT, mask_BT, estimator="k3")
    if estimator == "k3":
        return beta * k3_BT
    if estimator == "k3_is":
        ratio_BT = torch.where(mask_BT.bool(), logp_BT - old_logp_BT, 0.0).exp()
        return beta * k3_BT * ratio_BT
    raise ValueError(f"estimator must be 'k3' or 'k3_is' (k1 goes in the reward), got {estimator!r}")


def kl_reward_advantages(
    adv_B: torch.Tensor, old_logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """k1 as a per-token reward: A_bt = A_b - beta * (old_logp_t - ref_logp_t), detached; 0 off the mask.

    `old_logp` is the log-prob under the policy that sampled (a reward is fixed at sampling time, so
    later update epochs see the same advantages); on-policy it equals the current one. Pass the [B, T]
    result as the advantage of a policy loss. On-policy the gradient of -A_bt r_t is
    -A_b grad logp_t + beta (logp_t - ref_logp_t) grad logp_t, whose second part has expectation
    beta * grad KL(pi || pi_ref) at each sampled context. Like the loss terms, it is the KL at the
    contexts sampled (each token's own term, not the sum to the end of the sequence), so it does not
    follow how the policy changes which contexts it visits. The penalty enters the clip with A_b.
    """
    with torch.no_grad():
        k1_BT = kl_penalty(old_logp_BT, ref_logp_BT, mask_BT, estimator="k1")
        adv_BT = adv_B.to(k1_BT.dtype)[:, None] - beta * k1_BT
        return torch.where(mask_BT.bool(), adv_BT, 0.0)


def _adv_BT(adv: torch.Tensor, like_BT: torch.Tensor) -> torch.Tensor:
    """Advantages as [B, T]: one per sequence ([B], broadcast) or one per token ([B, T])."""
    adv = adv.to(like_BT.dtype)
    return adv[:, None].expand_as(like_BT) if adv.dim() == 1 else adv


def _ppo_token_terms(logp_BT, old_logp_BT, adv_B, mask_BT, clip_low, clip_high, is_weight_BT, kl_term_BT):
    """Per-token PPO loss -min(r A, clip(r, 1-cl, 1+ch) A) (times the IS weight) + the KL term, 0 off
    the mask."""
    m_BT = mask_BT.bool()
    ratio_BT = torch.where(m_BT, logp_BT - old_logp_BT, 0.0).exp()
    adv_BT = _adv_BT(adv_B, ratio_BT)
    surrogate_BT = torch.minimum(ratio_BT * adv_BT, ratio_BT.clamp(1 - clip_low, 1 + clip_high) * adv_BT)
    loss_BT = -surrogate_BT if is_weight_BT is None else -surrogate_BT * is_weight_BT
    if kl_term_BT is not None:
        loss_BT = loss_BT + kl_term_BT
    loss_BT = torch.where(m_BT, loss_BT, 0.0)
    with torch.no_grad():
        # tokens whose gradient the clip zeroes: ratio past the bound in the direction A pushes it
        low_BT = (ratio_BT < 1 - clip_low) & (adv_BT < 0)
        high_BT = (ratio_BT > 1 + clip_high) & (adv_BT > 0)
        metrics = {
            "clip_frac": _metric(masked_mean((low_BT | high_BT).float(), m_BT)),
            "clip_low_frac": _metric(masked_mean(low_BT.float(), m_BT)),
            "clip_high_frac": _metric(masked_mean(high_BT.float(), m_BT)),
            "ratio_mean": _metric(masked_mean(ratio_BT, m_BT)),
            "ratio_max": _metric(torch.where(m_BT.any(), torch.where(m_BT, ratio_BT, 0.0).max(), 1.0))
            if m_BT.numel() else 1.0,
        }
    return loss_BT, metrics


def grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    is_weight_BT: torch.Tensor | None = None,
    kl_term_BT: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Original GRPO: PPO-clipped surrogate, token mean per sequence, then mean over sequences.

        r_t = exp(logp_t - old_logp_t)
        l_t = -min(r_t A_b, clip(r_t, 1 - clip_low, 1 + clip_high) A_b) * w_t + kl_t
        loss = (1 / B) sum_b (1 / |o_b|) sum_{t in o_b} l_t

    w = `is_weight_BT` (truncated IS weights, or 1), kl = `kl_term_BT` (`kl_term`: beta * k3, or 0):
    the KL term shares each loss's own normaliser, as in DeepSeekMath and TRL. `adv_B` is one
    advantage per sequence [B], or one per token [B, T] (`kl_reward_advantages`), in every loss.
    B is `num_sequences` if given (global count under gradient accumulation), else the batch size.
    Long sequences get less weight per token -- the length bias Dr. GRPO removes.
    """
    loss_BT, metrics = _ppo_token_terms(logp_BT, old_logp_BT, adv_B, mask_BT, clip_low, clip_high,
                                        is_weight_BT, kl_term_BT)
    per_seq_B = loss_BT.sum(-1) / mask_BT.bool().sum(-1).clamp_min(1).to(loss_BT.dtype)
    loss = per_seq_B.sum() / (num_sequences or logp_BT.shape[0])
    return loss, metrics


def dr_grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    max_len: int,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    is_weight_BT: torch.Tensor | None = None,
    kl_term_BT: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr. GRPO: the same per-token terms (KL term included), summed and divided by a constant B * max_len.

        loss = sum_{b,t} l_t / (B * max_len)

    `max_len` is the generation budget (max new tokens), not the longest sequence in the batch, so the
    normaliser does not change with the batch. Pair with `group_advantages(..., scale="none")`.
    """
    loss_BT, metrics = _ppo_token_terms(logp_BT, old_logp_BT, adv_B, mask_BT, clip_low, clip_high,
                                        is_weight_BT, kl_term_BT)
    loss = loss_BT.sum() / ((num_sequences or logp_BT.shape[0]) * max_len)
    return loss, metrics


def dapo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    is_weight_BT: torch.Tensor | None = None,
    kl_term_BT: torch.Tensor | None = None,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO: asymmetric clip ("clip-higher", 0.2 / 0.28) and a token-level mean over the whole batch.

        loss = sum_{b,t} l_t / sum_{b,t} mask_t          (l_t as in `grpo_loss`, KL term included)

    `num_tokens` replaces the denominator (global token count under gradient accumulation). Drop the
    groups flagged by `zero_variance_groups` before calling (dynamic sampling).
    """
    loss_BT, metrics = _ppo_token_terms(logp_BT, old_logp_BT, adv_B, mask_BT, clip_low, clip_high,
                                        is_weight_BT, kl_term_BT)
    denom = num_tokens if num_tokens is not None else mask_BT.bool().sum().clamp_min(1).to(loss_BT.dtype)
    return loss_BT.sum() / denom, metrics


def gspo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    is_weight_BT: torch.Tensor | None = None,
    kl_term_BT: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: one importance ratio per sequence, the geometric mean of the token ratios.

        s_b = exp((1 / |o_b|) sum_t (logp_t - old_logp_t))
        loss = (1 / B) sum_b [-min(s_b A_b, clip(s_b, 1 - clip_low, 1 + clip_high) A_b) + (1 / |o_b|) sum_t kl_t]

    Computed as GSPO-token (s_b,t = sg[s_b] exp(logp_t - sg[logp_t]), token mean per sequence), which
    has the same value and, with one advantage per sequence, the same gradient:
    d loss / d logp_t = -A_b s_b / (|o_b| B) while unclipped, 0 once clipped. The token form is where a
    truncated importance weight w_t (vLLM rollouts) multiplies each token's term, as in the other losses,
    where per-token advantages A_bt (the k1 KL in the reward) enter, and where the KL term `kl_term_BT`
    is added with GRPO's normaliser (TRL's GSPO: importance_sampling_level="sequence", loss_type="grpo").
    A sequence with no unmasked token (weight 0) adds nothing, to the value or the gradient.
    """
    m_BT = mask_BT.bool()
    log_s_B = masked_mean(logp_BT - old_logp_BT, m_BT, dim=-1)
    s_B = log_s_B.exp()
    lp_BT = torch.where(m_BT, logp_BT, torch.zeros((), dtype=logp_BT.dtype, device=logp_BT.device))
    s_BT = s_B.detach()[:, None] * torch.exp(lp_BT - lp_BT.detach())
    adv_BT = _adv_BT(adv_B, s_BT)
    surrogate_BT = torch.minimum(s_BT * adv_BT, s_BT.clamp(1 - clip_low, 1 + clip_high) * adv_BT)
    if is_weight_BT is not None:
        surrogate_BT = surrogate_BT * is_weight_BT.to(surrogate_BT.dtype)
    if kl_term_BT is not None:
        surrogate_BT = surrogate_BT - kl_term_BT
    surrogate_B = masked_sum(surrogate_BT, m_BT, dim=-1) / m_BT.sum(-1).clamp_min(1).to(surrogate_BT.dtype)
    loss = -surrogate_B.sum() / (num_sequences or logp_BT.shape[0])
    with torch.no_grad():
        seq_adv_B = masked_mean(adv_BT, m_BT, dim=-1)     # the sequence's advantage (its mean, if per token)
        low_B = (s_B < 1 - clip_low) & (seq_adv_B < 0)
        high_B = (s_B > 1 + clip_high) & (seq_adv_B > 0)
        metrics = {
            "clip_frac": _metric((low_B | high_B).float().mean()),
            "clip_low_frac": _metric(low_B.float().mean()),
            "clip_high_frac": _metric(high_B.float().mean()),
            "ratio_mean": _metric(s_B.mean()),
            "ratio_max": _metric(s_B.max()),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# dense token-level teacher supervision
# ----------------------------------------------------------------------------------------------------

def forward_kl_sampled(
    student_logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, num_tokens: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Monte-Carlo forward KL on teacher-sampled tokens: cross-entropy, token mean over the batch.

        loss = -sum_{b,t} logp_student(y_t) / #tokens        (= KL(p_t || p_s) + H(p_t), up to sampling)
    """
    denom = num_tokens if num_tokens is not None else mask_BT.bool().sum().clamp_min(1).to(student_logp_BT.dtype)
    loss = -masked_sum(student_logp_BT, mask_BT) / denom
    nll = _metric(loss)
    return loss, {"nll": nll, "ppl": nll.clamp_max(50.0).exp()}



def discounted_future_sum(x_BT: torch.Tensor, mask_BT: torch.Tensor, discount: float) -> torch.Tensor:
    """y_t = sum_{s >= t} discount^(s - t) x_s over masked positions of the same sequence; 0 off-mask.

    Masked-out positions contribute 0 but do not break the chain (a tool-output span inside a
    completion is skipped over). discount = 0 returns x on the mask.
    """
    m_BT = mask_BT.bool()
    x_BT = torch.where(m_BT, x_BT, 0.0)
    if discount == 0.0:
        return x_BT
    out_BT = torch.empty_like(x_BT)
    running_B = torch.zeros_like(x_BT[:, 0])
    for t in range(x_BT.shape[1] - 1, -1, -1):
        running_B = x_BT[:, t] + discount * running_B
        out_BT[:, t] = running_B
    return torch.where(m_BT, out_BT, 0.0)


def opd_sampled_loss(
    logp_BT: torch.Tensor,
    sampling_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    alpha_adv_B: torch.Tensor | None = None,
    discount: float = 0.0,
    num_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """On-policy distillation (tinker-cookbook): the sampled reverse KL as a per-token advantage.

        a_t   = -(sampling_logp_t - teacher_logp_t)                      (detached)
        A_t   = sum_{s >= t} discount^(s - t) a_s  +  alpha_adv_b        (discount 0: A_t = a_t)
        r_t   = exp(logp_t - sampling_logp_t)
        loss  = -sum_{b,t} r_t A_t / #tokens

    `alpha_adv_B` is an optional sequence-level advantage already multiplied by alpha (e.g.
    alpha * group_advantages of a verifier reward), broadcast to every token. At r = 1 the gradient is
    -A_t grad logp_t / #tokens, i.e. REINFORCE on the reward -log(p_s / p_t). Metric `reverse_kl` is the
    token mean of sampling_logp - teacher_logp, the Monte-Carlo estimate of KL(p_s || p_t).
    """
    m_BT = mask_BT.bool()
    with torch.no_grad():
        reverse_kl_BT = torch.where(m_BT, sampling_logp_BT - teacher_logp_BT, 0.0)
        adv_BT = discounted_future_sum(-reverse_kl_BT, m_BT, discount)
        if alpha_adv_B is not None:
            adv_BT = adv_BT + alpha_adv_B.to(adv_BT.dtype)[:, None]
        adv_BT = torch.where(m_BT, adv_BT, 0.0)
    ratio_BT = torch.where(m_BT, logp_BT - sampling_logp_BT, 0.0).exp()
    denom = num_tokens if num_tokens is not None else m_BT.sum().clamp_min(1).to(logp_BT.dtype)
    loss = -torch.where(m_BT, ratio_BT * adv_BT, 0.0).sum() / denom
    metrics = {
        "reverse_kl": _metric(masked_mean(reverse_kl_BT, m_BT)),
        "adv_mean": _metric(masked_mean(adv_BT, m_BT)),
        "ratio_mean": _metric(masked_mean(ratio_BT.detach(), m_BT)),
    }
    return loss, metrics
