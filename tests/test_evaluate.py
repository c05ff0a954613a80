"""Tests of evaluate.py: SBC ranks and bands, mean-shift vs scikit-learn, Eq. 11 chi^2, Table 1 inliers."""
import numpy as np
import pytest

from astropy.table import Table

import catalogs
import cinn
import evaluate as ev
import plots
import refinements as rf


# ---------------------------------------------------------------- toy model with a known exact posterior
# theta ~ N(mu0, I), x = theta + N(0, s^2 I)  =>  theta | x ~ N((mu0 + x/s^2) / (1 + 1/s^2), 1 / (1 + 1/s^2))
MU0 = np.array([1.0, 4.0, 0.5])
S_NOISE = 0.7


def toy_pairs(n, rng):
    theta = MU0 + rng.standard_normal((n, 3))
    x = theta + S_NOISE * rng.standard_normal((n, 3))
    prec = 1.0 + 1.0 / S_NOISE ** 2
    return theta, (MU0 + x / S_NOISE ** 2) / prec, np.sqrt(1.0 / prec)


def toy_samples(mean, sd, L, rng, width=1.0, bias=0.0):
    return mean[:, None, :] + bias * sd + width * sd * rng.standard_normal((len(mean), L, 3))


N_PAIRS, L = 3000, 100


def test_statistics_definition():
    th = np.array([[2.0, 5.0, 0.3]])
    np.testing.assert_allclose(ev.sbc_statistics(th)[0], [2.0, 5.0, 0.3, 10.0, 1.5, 0.6])
    with pytest.raises(ValueError):
        ev.sbc_statistics(np.zeros((2, 4)))


def test_ranks_count_samples_below_truth():
    samples = np.zeros((1, 4, 3))
    samples[0, :, 0] = [0.1, 0.5, 0.9, 1.5]
    samples[0, :, 1:] = 10.0
    ranks = ev.sbc_ranks(samples, np.array([[1.0, 0.0, 20.0]]))
    assert ranks[0, 0] == 3          # three of four ages below 1.0
    assert ranks[0, 1] == 0          # no mass below 0
    assert ranks[0, 2] == 4          # all E(B-V) below 20


def test_ecdf_difference_matches_direct_computation():
    rng = np.random.default_rng(3)
    ranks = rng.integers(0, 11, size=200)
    z, diff = ev.ecdf_difference(ranks, 10)
    direct = np.array([np.mean(ranks < i) for i in range(1, 11)]) - np.arange(1, 11) / 11
    np.testing.assert_allclose(diff, direct)
    np.testing.assert_allclose(z, np.arange(1, 11) / 11)


def test_simultaneous_band_covers_uniform_ecdfs_at_nominal_rate():
    """Independent check: fresh uniform rank sets (other seed than the band's) stay inside ~98 % of the time,
    while the pointwise band is left much more often."""
    n, Lb, alpha = 500, 30, 0.02
    _, lo, hi = ev.ecdf_band(n, Lb, alpha, simultaneous=True)
    _, plo, phi = ev.ecdf_band(n, Lb, alpha, simultaneous=False)
    rng = np.random.default_rng(123)
    ranks = rng.integers(0, Lb + 1, size=(n, 2000))
    _, d = ev.ecdf_difference(ranks, Lb)
    inside = np.all((d >= lo) & (d <= hi), axis=1).mean()
    inside_pw = np.all((d >= plo) & (d <= phi), axis=1).mean()
    assert 0.965 < inside < 0.995
    assert inside_pw < inside - 0.05
    assert np.all(lo <= plo) and np.all(hi >= phi)


def test_sbc_exact_posterior_is_uniform():
    rng = np.random.default_rng(0)
    theta, mean, sd = toy_pairs(N_PAIRS, rng)
    ranks = ev.sbc_ranks(toy_samples(mean, sd, L, rng), theta)
    summ = ev.sbc_summary(ranks, L)
    assert summ["all_inside_simultaneous"], summ
    assert all(s["max_abs_ecdf_diff"] < 0.04 for s in summ["statistics"])


@pytest.mark.parametrize("width,bias", [(0.7, 0.0), (1.0, 0.25)])
def test_sbc_catches_overnarrow_and_biased_samplers(width, bias):
    rng = np.random.default_rng(1)
    theta, mean, sd = toy_pairs(N_PAIRS, rng)
    ranks = ev.sbc_ranks(toy_samples(mean, sd, L, rng, width=width, bias=bias), theta)
    summ = ev.sbc_summary(ranks, L)
    outside = [not s["inside_simultaneous_band"] for s in summ["statistics"]]
    assert sum(outside[:3]) == 3, summ       # every marginal statistic is flagged



