"""Forward model of Walter et al. (2026, A&A 706, A201): CIGALE-equivalent star-cluster photometry.

What CIGALE computes for the PHANGS setup (modules sfh2exp, bc03, dustext, redshifting; SPEC.md Sect. 2),
rebuilt in plain numpy from the same Bruzual & Charlot (2003) SSP (Padova 1994, Chabrier IMF, Z = 0.02):

    1. SSP spectra F_nu(t, lambda) at 10 pc per 1 Msun formed (data/bc03_wfc3_table.npz, see data/README.md);
    2. CIGALE's 1 Myr age bins: the spectrum at integer age k Myr is the SSP averaged over (k-1, k] Myr,
       i.e. the mean of the SSP interpolated linearly in time at k-0.9, k-0.8, ..., k Myr   (age_bin_weights);
    3. Milky-Way screen dust: F_nu * 10**(-0.4 E(B-V) k(lambda)), CIGALE dustext law 0, R_V = 3.1 (dust_k);
    4. photon-counting band fluxes f_nu = int(T F_nu / lambda) / int(T / lambda), in mJy        (band_flux);
    5. flux proportional to the initial mass m0 and to (10 pc / d)^2; current mass M* = mstar_fraction * m0.

Everything is linear in the spectrum, so load_table() computes band fluxes at the native SSP ages for every
E(B-V) node, applies the (13750 x n_age) sparse age-bin weights, and caches ln flux (13750, n_ebv, 5).
model_flux() then gathers two E(B-V) nodes and interpolates ln flux linearly (error <= 4.7e-5, see tests).

Also: the prior of Sect. 2.2 (sample_prior), the simulation file of SPEC.md Sect. 4 (simulate, CLI),
atomic deterministic .npz I/O (save_npz, load_npz) and pcigale interoperability (write_cigale_config,
read_cigale_savefluxes, --backend pcigale).

    python simulate.py --n 5000000 --seed 1 --out runs/sim.npz
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from astropy.table import Table
from scipy import sparse

# The facts every other script imports (each defined here only; tests/test_layout.py checks it).
BANDS = ("F275W", "F336W", "F438W", "F555W", "F814W")   # the order of every band axis in every file
AGE_MAX_MYR = 13750        # CIGALE's 1 Myr age grid: integer ages 1..13750 Myr
LOG_MASS_RANGE = (2.0, 8.0)     # prior of log10(m0/Msun), initial (formed) mass
EBV_RANGE = (0.0, 1.5)          # prior of E(B-V), mag
DISTANCE_RANGE_MPC = (1.0, 30.0)     # training distances
R_MAX = 0.5                # noise level of the training data: r ~ U[0, R_MAX], sigma = r f
SYS_ERR = 0.05             # systematic relative error added to real photometry (Eq. 10)
PC10_IN_MPC = 1e-5         # 10 pc, the distance of the model table's fluxes
EBV_STEP = 0.01            # E(B-V) node spacing of the cached ln-flux table
R_V = 3.1                  # the paper's fixed R_V (CIGALE's, PHANGS', LEGUS')
RV_LIMITS = (2.2, 5.8)     # a variable R_V stays inside the range the CCM89 law is used over
RV_STEP = 0.1              # R_V node spacing of the ln-flux tables of a variable R_V (ln F linear in between)
RV_PRIOR_DEFAULT = (2.5, 5.0)      # `--rv-prior default`: R_V ~ U[2.5, 5.0] (README: why this range)
C_ANGSTROM_PER_S = 2.99792458e18
MJY_CGS = 1e-26            # 1 mJy in erg s^-1 cm^-2 Hz^-1
TABLE_PATH = Path(__file__).resolve().parent / "data" / "bc03_wfc3_table.npz"
TABLE_KEYS = ("wave_A", "f_nu_10pc", "age_yr", "mstar", "bands") + tuple(f"filter_{b}" for b in BANDS)


# ----------------------------------------------------------------------------------------------------------
# .npz input/output: atomic, byte-for-byte deterministic (fixed zip timestamps), clear errors on read.

def _write_npz(path, arrays, compress=False):
    """Write arrays to path as .npz through a temporary file and os.replace (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    try:
        with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                arr = np.asanyarray(value)
                if arr.dtype.hasobject:
                    raise ValueError(f"{path}: key {name!r} holds Python objects; store numbers or strings")
                with zf.open(info, "w", force_zip64=True) as fh:     # streamed: no in-memory copy
                    np.lib.format.write_array(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npz(path, **arrays):
    """Atomically write `arrays` to `path` (.npz, uncompressed); same arrays -> identical file bytes."""
    _write_npz(path, arrays, compress=False)


def load_npz(path, required=()):
    """Read an .npz into a dict of arrays; clear errors naming the file and any missing keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    missing = [k for k in required if k not in out]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; file has {sorted(out)}")
    return out


class Progress:
    """A progress line on stderr for long loops: done/total, rate and ETA, at most every `every` seconds and
    at the end. progress = Progress(n, "samples"); then progress.update(done) as the work goes."""

    def __init__(self, total, label, unit="clusters", every=10.0):
        self.total, self.label, self.unit, self.every = int(total), label, unit, every
        self.t0 = self.last = time.time()

    def update(self, done):
        now = time.time()
        if done < self.total and now - self.last < self.every:
            return
        self.last, elapsed = now, now - self.t0
        rate = done / elapsed if elapsed > 0 else float("inf")
        eta = (self.total - done) / rate if 0 < rate < float("inf") else 0.0
        print(f"  {self.label}: {done}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s, {elapsed:.0f} s, "
              f"ETA {eta:.0f} s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Physics: dust law, photometry, CIGALE age bins.

def dust_k(wave_A, r_v=R_V):
    """k(lambda) = A_lambda / E(B-V) of CIGALE's dustext law 0 (Cardelli+89 with O'Donnell 94 optical).

    x = 1/lambda in inverse micron. x < 1.1: k = (0.574 R_V - 0.527) x^1.61 (extended to all longer
    wavelengths); 1.1 <= x < 3.3: O'Donnell (1994) polynomials; 3.3 <= x <= 11: CCM89 UV (with the
    x >= 5.9 bump correction) and far-UV (x >= 8); x > 11: k = 0. k = a(x) R_V + b(x).
    """
    x = 1e4 / np.asarray(wave_A, dtype=float)
    a = np.zeros_like(x)
    b = np.zeros_like(x)
    ir = x < 1.1
    a[ir] = 0.574 * x[ir] ** 1.61
    b[ir] = -0.527 * x[ir] ** 1.61
    opt = (x >= 1.1) & (x < 3.3)
    y = x[opt] - 1.82
    a[opt] = np.polyval([-0.505, 1.647, -0.827, -1.718, 1.137, 0.701, -0.609, 0.104, 1.0], y)
    b[opt] = np.polyval([3.347, -10.805, 5.491, 11.102, -7.985, -3.989, 2.908, 1.952, 0.0], y)
    uv = (x >= 3.3) & (x < 8.0)
    xu = x[uv]
    fa = np.where(xu >= 5.9, -0.04473 * (xu - 5.9) ** 2 - 0.009779 * (xu - 5.9) ** 3, 0.0)
    fb = np.where(xu >= 5.9, 0.2130 * (xu - 5.9) ** 2 + 0.1207 * (xu - 5.9) ** 3, 0.0)
    a[uv] = 1.752 - 0.316 * xu - 0.104 / ((xu - 4.67) ** 2 + 0.341) + fa
    b[uv] = -3.090 + 1.825 * xu + 1.206 / ((xu - 4.62) ** 2 + 0.263) + fb
    fuv = (x >= 8.0) & (x <= 11.0)
    y = x[fuv] - 8.0
    a[fuv] = np.polyval([-0.070, 0.137, -0.628, -1.073], y)
    b[fuv] = np.polyval([0.374, -0.420, 4.257, 13.670], y)
    return a * r_v + b


def band_weights(wave_A, filter_wave_A, filter_throughput):
    """Weights c (len(wave_A),) with band flux = F_nu(wave_A) @ c (photon counting, SPEC.md Sect. 2).

    f_nu = int(T F_nu / lambda dlambda) / int(T / lambda dlambda), evaluated by the trapezoid rule on the union
    of the spectrum's and the filter's wavelength points inside the filter range, with F_nu and T interpolated
    linearly in lambda. Linear in F_nu, hence expressed as one weight per spectrum wavelength.
    """
    wave = np.asarray(wave_A, dtype=float)
    fw = np.asarray(filter_wave_A, dtype=float)
    ft = np.asarray(filter_throughput, dtype=float)
    if np.any(np.diff(wave) <= 0) or np.any(np.diff(fw) <= 0):
        raise ValueError("band_weights: wavelengths must be strictly increasing")
    if fw[0] < wave[0] or fw[-1] > wave[-1]:
        raise ValueError(f"band_weights: spectrum ({wave[0]:.0f}-{wave[-1]:.0f} A) does not cover the filter "
                         f"({fw[0]:.0f}-{fw[-1]:.0f} A)")
    grid = np.union1d(fw, wave[(wave > fw[0]) & (wave < fw[-1])])
    t = np.interp(grid, fw, ft)
    dg = np.diff(grid)
    trap = np.zeros_like(grid)                       # trapezoid weights on the union grid
    trap[:-1] += dg / 2
    trap[1:] += dg / 2
    g = trap * t / grid
    g /= g.sum()                                     # divide by int(T / lambda)
    # spread each union-grid weight onto the two bracketing spectrum points (linear interpolation)
    j = np.clip(np.searchsorted(wave, grid, side="right") - 1, 0, len(wave) - 2)
    frac = (grid - wave[j]) / (wave[j + 1] - wave[j])
    c = np.zeros(len(wave))
    np.add.at(c, j, g * (1 - frac))
    np.add.at(c, j + 1, g * frac)
    return c


def band_flux(wave_A, f_nu, filter_wave_A, filter_throughput):
    """Photon-counting band flux density in mJy of spectra f_nu (..., len(wave_A)) in erg/s/cm^2/Hz."""
    return np.asarray(f_nu) @ band_weights(wave_A, filter_wave_A, filter_throughput) / MJY_CGS


def age_bin_weights(age_yr, n_ages=AGE_MAX_MYR):
    """Sparse (n_ages, len(age_yr)) matrix W: (W @ X)[k-1] = X averaged over CIGALE's age bin (k-1, k] Myr.

    CIGALE regrids the SSP to 1 Myr by averaging it, linearly interpolated in time, at the ten points
    k-0.9, k-0.8, ..., k Myr. Native age 0 is skipped and times before the first non-zero native age take
    the first non-zero-age value (np.interp clamping), as in CIGALE.
    """
    age_myr = np.asarray(age_yr, dtype=float) / 1e6
    use = np.nonzero(age_myr > 0)[0]
    t_nat = age_myr[use]
    t = np.arange(1, 10 * n_ages + 1) / 10.0          # 0.1, 0.2, ..., n_ages Myr
    if t[-1] > t_nat[-1]:
        raise ValueError(f"age_bin_weights: SSP ages end at {t_nat[-1]} Myr < {t[-1]} Myr")
    j = np.clip(np.searchsorted(t_nat, t, side="right") - 1, 0, len(t_nat) - 2)
    frac = np.clip((t - t_nat[j]) / (t_nat[j + 1] - t_nat[j]), 0.0, 1.0)
    rows = np.repeat(np.arange(n_ages), 10)
    w = sparse.coo_matrix((np.concatenate([(1 - frac) / 10, frac / 10]),
                           (np.concatenate([rows, rows]), np.concatenate([use[j], use[j + 1]]))),
                          shape=(n_ages, len(age_myr)))
    return w.tocsr()


# ----------------------------------------------------------------------------------------------------------
# The cached model table.

_CACHE = {}


def load_source(path=TABLE_PATH):
    """The committed data table (native-age SSP spectra, filter curves (n, 2) Angstrom/throughput); data/README.md."""
    key = ("source", str(path))
    if key not in _CACHE:
        src = load_npz(path, required=TABLE_KEYS)
        if tuple(str(b) for b in src["bands"]) != BANDS:
            raise ValueError(f"{path}: bands {src['bands']} differ from {BANDS}")
        _CACHE[key] = src
    return _CACHE[key]


def native_band_flux(ebv_nodes, path=TABLE_PATH, r_v=R_V):
    """Band fluxes (n_native_age, n_ebv, 5) in mJy at 10 pc per Msun formed, at the native SSP ages."""
    src = load_source(path)
    wave = src["wave_A"]
    spec = src["f_nu_10pc"].astype(float) / MJY_CGS                            # (n_age, n_wave) mJy
    atten = 10.0 ** (-0.4 * np.outer(ebv_nodes, dust_k(wave, r_v)))           # (n_ebv, n_wave)
    out = np.empty((spec.shape[0], len(ebv_nodes), len(BANDS)))
    for b in range(len(BANDS)):
        filt = src[f"filter_{BANDS[b]}"]
        c = band_weights(wave, filt[:, 0], filt[:, 1])
        nz = np.nonzero(c)[0]
        out[:, :, b] = (spec[:, nz] * c[nz]) @ atten[:, nz].T
    return out


def _build_table(path, r_v):
    """ln flux (13750, n_e, 5) and M*/m0 (13750,) on CIGALE's 1 Myr age grid at one R_V (about 0.5 s)."""
    src = load_source(path)
    n_e = int(round((EBV_RANGE[1] - EBV_RANGE[0]) / EBV_STEP)) + 1
    ebv_nodes = np.linspace(EBV_RANGE[0], EBV_RANGE[1], n_e)
    w = age_bin_weights(src["age_yr"])
    native = native_band_flux(ebv_nodes, path, r_v)
    flux = (w @ native.reshape(native.shape[0], -1)).reshape(AGE_MAX_MYR, n_e, len(BANDS))
    mstar = w @ src["mstar"].astype(float)
    np.log(flux, out=flux)
    for arr in (ebv_nodes, flux, mstar):
        arr.flags.writeable = False                # shared cache: callers must not modify it
    return {"ebv_nodes": ebv_nodes, "ln_flux": flux, "mstar_frac": mstar, "bands": np.array(BANDS),
            "r_v": float(r_v)}


