"""Tests for catalogs.py: transforms, the three readers on good and bad input, the LEGUS files, distances."""
import numpy as np
import pytest
from astropy.table import Table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import catalogs
from catalogs import BANDS

HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------- fixtures

def phangs_table(n=6, seed=0):
    """A small valid PHANGS-format table written by hand (independent of simulate.py)."""
    rng = np.random.default_rng(seed)
    t = Table()
    t["ID_PHANGS_CLUSTERS_v1p2"] = np.arange(1, n + 1)
    t["PHANGS_RA"] = 10 + rng.random(n)
    t["PHANGS_DEC"] = -5 + rng.random(n)
    for b in BANDS:
        f = 10 ** rng.uniform(-4, -1, n)
        t[f"PHANGS_{b}_mJy_TOT"] = f
        t[f"PHANGS_{b}_mJy_TOT_ERR"] = 0.1 * f
    t["PHANGS_CLUSTER_CLASS_HUMAN"] = np.ones(n, int)
    t["PHANGS_NO_COVERAGE_FLAG"] = np.zeros(n, int)
    t["PHANGS_NON_DETECTION_FLAG"] = np.zeros(n, int)
    t["PHANGS_AGE_MINCHISQ"] = rng.uniform(1, 1000, n)
    t["PHANGS_AGE_MINCHISQ_ERR"] = np.full(n, 1.0)
    t["PHANGS_MASS_MINCHISQ"] = 10 ** rng.uniform(3, 5, n)
    t["PHANGS_MASS_MINCHISQ_ERR"] = np.full(n, 100.0)
    t["PHANGS_EBV_MINCHISQ"] = rng.uniform(0, 1, n)
    t["PHANGS_EBV_MINCHISQ_ERR"] = np.full(n, 0.05)
    return t


def legus_row(i, mags=(21.0, 21.5, 22.0, 22.2, 21.8), errs=(0.1, 0.1, 0.05, 0.05, 0.05), cls=1.0, ncol=36):
    """One LEGUS-format line (1-based columns as in the LEGUS readme)."""
    vals = [i, 100.0, 200.0, 10.5, -20.25]
    for m, e in zip(mags, errs):
        vals += [m, e]
    vals += [1.5, 7e6, 8e6, 6e6, 1e4, 1.2e4, 8e3, 0.2, 0.3, 0.1, 0, 0, 0, 0, 0, 1.0, 0.5, 5, cls]
    vals += [cls] * (ncol - len(vals))
    return " ".join(str(v) for v in vals) + "\n"


def write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- transforms

def test_vega_to_mjy_matches_photfnu_route(shared_data):
    """Independent route: f_nu = PHOTFNU * 10^(-0.4 (m_Vega - zpVEGA)) Jy (counts/s times inverse sensitivity)."""
    zp = Table.read(shared_data / "legus" / "wfc3_uvis_zeropoints_ngc1566_2013.txt", format="ascii.commented_header")
    for row in zp:
        band = row["filter"]
        m = np.array([18.0, 22.5, 26.0])
        ref_mjy = row["photfnu"] * 10 ** (-0.4 * (m - row["zpVEGA"])) * 1e3
        np.testing.assert_allclose(catalogs.vega_to_mjy(m, band), ref_mjy, rtol=2e-3)


def test_zero_point_constants_match_shared_file(shared_data):
    zp = Table.read(shared_data / "legus" / "wfc3_uvis_zeropoints_ngc1566_2013.txt", format="ascii.commented_header")
    assert [str(b) for b in zp["filter"]] == list(BANDS)
    for row in zp:
        assert catalogs.WFC3_UVIS_VEGA_TO_AB[row["filter"]] == pytest.approx(row["zpAB"] - row["zpVEGA"], abs=1e-4)


def test_ab_zero_magnitude_is_3631_jy():
    # offset cancels: a source with m_Vega = -offset has m_AB = 0
    assert catalogs.vega_to_mjy(-catalogs.WFC3_UVIS_VEGA_TO_AB["F555W"], "F555W") == pytest.approx(3.631e6)


@given(st.floats(0.0, 0.05), st.floats(10.0, 30.0))
def test_mag_err_to_rel_err_first_order(sigma_m, m):
    """Relative flux error agrees with the exact magnitude difference to first order in sigma_m."""
    band = "F336W"
    exact = catalogs.vega_to_mjy(m - sigma_m, band) / catalogs.vega_to_mjy(m, band) - 1.0
    approx = catalogs.mag_err_to_rel_err(sigma_m)
    assert abs(approx - exact) <= 0.5 * (0.4 * np.log(10) * sigma_m) ** 2 * 1.2 + 1e-12


