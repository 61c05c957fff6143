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
