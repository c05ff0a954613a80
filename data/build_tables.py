"""Build data/bc03_wfc3_table.npz, the compact model table behind simulate.py (see data/README.md).

Source files (PyPI sdist pymgal==1.1; copies in ../shared/data):
  pymgal/models/bc03_ssp_z_0.02_chab.model   BC03 (2003) SSP, Padova 1994, Chabrier IMF, Z = 0.02 (EzGal FITS)
  pymgal/filters/wfc3_uvis_f{275,336,438,555,814}w   WFC3/UVIS chip-1 total throughput (Angstrom, throughput)

Kept: the SSP spectra at every native age up to the first one >= 13750 Myr, on the native wavelength points
from the last one below to the first one above the filters' wavelength range, as float32 F_nu (erg/s/cm^2/Hz
at 10 pc per Msun formed); native ages (yr) and BC03 M* (per Msun formed); the five filter curves unchanged.

    python data/build_tables.py [--bc03 FILE] [--filters DIR] [--out data/bc03_wfc3_table.npz]
"""
import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import simulate  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"


def sha256(path):
    """Hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_ezgal(path):
    """EzGal model file -> (wave_A ascending, f_nu (n_age, n_wave) at 10 pc per Msun formed, age_yr, mstar)."""
    with fits.open(path) as h:
        f_nu = np.asarray(h[0].data, dtype=float)             # (n_freq, n_age)
        nu = np.asarray(h[1].data["vs"], dtype=float)         # Hz
        age_yr = np.asarray(h[2].data["ages"], dtype=float)
        mstar = np.asarray(h[2].data["masses"], dtype=float)
        if h[0].header.get("UNITS", "").strip() != "ergs/s/cm^2/Hz":
            raise ValueError(f"{path}: unexpected UNITS {h[0].header.get('UNITS')!r}")
    if f_nu.shape != (len(nu), len(age_yr)):
        raise ValueError(f"{path}: spectra {f_nu.shape} do not match {len(nu)} frequencies x {len(age_yr)} ages")
    wave = simulate.C_ANGSTROM_PER_S / nu
    order = np.argsort(wave)
    return wave[order], f_nu[order].T.copy(), age_yr, mstar


def read_filter(path):
    """Two-column filter file -> (n, 2) array of Angstrom, throughput; checks it is sorted and non-negative."""
    arr = np.loadtxt(path)
    if arr.ndim != 2 or arr.shape[1] != 2 or np.any(np.diff(arr[:, 0]) <= 0) or np.any(arr[:, 1] < 0):
        raise ValueError(f"{path}: expected two columns (increasing Angstrom, throughput >= 0)")
    return arr


def build(bc03_path, filter_dir):
    """The table as a dict of arrays (keys simulate.TABLE_KEYS-compatible)."""
    wave, f_nu, age_yr, mstar = read_ezgal(bc03_path)
    filters = {b: read_filter(Path(filter_dir) / f"wfc3_uvis_{b.lower()}") for b in simulate.BANDS}
    lo = min(f[0, 0] for f in filters.values())
    hi = max(f[-1, 0] for f in filters.values())
    i_lo = np.searchsorted(wave, lo, side="right") - 1
    i_hi = np.searchsorted(wave, hi, side="left")
    n_age = np.searchsorted(age_yr, simulate.AGE_MAX_MYR * 1e6, side="left") + 1
    out = {"wave_A": wave[i_lo:i_hi + 1],
           "f_nu_10pc": f_nu[:n_age, i_lo:i_hi + 1].astype(np.float32),
           "age_yr": age_yr[:n_age], "mstar": mstar[:n_age], "bands": np.array(simulate.BANDS)}
    for b, f in filters.items():
        out[f"filter_{b}"] = f
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bc03", default=str(SHARED / "bc03" / "bc03_ssp_z_0.02_chab.model"))
    p.add_argument("--filters", default=str(SHARED / "filters"))
    p.add_argument("--out", default=str(simulate.TABLE_PATH))
    p.add_argument("--seed", type=int, default=0, help="unused (the build is deterministic); for CLI uniformity")
    args = p.parse_args(argv)
    table = build(args.bc03, args.filters)
    simulate._write_npz(args.out, table, compress=True)
    print(f"sha256 {sha256(args.bc03)}  {Path(args.bc03).name}")
    for b in simulate.BANDS:
        f = Path(args.filters) / f"wfc3_uvis_{b.lower()}"
        print(f"sha256 {sha256(f)}  {f.name}")
    print(f"sha256 {sha256(args.out)}  {Path(args.out).name}")
    print(f"wrote {args.out}: {table['f_nu_10pc'].shape[0]} ages x {table['f_nu_10pc'].shape[1]} wavelengths "
          f"({table['wave_A'][0]:.0f}-{table['wave_A'][-1]:.0f} A), {Path(args.out).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
