"""Real star-cluster catalogues in, result catalogues out (Walter et al. 2026, Sect. 2.3 and 3.2).

Three readers turn published photometry into the observation dict of SPEC.md Sect. 4 (via
preprocess.prepare_real, which adds the 5 % systematic of Eq. 10):

    read_phangs(path, distance_mpc)         PHANGS-HST cluster catalogues as released at MAST (FITS, mJy)
    read_legus(path, distance_mpc)          LEGUS deterministic catalogues (whitespace text, Vega magnitudes)
    read_table(path, columns, distance_mpc) any astropy-readable table (FITS, ECSV, CSV) + a column mapping

Each returns (obs, estimates, report):
    obs        dict from preprocess.prepare_real plus `ra_deg`, `dec_deg`, `flags` (bit mask, see FLAG_BITS)
    estimates  the catalogue's own SED-fit results for the kept rows, NaN where absent:
               age_myr, log10_mass, ebv, each with _lo and _hi (1 sigma / 68 % range), `mass_kind`
    report     rows read, kept, dropped per reason, flagged per flag (printed by format_report)

Selection as in the paper: visual classes 1 and 2, a valid flux (finite, > 0, no sentinel) and a valid error
in all five bands. Rows outside the training domain are kept and flagged, never dropped:
    rel_err      relative error above 0.5 in some band after the 5 % systematic (prior of r: U[0, 0.5])
    distance     distance outside 1-30 Mpc (training range)
    uv_err       catalogue relative flux error above 40 % in F275W or F336W (paper Sect. 3.2.4)

`python evaluate.py catalog ...` runs a trained cINN on a catalogue and writes the result table
(evaluate.catalog_results, result_table here). `python catalogs.py read ...` only reads and reports (optionally writing
the observation .npz); `python catalogs.py synthetic ...` writes a synthetic PHANGS-format catalogue. make_synthetic_phangs writes a PHANGS-format FITS file from the
forward model, for tests and for pipeline.py.
"""
import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import Table

import checks
import preprocess
from simulate import (BANDS, DISTANCE_RANGE_MPC, R_MAX, SYS_ERR, age_bin, mstar_fraction, model_flux, sample_prior,
                      save_npz)

UV_REL_ERR_MAX = 0.4  # paper Sect. 3.2.4: UV bands with larger errors are outside what the cINN saw
FLAG_BITS = {"rel_err": 1, "distance": 2, "uv_err": 4, "flux_range": 8}
AB_ZERO_POINT_MJY = 3.631e6  # AB magnitude 0 in mJy: f = 3.631e6 * 10**(-0.4 m_AB)

# WFC3/UVIS Vega -> AB offsets zpAB - zpVEGA (mag), from the STScI WFC3/UVIS photometric zero points
# (PHOTFNU/PHOTPLAM header keywords; https://www.stsci.edu/hst/instrumentation/wfc3/data-analysis/
# photometric-calibration/uvis-photometric-calibration), as tabulated for 2013 UVIS observations:
# F275W 24.1314-22.6405, F336W 24.6648-23.5265, F438W 24.8127-24.9940, F555W 25.7839-25.8325,
# F814W 25.1072-24.6980. tests/test_catalogs.py checks them against the shared zero-point file.
WFC3_UVIS_VEGA_TO_AB = {"F275W": 1.4909, "F336W": 1.1383, "F438W": -0.1813, "F555W": -0.0486,
                        "F814W": 0.4092}

LEGUS_NOT_IN_FOV = 66.666  # LEGUS magnitude sentinel: source outside the frame
LEGUS_NOT_DETECTED = 99.999  # LEGUS magnitude sentinel: not detected
# (44.444, aperture correction undefined, appears only in the CI-based catalogues: caught as an invalid magnitude)
FLUX_SENTINELS = (-9999.0, -999.0, -99.0)  # common "missing" values in flux tables
LEGUS_MIN_COLUMNS = 34  # id ... visual class (mode); published files have 35-37

PHANGS_COLUMNS = {"ra": "PHANGS_RA", "dec": "PHANGS_DEC", "no_coverage": "PHANGS_NO_COVERAGE_FLAG",
                  "non_detection": "PHANGS_NON_DETECTION_FLAG"}
PHANGS_IDS = ("ID_PHANGS_CLUSTER", "ID_PHANGS_CLUSTERS_v1p2", "ID_PHANGS_CLUSTERS")    # DR5, DR4, earlier
PHANGS_CLASSES = {"human": "PHANGS_CLUSTER_CLASS_HUMAN", "machine": "PHANGS_CLUSTER_CLASS_ML_VGG"}
# the catalogue's own CIGALE fits: DR5 (Thilker et al. 2025) with 1 sigma limits, or DR4 and earlier with errors
PHANGS_ESTIMATES = {"dr5": ("PHANGS_DR5_THILKER25_{q}", "_LIMLO", "_LIMHI"),
                    "dr4": ("PHANGS_{q}_MINCHISQ", "_ERR", None)}


# ----------------------------------------------------------------------------------------------------------
# transforms

def vega_to_mjy(mag_vega, band):
    """WFC3/UVIS Vega magnitude -> flux in mJy: m_AB = m_Vega + (zpAB - zpVEGA); f = 3.631e6 10^(-0.4 m_AB)."""
    return AB_ZERO_POINT_MJY * 10.0 ** (-0.4 * (np.asarray(mag_vega, float) + WFC3_UVIS_VEGA_TO_AB[band]))


def mag_err_to_rel_err(mag_err):
    """Magnitude error -> relative flux error sigma_f / f = 0.4 ln(10) sigma_m (first-order propagation)."""
    return 0.4 * np.log(10.0) * np.asarray(mag_err, float)


def domain_flags(rel_err_total, cat_rel_err, distance_mpc, flux_mjy=None):
    """Bit mask per row (FLAG_BITS) of what lies outside the training domain; nothing is dropped here.

    rel_err_total: (N, 5) relative errors after the 5 % systematic (Eq. 10); cat_rel_err: (N, 5) the
    catalogue's own relative errors (without the systematic), used for the 40 % UV criterion; flux_mjy (N, 5):
    a flux more than ten times outside what any cluster of the prior has at 1-30 Mpc (checks.flux_outside_model).
    """
    flags = np.zeros(len(distance_mpc), dtype=np.int64)
    if flux_mjy is not None:
        flags |= np.where(checks.flux_outside_model(flux_mjy), FLAG_BITS["flux_range"], 0)
    flags |= np.where(np.any(rel_err_total > R_MAX, axis=1), FLAG_BITS["rel_err"], 0)
    d = np.asarray(distance_mpc, float)
    flags |= np.where((d < DISTANCE_RANGE_MPC[0]) | (d > DISTANCE_RANGE_MPC[1]), FLAG_BITS["distance"], 0)
    flags |= np.where(np.any(cat_rel_err[:, :2] > UV_REL_ERR_MAX, axis=1), FLAG_BITS["uv_err"], 0)
    return flags


