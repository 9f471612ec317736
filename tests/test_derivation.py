"""The derivation helper of notebooks 01-03: steps print as written, wrong steps raise, and the
display follows the contract the slides builder reads."""

import pytest
import sympy as sp

from dpo_minimal.course import derivation as D
from dpo_minimal.course import symbolic
from dpo_minimal.course.derivation import (
    DerivationError,
    add,
    derivation,
    exp,
    expand_sigma,
    expectation,
    frac,
    inv,
    keep,
    log,
    mul,
    reason,
    render,
    same,
    sigma,
    sub,
)

R1, R2 = sp.symbols("r_1 r_2", real=True)
BETA = sp.Symbol("beta", positive=True)
BT_STEPS = [
    (frac(sp.exp(R1), add(sp.exp(R1), sp.exp(R2))), "Bradley-Terry", 1),
    (inv(add(1, exp(sub(R2, R1)))), "divide top and bottom by $e^{r_1}$"),
    (sigma(sub(R1, R2)), "definition of $\\sigma$"),
]


@pytest.fixture
def shown(monkeypatch):
    """What derivation() displays: a list of (object, metadata) pairs."""
    import IPython.display

    calls = []
    monkeypatch.setattr(IPython.display, "display",
                        lambda obj, metadata=None: calls.append((obj, metadata)))
    return calls


def test_builders_print_in_the_order_written():
    tex = D._latex
    assert tex(sub(R2, R1)) == "r_{2} - r_{1}"
    assert sp.latex(sp.Add(R2, -R1)) == "- r_{1} + r_{2}"  # what SymPy does on its own
    assert tex(sub(add(R1, R2), 1, BETA)) == r"r_{1} + r_{2} - 1 - \beta"  # flat, in order
    assert tex(sub(R1, add(R2, 1))) == r"r_{1} - \left(r_{2} + 1\right)"
    assert tex(frac(sp.exp(R1), sp.exp(R1))) == r"\frac{e^{r_{1}}}{e^{r_{1}}}"
    assert tex(mul(keep(inv(BETA)), R1)) == r"\frac{1}{\beta} r_{1}"
    assert tex(log(exp(R1))) == r"\log{\left(e^{r_{1}} \right)}"
    assert tex(sigma(R1)) == r"\sigma\left(r_{1}\right)"
    assert tex(mul(-1, log(sigma(R1)))) == r"- \log \sigma\left(r_{1}\right)"  # as the paper


def test_same_proves_true_steps_and_rejects_false_ones():
    assert same(BT_STEPS[0][0], sigma(R1 - R2))
    assert not same(BT_STEPS[0][0], sigma(R2 - R1))  # the classic slip: sigma(B - A)
    assert same(1 - sigma(R1), sigma(-R1))
    assert same(sp.Matrix([sigma(0), 1]), sp.Matrix([sp.Rational(1, 2), 1]))
    assert not same(sp.Matrix([sigma(0), 1]), sp.Matrix([1, 1]))
    a, b = sp.symbols("a b", positive=True)
    assert same(log(frac(a, b)), log(a) - log(b))
    assert same(BETA * log(a), log(a**BETA))


def test_expand_sigma_writes_sigma_out_and_differentiates_it():
    u = sp.Symbol("u", real=True)
    assert expand_sigma(sigma(u)) == 1 / (1 + sp.exp(-u))
    derivative = expand_sigma(sp.Derivative(sigma(u), u, evaluate=False))
    assert sp.simplify(derivative - sp.exp(-u) / (1 + sp.exp(-u)) ** 2) == 0


def test_where_abbreviations_follow_the_chain_rule():
    theta, u = sp.symbols("theta u", real=True)
    f = sp.Function("f")(theta)
    where = {u: BETA * f}
    # d/dtheta of an abbreviation is d/dtheta of its definition ...
    assert same(sp.Derivative(u, theta, evaluate=False), BETA * sp.Derivative(f, theta), where)
    assert not same(sp.Derivative(u, theta, evaluate=False), 0, where)
    # ... and d/du is taken with u as the variable, then evaluated at the definition.
    outer = sp.Derivative(-sp.log(sigma(u)), u, evaluate=False)
    assert same(outer, -sigma(-BETA * f), where)


def test_expectation_is_linear_but_not_the_identity():
    a, b = sp.symbols("a b", real=True)
    assert same(expectation(a + b), expectation(a) + expectation(b))
    assert same(-expectation(log(sigma(a))), expectation(log(1 + sp.exp(-a))))
    assert not same(expectation(a), a)
    assert sp.latex(expectation(a)) == r"\mathbb{E}_{(x, y_w, y_l)\sim\mathcal{D}}\left[a\right]"


def test_a_wrong_step_raises_naming_it(shown):
    steps = BT_STEPS[:2] + [(sigma(sub(R2, R1)), "the slip")]
    with pytest.raises(DerivationError, match=r"step 2 \(the slip\) does not follow"):
        derivation(r"p", steps)
    assert shown == []  # nothing is displayed for a derivation that fails


def test_display_contract(shown):
    result = derivation(r"p^*(y_1 \succ y_2 \mid x)", BT_STEPS)
    assert result == BT_STEPS[-1][0]
    ((obj, metadata),) = shown
    lines = metadata["dpo_course"]["derivation_steps"]
    assert lines == [
        r"p^*(y_1 \succ y_2 \mid x) &= \frac{e^{r_{1}}}{e^{r_{1}} + e^{r_{2}}}"
        r" && \text{Bradley-Terry} \tag{1}",
        r" &= \frac{1}{1 + e^{r_{2} - r_{1}}} && \text{divide top and bottom by }e^{r_1}",
        r" &= \sigma\left(r_{1} - r_{2}\right) && \text{definition of }\sigma",
    ]
    text = obj._repr_latex_()
    assert text == r"\begin{align*} " + r" \\ ".join(lines) + r" \end{align*}"
    assert obj.__class__.__name__ == "Latex"


def test_render_with_step_zero_as_lhs_and_bad_input():
    lines = render(None, BT_STEPS[1:])
    assert lines == [r"\frac{1}{1 + e^{r_{2} - r_{1}}} &= \sigma\left(r_{1} - r_{2}\right)"
                     r" && \text{definition of }\sigma"]
    with pytest.raises(ValueError, match="cannot carry a tag"):
        render(None, BT_STEPS)
    with pytest.raises(ValueError, match=r"\(expression, reason\)"):
        render("p", [sigma(R1)])
    with pytest.raises(ValueError, match="at least one step"):
        render("p", [])


def test_reason_mixes_text_and_maths():
    assert reason("multiply by $e^{-r_1}$") == r"\text{multiply by }e^{-r_1}"
    assert reason("$a = b$: why") == r"a = b\text{: why}"
    with pytest.raises(ValueError, match="unbalanced"):
        reason("a $b")


def test_one_sigmoid_and_public_names():
    assert D.sigma is symbolic.sigmoid  # one sigma for the library and the notebooks
    assert set(D.__all__) <= set(dir(D))
