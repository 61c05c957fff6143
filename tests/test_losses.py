"""Tests for s2d_cli.losses: values worked out by hand in the comments, gradients against direct
autograd or a direct loop, and gradcheck in float64 where it is cheap."""
from __future__ import annotations

import math

import pytest
import torch

from s2d_cli import losses as L

E = math.exp
LN = math.log
F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


def assert_values(x, expected, atol=1e-6):
    torch.testing.assert_close(x.detach().to(F64), t64(expected), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------
# helpers and advantages
# ----------------------------------------------------------------------------------------------------

def test_masked_mean_ignores_padding_even_if_inf():
    # row 0: (1 + 3) / 2 = 2 ; row 1: 5 / 1 = 5 ; all: (1 + 3 + 5) / 3 = 3
    x = t64([[1.0, 3.0, float("inf")], [5.0, float("nan"), 7.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert L.masked_mean(x, m).item() == pytest.approx(3.0)
    assert L.masked_mean(x, m, dim=-1).tolist() == pytest.approx([2.0, 5.0])


def test_group_advantages_by_hand():
    r = t64([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # group 0: mean 0.5, population std 0.5 -> (+-0.5) / 0.5 = +-1
    # group 1: all equal -> 0 / (0 + eps) = 0
    # group 2: mean 0.25, pop. std sqrt(0.25*0.75) = 0.4330 -> 0.75/0.4330 = 1.7321, -0.25/0.4330 = -0.5774
    adv = L.group_advantages(r, eps=0.0 + 1e-12)
    assert adv[0].tolist() == pytest.approx([1, -1, -1, 1], abs=1e-9)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[2].tolist() == pytest.approx([1.7320508, -0.5773503, -0.5773503, -0.5773503], abs=1e-6)
    # unbiased std (TRL): group 0 std = sqrt(4 * 0.25 / 3) = 0.57735 -> 0.5 / 0.57735 = 0.86603
    adv_unbiased = L.group_advantages(r, correction=1, eps=1e-12)
    assert adv_unbiased[0].tolist() == pytest.approx([0.8660254, -0.8660254, -0.8660254, 0.8660254], abs=1e-6)
    # Dr. GRPO: no division
    assert L.group_advantages(r, scale="none")[2].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    with pytest.raises(ValueError):
        L.group_advantages(r, scale="max")


def test_zero_variance_groups():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.5, 0.50001]])
    assert L.zero_variance_groups(r).tolist() == [False, True, True, False]
    assert L.zero_variance_groups(r, tol=1e-3).tolist() == [False, True, True, True]


def test_truncated_is_weights():
    old = t64([[LN(3.0), LN(0.5), 0.0]]).requires_grad_()
    rollout = t64([[0.0, 0.0, float("-inf")]])
    # exp(log 3) = 3 -> capped at 2 ; exp(log 0.5) = 0.5 ; padding -> 1 (no NaN from -inf)
    w = L.truncated_is_weights(old, rollout, torch.tensor([[1, 1, 0]]), cap=2.0)
    assert_values(w, [[2.0, 0.5, 1.0]], atol=1e-6)
    assert not w.requires_grad


def test_kl_penalty_by_hand():
    mask = torch.tensor([[1, 1, 0]])
    logp = t64([[LN(0.5), -1.3, 9.0]]).requires_grad_()
    ref = t64([[LN(0.25), -1.3, float("-inf")]])
    # token 0: k1 = log .5 - log .25 = log 2 = 0.693147
    #          k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 - (-0.693147) - 1 = 0.193147
    #          k2 = (log 2)^2 / 2 = 0.240227
    # token 1: equal log-probs -> every estimator is 0 ; token 2 masked -> 0
    assert_values(L.kl_penalty(logp, ref, mask, estimator="k1"), [[0.693147, 0, 0]])
    assert_values(L.kl_penalty(logp, ref, mask, estimator="k2"), [[0.240227, 0, 0]])
    k3 = L.kl_penalty(logp, ref, mask, estimator="k3")
    assert_values(k3, [[0.193147, 0, 0]], atol=1e-6)
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 0.5 = 0.5 on token 0, 0 elsewhere
    k3.sum().backward()
    assert_values(logp.grad, [[0.5, 0.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError):
        L.kl_penalty(logp, ref, mask, estimator="k4")


# Exact enumeration on a categorical policy pi = softmax(theta) over V tokens, one token per
# "sequence": E_{y ~ pi}[grad of the loss on y] = sum_y pi(y) grad loss(y), with the sampled token held
# fixed as autograd sees it, against the gradients of the two KLs. Advantage 0, beta 1, on-policy
# (old_logp = logp): only the KL part of the loss is left.
def _expected_grad(theta, ref_logp_V, estimator):
    """sum_y pi(y) d/dtheta [grpo loss on the one-token sequence y], exactly."""
    theta = theta.detach().clone().requires_grad_()
    logp_V = torch.log_softmax(theta, -1)
    total = torch.zeros_like(theta)
    for y in range(theta.shape[0]):
        (g,) = torch.autograd.grad(_one_token_kl_loss(logp_V, ref_logp_V, y, estimator), theta, retain_graph=True)
        total += logp_V[y].exp().detach() * g
    return total


def _one_token_kl_loss(logp_V, ref_logp_V, y, estimator):
    logp, ref = logp_V[y].view(1, 1), ref_logp_V[y].view(1, 1)
    mask, zero_adv = torch.ones(1, 1), torch.zeros(1, dtype=F64)
    if estimator == "k1_loss":       # what `--kl-estimator k1` used to do: k1 as a term of the loss
        return L.kl_penalty(logp, ref, mask, estimator="k1").sum()
    if estimator == "k2_loss":
        return L.kl_penalty(logp, ref, mask, estimator="k2").sum()
    if estimator == "k1":
        adv = L.kl_reward_advantages(zero_adv, logp, ref, mask, beta=1.0)
        return L.grpo_loss(logp, logp.detach(), adv, mask)[0]
    kl = L.kl_term(logp, logp.detach(), ref, mask, beta=1.0, estimator=estimator)
    return L.grpo_loss(logp, logp.detach(), zero_adv, mask, kl_term_BT=kl)[0]


def _kl_grads(theta, ref_logp_V):
    """(grad KL(pi || ref), grad KL(ref || pi)) by autograd of the exact sums."""
    theta = theta.detach().clone().requires_grad_()
    logp_V = torch.log_softmax(theta, -1)
    reverse = (logp_V.exp() * (logp_V - ref_logp_V)).sum()
    forward = (ref_logp_V.exp() * (ref_logp_V - logp_V)).sum()
    return torch.autograd.grad(reverse, theta, retain_graph=True)[0], torch.autograd.grad(forward, theta)[0]


def test_kl_gradients_by_exact_enumeration_two_tokens_by_hand():
    # pi = (1/2, 1/2) (theta = 0), ref = (1/4, 3/4). d/dtheta_i of
    #   KL(pi || ref) = pi_i (log(pi_i / ref_i) - KL),  KL = (ln 2 + ln(2/3)) / 2 = ln(4/3) / 2 = 0.143841
    #                 -> +-(ln 2 - 0.143841) / 2 = +-ln(3) / 4 = +-0.274653
    #   KL(ref || pi) = pi_i - ref_i -> +-0.25
    theta, ref = torch.zeros(2, dtype=F64), t64([LN(0.25), LN(0.75)])
    reverse, forward = _kl_grads(theta, ref)
    assert_values(reverse, [LN(3) / 4, -LN(3) / 4], atol=1e-12)
    assert_values(forward, [0.25, -0.25], atol=1e-12)
    # k3 in the loss: E[(1 - ref/pi) grad logp]; grad_theta logp(y) = onehot(y) - pi, so
    #   y=0: (1 - 0.5) (1/2, -1/2) ; y=1: (1 - 1.5) (-1/2, 1/2) -> E = (0.125 + 0.125, ...) = (0.25, -0.25)
    assert_values(_expected_grad(theta, ref, "k3"), [0.25, -0.25], atol=1e-12)
    # k1 in the reward, k3 x ratio: E[(logp - ref_logp) grad logp]
    #   y=0: ln 2 (1/2, -1/2) ; y=1: ln(2/3) (-1/2, 1/2) -> E = (ln 2 - ln(2/3)) / 4 = ln(3) / 4
    for est in ("k1", "k3_is", "k2_loss"):
        assert_values(_expected_grad(theta, ref, est), [LN(3) / 4, -LN(3) / 4], atol=1e-12)
    # k1 as a loss term: E[grad logp] = sum_y grad pi(y) = grad 1 = 0
    assert_values(_expected_grad(theta, ref, "k1_loss"), [0.0, 0.0], atol=1e-15)


def test_kl_gradients_by_exact_enumeration_random_policy():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=g, dtype=F64)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=F64), -1)
    reverse, forward = _kl_grads(theta, ref)
    assert (reverse - forward).abs().max() > 0.05              # the two KLs pull differently here
    torch.testing.assert_close(_expected_grad(theta, ref, "k3"), forward, rtol=0, atol=1e-12)
    for est in ("k1", "k3_is", "k2_loss"):
        torch.testing.assert_close(_expected_grad(theta, ref, est), reverse, rtol=0, atol=1e-12)
    assert _expected_grad(theta, ref, "k1_loss").abs().max() < 1e-15
    # as values, k1 and k3 are both unbiased for KL(pi || ref); k2 is not
    logp = torch.log_softmax(theta, -1)
    pi, kl = logp.exp(), (logp.exp() * (logp - ref)).sum()
    mask = torch.ones(1, 6)
    for est in ("k1", "k3"):
        value = (pi * L.kl_penalty(logp.view(1, 6), ref.view(1, 6), mask, estimator=est)).sum()
        assert value.item() == pytest.approx(kl.item(), abs=1e-12)
    k2 = (pi * L.kl_penalty(logp.view(1, 6), ref.view(1, 6), mask, estimator="k2")).sum()
    assert abs(k2.item() - kl.item()) > 1e-3


def test_kl_term_and_reward_by_hand():
    mask = torch.tensor([[1, 1, 0]])
    logp = t64([[LN(0.5), -1.0, 7.0]]).requires_grad_()
    old = t64([[LN(0.25), -1.0, 0.0]])                         # token 0: ratio 2
    ref = t64([[LN(0.25), -1.0, float("-inf")]])
    # token 0: k3 = 0.5 - ln 2 ... = exp(-ln 2) + ln 2 - 1 = 0.193147 ; token 1: 0 ; token 2: masked
    assert_values(L.kl_term(logp, old, ref, mask, beta=0.5), [[0.5 * 0.193147, 0, 0]])
    # k3_is: times the ratio exp(logp - old) = 2 -> 0.193147
    k3_is = L.kl_term(logp, old, ref, mask, beta=0.5, estimator="k3_is")
    assert_values(k3_is, [[0.193147, 0, 0]])
    # d/dlogp [beta k3 r] = beta (r (1 - ref/p) + k3 r) = 0.5 * 2 * (0.5 + 0.193147) = 0.693147 = -log(ref/p)
    k3_is.sum().backward()
    assert_values(logp.grad, [[LN(2), 0, 0]])
    # k1 in the reward: A - beta (logp - ref_logp) = 1 - 0.5 ln 2 = 0.653426 ; 1 - 0 ; 0 off the mask
    adv = L.kl_reward_advantages(t64([1.0]), logp, ref, mask, beta=0.5)
    assert_values(adv, [[1 - 0.5 * LN(2), 1.0, 0.0]])
    assert not adv.requires_grad
    with pytest.raises(ValueError):
        L.kl_term(logp, old, ref, mask, beta=0.5, estimator="k1")


def test_kl_term_takes_each_losss_own_normaliser():
    """The hand batch with a KL term [[0.6, 0.2, pad], [0.3, 0, 0]] (already times beta), added to each
    token's loss before the normaliser (DeepSeekMath, TRL) -- not sum / #tokens = 1.1 / 5 for all:
        grpo, gspo  (0.8 / 2 + 0.3 / 3) / 2 = 0.25      dr_grpo  1.1 / (2 * 4) = 0.1375      dapo  1.1 / 5 = 0.22"""
    logp, old, adv, mask = _hand_batch()
    kl = t64([[0.6, 0.2, float("nan")], [0.3, 0.0, 0.0]])
    for fn, kw, added in [(L.grpo_loss, {}, 0.25), (L.dr_grpo_loss, {"max_len": 4}, 0.1375),
                          (L.dapo_loss, {}, 0.22), (L.gspo_loss, {}, 0.25)]:
        base, _ = fn(logp.detach(), old, adv, mask, **kw)
        with_kl, _ = fn(logp.detach(), old, adv, mask, kl_term_BT=kl, **kw)
        assert with_kl.item() - base.item() == pytest.approx(added, abs=1e-12), fn.__name__
    # outside the clip and the IS weight: a weight of 2 on every token doubles the surrogate only
    w = torch.full((2, 3), 2.0, dtype=F64)
    base, _ = L.dapo_loss(logp.detach(), old, adv, mask, is_weight_BT=w)
    with_kl, _ = L.dapo_loss(logp.detach(), old, adv, mask, is_weight_BT=w, kl_term_BT=kl)
    assert with_kl.item() - base.item() == pytest.approx(0.22, abs=1e-12)


def test_per_token_advantages_by_hand():
    # The hand batch with A per token [[1, 0.5, pad], [-1, -1, -2]] instead of [1, -1]:
    #   seq 0: tok0 r = 1.6487 clipped at 1.2 -> -1.2 ; tok1 r = 1, A 0.5 -> -0.5
    #   seq 1: as before 0.8, 1.6487 ; tok2 r = 1, A -2 -> 2
    # grpo: ((-1.2 - 0.5) / 2 + (0.8 + 1.6487 + 2) / 3) / 2 = (-0.85 + 1.48291) / 2 = 0.316453
    logp, old, _, mask = _hand_batch()
    adv = t64([[1.0, 0.5, 0.0], [-1.0, -1.0, -2.0]])
    loss, _ = L.grpo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((-0.85 + (0.8 + E(0.5) + 2.0) / 3) / 2, abs=1e-12)
    # a [B] advantage and the same value per token give the same loss, in every loss function
    for fn, kw in [(L.grpo_loss, {}), (L.dr_grpo_loss, {"max_len": 4}), (L.dapo_loss, {}), (L.gspo_loss, {})]:
        per_seq, _ = fn(logp.detach(), old, t64([1.0, -1.0]), mask, **kw)
        per_tok, _ = fn(logp.detach(), old, t64([[1.0] * 3, [-1.0] * 3]), mask, **kw)
        assert per_tok.item() == pytest.approx(per_seq.item(), abs=1e-12), fn.__name__


# ----------------------------------------------------------------------------------------------------
# policy-gradient surrogates
# ----------------------------------------------------------------------------------------------------

# A batch worked out by hand, used by grpo / dr_grpo / dapo:
#   seq 0, A = +1, tokens: log-ratio 0.5 (r = e^0.5 = 1.6487), 0 (r = 1), padding
#   seq 1, A = -1, tokens: log-ratio -0.5 (r = 0.6065), 0.5 (r = 1.6487), 0 (r = 1)
# With clip 0.2 / 0.2 the per-token losses l = -min(rA, clip(r)A) are
#   seq 0: -min(1.6487, 1.2) = -1.2 (clipped) ; -1.0
#   seq 1: -min(-0.6065, -0.8) = 0.8 (clipped) ; -min(-1.6487, -1.2) = 1.6487 (not clipped) ; 1.0
def _hand_batch():
    old = torch.zeros(2, 3, dtype=F64)
    logp = t64([[0.5, 0.0, float("nan")], [-0.5, 0.5, 0.0]]).requires_grad_()
    adv = t64([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logp, old, adv, mask


def test_grpo_on_policy_is_minus_mean_advantage():
    # ratio 1 everywhere: each sequence's token mean is A_b, so loss = -(2 + -0.5)/2 = -0.75,
    # whatever the lengths (3 and 1 tokens)
    logp = torch.randn(2, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, metrics = L.grpo_loss(logp, logp.clone(), t64([2.0, -0.5]), mask)
    assert loss.item() == pytest.approx(-0.75)
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clip_frac"] == 0.0


def test_grpo_clipped_by_hand():
    logp, old, adv, mask = _hand_batch()
    loss, metrics = L.grpo_loss(logp, old, adv, mask)
    # seq means: (-1.2 - 1.0)/2 = -1.1 ; (0.8 + 1.6487 + 1.0)/3 = 1.14957 -> loss = 0.024787
    assert loss.item() == pytest.approx((-1.1 + (0.8 + E(0.5) + 1.0) / 3) / 2)
    assert loss.item() == pytest.approx(0.024787, abs=1e-6)
    # clipped tokens (gradient zeroed): seq0 tok0 (high), seq1 tok0 (low) -> 2 of 5 tokens
    assert metrics["clip_frac"] == pytest.approx(0.4)
    assert metrics["clip_low_frac"] == pytest.approx(0.2) and metrics["clip_high_frac"] == pytest.approx(0.2)
    loss.backward()
    # d l_t / d logp_t = -A r_t when unclipped, 0 when clipped; divided by |o_b| * B
    #   seq 0: 0, -1 * 1 / (2 * 2) = -0.25 ; seq 1: 0, +1.6487 / (3 * 2) = 0.27479, +1 / 6 = 0.16667
    expected = [[0.0, -0.25, 0.0], [0.0, E(0.5) / 6, 1 / 6]]
    assert_values(logp.grad, expected, atol=1e-12)


def test_dr_grpo_constant_normaliser_by_hand():
    logp, old, adv, mask = _hand_batch()
    # sum of token losses = -2.2 + 3.4487 = 1.2487, divided by B * max_len = 2 * 4 = 8 -> 0.156090
    loss, _ = L.dr_grpo_loss(logp, old, adv, mask, max_len=4)
    assert loss.item() == pytest.approx(0.156090, abs=1e-6)
    loss.backward()
    # every unclipped token gets -A r / 8: -0.125 ; 1.6487/8 = 0.20609 ; 0.125
    assert_values(logp.grad, [[0.0, -0.125, 0.0], [0.0, E(0.5) / 8, 0.125]], atol=1e-12)
    # the normaliser ignores sequence lengths: adding padding columns changes nothing
    loss_padded, _ = L.dr_grpo_loss(torch.cat([logp.detach(), torch.zeros(2, 5, dtype=F64)], 1), torch.zeros(2, 8, dtype=F64),
                                    adv, torch.cat([mask, torch.zeros(2, 5)], 1), max_len=4)
    assert loss_padded.item() == pytest.approx(loss.item())


def test_dapo_token_mean_and_clip_higher_by_hand():
    logp, old, adv, mask = _hand_batch()
    # clip_high 0.28: seq0 tok0 r = 1.6487 -> min(1.6487, 1.28) = 1.28, loss -1.28; others as before
    # token mean: (-1.28 - 1.0 + 0.8 + 1.6487 + 1.0) / 5 = 1.16872 / 5 = 0.233744
    loss, metrics = L.dapo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(0.233744, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(0.4)
    loss.backward()
    # every unclipped token weighs 1/5: -0.2 ; 1.6487/5 ; 0.2
    assert_values(logp.grad, [[0.0, -0.2, 0.0], [0.0, E(0.5) / 5, 0.2]], atol=1e-12)
    # global token count under gradient accumulation: sum / 10 instead of / 5
    loss10, _ = L.dapo_loss(logp.detach(), old, adv, mask, num_tokens=10)
    assert loss10.item() == pytest.approx(0.233744 / 2, abs=1e-6)
    # clip-higher 0.7 lets r = 1.6487 through: seq0 tok0 -> -1.6487
    loss_wide, _ = L.dapo_loss(logp.detach(), old, adv, mask, clip_high=0.7)
    assert loss_wide.item() == pytest.approx((-E(0.5) - 1.0 + 0.8 + E(0.5) + 1.0) / 5)


def test_is_weight_scales_token_losses():
    logp, old, adv, mask = _hand_batch()
    w = t64([[1.0, 0.5, 1.0], [2.0, 1.0, 1.0]])
    # seq0: (-1.2 - 0.5)/2 = -0.85 ; seq1: (1.6 + 1.6487 + 1)/3 = 1.41624 ; mean = 0.28312
    loss, _ = L.grpo_loss(logp, old, adv, mask, is_weight_BT=w)
    assert loss.item() == pytest.approx((-0.85 + (1.6 + E(0.5) + 1.0) / 3) / 2)


def _loop_surrogate(logp, old, adv, mask, clip_low, clip_high, norm):
    """The policy losses written as a direct loop over sequences and tokens."""
    B, T = logp.shape
    total, n_all = 0.0, mask.sum()
    for b in range(B):
        n_b, seq = mask[b].sum(), 0.0
        for t in range(T):
            if mask[b, t]:
                r = torch.exp(logp[b, t] - old[b, t])
                seq = seq - torch.minimum(r * adv[b], torch.clamp(r, 1 - clip_low, 1 + clip_high) * adv[b])
        total = total + (seq / n_b if norm == "seq" else seq)
    return {"seq": total / B, "const": total / (B * 7), "tok": total / n_all}[norm]


@pytest.mark.parametrize("fn,norm,kw", [
    (L.grpo_loss, "seq", {}),
    (L.dr_grpo_loss, "const", {"max_len": 7}),
    (L.dapo_loss, "tok", {}),
])
def test_policy_losses_match_direct_loop_autograd(fn, norm, kw):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    old = torch.randn(B, T, generator=g, dtype=F64) - 2
    logp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_()
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    loss, metrics = fn(logp, old, adv, mask, **kw)
    assert 0 < metrics["clip_frac"] < 1  # the case exercises both branches
    ref_logp = logp.detach().clone().requires_grad_()
    clip_high = 0.28 if fn is L.dapo_loss else 0.2
    ref = _loop_surrogate(ref_logp, old, adv, mask, 0.2, clip_high, norm)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logp.grad, ref_logp.grad)


def test_padding_with_inf_gives_finite_loss_and_zero_grad():
    logp = t64([[-0.1, float("-inf")]]).requires_grad_()
    old = t64([[-0.2, float("-inf")]])
    mask = torch.tensor([[1, 0]])
    for fn, kw in [(L.grpo_loss, {}), (L.dapo_loss, {}), (L.dr_grpo_loss, {"max_len": 2}), (L.gspo_loss, {})]:
        logp.grad = None
        loss, _ = fn(logp, old, t64([1.0]), mask, **kw)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
        # and with the KL to a reference whose padding is NaN, in the loss or in the reward
        ref = t64([[-0.3, float("nan")]])
        for estimator in ("k3", "k3_is"):
            logp.grad = None
            kl = L.kl_term(logp, old, ref, mask, beta=0.5, estimator=estimator)
            loss, _ = fn(logp, old, L.kl_reward_advantages(t64([1.0]), old, ref, mask, beta=0.5), mask,
                         kl_term_BT=kl, **kw)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0


def test_gspo_sequence_ratio_by_hand():
    old = torch.zeros(2, 3, dtype=F64)
    # seq 0: log-ratios 0.3, -0.1 (third is padding) -> mean 0.1, s = e^0.1 = 1.10517, A = +1:
    #        clip to 1 + 4e-4 = 1.0004 -> term -1.0004 (clipped, no gradient)
    # seq 1: log-ratios 0, 0, 0 -> s = 1, A = -0.5 -> term -(1 * -0.5) = +0.5
    # loss = (-1.0004 + 0.5) / 2 = -0.2502
    logp = t64([[0.3, -0.1, 5.0], [0.0, 0.0, 0.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, metrics = L.gspo_loss(logp, old, t64([1.0, -0.5]), mask)
    assert loss.item() == pytest.approx(-0.2502, abs=1e-12)
    assert metrics["clip_frac"] == 0.5 and metrics["ratio_mean"] == pytest.approx((E(0.1) + 1) / 2)
    loss.backward()
    # seq 1 unclipped: d/dlogp_t (-s A / B) = -A s / (|o| B) = 0.5 * 1 / (3 * 2) = 1/12 per token
    assert_values(logp.grad, [[0, 0, 0], [1 / 12] * 3], atol=1e-12)


def test_gspo_unclipped_gradient_is_sequence_level():
    # wide clip: loss = -(1/B) sum_b s_b A_b and d/dlogp_t = -A_b s_b / (|o_b| B) (GSPO-token gives the same)
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 4, generator=g, dtype=F64)
    logp = (old + 0.1 * torch.randn(3, 4, generator=g, dtype=F64)).requires_grad_()
    adv = t64([0.5, -1.0, 2.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    loss, _ = L.gspo_loss(logp, old, adv, mask, clip_low=10.0, clip_high=10.0)
    n = mask.sum(-1).to(F64)
    s = torch.exp(((logp.detach() - old) * mask).sum(-1) / n)
    assert loss.item() == pytest.approx(-(s * adv).mean().item())
    loss.backward()
    expected = (-adv * s / (n * 3))[:, None] * mask
    torch.testing.assert_close(logp.grad, expected)


def test_gspo_importance_weights_and_empty_rows_by_hand():
    """vLLM rollouts' truncated IS weights multiply each token's term (GSPO-token), and a sequence with
    no unmasked token (dropped: weight 0) adds nothing to the value (it used to add -A_b / B)."""
    old = torch.zeros(3, 2, dtype=F64)
    logp = torch.zeros(3, 2, dtype=F64).requires_grad_()      # s = 1 everywhere: unclipped
    adv = t64([2.0, -1.0, 5.0])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    w = t64([[0.5, 1.0], [0.25, 1.0], [1.0, 1.0]])
    # seq 0: -(2 * 0.5 + 2 * 1.0) / 2 = -1.5; seq 1: -(-1 * 0.25) / 1 = 0.25; seq 2: nothing. B = 3
    loss, _ = L.gspo_loss(logp, old, adv, mask, is_weight_BT=w)
    assert loss.item() == pytest.approx((-1.5 + 0.25) / 3, abs=1e-12)
    loss.backward()
    # d/dlogp_t = -A_b s_b w_t / (|o_b| B)
    assert_values(logp.grad, [[-2 * 0.5 / 6, -2 * 1.0 / 6], [0.25 / 3, 0], [0, 0]], atol=1e-12)
    loss_unweighted, _ = L.gspo_loss(logp.detach(), old, adv, mask)
    assert loss_unweighted.item() == pytest.approx((-2.0 + 1.0) / 3, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# chunked log-probs
# ----------------------------------------------------------------------------------------------------

def test_chunked_token_logprobs_by_hand_with_temperature():
    # logits = [1, 0, -1]; log Z = log(e + 1 + 1/e) = log 4.08616 = 1.407606 -> logp[0] = -0.407606
    # T = 2: logits [0.5, 0, -0.5]; log Z = log(1.64872 + 1 + 0.60653) = 1.180270 -> logp[0] = -0.680270
    # entropy at T = 1: log Z - sum p z = 1.407606 - (0.665241 - 0.090031) = 0.832396
    h = t64([[1.0, 0.0]])
    w = t64([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    logp, ent = L.chunked_token_logprobs(h, w, torch.tensor([0]), with_entropy=True)
    assert logp.item() == pytest.approx(-0.407606, abs=1e-6)
    assert ent.item() == pytest.approx(0.832396, abs=1e-6)
    logp2, none = L.chunked_token_logprobs(h, w, torch.tensor([0]), temperature=2.0)
    assert logp2.item() == pytest.approx(-0.680270, abs=1e-6) and none is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logprobs_equals_log_softmax_gather(temperature):
    g = torch.Generator().manual_seed(2)
    N, H, V = 7, 5, 11
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    y = torch.randint(V, (N,), generator=g)
    logp, ent = L.chunked_token_logprobs(h, w, y, chunk_size=3, temperature=temperature, with_entropy=True)
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref_all = (ref_h @ ref_w.T / temperature).log_softmax(-1)
    ref = ref_all.gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref)
    torch.testing.assert_close(ent, -(ref_all.exp() * ref_all).sum(-1).detach())
    (logp * torch.arange(N)).sum().backward()
    (ref * torch.arange(N)).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)


def test_chunked_token_logprobs_gradcheck():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(6, 3, generator=g, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 5, 2, 2, 1])
    assert torch.autograd.gradcheck(
        lambda h, w: L.chunked_token_logprobs(h, w, y, chunk_size=2, temperature=0.8)[0], (h, w))


def test_bf16_hidden_gives_float32_logits():
    # the logits must be computed in float32 from the bf16 values; a bf16 matmul would be off by ~1e-2
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(1000, 64, generator=g).to(torch.bfloat16)
    y = torch.tensor([1, 10, 100, 999])
    logp, _ = L.chunked_token_logprobs(h, w, y, chunk_size=3)
    assert logp.dtype == torch.float32
    ref = (h.float() @ w.float().T).log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# full-vocabulary and top-K KL
# ----------------------------------------------------------------------------------------------------

def _loop_kl(s_logits, t_logits, direction):
    """KL per position as a plain double loop over positions and vocabulary ids, in Python floats."""
    out = []
    for s_row, t_row in zip(s_logits.tolist(), t_logits.tolist()):
        zs, zt = sum(E(x) for x in s_row), sum(E(x) for x in t_row)
        kl = 0.0
        for sv, tv in zip(s_row, t_row):
            ps, pt = E(sv) / zs, E(tv) / zt
            kl += pt * LN(pt / ps) if direction == "forward" else ps * LN(ps / pt)
        out.append(kl)
    return out


def _naive_kl(s_h, s_w, t_h, t_w, direction, temperature=1.0):
    s = (s_h @ s_w.T / temperature).log_softmax(-1)
    t = (t_h @ t_w.T / temperature).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1) if direction == "forward" else (s.exp() * (s - t)).sum(-1)


def _kl_case(seed=5, N=6, H=4, H2=3, V=9):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g, dtype=F64, requires_grad=True),
            torch.randn(V, H, generator=g, dtype=F64, requires_grad=True),
            torch.randn(N, H2, generator=g, dtype=F64),
            torch.randn(V, H2, generator=g, dtype=F64))


def test_chunked_kl_two_token_case_by_hand():
    # student logits [0, 0] -> p_s = [0.5, 0.5]; teacher logits [1, 0] -> p_t = [0.731059, 0.268941]
    # forward: 0.731059 log(0.731059/0.5) + 0.268941 log(0.268941/0.5) = 0.277732 - 0.166788 = 0.110944
    # reverse: 0.5 log(0.5/0.731059) + 0.5 log(0.5/0.268941) = -0.189944 + 0.310059 = 0.120115
    s_h, s_w = t64([[0.0]]), t64([[1.0], [0.0]])
    t_h, t_w = t64([[1.0]]), t64([[1.0], [0.0]])
    assert L.chunked_kl(s_h, s_w, t_h, t_w).item() == pytest.approx(0.110944, abs=1e-6)
    assert L.chunked_kl(s_h, s_w, t_h, t_w, direction="reverse").item() == pytest.approx(0.120115, abs=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_chunked_kl_matches_double_loop_and_naive_gradients(direction, temperature):
    s_h, s_w, t_h, t_w = _kl_case()
    kl = L.chunked_kl(s_h, s_w, t_h, t_w, direction=direction, chunk_size=4, temperature=temperature)
    loop = _loop_kl(s_h.detach() @ s_w.detach().T / temperature, t_h @ t_w.T / temperature, direction)
    assert kl.tolist() == pytest.approx(loop, abs=1e-12)
    assert min(loop) > 0
    ref_h, ref_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    weights = torch.linspace(0.5, 2.0, kl.shape[0], dtype=F64)
    (kl * weights).sum().backward()
    (_naive_kl(ref_h, ref_w, t_h, t_w, direction, temperature) * weights).sum().backward()
    torch.testing.assert_close(s_h.grad, ref_h.grad)
    torch.testing.assert_close(s_w.grad, ref_w.grad)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_fused_kl_loss_equals_the_double_loop_and_autograd_of_the_naive_kl(direction, temperature):
    """In-forward gradients: value, per-position KL and token log-probs against a direct computation,
    hidden-state and head gradients against autograd through the naive [N, V] formula, with a teacher
    head padded past the student's vocabulary (sliced and renormalised)."""
    s_h, s_w, t_h, t_w = _kl_case()
    t_w_padded = torch.cat([t_w, torch.randn(3, t_w.shape[1], dtype=F64)])
    weights = torch.linspace(0.5, 2.0, s_h.shape[0], dtype=F64)
    targets = torch.tensor([0, 3, 8, 1, 1, 5])
    loss, kl, s_lp, t_lp = L.fused_kl_loss(s_h, s_w, t_h, t_w_padded, weights, targets, direction=direction,
                                           chunk_size=4, temperature=temperature)
    loop = _loop_kl(s_h.detach() @ s_w.detach().T / temperature, t_h @ t_w.T / temperature, direction)
    assert kl.tolist() == pytest.approx(loop, abs=1e-12)
    assert loss.item() == pytest.approx(sum(w * k for w, k in zip(weights.tolist(), loop)), abs=1e-12)
    s_ref = (s_h.detach() @ s_w.detach().T / temperature).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    t_ref = (t_h @ t_w.T / temperature).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(s_lp, s_ref)
    torch.testing.assert_close(t_lp, t_ref)
    (3.0 * loss).backward()                                    # the incoming gradient scales both
    ref_h, ref_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    (3.0 * (_naive_kl(ref_h, ref_w, t_h, t_w, direction, temperature) * weights).sum()).backward()
    torch.testing.assert_close(s_h.grad, ref_h.grad)
    torch.testing.assert_close(s_w.grad, ref_w.grad)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_kl_loss_adds_a_weighted_log_prob_term(direction, temperature):
    """opd's sparse term folded into the fused head: loss = sum w kl + sum c log p_s(y), value and
    gradients against autograd through the naive formulas (c of both signs, one position with c = 0)."""
    s_h, s_w, t_h, t_w = _kl_case(seed=9)
    weights = torch.linspace(0.5, 2.0, s_h.shape[0], dtype=F64)
    c = t64([0.3, -1.2, 0.0, 2.0, -0.4, 0.9])
    targets = torch.tensor([2, 3, 8, 0, 3, 7])
    loss, kl, s_lp, _ = L.fused_kl_loss(s_h, s_w, t_h, t_w, weights, targets, direction=direction, chunk_size=4,
                                        temperature=temperature, logp_weight_N=c)
    ref_h, ref_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    ref_logp = (ref_h @ ref_w.T / temperature).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    ref = (_naive_kl(ref_h, ref_w, t_h, t_w, direction, temperature) * weights).sum() + (c * ref_logp).sum()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(s_lp, ref_logp.detach())
    loss.backward()
    ref.backward()
    torch.testing.assert_close(s_h.grad, ref_h.grad)
    torch.testing.assert_close(s_w.grad, ref_w.grad)
    # c = 0 is the plain fused loss
    zero_h, zero_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    plain_h, plain_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    L.fused_kl_loss(zero_h, zero_w, t_h, t_w, weights, targets, direction=direction, chunk_size=4,
                    temperature=temperature, logp_weight_N=torch.zeros_like(c))[0].backward()
    L.fused_kl_loss(plain_h, plain_w, t_h, t_w, weights, targets, direction=direction, chunk_size=4,
                    temperature=temperature)[0].backward()
    torch.testing.assert_close(zero_h.grad, plain_h.grad)
    torch.testing.assert_close(zero_w.grad, plain_w.grad)


def test_fused_kl_loss_float32_matches_chunked_kl_and_skips_work_without_grad():
    g = torch.Generator().manual_seed(8)
    s_h = torch.randn(37, 16, generator=g, requires_grad=True)
    s_w = torch.randn(300, 16, generator=g, requires_grad=True)
    t_h, t_w = torch.randn(37, 24, generator=g), torch.randn(300, 24, generator=g)
    w = torch.full((37,), 1 / 37)
    loss, kl, _, _ = L.fused_kl_loss(s_h, s_w, t_h, t_w, w, torch.zeros(37, dtype=torch.long), chunk_size=8)
    loss.backward()
    ref_h, ref_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    ref = L.chunked_kl(ref_h, ref_w, t_h, t_w, chunk_size=8)
    ref.mean().backward()
    torch.testing.assert_close(kl, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_h.grad, ref_h.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(s_w.grad, ref_w.grad, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        loss, kl2, _, _ = L.fused_kl_loss(s_h, s_w, t_h, t_w, w, torch.zeros(37, dtype=torch.long))
    assert not loss.requires_grad
    torch.testing.assert_close(kl2, kl)


@pytest.mark.parametrize("fn,kw", [
    (L.chunked_kl, {"direction": "forward"}),
    (L.chunked_kl, {"direction": "reverse"}),
    (L.reverse_kl_topk, {"k": 3}),
])
def test_chunk_size_3_equals_unchunked(fn, kw):
    s_h, s_w, t_h, t_w = _kl_case(seed=6, N=7)
    s_h2, s_w2 = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    small = fn(s_h, s_w, t_h, t_w, chunk_size=3, **kw)
    whole = fn(s_h2, s_w2, t_h, t_w, chunk_size=100, **kw)
    torch.testing.assert_close(small, whole)
    small.sum().backward()
    whole.sum().backward()
    torch.testing.assert_close(s_h.grad, s_h2.grad)
    torch.testing.assert_close(s_w.grad, s_w2.grad)


def test_chunked_kl_gradcheck():
    s_h, s_w, t_h, t_w = _kl_case(seed=7, N=4, H=3, H2=2, V=5)
    for direction in ("forward", "reverse"):
        assert torch.autograd.gradcheck(
            lambda h, w, d=direction: L.chunked_kl(h, w, t_h, t_w, direction=d, chunk_size=3), (s_h, s_w))


def test_chunked_kl_no_gradient_to_teacher():
    s_h, s_w, t_h, t_w = _kl_case()
    t_h.requires_grad_()
    t_w.requires_grad_()
    L.chunked_kl(s_h, s_w, t_h, t_w).sum().backward()
    assert t_h.grad is None and t_w.grad is None and s_h.grad is not None


def test_chunked_kl_teacher_padded_vocab_is_sliced_and_renormalised():
    s_h, s_w, t_h, t_w = _kl_case()
    # two extra teacher rows with huge logits: if they were kept they would take almost all the mass
    t_w_padded = torch.cat([t_w, 50 * torch.ones(2, t_w.shape[1], dtype=F64)])
    for direction in ("forward", "reverse"):
        torch.testing.assert_close(L.chunked_kl(s_h, s_w, t_h, t_w_padded, direction=direction),
                                   L.chunked_kl(s_h, s_w, t_h, t_w, direction=direction))
    with pytest.raises(ValueError, match="smaller than the student"):
        L.chunked_kl(s_h, s_w, t_h, t_w[:-1])


def test_chunked_functions_save_only_chunk_inputs_for_backward():
    # The O(chunk * V) promise: autograd must not hold any [positions, V] tensor. Record the size of
    # every tensor saved for backward; with per-chunk checkpointing only the inputs are kept.
    N, V, H, C = 32, 50, 4, 8
    s_h, s_w, t_h, t_w = _kl_case(N=N, H=H, H2=H, V=V)
    ids = torch.arange(V).repeat(N, 1)[:, :5]
    t_logp = torch.full((N, 5), LN(0.1), dtype=F64)
    calls = {
        "chunked_kl": lambda: L.chunked_kl(s_h, s_w, t_h, t_w, chunk_size=C),
        "reverse_kl_topk": lambda: L.reverse_kl_topk(s_h, s_w, t_h, t_w, k=5, chunk_size=C),
        "forward_kl_topk": lambda: L.forward_kl_topk(s_h, s_w, ids, t_logp, chunk_size=C),
        "token_logprobs": lambda: L.chunked_token_logprobs(s_h, s_w, ids[:, 0], chunk_size=C)[0],
    }
    for name, call in calls.items():
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t.numel()) or t, lambda t: t):
            call().sum().backward()
        assert max(saved) <= V * H, (name, max(saved))  # the weight; never C * V logits, let alone N * V


def test_forward_kl_topk_tail_bucket_by_hand():
    # V = 3, student logits all 0 -> p_s = 1/3 each. Teacher top-1: id 0 with p = 0.5 -> tail 0.5.
    # student tail = 2/3 -> kl = 0.5 log(0.5 / (1/3)) + 0.5 log(0.5 / (2/3)) = 0.202733 - 0.143841 = 0.058892
    h = t64([[0.0]]).requires_grad_()
    w = t64([[1.0], [2.0], [3.0]])
    kl = L.forward_kl_topk(h, w, torch.tensor([[0]]), t64([[LN(0.5)]]))
    assert kl.item() == pytest.approx(0.058892, abs=1e-6)
    kl.backward()
    # d kl / d z_v = p_s,v - p_t(bucket of v) p_s,v / p_s(bucket of v):
    #   z_0: 1/3 - 0.5 = -1/6 ; z_1, z_2: 1/3 - 0.5 * (1/3) / (2/3) = 1/12
    # d kl / d h = sum_v (d kl / d z_v) w_v = -1/6 * 1 + 1/12 * 2 + 1/12 * 3 = 0.25
    assert h.grad.item() == pytest.approx(0.25, abs=1e-12)


def test_forward_kl_topk_with_k_equal_vocab_is_full_forward_kl():
    s_h, s_w, t_h, t_w = _kl_case(seed=8)
    t_logp_NV = (t_h @ t_w.T).log_softmax(-1)
    t_logp_NK, ids_NK = t_logp_NV.sort(-1, descending=True)  # K = V, ordered like a top-K dump
    s_h2, s_w2 = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    topk = L.forward_kl_topk(s_h, s_w, ids_NK, t_logp_NK, chunk_size=4)
    full = L.chunked_kl(s_h2, s_w2, t_h, t_w, direction="forward")
    torch.testing.assert_close(topk, full)
    topk.sum().backward()
    full.sum().backward()
    torch.testing.assert_close(s_h.grad, s_h2.grad)
    torch.testing.assert_close(s_w.grad, s_w2.grad)


def test_forward_kl_topk_matches_naive_tail_formula_and_gradcheck():
    # K < V: compare with the formula written directly (1 - sum p_s for the tail) on full logits
    s_h, s_w, t_h, t_w = _kl_case(seed=9)
    t_logp_NV = (t_h @ t_w.T).log_softmax(-1)
    t_logp_NK, ids_NK = t_logp_NV.topk(3, dim=-1)
    kl = L.forward_kl_topk(s_h, s_w, ids_NK, t_logp_NK, chunk_size=4, temperature=1.3)
    ref_h, ref_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    s_logp_NK = (ref_h @ ref_w.T / 1.3).log_softmax(-1).gather(-1, ids_NK)
    pt, pt_tail = t_logp_NK.exp(), 1 - t_logp_NK.exp().sum(-1)
    ps_tail = 1 - s_logp_NK.exp().sum(-1)
    ref = (pt * (t_logp_NK - s_logp_NK)).sum(-1) + pt_tail * (pt_tail.log() - ps_tail.log())
    torch.testing.assert_close(kl, ref)
    kl.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s_h.grad, ref_h.grad)
    torch.testing.assert_close(s_w.grad, ref_w.grad)
    h, w = s_h.detach()[:3].clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: L.forward_kl_topk(h, w, ids_NK[:3], t_logp_NK[:3], chunk_size=2), (h, w))


def test_forward_kl_topk_edge_cases_match_autograd_of_the_naive_formula():
    """The closed-form backward (`_ForwardKLTopK`) against autograd of the formula on full float64 logits,
    where it is fragile: a stored teacher log-prob of -inf (p_t = 0), an id listed twice (vLLM never does,
    a hand-made file might; the tail floors it once, the teacher mass counts twice), and a student whose
    top-K ids hold all but ~1e-9 of its mass (the tail's log and its 1 / R gradient)."""
    s_h, s_w, t_h, t_w = _kl_case(seed=12, N=5, V=11)
    t_logp_NK, ids_NK = (t_h @ t_w.T).log_softmax(-1).topk(4, dim=-1)
    t_logp_NK, ids_NK = t_logp_NK.clone(), ids_NK.clone()
    t_logp_NK[0, 3] = float("-inf")
    ids_NK[1, 3] = ids_NK[1, 2]
    with torch.no_grad():                  # row 2: the student's mass sits on the teacher's top-4 ids
        s_h[2] = 0.0
        s_h[2, 0] = 1.0
        s_w[:, 0] = -10.0
        s_w[ids_NK[2], 0] = 10.0
    kl = L.forward_kl_topk(s_h, s_w, ids_NK, t_logp_NK, chunk_size=2, temperature=0.9)
    ref_h, ref_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    s_logp_NV = (ref_h @ ref_w.T / 0.9).log_softmax(-1)
    pt = t_logp_NK.exp()
    head = torch.where(pt > 0, pt * (t_logp_NK - s_logp_NV.gather(-1, ids_NK)), 0.0).sum(-1)
    in_top = torch.zeros_like(s_logp_NV, dtype=torch.bool).scatter_(-1, ids_NK, True)
    ps_tail = torch.where(in_top, 0.0, s_logp_NV.exp()).sum(-1)       # each id once, however often listed
    pt_tail = (1 - pt.sum(-1)).clamp_min(0)
    ref = head + torch.xlogy(pt_tail, pt_tail) - pt_tail * ps_tail.log()
    assert 1e-12 < float(ps_tail[2].detach()) < 1e-6
    torch.testing.assert_close(kl, ref, rtol=1e-9, atol=1e-12)
    weights = torch.linspace(0.5, 1.5, 5, dtype=F64)
    (kl * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(s_h.grad, ref_h.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(s_w.grad, ref_w.grad, rtol=1e-7, atol=1e-10)


def test_reverse_kl_topk_by_hand():
    # p_s = [0.5, 0.25, 0.25], p_t = [0.25, 0.5, 0.25]; k = 1 keeps id 0, tails 0.5 and 0.75:
    # kl = 0.5 log(0.5 / 0.25) + 0.5 log(0.5 / 0.75) = 0.346574 - 0.202733 = 0.143841
    # (the full reverse KL is 0.5 log 2 + 0.25 log 0.5 + 0 = 0.173287, larger, as coarsening must give)
    one = t64([[1.0]])
    s_w = t64([[LN(0.5)], [LN(0.25)], [LN(0.25)]])
    t_w = t64([[LN(0.25)], [LN(0.5)], [LN(0.25)]])
    assert L.reverse_kl_topk(one, s_w, one, t_w, k=1).item() == pytest.approx(0.143841, abs=1e-6)
    assert L.chunked_kl(one, s_w, one, t_w, direction="reverse").item() == pytest.approx(0.173287, abs=1e-6)


def test_reverse_kl_topk_with_k_equal_vocab_is_full_reverse_kl():
    s_h, s_w, t_h, t_w = _kl_case(seed=10)
    s_h2, s_w2 = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    topk = L.reverse_kl_topk(s_h, s_w, t_h, t_w, k=s_w.shape[0], chunk_size=4)
    full = L.chunked_kl(s_h2, s_w2, t_h, t_w, direction="reverse", chunk_size=4)
    torch.testing.assert_close(topk, full)
    topk.sum().backward()
    full.sum().backward()
    torch.testing.assert_close(s_h.grad, s_h2.grad)
    torch.testing.assert_close(s_w.grad, s_w2.grad)


def test_reverse_kl_topk_matches_naive_and_gradcheck():
    s_h, s_w, t_h, t_w = _kl_case(seed=11)
    kl = L.reverse_kl_topk(s_h, s_w, t_h, t_w, k=3, chunk_size=4)
    ref_h, ref_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    s_all = (ref_h @ ref_w.T).log_softmax(-1)
    t_all = (t_h @ t_w.T).log_softmax(-1)
    ids = s_all.detach().topk(3, dim=-1).indices
    s_k, t_k = s_all.gather(-1, ids), t_all.gather(-1, ids)
    s_tail, t_tail = 1 - s_k.exp().sum(-1), 1 - t_k.exp().sum(-1)
    ref = (s_k.exp() * (s_k - t_k)).sum(-1) + s_tail * (s_tail.log() - t_tail.log())
    torch.testing.assert_close(kl, ref)
    assert (kl > 0).all() and (kl <= _naive_kl(s_h, s_w, t_h, t_w, "reverse") + 1e-12).all()
    kl.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s_h.grad, ref_h.grad)
    torch.testing.assert_close(s_w.grad, ref_w.grad)
    h, w = s_h.detach()[:3].clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: L.reverse_kl_topk(h, w, t_h[:3], t_w, k=3, chunk_size=2), (h, w))


@pytest.mark.parametrize("use", ["both", "kl", "logp"])
def test_reverse_kl_topk_and_logprobs_equals_the_two_functions(use):
    """opd --loss topk reads the sampled tokens' log-probs off the top-K KL's own head passes: values and
    gradients equal reverse_kl_topk + chunked_token_logprobs (teacher padded past the student's V)."""
    s_h, s_w, t_h, t_w = _kl_case(seed=12, N=7)
    t_w_padded = torch.cat([t_w, torch.randn(2, t_w.shape[1], dtype=F64)])
    targets = torch.tensor([0, 3, 8, 1, 1, 5, 2])
    w_kl, w_lp = torch.linspace(0.5, 2.0, 7, dtype=F64), torch.linspace(-1.0, 1.5, 7, dtype=F64)
    kl, lp, t_lp = L.reverse_kl_topk_and_logprobs(s_h, s_w, t_h, t_w_padded, targets, k=3, chunk_size=3,
                                                  temperature=0.7)
    ref_h, ref_w = s_h.detach().clone().requires_grad_(), s_w.detach().clone().requires_grad_()
    ref_kl = L.reverse_kl_topk(ref_h, ref_w, t_h, t_w, k=3, chunk_size=3, temperature=0.7)
    ref_lp = L.chunked_token_logprobs(ref_h, ref_w, targets, temperature=0.7)[0]
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(t_lp, L.chunked_token_logprobs(t_h, t_w, targets, temperature=0.7)[0])
    assert not t_lp.requires_grad
    terms = {"kl": lambda a, b: (a * w_kl).sum(), "logp": lambda a, b: (b * w_lp).sum()}
    chosen = ["kl", "logp"] if use == "both" else [use]
    sum(terms[t](kl, lp) for t in chosen).backward()
    sum(terms[t](ref_kl, ref_lp) for t in chosen).backward()
    torch.testing.assert_close(s_h.grad, ref_h.grad)
    torch.testing.assert_close(s_w.grad, ref_w.grad)


def test_reverse_kl_topk_float32_where_probabilities_underflow():
    """Top-K ids whose probability underflows float32 (logits 150 and 300 below the max): the KL and its
    gradients stay finite and equal the float64 computation."""
    s_w = t64([[0.0], [-150.0], [-300.0], [-1.0], [-2.0]])
    t_w = t64([[-1.0], [0.0], [-250.0], [-0.5], [-400.0]])
    one = t64([[1.0], [0.5]])
    kl64 = L.reverse_kl_topk(one, s_w, one, t_w, k=3)
    h32, w32 = one.float().requires_grad_(), s_w.float().requires_grad_()
    kl32 = L.reverse_kl_topk(h32, w32, one.float(), t_w.float(), k=4)
    kl64_4 = L.reverse_kl_topk(one, s_w, one, t_w, k=4)
    assert torch.isfinite(kl64).all() and torch.isfinite(kl32).all()
    torch.testing.assert_close(kl32.double(), kl64_4, atol=1e-6, rtol=1e-5)
    kl32.sum().backward()
    h64, w64 = one.clone().requires_grad_(), s_w.clone().requires_grad_()
    L.reverse_kl_topk(h64, w64, one, t_w, k=4).sum().backward()
    assert torch.isfinite(h32.grad).all() and torch.isfinite(w32.grad).all()
    torch.testing.assert_close(w32.grad.double(), w64.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h32.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# sampled forward KL and on-policy distillation
# ----------------------------------------------------------------------------------------------------

def test_forward_kl_sampled_by_hand():
    # -(log 0.5 + log 0.25) / 2 = (0.693147 + 1.386294) / 2 = 1.039721 ; gradient -1/2 per token
    logp = t64([[LN(0.5), LN(0.25), float("-inf")]]).requires_grad_()
    loss, metrics = L.forward_kl_sampled(logp, torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(1.039721, abs=1e-6)
    assert metrics["ppl"] == pytest.approx(E(1.039721), rel=1e-5)
    loss.backward()
    assert logp.grad.tolist() == [[-0.5, -0.5, 0.0]]


def test_opd_teacher_equals_student_gives_zero_loss_and_gradient():
    g = torch.Generator().manual_seed(12)
    logp = (torch.randn(3, 5, generator=g, dtype=F64) - 1).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    for discount in (0.0, 0.9):
        logp.grad = None
        loss, metrics = L.opd_sampled_loss(logp, logp.detach(), logp.detach(), mask, discount=discount)
        loss.backward()
        assert loss.item() == 0.0 and metrics["reverse_kl"] == 0.0
        assert torch.count_nonzero(logp.grad) == 0


def test_opd_sampled_loss_by_hand():
    logp = t64([[LN(0.5), LN(0.5), 0.0]]).requires_grad_()
    sampling = logp.detach().clone()  # on-policy: ratio 1
    mask = torch.tensor([[1, 1, 0]])
    # teacher [log .25, log .5]: a = -(sampling - teacher) = [-log 2, 0] = [-0.693147, 0]
    # loss = -(r a).sum / 2 = 0.346574 ; reverse_kl = mean(sampling - teacher) = 0.346574
    teacher = t64([[LN(0.25), LN(0.5), 0.0]])
    loss, metrics = L.opd_sampled_loss(logp, sampling, teacher, mask)
    assert loss.item() == pytest.approx(0.346574, abs=1e-6)
    assert metrics["reverse_kl"] == pytest.approx(0.346574, abs=1e-6)
    loss.backward()
    # d loss / d logp_t = -r_t A_t / #tokens = [0.693147 / 2, 0, 0]
    assert_values(logp.grad, [[0.346574, 0.0, 0.0]], atol=1e-6)

    # discount 0.5, teacher [log .5, log .25]: a = [0, -log 2]
    #   A = [a0 + 0.5 a1, a1] = [-0.346574, -0.693147] -> loss = (0.346574 + 0.693147) / 2 = 0.519860
    teacher = t64([[LN(0.5), LN(0.25), 0.0]])
    loss, _ = L.opd_sampled_loss(logp.detach(), sampling, teacher, mask, discount=0.5)
    assert loss.item() == pytest.approx(0.519860, abs=1e-6)
    # plus a sequence-level alpha * advantage of +1: A = [0.653426, 0.306853] -> loss = -0.480140
    loss, metrics = L.opd_sampled_loss(logp.detach(), sampling, teacher, mask, discount=0.5, alpha_adv_B=t64([1.0]))
    assert loss.item() == pytest.approx(-0.480140, abs=1e-6)
    assert metrics["adv_mean"] == pytest.approx(0.480140, abs=1e-6)

    # off-policy: logp - sampling = log 2 on token 0 -> r = 2; teacher [log .25, log .5] -> A = [-log 2, 0]
    #   loss = -(2 * -0.693147) / 2 = 0.693147 ; gradient = -r A / 2 = [0.693147, 0, 0]
    logp_new = t64([[LN(1.0), LN(0.5), 0.0]]).requires_grad_()
    loss, metrics = L.opd_sampled_loss(logp_new, sampling, t64([[LN(0.25), LN(0.5), 0.0]]), mask)
    assert loss.item() == pytest.approx(0.693147, abs=1e-6) and metrics["ratio_mean"] == pytest.approx(1.5)
    loss.backward()
    assert_values(logp_new.grad, [[0.693147, 0.0, 0.0]], atol=1e-6)


def test_discounted_future_sum_by_hand():
    x = t64([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[1, 0, 1, 0]])
    # masked x = [1, 0, 4, 0]; discount 0.5: y3 = 0, y2 = 4, y1 = 0 + 0.5*4 = 2 (masked -> 0), y0 = 1 + 0.5*2 = 2
    assert L.discounted_future_sum(x, mask, 0.5).tolist() == [[2.0, 0.0, 4.0, 0.0]]
    assert L.discounted_future_sum(x, mask, 0.0).tolist() == [[1.0, 0.0, 4.0, 0.0]]


@pytest.mark.parametrize("head,backward_too", [("token_logprobs", False), ("token_logprobs", True),
                                               ("fused_kl", False), ("fused_kl", True), ("chunked_kl", False)])
def test_heads_compute_in_float32_under_mixed_precision_autocast(head, backward_too):
    """accelerate's mixed precision runs the loss under autocast, where F.linear, mm and bmm return
    bfloat16. The heads turn it off for their products: values and gradients equal the float32 ones
    exactly. The trainer runs backward outside autocast; the two heads with their own backward also get
    it right inside (the token head's backward once failed there: a bfloat16 gradient buffer took a
    float32 scatter). chunked_kl's backward is autograd's, which autocast would reach."""
    g = torch.Generator().manual_seed(11)
    h0, w0 = torch.randn(10, 8, generator=g), torch.randn(40, 8, generator=g)
    t_h, t_w = torch.randn(10, 6, generator=g), torch.randn(40, 6, generator=g)
    targets = torch.randint(0, 40, (10,), generator=g)

    def run(autocast: bool):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if head == "token_logprobs":
                out, ent = L.chunked_token_logprobs(h, w, targets, chunk_size=4, temperature=0.8, with_entropy=True)
                assert ent.dtype == torch.float32
                loss = (out * torch.linspace(-1, 1, 10)).sum()
            elif head == "fused_kl":
                loss, out, _, _ = L.fused_kl_loss(h, w, t_h, t_w, torch.full((10,), 0.1), targets, chunk_size=4,
                                                  direction="reverse")
            else:
                out = L.chunked_kl(h, w, t_h, t_w, chunk_size=4)
                loss = out.sum()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and backward_too):
            loss.backward()
        assert out.dtype == torch.float32
        return out.detach(), h.grad, w.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_heads_refuse_positions_that_do_not_line_up():
    """A custom head loops over its own row count: one mismatched input must fail at once, not drop rows."""
    h, w = torch.randn(7, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match=r"must both be \[N, K\] for N = 7"):
        L.forward_kl_topk(h, w, torch.zeros(5, 2, dtype=torch.long), torch.full((5, 2), -1.0))
    with pytest.raises(ValueError, match=r"must be \[N\] for N = 7"):
        L.chunked_token_logprobs(h, w, torch.zeros(5, dtype=torch.long))