def flag_names(flags):
    """Bit mask -> comma-separated flag names ('' when none), one string per row."""
    return np.array([",".join(k for k, b in FLAG_BITS.items() if f & b) for f in np.asarray(flags)], dtype=str)


# ----------------------------------------------------------------------------------------------------------
# distances

def galaxy_from_filename(path):
    """Galaxy/field name from a MAST HLSP file name: hlsp_legus_hst_wfc3_ngc7793-e_... -> 'ngc7793-e'."""
    name = Path(path).name.lower()
    m = re.match(r"hlsp_(?:legus|phangs-cat)_hst_[a-z0-9-]+_([a-z0-9-]+?)_", name)
    return m.group(1) if m else Path(path).stem.lower()


def read_distance_table(path):
    """Galaxy -> distance (Mpc) from a table with columns `name` and `distance_mpc`.

    Accepts the Calzetti et al. (2015) Table 1 file (ascii.commented_header, header_start=3) or any
    astropy-readable table with those two columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: distance table not found")
    tab = None
    for kw in ({"format": "ascii.commented_header", "header_start": 3}, {}):
        try:
            t = Table.read(path, **kw)
        except Exception:
            continue
        if "name" in t.colnames and "distance_mpc" in t.colnames:
            tab = t
            break
    if tab is None:
        raise ValueError(f"{path}: cannot read a distance table with columns 'name' and 'distance_mpc'")
    return {str(n).strip().upper(): float(d) for n, d in zip(tab["name"], tab["distance_mpc"])}


def resolve_distance(distance, path):
    """Distance in Mpc for catalogue `path`: a number, a string number, or a distance table file.

    With a table, the galaxy is taken from the catalogue file name; a field suffix such as '-e' or '-n'
    (ngc7793-e, ngc4395-n) is dropped when the full name is not in the table.
    """
    if distance is None:
        raise ValueError(f"{path}: no distance given (--distance MPC or --distance TABLE)")
    if isinstance(distance, (int, float, np.floating, np.integer)):
        d = float(distance)
    else:
        try:
            d = float(distance)
        except (TypeError, ValueError):
            table = read_distance_table(distance)
            gal = galaxy_from_filename(path).upper()
            candidates = [gal, gal.rsplit("-", 1)[0]] if "-" in gal else [gal]
            for name in candidates:
                if name in table:
                    d = table[name]
                    break
            else:
                raise ValueError(f"{path}: galaxy {gal!r} (from the file name) not in distance table {distance}")
    if not np.isfinite(d) or d <= 0:
        raise ValueError(f"{path}: distance must be a positive number of Mpc, got {distance!r}")
    return d


# ----------------------------------------------------------------------------------------------------------
# selection shared by the readers

def _invalid_flux(flux):
    """Rows x bands that are not a usable flux: NaN/inf, <= 0, or a missing-value sentinel."""
    flux = np.asarray(flux, float)
    bad = ~np.isfinite(flux) | (flux <= 0)
    for s in FLUX_SENTINELS:
        bad |= flux == s
    return bad


def _invalid_err(err):
    """Rows x bands that are not a usable flux error: NaN/inf, negative, or a sentinel."""
    err = np.asarray(err, float)
    bad = ~np.isfinite(err) | (err < 0)
    for s in FLUX_SENTINELS:
        bad |= err == s
    return bad


def _first_reason(path, reasons):
    """Combine ordered (name, bool mask) pairs: each dropped row counts for its first reason only."""
    n = len(reasons[0][1])
    dropped = np.zeros(n, bool)
    counts = {}
    for name, mask in reasons:
        new = mask & ~dropped
        counts[name] = int(new.sum())
        dropped |= new
    return ~dropped, counts


def _check_ids(path, ids):
    """Duplicate ids make the result table ambiguous: ValueError naming the ids and their rows."""
    ids = np.asarray(ids)
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1]
        rows = [np.flatnonzero(ids == d)[:4].tolist() for d in dup[:5]]
        detail = "; ".join(f"id {d} at rows {r}" for d, r in zip(dup[:5], rows))
        raise ValueError(f"{path}: {len(dup)} duplicate id(s): {detail} (rows counted from 0)")


def _finish(path, fmt, ids, ra, dec, flux, err, distance, reasons, estimates, mass_kind, sys_err=SYS_ERR):
    """Apply the selection, call preprocess.prepare_real (Eq. 10), add flags and build the report."""
    n = len(ids)
    _check_sky(path, ra, dec)
    keep, dropped = _first_reason(path, reasons)
    flux, err = np.asarray(flux, float)[keep], np.asarray(err, float)[keep]
    dist = np.broadcast_to(np.asarray(distance, float), (n,))[keep]
    report = {"file": str(path), "format": fmt, "rows": n, "kept": int(keep.sum()), "dropped": dropped,
              "flagged": {k: 0 for k in FLAG_BITS}}
    if keep.sum() == 0:
        raise ValueError(f"{path}: no cluster passes the selection\n" + format_report(report))
    obs = preprocess.prepare_real(flux, err, dist, sys_err=sys_err, ids=np.asarray(ids)[keep])
    flags = domain_flags(np.asarray(obs["rel_err"]), err / flux, dist, flux)
    obs["ra_deg"] = np.asarray(ra, float)[keep]
    obs["dec_deg"] = np.asarray(dec, float)[keep]
    obs["flags"] = flags
    report["flagged"] = {k: int(np.count_nonzero(flags & b)) for k, b in FLAG_BITS.items()}
    est = {k: np.asarray(v, float)[keep] for k, v in estimates.items()}
    est["mass_kind"] = mass_kind
    print(format_report(report), file=sys.stderr)
    return obs, est, report


def _check_sky(path, ra, dec):
    """RA in [0, 360) and Dec in [-90, 90] degrees where given: anything else is a wrong column, refused."""
    with np.errstate(invalid="ignore"):
        for name, v, lo, hi in (("RA", ra, 0.0, 360.0), ("Dec", dec, -90.0, 90.0)):
            v = np.asarray(v, float)
            bad = np.isfinite(v) & ((v < lo) | (v > hi) | ((v == hi) & (name == "RA")))
            if bad.any():
                raise ValueError(f"{path}: {name} outside [{lo:g}, {hi:g}] degrees at rows "
                                 f"{np.flatnonzero(bad)[:5].tolist()} (e.g. {v[bad][0]:g}): a wrong column?")


def format_report(report):
    """One readable block: rows read, kept, dropped per reason, flagged per flag."""
    lines = [f"{report['file']}: {report['rows']} rows, kept {report['kept']}"]
    for k, v in report["dropped"].items():
        lines.append(f"  dropped {v:6d}  {k}")
    for k, v in report["flagged"].items():
        lines.append(f"  flagged {v:6d}  {k} (kept)")
    return "\n".join(lines)


def _log10_positive(value):
    """log10 where value > 0, NaN elsewhere (missing or unfitted)."""
    value = np.asarray(value, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(value > 0, np.log10(np.where(value > 0, value, 1.0)), np.nan)


def _log10_range(value, err):
    """Linear value +- err -> (log10 lo, log10 hi); lo = -inf when value - err <= 0, NaN where unknown."""
    low = np.asarray(value, float) - np.asarray(err, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.log10(np.where(np.isnan(low), np.nan, np.where(low > 0, low, 0.0)))
        hi = np.log10(value + err)
    return lo, hi


# ----------------------------------------------------------------------------------------------------------
# PHANGS

def _read_fits_or_table(path, **kw):
    """astropy Table.read with a ValueError naming the file for missing, empty or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    text = {".txt": "ascii", ".dat": "ascii", ".tsv": "ascii.tab"}.get(path.suffix.lower())
    if text and "format" not in kw:
        kw["format"] = text
    try:
        tab = Table.read(path, **kw)
    except Exception as exc:  # astropy raises OSError, TypeError, ... for truncated/corrupt files
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot read as a table ({type(exc).__name__}: {first})") from None
    if len(tab) == 0:
        raise ValueError(f"{path}: the table has no rows")
    return tab