@given(st.lists(st.floats(15.0, 35.0), min_size=1, max_size=8))
def test_vega_to_mjy_monotone_and_5mag_is_factor_100(mags):
    m = np.array(mags)
    f = catalogs.vega_to_mjy(m, "F814W")
    np.testing.assert_allclose(f / catalogs.vega_to_mjy(m + 5.0, "F814W"), 100.0, rtol=1e-10)
    order = np.argsort(m)
    assert np.all(np.diff(f[order]) <= 0)


def test_domain_flags_bits():
    rel = np.full((4, 5), 0.1)
    rel[1, 3] = 0.6
    cat_rel = np.full((4, 5), 0.1)
    cat_rel[2, 1] = 0.45
    cat_rel[3, 4] = 0.45  # not a UV band: no uv flag
    d = np.array([10.0, 10.0, 10.0, 31.0])
    flags = catalogs.domain_flags(rel, cat_rel, d)
    assert flags.tolist() == [0, 1, 4, 2]
    assert catalogs.flag_names(flags).tolist() == ["", "rel_err", "uv_err", "distance"]
    flux = np.full((4, 5), 1e-3)
    flux[1, 2], flux[2, 0] = 1e30, 1e-30                      # no cluster of the prior is that bright or faint
    flags = catalogs.domain_flags(rel, cat_rel, d, flux)
    assert flags.tolist() == [0, 1 | 8, 4 | 8, 2]


# ---------------------------------------------------------------------------------------------- PHANGS

def test_read_phangs_values_and_eq10(tmp_path):
    t = phangs_table()
    t.write(tmp_path / "p.fits")
    obs, est, rep = catalogs.read_phangs(tmp_path / "p.fits", 12.0)
    assert rep["kept"] == len(t) and sum(rep["dropped"].values()) == 0
    flux = np.stack([t[f"PHANGS_{b}_mJy_TOT"] for b in BANDS], axis=1)
    np.testing.assert_allclose(obs["flux_mjy"], flux)
    np.testing.assert_allclose(obs["rel_err"], np.sqrt(0.1 ** 2 + 0.05 ** 2))  # Eq. 10
    np.testing.assert_allclose(obs["x"][:, :5], np.log10(flux))
    np.testing.assert_allclose(obs["x"][:, 10], 12.0)
    np.testing.assert_allclose(est["log10_mass"], np.log10(t["PHANGS_MASS_MINCHISQ"]))
    np.testing.assert_allclose(est["log10_mass_hi"], np.log10(t["PHANGS_MASS_MINCHISQ"] + 100))
    np.testing.assert_allclose(est["age_myr_lo"], t["PHANGS_AGE_MINCHISQ"] - 1)
    np.testing.assert_array_equal(obs["id"], t["ID_PHANGS_CLUSTERS_v1p2"])
    np.testing.assert_allclose(obs["ra_deg"], t["PHANGS_RA"])
    assert np.all(obs["flags"] == 0)


@pytest.mark.parametrize("col", ["PHANGS_F438W_mJy_TOT", "PHANGS_F814W_mJy_TOT_ERR", "PHANGS_CLUSTER_CLASS_HUMAN",
                                 "ID_PHANGS_CLUSTERS_v1p2", "PHANGS_RA"])
def test_read_phangs_missing_column(tmp_path, col):
    t = phangs_table()
    t.remove_column(col)
    t.write(tmp_path / "p.fits")
    with pytest.raises(ValueError, match=f"p.fits.*{col}"):
        catalogs.read_phangs(tmp_path / "p.fits", 10.0)


def test_read_phangs_bad_values_are_counted_not_silent(tmp_path, capsys):
    t = phangs_table(n=9)
    t["PHANGS_F275W_mJy_TOT"][0] = np.nan
    t["PHANGS_F336W_mJy_TOT"][1] = 0.0
    t["PHANGS_F438W_mJy_TOT"][2] = -1e-3
    t["PHANGS_F555W_mJy_TOT"][3] = -9999.0
    t["PHANGS_F814W_mJy_TOT_ERR"][4] = np.nan
    t["PHANGS_CLUSTER_CLASS_HUMAN"][5] = 3
    t["PHANGS_NO_COVERAGE_FLAG"][6] = 1
    t["PHANGS_NON_DETECTION_FLAG"][7] = 2
    t.write(tmp_path / "p.fits")
    obs, est, rep = catalogs.read_phangs(tmp_path / "p.fits", 10.0)
    assert rep["kept"] == 1 and obs["id"].tolist() == [9]
    d = rep["dropped"]
    assert d["class not 1 or 2"] == 1
    assert d["no coverage in a band (PHANGS_NO_COVERAGE_FLAG)"] == 1
    assert d["not detected in a band (PHANGS_NON_DETECTION_FLAG)"] == 1
    assert d["invalid flux in a band (NaN, <= 0 or sentinel)"] == 4
    assert d["invalid flux error in a band (NaN, < 0 or sentinel)"] == 1
    assert rep["rows"] == rep["kept"] + sum(d.values())
    assert "kept 1" in capsys.readouterr().err


