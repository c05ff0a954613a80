"""Tests of the refinements (refinements.py): the mass floor against the exact likelihood, the ridges against
the noiseless truth, the band moments against quadrature, the age profile against brute force, and every
coordinate's round trip and Jacobian against central differences."""
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import logsumexp

import grid_posterior as gp
import preprocess as pp
import refinements as rf
import simulate

ALL = rf.Settings()


def random_theta(rng, n):
    a, b = pp.THETA_BOUNDS[:, 0], pp.THETA_BOUNDS[:, 1]
    return a + (b - a) * rng.uniform(size=(n, 3))


def physical_obs(n, seed):
    return pp.observe(simulate.simulate(n, seed=seed), np.random.default_rng(seed + 1))


def clipped_floor(theta, x, settings=ALL):
    return np.clip(rf.raw_mass_floor(theta[..., 0], theta[..., 2], x), 2.0, 8.0 - settings.floor_gap)


def jacobian(transform, theta, x, h=1e-7):
    """The full 3x3 Jacobian du/dtheta at one point by central differences."""
    jac = np.empty((3, 3))
    for j in range(3):
        step = np.zeros(3)
        step[j] = h
        jac[:, j] = (transform.forward(theta + step, x)[0] - transform.forward(theta - step, x)[0]) / (2 * h)
    return jac


def test_mass_floor_is_the_support_edge_of_the_likelihood():
    """The floor equals the edge sigma_b <= f_b / 2 of the noise model: grid_posterior's likelihood (written
    independently) is finite just above it and zero just below; the truth is never below it, and for most
    clusters it lies well above the prior bound 2."""
    obs = physical_obs(400, 3)
    theta, x = obs["theta"], obs["x"]
    floor = clipped_floor(theta, x)
    assert np.all(theta[:, 1] >= floor) and not np.any(rf.below_floor(theta, x))
    assert np.mean(floor > 2.01) > 0.9 and np.median(theta[:, 1] - floor) < 0.3
    for i in np.flatnonzero((floor > 2.01) & (floor < 7.9))[:40]:
        f, r, d = obs["flux_mjy"][i], obs["rel_err"][i], obs["distance_mpc"][i]
        for dm, finite in ((1e-6, True), (-1e-6, False)):
            L = gp.log_likelihood(np.array([theta[i, 0], floor[i] + dm, theta[i, 2]]), f, r, d)[0]
            assert np.isfinite(L) == finite, (i, dm, L)


def test_below_floor_also_where_no_mass_is_allowed():
    """At a (t', E) whose floor lies above the prior's top no mass has finite likelihood: below_floor is True
    there even at m = 8 (the transform's floor, clipped below 8, cannot say so), as grid_posterior's
    likelihood confirms; where the floor is below 8, m = 8 is allowed."""
    obs = physical_obs(200, 9)
    theta = random_theta(np.random.default_rng(9), len(obs["x"]))
    theta[:, 1] = 8.0
    raw = rf.raw_mass_floor(theta[:, 0], theta[:, 2], obs["x"])
    above, below = np.flatnonzero(raw > 8.01)[:15], np.flatnonzero((raw > 6.0) & (raw < 7.99))[:15]
    assert len(above) == len(below) == 15
    assert np.all(rf.below_floor(theta[above], obs["x"][above]))
    assert not np.any(rf.below_floor(theta[below], obs["x"][below]))
    for i in np.concatenate([above, below]):
        L = gp.log_likelihood(theta[i], obs["flux_mjy"][i], obs["rel_err"][i], obs["distance_mpc"][i])[0]
        assert np.isfinite(L) == (i in below), (i, raw[i], L)