def _column(tab, path, name, fill=np.nan):
    """Column as a float array (masked entries -> NaN); ValueError naming file and column when missing."""
    if name not in tab.colnames:
        raise ValueError(f"{path}: missing column {name!r}")
    col = tab[name]
    try:
        data = np.ma.filled(np.ma.asarray(col, dtype=float), fill)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: column {name!r} is not numeric") from None
    return np.asarray(data, float)


def read_phangs(path, distance_mpc, classes="human"):
    """PHANGS-HST cluster catalogue (MAST FITS, DR4 or DR5 columns) -> (obs, estimates, report).

    Fluxes PHANGS_<band>_mJy_TOT and _ERR in mJy; the id from ID_PHANGS_CLUSTER (DR5) or ID_PHANGS_CLUSTERS_v1p2
    (DR4). Kept: classes 1-2 of the human classification (classes="human", PHANGS_CLUSTER_CLASS_HUMAN) or of the
    machine one ("machine", PHANGS_CLUSTER_CLASS_ML_VGG); dropped, counted: no coverage or non-detection flag,
    invalid flux or error in any band. Estimates (current stellar mass): DR5's PHANGS_DR5_THILKER25_{AGE,MASS,EBV}
    with their _LIMLO / _LIMHI 1 sigma limits, or DR4's PHANGS_{AGE,MASS,EBV}_MINCHISQ with _ERR.
    """
    tab = _read_fits_or_table(path)
    c = PHANGS_COLUMNS
    id_col = next((name for name in PHANGS_IDS if name in tab.colnames), None)
    if id_col is None:
        raise ValueError(f"{path}: no cluster id column (one of {list(PHANGS_IDS)})")
    ids = _column(tab, path, id_col)
    if np.any(~np.isfinite(ids)):
        raise ValueError(f"{path}: column {id_col!r} has missing values at rows "
                         f"{np.flatnonzero(~np.isfinite(ids))[:5].tolist()}")
    ids = ids.astype(np.int64)
    _check_ids(path, ids)
    if classes not in PHANGS_CLASSES:
        raise ValueError(f"--classes must be one of {list(PHANGS_CLASSES)}, got {classes!r}")
    flux = np.stack([_column(tab, path, f"PHANGS_{b}_mJy_TOT") for b in BANDS], axis=1)
    err = np.stack([_column(tab, path, f"PHANGS_{b}_mJy_TOT_ERR") for b in BANDS], axis=1)
    cls = _column(tab, path, PHANGS_CLASSES[classes])
    distance = resolve_distance(distance_mpc, path)
    reasons = [("class not 1 or 2" + (" (machine)" if classes == "machine" else ""), ~np.isin(cls, (1, 2))),
               ("no coverage in a band (PHANGS_NO_COVERAGE_FLAG)", _column(tab, path, c["no_coverage"], fill=0) != 0),
               ("not detected in a band (PHANGS_NON_DETECTION_FLAG)",
                _column(tab, path, c["non_detection"], fill=0) != 0),
               ("invalid flux in a band (NaN, <= 0 or sentinel)", _invalid_flux(flux).any(axis=1)),
               ("invalid flux error in a band (NaN, < 0 or sentinel)", _invalid_err(err).any(axis=1))]
    est, release = _phangs_estimates(tab)
    obs, est, report = _finish(path, "phangs", ids, _column(tab, path, c["ra"]), _column(tab, path, c["dec"]), flux,
                               err, distance, reasons, est, mass_kind="current")
    report["release"] = release
    return obs, est, report


def _phangs_estimates(tab):
    """The catalogue's own fits of either release (PHANGS_ESTIMATES), as the estimates dict, and the release."""
    for release, (name, lo, hi) in PHANGS_ESTIMATES.items():
        if name.format(q="AGE") in tab.colnames:
            break
    else:
        release = "none"
    est = {}
    for key, q in (("age_myr", "AGE"), ("log10_mass", "MASS"), ("ebv", "EBV")):
        v = _optional(tab, name.format(q=q)) if release != "none" else np.full(len(tab), np.nan)
        if release == "dr5":                                    # absolute 1 sigma limits
            a, b = _optional(tab, name.format(q=q) + lo), _optional(tab, name.format(q=q) + hi)
        else:                                                   # value -+ error
            e = _optional(tab, name.format(q=q) + lo) if release == "dr4" else np.full(len(tab), np.nan)
            a, b = v - e, v + e
        if key == "log10_mass":
            with np.errstate(divide="ignore", invalid="ignore"):
                est[key] = _log10_positive(v)
                est[key + "_lo"] = np.log10(np.where(np.isnan(a), np.nan, np.where(a > 0, a, 0.0)))
                est[key + "_hi"] = _log10_positive(b)
        else:
            est[key], est[key + "_lo"], est[key + "_hi"] = v, a, b
    return est, release


def _estimates(values_errors):
    """Catalogue estimates {key: (value, 1-sigma error)} -> est dict with key, key_lo, key_hi. Mass comes in
    Msun with its error and is returned as log10 (range from value -+ error); age (Myr) and E(B-V) stay linear."""
    est = {}
    for key, (v, e) in values_errors.items():
        if key == "log10_mass":
            est[key] = _log10_positive(v)
            est[key + "_lo"], est[key + "_hi"] = _log10_range(v, e)
        else:
            est[key], est[key + "_lo"], est[key + "_hi"] = v, v - e, v + e
    return est


def _optional(tab, name):
    """Column as float with masked cells and sentinels as NaN, or all-NaN when the catalogue lacks it
    (the catalogue's own estimates are optional)."""
    if name not in tab.colnames:
        return np.full(len(tab), np.nan)
    v = np.asarray(np.ma.filled(np.ma.asarray(tab[name], dtype=float), np.nan), float)
    return np.where(np.isin(v, FLUX_SENTINELS), np.nan, v)