def test_read_phangs_flags(tmp_path):
    t = phangs_table(n=3)
    t["PHANGS_F275W_mJy_TOT_ERR"][0] = 0.45 * t["PHANGS_F275W_mJy_TOT"][0]  # UV error > 40 %
    t["PHANGS_F555W_mJy_TOT_ERR"][1] = 0.6 * t["PHANGS_F555W_mJy_TOT"][1]  # r' > 0.5
    t.write(tmp_path / "p.fits")
    obs, _, rep = catalogs.read_phangs(tmp_path / "p.fits", 35.0)  # outside 1-30 Mpc: all flagged
    assert obs["flags"].tolist() == [4 | 2, 1 | 2, 2]
    assert rep["flagged"] == {"rel_err": 1, "distance": 3, "uv_err": 1, "flux_range": 0}
    assert rep["kept"] == 3


def test_read_phangs_duplicate_ids(tmp_path):
    t = phangs_table()
    t["ID_PHANGS_CLUSTERS_v1p2"][3] = t["ID_PHANGS_CLUSTERS_v1p2"][1]
    t.write(tmp_path / "p.fits")
    with pytest.raises(ValueError, match=r"duplicate id.*id 2 at rows \[1, 3\]"):
        catalogs.read_phangs(tmp_path / "p.fits", 10.0)


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_read_phangs_empty_truncated_missing(tmp_path):
    phangs_table()[:0].write(tmp_path / "empty.fits")
    with pytest.raises(ValueError, match="empty.fits: the table has no rows"):
        catalogs.read_phangs(tmp_path / "empty.fits", 10.0)
    phangs_table(n=200).write(tmp_path / "full.fits")
    data = (tmp_path / "full.fits").read_bytes()
    (tmp_path / "trunc.fits").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="trunc.fits"):
        catalogs.read_phangs(tmp_path / "trunc.fits", 10.0)
    with pytest.raises(ValueError, match="nope.fits: file not found"):
        catalogs.read_phangs(tmp_path / "nope.fits", 10.0)


def test_read_phangs_nothing_kept_is_an_error_with_report(tmp_path):
    t = phangs_table()
    t["PHANGS_CLUSTER_CLASS_HUMAN"] = 4
    t.write(tmp_path / "p.fits")
    with pytest.raises(ValueError, match=r"no cluster passes(.|\n)*dropped +6 +class not 1 or 2"):
        catalogs.read_phangs(tmp_path / "p.fits", 10.0)


def test_bad_distance(tmp_path):
    phangs_table().write(tmp_path / "p.fits")
    for d in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="distance"):
            catalogs.read_phangs(tmp_path / "p.fits", d)
    with pytest.raises(ValueError, match="distance table not found"):
        catalogs.read_phangs(tmp_path / "p.fits", str(tmp_path / "nodist.txt"))


def test_make_synthetic_phangs_roundtrip(tmp_path):
    import simulate
    t = catalogs.make_synthetic_phangs(tmp_path / "syn.fits", 300, seed=3, distance_mpc=8.0)
    t2 = catalogs.make_synthetic_phangs(tmp_path / "syn2.fits", 300, seed=3, distance_mpc=8.0)
    assert (tmp_path / "syn.fits").read_bytes() == (tmp_path / "syn2.fits").read_bytes()  # same seed, same file
    obs, est, rep = catalogs.read_phangs(tmp_path / "syn.fits", 8.0)
    ok = (np.isin(t["PHANGS_CLUSTER_CLASS_HUMAN"], (1, 2)) & (t["PHANGS_NO_COVERAGE_FLAG"] == 0)
          & (t["PHANGS_NON_DETECTION_FLAG"] == 0))
    assert rep["kept"] == ok.sum() and 150 < rep["kept"] < 300
    kept = t[ok]
    np.testing.assert_allclose(est["age_myr"], kept["PHANGS_AGE_MINCHISQ"])
    # the noiseless model at the true parameters is within a few sigma of the observed flux (noise model)
    model = simulate.model_flux(kept["PHANGS_AGE_MINCHISQ"].astype(int), kept["PHANGS_EBV_MINCHISQ"],
                                kept["TRUE_LOG10_MASS_INITIAL"], 8.0)
    ratio = obs["flux_mjy"] / model
    assert 0.8 < np.median(ratio) < 1.2


# ---------------------------------------------------------------------------------------------- LEGUS

LEGUS_DIST = "legus_distances_calzetti2015_table1.txt"