def test_floor_term_round_trip_plain_far_above_and_minus_infinity_at_the_floor():
    obs = physical_obs(300, 4)
    rng = np.random.default_rng(4)
    x = obs["x"]
    tf = rf.RefinedTransform(rf.Settings(mass_ridge=False, ebv_ridge=False, age_beta=0.0))
    theta = random_theta(rng, len(x))
    floor = clipped_floor(theta, x)
    theta[:, 1] = floor + (np.minimum(floor + 0.3, 8.0) - floor) * rng.uniform(0.02, 0.98, len(x))  # near it
    far = theta.copy()
    far[:, 1] = np.where(floor < 5.5, floor + 2.0, far[:, 1])         # 20 scales above: the plain transform
    np.testing.assert_allclose(tf.forward(far, x)[0][floor < 5.5, 1], pp.theta_to_u(far)[floor < 5.5, 1], atol=1e-7)
    at_floor = theta.copy()
    at_floor[:, 1] = floor
    assert np.all(tf.forward(at_floor, x)[0][floor < 7.9, 1] < -20)    # the edge goes to -infinity
    u = tf.forward(theta, x)[0]
    np.testing.assert_allclose(tf.inverse(u, x), theta, rtol=0, atol=1e-10)
    assert not np.allclose(u[:, 1], pp.theta_to_u(theta)[:, 1])             # the floor changes u
    off = rf.RefinedTransform(rf.Settings(floor_scale=0.0, mass_ridge=False, ebv_ridge=False, age_beta=0.0))
    np.testing.assert_array_equal(off.forward(theta, x)[0], pp.theta_to_u(theta))   # all off: the plain one