def make_synthetic_phangs(path, n, seed, distance_mpc=10.0, class_probs=(0.45, 0.35, 0.2), release="dr4"):
    """Write a PHANGS-format FITS catalogue of n clusters simulated with the forward model, in the columns of
    release "dr4" (ID_PHANGS_CLUSTERS_v1p2, PHANGS_*_MINCHISQ with _ERR) or "dr5" (ID_PHANGS_CLUSTER,
    PHANGS_DR5_THILKER25_* with _LIMLO, _LIMHI), both with human and machine classes.

    Parameters from sample_prior, photometry from model_flux at `distance_mpc`, noise from
    preprocess.add_noise (SPEC.md Sect. 3). Classes 1/2/3 drawn with `class_probs`; about 2 % of rows get a
    no-coverage flag and 2 % a non-detection flag with a NaN flux, so the selection has work to do.
    The estimate columns hold the TRUE parameters (age Myr, current stellar mass, E(B-V)) without errors (NaN):
    on this synthetic catalogue "the catalogue's own estimate" is the truth, so the Table 1 share "truth inside
    the cINN 16-84 % interval" is a coverage check (68 % when calibrated and the reader's errors equal the noise
    drawn; read_phangs adds SYS_ERR in quadrature, so expect a little more). The machine class agrees with the human
    one for 90 % of the clusters.
    Returns the table (astropy Table) and writes it atomically.
    """
    rng = np.random.default_rng(seed)
    prior = sample_prior(n, rng)
    age, logm, ebv = prior["age_myr"], prior["log10_mass"], prior["ebv"]
    flux_true = model_flux(age, ebv, logm, distance_mpc)
    flux, rel_err = preprocess.add_noise(flux_true, rng)
    err = rel_err * flux
    cls = rng.choice([1, 2, 3], size=n, p=np.asarray(class_probs) / np.sum(class_probs))
    no_cov = (rng.random(n) < 0.02).astype(np.int16)
    non_det = (rng.random(n) < 0.02).astype(np.int16)
    flux[non_det == 1, 0] = np.nan
    err[non_det == 1, 0] = np.nan
    ra0, dec0 = 150.0, 2.0
    ml = np.where(rng.random(n) < 0.9, cls, rng.choice([1, 2, 3], size=n))
    t = Table()
    t["ID_PHANGS_CLUSTER" if release == "dr5" else "ID_PHANGS_CLUSTERS_v1p2"] = np.arange(1, n + 1, dtype=np.int64)
    t["PHANGS_RA"] = ra0 + rng.normal(0, 0.01, n)
    t["PHANGS_DEC"] = dec0 + rng.normal(0, 0.01, n)
    for j, b in enumerate(BANDS):
        t[f"PHANGS_{b}_mJy_TOT"] = flux[:, j]
        t[f"PHANGS_{b}_mJy_TOT_ERR"] = err[:, j]
    t["PHANGS_CLUSTER_CLASS_HUMAN"] = cls.astype(np.int16)
    t["PHANGS_CLUSTER_CLASS_ML_VGG"] = ml.astype(np.int16)
    t["PHANGS_NO_COVERAGE_FLAG"] = no_cov
    t["PHANGS_NON_DETECTION_FLAG"] = non_det
    name, lo, hi = PHANGS_ESTIMATES[release]
    for q, v in (("AGE", age.astype(float)), ("MASS", 10.0 ** logm * mstar_fraction(age)), ("EBV", ebv)):
        t[name.format(q=q)] = v
        for suffix in (lo, hi) if hi else (lo,):
            t[name.format(q=q) + suffix] = np.full(n, np.nan)
    t["TRUE_LOG10_MASS_INITIAL"] = logm
    t.meta["COMMENT"] = [f"SYNTHETIC PHANGS-format catalogue ({release}): seed {seed}, distance {distance_mpc} Mpc",
                         "the estimate columns hold the true parameters (mass = current stellar mass)"]
    t.meta["DIST_MPC"] = float(distance_mpc)
    write_table_atomic(t, path)
    return t


# ----------------------------------------------------------------------------------------------------------
# LEGUS

LEGUS_ESTIMATES = ("age", "age_max", "age_min", "mass", "mass_max", "mass_min", "ebv", "ebv_max", "ebv_min")
LEGUS_FIELDS = ("id", "ra", "dec") + tuple(f"{q}_{b}" for b in BANDS for q in ("mag", "err")) + LEGUS_ESTIMATES \
    + ("nflt", "class")
LEGUS_NFLT = (0, 3, 4, 5, 200)     # the values of the filter-count column in the published files
LEGUS_SENTINELS = (LEGUS_NOT_IN_FOV, LEGUS_NOT_DETECTED, 44.444)
NAN_TOKENS = ("-", "--", "nan", "NaN", "NA", "null", "")
LEGUS_LAYOUT_SHARE = 0.5      # a layout fits when over half the rows have the values its columns must have
                              # (bad rows are dropped and counted later; the wrong layout fails nearly every row)