def test_all_nine_legus_fields(shared_data):
    files = sorted((shared_data / "legus").glob("hlsp_legus_hst_wfc3_*_padagb-mwext-avgapcor.tab"))
    assert len(files) == 9
    expect_d = {"ngc7793-e": 3.44, "eso486-g021": 9.5, "ngc4395-n": 4.30, "ugc7242": 5.42}
    for f in files:
        obs, est, rep = catalogs.read_legus(f, shared_data / "legus" / LEGUS_DIST)
        # independent count with numpy: classes 1-2 and a real magnitude (< 60) in all five bands
        a = np.loadtxt(f, usecols=range(34))
        ok = np.isin(a[:, 33], (1, 2)) & np.all(a[:, 5:15] < 60, axis=1)
        assert rep["kept"] == ok.sum() > 0
        assert rep["rows"] == len(a) == rep["kept"] + sum(rep["dropped"].values())
        np.testing.assert_array_equal(obs["id"], a[ok, 0].astype(int))
        np.testing.assert_allclose(obs["flux_mjy"][:, 2], catalogs.vega_to_mjy(a[ok, 9], "F438W"))
        np.testing.assert_allclose(est["age_myr"], np.where(a[ok, 16] > 0, a[ok, 16] / 1e6, np.nan))
        field = catalogs.galaxy_from_filename(f)
        if field in expect_d:
            assert obs["distance_mpc"][0] == expect_d[field]
        assert np.all(np.isfinite(obs["x"]))


def legus_file(tmp_path, rows, name="hlsp_legus_hst_wfc3_ngc9999_multiband_v1_padagb-mwext-avgapcor.tab"):
    return write(tmp_path / name, "".join(rows))


def test_legus_sky_positions_out_of_range_and_binary_files_are_refused(tmp_path):
    row = legus_row(1).split()
    row[4] = "150.0"                                     # Dec 150: not a declination, a wrong column
    with pytest.raises(ValueError, match="Dec outside|Dec in \\[-90, 90\\]"):
        catalogs.read_legus(legus_file(tmp_path, [" ".join(row) + "\n"]), 10.0)
    binary = tmp_path / "hlsp_legus_hst_wfc3_ngc1_multiband.tab"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a text file"):
        catalogs.read_legus(binary, 10.0)


def test_legus_sentinels_and_classes(tmp_path):
    rows = [legus_row(1), legus_row(2, mags=(66.666, 21.5, 22, 22.2, 21.8), errs=(66.666, .1, .05, .05, .05)),
            legus_row(3, mags=(21, 99.999, 22, 22.2, 21.8), errs=(.1, 99.999, .05, .05, .05)),
            legus_row(4, mags=(21, 21.5, -9999, 22.2, 21.8)), legus_row(5, mags=(21, 21.5, float("nan"), 22.2, 21.8)),
            legus_row(6, errs=(.1, .1, -0.05, .05, .05)), legus_row(7, cls=3.0), legus_row(8, cls=2.0),
            legus_row(9, errs=(0.2, 0.1, 0.05, 0.05, 0.05)), legus_row(10, mags=(21, 21.5, 22, 44.444, 21.8)),
            legus_row(11, mags=(21, 21.5, 22, 0.0, 21.8)), legus_row(12, mags=(21, 21.5, 22, -21.0, 21.8))]
    obs, est, rep = catalogs.read_legus(legus_file(tmp_path, rows), 10.0)
    assert obs["id"].tolist() == [1, 8, 9]
    d = rep["dropped"]
    assert d["not in the field of view in a band (66.666)"] == 1
    assert d["not detected in a band (99.999)"] == 1
    assert d["invalid magnitude in a band (NaN, <= 0, > 40, 44.444 or other sentinel)"] == 5   # 0 and -21: impossible
    assert d["invalid magnitude error in a band (NaN, < 0 or sentinel)"] == 1
    assert d["class not 1 or 2"] == 1
    # 0.2 mag -> 18.4 % flux error -> UV flag? no (< 40 %); rel_err flag? no
    assert obs["flags"].tolist() == [0, 0, 0]
    np.testing.assert_allclose(obs["rel_err"][2, 0], np.hypot(0.4 * np.log(10) * 0.2, 0.05))
    np.testing.assert_allclose(est["log10_mass"], 4.0)
    np.testing.assert_allclose(est["age_myr_hi"], 8.0)
    # LEGUS writes max = min = 0 when it gives no 68 % range: NaN, not a zero-width range at 0
    no_range = legus_row(1).split()
    no_range[17] = no_range[18] = no_range[20] = no_range[21] = "0.0"
    _, est, _ = catalogs.read_legus(legus_file(tmp_path, [" ".join(no_range) + "\n"], name="x.tab"), 10.0)
    assert est["age_myr"][0] == 7.0 and np.isnan([est["age_myr_lo"][0], est["log10_mass_hi"][0], est["ebv_lo"][0]]).all()