def load_table(path=TABLE_PATH, r_v=R_V):
    """The cached model table (built on first call, about 0.5 s): dict with

    ebv_nodes (n_e,) 0..1.5 in steps of EBV_STEP; ln_flux (13750, n_e, 5) natural log of band flux in mJy
    at 10 pc per 1 Msun formed, row k-1 = age k Myr; mstar_frac (13750,) M*/m0 at integer age k Myr; r_v.
    Each R_V's table stays cached (83 MB: 2.2 GB for the 26 nodes of the default R_V prior).
    """
    key = ("table", str(path), float(r_v))
    if key not in _CACHE:
        _CACHE[key] = _build_table(path, r_v)
    return _CACHE[key]


def rv_nodes():
    """The R_V nodes RV_LIMITS[0], + RV_STEP, ..., RV_LIMITS[1] of the variable-R_V tables (3.1 is one)."""
    n = int(round((RV_LIMITS[1] - RV_LIMITS[0]) / RV_STEP)) + 1
    return np.round(RV_LIMITS[0] + RV_STEP * np.arange(n), 10)


def _rv_interval(r_v):
    """Index j of the node interval [node_j, node_j+1] that holds r_v, and the weight of node j+1."""
    nodes = rv_nodes()
    pos = (np.asarray(r_v, dtype=float) - nodes[0]) / RV_STEP
    pos = np.where(np.abs(pos - np.round(pos)) < 1e-9, np.round(pos), pos)     # a node is a node
    j = np.clip(np.floor(pos).astype(np.int64), 0, len(nodes) - 2)
    return j, pos - j


