"""Two-stage LaTeX parsing for math-verify: ANTLR's fast SLL prediction first, full LL only where it fails.

    from s2d_cli import two_stage_parse
    two_stage_parse.install()      # in the verifier's zygote, before its warm-up (see verifier.py)
    two_stage_parse.installed()    # True

math-verify parses LaTeX with latex2sympy2_extended's ANTLR grammar, whose parser runs in ANTLR's default
LL prediction mode: at every ambiguous decision it simulates the parse with the full call stack, and it
learns its prediction tables (the DFA) one input shape at a time. On MATH answers that is most of a
verifier's CPU: 500 MATH test items take ~4.4 s in a fresh process and ~2.1 s once warm, and 35 % of
the cold time is full-context prediction alone. SLL prediction ignores the call stack; ANTLR documents
that it then either builds exactly the tree LL would have built or reports a syntax error, and that the
way to use it is two-stage: parse in SLL mode, and only on an error parse again in LL mode. latex2sympy's
error listener raises at the first syntax error, so the SLL stage stops there, and the LL stage repeats
the parse from a fresh lexer and parser: same trees, same exceptions, ~1.5x faster cold and ~3x warm.

`install()` wraps `_Latex2Sympy.create_parser`, a private method of latex2sympy2_extended (1.11; every
ANTLR runtime it ships a parser for). Where that method is missing (another version), it changes nothing
and returns False: parsing stays LL, slower but the same.
"""
from __future__ import annotations

_MARK = "_s2d_two_stage"
ll_parses = 0  # parses in this process that SLL could not finish (a syntax error, or a true LL decision)


def install() -> bool:
    """Make every later math-verify parse in this process two-stage. True when it is (also if it already was)."""
    try:
        from antlr4.atn.PredictionMode import PredictionMode
        from latex2sympy2_extended import latex2sympy2
    except ImportError:
        return False
    converter = getattr(latex2sympy2, "_Latex2Sympy", None)
    create = getattr(converter, "create_parser", None)
    if create is None:
        return False
    if getattr(create, _MARK, False):
        return True

    def create_parser(self, latex_str):
        parser = create(self, latex_str)
        if not hasattr(parser, "math") or not hasattr(getattr(parser, "_interp", None), "predictionMode"):
            return parser
        parser._interp.predictionMode = PredictionMode.SLL  # this parser only; the learned DFA is shared
        sll_math = parser.math

        def math():
            try:
                return sll_math()
            except Exception:  # a syntax error, or an input SLL cannot decide: LL decides, from scratch
                global ll_parses
                ll_parses += 1
                return create(self, latex_str).math()

        parser.math = math
        return parser

    setattr(create_parser, _MARK, True)
    create_parser.__wrapped__ = create
    converter.create_parser = create_parser
    return True


def installed() -> bool:
    try:
        from latex2sympy2_extended import latex2sympy2
    except ImportError:
        return False
    return getattr(getattr(latex2sympy2, "_Latex2Sympy", None), "create_parser", None) is not None and getattr(
        latex2sympy2._Latex2Sympy.create_parser, _MARK, False)


def uninstall() -> None:
    """Back to latex2sympy's own (LL) parsing; for tests that compare the two."""
    from latex2sympy2_extended import latex2sympy2

    create = latex2sympy2._Latex2Sympy.create_parser
    if getattr(create, _MARK, False):
        latex2sympy2._Latex2Sympy.create_parser = create.__wrapped__
