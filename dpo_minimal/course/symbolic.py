"""The DPO derivation as SymPy expressions, on a finite response set {y_1, ..., y_n}.

Notebook 02 displays these and checks each step; tests/test_symbolic.py re-checks the identities.
Equation numbers are the paper's (Rafailov et al. 2023): Eq 1 Bradley-Terry, Eq 3 the
KL-regularised objective, Eq 4 the optimal policy, Eq 5 the reparameterised reward, Eq 6 the
preference model in terms of the policy, Eq 7 the DPO loss.
"""

import sympy as sp


class sigmoid(sp.Function):  # noqa: N801 (lower case, as the paper writes sigma)
    """The logistic function sigma(u) = 1 / (1 + e^{-u}), printed as sigma in LaTeX.

    It stays unevaluated so that expressions read like the paper; `.rewrite(sp.exp)` expands it
    (do that before `simplify` or `lambdify`).
    """

    @classmethod
    def eval(cls, u):
        if u.is_zero:  # sigma(0) = 1/2, so -log sigma(0) shows as log 2
            return sp.S.Half
        return None

    def _eval_rewrite_as_exp(self, u, **kwargs):
        return 1 / (1 + sp.exp(-u))

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _latex(self, printer, exp=None):
        tex = rf"\sigma\left({printer._print(self.args[0])}\right)"
        return tex if exp is None else rf"{tex}^{{{exp}}}"


def response_symbols(n: int = 3):
    """Symbols for n responses: (pi, pi_ref, r, beta).

    pi and pi_ref are n-tuples of positive symbols (probabilities), r an n-tuple of real rewards,
    beta a positive scalar. Positivity lets SymPy split log(a/b) = log a - log b.
    """
    pi = tuple(sp.Symbol(rf"\pi_{{{i}}}", positive=True) for i in range(1, n + 1))
    pi_ref = tuple(sp.Symbol(rf"\pi_{{\mathrm{{ref}},{i}}}", positive=True)
                   for i in range(1, n + 1))
    r = tuple(sp.Symbol(f"r_{i}", real=True) for i in range(1, n + 1))
    return pi, pi_ref, r, sp.Symbol("beta", positive=True)


def kl(p, q) -> sp.Expr:
    """KL(p || q) = sum_i p_i log(p_i / q_i), i.e. E_{y~p}[log p(y)/q(y)]."""
    return sp.Add(*[a * sp.log(a / b) for a, b in zip(p, q)])


def objective(pi, pi_ref, r, beta) -> sp.Expr:
    """Eq 3 on one prompt, E_pi[r] - beta KL(pi || pi_ref) = sum_i pi_i (r_i - beta log pi_i/ref_i).

    Written as one expectation of the KL-penalised reward: the KL is itself an expectation over
    pi of the log-ratio (the first step of the paper's Appendix A.1).
    """
    return sp.Add(*[p * (ri - beta * sp.log(p / q)) for p, q, ri in zip(pi, pi_ref, r)])


def partition_function(pi_ref, r, beta) -> sp.Expr:
    """Z = sum_i pi_ref_i exp(r_i / beta), the normaliser of Eq 4."""
    return sp.Add(*[q * sp.exp(ri / beta) for q, ri in zip(pi_ref, r)])


def optimal_policy(pi_ref, r, beta) -> tuple:
    """Eq 4: pi*_i = pi_ref_i exp(r_i / beta) / Z, as an n-tuple of expressions."""
    z = partition_function(pi_ref, r, beta)
    return tuple(q * sp.exp(ri / beta) / z for q, ri in zip(pi_ref, r))


def lagrangian(pi, pi_ref, r, beta, lam: sp.Symbol) -> sp.Expr:
    """The objective with the normalisation constraint: J(pi) - lam (sum_i pi_i - 1)."""
    return objective(pi, pi_ref, r, beta) - lam * (sp.Add(*pi) - 1)


def solve_lagrangian(pi, pi_ref, r, beta, lam: sp.Symbol) -> tuple[dict, dict]:
    """Solve the Lagrangian's stationarity conditions in two SymPy solves.

    Returns (pi_of_lam, solution): first dL/dpi_i = 0 solved for each pi_i, as a function of lam;
    then dL/dlam = 0 (the constraint sum_i pi_i = 1) with those substituted, solved for lam, so
    `solution` maps each pi_i and lam to an expression free of lam. One joint `sp.solve` finds
    the same point but takes ten times as long.
    """
    lag = lagrangian(pi, pi_ref, r, beta, lam)
    pi_of_lam = {}
    for p in pi:
        (root,) = sp.solve(sp.diff(lag, p), p)  # log is monotone: one root per equation
        pi_of_lam[p] = sp.powsimp(sp.expand(root))  # pi_ref_i exp((r_i - beta - lam)/beta)
    (lam_star,) = sp.solve(sp.diff(lag, lam).subs(pi_of_lam), lam)
    solution = {p: sp.simplify(e.subs(lam, lam_star)) for p, e in pi_of_lam.items()}
    return pi_of_lam, solution | {lam: lam_star}


def gibbs_identity(pi, pi_ref, r, beta) -> tuple[sp.Expr, sp.Expr]:
    """(J(pi), beta log Z - beta KL(pi || pi*)): equal whenever sum_i pi_i = 1.

    The right side is largest, and equals beta log Z, exactly when KL(pi || pi*) = 0, i.e. at
    pi = pi*: the paper's appendix route to Eq 4, no calculus needed.
    """
    z = partition_function(pi_ref, r, beta)
    rhs = beta * sp.log(z) - beta * kl(pi, optimal_policy(pi_ref, r, beta))
    return objective(pi, pi_ref, r, beta), rhs


def reparameterised_reward(pi_star, pi_ref, beta, z) -> sp.Expr:
    """Eq 5: r = beta log(pi*/pi_ref) + beta log Z, Eq 4 solved for the reward."""
    return beta * sp.log(pi_star / pi_ref) + beta * sp.log(z)


def bradley_terry(r_w, r_l) -> sp.Expr:
    """Eq 1: p(y_w > y_l) = exp(r_w) / (exp(r_w) + exp(r_l))."""
    return sp.exp(r_w) / (sp.exp(r_w) + sp.exp(r_l))


def dpo_preference(pi_w, pi_l, ref_w, ref_l, beta) -> sp.Expr:
    """Eq 6: p(y_w > y_l) = sigma(beta log pi(y_w)/pi_ref(y_w) - beta log pi(y_l)/pi_ref(y_l))."""
    return sigmoid(beta * sp.log(pi_w / ref_w) - beta * sp.log(pi_l / ref_l))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta) -> sp.Expr:
    """Eq 7 for one pair, on log-probabilities: -log sigma(beta h),
    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).
    """
    h = ((policy_chosen_logps - reference_chosen_logps)
         - (policy_rejected_logps - reference_rejected_logps))
    return -sp.log(sigmoid(beta * h))


def is_zero(expr: sp.Expr) -> bool:
    """True if SymPy proves expr == 0; False means "not proven".

    sigma is written out and unevaluated operations (derivatives, sums, limits) are carried
    out; then it tries simplify on expr, on expr with logs of positive quantities expanded
    (log ab = log a + log b), and with them combined (what the loss steps need). Both log
    rules use the symbols' assumptions, so declare log-probabilities' arguments positive.
    """
    expr = sp.sympify(expr).rewrite(sp.exp).doit()
    forms = (lambda e: e, sp.expand_log, sp.logcombine)
    return any(sp.simplify(form(expr)) == 0 for form in forms)
