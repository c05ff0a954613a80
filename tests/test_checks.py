"""Tests of the validation layer (checks.py) and of the entry points that use it: every bad input is one line
naming the file and what is wrong, and a batch with one bad cluster keeps the others."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checks
import preprocess
import simulate
from conftest import ROOT

CORRUPTIONS = ["none", "drop_key", "nan_row", "negative_flux", "zero_error", "rows_disagree", "four_bands",
               "two_column_theta", "ten_column_x", "no_clusters", "x_of_other_clusters", "bands_reordered"]


def good_obs(n=6, seed=0):
    return preprocess.observe(simulate.simulate(n, seed=seed), np.random.default_rng(seed + 1))


def corrupt(obs, kind, row):
    obs = {k: np.array(v, copy=True) for k, v in obs.items()}
    n = len(obs["x"])
    if kind == "drop_key":
        del obs["rel_err"]
    elif kind == "nan_row":
        obs["flux_mjy"][row % n, 2] = np.nan
    elif kind == "negative_flux":
        obs["flux_mjy"][row % n, 0] *= -1
    elif kind == "zero_error":
        obs["rel_err"][row % n, 4] = 0.0
    elif kind == "rows_disagree":
        obs["distance_mpc"] = obs["distance_mpc"][:-1]
    elif kind == "four_bands":
        obs["flux_mjy"] = obs["flux_mjy"][:, :4]
    elif kind == "two_column_theta":
        obs["theta"] = obs["theta"][:, :2]
    elif kind == "ten_column_x":
        obs["x"] = obs["x"][:, :10]
    elif kind == "no_clusters":
        obs = {k: (v[:0] if v.ndim else v) for k, v in obs.items()}
    elif kind == "x_of_other_clusters":
        obs["x"] = obs["x"][::-1].copy()
    elif kind == "bands_reordered":
        obs["bands"] = obs["bands"][::-1].copy()
    return obs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(CORRUPTIONS), st.integers(0, 5))
def test_observations_accepts_good_files_and_names_what_is_wrong_in_bad_ones(kind, row):
    obs = corrupt(good_obs(), kind, row)
    if kind == "none":
        assert checks.observations(obs, "f.npz", need_theta=True) == 6
        return
    with pytest.raises(checks.InputError, match="^f.npz: "):
        checks.observations(obs, "f.npz", need_theta=True)


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(checks.InputError, match="is a file, not a directory"):
        checks.output_path(tmp_path / "afile" / "out.npz")
    with pytest.raises(checks.InputError, match="is a directory"):
        checks.output_path(tmp_path)
    with pytest.raises(checks.InputError, match="must end in .npz"):
        checks.output_path(tmp_path / "out.txt", (".npz",))
    assert checks.output_path(tmp_path / "new" / "deep" / "out.npz", (".npz",)).parent.is_dir()
    for bad in (0, -3, 2.5):
        with pytest.raises(checks.InputError):
            checks.count("--samples", bad)
    with pytest.raises(checks.InputError, match="--seed"):
        checks.seed(-1)


def test_flux_outside_what_the_model_can_produce():
    obs = good_obs(200)
    assert not checks.flux_outside_model(obs["flux_mjy"]).any()          # simulated clusters are all inside
    f = obs["flux_mjy"][:3].copy()
    f[0, 1], f[2, 4] = 1e30, 1e-30
    assert checks.flux_outside_model(f).tolist() == [True, False, True]


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.parametrize("case", ["ten_column_x", "nan_row", "rows_disagree", "no_clusters"])
def test_entry_points_answer_bad_files_with_one_line(tmp_path, case):
    """grid_posterior.py and evaluate.py on inconsistent observation files: a non-zero exit and a one-line
    message naming the file, no traceback."""
    path = tmp_path / "obs.npz"
    simulate.save_npz(path, **corrupt(good_obs(), case, 1))
    calls = [("evaluate.py", ["compare", "--obs", path, "--mle", path, "--summary", path, "--out", tmp_path / "c"])]
    if case != "ten_column_x":                    # the grid reads fluxes, errors and distances only
        calls.append(("grid_posterior.py", ["--obs", path, "--out", tmp_path / "g.npz"]))
    for script, args in calls:
        r = run(script, *args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (script, r.stderr)
        assert str(path) in r.stderr.strip().splitlines()[-1], (script, r.stderr)


def test_bad_numbers_and_outputs_stop_before_any_work(tmp_path):
    path = tmp_path / "obs.npz"
    simulate.save_npz(path, **good_obs())
    (tmp_path / "afile").write_text("x")
    for script, args, words in (
            ("simulate.py", ["--n", 10, "--seed", -1, "--out", tmp_path / "s.npz"], "--seed"),
            ("preprocess.py", ["--sim", path, "--out", tmp_path / "d", "--seed", -4], "--seed"),
            ("grid_posterior.py", ["--obs", path, "--out", tmp_path / "g.npz", "--first", -58], "--first"),
            ("grid_posterior.py", ["--obs", path, "--out", tmp_path / "afile" / "g.npz"], "not a directory"),
            ("evaluate.py", ["sbc", "--model", tmp_path, "--obs", path, "--out", tmp_path / "afile"], "is a file"),
            ("evaluate.py", ["ppc", "--model", tmp_path, "--obs", path, "--samples", 0, "--out", tmp_path / "p"],
             "--samples"),
            ("train.py", ["--data", tmp_path / "nowhere", "--out", tmp_path / "run"], "no such data directory")):
        r = run(script, *args)
        assert r.returncode != 0 and "Traceback" not in r.stderr and words in r.stderr, (script, r.stderr)
    assert not (tmp_path / "run").exists()                       # no stray config.json or directory


def test_unreadable_checkpoints_are_named(tmp_path):
    import cinn
    for content in (b"", b"garbage", b"PK\x03\x04 truncated"):
        (tmp_path / "model.pt").write_bytes(content)
        with pytest.raises(ValueError, match="model.pt: not a readable checkpoint"):
            cinn.load(tmp_path)
