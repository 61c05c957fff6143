"""A teacher that never enters training memory: a vLLM OpenAI-compatible server scores the student's samples.

    python -m vllm.entrypoints.openai.api_server --model runs/teacher-grpo/model --port 8000 \\
           --max-logprobs 64                                 # `vllm serve M ...` on GPU hosts; --tensor-parallel-size 8
    s2d opd --student runs/student-kl/model --teacher http://127.0.0.1:8000/v1 --loss topk --topk-k 64 ...

Scoring is vLLM's prompt log-probs: one `POST /v1/completions` carries many sequences as token ids
(`"prompt": [[ids], ...]`, `"max_tokens": 1`, `"prompt_logprobs": K`), and returns, for every position
after the first, the log-prob of the token there and the teacher's top-K (normalised over the teacher's
whole vocabulary). That is everything `opd --loss sampled` (the sampled token's log-prob) and
`--loss topk` (reverse KL on the teacher's top-K ids plus a tail bucket, `losses.reverse_kl_on_support`)
need; a server never returns the whole vocabulary, so `--loss full` needs an in-process teacher.

Preflight (`ServedTeacher.preflight`, before the first step and before the run directory exists):
  - `GET /v1/models`: the served model's name (recorded in the manifest) and its context length;
  - `POST /tokenize` on rendered prompts and the student's eos/pad tokens: the server's tokenizer must
    give the student's ids (dense KLs compare token id by token id);
  - self-test: a few fixed sequences scored twice, in two requests of different batch composition; a
    teacher whose log-probs disagree with themselves by more than `selftest_tol` is refused (it would
    turn the per-token OPD signal into noise).

Everything the server returns is untrusted: JSON shape, one choice per sequence, one entry per position,
token ids (integers below the student's head rows, the sampled token present, K distinct top-K ids),
log-probs finite and <= 0, top-K mass <= 1. A violation, an unreachable server, a timeout, an HTTP error
(5xx, 408, 429) or unreadable JSON is retried with exponential backoff `retries` times, then becomes one
`UsageError` naming the URL (exit 2); a trainer's run directory keeps its checkpoints, so rerunning the
command once the server is back resumes. Other 4xx answers (a bad request, say K above the server's
`--max-logprobs`) are not retried. HTTP is the standard library's (urllib); requests are cut at
`max_request_tokens` and sent a few at a time, so the server batches across them.

Deliberately left out: chat-completions scoring (token ids in, no template on the server side),
cross-tokenizer teachers, authentication beyond an `OPENAI_API_KEY`/`VLLM_API_KEY` bearer token, and
several models on one server (the first one listed is used).
"""
from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import UsageError

RETRY_STATUS = (408, 429, 500, 502, 503, 504)   # HTTP answers worth another try; other 4xx are the request's fault
SELFTEST_SEQUENCES = 4                          # fixed sequences scored twice by the self-test
TOKENIZER_PROBES = 16                           # rendered prompts the tokenizer check sends to /tokenize


def is_served(ref: str | None) -> bool:
    """Whether a --teacher value names a server (http:// or https://) rather than a checkpoint."""
    return bool(ref) and str(ref).startswith(("http://", "https://"))