# ----------------------------------------------------------------------------------------------------------
# Public forward model.

def _check_ages(age_myr):
    """Integer ages in 1..AGE_MAX_MYR as int64 array, else ValueError."""
    age = np.asarray(age_myr)
    if age.dtype.kind not in "iuf":
        raise ValueError(f"age_myr must be numeric, got dtype {age.dtype}")
    if age.dtype.kind == "f":
        if not np.all(np.isfinite(age)) or np.any(age != np.round(age)):
            raise ValueError("age_myr must be integer numbers of Myr (CIGALE's 1 Myr grid)")
    if age.size and (age.min() < 1 or age.max() > AGE_MAX_MYR):
        raise ValueError(f"age_myr must lie in 1..{AGE_MAX_MYR} Myr, got {age.min()}..{age.max()}")
    return age.astype(np.int64)


def _check_range(name, value, lo, hi):
    """value as float array, else ValueError unless all finite and within [lo, hi]."""
    value = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{name} must be finite, got {value[~np.isfinite(value)].ravel()[:3]}")
    if value.size and (value.min() < lo or value.max() > hi):
        raise ValueError(f"{name} must be within [{lo}, {hi}], got {value.min()}..{value.max()}")
    return value


def _ln_flux(tab, age, ebv):
    """ln F (..., 5) of a table at integer ages and E(B-V) (checked, same shape): linear in E(B-V)."""
    n_e = len(tab["ebv_nodes"])
    pos = (ebv - EBV_RANGE[0]) / EBV_STEP
    i0 = np.minimum(pos.astype(np.int64), n_e - 2)
    w = (pos - i0)[..., None]
    rows = tab["ln_flux"].reshape(-1, len(BANDS))
    r0 = (age - 1) * n_e + i0
    ln_f = np.take(rows, r0, axis=0)                    # ln F at the node below, (..., 5); take > fancy index
    upper = np.take(rows, r0 + 1, axis=0)
    upper -= ln_f                                       # in-place: ln F0 + w (ln F1 - ln F0)
    upper *= w
    ln_f += upper
    return ln_f