@pytest.mark.parametrize("bad,match", [
    ("1 2 3\n", "line 2 has 3 columns"),
    (None, "line 2 has 32 columns"),  # a row with four bands only
    ("x" * 5 + " 1" * 35 + "\n", "line 2: non-numeric"),
])
def test_legus_malformed_rows(tmp_path, bad, match):
    if bad is None:
        parts = legus_row(2).split()
        bad = " ".join(parts[:13] + parts[15:34]) + "\n"  # drop one band (mag, err) and trailing class columns
    with pytest.raises(ValueError, match=match):
        catalogs.read_legus(legus_file(tmp_path, [legus_row(1), bad]), 10.0)


def test_legus_truncated_empty_duplicates(tmp_path):
    text = legus_row(1) + legus_row(2)
    f = legus_file(tmp_path, [text[: len(text) - 60]])
    with pytest.raises(ValueError, match="line 2 has .* columns.*truncated"):
        catalogs.read_legus(f, 10.0)
    with pytest.raises(ValueError, match="has no rows"):
        catalogs.read_legus(legus_file(tmp_path, ["\n"]), 10.0)
    with pytest.raises(ValueError, match="duplicate id"):
        catalogs.read_legus(legus_file(tmp_path, [legus_row(1), legus_row(1)]), 10.0)


def layout_rows(n=12, shift=0, cls_at=None, extra=(), seed=0):
    """LEGUS rows of the published layout (legus_row) with `shift` mosaic x, y columns inserted before RA, the
    class moved from column 34 to 1-based column `cls_at` (column 34 then '-'), and `extra` columns appended."""
    rng = np.random.default_rng(seed)
    lines, classes = [], rng.choice([1.0, 2.0, 3.0, 4.0], n)
    for i in range(n):
        parts = legus_row(i + 1, cls=classes[i], ncol=35).split()
        parts[34] = "%.3f" % (classes[i] + 0.333)                # the mean class: not a class value
        if shift:
            parts[3:3] = ["%.1f" % rng.uniform(1000, 9000), "%.1f" % rng.uniform(1000, 9000)]
        if cls_at:
            parts += ["7"] * (cls_at - len(parts) - 1) + [parts[33 + shift]]      # flags, then the class
            parts[33 + shift] = "-"
        parts += [str(v) for v in extra]
        lines.append(" ".join(parts) + "\n")
    return lines, np.flatnonzero(np.isin(classes, (1, 2))) + 1


def test_legus_layouts_are_read_right_or_refused(tmp_path):
    """The published layout, the one with two mosaic x, y columns before RA (everything after moves by two),
    the class moved right of an empty column 34, a readme that states the columns, an explicit map: each read
    with the ids its construction implies; a class column that could be either of two is refused."""
    for kw in (dict(), dict(shift=2), dict(cls_at=37), dict(shift=2, cls_at=39)):
        lines, kept = layout_rows(**kw)
        obs, _, _ = catalogs.read_legus(legus_file(tmp_path, lines), 10.0)
        assert obs["id"].tolist() == kept.tolist(), kw
        np.testing.assert_allclose(obs["ra_deg"], 10.5)
    lines, kept = layout_rows(cls_at=37)
    amb = [line.rstrip("\n") + " 1\n" for line in lines]           # a second class-like column: which one?
    with pytest.raises(ValueError, match="ambiguous"):
        catalogs.read_legus(legus_file(tmp_path, amb), 10.0)
    obs, _, _ = catalogs.read_legus(legus_file(tmp_path, amb), 10.0, columns="class=37")
    assert obs["id"].tolist() == kept.tolist()
    readme = tmp_path / "catalogue.readme"
    names = ["source id", "x", "y", "RA coordinates", "DEC coordinates"]
    for b in catalogs.BANDS:
        names += [f"final total mag in WFC3/{b}", f"final photometric error in WFC3/{b}"]
    names += ["CI", "best age in yr", "max age in yr", "min age in yr", "best mass", "max mass", "min mass",
              "best E(B-V)", "max E(B-V)", "min E(B-V)"] + ["chi2 residual"] * 5 + ["reduced chi2", "Q",
              "Number of filter", "another class scheme", "class, applying the mean", "flag",
              "Final assigned class of the source after visual inspection, applying the mode"]
    readme.write_text("Order of the columns\n" + "".join(f"{k + 1}. {n}\n" for k, n in enumerate(names)))
    obs, _, _ = catalogs.read_legus(legus_file(tmp_path, amb), 10.0, readme=readme)
    assert obs["id"].tolist() == kept.tolist()
    with pytest.raises(ValueError, match="no LEGUS layout fits"):
        catalogs.read_legus(legus_file(tmp_path, [" ".join(["3.5"] * 36) + "\n"] * 3), 10.0)
    with pytest.raises(ValueError, match="not both"):
        catalogs.read_legus(legus_file(tmp_path, amb), 10.0, readme=readme, columns="class=37")