class ServerError(Exception):
    """A failed exchange with the server: `retry` says whether another try could help."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


@dataclass
class TokenScores:
    """The teacher's view of one sequence's completion tokens (n of them)."""
    logp: torch.Tensor                    # [n] log-prob of each completion token
    topk_ids: torch.Tensor | None = None  # [n, K] the teacher's top-K ids, likeliest first (K > 0 only)
    topk_logp: torch.Tensor | None = None  # [n, K] their log-probs


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


class ServedTeacher:
    """Client of one vLLM server. `vocab`: the student's head rows (every id the server names must be a
    row of the student); `k`: top-K per position (0: the sampled token's log-prob only)."""

    def __init__(self, url: str, *, vocab: int, k: int = 0, timeout: float = 120.0, retries: int = 3,
                 max_request_tokens: int = 8192, parallel: int = 4, backoff: float = 0.5):
        base = url.rstrip("/")
        self.root = base[:-3] if base.endswith("/v1") else base
        self.url = self.root + "/v1"
        self.vocab, self.k = vocab, k
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_request_tokens, self.parallel = max_request_tokens, parallel
        self.model: str | None = None
        self.max_model_len: int | None = None
        key = os.environ.get("VLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self._headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    # -- HTTP -----------------------------------------------------------------------------------------
    def _exchange(self, path: str, body: dict | None) -> object:
        """One request, its JSON answer; ServerError on anything but a readable 200."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data=data, headers=self._headers,
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read() or b"{}")
                detail = (detail.get("error") or {}).get("message") or detail.get("message") or detail.get("detail") \
                    if isinstance(detail, dict) else detail
            except (ValueError, OSError, AttributeError):
                detail = e.reason
            raise ServerError(f"HTTP {e.code} on {path}: {_one_line(detail or e.reason)}",
                              retry=e.code in RETRY_STATUS) from None
        except TimeoutError:
            raise ServerError(f"no answer on {path} within {self.timeout:g} s") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # refused, reset, torn
            reason = getattr(e, "reason", e)
            raise ServerError(f"unreachable ({_one_line(reason) or type(e).__name__})") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"{path} answered something that is not JSON ({len(raw)} bytes)") from None

    def _call(self, path: str, body: dict | None, check=lambda answer: answer):
        """`check(answer)` of the first good exchange; retried with backoff, then one UsageError."""
        for attempt in range(self.retries + 1):
            try:
                return check(self._exchange(path, body))
            except ServerError as e:
                if not e.retry or attempt == self.retries:
                    tries = "" if attempt == 0 else f" after {attempt + 1} tries"
                    raise UsageError(f"teacher server {self.url}: {e}{tries}") from None
                time.sleep(min(self.backoff * 2 ** attempt, 30.0))

    # -- preflight ------------------------------------------------------------------------------------
    def connect(self) -> str:
        """The served model's name, from /v1/models."""
        def check(answer):
            models = answer.get("data") if isinstance(answer, dict) else None
            if not isinstance(models, list) or not models or not isinstance(models[0], dict) \
                    or not isinstance(models[0].get("id"), str):
                raise ServerError("/v1/models: expected {'data': [{'id': ...}, ...]}")
            return models[0]

        first = self._call("/v1/models", None, check)
        self.model = first["id"]
        mml = first.get("max_model_len")
        self.max_model_len = mml if isinstance(mml, int) and not isinstance(mml, bool) and mml > 0 else None
        return self.model

    def check_tokenizer(self, tokenizer, texts: list[str], *, chat_rendered: bool) -> None:
        """The server's /tokenize gives the student's ids for each rendered prompt and for the special
        tokens; one UsageError naming the first difference."""
        probes = [(t, not chat_rendered, f"prompt {i + 1}") for i, t in enumerate(texts[:TOKENIZER_PROBES])]
        for name in ("eos", "pad"):
            token = getattr(tokenizer, f"{name}_token", None)
            if token:
                probes.append((token, False, f"the {name} token {token!r}"))
        for text, special, what in probes:
            want = tokenizer(text, add_special_tokens=special)["input_ids"]

            def check(answer):
                tokens = answer.get("tokens") if isinstance(answer, dict) else None
                if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
                    raise ServerError("/tokenize: expected {'tokens': [ids]}")
                return tokens

            got = self._call("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": special}, check)
            if got != want:
                i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                a = want[i] if i < len(want) else "(end)"
                b = got[i] if i < len(got) else "(end)"
                raise UsageError(f"teacher server {self.url} ({self.model}) tokenizes {what} differently from the "
                                 f"student: token {i + 1} is {b} there, {a} for the student ({len(got)} vs {len(want)} "
                                 "tokens); dense KLs need one shared tokenizer")

    def self_test(self, sequences: list[list[int]], tol: float) -> float:
        """Score `sequences` (prompt ids; each position after the first is a target) in one request, then
        again one request each in reverse order; the largest log-prob difference, refused above `tol`."""
        seqs = [s for s in sequences if len(s) >= 2][:SELFTEST_SEQUENCES]
        if not seqs:
            return 0.0
        split = [(s[:1], s[1:]) for s in seqs]
        first = self.score(split)
        again = [self.score([pc])[0] for pc in reversed(split)][::-1]
        diff = 0.0
        for a, b in zip(first, again):
            diff = max(diff, float((a.logp - b.logp).abs().max()))
            if a.topk_logp is not None:
                diff = max(diff, float((a.topk_logp - b.topk_logp).abs().max()))
        if not diff <= tol:
            raise UsageError(f"teacher server {self.url} ({self.model}) disagrees with itself: the same sequences "
                             f"scored twice differ by {diff:.3g} nats in log-prob (tolerance {tol:g}); its per-token "
                             "signal would be noise (batch-variant kernels? serve it in float32 or with "
                             "deterministic settings)")
        return diff

    def preflight(self, tokenizer, texts: list[str], prompt_ids: list[list[int]], *, chat_rendered: bool,
                  selftest_tol: float) -> dict:
        """connect + check_tokenizer + self_test; what the manifest records."""
        model = self.connect()
        self.check_tokenizer(tokenizer, texts, chat_rendered=chat_rendered)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        diff = self.self_test([list(p) + eos for p in prompt_ids], selftest_tol)
        return {"url": self.url, "model": model, "max_model_len": self.max_model_len, "topk": self.k,
                "selftest_max_diff": diff}

    # -- scoring --------------------------------------------------------------------------------------
    def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[TokenScores]:
        """The teacher's log-probs of each (prompt_ids, completion_ids)'s completion tokens (and top-K)."""
        if not sequences:
            return []
        if self.model is None:
            self.connect()
        for p, c in sequences:
            if not p:
                raise ValueError("a sequence needs at least one prompt token")
            if self.max_model_len is not None and len(p) + len(c) >= self.max_model_len:
                raise UsageError(f"teacher server {self.url} ({self.model}): a sequence of {len(p) + len(c)} tokens "
                                 f"does not fit its max_model_len {self.max_model_len} (with the one token it "
                                 "generates); serve it with a longer --max-model-len")
        requests, size = [[]], 0
        for i, (p, c) in enumerate(sequences):
            n = len(p) + len(c)
            if requests[-1] and size + n > self.max_request_tokens:
                requests.append([])
                size = 0
            requests[-1].append(i)
            size += n
        if len(requests) == 1 or self.parallel <= 1:
            parts = [self._score_request([sequences[i] for i in r]) for r in requests]
        else:
            with ThreadPoolExecutor(min(self.parallel, len(requests))) as pool:
                parts = list(pool.map(lambda r: self._score_request([sequences[i] for i in r]), requests))
        return [s for part in parts for s in part]

    def attach(self, sequences) -> None:
        """Score trainer `Sequence`s and store the answer as their per-token data: `teacher_logp` [n], and
        `teacher_topk_ids` / `teacher_topk_logp` [n, K] when K > 0 (packed into micro-batches with them)."""
        for s, sc in zip(sequences, self.score([(s.prompt_ids, s.completion_ids) for s in sequences])):
            s.token_data["teacher_logp"] = sc.logp
            if sc.topk_ids is not None:
                s.token_data["teacher_topk_ids"] = sc.topk_ids
                s.token_data["teacher_topk_logp"] = sc.topk_logp

    def _score_request(self, sequences: list[tuple[list[int], list[int]]]) -> list[TokenScores]:
        body = {"model": self.model, "prompt": [list(p) + list(c) for p, c in sequences], "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": self.k}
        return self._call("/v1/completions", body, lambda answer: self._parse(answer, sequences))

    def _parse(self, answer, sequences: list[tuple[list[int], list[int]]]) -> list[TokenScores]:
        """The scores of `sequences` from a completions answer, every field checked (ServerError if not)."""
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(sequences):
            got = len(choices) if isinstance(choices, list) else "no"
            raise ServerError(f"/v1/completions: {got} choices for {len(sequences)} sequences")
        by_index: dict[int, list] = {}
        for ch in choices:
            idx = ch.get("index") if isinstance(ch, dict) else None
            if not _is_int(idx) or not 0 <= idx < len(sequences) or idx in by_index:
                raise ServerError("/v1/completions: choices without a distinct index per sequence")
            by_index[idx] = ch.get("prompt_logprobs")
        return [self._parse_one(by_index[i], p, c) for i, (p, c) in enumerate(sequences)]

    def _parse_one(self, entries, prompt: list[int], completion: list[int]) -> TokenScores:
        ids = list(prompt) + list(completion)
        if not isinstance(entries, list) or len(entries) != len(ids):
            got = len(entries) if isinstance(entries, list) else "no"
            raise ServerError(f"/v1/completions: {got} prompt log-prob entries for a {len(ids)}-token sequence")
        k, n, start = self.k, len(completion), len(prompt)
        logp = [0.0] * n
        topk_ids = [[0] * k for _ in range(n)] if k else None
        topk_logp = [[0.0] * k for _ in range(n)] if k else None
        for j in range(n):
            entry, token = entries[start + j], ids[start + j]
            if not isinstance(entry, dict) or not k <= len(entry) <= k + 1:
                raise ServerError(f"/v1/completions: position {start + j}: expected {k} or {k + 1} log-probs")
            parsed = []
            for key, value in entry.items():
                lp = value.get("logprob") if isinstance(value, dict) else None
                if not (isinstance(key, str) and key.isdigit() and str(int(key)) == key and int(key) < self.vocab):
                    raise ServerError(f"/v1/completions: position {start + j}: token id {_one_line(key, 20)!r} is "
                                      f"not one of the student's {self.vocab} rows")
                if not (isinstance(lp, (int, float)) and not isinstance(lp, bool) and math.isfinite(lp) and lp <= 1e-4):
                    raise ServerError(f"/v1/completions: position {start + j}: log-prob {_one_line(lp, 20)} is not a "
                                      "finite number <= 0")
                parsed.append((min(float(lp), 0.0), int(key)))
            own = next((lp for lp, t in parsed if t == token), None)
            if own is None:
                raise ServerError(f"/v1/completions: position {start + j}: no log-prob for the token there ({token})")
            logp[j] = own
            if k:
                parsed.sort(key=lambda x: -x[0])
                top = parsed[:k]
                if sum(math.exp(lp) for lp, _ in top) > 1.0 + 1e-3:
                    raise ServerError(f"/v1/completions: position {start + j}: top-{k} probabilities sum past 1")
                topk_logp[j] = [lp for lp, _ in top]
                topk_ids[j] = [t for _, t in top]
        return TokenScores(torch.tensor(logp, dtype=torch.float32),
                           torch.tensor(topk_ids, dtype=torch.long).view(n, k) if k else None,
                           torch.tensor(topk_logp, dtype=torch.float32).view(n, k) if k else None)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
