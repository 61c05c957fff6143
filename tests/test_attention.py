"""The shared-prefix layout (`s2d_cli.attention`): a packed row with each prompt once gives the log-probs
and gradients of padded rows (each sequence on its own), and leaves every other forward of the model as
it was."""
from __future__ import annotations

import json

import pytest
import torch

from s2d_cli import attention
from s2d_cli.losses import chunked_token_logprobs
from s2d_cli.models import load_model, save_checkpoint
from s2d_cli.trainer import Sequence, hidden_at, pack

A, B = [10, 11, 12], [13, 14]


def hand_batch() -> list[Sequence]:
    return [Sequence(A, [20, 21]), Sequence(A, [22]), Sequence(B, [23, 24, 25]), Sequence(A, [26])]


def test_shared_layout_by_hand():
    (mb,) = pack(hand_batch(), 1000, layout="shared")
    # group A (prompt once, then its three completions), then group B
    assert mb.input_ids.tolist() == [[10, 11, 12, 20, 21, 22, 26, 13, 14, 23, 24, 25]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 3, 0, 1, 2, 3, 4]]
    # every completion's first token is predicted by its prompt's last token (row position 2 or 8)
    assert mb.pred_pos.tolist() == [2, 3, 2, 2, 8, 9, 10]
    assert mb.targets.tolist() == [20, 21, 22, 26, 23, 24, 25]
    assert mb.seq_idx.tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert mb.tok_idx.tolist() == [0, 1, 0, 0, 0, 1, 2]
    assert [s.completion_ids for s in mb.sequences] == [[20, 21], [22], [26], [23, 24, 25]]
    assert mb.segments.groups == [(3, [2, 1, 1]), (2, [3])]
    sizes, calls = mb.segments.blocks(torch.device("cpu"))
    assert sizes == [3, 2, 1, 1, 5]                     # prompt A, its completions, then B as one causal block
    assert [c[0] for c in calls] == [None, 0, 0, 0, None]
    assert calls[1][1].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_shared_layout_splits_groups_over_the_budget():
    micro = pack(hand_batch(), 6, layout="shared")
    # group A is 3 + 2 + 1 + 1 = 7 tokens: cut into [20 21, 22] (6 tokens) and [26] (4), each with the prompt
    assert [mb.segments.groups for mb in micro] == [[(3, [2, 1])], [(2, [3])], [(3, [1])]]
    assert [mb.input_ids.shape[1] for mb in micro] == [6, 5, 4]


@pytest.fixture(params=["qwen3", "llama"])
def model_dir(request, tiny_model_dir, tiny_llama_dir):
    return tiny_model_dir if request.param == "qwen3" else tiny_llama_dir


def random_batch(vocab: int) -> list[Sequence]:
    """Three prompt groups (sizes 4, 1, 3, one completion empty) in mixed order."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 12, 4)]
    spec = [(0, 9), (1, 5), (0, 1), (2, 14), (0, 6), (2, 3), (0, 0), (2, 8)]
    return [Sequence(list(prompts[p]), torch.randint(3, vocab, (n,), generator=g).tolist()) for p, n in spec]


def logprobs_and_grads(lm, seqs: list[Sequence], layout: str, budget: int = 10_000):
    """Per-sequence token log-probs (by identity of the Sequence) and the gradient of a weighted sum."""
    lm.zero_grad(set_to_none=True)
    weights = {id(s): 0.1 * (k + 1) for k, s in enumerate(seqs)}
    out = {}
    for mb in pack(seqs, budget, layout=layout):
        logp_M, _ = chunked_token_logprobs(hidden_at(lm, mb), lm.get_output_embeddings().weight, mb.targets)
        w_M = torch.tensor([weights[id(mb.sequences[i])] for i in mb.seq_idx.tolist()])
        (logp_M * w_M).sum().backward()
        for k, s in enumerate(mb.sequences):
            out[id(s)] = logp_M.detach()[mb.seq_idx == k]
    return out, {n: p.grad.clone() for n, p in lm.named_parameters()}


@pytest.mark.parametrize("budget", [10_000, 25])
def test_shared_equals_padded(model_dir, budget):
    lm = load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    seqs = random_batch(lm.config.vocab_size)
    padded, padded_grads = logprobs_and_grads(lm, seqs, "padded", budget)
    attention.enable(lm)
    shared, shared_grads = logprobs_and_grads(lm, seqs, "shared", budget)
    # budget 25: prompt groups of 23, 17 and 29 tokens, the last cut into 21 + 12: four micro-batches
    assert len(pack(seqs, budget, layout="shared")) == (1 if budget == 10_000 else 4)
    for s in seqs:
        assert shared[id(s)].shape == (len(s.completion_ids),)
        torch.testing.assert_close(shared[id(s)], padded[id(s)], atol=1e-5, rtol=0)
    for name, g in padded_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-4, atol=1e-6 * max(1.0, float(g.abs().max())))


def test_shared_rows_refuse_a_model_without_the_layout(tiny_model_dir):
    """Plain sdpa would see the packed row as separate sequences (completions cut off from their
    prompt) and return wrong hidden states without a word: refused instead."""
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    (mb,) = pack(hand_batch(), 1000, layout="shared")
    with pytest.raises(RuntimeError, match="attention.enable"):
        hidden_at(lm, mb)


def test_shared_with_gradient_checkpointing(tiny_model_dir):
    """Checkpointing recomputes each layer during backward, outside `attention.active`: the layout
    travels as the layer's saved attention_mask argument, so the gradients are the same."""
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    attention.enable(lm)
    seqs = random_batch(lm.config.vocab_size)
    lm.train()
    _, plain = logprobs_and_grads(lm, seqs, "shared")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, ckpt = logprobs_and_grads(lm, seqs, "shared")
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7)