def _ln_flux_rv(age, ebv, r_v):
    """ln F (..., 5) of the variable-R_V model: linear in R_V between the node tables (rv_nodes)."""
    j, w = _rv_interval(r_v)
    nodes = rv_nodes()
    ln_f = np.empty(age.shape + (len(BANDS),))
    for jj in np.unique(j):
        sel = j == jj
        lo = _ln_flux(load_table(r_v=nodes[jj]), age[sel], ebv[sel])
        hi = _ln_flux(load_table(r_v=nodes[jj + 1]), age[sel], ebv[sel])
        hi -= lo
        hi *= w[sel][:, None]
        ln_f[sel] = lo + hi
    return ln_f


def model_flux(age_myr, ebv, log10_mass=0.0, distance_mpc=None, r_v=None):
    """Noise-free band fluxes (..., 5) in mJy, band order BANDS; inputs broadcast against each other.

    flux = F(age, E(B-V)) * 10**log10_mass * (10 pc / distance_mpc)**2 with F per Msun formed at 10 pc
    (distance None = 10 pc). age_myr: integers 1..13750; E(B-V) in [0, 1.5], ln F interpolated linearly
    between the E(B-V) nodes of load_table(): off the nodes the relative error is < 2e-6, except F275W of
    old clusters at E(B-V) > 1 (red leak): up to 4.7e-5 (tests/test_simulate.py).
    r_v: None for the paper's fixed R_V = 3.1; else R_V per cluster in RV_LIMITS, ln F linear in R_V between
    the RV_STEP nodes (off the nodes the relative error is < 4e-5, tests/test_simulate.py).
    """
    age = _check_ages(age_myr)
    ebv = _check_range("ebv", ebv, *EBV_RANGE)
    logm = np.asarray(log10_mass, dtype=float)
    if not np.all(np.isfinite(logm)):
        raise ValueError("log10_mass must be finite")
    scale = logm * np.log(10.0)
    if distance_mpc is not None:
        d = np.asarray(distance_mpc, dtype=float)
        if not np.all(np.isfinite(d)) or np.any(d <= 0):
            raise ValueError("distance_mpc must be finite and > 0")
        scale = scale + 2.0 * np.log(PC10_IN_MPC / d)
    if r_v is None:
        age, ebv, scale = np.broadcast_arrays(age, ebv, scale)
        ln_f = _ln_flux(load_table(), age, ebv)
    else:
        rv = _check_range("r_v", r_v, *RV_LIMITS)
        age, ebv, scale, rv = (np.ascontiguousarray(a) for a in np.broadcast_arrays(age, ebv, scale, rv))
        ln_f = _ln_flux_rv(age, ebv, rv)
    ln_f += scale[..., None]
    return np.exp(ln_f, out=ln_f)


