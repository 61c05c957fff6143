"""Chunked lm-head kernels: log-probs and KLs from final hidden states without [N, V] logits.

Each function takes the final hidden states at the loss positions and the lm-head weight, computes logits
for `chunk_size` positions at a time in float32 (float64 stays float64), and recomputes a chunk's logits
in backward instead of storing them: activation memory is O(chunk_size * V), not O(N * V).

- `chunked_token_logprobs` (`_TokenLogprobHead`): log-probs of given tokens (grpo, opd, the metrics);
- `forward_kl_topk` (`_ForwardKLTopK`): kl-warmup's top-K forward KL with its tail bucket;
- `reverse_kl_topk` (`_ReverseKLTopK`): opd's top-K reverse KL; `reverse_kl_on_support` the same on
  given ids (a served teacher's top-K), and `topk_logprobs` what such a server returns, from a model;
- `fused_kl_loss` (`_FusedKLHead`): the full-vocabulary forward or reverse KL with its gradient computed in
  the forward pass (kl-warmup and opd `--loss full`);
- `chunked_kl`: the same KL through `torch.utils.checkpoint`, for held-out metrics without gradients.

Token log-probs, the top-K forward and reverse KLs keep a few numbers per position for backward
(normalisers; K ids and log-ratios). The weight is upcast inside the chunk, so a bf16 head never has a
float32 copy kept alive; on a GPU, bf16/fp16 inputs skip the upcast (a half-precision GEMM with float32
accumulation and output). The loss formulas that consume these live in `s2d_cli.losses`.

Shapes are suffixes: N flattened positions, H hidden size, V vocabulary, K top-K, C chunk.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

# Floor on probability masses of top-K tail buckets, so a log never sees 0 (and its gradient never NaN).
TINY = 1e-30



def _no_autocast(fn: Callable) -> Callable:
    """Run a head product with autocast off: the head computes in float32 by design, and under an outer
    autocast (accelerate's mixed precision wraps the loss and its backward) F.linear, mm and bmm would
    return bfloat16 logits, rowdots and gradients instead."""
    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        kind = x.device.type
        if kind in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return wrapper


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 (so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


# torch >= 2.8 has `torch.mm(a, b, out_dtype=torch.float32)` for bf16/fp16 CUDA tensors; set to False
# (here, or by the first failing call) to take the upcast path everywhere.
HALF_MM_FP32_OUT = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


class _HalfLinearFP32Out(torch.autograd.Function):
    """hidden @ weight^T for bf16/fp16 CUDA tensors on the tensor cores, accumulated *and returned* in
    float32 (`torch.mm(..., out_dtype=torch.float32)`): the logits of the upcast product, up to summation
    order, without a float32 GEMM and without a float32 copy of the [V, H] head per chunk: on an H100,
    `chunked_token_logprobs` forward + backward at N = 8,192, V = 151,936, H = 1,024 took 54 ms instead
    of 242 ms, `chunked_kl` 144 ms instead of 430 ms (`bench/gpu_check.py`). The backward products round
    the float32 logits gradient to the inputs' dtype and accumulate in float32, as TRL's and Liger's
    fused heads do (gradient relative error 1e-4 to 4e-3 against the upcast path)."""

    @staticmethod
    def forward(ctx, hidden_CH, weight_VH):
        ctx.save_for_backward(hidden_CH, weight_VH)
        return torch.mm(hidden_CH, weight_VH.t(), out_dtype=torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_CV):
        hidden_CH, weight_VH = ctx.saved_tensors
        grad_CV = grad_CV.to(hidden_CH.dtype)
        grad_h = torch.mm(grad_CV, weight_VH) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(grad_CV.t(), hidden_CH) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w


@_no_autocast
def _logits_CV(hidden_CH: torch.Tensor, weight_VH: torch.Tensor, temperature: float) -> torch.Tensor:
    """(hidden / temperature) @ weight^T in float32 or wider, whatever the input dtype.

    Dividing the [C, H] hidden states rather than the [C, V] logits saves one [C, V] buffer. bf16/fp16
    inputs on a GPU take `_HalfLinearFP32Out` (float32 logits from a half-precision GEMM) and divide the
    logits instead, so the temperature never rounds the hidden states to half precision.
    """
    global HALF_MM_FP32_OUT
    if (HALF_MM_FP32_OUT and hidden_CH.is_cuda and hidden_CH.dtype in (torch.bfloat16, torch.float16)
            and weight_VH.dtype == hidden_CH.dtype):
        try:
            logits_CV = _HalfLinearFP32Out.apply(hidden_CH, weight_VH)
        except RuntimeError:          # a build without mm's out_dtype: upcast from now on
            HALF_MM_FP32_OUT = False
        else:
            return logits_CV.div_(temperature) if temperature != 1.0 else logits_CV
    hidden_CH = hidden_CH.to(_compute_dtype(hidden_CH.dtype))
    if temperature != 1.0:
        hidden_CH = hidden_CH / temperature
    return torch.nn.functional.linear(hidden_CH, weight_VH.to(hidden_CH.dtype))


@_no_autocast
def _rowdot_C(a_CV: torch.Tensor, b_CV: torch.Tensor) -> torch.Tensor:
    """sum_v a[c, v] * b[c, v] without a [C, V] product buffer."""
    return torch.bmm(a_CV.unsqueeze(1), b_CV.unsqueeze(2)).view(-1)


# The per-chunk kernels of `chunked_kl` are autograd Functions with their closed-form gradients, so
# backward needs one [C, V] buffer instead of the three or four that autograd's log_softmax / sub / mul
# chain allocates. Each is only ever called inside a checkpointed chunk, so what they save lives for one
# chunk's backward.

class _ForwardKL(torch.autograd.Function):
    """kl_c = sum_v p_t (log p_t - log softmax(z)) ;  d kl_c / d z[c, v] = softmax(z)_v sum(p_t) - p_t,v."""

    @staticmethod
    def forward(ctx, s_logits_CV, t_logp_CV):
        s_logz_C = s_logits_CV.logsumexp(-1)
        p_t_CV = t_logp_CV.exp()
        log_ratio_CV = (t_logp_CV - s_logits_CV).add_(s_logz_C[:, None])  # log p_t - log p_s
        ctx.save_for_backward(s_logits_CV, s_logz_C, p_t_CV)
        return _rowdot_C(p_t_CV, log_ratio_CV)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_C):
        s_logits_CV, s_logz_C, p_t_CV = ctx.saved_tensors
        grad_CV = (s_logits_CV - s_logz_C[:, None]).exp_().mul_(p_t_CV.sum(-1, keepdim=True))
        return grad_CV.sub_(p_t_CV).mul_(grad_C[:, None]), None


class _ReverseKL(torch.autograd.Function):
    """kl_c = sum_v p_s (log p_s - log p_t) ;  d kl_c / d z[c, v] = p_s,v (log p_s,v - log p_t,v - kl_c)."""

    @staticmethod
    def forward(ctx, s_logits_CV, t_logp_CV):
        s_logz_C = s_logits_CV.logsumexp(-1)
        s_logp_CV = s_logits_CV - s_logz_C[:, None]
        p_s_CV = s_logp_CV.exp()
        kl_C = _rowdot_C(p_s_CV, s_logp_CV.sub_(t_logp_CV))
        ctx.save_for_backward(s_logits_CV, s_logz_C, t_logp_CV, kl_C)
        return kl_C

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_C):
        s_logits_CV, s_logz_C, t_logp_CV, kl_C = ctx.saved_tensors
        s_logp_CV = s_logits_CV - s_logz_C[:, None]
        p_s_CV = s_logp_CV.exp()
        grad_CV = s_logp_CV.sub_(t_logp_CV).sub_(kl_C[:, None]).mul_(p_s_CV)
        return grad_CV.mul_(grad_C[:, None]), None


def _chunked(fn: Callable, chunk_size: int, n: int, *per_position_and_shared) -> list:
    """Run `fn` on slices [i:i+chunk_size] of the per-position tensors, checkpointing each call.

    Arguments are given as (tensor, is_per_position) pairs, so the shared weights are passed whole.
    Checkpointing is skipped when no input needs a gradient (evaluation, teacher scoring).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t, _ in per_position_and_shared
    )
    outs = []
    for start in range(0, n, chunk_size):
        args = [t[start:start + chunk_size] if per_pos else t for t, per_pos in per_position_and_shared]
        outs.append(checkpoint(fn, *args, use_reentrant=False) if needs_grad else fn(*args))
    return outs


