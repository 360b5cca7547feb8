"""bench/gpu_check.sh's CPU dry run: the script a GPU lease runs once must not be what fails there."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu_check_steps  # noqa: E402  (bench/ is not a package)

STEPS = ["environment", "fashion_data", "metrics_equal", "metrics_timing", "bench_train", "demo_amp", "ddp",
         "test_suite", "bench_metrics", "demo_fp32"]
FILES = {"summary.json", "gpu_check.log", "pytest.log", "train.log", "bench_train.json", "metrics_equal.json"}


def gpu_check(out, *flags):
    return subprocess.run(["bash", "bench/gpu_check.sh", str(out), *flags], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One CPU dry run for the module's tests (about a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("gpu_check")
    done = gpu_check(out, "--device", "cpu", "--quick")
    return out, done


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_dry_run_passes_every_step_or_says_why_it_skipped(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout + done.stderr
    summary = read_json(out / "summary.json")
    assert summary["passed"] is True and summary["device"] == "cpu" and summary["quick"] is True
    assert [step["name"] for step in summary["steps"]] == STEPS
    for step in summary["steps"]:
        assert step["status"] in ("passed", "skipped"), step
        assert step["status"] == "passed" or step["reason"], step
    steps = {step["name"]: step for step in summary["steps"]}
    assert steps["metrics_equal"]["numbers"]["equal"] is True
    assert steps["metrics_timing"]["numbers"]["best_s"] > 0
    assert steps["test_suite"]["numbers"]["counts"]["passed"] >= 1
    assert steps["demo_amp"]["numbers"]["dataset"] == "tiny"
    assert 0.0 <= steps["demo_amp"]["numbers"]["map_radius_deephash"] <= 1.0
    assert steps["ddp"]["numbers"]["plain_it_per_s"] > 0 and steps["ddp"]["numbers"]["torchrun_it_per_s"] > 0


def test_dry_run_writes_few_flat_files(dry_run):
    out, _ = dry_run
    names = set(os.listdir(out))
    assert names == FILES
    assert all(os.path.isfile(out / name) for name in names)
    log = (out / "gpu_check.log").read_text()
    for step in STEPS[:-1]:
        assert f"== {step}: start" in log


def test_bench_train_quick_json_has_every_figure(dry_run):
    out, _ = dry_run
    bench = read_json(out / "bench_train.json")
    assert bench["device"] == "cpu" and bench["settings"]["quick"] is True and bench["failures"] == []
    assert [(config["backbone"], config["amp"]) for config in bench["training"]] == [("ResNet18", False),
                                                                                    ("ResNet18", True)]
    for config in bench["training"]:
        assert config["size"] == 32 and config["batch_size"] == 8 and config["steps"] == 2
        assert config["median_step_s"] > 0 and config["images_per_s"] > 0
    assert bench["loader"]["images_per_s"] > 0 and bench["loader"]["workers"] >= 1
    assert bench["per_image"]["decode_ms"] > 0 and bench["per_image"]["transform_ms"] > 0
    assert {"ratio", "keeps_up"} <= set(bench["loader_vs_step"][0])
    assert bench["gpu_decode"] is None


def test_a_spent_budget_fails_the_steps_it_could_not_run(tmp_path):
    done = gpu_check(tmp_path, "--device", "cpu", "--quick", "--budget", "5")
    assert done.returncode == 1
    summary = read_json(tmp_path / "summary.json")
    assert summary["passed"] is False
    optional = {"demo_fp32"}
    assert all(step["status"] == ("skipped" if step["name"] in optional else "failed") and "budget" in step["reason"]
               for step in summary["steps"])


@pytest.mark.parametrize("device, passes", [("cpu", True), ("cuda", False)])
def test_skipped_cuda_tests_fail_the_suite_on_cuda(tmp_path, device, passes):
    report = tmp_path / "pytest.xml"
    report.write_text('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="1">'
                      '<testcase classname="tests.test_train" name="test_a" />'
                      '<testcase classname="tests.test_train" name="test_b[cuda]">'
                      '<skipped type="pytest.skip" message="needs CUDA" /></testcase></testsuite></testsuites>')
    status = gpu_check_steps.main(["pytest-counts", str(report), "--device", device,
                                   "--json", str(tmp_path / "counts.json")])
    assert (status == 0) == passes
    counts = read_json(tmp_path / "counts.json")
    assert counts["counts"]["passed"] == 1 and counts["cuda_tests_skipped"] == 1


def test_metric_comparison_finds_the_differing_figure():
    cpu = {"map": 0.5, "curves": {"precision": [1.0, 0.5]}, "convention": "deephash"}
    device = {"map": 0.5, "curves": {"precision": [1.0, 0.5 + 1e-6]}, "convention": "deephash"}
    difference, where, mismatches = gpu_check_steps.numeric_differences(cpu, device)
    assert difference == pytest.approx(1e-6) and where == ".curves.precision[1]" and not mismatches


def test_demo_flags_are_the_makefiles():
    flags = subprocess.run([sys.executable, "bench/gpu_check_steps.py", "demo-flags", "Makefile"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    assert flags[flags.index("--num_iters") + 1].isdigit()
    assert "--s_dataset" in flags and "$(" not in " ".join(flags)


def test_fallback_codes_are_clustered_and_tied():
    hd, ld, hq, lq, _ = gpu_check_steps.simple_clustered_codes(400, 40, 16, 5, True, 0.03)
    assert hd.shape == (400, 16) and ld.shape == (400, 5) and hq.shape == (40, 16) and lq.shape == (40, 5)
    assert ld.sum(1).min() >= 1 and ld.sum(1).max() > 1
    hd, hq = gpu_check_steps.with_ties(hd, hq)
    assert len(np.unique(hd, axis=0)) < len(hd) and (hd * gpu_check_steps.GRID % 1 == 0).all()
    assert any((row == hd).all(1).any() for row in hq)