def test_sbc_product_statistics_catch_wrong_correlations():
    """Correlated toy posterior (corr(log t, log m) ~ 0.75); a sampler with exact marginals but no correlation
    passes T1-T3 and fails T4 = log t * log m: the reason for the product statistics."""
    rng = np.random.default_rng(11)
    cov0 = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    theta = MU0 + rng.multivariate_normal(np.zeros(3), cov0, N_PAIRS)
    x = theta + S_NOISE * rng.standard_normal((N_PAIRS, 3))
    prec0 = np.linalg.inv(cov0)
    cov_p = np.linalg.inv(prec0 + np.eye(3) / S_NOISE ** 2)
    mean_p = (prec0 @ MU0 + x / S_NOISE ** 2) @ cov_p.T
    z = rng.standard_normal((N_PAIRS, L, 3))
    good = mean_p[:, None, :] + z @ np.linalg.cholesky(cov_p).T
    no_corr = mean_p[:, None, :] + z * np.sqrt(np.diag(cov_p))
    s_good = ev.sbc_summary(ev.sbc_ranks(good, theta), L)
    s_bad = ev.sbc_summary(ev.sbc_ranks(no_corr, theta), L)
    assert s_good["all_inside_simultaneous"], s_good
    assert all(s["inside_simultaneous_band"] for s in s_bad["statistics"][:3]), s_bad
    assert not s_bad["statistics"][3]["inside_simultaneous_band"], s_bad

def test_sbc_check_returns_the_figure_numbers_and_plots(tmp_path):
    rng = np.random.default_rng(2)
    theta, mean, sd = toy_pairs(300, rng)
    res = ev.sbc_check(toy_samples(mean, sd, 20, rng), theta)
    assert res["ranks"].shape == (300, 6) and res["ecdf_diff"].shape == (6, 20) and res["L"] == 20
    assert res["summary"] == ev.sbc_summary(res["ranks"], 20)
    plots.plot_sbc(tmp_path / "sbc.png", res)
    assert (tmp_path / "sbc.png").stat().st_size > 10_000


# ---------------------------------------------------------------- mean-shift
def three_mode_mixture(n, rng):
    centres = np.array([[0.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.0, 4.0, 2.0]])
    k = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    return centres, centres[k] + rng.standard_normal((n, 3)) * np.array([0.5, 0.4, 0.3])


def test_densest_sample_picks_the_sample_of_highest_exact_density():
    """A precise cluster's true parameters planted among prior draws: the exact density ranks it first
    (argmin, or another sample's row, would not); the age comes back as its bin, log10 round(t')."""
    simulate = pytest.importorskip("simulate")
    rng = np.random.default_rng(5)
    n, S = 3, 2000
    prior = simulate.sample_prior(n * S, rng)
    samples = np.stack([np.log10(prior["age_myr"] + rng.uniform(-0.5, 0.5, n * S)), prior["log10_mass"],
                        prior["ebv"]], axis=1).reshape(n, S, 3)
    truth = np.array([[np.log10(25.3), 5.2, 0.31], [np.log10(4100.4), 6.7, 0.05], [np.log10(2.2), 3.9, 0.8]])
    planted = rng.integers(S, size=n)
    samples[np.arange(n), planted] = truth
    d = np.array([3.0, 12.0, 20.0])
    flux = simulate.model_flux(np.rint(10 ** truth[:, 0]), truth[:, 2], truth[:, 1], d)
    got = ev.densest_sample(samples, flux, np.full((n, 5), 0.02), d)
    np.testing.assert_allclose(got, np.column_stack([np.log10(np.rint(10 ** truth[:, 0])), truth[:, 1:]]))


def test_kl_near_prior_bounds_splits_a_known_case():
    """Truths at each of the four hard bounds (and NaN) against truths well inside: the split means, counts
    and the near clusters' share of the overall mean come out as constructed."""
    theta = np.array([[2.0, 2.1, 0.5], [2.0, 7.9, 0.5], [2.0, 5.0, 0.01], [2.0, 5.0, 1.48], [2.0, 5.0, 0.7],
                      [3.0, 4.0, 0.3], [1.0, 2.3, 0.06], [0.5, 7.7, 1.44]])
    d = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 0.5, 0.1, 0.3])
    out = ev.kl_near_prior_bounds(d, np.zeros(len(d)), theta)
    assert out["near"][:2] == (4, pytest.approx(2.5)) and out["away"][:2] == (3, pytest.approx(0.3))
    assert out["near"][2] == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert out["near_share_of_total"] == pytest.approx(10.0 / 10.9)
    assert np.isnan(ev.kl_near_prior_bounds(d[5:], np.zeros(3), theta[5:])["near"][1])