def mstar_fraction(age_myr):
    """Current stellar mass (living stars + remnants) per Msun formed at integer age(s) in Myr."""
    return np.take(load_table()["mstar_frac"], _check_ages(age_myr) - 1)


def sample_prior(n, rng, keep_unrounded=False):
    """Draw n clusters from the prior of SPEC.md Sect. 3 (paper Sect. 2.2).

    log10(t/Myr) ~ U[0, log10 13750] rounded to the nearest integer Myr in [1, 13750];
    log10(m0/Msun) ~ U[2, 8]; E(B-V) ~ U[0, 1.5]. Returns dict(age_myr int64, log10_mass, ebv)
    (plus log10_age_unrounded when keep_unrounded).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    log_age = rng.uniform(0.0, np.log10(AGE_MAX_MYR), n)
    log_mass = rng.uniform(*LOG_MASS_RANGE, n)
    ebv = rng.uniform(*EBV_RANGE, n)
    age = np.clip(np.rint(10.0 ** log_age), 1, AGE_MAX_MYR).astype(np.int64)
    out = {"age_myr": age, "log10_mass": log_mass, "ebv": ebv}
    if keep_unrounded:
        out["log10_age_unrounded"] = log_age
    return out


def log_prior_age(n_age=AGE_MAX_MYR):
    """log P(k), k = 1..n_age: the prior of the integer age that sample_prior draws.

    t = 10^U, U ~ U[0, log10 n_age], rounded to the nearest integer: P(k) = [log10 min(k + 1/2, n_age)
    - log10 max(k - 1/2, 1)] / log10 n_age. P(1) = 0.043 for n_age = 13750; the last cell is half as wide as
    its neighbour.
    """
    k = np.arange(1, n_age + 1, dtype=np.float64)
    p = (np.log10(np.minimum(k + 0.5, n_age)) - np.log10(np.maximum(k - 0.5, 1.0))) / np.log10(n_age)
    return np.log(p)


def age_bin(log10_age):
    """The integer model age k (Myr) of a jittered age label t' = 10^log10_age: the k whose 1 Myr bin
    [k - 1/2, k + 1/2) holds t' (ties go up), clipped to 1..AGE_MAX_MYR. The one rule every script uses to go
    from a label (or a posterior sample) back to the photometry's age."""
    t = 10.0 ** np.asarray(log10_age, dtype=np.float64)
    return np.clip(np.floor(t + 0.5), 1, AGE_MAX_MYR).astype(np.int64)