# ----------------------------------------------------------------------------------------------------
# log-probs from hidden states, chunked
# ----------------------------------------------------------------------------------------------------

def chunked_token_logprobs(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target token, chunked over positions.

        z_n = hidden_n @ W^T / temperature                     (float32 within a chunk)
        logp_n = z_n[target_n] - logsumexp_v z_n,v
        entropy_n = logsumexp z_n - sum_v softmax(z_n)_v z_n,v  (detached; None unless with_entropy)

    `hidden_NH` is the final hidden state at the position *before* each target (shift done by the
    caller). Returns float32 (float64 for float64 inputs) tensors of shape [N].
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets_N.shape != hidden_NH.shape[:1]:
        raise ValueError(f"targets {tuple(targets_N.shape)} must be [N] for N = {hidden_NH.shape[0]} hidden states")
    logp_N, ent_N = _TokenLogprobHead.apply(hidden_NH, weight_VH, targets_N.long(), chunk_size, temperature,
                                            with_entropy)
    return logp_N, (ent_N if with_entropy else None)


def _grad_buffers(ctx, hidden_NH: torch.Tensor, weight_VH: torch.Tensor) -> tuple:
    """The hidden-state gradient and the float32 head-gradient accumulator a head Function fills chunk by
    chunk (None for an input that needs no gradient)."""
    grad_h_NH = torch.empty_like(hidden_NH) if ctx.needs_input_grad[0] else None
    grad_w_VH = (torch.zeros(weight_VH.shape, dtype=_compute_dtype(weight_VH.dtype), device=weight_VH.device)
                 if ctx.needs_input_grad[1] else None)
    return grad_h_NH, grad_w_VH


def _add_chunk_grads(grad_CV: torch.Tensor, a: int, b: int, h_CH: torch.Tensor, weight_VH: torch.Tensor,
                     grad_h_NH: torch.Tensor | None, grad_w_VH: torch.Tensor | None) -> None:
    """Turn positions a:b's [C, V] logits gradient into their hidden-state gradient and add its share of the
    head gradient (the logits gradient rounded to the head's dtype once, for both products)."""
    grad_CV = _gemm_operand(grad_CV, weight_VH)
    if grad_h_NH is not None:
        grad_h_NH[a:b] = _mm_f32(grad_CV, weight_VH).to(grad_h_NH.dtype)
    if grad_w_VH is not None:
        _addmm_f32_(grad_w_VH, grad_CV.t(), h_CH)


def _head_backward(ctx, hidden_NH: torch.Tensor, weight_VH: torch.Tensor,
                   chunk_grad: Callable[[int, int, torch.Tensor], torch.Tensor]) -> tuple:
    """The hidden-state and head gradients of a loss on the head's logits, chunk by chunk of `ctx.chunk_size`
    positions: `chunk_grad(a, b, hidden[a:b])` gives the loss's gradient for those positions' [C, V] logits
    (the 1 / T of the logits included). The head gradient is summed over the chunks in float32."""
    grad_h_NH, grad_w_VH = _grad_buffers(ctx, hidden_NH, weight_VH)
    for a in range(0, hidden_NH.shape[0], ctx.chunk_size):
        b = min(a + ctx.chunk_size, hidden_NH.shape[0])
        h_CH = hidden_NH[a:b]
        _add_chunk_grads(chunk_grad(a, b, h_CH), a, b, h_CH, weight_VH, grad_h_NH, grad_w_VH)
    return grad_h_NH, (grad_w_VH.to(weight_VH.dtype) if grad_w_VH is not None else None)


class _TokenLogprobHead(torch.autograd.Function):
    """`chunked_token_logprobs` over all N positions, chunk by chunk, keeping one number per position for
    backward: its log-normaliser log Z_n.

        forward   z = h W^T / T per chunk, shifted by its row max m; e = exp z; S = sum_v e (>= 1)
                  logp_n = z[y_n] - log S,   log Z_n = m + log S,   entropy_n = log S - sum_v e z / S
        backward  the chunk's logits again (one GEMM), p = exp(z - log Z) in place, and
                  d logp_n / d z = 1[v = y_n] - p_v  ->  [C, H] hidden and [V, H] head gradients

    Checkpointing a log_softmax / gather chunk under autograd instead runs the chunk's [C, V] passes three
    times (forward, recomputation, backward) and the entropy twice; here the forward makes about eight
    passes over the chunk's logits and backward four. The head gradient is summed over the chunks in
    float32."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, chunk_size, temperature, with_entropy):
        N = hidden_NH.shape[0]
        logp_N = torch.empty(N, dtype=_compute_dtype(hidden_NH.dtype), device=hidden_NH.device)
        logz_N = torch.empty_like(logp_N)
        ent_N = torch.empty_like(logp_N) if with_entropy else logp_N.new_empty(0)
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            z_CV = _logits_CV(hidden_NH[a:b], weight_VH, temperature)
            m_C1 = z_CV.amax(-1, keepdim=True)
            z_CV -= m_C1
            e_CV = z_CV.exp()
            s_C1 = e_CV.sum(-1, keepdim=True)
            log_s_C1 = s_C1.log()
            logp_N[a:b] = (z_CV.gather(-1, targets_N[a:b, None]) - log_s_C1)[:, 0]
            logz_N[a:b] = (m_C1 + log_s_C1)[:, 0]
            if with_entropy:
                ent_N[a:b] = log_s_C1[:, 0] - _rowdot_C(e_CV, z_CV) / s_C1[:, 0]
            del z_CV, e_CV
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, logz_N)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.mark_non_differentiable(ent_N)
        return logp_N, ent_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N, _grad_ent):
        hidden_NH, weight_VH, targets_N, logz_N = ctx.saved_tensors
        g_N = (grad_N / ctx.temperature).to(logz_N.dtype)     # z = h W^T / T: both products carry 1 / T

        def chunk_grad(a, b, h_CH):                            # g (1[v = y] - p_v)
            g_C1 = g_N[a:b, None]
            grad_CV = _logits_CV(h_CH, weight_VH, ctx.temperature).sub_(logz_N[a:b, None]).exp_().mul_(-g_C1)
            return grad_CV.scatter_add_(-1, targets_N[a:b, None], g_C1)

        return (*_head_backward(ctx, hidden_NH, weight_VH, chunk_grad), None, None, None, None)


def _cat(chunks: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if chunks:
        return torch.cat(chunks)
    return torch.zeros(0, dtype=_compute_dtype(like.dtype), device=like.device)

def _softmax_parts(z_CV: torch.Tensor, ids_CK: torch.Tensor | None, k: int,
                   targets_C1: torch.Tensor | None = None) -> tuple:
    """From logits z (shifted in place to row max 0, then spent): the top-k ids (when `ids_CK` is None),
    log Z, the log-probs at the ids, the log-prob of each row's target (None without `targets_C1`), and
    the log tail mass outside the ids plus a floor TINY,
    log((sum_{v not in ids} exp z + TINY S) / S) with S = sum_v exp z. The tail is summed over the other
    ids rather than taken as 1 - sum(top-K): exact when the top K hold all but a float error of the mass,
    and finite (its gradient defined) even when the ids cover the whole vocabulary."""
    m_C1 = z_CV.amax(-1, keepdim=True)
    z_CV -= m_C1
    if ids_CK is None:
        ids_CK = z_CV.topk(k, dim=-1).indices
    z_CK = z_CV.gather(-1, ids_CK)                       # before exp: exact where exp(z) underflows
    z_C = z_CV.gather(-1, targets_C1)[:, 0] if targets_C1 is not None else None
    e_CV = z_CV.exp_()                                   # z is spent: its buffer takes exp(z)
    log_s_C1 = e_CV.sum(-1, keepdim=True).log()
    logp_CK = z_CK - log_s_C1
    logp_C = z_C - log_s_C1[:, 0] if z_C is not None else None
    rest_C = e_CV.scatter_(-1, ids_CK, 0.0).sum(-1)
    log_tail_C = (rest_C + TINY * log_s_C1[:, 0].exp()).log() - log_s_C1[:, 0]
    return ids_CK, m_C1[:, 0] + log_s_C1[:, 0], logp_CK, logp_C, log_tail_C


def forward_kl_topk(
    student_hidden_NH: torch.Tensor,
    student_weight_VH: torch.Tensor,
    teacher_topk_ids_NK: torch.Tensor,
    teacher_topk_logp_NK: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL against the teacher's stored top-K log-probs plus one tail bucket, per position.

        p_t,k = exp(teacher_topk_logp_k)              p_t,tail = max(1 - sum_k p_t,k, 0)
        p_s = softmax(student_hidden @ W^T / temperature)
        p_s,tail = 1 - sum_k p_s(ids_k)               (computed as a logsumexp over the other ids)
        kl_n = sum_k p_t,k (log p_t,k - log p_s(ids_k)) + p_t,tail (log p_t,tail - log(p_s,tail + TINY))

    `temperature` applies to the student only (the teacher's log-probs are used as stored). With
    K = V this is the exact forward KL. Returns kl_N (>= 0 up to float error), differentiable in the
    student's hidden states and weight; reduce with `masked_mean`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not (teacher_topk_ids_NK.shape == teacher_topk_logp_NK.shape
            and teacher_topk_ids_NK.shape[0] == student_hidden_NH.shape[0]):
        raise ValueError(f"teacher top-K ids {tuple(teacher_topk_ids_NK.shape)} and log-probs "
                         f"{tuple(teacher_topk_logp_NK.shape)} must both be [N, K] for N = {student_hidden_NH.shape[0]}")
    return _ForwardKLTopK.apply(student_hidden_NH, student_weight_VH, teacher_topk_ids_NK.long(),
                                teacher_topk_logp_NK.detach(), chunk_size, temperature)


class _ForwardKLTopK(torch.autograd.Function):
    """`forward_kl_topk` over all N positions, chunk by chunk, keeping two numbers per position for backward:
    log Z_n (the student's normaliser) and log R_n (its mass outside the top-K ids plus the floor TINY Z,
    `_softmax_parts`).

        forward   z = h W^T / T shifted by its row max, e = exp z, S = sum e; the tail R sums e over the ids
                  other than the K, plus S TINY (no cancellation when the top K hold almost all the mass)
        backward  with p_s = exp(z - log Z), q = exp(z - log R) off the ids (the floor is a constant),
                  c = sum_k p_t,k + p_t,tail:
                  d kl / d z_v = c p_s,v - p_t,tail q_v        v not among the ids
                               = c p_s,v - sum_{k: id_k = v} p_t,k     v among them

    Against checkpointing the chunk under autograd (two logsumexps, a scattered copy, each run twice, then
    their backward) this makes about nine passes over a chunk's logits forward and about six backward."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, ids_NK, t_logp_NK, chunk_size, temperature):
        N, K = ids_NK.shape
        kl_N = torch.empty(N, dtype=_compute_dtype(hidden_NH.dtype), device=hidden_NH.device)
        logz_N, logr_N = torch.empty_like(kl_N), torch.empty_like(kl_N)
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            _, logz_C, s_logp_CK, _, s_log_tail_C = _softmax_parts(
                _logits_CV(hidden_NH[a:b], weight_VH, temperature), ids_NK[a:b], K)
            t_logp_CK = t_logp_NK[a:b].to(kl_N.dtype)
            p_t_CK = t_logp_CK.exp()
            head_C = torch.where(p_t_CK > 0, p_t_CK * (t_logp_CK - s_logp_CK), 0.0).sum(-1)
            p_t_tail_C = (1.0 - p_t_CK.sum(-1)).clamp_min(0.0)
            kl_N[a:b] = head_C + torch.xlogy(p_t_tail_C, p_t_tail_C) - p_t_tail_C * s_log_tail_C
            logz_N[a:b] = logz_C
            logr_N[a:b] = logz_C + s_log_tail_C
        ctx.save_for_backward(hidden_NH, weight_VH, ids_NK, t_logp_NK, logz_N, logr_N)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return kl_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        hidden_NH, weight_VH, ids_NK, t_logp_NK, logz_N, logr_N = ctx.saved_tensors
        g_N = (grad_N / ctx.temperature).to(logz_N.dtype)     # z = h W^T / T: both products carry 1 / T

        def chunk_grad(a, b, h_CH):
            ids_CK = ids_NK[a:b]
            p_t_CK = t_logp_NK[a:b].to(logz_N.dtype).exp()
            p_t_tail_C1 = (1.0 - p_t_CK.sum(-1, keepdim=True)).clamp_min(0.0)
            c_C1 = p_t_CK.sum(-1, keepdim=True) + p_t_tail_C1
            off_C1 = c_C1 - p_t_tail_C1 * (logz_N[a:b, None] - logr_N[a:b, None]).exp()   # c - p_t,tail Z / R
            p_CV = _logits_CV(h_CH, weight_VH, ctx.temperature).sub_(logz_N[a:b, None]).exp_()
            on_CK = p_CV.gather(-1, ids_CK).mul_(c_C1)
            grad_CV = p_CV.mul_(off_C1).scatter_(-1, ids_CK, on_CK).scatter_add_(-1, ids_CK, -p_t_CK)
            return grad_CV.mul_(g_N[a:b, None])

        return (*_head_backward(ctx, hidden_NH, weight_VH, chunk_grad), None, None, None, None)


def _teacher_head(teacher_weight_VH2: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The teacher's lm-head restricted to the student's vocabulary ids [0, V_s).

    Model families pad the embedding to different multiples (e.g. 151,936 rows for 151,669 tokens);
    rows past V_s are never real tokens the student can emit, so we drop them and renormalise over the
    shared ids. A teacher head smaller than the student's is an error (different tokenizers).
    """
    v_t = teacher_weight_VH2.shape[0]
    if v_t < vocab_size:
        raise ValueError(f"teacher vocabulary ({v_t}) is smaller than the student's ({vocab_size}): "
                         "the two models must share a tokenizer")
    return teacher_weight_VH2[:vocab_size]


def _check_kl_args(direction: str, student_hidden_NH, student_weight_VH, teacher_hidden_NH2, teacher_weight_VH2
                   ) -> torch.Tensor:
    """Validate a full-vocabulary KL call; returns the teacher head sliced to the student's vocabulary."""
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if teacher_hidden_NH2.shape[0] != student_hidden_NH.shape[0]:
        raise ValueError("student and teacher must have the same number of positions")
    return _teacher_head(teacher_weight_VH2, student_weight_VH.shape[0])


def chunked_kl(
    student_hidden_NH: torch.Tensor,
    student_weight_VH: torch.Tensor,
    teacher_hidden_NH2: torch.Tensor,
    teacher_weight_VH2: torch.Tensor,
    *,
    direction: str = "forward",
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact full-vocabulary KL per position, chunked over positions.

        p_s = softmax(student_hidden @ W_s^T / T),   p_t = softmax(teacher_hidden @ W_t[:V_s]^T / T)
        forward: kl_n = sum_v p_t,v (log p_t,v - log p_s,v)      KL(p_t || p_s), mass-covering
        reverse: kl_n = sum_v p_s,v (log p_s,v - log p_t,v)      KL(p_s || p_t), mode-seeking

    The teacher side runs under no_grad (its hidden states may come from a frozen model, or be
    recomputed); the student side is checkpointed per chunk, so only hidden states are kept for
    backward. A teacher head with more rows than the student's is sliced to the student's V and
    renormalised (see `_teacher_head`). Returns kl_N; reduce with `masked_mean`.
    """
    teacher_weight_VH2 = _check_kl_args(direction, student_hidden_NH, student_weight_VH, teacher_hidden_NH2,
                                        teacher_weight_VH2)

    kl_fn = _ForwardKL.apply if direction == "forward" else _ReverseKL.apply

    def chunk_fn(s_h_CH, s_w_VH, t_h_CH2, t_w_VH2):
        s_logits_CV = _logits_CV(s_h_CH, s_w_VH, temperature)
        with torch.no_grad():
            t_logp_CV = _logits_CV(t_h_CH2, t_w_VH2, temperature).to(s_logits_CV.dtype)
            t_logp_CV -= t_logp_CV.logsumexp(-1, keepdim=True)  # log_softmax in place
        return kl_fn(s_logits_CV, t_logp_CV)

    outs = _chunked(chunk_fn, chunk_size, student_hidden_NH.shape[0],
                    (student_hidden_NH, True), (student_weight_VH, False),
                    (teacher_hidden_NH2.detach(), True), (teacher_weight_VH2.detach(), False))
    return _cat(outs, student_hidden_NH)


def _half_mm(b: torch.Tensor) -> bool:
    return HALF_MM_FP32_OUT and b.is_cuda and b.dtype in (torch.bfloat16, torch.float16)


def _gemm_operand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a` as `_mm_f32(a, b)` multiplies it: rounded to b's dtype on the half-precision path (do it once
    for a tensor used in several products), else unchanged."""
    return a.to(b.dtype) if _half_mm(b) else a


@_no_autocast
def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 (or float64) accumulator, the product as `_mm_f32` computes it; in place,
    without a product-sized temporary, unless the operands take the half-precision GEMM."""
    if _half_mm(b):
        acc += _mm_f32(a, b)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@_no_autocast
def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 or wider: a half-precision GEMM with float32 output for bf16/fp16 CUDA operands
    (`a` is cast to b's dtype), else an upcast product."""
    if _half_mm(b):
        try:
            return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
        except RuntimeError:
            pass
    dtype = torch.promote_types(_compute_dtype(b.dtype), a.dtype)
    return torch.mm(a.to(dtype), b.to(dtype))


class _FusedKLHead(torch.autograd.Function):
    """sum_n w_n kl_n (+ sum_n c_n logp_s(y_n)) with the student head's gradient computed during the forward
    pass, chunk by chunk.

    The loss is linear in each kl_n (and each log-prob), so d loss / d logits_n = w_n d kl_n / d logits_n
    (+ c_n (1[v = y_n] - p_s,v)) is known as soon as a chunk's logits are: forward computes it and turns it into the [C, H] hidden-state gradient and a
    running [V, H] float32 head gradient right away, and nothing of size V outlives the chunk. Backward
    only scales those two by the incoming scalar. Against `chunked_kl` under autograd this saves the
    checkpoint's recomputation of both heads (student GEMMs 4 -> 3, teacher 2 -> 1) and the [C, V]
    passes around it; it also returns the student's and teacher's log-prob of each target token, which
    the callers otherwise spend two more head passes on."""

    @staticmethod
    def forward(ctx, s_h_NH, s_w_VH, t_h_NH2, t_w_VH2, weight_N, targets_N, direction, chunk_size, temperature,
                logp_weight_N):
        N = s_h_NH.shape[0]
        grad_h_NH, grad_w_VH = _grad_buffers(ctx, s_h_NH, s_w_VH)
        kl_N = torch.empty(N, dtype=_compute_dtype(s_h_NH.dtype), device=s_h_NH.device)
        s_lp_N, t_lp_N = torch.empty_like(kl_N), torch.empty_like(kl_N)
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            s_h, tgt = s_h_NH[a:b], targets_N[a:b, None]
            # shifted logits z (row max 0), e = exp z, S = sum_v e >= 1: log p = z - log S, p = e / S.
            # The teacher's side first, so at most three [C, V] buffers are alive at once.
            z_t = _logits_CV(t_h_NH2[a:b], t_w_VH2, temperature).to(_compute_dtype(s_h.dtype))
            z_t -= z_t.amax(-1, keepdim=True)
            e_t = z_t.exp()
            s_t = e_t.sum(-1, keepdim=True)
            log_s_t = s_t.log()
            t_lp_N[a:b] = (z_t.gather(-1, tgt) - log_s_t)[:, 0]
            if direction == "reverse":
                del e_t                                 # only its sum is needed
            z_s = _logits_CV(s_h, s_w_VH, temperature)
            z_s -= z_s.amax(-1, keepdim=True)
            s_lp_N[a:b] = z_s.gather(-1, tgt)[:, 0]    # minus log S_s below
            scale = weight_N[a:b, None].to(z_s.dtype) / temperature
            c = logp_weight_N[a:b, None].to(z_s.dtype) / temperature if logp_weight_N is not None else None
            if direction == "forward":
                # kl = sum p_t (log p_t - log p_s) = E_pt[z_t - z_s] - log S_t + log S_s;  d/dz_s = p_s - p_t
                mean_d = _rowdot_C(e_t, z_t.sub_(z_s)) / s_t[:, 0]
                e_s = torch.exp(z_s, out=z_t)           # z_t is spent: its buffer takes exp(z_s)
                del z_s
                s_s = e_s.sum(-1, keepdim=True)
                log_s_s = s_s.log()
                kl = mean_d - log_s_t[:, 0] + log_s_s[:, 0]
                grad = e_s.mul_((scale if c is None else scale - c) / s_s).addcmul_(e_t, -scale / s_t)
                del e_t
            else:
                # with d = z_s - z_t: kl = sum p_s (log p_s - log p_t) = E_ps[d] - log S_s + log S_t;
                # d/dz_s = p_s (d - E_ps[d])
                e_s = z_s.exp()
                s_s = e_s.sum(-1, keepdim=True)
                log_s_s = s_s.log()
                d = torch.sub(z_s, z_t, out=z_t)
                del z_s
                mean_d = _rowdot_C(e_s, d) / s_s[:, 0]
                kl = mean_d - log_s_s[:, 0] + log_s_t[:, 0]
                if c is None:
                    grad = d.sub_(mean_d[:, None]).mul_(e_s).mul_(scale / s_s)
                else:                                   # p_s ((d - E_ps[d]) w - c): one more pass
                    grad = d.sub_(mean_d[:, None]).mul_(scale).sub_(c).mul_(e_s).div_(s_s)
                del e_s
            if c is not None:                           # + c 1[v = y]
                grad.scatter_add_(-1, tgt, c)
            s_lp_N[a:b] -= log_s_s[:, 0]
            kl_N[a:b] = kl
            del z_t
            _add_chunk_grads(grad, a, b, s_h, s_w_VH, grad_h_NH, grad_w_VH)
            del grad
        ctx.save_for_backward(grad_h_NH, grad_w_VH)
        ctx.w_dtype = s_w_VH.dtype
        loss = (kl_N * weight_N.to(kl_N.dtype)).sum()
        if logp_weight_N is not None:
            loss = loss + (s_lp_N * logp_weight_N.to(kl_N.dtype)).sum()
        ctx.mark_non_differentiable(kl_N, s_lp_N, t_lp_N)
        return loss, kl_N, s_lp_N, t_lp_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _kl, _s, _t):
        grad_h_NH, grad_w_VH = ctx.saved_tensors
        grad_h = grad_h_NH * grad_loss.to(grad_h_NH.dtype) if grad_h_NH is not None else None
        grad_w = (grad_w_VH * grad_loss).to(ctx.w_dtype) if grad_w_VH is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def fused_kl_loss(
    student_hidden_NH: torch.Tensor,
    student_weight_VH: torch.Tensor,
    teacher_hidden_NH2: torch.Tensor,
    teacher_weight_VH2: torch.Tensor,
    weight_N: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    direction: str = "forward",
    chunk_size: int = 1024,
    temperature: float = 1.0,
    logp_weight_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss = sum_n weight_n * kl_n (+ sum_n logp_weight_n * log p_s(target_n)) with the full-vocabulary KL
    of `chunked_kl`, and its gradient for the student's hidden states and head computed in the forward
    pass (`_FusedKLHead`).

    Returns (loss, kl_N, student_logp_N, teacher_logp_N): the differentiable scalar, then detached
    per-position KLs and the two models' log-probs of `targets_N` (for metrics). Use it when the loss is
    a fixed weighted sum of the KLs and, optionally, of the sampled tokens' log-probs (kl-warmup
    `--targets full`, opd `--loss full`, its sparse term included); `chunked_kl` is the general
    per-position form. The teacher is never differentiated."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    teacher_weight_VH2 = _check_kl_args(direction, student_hidden_NH, student_weight_VH, teacher_hidden_NH2,
                                        teacher_weight_VH2)
    if not torch.is_grad_enabled():
        student_hidden_NH, student_weight_VH = student_hidden_NH.detach(), student_weight_VH.detach()
    return _FusedKLHead.apply(student_hidden_NH, student_weight_VH, teacher_hidden_NH2.detach(),
                              teacher_weight_VH2.detach(), weight_N.detach(), targets_N.long(), direction,
                              chunk_size, temperature,
                              None if logp_weight_N is None else logp_weight_N.detach())


def reverse_kl_topk(
    student_hidden_NH: torch.Tensor,
    student_weight_VH: torch.Tensor,
    teacher_hidden_NH2: torch.Tensor,
    teacher_weight_VH2: torch.Tensor,
    *,
    k: int,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    targets_N: torch.Tensor | None = None,
):
    """Reverse KL on the student's top-K support plus one tail bucket per side, per position.

        S_n = top-K ids of the student's logits (chosen without gradient)
        kl_n = sum_{v in S_n} p_s,v (log p_s,v - log p_t,v)
               + p_s,tail (log p_s,tail - log p_t,tail),   p_.,tail = mass outside S_n (+ TINY)

    This is the exact KL between the two distributions coarsened to K+1 buckets, so it is >= 0 and
    <= the full reverse KL; with k = V it equals `chunked_kl(direction="reverse")`. The teacher is never
    differentiated; its head is handled as in `chunked_kl`. Closed-form backward (`_ReverseKLTopK`).
    Returns kl_N (with `targets_N`: see `reverse_kl_topk_and_logprobs`).
    """
    v_s = student_weight_VH.shape[0]
    if not 1 <= k <= v_s:
        raise ValueError(f"k must be in [1, {v_s}], got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    teacher_weight_VH2 = _check_kl_args("reverse", student_hidden_NH, student_weight_VH, teacher_hidden_NH2,
                                        teacher_weight_VH2)
    if not torch.is_grad_enabled():
        student_hidden_NH, student_weight_VH = student_hidden_NH.detach(), student_weight_VH.detach()
    kl_N, logp_N, teacher_logp_N = _ReverseKLTopK.apply(student_hidden_NH, student_weight_VH,
                                                        teacher_hidden_NH2.detach(), teacher_weight_VH2.detach(),
                                                        targets_N, k, chunk_size, temperature)
    return kl_N if targets_N is None else (kl_N, logp_N, teacher_logp_N)


def reverse_kl_topk_and_logprobs(
    student_hidden_NH: torch.Tensor,
    student_weight_VH: torch.Tensor,
    teacher_hidden_NH2: torch.Tensor,
    teacher_weight_VH2: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    k: int,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`reverse_kl_topk`, and from the same head passes the student's and the teacher's log-probs of
    `targets_N` (opd's sampled tokens): (kl_N, logp_N, teacher_logp_N). kl_N and logp_N are differentiable
    in the student's hidden states and head; teacher_logp_N is not."""
    if targets_N.shape != student_hidden_NH.shape[:1]:
        raise ValueError(f"targets {tuple(targets_N.shape)} must be [N] for N = {student_hidden_NH.shape[0]}")
    return reverse_kl_topk(student_hidden_NH, student_weight_VH, teacher_hidden_NH2, teacher_weight_VH2, k=k,
                           chunk_size=chunk_size, temperature=temperature, targets_N=targets_N.long())


class _ReverseKLTopK(torch.autograd.Function):
    """`reverse_kl_topk` chunk by chunk, keeping for backward per position only the K ids, the K student
    log-probs and log-ratios, the log-normaliser, the tail log-ratio and the KL. With targets it also
    returns both models' log-probs of them, read off the same logits.

    Both distributions are coarsened to K + 1 buckets (the student's top-K ids, then the rest), and
        kl = sum_b q_s,b r_b,   r_b = log q_s,b - log q_t,b
        d kl / d z_v = p_s,v (r_b(v) - kl - TINY)   (the TINY: the tail's floor mass, see _softmax_parts)
        d logp(y) / d z_v = 1[v = y] - p_s,v
    so backward recomputes the chunk's student logits (one GEMM), turns them into p_s in place, scales
    each row by its tail term, writes the K top-K entries over it and adds the targets' one-hot term.
    Checkpointing the chunk under autograd instead ran its forward twice (teacher GEMM included) and
    backpropagated through two logsumexps, a scattered copy and the gathers."""

    @staticmethod
    def forward(ctx, s_h_NH, s_w_VH, t_h_NH2, t_w_VH2, targets_N, k, chunk_size, temperature):
        N = s_h_NH.shape[0]
        dtype = _compute_dtype(s_h_NH.dtype)
        kl_N, logz_N, r_tail_N = (torch.empty(N, dtype=dtype, device=s_h_NH.device) for _ in range(3))
        n_lp = N if targets_N is not None else 0
        s_lp_N, t_lp_N = (torch.empty(n_lp, dtype=dtype, device=s_h_NH.device) for _ in range(2))
        ids_NK = torch.empty(N, k, dtype=torch.long, device=s_h_NH.device)
        s_logp_NK = torch.empty(N, k, dtype=dtype, device=s_h_NH.device)
        r_NK = torch.empty_like(s_logp_NK)
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            tgt = targets_N[a:b, None] if targets_N is not None else None
            ids, logz, s_logp, s_lp, s_tail = _softmax_parts(_logits_CV(s_h_NH[a:b], s_w_VH, temperature), None, k,
                                                             tgt)
            _, _, t_logp, t_lp, t_tail = _softmax_parts(_logits_CV(t_h_NH2[a:b], t_w_VH2, temperature).to(dtype),
                                                        ids, k, tgt)
            r, r_tail = s_logp - t_logp, s_tail - t_tail
            kl_N[a:b] = (s_logp.exp() * r).sum(-1) + s_tail.exp() * r_tail
            ids_NK[a:b], logz_N[a:b], s_logp_NK[a:b], r_NK[a:b], r_tail_N[a:b] = ids, logz, s_logp, r, r_tail
            if tgt is not None:
                s_lp_N[a:b], t_lp_N[a:b] = s_lp, t_lp
        ctx.save_for_backward(s_h_NH, s_w_VH, ids_NK, logz_N, s_logp_NK, r_NK, r_tail_N, kl_N, targets_N)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.mark_non_differentiable(t_lp_N)
        ctx.set_materialize_grads(False)
        return kl_N, s_lp_N, t_lp_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl_N, grad_lp_N, _grad_t):
        s_h_NH, s_w_VH, ids_NK, logz_N, s_logp_NK, r_NK, r_tail_N, kl_N, targets_N = ctx.saved_tensors
        # z = h W^T / T: both products carry 1 / T
        g_N = (grad_kl_N / ctx.temperature).to(kl_N.dtype) if grad_kl_N is not None else torch.zeros_like(kl_N)
        g_lp_N = (grad_lp_N / ctx.temperature).to(kl_N.dtype) if grad_lp_N is not None else None
        base_N = kl_N + TINY

        def chunk_grad(a, b, h_CH):
            g_C1 = g_N[a:b, None]
            row_C1 = g_C1 * (r_tail_N[a:b] - base_N[a:b])[:, None]
            top_CK = s_logp_NK[a:b].exp() * (r_NK[a:b] - base_N[a:b, None]) * g_C1
            if g_lp_N is not None:                             # + g (1[v = y] - p_s,v)
                row_C1 = row_C1 - g_lp_N[a:b, None]
                top_CK = top_CK - s_logp_NK[a:b].exp() * g_lp_N[a:b, None]
            grad_CV = _logits_CV(h_CH, s_w_VH, ctx.temperature).sub_(logz_N[a:b, None]).exp_().mul_(row_C1)
            grad_CV.scatter_(-1, ids_NK[a:b], top_CK)
            if g_lp_N is not None:
                grad_CV.scatter_add_(-1, targets_N[a:b, None], g_lp_N[a:b, None])
            return grad_CV

        return (*_head_backward(ctx, s_h_NH, s_w_VH, chunk_grad), None, None, None, None, None, None)


def reverse_kl_on_support(
    student_hidden_NH: torch.Tensor,
    student_weight_VH: torch.Tensor,
    ids_NK: torch.Tensor,
    teacher_logp_NK: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse KL on a support the *teacher* chose (its top-K ids, e.g. from a served teacher's prompt
    log-probs), plus one tail bucket per side, per position; and the student's log-probs of `targets_N`.

        q_s,k = p_s(ids_k)                 q_s,tail = mass outside the ids (+ TINY, `_softmax_parts`)
        q_t,k = exp(teacher_logp_k)        q_t,tail = max(1 - sum_k q_t,k, 0) + TINY
        kl_n = sum_k q_s,k (log q_s,k - log q_t,k) + q_s,tail (log q_s,tail - log q_t,tail)

    The exact KL between the two distributions coarsened to K + 1 buckets, like `reverse_kl_topk`
    (whose K ids are the student's, which a server cannot score): >= 0 and <= the full reverse KL. The
    ids must be distinct per row and < V. Returns (kl_N, logp_N), both differentiable in the student's
    hidden states and head; the backward is `_ReverseKLTopK`'s (it holds for any fixed ids)."""
    if not (ids_NK.shape == teacher_logp_NK.shape and ids_NK.shape[0] == student_hidden_NH.shape[0]
            and targets_N.shape == student_hidden_NH.shape[:1]):
        raise ValueError(f"ids {tuple(ids_NK.shape)} and teacher log-probs {tuple(teacher_logp_NK.shape)} must be "
                         f"[N, K] and targets {tuple(targets_N.shape)} [N] for N = {student_hidden_NH.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not torch.is_grad_enabled():
        student_hidden_NH, student_weight_VH = student_hidden_NH.detach(), student_weight_VH.detach()
    return _ReverseKLGivenSupport.apply(student_hidden_NH, student_weight_VH, ids_NK.long(),
                                        teacher_logp_NK.detach(), targets_N.long(), chunk_size, temperature)


class _ReverseKLGivenSupport(torch.autograd.Function):
    """`reverse_kl_on_support`: `_ReverseKLTopK`'s forward with the ids and the teacher's log-probs at
    them given, saving what its backward reads."""

    @staticmethod
    def forward(ctx, s_h_NH, s_w_VH, ids_NK, t_logp_NK, targets_N, chunk_size, temperature):
        N, K = ids_NK.shape
        dtype = _compute_dtype(s_h_NH.dtype)
        kl_N, logz_N, r_tail_N, s_lp_N = (torch.empty(N, dtype=dtype, device=s_h_NH.device) for _ in range(4))
        s_logp_NK = torch.empty(N, K, dtype=dtype, device=s_h_NH.device)
        r_NK = torch.empty_like(s_logp_NK)
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            _, logz, s_logp, s_lp, s_tail = _softmax_parts(_logits_CV(s_h_NH[a:b], s_w_VH, temperature),
                                                           ids_NK[a:b], K, targets_N[a:b, None])
            t_logp = t_logp_NK[a:b].to(dtype)
            t_tail = ((1.0 - t_logp.exp().sum(-1)).clamp_min(0.0) + TINY).log()
            r, r_tail = s_logp - t_logp, s_tail - t_tail
            kl_N[a:b] = (s_logp.exp() * r).sum(-1) + s_tail.exp() * r_tail
            logz_N[a:b], s_logp_NK[a:b], r_NK[a:b], r_tail_N[a:b], s_lp_N[a:b] = logz, s_logp, r, r_tail, s_lp
        ctx.save_for_backward(s_h_NH, s_w_VH, ids_NK, logz_N, s_logp_NK, r_NK, r_tail_N, kl_N, targets_N)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.set_materialize_grads(False)
        return kl_N, s_lp_N

    @staticmethod
    def backward(ctx, grad_kl_N, grad_lp_N):
        return _ReverseKLTopK.backward(ctx, grad_kl_N, grad_lp_N, None)[:7]


@torch.no_grad()
def topk_logprobs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor, *, k: int,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a served teacher's prompt log-probs give, from an in-process model: per position the
    log-prob of the target, and the top-k ids and their log-probs (descending), chunked over positions.
    Returns (logp_N, ids_NK, logp_NK); no gradient."""
    N = hidden_NH.shape[0]
    dtype = _compute_dtype(hidden_NH.dtype)
    logp_N = torch.empty(N, dtype=dtype, device=hidden_NH.device)
    ids_NK = torch.empty(N, k, dtype=torch.long, device=hidden_NH.device)
    logp_NK = torch.empty(N, k, dtype=dtype, device=hidden_NH.device)
    for a in range(0, N, chunk_size):
        b = min(a + chunk_size, N)
        lp_CV = _logits_CV(hidden_NH[a:b], weight_VH, 1.0).log_softmax(-1)
        logp_N[a:b] = lp_CV.gather(-1, targets_N[a:b, None].long())[:, 0]
        logp_NK[a:b], ids_NK[a:b] = lp_CV.topk(k, dim=-1)
    return logp_N, ids_NK, logp_NK