def test_kl_by_floor_height_splits_a_known_case():
    """Truths placed at known heights above their own mass floor: each lands in its bin with the constructed
    mean, count and share of the overall mean (NaN left out)."""
    rng = np.random.default_rng(3)
    x = np.column_stack([rng.normal(-4, 0.3, (9, 5)), rng.uniform(0.1, 0.4, (9, 5)), rng.uniform(2, 20, 9)])
    theta = np.column_stack([rng.uniform(0.5, 3, 9), np.zeros(9), rng.uniform(0, 1, 9)])
    height = np.array([0.001, 0.005, 0.02, 0.02, 0.05, 0.5, 1.0, 0.2, 0.004])
    theta[:, 1] = rf.raw_mass_floor(theta[:, 0], theta[:, 2], x) + height
    d = np.array([2.0, 4.0, 1.0, 3.0, 0.5, 0.1, 0.3, np.nan, np.nan])
    out = ev.kl_by_floor_height(d, np.zeros(9), theta, x)
    assert [o[:2] for o in out] == [("< 0.01", 2), ("0.01-0.03", 2), ("0.03-0.1", 1), (">= 0.1", 2)]
    np.testing.assert_allclose([o[2] for o in out], [3.0, 2.0, 0.5, 0.2])
    np.testing.assert_allclose([o[4] for o in out], np.array([6.0, 4.0, 0.5, 0.4]) / 10.9)


def test_mean_shift_flat_agrees_with_sklearn():
    from sklearn.cluster import MeanShift
    rng = np.random.default_rng(5)
    centres, x = three_mode_mixture(4000, rng)
    h = 0.6
    modes = ev.mean_shift(x, bandwidth=h, kernel="flat")
    z = (x - x.mean(0)) / x.std(0)
    ref = MeanShift(bandwidth=h, bin_seeding=True).fit(z).cluster_centers_[:3] * x.std(0) + x.mean(0)
    assert modes.shape == (3, 3)
    # same modes in the same (density) order; both implement the flat-kernel mean-shift, tolerance ~ h/20
    np.testing.assert_allclose(modes, ref, atol=0.05 * h * x.std(0).max())
    np.testing.assert_allclose(modes, centres, atol=0.15)


def test_mean_shift_gaussian_finds_modes_in_density_order():
    rng = np.random.default_rng(6)
    centres, x = three_mode_mixture(10_000, rng)
    modes, dens = ev.mean_shift(x, return_density=True)
    np.testing.assert_allclose(modes, centres, atol=0.1)
    assert np.all(np.diff(dens) < 0)


def test_mean_shift_unimodal_gives_one_mode():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10_000, 3)) * [0.3, 0.5, 0.1] + [1.0, 4.0, 0.3]
    modes = ev.mean_shift(x)
    assert modes.shape == (1, 3)
    # the KDE mode of 1e4 samples scatters by ~0.1-0.15 sd per axis (20 seeds measured); allow 0.3 sd
    assert np.all(np.abs(modes[0] - [1.0, 4.0, 0.3]) < 0.3 * np.array([0.3, 0.5, 0.1])), modes


def test_summarize_shapes_quantiles_and_padding():
    rng = np.random.default_rng(8)
    s = np.stack([rng.standard_normal((2000, 3)), three_mode_mixture(2000, rng)[1]])
    out = ev.summarize(s)
    assert out["modes"].shape == (2, 3, 3) and out["quantiles"].shape == (2, 3, 3)
    assert out["n_modes"][0] == 1 and np.all(np.isnan(out["modes"][0, 1:]))
    assert out["n_modes"][1] == 3
    np.testing.assert_allclose(out["quantiles"][0], np.quantile(s[0], [0.16, 0.5, 0.84], axis=0))


def test_closest_mode_picks_nearest():
    modes = np.array([[[1.0, 3.0, 0.1], [2.0, 5.0, 0.5], [np.nan] * 3]])
    np.testing.assert_allclose(ev.closest_mode(modes, np.array([[2.1, 4.9, 0.4]]))[0], [2.0, 5.0, 0.5])


# ---------------------------------------------------------------- chi^2 (Eq. 11), inliers (Table 1)
def test_resim_chi2_of_data_from_the_model_averages_one():
    """Photometry from the forward model with the SPEC.md Sect. 3 log-normal noise; sigma_b = r* f* (the
    observed relative error times the observed flux) equals the true sigma, so chi^2 / 5 averages 1."""
    simulate = pytest.importorskip("simulate")
    preprocess = pytest.importorskip("preprocess")
    rng = np.random.default_rng(9)
    prior = simulate.sample_prior(20_000, rng)
    f_true = simulate.model_flux(prior["age_myr"], prior["ebv"], prior["log10_mass"], 10.0)
    f_obs, r_obs = preprocess.add_noise(f_true, rng)
    chi2 = ev.resim_chi2(f_true, f_obs, r_obs * f_obs)
    m, se = ev.mean_and_se(chi2)
    assert abs(m - 1.0) < 4 * se and se < 0.02
    # a wrong model (fluxes 20 % too bright) is clearly worse
    assert ev.mean_and_se(ev.resim_chi2(1.2 * f_true, f_obs, r_obs * f_obs))[0] > 1.3


def test_resim_chi2_nu_and_nan_bands():
    f = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    obs = f + np.array([[1.0, 0, 0, 0, np.nan]])
    assert ev.resim_chi2(f, obs, np.ones_like(f))[0] == pytest.approx(1.0 / 4)   # nu = 4 finite bands
    assert ev.resim_chi2(f, obs, np.ones_like(f), nu=2)[0] == pytest.approx(0.5)


