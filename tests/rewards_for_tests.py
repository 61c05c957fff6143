"""Rewards used by the tests (importable as `rewards_for_tests:...` with tests/ on sys.path)."""


def starts_with_digit(completion: str, answer: str | None) -> float:
    """1.0 when the completion's first non-space character is a digit: learnable in a few steps."""
    text = completion.lstrip()
    return 1.0 if text[:1].isdigit() else 0.0


def starts_with_vowel(completion: str, answer: str | None) -> float:
    """1.0 when the first non-space character is a vowel: ~16% of a random-init tiny model's first
    tokens (measured on the toy prompts), so a group of 8 usually holds both outcomes."""
    text = completion.lstrip()
    return 1.0 if text[:1] in tuple("aeiouAEIOU") else 0.0


_calls = [0]


def fails_on_call_17(completion: str, answer: str | None) -> float:
    """Like starts_with_vowel until its 17th call, then a crash (a reward server going down mid-run)."""
    _calls[0] += 1
    if _calls[0] == 17:
        raise RuntimeError("reward backend went away")
    return starts_with_vowel(completion, answer)


def broken_pipe(completion: str, answer: str | None) -> float:
    """A reward whose own pipe (to a server, a subprocess) broke: not the shell's stdout."""
    raise BrokenPipeError(32, "Broken pipe")