def parse_rv_prior(text):
    """`--rv-prior`: "none" (the paper's fixed R_V = 3.1) -> None; "default" -> RV_PRIOR_DEFAULT;
    "uniform:LO:HI" -> (LO, HI), R_V nodes inside RV_LIMITS. Else ValueError."""
    if text in (None, "none"):
        return None
    if text == "default":
        return RV_PRIOR_DEFAULT
    parts = str(text).split(":")
    try:
        if parts[0] != "uniform" or len(parts) != 3:
            raise ValueError
        lo, hi = float(parts[1]), float(parts[2])
    except ValueError:
        raise ValueError(f"--rv-prior {text!r}: expected none, default or uniform:LO:HI") from None
    on_nodes = all(np.min(np.abs(rv_nodes() - v)) < 1e-9 for v in (lo, hi))
    if not (RV_LIMITS[0] <= lo < hi <= RV_LIMITS[1] and on_nodes):
        raise ValueError(f"--rv-prior {text!r}: need {RV_LIMITS[0]} <= LO < HI <= {RV_LIMITS[1]} (the range the "
                         f"CCM89 law is used over), both multiples of {RV_STEP} (the exact posterior's R_V nodes)")
    return lo, hi


def simulate(n, seed, chunk=1_000_000, progress=False, rv_prior=None):
    """Simulate n clusters from the prior: the simulation file's dict (SPEC.md Sect. 4).

    Args:
        n: clusters. seed: the prior's generator (the same seed gives the same clusters).
        chunk: fluxes are computed in chunks of this many clusters (bounds memory; the prior is drawn in one
            go, so the result does not depend on it). progress: print a progress line on stderr.
        rv_prior: None (R_V = 3.1 fixed, the paper's model) or (lo, hi): R_V ~ U[lo, hi] per cluster, drawn
            after the other parameters (so age, mass and E(B-V) are those of the fixed model's same seed).
    Returns:
        dict age_myr, log10_mass, ebv, flux_10pc_mjy (N, 5), mstar_frac, bands, seed; with rv_prior also
        rv (N,) and rv_prior (2,).
    """
    rng = np.random.default_rng(seed)
    prior = sample_prior(n, rng)
    rv = None if rv_prior is None else rng.uniform(*rv_prior, int(n))
    flux = np.empty((int(n), len(BANDS)))
    chunk = max(1, int(chunk))
    bar = Progress(n, "simulate", every=0.0 if progress else float("inf"))
    for start in range(0, int(n), chunk):
        sl = slice(start, min(start + chunk, int(n)))
        flux[sl] = model_flux(prior["age_myr"][sl], prior["ebv"][sl], prior["log10_mass"][sl],
                              r_v=None if rv is None else rv[sl])
        if progress:
            bar.update(sl.stop)
    out = {"age_myr": prior["age_myr"], "log10_mass": prior["log10_mass"], "ebv": prior["ebv"],
           "flux_10pc_mjy": flux, "mstar_frac": mstar_fraction(prior["age_myr"]),
           "bands": np.array(BANDS), "seed": np.int64(seed)}
    if rv is not None:
        out.update(rv=rv, rv_prior=np.array(rv_prior, dtype=float))
    return out


# ----------------------------------------------------------------------------------------------------------
# pcigale interoperability (SPEC.md Sect. 2): configuration writer, savefluxes reader, optional pcigale run.

CIGALE_MODULES = ("sfh2exp", "bc03", "dustext", "redshifting")
CIGALE_BANDS = tuple(f"hst.wfc3.{b}" for b in BANDS)      # CIGALE's WFC3/UVIS (chip 2) filters
CIGALE_FIXED = {                                           # everything but sfh2exp.age and dustext.E_BV
    "sfh2exp": {"tau_main": 0.001, "tau_burst": 0.001, "f_burst": 0.0, "burst_age": 1, "sfr_0": 1.0,
                "normalise": True},
    "bc03": {"imf": 1, "metallicity": 0.02, "separation_age": 10},
    "dustext": {"Rv": R_V, "law": 0, "filters": "V_B90"},
    "redshifting": {"redshift": 0.0},
}


def _fmt_list(values):
    return ", ".join(str(v) for v in values)


