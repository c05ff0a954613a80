"""Tests of the noise model, the network inputs and the bounded target transform (preprocess.py)."""
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

import grid_posterior as gp
import preprocess as pp


def random_theta(rng, n):
    a, b = pp.THETA_BOUNDS[:, 0], pp.THETA_BOUNDS[:, 1]
    return a + (b - a) * rng.uniform(size=(n, 3))


def test_transform_round_trip_and_standard_normal_under_uniform():
    rng = np.random.default_rng(0)
    theta = random_theta(rng, 100_000)
    u = pp.theta_to_u(theta)
    np.testing.assert_allclose(pp.u_to_theta(u), theta, rtol=0, atol=1e-12)
    # a uniform theta maps to a standard normal u (probability integral transform)
    for i in range(3):
        assert stats.kstest(u[:, i], "norm").pvalue > 1e-3


def test_transform_finite_on_and_beyond_bounds():
    edges = pp.THETA_BOUNDS.T  # row 0 = lower bounds, row 1 = upper bounds
    u = pp.theta_to_u(edges)
    assert np.all(np.isfinite(u))
    assert np.all(u[0] < -5) and np.all(u[1] > 5)
    assert np.all(np.isfinite(pp.log_det_theta_to_u(edges)))
    np.testing.assert_allclose(pp.u_to_theta(u), edges, atol=1e-6 * np.ptp(pp.THETA_BOUNDS, axis=1).max())
    # the extreme jittered ages t' = 0.5 and 13750.5 Myr are exactly the bounds
    np.testing.assert_allclose(pp.THETA_BOUNDS[0], np.log10([0.5, 13750.5]))


def test_log_det_matches_finite_differences():
    rng = np.random.default_rng(1)
    theta = random_theta(rng, 50)
    h = 1e-6
    num = np.zeros(len(theta))
    for i in range(3):
        step = np.zeros(3)
        step[i] = h
        d = (pp.theta_to_u(theta + step)[:, i] - pp.theta_to_u(theta - step)[:, i]) / (2 * h)
        num += np.log(d)
    np.testing.assert_allclose(pp.log_det_theta_to_u(theta), num, rtol=1e-5)


def test_noise_is_lognormal_with_mean_f_and_std_r_f():
    rng = np.random.default_rng(2)
    f_true = np.full((200_000, 5), 3.0)
    f_obs, r_obs = pp.add_noise(f_true, rng)
    r = r_obs * f_obs / f_true            # the drawn r ~ U[0, 0.5]
    assert r.min() >= 0 and r.max() <= 0.5
    assert stats.kstest(r.ravel()[:50_000], stats.uniform(0, 0.5).cdf).pvalue > 1e-3
    s = np.sqrt(np.log1p(r ** 2))
    zres = (np.log(f_obs) - np.log(f_true) + 0.5 * s ** 2) / s
    assert stats.kstest(zres.ravel()[:50_000], "norm").pvalue > 1e-3
    # mean f' for every r: check in a narrow bin of r, and the standard deviation sigma = r f'
    sel = (r > 0.40) & (r < 0.42)
    np.testing.assert_allclose(f_obs[sel].mean(), 3.0, rtol=0.01)
    np.testing.assert_allclose(f_obs[sel].std(), 0.41 * 3.0, rtol=0.03)
    # DESIGN Sect. 3: about 14 % of observed relative errors exceed 0.5
    assert 0.12 < np.mean(r_obs > 0.5) < 0.16


def test_noise_rejects_bad_flux():
    with pytest.raises(ValueError):
        pp.add_noise(np.array([[1.0, 0.0, 1.0, 1.0, 1.0]]), np.random.default_rng(0))


def test_make_x_layout_and_errors():
    flux = np.array([[1.0, 10.0, 100.0, 0.1, 0.01]])
    rel = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    x = pp.make_x(flux, rel, 7.0)
    np.testing.assert_allclose(x, [[0, 1, 2, -1, -2, 0.1, 0.2, 0.3, 0.4, 0.5, 7.0]])
    with pytest.raises(ValueError, match="rows \\[0\\]"):
        pp.make_x(-flux, rel, 7.0)


def fake_sim(n, rng):
    return dict(age_myr=rng.integers(1, 13751, n), log10_mass=rng.uniform(2, 8, n), ebv=rng.uniform(0, 1.5, n),
                flux_10pc_mjy=10 ** rng.uniform(-3, 5, (n, 5)))