def test_legus_maps_that_miss_the_estimates_ragged_rows_and_acs_files_are_refused(tmp_path):
    """A column map for the shifted layout that names everything but the SED-fit estimates would read them
    from the unshifted columns: refused by their values; rows of different widths, a non-integer id and an
    ACS catalogue (bands the values cannot tell apart) without a readme are refused too."""
    lines, _ = layout_rows(shift=2)
    std = catalogs.legus_standard_layout(2)
    spec = ",".join(f"{k}={v + 1}" for k, v in std.items() if k not in catalogs.LEGUS_ESTIMATES)
    with pytest.raises(ValueError, match="age .*column 17"):
        catalogs.read_legus(legus_file(tmp_path, lines), 10.0, columns=spec)
    obs, _, _ = catalogs.read_legus(legus_file(tmp_path, lines), 10.0,
                                    columns=",".join(f"{k}={v + 1}" for k, v in std.items()))
    assert len(obs["id"]) > 0
    with pytest.raises(ValueError, match="line 2 has 37 columns, the first row 36"):
        catalogs.read_legus(legus_file(tmp_path, [legus_row(1), legus_row(2, ncol=37)]), 10.0)
    row = legus_row(2).split()
    row[0] = "2.5"
    with pytest.raises(ValueError, match="row 2: the source id 2.5 is not an integer"):
        catalogs.read_legus(legus_file(tmp_path, [legus_row(1), " ".join(row) + "\n"]), 10.0)
    acs = legus_file(tmp_path, [legus_row(1)], name="hlsp_legus_hst_acs-wfc3_ngc9999_multiband_v1.tab")
    with pytest.raises(ValueError, match="ACS catalogue"):
        catalogs.read_legus(acs, 10.0)


@HYP
@given(st.lists(st.tuples(st.lists(st.sampled_from([18.0, 21.3, 24.9, 66.666, 99.999, -9999.0]), min_size=5, max_size=5),
                          st.sampled_from([0.0, 1.0, 2.0, 3.0, 4.0])), min_size=1, max_size=12))
def test_legus_property_kept_equals_valid_rows(tmp_path_factory, rows):
    """For any mix of magnitudes/sentinels/classes: every row is either kept or counted under one reason."""
    tmp = tmp_path_factory.mktemp("leg")
    lines = [legus_row(i + 1, mags=m, cls=c) for i, (m, c) in enumerate(rows)]
    valid = [c in (1.0, 2.0) and all(x in (18.0, 21.3, 24.9) for x in m) for m, c in rows]
    f = legus_file(tmp, lines)
    if not any(valid):
        with pytest.raises(ValueError, match="no cluster passes"):
            catalogs.read_legus(f, 10.0)
        return
    obs, est, rep = catalogs.read_legus(f, 10.0)
    assert obs["id"].tolist() == [i + 1 for i, v in enumerate(valid) if v]
    assert rep["rows"] == len(rows) == rep["kept"] + sum(rep["dropped"].values())
    assert np.all(np.isfinite(obs["x"])) and np.all(obs["flux_mjy"] > 0)


def test_distance_table_lookup(shared_data, tmp_path):
    table = shared_data / "legus" / LEGUS_DIST
    assert catalogs.resolve_distance(table, "hlsp_legus_hst_wfc3_ngc7793-e_multiband_v1_x.tab") == 3.44
    assert catalogs.resolve_distance(table, "hlsp_legus_hst_wfc3_eso486-g021_multiband_v2_x.tab") == 9.5
    assert catalogs.resolve_distance(table, "hlsp_phangs-cat_hst_uvis_ngc1433_multi_v1_obs.fits") == 8.3
    with pytest.raises(ValueError, match="'NGC9999'.*not in distance table"):
        catalogs.resolve_distance(table, "hlsp_legus_hst_wfc3_ngc9999_multiband_v1_x.tab")
    assert catalogs.resolve_distance("7.5", "any.fits") == 7.5


# ---------------------------------------------------------------------------------------------- any table

def mapping():
    return ",".join([f"flux_{b}=f_{b},err_{b}=e_{b}" for b in BANDS] + ["id=name", "ra=ra", "dec=dec"])


def simple_table(n=5, seed=1):
    rng = np.random.default_rng(seed)
    t = Table()
    t["name"] = [f"c{i}" for i in range(n)]
    t["ra"], t["dec"] = rng.random(n), rng.random(n)
    for b in BANDS:
        t[f"f_{b}"] = 10 ** rng.uniform(-3, 0, n)
        t[f"e_{b}"] = 0.2 * t[f"f_{b}"]
    return t


@pytest.mark.parametrize("suffix", [".csv", ".ecsv", ".fits"])
def test_read_table_formats(tmp_path, suffix):
    t = simple_table()
    t.write(tmp_path / f"t{suffix}")
    obs, est, rep = catalogs.read_table(tmp_path / f"t{suffix}", mapping(), 5.0)
    assert obs["id"].tolist() == list(t["name"])
    np.testing.assert_allclose(obs["rel_err"], np.hypot(0.2, 0.05))
    assert np.all(np.isnan(est["age_myr"]))


