"""The validation layer: every entry point checks what it was given here, before any work.

A user error raises InputError (a ValueError) whose one-line message names the file and the key, column or
rows at fault; the command lines print that line and exit non-zero. Anything else that escapes is a bug.

    observations(obs, path)     an observation file's keys, shapes, row counts, bands and values (SPEC.md Sect. 4)
    output_path(path)           a file the run will write: checked before the run, not after hours of work
    count(name, value)          a number of clusters, samples or epochs: >= 1 (or >= 0)
    seed(value)                 >= 0
    flux_outside_model(...)     fluxes no cluster of the prior can have at 1-30 Mpc (the flux_range flag)
"""
import os
from pathlib import Path

import numpy as np

from simulate import BANDS, DISTANCE_RANGE_MPC, LOG_MASS_RANGE, PC10_IN_MPC, load_table

SHAPES = {"x": (2 * len(BANDS) + 1,), "flux_mjy": (len(BANDS),), "rel_err": (len(BANDS),), "distance_mpc": (), "theta": (3,)}


class InputError(ValueError):
    """A user error: bad input, named in one line."""


def _rows(mask):
    rows = np.flatnonzero(mask)
    return f"row{'s' if len(rows) > 1 else ''} {rows[:5].tolist()}{' ...' if len(rows) > 5 else ''} ({len(rows)} in all)"


def observations(obs, path, need_theta=False, keys=("x", "flux_mjy", "rel_err", "distance_mpc")):
    """Check an observation dict read from `path` and return its number of clusters.

    Required keys (theta too with need_theta) with the shapes of SPEC.md Sect. 4 and the same number of rows,
    at least one; `bands`, when present, in the order of simulate.BANDS; finite values, fluxes, relative errors
    and distances > 0, theta finite where need_theta; x equal to what the fluxes, errors and distances imply.
    """
    keys = tuple(keys) + (("theta",) if need_theta else ())
    missing = [k for k in keys if k not in obs]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}; the file has {sorted(obs)}")
    n = {k: (np.shape(obs[k])[0] if np.ndim(obs[k]) else None) for k in keys}
    for k in keys:
        if np.shape(obs[k])[1:] != SHAPES[k] or np.ndim(obs[k]) != 1 + len(SHAPES[k]):
            raise InputError(f"{path}: key {k!r} has shape {np.shape(obs[k])}, expected (N, "
                             f"{', '.join(map(str, SHAPES[k]))}){'' if SHAPES[k] else ' -> (N,)'}".replace(", )", ")"))
    if len(set(n.values())) > 1:
        raise InputError(f"{path}: the keys disagree on the number of clusters: {n}")
    if not n[keys[0]]:
        raise InputError(f"{path}: no clusters in the file")
    if "bands" in obs and tuple(str(b) for b in np.atleast_1d(obs["bands"])) != BANDS:
        raise InputError(f"{path}: bands {list(np.atleast_1d(obs['bands']))}, this code needs {list(BANDS)}")
    _values(obs, path, keys)
    return n[keys[0]]


def _values(obs, path, keys):
    """The value checks of observations()."""
    for k in keys:
        values = np.asarray(obs[k], dtype=np.float64).reshape(len(obs[k]), -1)
        positive = {"theta": values[:, :0], "x": values[:, len(BANDS):]}.get(k, values)   # which must be > 0
        bad = ~np.all(np.isfinite(values), axis=1) | ~np.all(positive > 0, axis=1)
        if bad.any():
            what = {"theta": "finite", "x": "finite, its errors and distance > 0"}.get(k, "finite and > 0")
            raise InputError(f"{path}: key {k!r} must be {what}; not so in {_rows(bad)}")
    if {"x", "flux_mjy", "rel_err", "distance_mpc"} <= set(keys):
        with np.errstate(divide="ignore", invalid="ignore"):
            implied = np.column_stack([np.log10(obs["flux_mjy"]), obs["rel_err"], obs["distance_mpc"]])
        off = ~np.all(np.isclose(np.asarray(obs["x"], float), implied, rtol=1e-6, atol=1e-9), axis=1)
        if off.any():
            raise InputError(f"{path}: key 'x' is not log10 flux_mjy, rel_err, distance_mpc in {_rows(off)}: "
                             "the keys belong to different clusters, or x has another layout")


def output_path(path, suffixes=None):
    """A file a run will write: not a directory, its parent a directory that exists or can be made and is
    writable, its suffix one of `suffixes`. Returns it as a Path."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{path}: the output must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a file name")
    parent = path.parent
    for p in [parent, *parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{path}: {p} is a file, not a directory")
            if not os.access(p, os.W_OK):
                raise InputError(f"{path}: {p} is not writable")
            break
    parent.mkdir(parents=True, exist_ok=True)
    return path


def output_dir(path):
    """A directory a run will write into: made if absent; an error if it is a file or not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file, not a directory")
    output_path(path / "probe")
    return path


def count(name, value, minimum=1):
    """A count from the command line (clusters, samples, epochs): an integer >= minimum."""
    if value is not None and (int(value) != value or value < minimum):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def seed(value):
    """A random seed: an integer >= 0 (NumPy's generators refuse negative seeds)."""
    return count("--seed", value, minimum=0)


_FLUX_RANGE = {}


def model_flux_range():
    """Per band, the lowest and highest flux (mJy) a cluster of the prior can have at 1-30 Mpc: over every age
    and E(B-V) of the model table, masses 1e2-1e8 Msun. Cached."""
    if not _FLUX_RANGE:
        ln_f = load_table()["ln_flux"]
        lo = np.exp(ln_f.min(axis=(0, 1)) + LOG_MASS_RANGE[0] * np.log(10)) * (PC10_IN_MPC / DISTANCE_RANGE_MPC[1]) ** 2
        hi = np.exp(ln_f.max(axis=(0, 1)) + LOG_MASS_RANGE[1] * np.log(10)) * (PC10_IN_MPC / DISTANCE_RANGE_MPC[0]) ** 2
        _FLUX_RANGE.update(lo=lo, hi=hi)
    return _FLUX_RANGE["lo"], _FLUX_RANGE["hi"]


def flux_outside_model(flux_mjy, factor=10.0):
    """True for rows (N,) with a flux more than `factor` outside model_flux_range in some band: photometry no
    cluster of the prior produces (the noise can scatter a flux by a few; a factor of 10 is far beyond)."""
    lo, hi = model_flux_range()
    f = np.asarray(flux_mjy, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.any((f < lo / factor) | (f > hi * factor), axis=-1)