def test_observe_jitter_distance_and_flux_scaling():
    rng = np.random.default_rng(3)
    sim = fake_sim(20_000, rng)
    obs = pp.observe(sim, np.random.default_rng(4))
    t_label = 10 ** obs["theta"][:, 0]
    assert np.all(np.abs(t_label - sim["age_myr"]) <= 0.5)
    assert np.all((obs["theta"] >= pp.THETA_BOUNDS[:, 0]) & (obs["theta"] <= pp.THETA_BOUNDS[:, 1]))
    d = obs["distance_mpc"]
    assert d.min() >= 1 and d.max() <= 30
    # noise preserves the mean: E[f* d^2 / 1e-10] = f_10pc; check via the per-band mean of the ratio
    ratio = obs["flux_mjy"] * d[:, None] ** 2 / 1e-10 / sim["flux_10pc_mjy"]
    np.testing.assert_allclose(ratio.mean(), 1.0, rtol=0.01)
    np.testing.assert_allclose(obs["x"][:, :5], np.log10(obs["flux_mjy"]))
    np.testing.assert_allclose(obs["x"][:, 10], d)
    assert tuple(obs["bands"]) == pp.BANDS
    # determinism for a fixed generator seed
    again = pp.observe(sim, np.random.default_rng(4))
    np.testing.assert_array_equal(again["x"], obs["x"])


def test_prepare_real_adds_systematic_error_eq10():
    flux = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    err = 0.12 * flux
    obs = pp.prepare_real(flux, err, 9.9, ids=np.array(["a", "b"]))
    np.testing.assert_allclose(obs["rel_err"], np.sqrt(0.12 ** 2 + 0.05 ** 2))
    assert np.all(np.isnan(obs["theta"]))
    assert obs["x"].shape == (2, 11) and np.all(obs["x"][:, 10] == 9.9)
    assert list(obs["id"]) == ["a", "b"]
    with pytest.raises(ValueError, match="rows"):
        pp.prepare_real(flux, -err, 9.9)


def test_preprocess_splits_disjoint_deterministic_and_standardisation_from_train():
    rng = np.random.default_rng(5)
    sim = fake_sim(5_000, rng)
    sim["age_myr"] = np.arange(5_000) + 1   # unique labels to identify clusters
    out = pp.preprocess(sim, n_val=500, n_test=700, seed=11)
    ids = {k: set(v["age_myr"].tolist()) for k, v in out.items()}
    assert len(ids["train"]) == 3_800 and len(ids["val"]) == 500 and len(ids["test"]) == 700
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    np.testing.assert_allclose(out["train"]["x_mean"], out["train"]["x"].mean(0))
    assert "flux_10pc_mjy" in out["train"] and "flux_10pc_mjy" not in out["test"]
    again = pp.preprocess(sim, n_val=500, n_test=700, seed=11)
    for k in out:
        np.testing.assert_array_equal(out[k]["x"], again[k]["x"])


def test_cli_writes_three_files(tmp_path):
    simulate = pytest.importorskip("simulate")
    rng = np.random.default_rng(6)
    sim = fake_sim(3_000, rng)
    simulate.save_npz(tmp_path / "sim.npz", **sim)
    pp.main(["--sim", str(tmp_path / "sim.npz"), "--out", str(tmp_path / "d"), "--n-val", "300",
             "--n-test", "400", "--seed", "1"])
    test = simulate.load_npz(tmp_path / "d" / "test.npz", required=("theta", "x", "rel_err"))
    assert test["x"].shape == (400, 11)


def physical_obs(n, seed):
    simulate = pytest.importorskip("simulate")
    return pp.observe(simulate.simulate(n, seed=seed), np.random.default_rng(seed + 1))