def test_read_table_units_distance_column_and_estimates(tmp_path):
    import astropy.units as u
    t = simple_table()
    t["f_F275W"].unit = u.Jy
    t["dist"] = [2.0, 3.0, 4.0, 5.0, 40.0]
    t["mass"] = [1e4] * 5
    t.write(tmp_path / "t.ecsv")
    obs, est, rep = catalogs.read_table(tmp_path / "t.ecsv", mapping() + ",distance=dist,mass=mass", None)
    np.testing.assert_allclose(obs["flux_mjy"][:, 0], 1e3 * np.asarray(t["f_F275W"]))
    np.testing.assert_allclose(obs["distance_mpc"], t["dist"])
    assert obs["flags"].tolist() == [0, 0, 0, 0, 2]  # 40 Mpc is outside 1-30 Mpc
    np.testing.assert_allclose(est["log10_mass"], 4.0)


def test_read_table_bad_mappings(tmp_path):
    simple_table().write(tmp_path / "t.ecsv")
    short = ",".join(f"flux_{b}=f_{b},err_{b}=e_{b}" for b in BANDS[:4])
    with pytest.raises(ValueError, match=r"missing \['flux_F814W', 'err_F814W'\]"):
        catalogs.read_table(tmp_path / "t.ecsv", short, 5.0)
    with pytest.raises(ValueError, match="unknown key"):
        catalogs.read_table(tmp_path / "t.ecsv", mapping() + ",flux_F606W=x", 5.0)
    with pytest.raises(ValueError, match="not KEY=COLUMN"):
        catalogs.read_table(tmp_path / "t.ecsv", mapping() + ",oops", 5.0)
    with pytest.raises(ValueError, match="t.ecsv: missing column 'nothere'"):
        catalogs.read_table(tmp_path / "t.ecsv", mapping().replace("f_F336W", "nothere"), 5.0)
    with pytest.raises(ValueError, match="no distance"):
        catalogs.read_table(tmp_path / "t.ecsv", mapping(), None)