def write_cigale_config(path, age_myr=(), ebv=(), parameters_file="", cores=1, init_only=False):
    """Write a pcigale.ini for this setup (modules sfh2exp, bc03, dustext, redshifting; savefluxes).

    Grid mode: pcigale computes every combination of the lists age_myr (integer Myr) x ebv. With
    parameters_file (see write_cigale_parameters) the models are that file's rows and the lists are ignored
    by pcigale. init_only writes just the top block, as `pcigale init` would, for `pcigale genconf` to
    complete (genconf also writes pcigale.ini.spec, which `pcigale run` needs). Returns the path.
    """
    age = _check_ages(age_myr) if len(age_myr) else np.array([1])
    ebv = _check_range("ebv", ebv, 0.0, np.inf) if len(ebv) else np.array([0.0])
    lines = ["# pcigale configuration written by simulate.write_cigale_config (SPEC.md Sect. 2)",
             "data_file = ", f"parameters_file = {parameters_file}",
             f"sed_modules = {_fmt_list(CIGALE_MODULES)}", "analysis_method = savefluxes", f"cores = {int(cores)}"]
    if not init_only:
        lines += [f"bands = {_fmt_list(CIGALE_BANDS)}", "properties = ", "", "[sed_modules_params]"]
        per_module = {"sfh2exp": {"age": _fmt_list(age.tolist())}, "dustext": {"E_BV": _fmt_list(ebv.tolist())}}
        for module in CIGALE_MODULES:
            lines.append(f"  [[{module}]]")
            params = {**CIGALE_FIXED[module], **per_module.get(module, {})}
            lines += [f"    {k} = {v}" for k, v in params.items()]
        lines += ["", "[analysis_params]", "  variables = ", "  save_sed = False", "  blocks = 1"]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def write_cigale_parameters(path, age_myr, ebv):
    """pcigale parameters_file: one model per row (columns module.parameter, all parameters of all modules)."""
    age = _check_ages(age_myr).ravel()
    ebv = _check_range("ebv", ebv, 0.0, np.inf).ravel()
    if age.shape != ebv.shape:
        raise ValueError(f"age_myr ({age.shape}) and ebv ({ebv.shape}) must have the same length")
    cols = {}
    for module in CIGALE_MODULES:
        for k, v in CIGALE_FIXED[module].items():
            cols[f"{module}.{k}"] = [str(v)] * len(age)
        if module == "sfh2exp":
            cols["sfh2exp.age"] = [str(a) for a in age]
        if module == "dustext":
            cols["dustext.E_BV"] = [repr(float(e)) for e in ebv]
    rows = [" ".join(cols)] + [" ".join(c[i] for c in cols.values()) for i in range(len(age))]
    Path(path).write_text("\n".join(rows) + "\n")
    return path


def _find_column(names, wanted, path):
    """Column of a savefluxes table for `wanted` (a property name or a band such as F275W)."""
    if wanted in names:
        return wanted
    if wanted in BANDS:   # hst.wfc3.F275W (pcigale >= 2022), F275W_UVIS_CHIP2 (older databases), F275W
        hits = [n for n in names if n.upper() in (wanted, f"HST.WFC3.{wanted}", f"{wanted}_UVIS_CHIP2")]
        if len(hits) == 1:
            return hits[0]
    raise ValueError(f"{path}: no column for {wanted!r} (columns: {', '.join(names)})")