def test_inlier_fractions_known_answer():
    # 4 clusters; parameter 0: MLE inside the 16-84 interval for clusters 0, 1 (2 of 4); parameter 1: all;
    # parameter 2: none. MAP inside the MLE range: param 0 in 3 of 4, param 1 in 1 of 4, param 2 NaN in one.
    q = np.zeros((4, 3, 3))
    q[:, 0, :] = -1.0
    q[:, 2, :] = 1.0
    mle = np.array([[0.0, 0.0, 5.0], [0.9, 0.5, 5.0], [1.5, -0.9, -5.0], [-2.0, 0.0, 5.0]])
    lo = mle - 0.5
    hi = mle + 0.5
    map_theta = mle + np.array([[0.1, 1.0, 0.0], [0.2, 1.0, 0.0], [0.3, 1.0, 0.0], [1.0, 0.0, np.nan]])
    out = ev.inlier_fractions(mle, lo, hi, q, map_theta)
    np.testing.assert_allclose(out["mle_in_cinn"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(out["map_in_mle"], [0.75, 0.25, 1.0])
    np.testing.assert_array_equal(out["n_map_in_mle"], [4, 4, 3])
    # a catalogue without 1-sigma ranges: the share is undefined (NaN), not 0 %
    none = ev.inlier_fractions(mle, np.full_like(lo, np.nan), hi, q, map_theta)
    assert np.all(np.isnan(none["map_in_mle"])) and np.all(none["n_map_in_mle"] == 0)


# ---------------------------------------------------------------- PPC
def test_ppc_ranks_uniform_when_posterior_is_the_truth():
    """With a point-mass 'posterior' at the true theta, predictive draws and the observation come from the
    same distribution, so the observation's rank among S draws is uniform on 0..S."""
    simulate = pytest.importorskip("simulate")
    rng = np.random.default_rng(10)
    n, S = 400, 50
    prior = simulate.sample_prior(n, rng)
    dist = rng.uniform(1, 30, n)
    f_true = simulate.model_flux(prior["age_myr"], prior["ebv"], prior["log10_mass"], dist)
    r = rng.uniform(0, 0.5, f_true.shape)
    f_obs = ev.lognormal_noise(f_true, r * f_true, rng)
    theta = np.stack([np.log10(prior["age_myr"]), prior["log10_mass"], prior["ebv"]], axis=1)
    out = ev.ppc(np.repeat(theta[:, None], S, axis=1), f_obs, r * f_true / f_obs, dist, rng)
    np.testing.assert_allclose(out["pred_mean"] / f_true, 1.0, atol=0.5)
    counts = np.bincount(out["rank"].ravel() * 5 // (S + 1), minlength=5)  # 5 equal bins of rank values
    expected = out["rank"].size / 5
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


# ---------------------------------------------------------------- CLI smoke test on a tiny untrained cINN
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny (untrained) cINN checkpoint and 24 simulated test clusters."""
    simulate = pytest.importorskip("simulate")
    preprocess = pytest.importorskip("preprocess")
    cinn = pytest.importorskip("cinn")
    d = tmp_path_factory.mktemp("evalrun")
    obs = preprocess.observe(simulate.simulate(24, seed=3), np.random.default_rng(4))
    simulate.save_npz(d / "test.npz", **obs)
    model = cinn.CINN(cinn.FlowConfig(n_blocks=2, width=16, cond_dim=8, cond_width=16),
                      x_mean=obs["x"].mean(0), x_std=obs["x"].std(0))
    cinn.save(d / "model.pt", model)
    t = obs["theta"]
    simulate.save_npz(d / "mle.npz", age_myr=10 ** t[:, 0], log10_mass=t[:, 1], ebv=t[:, 2],
                      age_myr_lo=10 ** (t[:, 0] - 0.1), age_myr_hi=10 ** (t[:, 0] + 0.1),
                      log10_mass_lo=t[:, 1] - 0.1, log10_mass_hi=t[:, 1] + 0.1,
                      ebv_lo=t[:, 2] - 0.05, ebv_hi=t[:, 2] + 0.05)
    return d


def test_cli_subcommands_write_outputs_and_are_reproducible(tiny_run, capsys):
    simulate = pytest.importorskip("simulate")
    d = tiny_run
    common = ["--model", str(d / "model.pt"), "--obs", str(d / "test.npz"), "--seed", "5"]
    ev.main(["sbc", *common, "--L", "20", "--out", str(d / "sbc1")])
    ev.main(["sbc", *common, "--L", "20", "--out", str(d / "sbc2")])
    a = simulate.load_npz(d / "sbc1" / "sbc.npz")
    b = simulate.load_npz(d / "sbc2" / "sbc.npz")
    np.testing.assert_array_equal(a["ranks"], b["ranks"])            # same seed -> identical numbers
    assert a["ranks"].shape == (24, 6) and a["ranks"].max() <= 20
    ev.main(["ppc", *common, "--samples", "50", "--out", str(d / "ppc")])
    ev.main(["modes", *common, "--samples", "300", "--out", str(d / "modes" / "post.npz")])
    post = simulate.load_npz(d / "modes" / "post.npz", required=("modes", "quantiles"))
    assert post["modes"].shape == (24, 3, 3) and post["quantiles"].shape == (24, 3, 3)
    assert post["densest"].shape == (24, 3) and np.all(np.isfinite(post["densest"]))
    ev.main(["compare", "--obs", str(d / "test.npz"), "--mle", str(d / "mle.npz"), "--summary",
             str(d / "modes" / "post.npz"), "--out", str(d / "cmp")])
    cmp = simulate.load_npz(d / "cmp" / "compare.npz", required=("chi2_map", "chi2_mle", "mle_in_cinn"))
    # the 'MLE' here is the truth: its re-simulation chi^2 (nu = 5) must be of order 1
    assert 0.2 < np.median(cmp["chi2_mle"]) < 3
    for f in ["sbc1/sbc.png", "sbc1/sbc.json", "ppc/ppc.png", "ppc/ppc.npz", "modes/post.png",
              "cmp/compare_map_vs_mle.png", "cmp/compare_chi2.png", "cmp/compare_width.png"]:
        assert (d / f).stat().st_size > 0, f
    out = capsys.readouterr().out
    assert "max|ECDF-U|" in out and "MLE in cINN 16-84%" in out


def test_missing_truth_is_a_clear_error(tiny_run, tmp_path):
    simulate = pytest.importorskip("simulate")
    obs = simulate.load_npz(tiny_run / "test.npz")
    obs["theta"] = np.full_like(obs["theta"], np.nan)
    simulate.save_npz(tmp_path / "real.npz", **obs)
    with pytest.raises(ValueError, match="true theta is NaN"):
        ev.main(["sbc", "--model", str(tiny_run / "model.pt"), "--obs", str(tmp_path / "real.npz"),
                 "--out", str(tmp_path / "x")])


def test_mle_theta_converts_ages_and_widens_to_the_grid_cell():
    th, lo, hi = ev.mle_theta({"age_myr": np.array([1.0, 100.0]), "age_myr_lo": np.array([1.0, 90.0]),
                               "age_myr_hi": np.array([1.0, 110.0]), "log10_mass": np.array([4.0, 5.0]),
                               "ebv": np.array([0.1, 0.2]), "ebv_lo": np.array([0.0, 0.1]),
                               "ebv_hi": np.array([0.2, 0.3])})
    np.testing.assert_allclose(th, [[0.0, 4.0, 0.1], [2.0, 5.0, 0.2]])
    np.testing.assert_allclose(lo[:, 0], np.log10([0.5, 89.5]))
    np.testing.assert_allclose(hi[:, 0], np.log10([1.5, 110.5]))
    assert np.all(np.isnan(lo[:, 1])) and np.all(hi[:, 2] == [0.2, 0.3])
    with pytest.raises(ValueError, match="ebv"):
        ev.mle_theta({"age_myr": np.ones(2), "log10_mass": np.ones(2)})


@pytest.mark.slow
def test_cli_exact_runs_on_two_clusters(tiny_run):
    """`exact` against grid_posterior (tens of seconds per cluster on a busy CPU, hence slow)."""
    pytest.importorskip("grid_posterior")
    simulate = pytest.importorskip("simulate")
    d = tiny_run
    res = ev.main(["exact", "--model", str(d / "model.pt"), "--obs", str(d / "test.npz"), "--n", "2",
                   "--samples", "500", "--examples", "2", "--out", str(d / "exact")])
    out = simulate.load_npz(d / "exact" / "exact.npz", required=("logp_exact", "logq_cinn", "map_exact"))
    assert np.all(np.isfinite(out["logp_exact"])) and np.all(np.isfinite(out["logq_cinn"]))
    assert res["kl_mean_nats"] == pytest.approx(np.mean(out["logp_exact"] - out["logq_cinn"]))
    assert (d / "exact" / "exact_examples.png").stat().st_size > 0


def test_cli_exact_reuses_an_earlier_exact_reference_and_checks_it_matches(tiny_run, tmp_path):
    """--reuse-exact takes the grid posteriors' summaries from an exact.npz (here a made-up one, so no grid
    is computed): the KL estimate uses its log p_exact; another --n is refused with the file named."""
    simulate = pytest.importorskip("simulate")
    d = tiny_run
    theta = simulate.load_npz(d / "test.npz")["theta"][:3]
    fake_logp = np.array([1.0, 2.0, np.nan])                 # the third cluster 'failed' in the earlier run
    simulate.save_npz(tmp_path / "ref.npz", logp_exact=fake_logp, theta_true=theta, map_exact=theta.copy(),
                      quantiles_exact=np.repeat(theta[:, None, :], 3, axis=1) + [[-0.1], [0.0], [0.1]],
                      map_exact_meanshift=theta.copy())
    res = ev.main(["exact", "--model", str(d / "model.pt"), "--obs", str(d / "test.npz"), "--n", "3",
                   "--samples", "300", "--reuse-exact", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "ex")])
    out = simulate.load_npz(tmp_path / "ex" / "exact.npz", required=("logq_cinn", "logq_flow"))
    assert res["n_exact_failed"] == 1
    assert res["kl_mean_nats"] == pytest.approx(np.mean(fake_logp[:2] - out["logq_cinn"][:2]))
    assert res["kl_flow_mean_nats"] == pytest.approx(np.mean(fake_logp[:2] - out["logq_flow"][:2]))
    assert not (tmp_path / "ex" / "exact_examples.png").exists()
    with pytest.raises(ValueError, match="ref.npz.*same --obs and --n"):
        ev.main(["exact", "--model", str(d / "model.pt"), "--obs", str(d / "test.npz"), "--n", "2",
                 "--samples", "300", "--reuse-exact", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "ex2")])


# ---------------------------------------------------------------- the catalogue run

def test_catalog_run_smoke(tmp_path):
    """Catalogue -> untrained tiny cINN -> result tables (ECSV + FITS identical), inliers, flags."""
    import torch
    torch.set_num_threads(1)
    model = cinn.CINN(cinn.FlowConfig(n_blocks=2, width=16, cond_width=16, cond_dim=8), seed=0)
    cinn.save(tmp_path / "model.pt", model)
    syn = catalogs.make_synthetic_phangs(tmp_path / "syn.fits", 40, seed=2, distance_mpc=10.0)
    args = ev.build_parser().parse_args(["catalog", "--input", str(tmp_path / "syn.fits"), "--format", "phangs",
                                         "--distance", "10", "--model", str(tmp_path), "--out",
                                         str(tmp_path / "res.ecsv"), "--samples", "300"])
    tab = args.func(args)
    ecsv = Table.read(tmp_path / "res.ecsv")
    fits = Table.read(tmp_path / "res.fits")
    assert len(ecsv) == len(fits) == len(tab) > 0
    np.testing.assert_allclose(ecsv["log10_age_myr_map"], fits["log10_age_myr_map"])
    kept = syn[np.isin(syn["PHANGS_CLUSTER_CLASS_HUMAN"], (1, 2)) & (syn["PHANGS_NO_COVERAGE_FLAG"] == 0)
               & (syn["PHANGS_NON_DETECTION_FLAG"] == 0)]
    np.testing.assert_array_equal(ecsv["id"], kept["ID_PHANGS_CLUSTERS_v1p2"])
    # quantiles ordered; current stellar mass below initial mass (M*/m0 <= 1)
    for p in catalogs.RESULT_PARAMS:
        assert np.all(ecsv[f"{p}_q16"] <= ecsv[f"{p}_q50"]) and np.all(ecsv[f"{p}_q50"] <= ecsv[f"{p}_q84"])
    assert np.all(ecsv["log10_mstar_map"] <= ecsv["log10_mass_map"] + 1e-12)
    assert np.all(np.isfinite(ecsv["chi2_resim_map"]))
    # the densest sample: one of the cluster's samples, its age reported as the 1 Myr bin
    assert all(np.all(np.isfinite(ecsv[f"{p}_densest"])) for p in ("log10_age_myr", "log10_mass", "ebv"))
    k = 10 ** ecsv["log10_age_myr_densest"]
    np.testing.assert_allclose(k, np.rint(k), rtol=1e-12)
    inl = Table.read(tmp_path / "res_inliers.ecsv")
    assert list(inl["reference"]) == ["grid MLE"] * 4 + ["catalogue (phangs)"] * 3
    assert list(inl["parameter"]) == list(catalogs.RESULT_PARAMS) + ["log10_age_myr", "log10_mstar", "ebv"]
    inl = inl[inl["reference"] == "catalogue (phangs)"]
    for what in ("vs_grid_mle", "vs_catalogue"):
        for fig in ("map_vs_mle", "chi2", "width"):
            assert (tmp_path / f"res_{what}_{fig}.png").stat().st_size > 1000
    assert (tmp_path / "res_examples.png").stat().st_size > 1000
    # the grid MLE minimises chi^2: it beats the truth (the catalogue column here) up to the E(B-V) node spacing
    assert np.mean(ecsv["chi2_resim_mle"] <= ecsv["chi2_resim_cat"] * 1.01 + 1e-6) >= 0.9
    # the truth (stored as the catalogue estimate) inside the 16-84 % interval, recomputed by hand
    inside = (np.log10(kept["PHANGS_AGE_MINCHISQ"]) >= ecsv["log10_age_myr_q16"]) & (
        np.log10(kept["PHANGS_AGE_MINCHISQ"]) <= ecsv["log10_age_myr_q84"])
    assert inl["ref_in_cinn_16_84_pct"][0] == pytest.approx(100 * inside.mean())
    # same seed -> same table, to the float32 network's rounding: in 2 of 5 full CI-like runs (2 threads) the
    # medians of 3 of 31 clusters differed by one float32 ulp (6e-8) between two calls in one process, a CPU
    # kernel effect we could not reproduce in isolation; a different seed moves them by ~3e-2
    args.out, args.no_mle, args.no_figures = str(tmp_path / "res2.ecsv"), True, True
    args.func(args)
    np.testing.assert_allclose(Table.read(tmp_path / "res2.ecsv")["ebv_q50"], ecsv["ebv_q50"], rtol=2.4e-7, atol=0)
    args.out, args.seed = str(tmp_path / "res3.ecsv"), args.seed + 1
    args.func(args)
    assert np.median(np.abs(Table.read(tmp_path / "res3.ecsv")["ebv_q50"] - ecsv["ebv_q50"])) > 1e-4


def test_inliers_by_field_matches_hand_count():
    rng = np.random.default_rng(4)
    n = 9
    q = np.sort(rng.normal(size=(n, 3, 4)), axis=1)
    modes = rng.normal(size=(n, 3, 4))
    th = rng.normal(size=(n, 4))
    mle = {"theta": th, "lo": th - 0.5, "hi": th + 0.5}
    field = np.array(list("aaabbbbcc"))
    t = ev.inliers_by_field(field, {"quantiles": q, "modes": modes}, mle, None, "legus")
    assert len(t) == 3 * 4 and t.colnames[0] == "field"
    s = field == "b"
    inside = (th[s, 1] >= q[s, 0, 1]) & (th[s, 1] <= q[s, 2, 1])
    row = t[(t["field"] == "b") & (t["parameter"] == "log10_mass")][0]
    assert row["ref_in_cinn_16_84_pct"] == pytest.approx(100 * inside.mean())
    in_mle = np.abs(modes[s, 0, 1] - th[s, 1]) <= 0.5
    assert row["cinn_map_in_ref_1sigma_pct"] == pytest.approx(100 * in_mle.mean())


def test_catalog_posteriors_memory_does_not_grow_with_the_catalogue():
    """catalog_posteriors holds one chunk of samples: NumPy's peak allocation (tracemalloc) for 800 clusters is
    within 20 % of that for 200, while holding all samples would take four times as much."""
    import tracemalloc
    import preprocess
    import simulate
    obs = preprocess.observe(simulate.simulate(800, seed=1), np.random.default_rng(2))
    model = cinn.CINN(cinn.FlowConfig(n_blocks=2, width=16, cond_dim=8, cond_width=16),
                      x_mean=obs["x"].mean(0), x_std=obs["x"].std(0))
    peaks = []
    for n in (200, 800):
        tracemalloc.start()
        post = ev.catalog_posteriors(model, obs["x"][:n], 2000, 0, obs, chunk=50)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert post["summ"]["quantiles"].shape == (n, 3, 4) and len(post["examples"][0]) == 3
    all_samples = 800 * 2000 * 3 * 4
    assert peaks[1] < 1.2 * peaks[0] and peaks[1] < 0.5 * all_samples, peaks


def test_parts_of_a_catalogue_run_merge_into_the_whole_run_and_a_run_resumes_from_its_chunks(tmp_path):
    """--part 1/3, 2/3, 3/3 merged give the rows of the whole run exactly (the chunks' seeds are global); a run
    whose first chunk is already stashed takes it and gives the same table; a stash of another run is refused;
    two workers give the same posteriors."""
    import torch
    torch.set_num_threads(1)
    cinn.save(tmp_path / "model.pt", cinn.CINN(cinn.FlowConfig(n_blocks=2, width=16, cond_width=16, cond_dim=8), seed=0))
    catalogs.make_synthetic_phangs(tmp_path / "syn.fits", 60, seed=3, distance_mpc=10.0)
    base = ["catalog", "--input", str(tmp_path / "syn.fits"), "--format", "phangs", "--distance", "10", "--model",
            str(tmp_path), "--samples", "200", "--chunk", "10", "--no-figures", "--no-mle"]
    whole = ev.main(base + ["--out", str(tmp_path / "whole.ecsv")])
    for k in (1, 2, 3):
        ev.main(base + ["--out", str(tmp_path / f"part{k}.ecsv"), "--part", f"{k}/3"])
    merged = ev.main(["merge", "--input"] + [str(tmp_path / f"part{k}.ecsv") for k in (3, 1, 2)]
                     + ["--out", str(tmp_path / "merged.ecsv")])
    for col in ("id", "log10_age_myr_map", "log10_mass_q16", "ebv_q84", "log10_mstar_q50"):
        np.testing.assert_array_equal(merged[col], whole[col])
    assert (tmp_path / "merged_inliers.ecsv").exists()
    parts = [Table.read(tmp_path / f"part{k}.ecsv") for k in (1, 2, 3)]
    with pytest.raises(ValueError, match="need each of"):
        ev.merge_parts(parts[:2])
    parts[1].meta["rows"] = [20, 35]                            # a row range that leaves a gap
    with pytest.raises(ValueError, match="do not cover"):
        ev.merge_parts(parts)
    parts[1].meta["rows"], parts[2].meta["seed"] = [20, 40], 5  # a part of another run
    with pytest.raises(ValueError, match="seed differ"):
        ev.merge_parts(parts)
    parts[1].meta["rows"], parts[2].meta["seed"] = [10, 30], parts[0].meta["seed"]
    parts[2].remove_column("ebv_q84")                              # a part whose columns differ
    with pytest.raises(ValueError, match="different columns"):
        ev.merge_parts(parts)
    with pytest.raises(ValueError, match=r"\.ecsv tables"):
        ev.main(["merge", "--input", str(tmp_path / "part1.fits"), "--out", str(tmp_path / "m.ecsv")])
    other = ev.main(base + ["--out", str(tmp_path / "p3.chunk20.ecsv"), "--part", "2/2", "--chunk", "20"])
    assert other.meta["rows"] == [20, 50] and (tmp_path / "p3.chunk20.fits").exists()   # a dot in --out kept
    with pytest.raises(ValueError, match="chunk"):
        ev.merge_parts([Table.read(tmp_path / "part1.ecsv"), other])
    obs = catalogs.read_many([tmp_path / "syn.fits"], "phangs", 10.0)[0]
    model = cinn.load(tmp_path)
    stash = tmp_path / "resumed_chunks"
    ev.catalog_posteriors(model, obs["x"], 200, 0, obs, rows=slice(0, 10), chunk=10, stash=stash)
    assert [f.name for f in stash.iterdir()] == ["chunk_000000.npz"]
    resumed = ev.main(base + ["--out", str(tmp_path / "resumed.ecsv")])
    np.testing.assert_array_equal(resumed["log10_age_myr_map"], whole["log10_age_myr_map"])
    assert not stash.exists()                                   # removed once the outputs are written
    ev.catalog_posteriors(model, obs["x"], 200, 1, obs, rows=slice(0, 10), chunk=10, stash=stash)   # seed 1
    with pytest.raises(ValueError, match="made by another run"):
        ev.main(base + ["--out", str(tmp_path / "resumed.ecsv")])
    two = ev.catalog_posteriors(str(tmp_path), obs["x"], 200, 0, obs, chunk=10, workers=2)
    one = ev.catalog_posteriors(model, obs["x"], 200, 0, obs, chunk=10)
    np.testing.assert_allclose(two["summ"]["quantiles"], one["summ"]["quantiles"], rtol=1e-5, atol=1e-5)


def test_a_part_must_hold_rows_and_stems_keep_their_dots():
    assert ev.part_rows(300, "2/2", chunk=256) == slice(256, 300)
    with pytest.raises(ValueError, match="fewer than 3 parts"):
        ev.part_rows(300, "1/3", chunk=256)
    assert ev.catalog_stem("cat.part1") == "cat.part1" and ev.catalog_stem("a/b.ECSV") == "a/b"


def test_exact_reference_marginalises_rv_when_the_observations_were_simulated_with_it(tmp_path):
    """Observations with an rv_prior get the R_V-marginal exact posterior (its mixture over R_V nodes), unless
    R_V = 3.1 is asked for; exact.npz records the prior, and reusing it for another prior is refused."""
    import preprocess
    import simulate
    sim = simulate.simulate(3, seed=2, rv_prior=(3.0, 3.2))
    obs = preprocess.observe({k: sim[k] for k in preprocess.SIM_KEYS}, np.random.default_rng(3))
    obs.update(rv=sim["rv"], rv_prior=sim["rv_prior"])
    post = ev.exact_posterior_of(obs, 0)
    assert list(post["rv"]) == [3.0, 3.1, 3.2] and "components" in post
    assert "components" not in ev.exact_posterior_of(obs, 0, rv_prior=None)
    ref, _, _ = ev.exact_reference(obs, 200, np.random.default_rng(0))
    fixed, _, _ = ev.exact_reference(obs, 200, np.random.default_rng(0), rv_prior=None)
    assert np.all(np.isfinite(ref["logp_exact"])) and not np.allclose(ref["logp_exact"], fixed["logp_exact"])
    path = tmp_path / "exact.npz"
    simulate.save_npz(path, **ref, theta_true=obs["theta"], exact_rv_prior=ev._rv_prior_array(obs["rv_prior"]))
    assert np.array_equal(ev._load_exact_reference(path, obs["theta"], obs["rv_prior"])["logp_exact"],
                          ref["logp_exact"])
    with pytest.raises(ValueError, match="R_V prior"):
        ev._load_exact_reference(path, obs["theta"], None)