def _load_legus_text(path):
    """LEGUS .tab -> (N, ncol) float array (NaN for an empty cell such as '-'); ValueError naming the file and
    line for a binary file, ragged (truncated) or non-numeric rows."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; a LEGUS catalogue is whitespace-separated text") from None
    rows, width = [], None
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        width = width or len(parts)
        if len(parts) < LEGUS_MIN_COLUMNS:
            raise ValueError(f"{path}: line {lineno} has {len(parts)} columns, a LEGUS catalogue row needs "
                             f">= {LEGUS_MIN_COLUMNS} (id, x, y, RA, Dec, 5 bands x (mag, err), CI, ..., class); "
                             f"truncated file or wrong number of bands?")
        if len(parts) != width:
            raise ValueError(f"{path}: line {lineno} has {len(parts)} columns, the first row {width}; every row "
                             "of a LEGUS catalogue has the same columns (truncated or joined lines?)")
        try:
            rows.append([np.nan if p in NAN_TOKENS else float(p) for p in parts[:width]])
        except ValueError:
            raise ValueError(f"{path}: line {lineno}: non-numeric value") from None
    if not rows:
        raise ValueError(f"{path}: the catalogue has no rows")
    return np.array(rows)


def legus_standard_layout(shift=0):
    """The published LEGUS layout (0-based columns): id, x, y, RA, Dec, mag/err per band, CI, the nine SED-fit
    estimates, five residuals, chi^2, Q, Nflt, the class (mode); `shift` extra columns before RA (mosaic x, y)."""
    col = {"id": 0, "ra": 3 + shift, "dec": 4 + shift}
    for j, b in enumerate(BANDS):
        col[f"mag_{b}"], col[f"err_{b}"] = 5 + shift + 2 * j, 6 + shift + 2 * j
    col.update({q: 16 + shift + j for j, q in enumerate(LEGUS_ESTIMATES)})
    col.update(nflt=32 + shift, **{"class": 33 + shift})
    return col


def parse_legus_readme(path):
    """The column layout stated by the readme MAST ships with a LEGUS catalogue ("Order of the columns",
    numbered descriptions) -> {field: 0-based column}; ValueError naming what the readme does not state."""
    text = Path(path).read_text(errors="replace").splitlines()
    col = {}
    rules = [("id", r"source id"), ("ra", r"^ra\b"), ("dec", r"^dec\b"), ("nflt", r"number of filter"),
             ("class", r"class.*\bmode\b"), *[(f"{w}_{q}", f"{w} {q}") for q in ("age", "mass", "e\\(b-v\\)")
                                               for w in ("best", "max", "min")]]
    for line in text:
        m = re.match(r"\s*(\d+)\.\s+(.*)", line)
        if not m:
            continue
        k, desc = int(m.group(1)) - 1, m.group(2).strip().lower()
        band = re.search(r"(f\d{3}w)", desc)
        if band and ("total mag" in desc or "photometric error" in desc):
            col[f"{'mag' if 'total mag' in desc else 'err'}_{band.group(1).upper()}"] = k
            continue
        for name, pattern in rules:
            if re.search(pattern, desc) and name not in col:
                col[name] = k
    for w, key in (("best", ""), ("max", "_max"), ("min", "_min")):
        for q, short in (("age", "age"), ("mass", "mass"), ("e\\(b-v\\)", "ebv")):
            if f"{w}_{q}" in col:
                col[short + key] = col.pop(f"{w}_{q}")
    missing = [f for f in LEGUS_FIELDS if f not in col]
    if missing:
        raise ValueError(f"{path}: the readme states no column for {missing}; its bands must be {list(BANDS)}")
    return {f: col[f] for f in LEGUS_FIELDS}


def parse_legus_columns(spec):
    """An explicit LEGUS column map 'ra=4,dec=5,mag_F275W=6,...' (1-based, as in the readme) -> 0-based dict."""
    col = {}
    for item in (spec or "").split(","):
        if item.strip():
            key, _, value = item.partition("=")
            if key.strip() not in LEGUS_FIELDS or not value.strip().isdigit() or int(value) < 1:
                raise ValueError(f"--columns: {item!r} is not FIELD=COLUMN (1-based) with FIELD in {list(LEGUS_FIELDS)}")
            col[key.strip()] = int(value) - 1
    return {**legus_standard_layout(), **col}


def _legus_problems(a, col):
    """What the values in columns `col` of a LEGUS table contradict in more than 1 - LEGUS_LAYOUT_SHARE of its
    rows (empty: a consistent layout)."""
    if max(col.values()) >= a.shape[1]:
        return [f"needs {max(col.values()) + 1} columns, the file has {a.shape[1]}"]
    sentinel = np.isin(np.round(a, 3), LEGUS_SENTINELS + FLUX_SENTINELS) | np.isnan(a)   # missing, not contradicting
    v = lambda field: a[:, col[field]]
    rules = [("RA in [0, 360)", "ra", (v("ra") >= 0) & (v("ra") < 360)),
             ("Dec in [-90, 90]", "dec", np.abs(v("dec")) <= 90),
             ("Nflt in {0, 3, 4, 5, 200}", "nflt", np.isin(v("nflt"), LEGUS_NFLT)),
             ("a visual class in {0, 1, 2, 3, 4}", "class", np.isin(v("class"), (0, 1, 2, 3, 4)))]
    for b in BANDS:
        m, e = f"mag_{b}", f"err_{b}"
        rules += [(f"{b} magnitudes (5-40 mag or a sentinel)", m, ((v(m) > 5) & (v(m) < 40)) | sentinel[:, col[m]]),
                  (f"{b} errors (>= 0 or a sentinel)", e, (v(e) >= 0) | sentinel[:, col[e]])]
    for q in LEGUS_ESTIMATES:                  # 0 = not fitted; E(B-V) 200 is a sentinel of some fields
        ok = {"age": (v(q) == 0) | ((v(q) >= 1e5) & (v(q) <= 2e10)),
              "mas": (v(q) == 0) | ((v(q) >= 1) & (v(q) <= 1e10)),
              "ebv": ((v(q) >= 0) & (v(q) <= 3)) | (v(q) == 200)}[q[:3]]
        rules.append((f"{q.replace('_', ' ')} (age 0 or 1e5-2e10 yr, mass 0 or 1-1e10 Msun, E(B-V) 0-3)", q,
                      ok | np.isnan(v(q))))
    return [f"{name} (column {col[field] + 1})" for name, field, ok in rules if np.mean(ok) < LEGUS_LAYOUT_SHARE]


def legus_layout(path, a, readme=None, columns=None):
    """The columns of a LEGUS table `a`: from its readme, an explicit map, or detected from what the values must
    be (RA, Dec, magnitudes, Nflt, classes) among the published layouts (with or without two mosaic x, y columns
    before RA; the class in column 34 or, where that column holds no class, the one class-like column to its
    right). Refuses, naming the file and what is wrong or ambiguous, rather than read a wrong column."""
    if readme and columns:
        raise ValueError(f"{path}: give the layout once: --readme or --columns, not both")
    if "acs" in Path(path).name.lower() and not (readme or columns):    # the values cannot tell bands apart
        raise ValueError(f"{path}: an ACS catalogue may hold F435W/F555W/F606W, not the WFC3/UVIS bands "
                         f"{list(BANDS)}; give its --readme (which names the bands) or --columns")
    if readme or columns:
        col = parse_legus_readme(readme) if readme else parse_legus_columns(columns)
        problems = _legus_problems(a, col)
        if problems:
            raise ValueError(f"{path}: the values contradict the layout given ({'; '.join(problems)})")
        return col
    fits = {}
    for shift in (0, 2):
        col = legus_standard_layout(shift)
        problems = _legus_problems(a, col)
        if problems and all("visual class" in p for p in problems):      # the class further right?
            col["class"] = _class_column(path, a, col["class"])
            problems = _legus_problems(a, col)
        fits[shift] = (col, problems)
    good = [s for s, (_, p) in fits.items() if not p]
    if len(good) == 1:
        return fits[good[0]][0]
    if len(good) > 1:
        raise ValueError(f"{path}: the layout is ambiguous (RA in column 4 or 6 both fit); give --readme or --columns")
    raise ValueError(f"{path}: no LEGUS layout fits: " + "; ".join(
        f"with RA in column {4 + s}: {', '.join(p)}" for s, (_, p) in fits.items()) + "; give --readme or --columns")


def _class_column(path, a, standard):
    """The visual class where its standard column holds none: the one column to its right whose values are
    classes (0-4) in the share of rows a layout needs (LEGUS_LAYOUT_SHARE); ValueError if none or several."""
    like = [k for k in range(standard + 1, a.shape[1])
            if np.mean(np.isin(a[:, k], (0, 1, 2, 3, 4))) >= LEGUS_LAYOUT_SHARE]
    if len(like) != 1:
        raise ValueError(f"{path}: column {standard + 1} holds no visual class and "
                         + (f"columns {[k + 1 for k in like]} all could: ambiguous" if like else "no column could")
                         + "; give --readme or --columns class=N")
    return like[0]


def read_legus(path, distance_mpc, readme=None, columns=None):
    """LEGUS deterministic cluster catalogue (Adamo et al. 2017) -> (obs, estimates, report).

    The columns come from the readme (`readme`), an explicit map (`columns`, 1-based, e.g. 'class=36') or the
    values (legus_layout); in the published layout: 1 id, 4-5 RA/Dec, 6-15 Vega mag/err F275W, F336W, F438W,
    F555W, F814W (66.666 = not in the field, 99.999 = not detected), 17-25 age, mass and E(B-V) best/max/min,
    33 Nflt, 34 visual class (mode). Vega -> AB with WFC3/UVIS zero points, mJy = 3.631e6 10^(-0.4 m_AB);
    flux error = 0.4 ln10 sigma_m f. `distance_mpc`: a number or the Calzetti et al. (2015) table (galaxy from
    the file name).
    """
    a = _load_legus_text(path)
    col = legus_layout(path, a, readme, columns)
    c = {k: a[:, i] for k, i in col.items()}
    bad = ~np.isfinite(c["id"]) | (c["id"] != np.round(c["id"]))
    if bad.any():
        raise ValueError(f"{path}: row {int(np.argmax(bad)) + 1}: the source id {c['id'][bad][0]} is not an integer")
    ids = c["id"].astype(np.int64)
    _check_ids(path, ids)
    mag = np.stack([c[f"mag_{b}"] for b in BANDS], axis=1)
    merr = np.stack([c[f"err_{b}"] for b in BANDS], axis=1)
    distance = resolve_distance(distance_mpc, path)
    not_fov = np.isclose(mag, LEGUS_NOT_IN_FOV) | np.isclose(merr, LEGUS_NOT_IN_FOV)
    not_det = np.isclose(mag, LEGUS_NOT_DETECTED) | np.isclose(merr, LEGUS_NOT_DETECTED)
    bad_mag = ~np.isfinite(mag) | np.isin(mag, FLUX_SENTINELS) | (mag <= 0) | (mag > 40)    # <= 0: impossible
    bad_err = ~np.isfinite(merr) | (merr < 0) | np.isin(merr, FLUX_SENTINELS)
    with np.errstate(over="ignore", invalid="ignore"):
        flux = np.stack([vega_to_mjy(mag[:, j], b) for j, b in enumerate(BANDS)], axis=1)
        err = mag_err_to_rel_err(merr) * flux
    reasons = [("class not 1 or 2", ~np.isin(c["class"], (1, 2))),
               ("not in the field of view in a band (66.666)", not_fov.any(axis=1)),
               ("not detected in a band (99.999)", not_det.any(axis=1)),
               ("invalid magnitude in a band (NaN, <= 0, > 40, 44.444 or other sentinel)",
                bad_mag.any(axis=1) | _invalid_flux(flux).any(axis=1)),
               ("invalid magnitude error in a band (NaN, < 0 or sentinel)", bad_err.any(axis=1))]
    return _finish(path, "legus", ids, c["ra"], c["dec"], flux, err, distance, reasons, _legus_estimates(c),
                   mass_kind="legus")


def _legus_estimates(c):
    """LEGUS's own fits (age yr, mass Msun, E(B-V), best / max / min) as the estimates dict; zeros (sources it
    did not fit, Nflt < 4) and max = min = 0 (no 68 % range) become NaN."""
    fitted = c["age"] > 0
    ranged = fitted & ((c["age_max"] > 0) | (c["age_min"] > 0))
    out = {}
    for q, key, scale in (("age", "age_myr", 1e6), ("mass", "log10_mass", None), ("ebv", "ebv", 1.0)):
        for src, suffix, ok in ((q, "", fitted), (f"{q}_max", "_hi", ranged), (f"{q}_min", "_lo", ranged)):
            v = np.where(ok, c[src], np.nan)
            out[key + suffix] = _log10_positive(v) if scale is None else v / scale
    return out


# ----------------------------------------------------------------------------------------------------------
# any table + column mapping

COLUMN_KEYS = tuple(f"flux_{b}" for b in BANDS) + tuple(f"err_{b}" for b in BANDS)
COLUMN_OPTIONAL = ("id", "ra", "dec", "class", "distance", "age_myr", "age_myr_err", "mass", "mass_err",
                  "ebv", "ebv_err")


def parse_columns(spec):
    """'flux_F275W=f275,err_F275W=e275,...' (or a dict) -> dict; ValueError on malformed or unknown keys."""
    if isinstance(spec, dict):
        mapping = dict(spec)
    else:
        mapping = {}
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                raise ValueError(f"--columns: item {item!r} is not KEY=COLUMN")
            k, v = (s.strip() for s in item.split("=", 1))
            mapping[k] = v
    unknown = sorted(set(mapping) - set(COLUMN_KEYS) - set(COLUMN_OPTIONAL))
    if unknown:
        raise ValueError(f"--columns: unknown key(s) {unknown}; allowed: {list(COLUMN_KEYS + COLUMN_OPTIONAL)}")
    missing = [k for k in COLUMN_KEYS if k not in mapping]
    if missing:
        raise ValueError(f"--columns: missing {missing}; all five bands {BANDS} need flux_<band> and "
                         f"err_<band> (fluxes in mJy unless the column carries a unit)")
    return mapping


def _flux_column(tab, path, name):
    """Flux-like column in mJy: converted with astropy units when the column has a flux-density unit."""
    if name not in tab.colnames:
        raise ValueError(f"{path}: missing column {name!r}")
    col = tab[name]
    unit = getattr(col, "unit", None)
    if unit is not None and unit != u.dimensionless_unscaled:
        try:
            factor = (1.0 * unit).to(u.mJy).value
        except u.UnitConversionError:
            raise ValueError(f"{path}: column {name!r} has unit {unit}, not a flux density") from None
        return _column(tab, path, name) * factor
    return _column(tab, path, name)


def read_table(path, columns, distance_mpc=None, fmt=None):
    """Any astropy-readable table (FITS, ECSV, CSV, ...) with a column mapping -> (obs, estimates, report).

    `columns`: dict or 'key=col,...' string with flux_<band> and err_<band> for the five bands (mJy or any
    flux-density unit attached to the column), optional id, ra, dec, class (then only 1 and 2 are kept),
    distance (Mpc per row, overrides `distance_mpc`), and the catalogue's own estimates age_myr, mass
    (current stellar mass, Msun), ebv with optional *_err.
    """
    mapping = parse_columns(columns)
    tab = _read_fits_or_table(path, **({"format": fmt} if fmt else {}))
    n = len(tab)
    flux = np.stack([_flux_column(tab, path, mapping[f"flux_{b}"]) for b in BANDS], axis=1)
    err = np.stack([_flux_column(tab, path, mapping[f"err_{b}"]) for b in BANDS], axis=1)
    if "id" in mapping:
        ids = np.asarray(tab[_name(tab, path, mapping["id"])])
        if ids.dtype.kind in "USO":
            ids = np.array([(i.decode() if isinstance(i, bytes) else str(i)).strip() for i in ids])
    else:
        ids = np.arange(n)
    _check_ids(path, ids)
    ra = _column(tab, path, mapping["ra"]) if "ra" in mapping else np.full(n, np.nan)
    dec = _column(tab, path, mapping["dec"]) if "dec" in mapping else np.full(n, np.nan)
    if "distance" in mapping:
        distance = _column(tab, path, mapping["distance"])
        bad = ~np.isfinite(distance) | (distance <= 0)
        if bad.any():
            raise ValueError(f"{path}: column {mapping['distance']!r} has non-positive or missing distances at "
                             f"rows {np.flatnonzero(bad)[:5].tolist()}")
    else:
        distance = resolve_distance(distance_mpc, path)
    cls = _column(tab, path, mapping["class"]) if "class" in mapping else np.ones(n)
    empty = np.zeros(n, bool)
    for k in COLUMN_KEYS:
        empty |= np.ma.getmaskarray(tab[mapping[k]])
    reasons = [("class not 1 or 2", ~np.isin(cls, (1, 2))),
               ("empty flux or error cell (masked value; truncated row?)", empty),
               ("invalid flux in a band (NaN, <= 0 or sentinel)", _invalid_flux(flux).any(axis=1)),
               ("invalid flux error in a band (NaN, < 0 or sentinel)", _invalid_err(err).any(axis=1))]
    def mapped(src):                                   # optional estimate columns of the user's mapping
        return _column(tab, path, mapping[src]) if src in mapping else np.full(n, np.nan)
    est = _estimates({key: (mapped(src), mapped(src + "_err"))
                      for key, src in (("age_myr", "age_myr"), ("log10_mass", "mass"), ("ebv", "ebv"))})
    return _finish(path, "table", ids, ra, dec, flux, err, distance, reasons, est, mass_kind="current")


def _name(tab, path, name):
    if name not in tab.colnames:
        raise ValueError(f"{path}: missing column {name!r}")
    return name


def read_catalog(path, fmt, distance=None, columns=None, readme=None, classes="human"):
    """Dispatch on fmt: 'phangs' (classes: human or machine), 'legus' (readme and columns: its layout) or 'table'
    (columns: the mapping)."""
    if fmt == "phangs":
        return read_phangs(path, distance, classes)
    if fmt == "legus":
        return read_legus(path, distance, readme, columns)
    if fmt == "table":
        if not columns:
            raise ValueError("--format table needs --columns flux_F275W=COL,err_F275W=COL,...")
        return read_table(path, columns, distance)
    raise ValueError(f"unknown catalogue format {fmt!r}; use phangs, legus or table")


# ----------------------------------------------------------------------------------------------------------
# output

def write_table_atomic(table, path):
    """Write an astropy Table to `path` (format from the suffix) via a temporary file + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".ecsv": "ascii.ecsv", ".fits": "fits", ".csv": "ascii.csv"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: output must end in .ecsv, .fits or .csv")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        table.write(tmp, format=fmt, overwrite=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                 # mkstemp makes 0600; a table is for everyone to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------