def test_mass_floor_is_the_support_edge_of_the_likelihood():
    """The floor equals the edge sigma_b <= f_b / 2 of the noise model: the exact likelihood of
    grid_posterior (written independently) is finite just above it and zero just below; the truth is never
    below it, and for most clusters it lies well above the prior bound 2."""
    gp = pytest.importorskip("grid_posterior")
    obs = physical_obs(400, 3)
    theta, x = obs["theta"], obs["x"]
    floor = pp.log_mass_floor(theta[:, 0], theta[:, 2], x)
    assert np.all(theta[:, 1] >= floor) and not np.any(pp.below_floor(theta, x))
    assert np.mean(floor > 2.01) > 0.9 and np.median(theta[:, 1] - floor) < 0.3
    checked = 0
    for i in np.flatnonzero((floor > 2.01) & (floor < 7.9))[:40]:
        f, r, d = obs["flux_mjy"][i], obs["rel_err"][i], obs["distance_mpc"][i]
        for dm, finite in ((1e-6, True), (-1e-6, False)):
            point = np.array([theta[i, 0], floor[i] + dm, theta[i, 2]])
            L = gp.log_likelihood(point, f, r, d)[0]
            assert np.isfinite(L) == finite, (i, dm, L)
        checked += 1
    assert checked == 40


def test_below_floor_also_where_no_mass_is_allowed():
    """At a (t', E) whose floor lies above the prior's top no mass has finite likelihood: below_floor is True
    there even at m = 8 (log_mass_floor, clipped to 8 - FLOOR_GAP for the transform, cannot say so), as
    grid_posterior's independently written likelihood confirms; where the floor is below 8, m = 8 is allowed."""
    gp = pytest.importorskip("grid_posterior")
    obs = physical_obs(200, 9)
    rng = np.random.default_rng(9)
    theta = random_theta(rng, len(obs["x"]))
    theta[:, 1] = 8.0
    raw = pp._raw_mass_floor(theta[:, 0], theta[:, 2], obs["x"])
    np.testing.assert_array_equal(pp.log_mass_floor(theta[:, 0], theta[:, 2], obs["x"]),
                                  np.clip(raw, 2.0, 8.0 - pp.FLOOR_GAP))
    above, below = np.flatnonzero(raw > 8.01)[:15], np.flatnonzero((raw > 6.0) & (raw < 7.99))[:15]
    assert len(above) == len(below) == 15
    assert np.all(pp.below_floor(theta[above], obs["x"][above]))
    assert not np.any(pp.below_floor(theta[below], obs["x"][below]))
    for i in np.concatenate([above, below]):
        L = gp.log_likelihood(theta[i], obs["flux_mjy"][i], obs["rel_err"][i], obs["distance_mpc"][i])[0]
        assert np.isfinite(L) == (i in below), (i, raw[i], L)


