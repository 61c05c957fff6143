"""Sequence rewards for grpo: the math verifier by default, or a user function.

    --reward math                       verifier reward (1.0 correct, 0.0 otherwise)
    --reward my_pkg.rewards:fn          fn(completion: str, answer: str | None) -> float, imported by
                                        name (your code, your choice to run it; model output is
                                        passed as a string and never executed by s2d)
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

from .errors import UsageError


def load_reward_fn(spec: str) -> Callable[[str, str | None], float] | None:
    """None for the built-in verifier; else the imported function."""
    if spec == "math":
        return None
    if ":" not in spec:
        raise UsageError(f"--reward: expected 'math' or 'module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # not found, a SyntaxError, or anything the module raises while it loads
        detail = (str(e).splitlines() or [""])[0]
        raise UsageError(f"--reward {spec}: cannot import module {module!r} ({type(e).__name__}: {detail})") from None
    try:
        fn = getattr(mod, name)
    except AttributeError:
        raise UsageError(f"--reward {spec}: module {module!r} has no attribute {name!r}") from None
    if not callable(fn):
        raise UsageError(f"--reward {spec}: not a function")
    return fn