def test_read_table_truncated_csv_and_duplicates(tmp_path):
    t = simple_table()
    t.write(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    write(tmp_path / "trunc.csv", "\n".join(lines[:-1] + [lines[-1][:10]]) + "\n")
    obs, _, rep = catalogs.read_table(tmp_path / "trunc.csv", mapping(), 5.0)  # the cut row is counted, not lost
    assert rep["dropped"]["empty flux or error cell (masked value; truncated row?)"] == 1 and rep["kept"] == 4
    t["name"][2] = "c0"
    t.write(tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="dup.csv: 1 duplicate id.*c0 at rows \\[0, 2\\]"):
        catalogs.read_table(tmp_path / "dup.csv", mapping(), 5.0)
    write(tmp_path / "empty.csv", lines[0] + "\n")
    with pytest.raises(ValueError, match="empty.csv"):
        catalogs.read_table(tmp_path / "empty.csv", mapping(), 5.0)


@HYP
@given(st.lists(st.lists(st.one_of(st.floats(1e-6, 1e3), st.sampled_from([0.0, -1.0, -9999.0, float("nan")])),
                         min_size=5, max_size=5), min_size=1, max_size=10),
       st.floats(0.0, 1.0))
def test_read_table_property(tmp_path_factory, fluxes, rel):
    """Kept rows are exactly those with valid fluxes; rel_err follows Eq. 10 for every kept row."""
    tmp = tmp_path_factory.mktemp("tab")
    f = np.array(fluxes, float)
    t = Table()
    t["name"] = np.arange(len(f))
    t["ra"] = t["dec"] = np.zeros(len(f))
    for j, b in enumerate(BANDS):
        t[f"f_{b}"] = f[:, j]
        t[f"e_{b}"] = np.abs(f[:, j]) * rel
    t.write(tmp / "t.ecsv")
    valid = np.all(np.isfinite(f) & (f > 0), axis=1)
    if not valid.any():
        with pytest.raises(ValueError, match="no cluster passes"):
            catalogs.read_table(tmp / "t.ecsv", mapping(), 5.0)
        return
    obs, est, rep = catalogs.read_table(tmp / "t.ecsv", mapping(), 5.0)
    assert obs["id"].tolist() == np.flatnonzero(valid).tolist()
    np.testing.assert_allclose(obs["rel_err"], np.hypot(rel, 0.05))
    assert rep["rows"] == rep["kept"] + sum(rep["dropped"].values())


@HYP
@given(st.lists(st.tuples(st.sampled_from(["ok", "nan", "zero", "neg", "sentinel", "err_nan", "err_neg"]),
                          st.integers(0, 4), st.sampled_from([1, 2, 3, 4]), st.integers(0, 1), st.integers(0, 1)),
                min_size=1, max_size=10))
def test_read_phangs_property(tmp_path_factory, rows):
    """Any mix of bad values, classes and flags: kept rows are exactly the valid ones; the rest are counted."""
    tmp = tmp_path_factory.mktemp("ph")
    t = phangs_table(n=len(rows))
    value = {"nan": np.nan, "zero": 0.0, "neg": -0.5, "sentinel": -9999.0}
    valid = []
    for i, (kind, band, cls, nocov, nodet) in enumerate(rows):
        b = BANDS[band]
        if kind in value:
            t[f"PHANGS_{b}_mJy_TOT"][i] = value[kind]
        elif kind == "err_nan":
            t[f"PHANGS_{b}_mJy_TOT_ERR"][i] = np.nan
        elif kind == "err_neg":
            t[f"PHANGS_{b}_mJy_TOT_ERR"][i] = -1.0
        t["PHANGS_CLUSTER_CLASS_HUMAN"][i] = cls
        t["PHANGS_NO_COVERAGE_FLAG"][i] = nocov
        t["PHANGS_NON_DETECTION_FLAG"][i] = nodet
        valid.append(kind == "ok" and cls in (1, 2) and nocov == 0 and nodet == 0)
    t.write(tmp / "p.fits")
    if not any(valid):
        with pytest.raises(ValueError, match="no cluster passes"):
            catalogs.read_phangs(tmp / "p.fits", 10.0)
        return
    obs, est, rep = catalogs.read_phangs(tmp / "p.fits", 10.0)
    assert obs["id"].tolist() == [i + 1 for i, v in enumerate(valid) if v]
    assert rep["rows"] == len(rows) == rep["kept"] + sum(rep["dropped"].values())
    assert np.all(np.isfinite(obs["x"]))


def test_read_many_concatenates_fields(tmp_path):
    for name, n in (("hlsp_phangs-cat_hst_uvis_ngc1433_multi_v1_x.fits", 4), ("hlsp_phangs-cat_hst_uvis_ngc628_multi_v1_x.fits", 3)):
        phangs_table(n=n).write(tmp_path / name)
    paths = sorted(tmp_path.glob("*.fits"))
    obs, est, reports = catalogs.read_many(paths, "phangs", 9.0)
    assert obs["field"].tolist() == ["ngc1433"] * 4 + ["ngc628"] * 3
    assert len(obs["x"]) == len(est["age_myr"]) == 7 and [r["kept"] for r in reports] == [4, 3]


@pytest.mark.parametrize("release", ["dr4", "dr5"])
def test_phangs_releases_and_classes(tmp_path, release):
    """Synthetic catalogues in the columns of DR4 and of DR5: read with their ids and their own estimates (the
    truth here), human or machine classes on request; counts per reason add up."""
    path = tmp_path / f"hlsp_phangs-cat_hst_uvis_ngc9999_multi_v1_{release}.fits"
    syn = catalogs.make_synthetic_phangs(path, 200, seed=4, release=release)
    id_col = "ID_PHANGS_CLUSTER" if release == "dr5" else "ID_PHANGS_CLUSTERS_v1p2"
    for classes, col in (("human", "PHANGS_CLUSTER_CLASS_HUMAN"), ("machine", "PHANGS_CLUSTER_CLASS_ML_VGG")):
        obs, est, rep = catalogs.read_phangs(path, 10.0, classes=classes)
        ok = np.isin(syn[col], (1, 2)) & (syn["PHANGS_NO_COVERAGE_FLAG"] == 0) & (syn["PHANGS_NON_DETECTION_FLAG"] == 0)
        assert obs["id"].tolist() == list(syn[id_col][ok]) and rep["release"] == release
        assert rep["rows"] == rep["kept"] + sum(rep["dropped"].values())
        np.testing.assert_allclose(est["age_myr"], syn[ok][next(c for c in syn.colnames if c.endswith("AGE")
                                                               or c == "PHANGS_AGE_MINCHISQ")])
    human = catalogs.read_phangs(path, 10.0)[0]["id"]
    assert set(human) != set(obs["id"])                       # the two classifications differ


def test_phangs_style_result_columns():
    t = Table({"log10_age_myr_map": [1.0], "log10_age_myr_q16": [0.5], "log10_age_myr_q84": [2.0],
               "log10_mstar_map": [4.0], "log10_mstar_q16": [3.9], "log10_mstar_q84": [4.2],
               "ebv_map": [0.1], "ebv_q16": [0.05], "ebv_q84": [0.2]})
    catalogs.add_phangs_names(t)
    np.testing.assert_allclose([t["CINN_AGE"][0], t["CINN_AGE_LIMHI"][0], t["CINN_MASS_LIMLO"][0], t["CINN_EBV"][0]],
                               [10.0, 100.0, 10 ** 3.9, 0.1])