# The result table of `evaluate.py catalog` (evaluate.catalog_results)

RESULT_PARAMS = ("log10_age_myr", "log10_mass", "log10_mstar", "ebv")
RESULT_UNITS = {"log10_age_myr": "log10(t/Myr)", "log10_mass": "log10(m0/Msun), initial mass",
                "log10_mstar": "log10(M*/Msun), current stellar mass", "ebv": "mag"}


def read_many(paths, fmt, distance=None, columns=None, readme=None, classes="human"):
    """Read several catalogues and concatenate them; adds `field` (from the file name) to obs. The same
    (field, id) twice (a file given twice, or two files of one field) is refused."""
    fields = [galaxy_from_filename(p) for p in paths]
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:
        raise ValueError(f"field(s) {twice} given by more than one --input file ({[str(p) for p in paths]}): the "
                         "result table would hold the same (field, id) twice")
    parts = [read_catalog(p, fmt, distance, columns, readme, classes) for p in paths]
    obs = {}
    for k in parts[0][0]:
        if k == "bands":
            obs[k] = parts[0][0][k]
        else:
            obs[k] = np.concatenate([np.asarray(o[k]) for o, _, _ in parts])
    obs["field"] = np.concatenate([np.full(r["kept"], galaxy_from_filename(p)) for p, (_, _, r) in zip(paths, parts)])
    est = {k: np.concatenate([e[k] for _, e, _ in parts]) for k in parts[0][1] if k != "mass_kind"}
    est["mass_kind"] = parts[0][1]["mass_kind"]
    return obs, est, [r for _, _, r in parts]


