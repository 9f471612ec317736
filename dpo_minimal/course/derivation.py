"""Derivations that read as the paper writes them, with every step checked by SymPy.

A derivation is a left-hand side and a list of steps. Each step is a SymPy expression built in
the order it should be read (the builders below pass evaluate=False, and printing uses
order="none"), a one-line reason and, where the DPO paper (Rafailov et al. 2023, arXiv
2305.18290) numbers the result, its equation number. `derivation` asserts that every step
equals the one before it, then displays the whole chain as one aligned LaTeX block:

    lhs &= step_0 && \\text{reason} \\tag{n} \\\\ &= step_1 && \\text{reason} ...

so a rendered line is always the expression that was checked. Notebooks 01-03 show every result
this way; the slides builder reads the lines from the output's metadata.
"""

import sympy as sp
from sympy.printing.latex import LatexPrinter

from .symbolic import is_zero
from .symbolic import sigmoid as sigma

__all__ = ["DerivationError", "Expectation", "add", "check", "derivation", "exp", "expand_sigma",
           "expectation", "frac", "inv", "keep", "log", "mul", "reason", "render", "same", "sigma",
           "sub"]

_NEV = {"evaluate": False}  # keep each step as written: what is displayed is what is checked


class DerivationError(AssertionError):
    """A step that SymPy cannot show equal to the step before it."""


# Builders: the operation, unevaluated, with its arguments in the order given.
def frac(a, b) -> sp.Expr:
    """a / b as written (SymPy would cancel or reorder it)."""
    return sp.Mul(a, sp.Pow(b, -1, **_NEV), **_NEV)


def inv(b) -> sp.Expr:
    """1 / b as written."""
    return sp.Pow(b, -1, **_NEV)


def _terms(expr) -> tuple:
    """The terms of an unevaluated sum, so that a + (b + c) prints as a + b + c."""
    return expr.args if isinstance(expr, sp.Add) else (expr,)


def add(*terms) -> sp.Expr:
    """terms[0] + terms[1] + ..., in this order (a sum among the terms is merged into it)."""
    return sp.Add(*[t for term in terms for t in _terms(term)], **_NEV)


def sub(a, *b) -> sp.Expr:
    """a - b[0] - b[1] - ..., in this order (SymPy prints -b + a for some a and b)."""
    return sp.Add(*_terms(a), *[sp.Mul(-1, term, **_NEV) for term in b], **_NEV)


def mul(*factors) -> sp.Expr:
    """factors[0] * factors[1] * ..., in this order."""
    return sp.Mul(*factors, **_NEV)


def exp(a) -> sp.Expr:
    """e^a, with a as written."""
    return sp.exp(a, **_NEV)


def log(a) -> sp.Expr:
    """log a, with a as written (SymPy would turn log(e^u) into u)."""
    return sp.log(a, **_NEV)


def keep(a) -> sp.Expr:
    """a as one factor: inside a product, 1/Z stays in front instead of joining the fraction."""
    return sp.UnevaluatedExpr(a)


class Expectation(sp.Function):
    """E_{over}[body], shown as the paper writes it; build it with `expectation`.

    For the checks an expectation is a linear map: E[f] is replaced by f times an opaque factor
    that stands for the expectation, so steps that change only the integrand are checked through
    it, E[f] + E[g] = E[f + g] holds, and E[f] = f does not. Moving a random quantity across
    the E is not caught: keep such steps out of a derivation.
    """

    nargs = 2

    def _latex(self, printer, exp=None):
        body, over = self.args
        tex = rf"\mathbb{{E}}_{{{over.name}}}\left[{printer._print(body)}\right]"
        return tex if exp is None else rf"\left({tex}\right)^{{{exp}}}"


def expectation(body, over: str = r"(x, y_w, y_l)\sim\mathcal{D}") -> sp.Expr:
    """E_{over}[body]: `over` is the LaTeX subscript, by default a pair from the data set D."""
    return Expectation(body, sp.Symbol(over))


def expand_sigma(expr, where: dict | None = None) -> sp.Expr:
    """expr ready for checking: sigma(u) written out as 1/(1 + e^{-u}), the abbreviations of
    `where` replaced by their definitions, expectations made linear factors, and every
    unevaluated operation (derivative, sum, limit) carried out.

    sigma is written out before any derivative is taken, so a derivative of sigma is computed
    from 1/(1 + e^{-u}) and not taken on trust. An abbreviation is a definition: d/dtheta u
    becomes d/dtheta of u's definition. A derivative with respect to an abbreviation, d/du, is
    taken first, with u as a variable, and then evaluated at u's definition.
    """
    where = where or {}
    expr = sp.sympify(expr).rewrite(sp.exp)
    abbreviated = set(where)
    expr = expr.replace(
        lambda e: isinstance(e, sp.Derivative) and bool(abbreviated & set(e.variables)),
        lambda e: e.doit())
    for _ in range(len(where) + 1):  # a definition may use another abbreviation
        expr, before = expr.xreplace(where), expr
        if expr == before:
            break
    expr = expr.replace(lambda e: isinstance(e, Expectation),
                        lambda e: e.args[0] * sp.Function("E")(e.args[1]))
    return expr.rewrite(sp.exp).doit()