def read_cigale_savefluxes(path):
    """Convert pcigale savefluxes output (out/models-block-0.fits or .txt) to the simulation dict (Sect. 4).

    Needs columns id, sfh.age (Myr), attenuation.E_BV, stellar.m_star and the five band fluxes (mJy);
    sfh.integrated (formed mass, 1 when normalised) gives log10_mass; universe.redshift, if present, must be
    0 (CIGALE then puts the model at 10 pc). Rows are returned sorted by id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such savefluxes file")
    try:
        if path.suffix.lower() in (".fits", ".fit"):
            table = Table.read(path, format="fits")
        else:
            first = path.read_text().lstrip().split("\n", 1)[0]
            table = Table.read(path, format="ascii.commented_header" if first.startswith("#") else "ascii")
    except Exception as err:  # astropy raises many types on malformed tables
        raise ValueError(f"{path}: cannot read as a table ({err})") from err
    names = list(table.colnames)
    col = {k: np.asarray(table[_find_column(names, k, path)], dtype=float)
           for k in ("id", "sfh.age", "attenuation.E_BV", "stellar.m_star")}
    flux = np.stack([np.asarray(table[_find_column(names, b, path)], dtype=float) for b in BANDS], axis=1)
    formed = np.asarray(table["sfh.integrated"], dtype=float) if "sfh.integrated" in names else np.ones(len(table))
    if "universe.redshift" in names and np.any(np.asarray(table["universe.redshift"], dtype=float) != 0):
        raise ValueError(f"{path}: universe.redshift must be 0 (fluxes at 10 pc); run pcigale with redshift = 0")
    bad = ~(np.isfinite(flux).all(axis=1) & (flux > 0).all(axis=1) & (formed > 0))
    if bad.any():
        raise ValueError(f"{path}: non-positive or non-finite flux/mass in row(s) {np.nonzero(bad)[0][:5].tolist()}")
    age = col["sfh.age"]
    if np.any(age != np.round(age)):
        raise ValueError(f"{path}: sfh.age must be integer Myr, row {int(np.argmax(age != np.round(age)))}")
    order = np.argsort(col["id"], kind="stable")
    return {"age_myr": age[order].astype(np.int64), "log10_mass": np.log10(formed[order]),
            "ebv": col["attenuation.E_BV"][order], "flux_10pc_mjy": flux[order],
            "mstar_frac": (col["stellar.m_star"] / formed)[order], "bands": np.array(BANDS), "seed": np.int64(-1)}


def simulate_pcigale(n, seed, workdir):
    """simulate() through pcigale (if installed): same prior draw, CIGALE computes 1 Msun models, scaled here."""
    if shutil.which("pcigale") is None:
        raise RuntimeError("--backend pcigale needs pcigale (https://cigale.lam.fr, not on PyPI) and its "
                           "database built; `pcigale` is not on PATH. Use the default numpy backend.")
    prior = sample_prior(n, np.random.default_rng(seed))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_cigale_parameters(workdir / "models.txt", prior["age_myr"], prior["ebv"])
    write_cigale_config(workdir / "pcigale.ini", parameters_file="models.txt", init_only=True)
    subprocess.run(["pcigale", "genconf"], cwd=workdir, check=True)      # writes pcigale.ini.spec
    write_cigale_config(workdir / "pcigale.ini", parameters_file="models.txt")
    subprocess.run(["pcigale", "run"], cwd=workdir, check=True)
    out = next((workdir / "out" / f"models-block-0{ext}" for ext in (".fits", ".txt")
                if (workdir / "out" / f"models-block-0{ext}").is_file()), None)
    if out is None:
        raise RuntimeError(f"pcigale wrote no {workdir}/out/models-block-0.fits or .txt")
    res = read_cigale_savefluxes(out)
    if len(res["age_myr"]) != n or not np.array_equal(res["age_myr"], prior["age_myr"]):
        raise RuntimeError(f"{out}: models do not match the {n} requested (age mismatch)")
    scale = 10.0 ** (prior["log10_mass"] - res["log10_mass"])
    return {**res, "log10_mass": prior["log10_mass"], "ebv": prior["ebv"],
            "flux_10pc_mjy": res["flux_10pc_mjy"] * scale[:, None], "seed": np.int64(seed)}


# ----------------------------------------------------------------------------------------------------------
# Command line.

def main(argv=None):
    p = argparse.ArgumentParser(description="Simulate noise-free star-cluster photometry (CIGALE-equivalent "
                                "BC03 + dustext forward model) for clusters drawn from the prior.")
    p.add_argument("--n", type=int, default=5_000_000, help="number of clusters (default: the paper's 5e6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical file)")
    p.add_argument("--out", default="runs/sim.npz", help="output .npz (default runs/sim.npz)")
    p.add_argument("--chunk", type=int, default=1_000_000, help="clusters per chunk (bounds memory)")
    p.add_argument("--rv-prior", default="none",
                   help="R_V per cluster: none (fixed 3.1, the paper's model), default (U[%g, %g], see README) or "
                        "uniform:LO:HI" % RV_PRIOR_DEFAULT)
    p.add_argument("--backend", choices=("numpy", "pcigale"), default="numpy",
                   help="numpy (default) or pcigale (needs pcigale installed; slow: use small --n)")
    p.add_argument("--cigale-dir", default=None,
                   help="pcigale working directory (default: OUT with suffix .cigale)")
    args = p.parse_args(argv)
    if args.n < 1 or args.chunk < 1 or args.seed < 0:
        p.error("--n and --chunk must be >= 1, --seed >= 0")
    try:
        rv_prior = parse_rv_prior(args.rv_prior)
    except ValueError as err:
        p.error(str(err))
    if rv_prior is not None and args.backend == "pcigale":
        p.error("--rv-prior needs the numpy backend")
    t0 = time.perf_counter()
    if Path(args.out).is_dir() or Path(args.out).parent.is_file():
        p.error(f"--out {args.out}: needs a file name in a directory")
    if args.backend == "pcigale":
        try:
            sim = simulate_pcigale(args.n, args.seed, args.cigale_dir or Path(args.out).with_suffix(".cigale"))
        except (RuntimeError, subprocess.CalledProcessError) as err:
            raise SystemExit(f"simulate.py: {err}")
    else:
        sim = simulate(args.n, args.seed, chunk=args.chunk, progress=args.n >= 1_000_000, rv_prior=rv_prior)
    save_npz(args.out, **sim)
    print(f"wrote {args.out}: {args.n} clusters, seed {args.seed}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