def log10_mstar(theta):
    """log10 current stellar mass of theta (..., 3): log10 m0 + log10 M*(t)/m0 at the integer grid age."""
    theta = np.asarray(theta, float)
    out = np.full(theta.shape[:-1], np.nan)
    ok = np.all(np.isfinite(theta), axis=-1)
    age = age_bin(np.where(ok, theta[..., 0], 0.0))
    out[ok] = (theta[..., 1] + np.log10(mstar_fraction(age)))[ok]
    return out


def with_mstar(theta3, lo3=None, hi3=None):
    """(N, 3) theta in (log age, log m0, E(B-V)) -> (N, 4) over RESULT_PARAMS, inserting log current stellar
    mass; lo/hi ranges of log m0 are shifted by the same log M*/m0 of the central age."""
    ms = log10_mstar(theta3)
    out = [np.insert(theta3, 2, ms, axis=1)]
    shift = ms - theta3[:, 1]
    for r in (lo3, hi3):
        if r is not None:
            out.append(np.insert(r, 2, r[:, 1] + shift, axis=1))
    return out if len(out) > 1 else out[0]


def to_initial_mass(theta_cur):
    """(log age, log current stellar mass, E(B-V)) -> (log age, log m0, E(B-V)) via mstar_fraction."""
    theta_cur = np.asarray(theta_cur, float)
    out = theta_cur.copy()
    out[:, 1] = theta_cur[:, 1] - (log10_mstar(np.stack([theta_cur[:, 0], np.zeros(len(theta_cur)),
                                                          theta_cur[:, 2]], -1)))
    return out


def catalogue_estimates(est):
    """The catalogue's own estimates as (N, 3) theta / lo / hi in (log age, log current mass, E(B-V))."""
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.stack([np.log10(est["age_myr"]), est["log10_mass"], est["ebv"]], axis=-1)
        lo = np.stack([np.log10(est["age_myr_lo"]), est["log10_mass_lo"], est["ebv_lo"]], axis=-1)
        hi = np.stack([np.log10(est["age_myr_hi"]), est["log10_mass_hi"], est["ebv_hi"]], axis=-1)
    lo = np.where(np.isneginf(lo), -99.0, lo)  # value - error <= 0: unbounded below, still a usable range
    return theta, lo, hi


