"""The derivation of notebook 02, re-checked: each identity of dpo_minimal.course.symbolic,
against the formula written out here, and against numbers."""

import math

import pytest
import sympy as sp
import torch

from dpo_minimal import dpo_loss
from dpo_minimal.course import bandit
from dpo_minimal.course import symbolic as S

PI, PI_REF, R, BETA = S.response_symbols(3)


def test_symbols_are_positive_and_real():
    assert all(s.is_positive for s in (*PI, *PI_REF, BETA))
    assert all(s.is_real for s in R)
    assert len(S.response_symbols(5)[0]) == 5


def test_objective_is_expected_reward_minus_beta_kl():
    written_out = (sum(p * ri for p, ri in zip(PI, R))
                   - BETA * sum(p * sp.log(p / q) for p, q in zip(PI, PI_REF)))
    assert S.is_zero(S.objective(PI, PI_REF, R, BETA) - written_out)


def test_objective_matches_bandit_numerically():
    pi, pi_ref, r = [0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [1.0, -0.5, 2.0]
    subs = dict(zip(PI, pi)) | dict(zip(PI_REF, pi_ref)) | dict(zip(R, r)) | {BETA: 0.7}
    value = float(S.objective(PI, PI_REF, R, BETA).subs(subs))
    expected = bandit.objective(torch.tensor(pi, dtype=torch.float64),
                                torch.tensor(pi_ref, dtype=torch.float64),
                                torch.tensor(r, dtype=torch.float64), 0.7).item()
    assert value == pytest.approx(expected, abs=1e-12)


def test_optimal_policy_sums_to_one_and_matches_bandit():
    star = S.optimal_policy(PI_REF, R, BETA)
    assert S.is_zero(sp.Add(*star).subs(PI_REF[2], 1 - PI_REF[0] - PI_REF[1]) - 1)
    pi_ref, r = [0.6, 0.1, 0.3], [1.0, -0.5, 2.0]
    subs = dict(zip(PI_REF, pi_ref)) | dict(zip(R, r)) | {BETA: 0.5}
    numeric = torch.tensor([float(s.subs(subs)) for s in star], dtype=torch.float64)
    expected = bandit.optimal_policy(torch.tensor(pi_ref, dtype=torch.float64),
                                     torch.tensor(r, dtype=torch.float64), 0.5)
    torch.testing.assert_close(numeric, expected, rtol=0, atol=1e-12)


def test_lagrangian_solution_is_eq4_and_a_maximum():
    lam = sp.Symbol("lambda", real=True)
    pi_of_lam, solution = S.solve_lagrangian(PI, PI_REF, R, BETA, lam)
    for p, q, ri in zip(PI, PI_REF, R):  # r_i - beta log(pi_i/pi_ref_i) - beta - lam = 0
        assert S.is_zero(pi_of_lam[p] - q * sp.exp((ri - BETA - lam) / BETA))
    z = sum(q * sp.exp(ri / BETA) for q, ri in zip(PI_REF, R))
    for p, q, ri in zip(PI, PI_REF, R):
        assert S.is_zero(solution[p] - q * sp.exp(ri / BETA) / z)
    assert S.is_zero(solution[lam] - (BETA * sp.log(z) - BETA))
    hessian = sp.hessian(S.objective(PI, PI_REF, R, BETA), PI)
    assert hessian == sp.diag(*[-BETA / p for p in PI])
    assert hessian.is_negative_definite


def test_gibbs_identity_holds_on_the_simplex_only():
    lhs, rhs = S.gibbs_identity(PI, PI_REF, R, BETA)
    on_simplex = {PI[2]: 1 - PI[0] - PI[1]}
    assert S.is_zero((lhs - rhs).subs(on_simplex))
    # Off the simplex the gap is beta log Z (sum pi - 1): the identity needs normalisation.
    z = S.partition_function(PI_REF, R, BETA)
    assert S.is_zero(lhs - rhs - BETA * sp.log(z) * (sp.Add(*PI) - 1))
    assert not S.is_zero(lhs - rhs)


def test_gibbs_identity_numerically():
    lhs, rhs = S.gibbs_identity(PI, PI_REF, R, BETA)
    subs = (dict(zip(PI, [0.2, 0.5, 0.3])) | dict(zip(PI_REF, [0.6, 0.1, 0.3]))
            | dict(zip(R, [1.0, -0.5, 2.0])) | {BETA: 0.7})
    assert float(lhs.subs(subs)) == pytest.approx(float(rhs.subs(subs)), abs=1e-12)


def test_beta_limits():
    pi_ref = [sp.Rational(1, 2), sp.Rational(1, 3), sp.Rational(1, 6)]
    r = [0, 1, 2]  # the least likely response under pi_ref has the largest reward
    star = S.optimal_policy(pi_ref, r, BETA)
    assert [sp.limit(s, BETA, sp.oo) for s in star] == pi_ref
    assert [sp.limit(s, BETA, 0, "+") for s in star] == [0, 0, 1]


def test_reparameterised_reward_inverts_eq4():
    pi_star, pi_ref, r, z = sp.symbols("pi_star pi_ref r Z", positive=True)
    (solved,) = sp.solve(sp.Eq(pi_star, pi_ref * sp.exp(r / BETA) / z), r)
    assert S.is_zero(solved - S.reparameterised_reward(pi_star, pi_ref, BETA, z))
    assert S.is_zero(solved - (BETA * sp.log(pi_star) - BETA * sp.log(pi_ref) + BETA * sp.log(z)))


def test_shifted_rewards_give_same_policy_and_preferences():
    f = sp.Symbol("f", real=True)
    shifted = [ri + f for ri in R]
    for a, b in zip(S.optimal_policy(PI_REF, shifted, BETA), S.optimal_policy(PI_REF, R, BETA)):
        assert S.is_zero(a - b)
    assert S.is_zero(S.bradley_terry(R[0] + f, R[1] + f) - S.bradley_terry(R[0], R[1]))
    assert not S.is_zero(S.bradley_terry(R[0] + f, R[1]) - S.bradley_terry(R[0], R[1]))


def test_bradley_terry_is_sigmoid_of_difference():
    assert S.is_zero(S.bradley_terry(R[0], R[1]) - S.sigmoid(R[0] - R[1]))
    assert not S.is_zero(S.bradley_terry(R[0], R[1]) - S.sigmoid(R[1] - R[0]))  # erratum 1


def test_partition_function_cancels_in_bradley_terry():
    pw, pl, qw, ql, z = sp.symbols("pi_w pi_l ref_w ref_l Z", positive=True)
    p = S.bradley_terry(S.reparameterised_reward(pw, qw, BETA, z),
                        S.reparameterised_reward(pl, ql, BETA, z))
    no_z = sp.cancel(sp.expand_power_base(sp.powsimp(p)))
    assert z not in no_z.free_symbols
    assert S.is_zero(no_z - S.dpo_preference(pw, pl, qw, ql, BETA))
    written_out = 1 / (1 + sp.exp(-(BETA * sp.log(pw / qw) - BETA * sp.log(pl / ql))))
    assert S.is_zero(p - written_out)


def test_sigmoid_rewrite_derivative_and_latex():
    u = sp.Symbol("u", real=True)
    assert S.sigmoid(u).rewrite(sp.exp) == 1 / (1 + sp.exp(-u))
    assert S.is_zero(sp.diff(S.sigmoid(u), u) - sp.diff(1 / (1 + sp.exp(-u)), u))
    assert sp.latex(S.sigmoid(u)) == r"\sigma\left(u\right)"
    assert S.sigmoid(0) == sp.Rational(1, 2) and S.sigmoid(u - u) == sp.Rational(1, 2)


def test_dpo_loss_expression_matches_library_loss():
    symbols = sp.symbols("a b c d", real=True)
    expr = S.dpo_loss(*symbols, BETA)
    f = sp.lambdify([*symbols, BETA], expr.rewrite(sp.exp), "math")
    g = torch.Generator().manual_seed(0)
    logps = -5 * torch.rand(4, 16, generator=g, dtype=torch.float64)
    for beta in (0.1, 0.5, 2.0):
        losses, _, _ = dpo_loss(*logps, beta=beta)
        expected = [f(*logps[:, i].tolist(), beta) for i in range(16)]
        torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    # At pi = pi_ref the loss is ln 2.
    assert S.is_zero(expr.subs({symbols[0]: symbols[2], symbols[1]: symbols[3]}) - sp.log(2))
    assert math.isclose(f(0.0, 0.0, 0.0, 0.0, 0.1), math.log(2))


def test_is_zero_rejects_nonzero():
    assert not S.is_zero(BETA)
    assert S.is_zero(sp.log(PI[0] * PI[1]) - sp.log(PI[0]) - sp.log(PI[1]))