def test_enabled_model_runs_other_forwards_unchanged(tiny_model_dir, tmp_path):
    """Outside a shared micro-batch (generation, a left-padded prefill) the model is plain sdpa, and a
    checkpoint saved from it loads anywhere (no s2d attention name in its config)."""
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        before = lm(input_ids=ids, attention_mask=mask).logits
        gen_before = lm.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        attention.enable(lm)
        after = lm(input_ids=ids, attention_mask=mask).logits
        gen_after = lm.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert lm.config._attn_implementation == attention.NAME
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert gen_after.tolist() == gen_before.tolist()
    save_checkpoint(lm, None, tmp_path / "saved")
    assert attention.NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "qwen3"


def test_shared_ok(tiny_model_dir, monkeypatch):
    from transformers import Qwen3Config

    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    assert attention.shared_ok(lm, torch.device("cpu"))
    assert not attention.shared_ok(lm, torch.device("cuda"))       # launch-bound there: padded or flash rows
    monkeypatch.setenv("S2D_SHARED_PREFIX", "0")
    assert not attention.shared_ok(lm, torch.device("cpu"))
    monkeypatch.delenv("S2D_SHARED_PREFIX")

    class Fake:
        def __init__(self, **kw):
            self.config = Qwen3Config(num_hidden_layers=2, **kw)

    assert attention.shared_ok(Fake(), None)
    assert not attention.shared_ok(Fake(use_sliding_window=True, sliding_window=16, max_window_layers=0), None)
    eager = Fake()
    eager.config._attn_implementation = "eager"
    assert not attention.shared_ok(eager, None)


# ------------------------------------------------------------------------------------------------
# packed rows through torch's varlen kernel (`packed_attention`, `varlen_ok`)
#
# The kernel is flash-attention on CUDA only; here it is replaced by `fake_varlen`, which computes what
# the kernel's documentation says it does, with each torch release's keywords (2.9: is_causal; 2.10:
# window_size, scale; 2.12: enable_gqa, required for fewer key/value heads). bench/gpu_check.py runs the
# real one on a GPU.

def _per_sequence(q_THD, k_THD, v_THD, cu, causal, scale):
    sizes = cu.diff().tolist()
    outs = [torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal, scale=scale,
        enable_gqa=q_THD.shape[1] != k_THD.shape[1]).transpose(0, 1)
        for q, k, v in zip(q_THD.split(sizes), k_THD.split(sizes), v_THD.split(sizes))]
    return torch.cat(outs)