def result_table(obs, est, summ, chi2_map, mle=None, densest=None):
    """Assemble the per-cluster result table (astropy Table) with units in the column descriptions.
    densest: (N, 3) evaluate.densest_sample (log10 age bin, log10 m0, E(B-V)), as *_densest columns."""
    t = Table()
    t["field"] = obs["field"]
    t["id"] = obs["id"]
    t["ra_deg"], t["dec_deg"] = obs["ra_deg"], obs["dec_deg"]
    t["distance_mpc"] = obs["distance_mpc"]
    modes, q = summ["modes"], summ["quantiles"]
    for j, p in enumerate(RESULT_PARAMS):
        t[f"{p}_map"] = modes[:, 0, j]
        t[f"{p}_mode2"] = modes[:, 1, j]
        t[f"{p}_mode3"] = modes[:, 2, j]
        for k, lev in enumerate((16, 50, 84)):
            t[f"{p}_q{lev}"] = q[:, k, j]
        for c in (f"{p}_map", f"{p}_mode2", f"{p}_mode3", f"{p}_q16", f"{p}_q50", f"{p}_q84"):
            t[c].description = RESULT_UNITS[p]
    if densest is not None:
        for j, p in enumerate(("log10_age_myr", "log10_mass", "ebv")):
            t[f"{p}_densest"] = densest[:, j]
            t[f"{p}_densest"].description = (RESULT_UNITS[p] + "; the posterior sample of highest exact density "
                                             "(likelihood x prior; age as its 1 Myr bin): evaluate.densest_sample")
    t["n_modes"] = summ["n_modes"]
    t["chi2_resim_map"] = chi2_map
    t["chi2_resim_map"].description = "Eq. 11 re-simulation chi^2 of the MAP (nu = 5 bands)"
    if mle is not None:
        for j, p in enumerate(RESULT_PARAMS):
            t[f"mle_{p}"], t[f"mle_{p}_lo"], t[f"mle_{p}_hi"] = mle["theta"][:, j], mle["lo"][:, j], mle["hi"][:, j]
        t["chi2_resim_mle"] = mle["chi2"]
    cat, lo, hi = catalogue_estimates(est)          # always written (NaN where none), so parts of a run agree
    for j, p in enumerate(("log10_age_myr", "log10_mstar", "ebv")):
        t[f"cat_{p}"], t[f"cat_{p}_lo"], t[f"cat_{p}_hi"] = cat[:, j], lo[:, j], hi[:, j]
        t[f"cat_{p}"].description = f"the catalogue's own estimate (NaN where it has none); {RESULT_UNITS[p]}"
    t["flags"] = obs["flags"]
    t["flags"].description = "bit mask: " + ", ".join(f"{b} {k}" for k, b in FLAG_BITS.items())
    t["flag_names"] = flag_names(obs["flags"])
    for j, b in enumerate(BANDS):
        t[f"flux_{b}_mjy"] = obs["flux_mjy"][:, j]
        t[f"rel_err_{b}"] = obs["rel_err"][:, j]
    return t


def add_phangs_names(t):
    """Add the results in PHANGS-style columns to a result table, in place, beside the project's own: CINN_AGE
    (Myr), CINN_MASS (current stellar mass, Msun), CINN_EBV (mag), each the MAP with _LIMLO / _LIMHI the 16 / 84 %
    quantiles (the DR5 convention: 1 sigma limits, not errors)."""
    for name, p, linear in (("AGE", "log10_age_myr", True), ("MASS", "log10_mstar", True), ("EBV", "ebv", False)):
        for suffix, col in (("", f"{p}_map"), ("_LIMLO", f"{p}_q16"), ("_LIMHI", f"{p}_q84")):
            t[f"CINN_{name}{suffix}"] = 10.0 ** t[col] if linear else t[col]
            t[f"CINN_{name}{suffix}"].description = (f"10^{col}" if linear else col) + " (PHANGS-style name)"


def format_inliers(inl):
    """Table 1 as text: reference, parameter, share of reference values in the cINN 16-84 % interval and share
    of cINN MAPs inside the reference's 1 sigma range."""
    lines = ["Table 1 inliers:",
             f"  {'reference':<20} {'parameter':<14} {'ref in cINN 16-84 %':>20} {'cINN MAP in ref 1 sigma':>24}"]
    for r in inl:
        lines.append(f"  {r['reference']:<20} {r['parameter']:<14} {r['ref_in_cinn_16_84_pct']:12.1f} % "
                     f"(n={r['n_ref_in_cinn']:4d}) {r['cinn_map_in_ref_1sigma_pct']:15.1f} % (n={r['n_map_in_ref']:4d})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI: read catalogues into observation .npz files, or write a synthetic PHANGS-format catalogue

def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Read real cluster catalogues into the observation .npz of SPEC.md Sect. 4 (per-file counts "
                    "kept/dropped/flagged are printed), or write a synthetic PHANGS-format catalogue. The cINN run "
                    "on a catalogue is `python evaluate.py catalog`.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("read", help="catalogue(s) -> observation .npz (+ the catalogue's own estimates)")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--format", choices=("phangs", "legus", "table"), required=True)
    p.add_argument("--distance", default=None, help="Mpc, or a distance table (columns name, distance_mpc)")
    p.add_argument("--columns", default=None, help="--format table: flux_F275W=COL,err_F275W=COL,...; --format "
                                                   "legus: the layout, FIELD=N (1-based), e.g. class=36")
    p.add_argument("--readme", default=None, help="--format legus: the catalogue's readme, which states its columns")
    p.add_argument("--classes", default="human", choices=sorted(PHANGS_CLASSES),
                   help="--format phangs: keep classes 1-2 of the human or the machine classification")
    p.add_argument("--out", default=None, help="observation .npz to write (optional)")
    p.add_argument("--seed", type=int, default=0, help="unused (reading is deterministic); for CLI uniformity")
    p = sub.add_parser("synthetic", help="simulated PHANGS-format FITS catalogue (tests, pipeline.py)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distance", type=float, default=10.0, help="Mpc")
    p.add_argument("--release", default="dr4", choices=sorted(PHANGS_ESTIMATES), help="the columns of this release")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "synthetic":
            t = make_synthetic_phangs(args.out, args.n, args.seed, args.distance, release=args.release)
            print(f"wrote {args.out}: {len(t)} synthetic clusters at {args.distance} Mpc, seed {args.seed}")
            return t
        obs, est, reports = read_many(args.input, args.format, args.distance, args.columns, args.readme, args.classes)
        print(f"{'field':<14} {'rows':>6} {'kept':>6} {'dropped':>8} {'flagged':>8}  distance/Mpc")
        for path, r in zip(args.input, reports):
            flagged = int(np.count_nonzero(obs["flags"][obs["field"] == galaxy_from_filename(path)]))
            d = obs["distance_mpc"][obs["field"] == galaxy_from_filename(path)]
            print(f"{galaxy_from_filename(path):<14} {r['rows']:6d} {r['kept']:6d} {sum(r['dropped'].values()):8d} "
                  f"{flagged:8d}  {d[0] if len(d) else float('nan'):.2f}")
        print(f"{'all':<14} {sum(r['rows'] for r in reports):6d} {len(obs['id']):6d}")
        if args.out:
            arrays = {k: v for k, v in obs.items() if k != "field"}
            arrays.update(field=obs["field"].astype(str), **{f"cat_{k}": v for k, v in est.items()
                                                             if k != "mass_kind"})
            save_npz(args.out, **arrays)
            print(f"wrote {args.out}")
        return obs
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