def test_mass_floor_transform_round_trip_and_triangular_jacobian():
    obs = physical_obs(300, 4)
    rng = np.random.default_rng(4)
    x = obs["x"]
    theta = random_theta(rng, len(x))
    floor = pp.log_mass_floor(theta[:, 0], theta[:, 2], x)
    theta[:, 1] = floor + (np.minimum(floor + 0.3, 8.0) - floor) * rng.uniform(0.02, 0.98, len(x))  # near it
    far = theta.copy()
    far[:, 1] = np.where(floor < 5.5, floor + 2.0, far[:, 1])         # 20 scales above: the plain transform
    np.testing.assert_allclose(pp.theta_to_u(far, x)[floor < 5.5, 1], pp.theta_to_u(far)[floor < 5.5, 1],
                               atol=1e-7)
    at_floor = theta.copy()
    at_floor[:, 1] = floor
    assert np.all(pp.theta_to_u(at_floor, x)[floor < 7.9, 1] < -20)    # the edge goes to -infinity
    u = pp.theta_to_u(theta, x)
    np.testing.assert_allclose(pp.u_to_theta(u, x), theta, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(pp.theta_to_u(theta, x, 0.0), pp.theta_to_u(theta))   # scale 0: plain
    assert not np.allclose(u[:, 1], pp.theta_to_u(theta)[:, 1])             # the floor changes u
    h, interior = 1e-6, 0
    for i in range(0, len(x), 15):               # full 3x3 Jacobian by central differences, its log|det|
        jac = np.empty((3, 3))
        for j in range(3):
            step = np.zeros(3)
            step[j] = h
            jac[:, j] = (pp.theta_to_u(theta[i] + step, x[i]) - pp.theta_to_u(theta[i] - step, x[i])) / (2 * h)
        if 2.0 < floor[i] < 7.99:
            assert abs(jac[1, 2]) > 0                                          # u_m depends on E(B-V)
            interior += 1
        np.testing.assert_allclose(pp.log_det_theta_to_u(theta[i], x[i]), np.linalg.slogdet(jac)[1], atol=1e-3)
    assert interior >= 5


def test_mass_ridge_is_the_mass_the_photometry_implies():
    """Noiseless photometry with tiny errors: the ridge centre at the true (age bin, E(B-V)) is the true mass
    and its width the combined precision; with the noise model the truth lies O(1) widths from the centre."""
    simulate = pytest.importorskip("simulate")
    sim = simulate.simulate(300, seed=5)
    rng = np.random.default_rng(5)
    d = rng.uniform(1, 30, 300)
    f = sim["flux_10pc_mjy"] * (pp.PC10_IN_MPC / d[:, None]) ** 2
    r = np.full_like(f, 1e-4)
    x = pp.make_x(f, r, d)
    c, w = pp.log_mass_ridge(np.log10(sim["age_myr"] + rng.uniform(-0.5, 0.5, 300)), sim["ebv"], x)
    np.testing.assert_allclose(c, sim["log10_mass"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(w, 1e-4 / np.sqrt(5) / np.log(10), rtol=1e-6)
    e, we = pp.ebv_from_colours(np.log10(sim["age_myr"] + rng.uniform(-0.5, 0.5, 300)), x)    # from the colours alone
    assert np.max(np.abs(e - sim["ebv"])) < 1e-5 and np.max(np.abs(e - sim["ebv"]) / we) < 0.5
    assert np.all(we < 1e-3)
    obs = physical_obs(3000, 6)
    c, w = pp.log_mass_ridge(obs["theta"][:, 0], obs["theta"][:, 2], obs["x"])
    v = (obs["theta"][:, 1] - c) / w
    assert 0.8 < np.std(v) < 1.6 and abs(np.mean(v)) < 1.0 and np.max(np.abs(v)) < 10
    assert np.median(w) < 0.06          # while the mass itself spans 6 dex of prior
    e, we = pp.ebv_from_colours(obs["theta"][:, 0], obs["x"])
    v = (obs["theta"][:, 2] - e) / we
    assert 0.8 < np.std(v) < 1.6 and abs(np.mean(v)) < 1.0 and np.mean(np.abs(v) > 5) < 0.01
    assert np.median(we) < 0.1          # of 1.5 mag


def test_moment_ridges_are_calibrated_where_the_log_normal_ones_are_not():
    """Over the prior (4,000 clusters, noise model of observe) the truth's offset from the ridges in ridge widths,
    (m - c) / w and (E - e_c) / w_e, with band_moments has mean ~0 and sd ~1, and the centres lie closer to the
    truth; the log-normal weights leave the mass ridge half a width off (mean -0.5) and both ~15 % too narrow."""
    obs = physical_obs(4000, 12)
    theta, x = obs["theta"], obs["x"]
    res = {}
    for moments in (False, True):
        c, w = pp.log_mass_ridge(theta[:, 0], theta[:, 2], x, moments)
        e, we = pp.ebv_from_colours(theta[:, 0], x, moments)
        v, ve = (theta[:, 1] - c) / w, (theta[:, 2] - e) / we
        res[moments] = dict(mean=np.mean(v), sd=np.std(v), sd_e=np.std(ve), dm=np.median(np.abs(theta[:, 1] - c)),
                            de=np.median(np.abs(theta[:, 2] - e)))
    log_normal, mom = res[False], res[True]
    assert log_normal["mean"] < -0.3 and log_normal["sd"] > 1.1 and log_normal["sd_e"] > 1.1
    assert abs(mom["mean"]) < 0.1 and 0.9 < mom["sd"] < 1.1 and 0.9 < mom["sd_e"] < 1.1
    assert mom["dm"] < 0.9 * log_normal["dm"] and mom["de"] < 0.9 * log_normal["de"]


@pytest.mark.parametrize("scale,ridge,ebv_ridge,moments", [(0.0, True, False, False), (0.1, True, False, False),
                                                           (0.1, True, True, False), (0.1, True, True, True),
                                                           (0.1, True, "cdf", True), (0.1, "cdf", "cdf", True),
                                                           (0.0, "cdf", False, False)])
def test_mass_ridge_transform_round_trip_and_triangular_jacobian(scale, ridge, ebv_ridge, moments):
    obs = physical_obs(300, 7)
    rng = np.random.default_rng(7)
    x = obs["x"]
    theta = random_theta(rng, len(x))
    theta[::2] = obs["theta"][::2]                   # half at the true (t', E): there the ridge is in the prior
    c, w = pp.log_mass_ridge(theta[:, 0], theta[:, 2], x, moments)
    lo = pp.log_mass_floor(theta[:, 0], theta[:, 2], x) if scale else np.full(len(x), 2.0)
    near = c + w * rng.normal(0, 2, len(x))                                  # on the ridge, where it is inside
    on = (np.arange(len(x)) % 2 == 0) & (near > lo + 0.05) & (near < 7.9)
    theta[:, 1] = np.where(on, near, lo + (8.0 - lo) * rng.uniform(0.01, 0.99, len(x)))
    u = pp.theta_to_u(theta, x, scale, ridge, ebv_ridge, moments=moments)
    assert np.all(np.isfinite(u))
    np.testing.assert_allclose(pp.u_to_theta(u, x, scale, ridge, ebv_ridge, moments=moments), theta, rtol=0, atol=1e-10)
    assert on.sum() > 60 and np.std(u[on, 1]) < 4           # the ridge term makes the mass near c O(1) in u
    up = theta.copy()
    up[:, 1] = np.minimum(theta[:, 1] + 1e-4, 8.0)
    assert np.all(pp.theta_to_u(up, x, scale, ridge, ebv_ridge, moments=moments)[:, 1] > u[:, 1])       # increasing in m
    h = 1e-7
    for i in range(0, len(x), 10):               # full 3x3 Jacobian by central differences, its log|det|
        jac = np.empty((3, 3))
        for j in range(3):
            step = np.zeros(3)
            step[j] = h
            jac[:, j] = (pp.theta_to_u(theta[i] + step, x[i], scale, ridge, ebv_ridge, moments=moments)
                         - pp.theta_to_u(theta[i] - step, x[i], scale, ridge, ebv_ridge, moments=moments)) / (2 * h)
        assert jac[0, 1] == 0 and jac[2, 1] == 0 and jac[0, 2] == 0               # triangular
        np.testing.assert_allclose(pp.log_det_theta_to_u(theta[i], x[i], scale, ridge, ebv_ridge, moments=moments),
                                   np.linalg.slogdet(jac)[1], atol=1e-4)


def test_ebv_cdf_ridge_maps_its_own_truncated_gaussian_to_a_standard_normal():
    """ebv_ridge="cdf": u_E = Phi^-1(G(E)) with G the CDF of (1 - eps) N(e_c, w_e) truncated to [0, 1.5] + eps U.
    Draws from that mixture (also piled against either bound, where the additive ridge is not normal) come out
    standard normal (KS); du/dE equals central differences, and the inverse returns E to 1e-10 also for ridges
    many widths outside the range (both tails of G computed directly)."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    n = 20000
    for c, w in ((-0.02, 0.03), (0.4, 0.05), (1.52, 0.02), (0.7, 1.0)):
        t = stats.truncnorm.rvs(-c / w, (1.5 - c) / w, loc=c, scale=w, size=n, random_state=rng)
        e = np.where(rng.uniform(size=n) < pp.CDF_PRIOR, rng.uniform(0, 1.5, n), t)
        ridge = (np.full(n, c), np.full(n, w))
        u, log_du = pp._ebv_cdf_u_du(e, ridge)
        assert stats.kstest(u, "norm").pvalue > 0.01, (c, w)
        if c < 0.1:
            assert stats.kstest(pp._ebv_u(e, ridge), "norm").pvalue < 1e-6     # the additive form is not
        h = 1e-7
        num = (pp._ebv_cdf_u_du(e[:200] + h, (ridge[0][:200], ridge[1][:200]))[0]
               - pp._ebv_cdf_u_du(e[:200] - h, (ridge[0][:200], ridge[1][:200]))[0]) / (2 * h)
        inner = (np.abs(u[:200]) < 5) & (e[:200] > 2 * h) & (e[:200] < 1.5 - 2 * h)
        np.testing.assert_allclose(np.log(num[inner]), log_du[:200][inner], atol=1e-5)
    for c, w in ((-0.5, 0.01), (2.5, 0.05), (0.3, 0.001)):
        e = np.linspace(1e-4, 1.5 - 1e-4, 501)      # (G is clipped to [EPS, 1 - EPS], as the plain transform)
        ridge = (np.full(len(e), c), np.full(len(e), w))
        u, _ = pp._ebv_cdf_u_du(e, ridge)
        assert np.all(np.diff(u) > 0) and np.all(np.isfinite(u))
        np.testing.assert_allclose(pp._ebv_cdf_from_u(u, ridge), e, rtol=0, atol=1e-10)


def test_ebv_ridge_once_per_distinct_bin_equals_row_by_row():
    """ebv_from_colours fits each distinct (age bin, x) pair once (samples repeat x): same values as row by row,
    also for rows that share x but not the bin, and for a mostly-distinct input (the plain path)."""
    obs = physical_obs(200, 8)
    rng = np.random.default_rng(8)
    x = np.repeat(obs["x"], 50, axis=0)
    log_age = np.repeat(obs["theta"][:, 0], 50) + rng.choice([0.0, 0.0, 0.3], len(x))   # 2 bins per cluster
    for la, xx in ((log_age, x), (obs["theta"][:, 0], obs["x"])):
        e, w = pp.ebv_from_colours(la, xx)
        e_row, w_row = pp._ebv_fit(la, xx)
        np.testing.assert_array_equal(e, e_row)
        np.testing.assert_array_equal(w, w_row)
        if len(la) == len(log_age):
            assert 300 < len(np.unique(e)) <= 400       # two bins for most clusters: the bins matter


def _profile_density(log_age, x, beta):
    """The age profile's density in log10 t' from the transform alone: phi(u_t) du_t / dlog10 t'."""
    u, log_du = pp._age_u_du(log_age, x, beta)
    return np.exp(log_du - 0.5 * u ** 2 - 0.5 * np.log(2 * np.pi))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_age_profile_warp_round_trip_normalised_and_triangular(beta):
    """u_t = Phi^-1(G(t' | x)): inverse to 1e-10, its density phi(u) du/dlog t' integrates to 1 over the age
    range (independent of the CDF code: the integral is a sum over a fine grid with every bin edge on it), the
    full transform's log|det| matches central differences, and the warp leaves mass and E(B-V) untouched."""
    obs = physical_obs(200, 12)
    x, theta = obs["x"], obs["theta"].copy()
    mt = dict(scale=0.1, ridge=True, ebv_ridge=True, age_profile=beta)
    u = pp.theta_to_u(theta, x, **mt)
    assert np.all(np.isfinite(u))
    np.testing.assert_allclose(pp.u_to_theta(u, x, **mt), theta, rtol=0, atol=1e-10)
    plain = dict(mt, age_profile=0.0)
    np.testing.assert_array_equal(u[:, 1:], pp.theta_to_u(theta, x, **plain)[:, 1:])
    edges = pp.age_profile_grid()["edges"]
    for i in range(0, len(x), 40):                 # midpoint rule inside each bin: exact for the bin's t' density
        t = np.concatenate([np.linspace(lo, hi, 41)[:-1] for lo, hi in zip(edges[:-1], edges[1:])])
        t_mid = t + np.repeat(np.diff(edges) / 80, 40)
        dens = _profile_density(np.log10(t_mid), x[i], beta)             # in log10 t'
        dt = np.diff(np.concatenate([t, [edges[-1]]]))
        assert abs(np.sum(dens / (t_mid * np.log(10)) * dt) - 1) < 1e-6
    h = 1e-7
    for i in range(0, len(x), 20):
        jac = np.empty((3, 3))
        for j in range(3):
            step = np.zeros(3)
            step[j] = h
            jac[:, j] = (pp.theta_to_u(theta[i] + step, x[i], **mt)
                         - pp.theta_to_u(theta[i] - step, x[i], **mt)) / (2 * h)
        assert jac[0, 1] == 0 and jac[0, 2] == 0 and jac[2, 1] == 0
        np.testing.assert_allclose(pp.log_det_theta_to_u(theta[i], x[i], **mt), np.linalg.slogdet(jac)[1], atol=1e-4)


@pytest.mark.parametrize("r", [0.003, 0.05, 0.15, 0.3, 0.5, 0.8, 2.0, 20.0])
def test_band_shape_is_the_moments_of_the_exact_band_likelihood(r):
    """band_shape's table against scipy's adaptive quadrature of exp(l(y)) (grid_posterior.band_loglike),
    split at the support edge, around the main peak and in the tail: mean within 1e-3 s, sd within 0.2 %."""
    from scipy.integrate import quad
    s, edge = np.sqrt(np.log1p(r * r)), np.log(2 * r)
    top = gp.band_loglike(np.array([max(edge, s * s / 2)]), r)[0]
    end = max(edge, 0.0) + 40 * s + 5.0
    cuts = np.unique(np.clip([edge, -10 * s, -3 * s, 0.0, 3 * s, 10 * s, edge + 2.0, end], edge, end))
    mom = [sum(quad(lambda y: y ** n * np.exp(gp.band_loglike(np.array([y]), r)[0] - top), lo, hi,
                    limit=200, epsabs=0, epsrel=1e-10)[0] for lo, hi in zip(cuts[:-1], cuts[1:])) for n in range(3)]
    mean = mom[1] / mom[0]
    sd = np.sqrt(mom[2] / mom[0] - mean ** 2)
    m, v = pp.band_shape(r)
    assert abs(m - mean) < 1e-3 * s
    assert abs(np.sqrt(v) / sd - 1) < 2e-3


def test_band_shape_has_the_log_normal_limit():
    """For r* -> 0 the band likelihood is the log-normal's: mean s^2/2, variance s^2 (below the table: exact;
    at its first node, 1e-3, the same to 0.1 %), and the support edge narrows it for large r*."""
    r = np.array([0.0, 1e-5, 1e-3])
    s2 = np.log1p(r * r)
    m, v = pp.band_shape(r)
    np.testing.assert_allclose(m[:2], s2[:2] / 2, rtol=1e-12)
    np.testing.assert_allclose(v, s2, rtol=2e-3)
    assert pp.band_shape(1.0)[1] < 0.02 * np.log1p(1.0)


@pytest.mark.parametrize("shape", ["moments", "lognormal"])
def test_age_profile_equals_brute_force_integral(monkeypatch, shape):
    """Without the mass bounds, the profile is the integral over E(B-V) (ln F linear on each segment) and
    ln m of the Gaussian band likelihoods (moments: band_shape's; lognormal: variance s^2, times 2/f); here
    brute force on a 0.0005 mag grid, the mass step by the weighted mean. Only the segment integrals are
    approximated (maximum times a Gaussian or Mills-ratio width): per bin within log 2, in KL within 0.05
    nats. A wrong sign or sum in the algebra is off by nats."""
    monkeypatch.setattr(pp, "AGE_PROFILE_BOUNDS", False)
    monkeypatch.setattr(pp, "AGE_PROFILE_SHAPE", shape)
    obs = physical_obs(30, 13)
    x = obs["x"]
    g = pp.age_profile_grid()
    lp = pp._age_profile_rows(x, 1.0)
    e = np.linspace(0.0, 1.5, 3001)
    ln_f = np.stack([[np.interp(e, g["e_nodes"], g["ln_f"][b, :, j]) for j in range(5)]
                     for b in range(len(g["edges"]) - 1)]).transpose(0, 2, 1)       # (B, E, 5)
    s2 = np.log1p(x[:, 5:10] ** 2)
    mean, var = (s2 / 2, s2) if shape == "lognormal" else pp.band_shape(x[:, 5:10])
    w = 1.0 / (var + pp.AGE_PROFILE_FLOOR ** 2)
    y = x[:, 0:5] * np.log(10) + mean - 2 * np.log(pp.PC10_IN_MPC / x[:, 10:11])
    eps = pp.AGE_PROFILE_PRIOR
    for i in range(len(x)):
        d = y[i] - ln_f
        mu = np.sum(w[i] * d, -1) / w[i].sum()
        integrand = -0.5 * np.sum(w[i] * (d - mu[..., None]) ** 2, -1)
        if shape == "lognormal":
            integrand += -5 * mu - ln_f.sum(-1)
        ll = logsumexp(integrand, axis=1) + g["log_prior"]
        ll -= logsumexp(ll)
        ref = np.logaddexp(np.log1p(-eps) + ll, np.log(eps) + g["log_prior"])
        p = np.exp(ref)
        assert np.max(np.abs(lp[i] - ref)[p > 1e-3]) < np.log(2)
        assert np.sum(p * (ref - lp[i])) < 0.05
