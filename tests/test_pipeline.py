"""Tests for pipeline.py: stage wiring, resume/skip, refusal to mix runs, the summary; the full toy run is slow."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pipeline
from conftest import ROOT


def test_stage_plan_covers_every_step_and_uses_existing_clis(tmp_path):
    plan = pipeline.stages(tmp_path, "quick", seed=7)
    names = [n for n, _, _ in plan]
    assert names == ["simulate", "preprocess", "train", "sbc", "ppc", "exact", "synthetic", "catalog"]
    for name, outputs, cmd in plan:
        assert (ROOT / cmd[1]).is_file(), cmd[1]
        assert "--seed" in cmd and cmd[cmd.index("--seed") + 1] == "7"
        assert all(str(o).startswith(str(tmp_path)) for o in outputs)
    # evaluate.py subcommands must parse with D's parser exactly as the pipeline calls them
    import evaluate
    parser = evaluate.build_parser()
    for name, _, cmd in plan:
        if cmd[1] == "evaluate.py":
            args = parser.parse_args(cmd[2:])
            assert args.seed == 7


def test_training_threads_and_transform_workers(tmp_path):
    """By default torch picks the training threads (on the idle 2-core machine two train 1.3-1.6x faster than
    one) and the target transform uses a process per core; --threads N (a shared machine) caps both."""
    def train_cmd(**kw):
        return {name: cmd for name, _, cmd in pipeline.stages(tmp_path, "quick", seed=0, **kw)}["train"]

    cmd = train_cmd()
    assert "--threads" not in cmd
    assert int(cmd[cmd.index("--workers") + 1]) == min(os.cpu_count() or 1, 8)
    cmd = train_cmd(threads=1)
    assert cmd[cmd.index("--threads") + 1] == "1" and cmd[cmd.index("--workers") + 1] == "1"


def test_resume_skips_finished_and_refuses_mixed_runs(tmp_path):
    marker = tmp_path / "a.txt"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    record = {}
    assert pipeline.run_stage(1, 1, "toy", [marker], cmd, record, env=None) >= 0
    assert marker.read_text() == "x" and record["toy"] == pipeline._rel(cmd)
    assert pipeline.run_stage(1, 1, "toy", [marker], cmd, record, env=None) == 0.0  # skipped, not run again
    assert marker.read_text() == "x"
    other = cmd[:-1] + [cmd[-1] + " # other seed"]
    with pytest.raises(SystemExit, match="made by a different command"):
        pipeline.run_stage(1, 1, "toy", [marker], other, record, env=None)
    with pytest.raises(SystemExit, match="failed"):
        pipeline.run_stage(1, 1, "bad", [tmp_path / "b"], [sys.executable, "-c", "raise SystemExit(3)"], {}, None)
    with pytest.raises(SystemExit, match="did not write"):
        pipeline.run_stage(1, 1, "lazy", [tmp_path / "c"], [sys.executable, "-c", "pass"], {}, None)


def test_first_stages_on_toy_sizes_are_reproducible(tmp_path):
    """simulate -> preprocess -> synthetic catalogue through pipeline.main; same seed, same files."""
    import simulate
    for run in ("r1", "r2"):
        pipeline.main(["--profile", "smoke", "--out", str(tmp_path / run), "--seed", "5",
                       "--only", "simulate", "preprocess", "synthetic"])
    for f in ("sim.npz", "data/train.npz", "data/test.npz", "catalog/synthetic_phangs.fits"):
        assert (tmp_path / "r1" / f).read_bytes() == (tmp_path / "r2" / f).read_bytes(), f
    test = simulate.load_npz(tmp_path / "r1" / "data" / "test.npz", required=("x", "theta"))
    assert test["x"].shape == (pipeline.RUN_SIZES["smoke"]["n_test"], 11)
    stamps = json.loads((tmp_path / "r1" / "pipeline_stages.json").read_text())
    assert set(stamps) == {"simulate", "preprocess", "synthetic"}


@pytest.mark.parametrize("method", ["paper", "refined"])
def test_smoke_run_trains_and_checks_both_methods(tmp_path, method):
    """The smoke profile through training, SBC and the exact comparison, for each method: the model is of the
    method asked for, and the summary has its numbers."""
    import cinn
    summ = pipeline.main(["--profile", "smoke", "--method", method, "--out", str(tmp_path), "--seed", "2",
                          "--only", "simulate", "preprocess", "train", "sbc", "exact"])
    assert cinn.load(tmp_path, device="cpu").method == method
    assert np.isfinite(summ["train"]["test_nll"]) and len(summ["sbc"]) == 6
    assert np.isfinite(summ["exact"]["kl_mean_nats"])
    cmd = {n: c for n, _, c in pipeline.stages(tmp_path, "smoke", 2, method=method)}["train"]
    assert cmd[cmd.index("--method") + 1] == method


def test_summary_reads_stage_outputs(tmp_path):
    (tmp_path / "eval" / "sbc").mkdir(parents=True)
    (tmp_path / "eval" / "sbc" / "sbc.json").write_text(json.dumps(
        {"n_pairs": 10, "all_inside_simultaneous": True,
         "statistics": [{"name": "T1 log t", "max_abs_ecdf_diff": 0.05}]}))
    (tmp_path / "metrics.json").write_text(json.dumps({"test_nll": -1.5, "coverage_68": [0.7, 0.68, 0.66]}))
    lines, summ = pipeline.summarize_run(tmp_path)
    text = "\n".join(lines)
    assert "T1 0.050" in text and "test NLL -1.500" in text and "0.700, 0.680, 0.660" in text
    assert summ["sbc"] == {"T1 log t": 0.05} and summ["sbc_all_inside"] is True


def test_help():
    r = subprocess.run([sys.executable, "pipeline.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--profile" in r.stdout and "--seed" in r.stdout


@pytest.mark.slow
def test_full_toy_pipeline(tmp_path):
    """Every stage on toy sizes (about a minute on 2 cores): the outputs and the summary exist."""
    summ = pipeline.main(["--profile", "smoke", "--out", str(tmp_path), "--seed", "1"])
    assert "sbc" in summ and "exact" in summ and "catalog_inliers" in summ
    assert (tmp_path / "catalog" / "synthetic_phangs_result.fits").is_file()
    assert np.isfinite(summ["exact"]["kl_mean_nats"])