def test_mass_ridge_is_the_mass_the_photometry_implies():
    """Noiseless photometry with tiny errors: the ridge centre at the true (age bin, E(B-V)) is the true mass
    and its width the combined precision; with the noise model the truth lies O(1) widths from the centre."""
    sim = simulate.simulate(300, seed=5)
    rng = np.random.default_rng(5)
    d = rng.uniform(1, 30, 300)
    f = sim["flux_10pc_mjy"] * (simulate.PC10_IN_MPC / d[:, None]) ** 2
    x = pp.make_x(f, np.full_like(f, 1e-4), d)
    c, w = rf.mass_ridge(np.log10(sim["age_myr"] + rng.uniform(-0.5, 0.5, 300)), sim["ebv"], x)
    np.testing.assert_allclose(c, sim["log10_mass"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(w, 1e-4 / np.sqrt(5) / np.log(10), rtol=1e-6)
    e, we = rf.ebv_ridge(np.log10(sim["age_myr"] + rng.uniform(-0.5, 0.5, 300)), x)    # the colours alone
    assert np.max(np.abs(e - sim["ebv"])) < 1e-5 and np.max(np.abs(e - sim["ebv"]) / we) < 0.5
    assert np.all(we < 1e-3)


def test_moment_ridges_are_calibrated_where_log_normal_weights_are_not():
    """Over the prior (4,000 clusters) the truth's offset from the ridges in ridge widths, (m - c) / w and
    (E - e_c) / w_e, has mean ~0 and sd ~1 with the exact bands' moments. The log-normal's moments (offset
    s^2/2, variance s^2, computed here by hand) leave the mass ridge half a width off and ~15 % too narrow."""
    obs = physical_obs(4000, 12)
    theta, x = obs["theta"], obs["x"]
    c, w = rf.mass_ridge(theta[:, 0], theta[:, 2], x)
    e, we = rf.ebv_ridge(theta[:, 0], x)
    v, ve = (theta[:, 1] - c) / w, (theta[:, 2] - e) / we
    assert abs(np.mean(v)) < 0.1 and 0.9 < np.std(v) < 1.1 and 0.9 < np.std(ve) < 1.1
    s2 = np.log1p(x[:, 5:10] ** 2)
    est = x[:, 0:5] + s2 / 2 / np.log(10) - rf.log_flux_per_msun(theta[:, 0], theta[:, 2], x)
    c_ln = np.sum(est / s2, 1) / np.sum(1 / s2, 1)
    v_ln = (theta[:, 1] - c_ln) / (1 / (np.log(10) * np.sqrt(np.sum(1 / s2, 1))))
    assert np.mean(v_ln) < -0.3 and np.std(v_ln) > 1.1
    assert np.median(np.abs(theta[:, 1] - c)) < 0.9 * np.median(np.abs(theta[:, 1] - c_ln))


@pytest.mark.parametrize("settings", [rf.Settings(floor_scale=0.0, ebv_ridge=False, age_beta=0.0),
                                      rf.Settings(ebv_ridge=False, age_beta=0.0),
                                      rf.Settings(age_beta=0.0), rf.Settings(), rf.Settings(age_beta=0.5)])
def test_transform_round_trip_increasing_and_triangular_jacobian(settings):
    """Every combination used: inverse to 1e-10, u_m increasing in m and O(1) near the ridge, the Jacobian
    triangular (t' -> E -> m) and its log|det| the sum of the diagonal log-derivatives forward returns."""
    obs = physical_obs(300, 7)
    rng = np.random.default_rng(7)
    x = obs["x"]
    tf = rf.RefinedTransform(settings)
    theta = random_theta(rng, len(x))
    theta[::2] = obs["theta"][::2]                   # half at the true (t', E): there the ridge is in the prior
    c, w = rf.mass_ridge(theta[:, 0], theta[:, 2], x)
    lo = clipped_floor(theta, x) if settings.floor_scale else np.full(len(x), 2.0)
    near = c + w * rng.normal(0, 2, len(x))
    on = (np.arange(len(x)) % 2 == 0) & (near > lo + 0.05) & (near < 7.9)
    theta[:, 1] = np.where(on, near, lo + (8.0 - lo) * rng.uniform(0.01, 0.99, len(x)))
    u, log_du = tf.forward(theta, x)
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(log_du))
    np.testing.assert_allclose(tf.inverse(u, x), theta, rtol=0, atol=1e-10)
    assert on.sum() > 60 and np.std(u[on, 1]) < 4
    up = theta.copy()
    up[:, 1] = np.minimum(theta[:, 1] + 1e-4, 8.0)
    assert np.all(tf.forward(up, x)[0][:, 1] > u[:, 1])
    for i in range(0, len(x), 10):
        jac = jacobian(tf, theta[i], x[i])
        assert jac[0, 1] == 0 and jac[2, 1] == 0 and jac[0, 2] == 0               # triangular
        np.testing.assert_allclose(log_du[i].sum(), np.linalg.slogdet(jac)[1], atol=1e-4)


def test_ebv_ridge_once_per_distinct_bin_equals_row_by_row():
    """ebv_ridge fits each distinct (age bin, x) pair once (samples repeat x): the same values as row by row,
    also for rows that share x but not the bin, and for a mostly-distinct input (the plain path)."""
    obs = physical_obs(200, 8)
    rng = np.random.default_rng(8)
    x = np.repeat(obs["x"], 50, axis=0)
    log_age = np.repeat(obs["theta"][:, 0], 50) + rng.choice([0.0, 0.0, 0.3], len(x))   # 2 bins per cluster
    for la, xx in ((log_age, x), (obs["theta"][:, 0], obs["x"])):
        e, w = rf.ebv_ridge(la, xx)
        e_row, w_row = rf._ebv_fit(la, xx, ALL.ebv_ridge_steps, ALL.ebv_ridge_chord)
        np.testing.assert_array_equal(e, e_row)
        np.testing.assert_array_equal(w, w_row)
        if len(la) == len(log_age):
            assert 300 < len(np.unique(e)) <= 400       # two bins for most clusters: the bins matter


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_age_profile_density_is_normalised(beta):
    """phi(u_t) du_t / dlog10 t' integrates to 1 over the age range, on a fine grid with every bin edge on it
    (independent of the CDF code); the warp leaves the mass and E(B-V) coordinates untouched."""
    obs = physical_obs(200, 12)
    x, theta = obs["x"], obs["theta"]
    age = rf.AgeCoordinate(beta, ALL.age_split_myr, ALL.age_bin_dex, ALL.age_segments, ALL.age_model_error,
                           ALL.age_prior_share)
    with_age = rf.RefinedTransform(rf.Settings(age_beta=beta)).forward(theta, x)[0]
    np.testing.assert_array_equal(with_age[:, 1:], rf.RefinedTransform(rf.Settings(age_beta=0.0)).forward(theta, x)[0][:, 1:])
    edges = age.grid()["edges"]
    for i in range(0, len(x), 40):                 # midpoint rule inside each bin: exact for the bin's t' density
        t = np.concatenate([np.linspace(lo, hi, 41)[:-1] for lo, hi in zip(edges[:-1], edges[1:])])
        t_mid = t + np.repeat(np.diff(edges) / 80, 40)
        u, log_du = age.forward(np.log10(t_mid), x[i])
        dens = np.exp(log_du - 0.5 * u ** 2 - 0.5 * np.log(2 * np.pi))           # in log10 t'
        dt = np.diff(np.concatenate([t, [edges[-1]]]))
        assert abs(np.sum(dens / (t_mid * np.log(10)) * dt) - 1) < 1e-6


@pytest.mark.parametrize("r", [0.003, 0.05, 0.15, 0.3, 0.5, 0.8, 2.0, 20.0])
def test_band_shape_is_the_moments_of_the_exact_band_likelihood(r):
    """band_shape's table against scipy's adaptive quadrature of exp(l(y)) (grid_posterior.band_loglike),
    split at the support edge, around the main peak and in the tail: mean within 1e-3 s, sd within 0.2 %."""
    s, edge = np.sqrt(np.log1p(r * r)), np.log(2 * r)
    top = gp.band_loglike(np.array([max(edge, s * s / 2)]), r)[0]
    end = max(edge, 0.0) + 40 * s + 5.0
    cuts = np.unique(np.clip([edge, -10 * s, -3 * s, 0.0, 3 * s, 10 * s, edge + 2.0, end], edge, end))
    mom = [sum(quad(lambda y: y ** n * np.exp(gp.band_loglike(np.array([y]), r)[0] - top), lo, hi,
                    limit=200, epsabs=0, epsrel=1e-10)[0] for lo, hi in zip(cuts[:-1], cuts[1:])) for n in range(3)]
    mean = mom[1] / mom[0]
    sd = np.sqrt(mom[2] / mom[0] - mean ** 2)
    m, v = rf.band_shape(r)
    assert abs(m - mean) < 1e-3 * s
    assert abs(np.sqrt(v) / sd - 1) < 2e-3


def test_band_shape_has_the_log_normal_limit():
    """For r* -> 0 the band likelihood is the log-normal's: mean s^2/2, variance s^2 (below the table: exact;
    at its first node, 1e-3, the same to 0.1 %), and the support edge narrows it for large r*."""
    r = np.array([0.0, 1e-5, 1e-3])
    s2 = np.log1p(r * r)
    m, v = rf.band_shape(r)
    np.testing.assert_allclose(m[:2], s2[:2] / 2, rtol=1e-12)
    np.testing.assert_allclose(v, s2, rtol=2e-3)
    assert rf.band_shape(1.0)[1] < 0.02 * np.log1p(1.0)


def test_age_profile_equals_brute_force_integral(monkeypatch):
    """Without the mass bounds (their penalty set to zero here), the profile is the integral over E(B-V) (ln F
    linear on each segment) and ln m of the Gaussian band likelihoods with band_shape's moments; here brute
    force on a 0.0005 mag grid, the mass step by the weighted mean. Only the segment integrals are approximated
    (maximum times a Gaussian or Mills-ratio width): per bin within log 2, in KL within 0.05 nats."""
    monkeypatch.setattr(rf.AgeCoordinate, "_mass_bounds_penalty", staticmethod(lambda *a: 0.0))
    obs = physical_obs(30, 13)
    x = obs["x"]
    age = rf.AgeCoordinate(1.0, ALL.age_split_myr, ALL.age_bin_dex, ALL.age_segments, ALL.age_model_error,
                           ALL.age_prior_share)
    g = age.grid()
    lp = age._rows(x)
    e = np.linspace(0.0, 1.5, 3001)
    ln_f = np.stack([[np.interp(e, g["e_nodes"], g["ln_f"][b, :, j]) for j in range(5)]
                     for b in range(len(g["edges"]) - 1)]).transpose(0, 2, 1)       # (B, E, 5)
    mean, var = rf.band_shape(x[:, 5:10])
    w = 1.0 / (var + ALL.age_model_error ** 2)
    y = x[:, 0:5] * np.log(10) + mean - 2 * np.log(simulate.PC10_IN_MPC / x[:, 10:11])
    eps = ALL.age_prior_share
    for i in range(len(x)):
        d = y[i] - ln_f
        mu = np.sum(w[i] * d, -1) / w[i].sum()
        ll = logsumexp(-0.5 * np.sum(w[i] * (d - mu[..., None]) ** 2, -1), axis=1) + g["log_prior"]
        ll -= logsumexp(ll)
        ref = np.logaddexp(np.log1p(-eps) + ll, np.log(eps) + g["log_prior"])
        p = np.exp(ref)
        assert np.max(np.abs(lp[i] - ref)[p > 1e-3]) < np.log(2)
        assert np.sum(p * (ref - lp[i])) < 0.05


def test_settings_travel_whole_and_refuse_unknown_keys():
    s = rf.Settings(age_beta=0.5, floor_scale=0.05)
    assert rf.Settings.from_dict(dict(vars(s))) == s
    with pytest.raises(ValueError, match="unknown refinement settings"):
        rf.Settings.from_dict({"ridge": "cdf"})


def test_solve_increasing_finds_roots_inside_the_bracket():
    """The safeguarded Newton solver on a function with a log singularity at the lower bracket end (like the
    floor term) and a bad start: roots to 1e-12, also where Newton alone would leave the bracket."""
    u = np.linspace(-10, 5, 200)
    g = lambda v, i: (np.log(v) + v, np.log(1 / v + 1))
    v = rf.solve_increasing(g, u, 0.0, 10.0, np.full_like(u, 9.0))
    np.testing.assert_allclose(np.log(v) + v, u, atol=1e-8)


def test_variable_rv_turns_off_the_edges_that_hold_at_rv_3_1_only():
    """Clusters simulated with R_V ~ U[2.5, 2.8] (less dimmed than at 3.1): most (251 of 400) lie below the
    R_V = 3.1 mass floor, where the default transform is undefined (log du/dm = -inf); train.for_variable_rv switches the floor and the support off
    for the refined method on such data (not for the paper's, nor for fixed-R_V data), and with those
    settings every cluster has a finite coordinate and Jacobian that round-trips."""
    import train
    sim = simulate.simulate(400, seed=5, rv_prior=(2.5, 2.8))
    obs = pp.observe({k: sim[k] for k in pp.SIM_KEYS}, np.random.default_rng(6))
    obs["rv_prior"] = sim["rv_prior"]
    theta, x = obs["theta"], obs["x"]
    assert np.sum(~np.all(np.isfinite(rf.RefinedTransform().forward(theta, x)[1]), axis=1)) > 100
    run = train.resolve_config("quick", "refined")
    changed = train.for_variable_rv(run, obs)
    assert changed.refinements == train.RV_OFF
    assert train.for_variable_rv(run, {"x": x}) is run
    paper = train.resolve_config("quick", "paper")
    assert train.for_variable_rv(paper, obs) is paper
    tf = rf.RefinedTransform(rf.Settings.from_dict(changed.refinements))
    u, log_du = tf.forward(theta, x)
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(log_du))
    np.testing.assert_allclose(tf.inverse(u, x), theta, atol=1e-6)