def same(a, b, where: dict | None = None) -> bool:
    """True if SymPy proves a == b (matrices element by element), after `expand_sigma`.

    False means "not proven": either the two differ, or SymPy needs the step split in two.
    """
    a, b = expand_sigma(a, where), expand_sigma(b, where)
    if a == b:  # also for infinite limits, where a - b is nan
        return True
    if isinstance(a, sp.MatrixBase) or isinstance(b, sp.MatrixBase):
        return a.shape == b.shape and all(is_zero(x - y) for x, y in zip(a, b))
    return is_zero(a - b)


def reason(text: str) -> str:
    """A reason in LaTeX: words as \\text{...}, $...$ as maths ("multiply by $e^{-r_1}$")."""
    parts = text.split("$")
    if len(parts) % 2 == 0:
        raise ValueError(f"unbalanced $ in the reason {text!r}: close each formula with a $.")
    return "".join(p if k % 2 else rf"\text{{{p}}}" for k, p in enumerate(parts) if p)


class _Printer(LatexPrinter):
    """SymPy's LaTeX printer, with log sigma(u) written as the paper writes it (no brackets)."""

    def _print_log(self, expr, exp=None):
        if exp is None and isinstance(expr.args[0], sigma):
            return r"\log " + self._print(expr.args[0])
        return super()._print_log(expr, exp)


def _latex(expr) -> str:
    """expr in LaTeX, its terms and factors in the order built (a string is already LaTeX)."""
    return expr if isinstance(expr, str) else _Printer({"order": "none"}).doprint(expr)


def _unpack(step) -> tuple:
    """(expr, reason) or (expr, reason, tag) -> (expr, reason, tag or None)."""
    if not isinstance(step, tuple) or len(step) not in (2, 3):
        raise ValueError(f"a step is (expression, reason) or (expression, reason, tag), got "
                         f"{step!r}.")
    return (*step, None) if len(step) == 2 else step


def check(steps, where: dict | None = None) -> None:
    """Raise DerivationError unless every step equals the one before it (see `same`)."""
    steps = [_unpack(step) for step in steps]
    for k in range(1, len(steps)):
        if not same(steps[k - 1][0], steps[k][0], where):
            raise DerivationError(
                f"step {k} ({steps[k][1] or 'no reason given'}) does not follow: SymPy cannot "
                f"show {_latex(steps[k][0])} equal to {_latex(steps[k - 1][0])}. Fix the step, "
                "or split it into smaller ones that SymPy can check.")


def render(lhs, steps) -> list[str]:
    """The LaTeX lines `lhs &= rhs && \\text{reason} \\tag{n}`, lhs on the first line only.

    lhs is a LaTeX string, a SymPy expression, or None: then step 0 is the left-hand side, and
    its reason is not shown (it may not carry a tag).
    """
    steps = [_unpack(step) for step in steps]
    if not steps:
        raise ValueError("a derivation needs at least one step.")
    if lhs is None:
        if steps[0][2] is not None:
            raise ValueError("with lhs=None step 0 is the left-hand side and cannot carry a tag: "
                             "give the lhs, or tag a later step.")
        lhs, steps = _latex(steps[0][0]), steps[1:]
        if not steps:
            raise ValueError("with lhs=None a derivation needs at least two steps.")
    lines = []
    for k, (expr, why, tag) in enumerate(steps):
        line = f"{_latex(lhs) if k == 0 else ''} &= {_latex(expr)}"
        line += f" && {reason(why)}" if why else ""
        lines.append(line + (rf" \tag{{{tag}}}" if tag is not None else ""))
    return lines


def derivation(lhs, steps, where: dict | None = None) -> sp.Expr:
    """Check a derivation, display it as one aligned block, and return its last expression.

    Args:
        lhs: what is derived (LaTeX string or SymPy expression), or None to start from step 0.
        steps: (expression, reason) or (expression, reason, tag) tuples; `tag` is the paper's
            equation number, shown as \\tag{n}. Build expressions with the builders of this
            module so that they print in the order written.
        where: abbreviations used in the steps, {symbol: definition}, substituted before each
            check (u: r_w - r_l, Z: sum of pi_ref e^{r/beta}, ...).

    Raises DerivationError, naming the step, if a step does not follow from the one before.
    The output is one display_data with text/latex `\\begin{align*} line \\\\ ... \\end{align*}`
    and metadata {"dpo_course": {"derivation_steps": [line, ...]}} for the slides builder.
    """
    from IPython.display import Latex, display  # only here: the checks need no IPython

    check(steps, where)
    lines = render(lhs, steps)
    text = r"\begin{align*} " + r" \\ ".join(lines) + r" \end{align*}"
    display(Latex(text), metadata={"dpo_course": {"derivation_steps": lines}})
    return _unpack(steps[-1])[0]