def varlen_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[1] == key.shape[1], "no GQA in this release"
    assert max(cu_seq_q.diff().tolist()) == max_q
    return _per_sequence(query, key, value, cu_seq_q, is_causal, None)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    assert query.shape[1] == key.shape[1], "no GQA in this release"
    return _per_sequence(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Try setting enable_gqa=True for GQA.")
    return _per_sequence(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


def _packed_inputs(heads=4, kv_heads=2, lengths=(3, 7, 1, 5), dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = sum(lengths)
    q = torch.randn(1, heads, L, dim, generator=g)
    k, v = torch.randn(1, kv_heads, L, dim, generator=g), torch.randn(1, kv_heads, L, dim, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, list(lengths)


@pytest.mark.parametrize("kernel", [varlen_2_9, varlen_2_10, varlen_2_13])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_packed_attention_is_causal_attention_within_each_sequence(monkeypatch, kernel, scale):
    monkeypatch.setattr(attention, "varlen_kernel", lambda: kernel)
    q, k, v, cu, lengths = _packed_inputs()
    out = attention.packed_attention(q, k, v, cu, max(lengths), scale)
    assert out.shape == (1, sum(lengths), 4, 8)
    # by hand: sequence by sequence, each query attends to its own sequence's keys up to itself
    s = 8 ** -0.5 if scale is None else scale
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for t in range(a, b):
            for h in range(4):
                kh = h // 2                                          # GQA: query heads 0-1 read kv head 0
                w = torch.softmax(k[0, kh, a:t + 1] @ q[0, h, t] * s, 0)
                torch.testing.assert_close(out[0, t, h], w @ v[0, kh, a:t + 1], atol=1e-6, rtol=1e-5)


def test_packed_attention_refuses_what_the_kernel_cannot_do(monkeypatch):
    q, k, v, cu, lengths = _packed_inputs()
    monkeypatch.setattr(attention, "varlen_kernel", lambda: None)
    with pytest.raises(RuntimeError, match="torch.nn.attention.varlen"):
        attention.packed_attention(q, k, v, cu, max(lengths), None)
    monkeypatch.setattr(attention, "varlen_kernel", lambda: varlen_2_13)
    with pytest.raises(NotImplementedError, match="dropout"):
        attention.packed_attention(q, k, v, cu, max(lengths), None, dropout=0.1)


def test_kernel_agrees_only_with_a_kernel_that_computes_causal_attention(monkeypatch):
    def non_causal(*args, **kwargs):
        return varlen_2_13(*args, **{**kwargs, "window_size": (-1, -1)})

    def broken(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    for kernel, want in [(varlen_2_13, True), (varlen_2_9, True), (non_causal, False), (broken, False),
                         (None, False)]:
        monkeypatch.setattr(attention, "varlen_kernel", lambda kernel=kernel: kernel)
        attention.kernel_agrees.cache_clear()
        assert attention.kernel_agrees("cpu", torch.float32, 4, 2, 8) is want, kernel
    monkeypatch.setattr(attention, "varlen_kernel", lambda: varlen_2_13)
    attention.kernel_agrees.cache_clear()
    with torch.no_grad():                   # the caller's grad mode does not matter: backward is tested
        assert attention.kernel_agrees("cpu", torch.float32, 4, 4, 8)
    attention.kernel_agrees.cache_clear()


def test_varlen_ok(tiny_model_dir, monkeypatch):
    asked = []
    monkeypatch.setattr(attention, "kernel_agrees", lambda *a: asked.append(a) or True)
    cuda = torch.device("cuda")
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    assert not attention.varlen_ok(lm, cuda)                        # float32: flash kernels take half precision
    assert not attention.varlen_ok(lm.to(torch.bfloat16), torch.device("cpu"))   # no kernel on a CPU
    assert not attention.varlen_ok(lm, None)
    assert asked == []
    cfg = lm.config
    assert attention.varlen_ok(lm, cuda)
    assert asked == [("cpu", torch.bfloat16, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)]
    attention.enable(lm)                                            # the trainer enables it: still fine
    assert attention.varlen_ok(lm, cuda)
    monkeypatch.setenv("S2D_VARLEN", "0")
    assert not attention.varlen_ok(lm, cuda)
    monkeypatch.delenv("S2D_VARLEN")
    lm.config.attention_dropout = 0.1                               # the kernel has no dropout
    assert not attention.varlen_ok(lm, cuda)
    lm.config.attention_dropout = 0.0
    lm.config._attn_implementation = "eager"
    assert not attention.varlen_ok(lm, cuda)
