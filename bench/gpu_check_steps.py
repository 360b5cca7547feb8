"""The Python parts of bench/gpu_check.sh: each subcommand measures or parses one thing and writes JSON.

    python bench/gpu_check_steps.py environment --device cuda --tensorboardx HOW --json env.json
    python bench/gpu_check_steps.py metrics-equal --device cuda --json metrics_equal.json [--quick]
    python bench/gpu_check_steps.py metrics-timing --device cuda --json timing.json [--quick]
    python bench/gpu_check_steps.py pytest-counts pytest.xml --device cuda --json counts.json
    python bench/gpu_check_steps.py bench-train-numbers bench_train.json --json numbers.json
    python bench/gpu_check_steps.py demo-flags Makefile          # the demo recipe's flags, one a line
    python bench/gpu_check_steps.py tiny-data DIR                 # the tests' tiny dataset 'tiny'
    python bench/gpu_check_steps.py demo-result METRICS --reference METRICS --train_s S --test_s S --json out.json
    python bench/gpu_check_steps.py summary steps.tsv STEPS_DIR --started EPOCH_S --json summary.json

A subcommand exits 1 when what it checks fails, after writing its JSON.
"""
import argparse
import json
import math
import os
import platform
import re
import sys
import time
from xml.etree import ElementTree

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)

TOLERANCE = 1e-9
# The CPU/device comparison: (database, queries, bits, labels, multi-label, R), small and full.
EQUALITY_CASES = {
    "quick": [(2_000, 100, 32, 10, False, 500), (1_000, 50, 16, 21, True, -1)],
    "full": [(20_000, 1_000, 64, 10, False, 5_000), (10_000, 500, 48, 21, True, -1)],
}
# evaluate_retrieval timed at NUS-WIDE's size (bench_metrics.py's c190k): multi-label, 81 labels, R 5000.
TIMING_CASE = {"quick": (2_000, 50, 64, 81, True, 500), "full": (190_000, 5_000, 64, 81, True, 5_000)}
TIMING_TARGET_S = 2.0
RESNET50_AMP_TARGET = 2_500  # training images/s on an H200
BALL_FRACTION = 0.03         # mean share of the database in a query's radius-2 ball
# Scores on this dyadic grid are exact in float64, so equal codes give equal scores on every device.
GRID = 64


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("environment", "metrics-equal", "metrics-timing"):
        command = commands.add_parser(name)
        command.add_argument("--device", default="cuda")
        command.add_argument("--json", required=True)
        if name == "environment":
            command.add_argument("--tensorboardx", default="", help="how tensorboardX was provided")
        else:
            command.add_argument("--quick", action="store_true", help="small sizes, for the CPU dry run")
    command = commands.add_parser("pytest-counts")
    command.add_argument("report", help="pytest's --junitxml file")
    command.add_argument("--device", default="cuda")
    command.add_argument("--json", required=True)
    command = commands.add_parser("bench-train-numbers")
    command.add_argument("bench_json")
    command.add_argument("--json", required=True)
    commands.add_parser("demo-flags").add_argument("makefile")
    commands.add_parser("tiny-data").add_argument("data_dir")
    command = commands.add_parser("demo-result")
    command.add_argument("metrics")
    command.add_argument("--reference", required=True, help="the CPU run's metrics.json (may be missing)")
    command.add_argument("--train_s", type=float, required=True, help="wall seconds of train_mmhh.py")
    command.add_argument("--test_s", type=float, required=True, help="wall seconds of test_mmhh.py")
    command.add_argument("--json", required=True)
    command = commands.add_parser("ddp-result")
    command.add_argument("plain_log", help="train_mmhh.py's output, one process")
    command.add_argument("torchrun_log", help="train_mmhh.py's output under torchrun --nproc_per_node 1")
    command.add_argument("--plain_s", type=float, required=True, help="wall seconds of the plain run")
    command.add_argument("--torchrun_s", type=float, required=True, help="wall seconds of the torchrun run")
    command.add_argument("--json", required=True)
    command = commands.add_parser("summary")
    command.add_argument("steps_tsv")
    command.add_argument("steps_dir")
    command.add_argument("--device", default="cuda")
    command.add_argument("--quick", action="store_true")
    command.add_argument("--started", type=float, required=True, help="the check's start, in epoch seconds")
    command.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args)


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

def environment(args):
    """Versions and the device; fails when CUDA is asked for and not there."""
    import torch
    import torchvision
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "cuda_runtime": torch.version.cuda, "cpu_count": os.cpu_count(),
            "cuda_available": torch.cuda.is_available(), "tensorboardx": args.tensorboardx}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update({"device_name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                     "device_memory_gib": round(properties.total_memory / 2**30, 1),
                     "cudnn": torch.backends.cudnn.version()})
    print(json.dumps(info, indent=1))
    write_json(args.json, info)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# metrics on the device against the CPU
# ---------------------------------------------------------------------------------------------

def clustered(n_database, n_queries, bits, n_labels, multi_label, seed=0):
    """Clustered codes and labels: bench/clustered_codes.py's when it is there, else a simple stand-in."""
    if os.path.isfile(os.path.join(BENCH, "clustered_codes.py")):
        sys.path.insert(0, BENCH)
        from clustered_codes import clustered_codes
        generator = clustered_codes
    else:
        generator = simple_clustered_codes
    hd, ld, hq, lq, _ = generator(n_database, n_queries, bits, n_labels, multi_label, BALL_FRACTION, seed=seed)
    return hd, ld, hq, lq, generator.__module__


def simple_clustered_codes(n_database, n_queries, bits, n_labels, multi_label, target_ball_fraction, seed=0):
    """Class centres of +-1, each bit flipped with probability 0.05, tanh of scaled noisy values.

    Takes clustered_codes' arguments; ``target_ball_fraction`` is not aimed at, the flips are fixed.
    """
    rng = np.random.default_rng(seed)
    centres = rng.choice([-1.0, 1.0], (n_labels, bits))

    def draw(n):
        primary = rng.integers(0, n_labels, n)
        labels = np.eye(n_labels, dtype=np.uint8)[primary]
        if multi_label:  # half the items get a second label
            extra = np.flatnonzero(rng.random(n) < 0.5)
            labels[extra, rng.integers(0, n_labels, extra.size)] = 1
        signs = centres[primary] * np.where(rng.random((n, bits)) < 0.05, -1.0, 1.0)
        return np.tanh(2.0 * (signs + 0.5 * rng.standard_normal((n, bits)))), labels

    database_codes, database_labels = draw(n_database)
    query_codes, query_labels = draw(n_queries)
    return database_codes, database_labels, query_codes, query_labels, {}


def with_ties(hd, hq, seed=0):
    """Codes full of ties: on a dyadic grid, a fifth of the database copied from other rows, a tenth of
    the queries equal to database rows. Copied codes keep their own labels, so tie-breaking decides APs."""
    rng = np.random.default_rng(seed + 1)
    hd, hq = np.round(hd * GRID) / GRID, np.round(hq * GRID) / GRID
    copies = rng.choice(len(hd), len(hd) // 5, replace=False)
    hd[copies] = hd[rng.integers(0, len(hd), copies.size)]
    equal = rng.choice(len(hq), max(1, len(hq) // 10), replace=False)
    hq[equal] = hd[rng.integers(0, len(hd), equal.size)]
    return hd, hq


def numeric_differences(cpu, device, path=""):
    """(largest |difference| over every number, where it is, mismatches that are not numbers)."""
    if isinstance(cpu, dict):
        results = [numeric_differences(cpu[key], device.get(key), f"{path}.{key}") for key in cpu]
    elif isinstance(cpu, list):
        if not isinstance(device, list) or len(device) != len(cpu):
            return math.inf, path, [path]
        results = [numeric_differences(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(cpu, device))]
    elif isinstance(cpu, (int, float)) and isinstance(device, (int, float)):
        return abs(cpu - device), path, []
    else:
        return 0.0, path, [] if cpu == device else [path]
    if not results:
        return 0.0, path, []
    worst = max(results, key=lambda result: result[0])
    return worst[0], worst[1], [mismatch for result in results for mismatch in result[2]]


def metrics_equal(args):
    """Every figure of metrics.evaluate_retrieval on the device against the CPU, to TOLERANCE."""
    import metrics
    cases = []
    for n_database, n_queries, bits, n_labels, multi_label, topk in EQUALITY_CASES["quick" if args.quick else "full"]:
        hd, ld, hq, lq, generator = clustered(n_database, n_queries, bits, n_labels, multi_label)
        hd, hq = with_ties(hd, hq)
        timings, results = {}, {}
        for device in ("cpu", args.device):
            start = time.perf_counter()
            results[device] = metrics.evaluate_retrieval(hd, ld, hq, lq, radius=2, topk=topk, device=device)
            timings[device] = time.perf_counter() - start
        difference, where, mismatches = numeric_differences(results["cpu"], results[args.device])
        case = {"database": n_database, "queries": n_queries, "bits": bits, "labels": n_labels,
                "multi_label": multi_label, "topk": topk, "codes": generator,
                "distinct_database_codes": int(len(np.unique(hd, axis=0))),
                "map_radius_deephash": results["cpu"]["map_radius_deephash"],
                "empty_ball_fraction": results["cpu"]["empty_ball_fraction"],
                "max_difference": difference, "where": where, "mismatches": mismatches,
                "seconds": timings, "equal": difference <= TOLERANCE and not mismatches}
        print(json.dumps(case))
        cases.append(case)
    result = {"device": args.device, "tolerance": TOLERANCE, "cases": cases,
              "equal": all(case["equal"] for case in cases)}
    write_json(args.json, result)
    return 0 if result["equal"] else 1


def metrics_timing(args):
    """Seconds of one metrics.evaluate_retrieval (radius 2, top R) at the benchmark's size, best of two."""
    import torch

    import metrics
    n_database, n_queries, bits, n_labels, multi_label, topk = TIMING_CASE["quick" if args.quick else "full"]
    hd, ld, hq, lq, generator = clustered(n_database, n_queries, bits, n_labels, multi_label)
    cuda = args.device.startswith("cuda")
    metrics.evaluate_retrieval(hd[:500], ld[:500], hq[:10], lq[:10], radius=2, topk=50, device=args.device)  # warm-up
    seconds = []
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = metrics.evaluate_retrieval(hd, ld, hq, lq, radius=2, topk=topk, device=args.device)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    timing = {"device": args.device, "database": n_database, "queries": n_queries, "bits": bits, "labels": n_labels,
              "topk": topk, "codes": generator, "seconds": seconds, "best_s": min(seconds),
              "target_s": TIMING_TARGET_S, "meets_target": min(seconds) < TIMING_TARGET_S,
              "map_radius_deephash": result["map_radius_deephash"], "map_topk": result["map_topk"],
              "empty_ball_fraction": result["empty_ball_fraction"]}
    if cuda:
        timing["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(timing))
    write_json(args.json, timing)
    return 0


# ---------------------------------------------------------------------------------------------
# parsing other steps' output
# ---------------------------------------------------------------------------------------------

def pytest_counts(args):
    """Counts and skip reasons from pytest's JUnit XML report; CUDA tests must not skip on CUDA."""
    suites = ElementTree.parse(args.report).getroot().iter("testsuite")
    counts = {key: 0 for key in ("tests", "failures", "errors", "skipped")}
    skip_reasons = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for skipped in case.iter("skipped"):
                skip_reasons.append(f"{case.get('classname')}.{case.get('name')}: {skipped.get('message')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    cuda_skips = [reason for reason in skip_reasons if "needs CUDA" in reason]
    problems = []
    if not counts["passed"]:
        problems.append("no test passed")
    if counts["failures"] or counts["errors"]:
        problems.append(f"{counts['failures']} failed, {counts['errors']} errors")
    if args.device.startswith("cuda") and cuda_skips:
        problems.append(f"{len(cuda_skips)} CUDA test(s) skipped although CUDA was asked for")
    result = {"counts": counts, "skip_reasons": skip_reasons, "cuda_tests_skipped": len(cuda_skips),
              "problems": problems}
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return 1 if problems else 0


def bench_train_numbers(args):
    """The training bench's key figures, and whether ResNet50 under --amp reaches its H200 target."""
    with open(args.bench_json, encoding="utf-8") as handle:
        bench = json.load(handle)
    images_per_s = {f"{config['backbone']}_{'amp' if config['amp'] else 'fp32'}": config.get("images_per_s")
                    for config in bench["training"]}
    numbers = {"device_name": bench["device_name"], "training_images_per_s": images_per_s,
               "loader_images_per_s": bench["loader"].get("images_per_s"),
               "loader_keeps_up": {f"{row['backbone']}_{'amp' if row['amp'] else 'fp32'}": row["keeps_up"]
                                   for row in bench["loader_vs_step"]},
               "gpu_decode_images_per_s": (bench["gpu_decode"] or {}).get("images_per_s"),
               "failures": bench["failures"]}
    if "ResNet50_amp" in images_per_s:
        numbers["resnet50_amp_target"] = RESNET50_AMP_TARGET
        numbers["resnet50_amp_meets_target"] = (images_per_s["ResNet50_amp"] or 0) >= RESNET50_AMP_TARGET
    print(json.dumps(numbers, indent=1))
    write_json(args.json, numbers)
    return 0


def demo_flags(args):
    """The Makefile's DEMO_FLAGS, its variables expanded, one flag a line (so bash can read them)."""
    with open(args.makefile, encoding="utf-8") as handle:
        text = handle.read().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*)$", text, re.M))
    flags = re.sub(r"\$\((\w+)\)", lambda match: variables[match.group(1)], variables["DEMO_FLAGS"])
    print("\n".join(flags.split()))
    return 0


def tiny_data(args):
    """The tests' tiny dataset, for the dry run's training: the same code path as the demo, small."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import write_tiny_dataset
    print(write_tiny_dataset(args.data_dir))
    return 0


def demo_result(args):
    """MAP@H<=2 (deephash) of the run, beside the CPU run's when that evaluated the same lists."""
    with open(args.metrics, encoding="utf-8") as handle:
        ours = json.load(handle)
    result = {key: ours[key] for key in ("dataset", "num_queries", "num_database", "hash_bit",
                                         "map_radius_deephash", "map_radius_mmhh", "map_topk", "empty_ball_fraction")}
    result.update(train_s=args.train_s, test_s=args.test_s)
    if os.path.isfile(args.reference):
        with open(args.reference, encoding="utf-8") as handle:
            reference = json.load(handle)
        if all(reference.get(key) == ours[key] for key in ("dataset", "num_queries", "num_database", "hash_bit")):
            result["cpu_map_radius_deephash"] = reference["map_radius_deephash"]
            result["difference_from_cpu"] = ours["map_radius_deephash"] - reference["map_radius_deephash"]
        else:
            result["cpu_reference"] = f"{args.reference} evaluated other lists; not compared"
    else:
        result["cpu_reference"] = f"{args.reference} not found; not compared"
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return 0


def ddp_result(args):
    """Training speed alone and through the distributed path: the last it/s each run printed, and wall time."""
    result = {}
    for name, path, seconds in (("plain", args.plain_log, args.plain_s), ("torchrun", args.torchrun_log,
                                                                           args.torchrun_s)):
        with open(path, encoding="utf-8", errors="replace") as handle:
            speeds = re.findall(r"([0-9.]+) it/s", handle.read())
        if not speeds:
            print(f"error: {path}: no 'it/s' progress line; see train.log", file=sys.stderr)
            return 1
        result[f"{name}_it_per_s"] = float(speeds[-1])
        result[f"{name}_wall_s"] = seconds
    result["torchrun_over_plain"] = result["torchrun_it_per_s"] / result["plain_it_per_s"]
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return 0


def summary(args):
    """summary.json: every step's status, seconds, reason and key numbers; exit 1 unless none failed."""
    steps = []
    with open(args.steps_tsv, encoding="utf-8") as handle:
        for line in handle:
            name, status, seconds, limit, reason = line.rstrip("\n").split("\t")
            step = {"name": name, "status": status, "seconds": float(seconds), "limit_s": int(limit),
                    "reason": reason}
            numbers = os.path.join(args.steps_dir, f"{name}.json")
            if os.path.isfile(numbers):
                with open(numbers, encoding="utf-8") as numbers_file:
                    step["numbers"] = json.load(numbers_file)
            steps.append(step)
    passed = all(step["status"] != "failed" for step in steps)
    result = {"passed": passed, "device": args.device, "quick": args.quick,
              "wall_s": round(time.time() - args.started, 1), "steps": steps}
    write_json(args.json, result)
    width = max(len(step["name"]) for step in steps)
    for step in steps:
        print(f"{step['name']:<{width}}  {step['status']:<7} {step['seconds']:7.1f} s  "
              f"{key_numbers(step['name'], step.get('numbers')) or step['reason']}")
    print(f"{'total':<{width}}  {'passed' if passed else 'FAILED':<7} {result['wall_s']:7.1f} s")
    return 0 if passed else 1


def key_numbers(name, numbers):
    """One line of a step's headline figures for the printed summary ('' when it has none)."""
    if not numbers:
        return ""
    if name == "environment":
        return f"{numbers.get('device_name', 'no CUDA device')}, torch {numbers['torch']}, " \
               f"tensorboardX {numbers['tensorboardx']}"
    if name == "metrics_equal":
        return f"largest |device - CPU| {max(case['max_difference'] for case in numbers['cases']):.1e} " \
               f"(tolerance {numbers['tolerance']:.0e})"
    if name == "metrics_timing":
        return f"evaluate_retrieval {numbers['queries']} x {numbers['database']} x {numbers['bits']}: " \
               f"{numbers['best_s']:.2f} s (target < {numbers['target_s']:g} s)"
    if name == "bench_train":
        rates = ", ".join(f"{config} {rate:.0f}" for config, rate in numbers["training_images_per_s"].items() if rate)
        return f"images/s: {rates}; loader {numbers['loader_images_per_s'] or 0:.0f}"
    if name == "test_suite":
        counts = numbers["counts"]
        return f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, " \
               f"{counts['skipped']} skipped ({numbers['cuda_tests_skipped']} needing CUDA)"
    if name == "ddp":
        return (f"training {numbers['plain_it_per_s']:.1f} it/s alone, {numbers['torchrun_it_per_s']:.1f} under "
                f"torchrun (x{numbers['torchrun_over_plain']:.2f})")
    if name.startswith("demo"):
        cpu = numbers.get("cpu_map_radius_deephash")
        beside = f" (CPU run {cpu:.4f})" if cpu is not None else ""
        return (f"MAP@H<=2 (deephash) {numbers['map_radius_deephash']:.4f}{beside}; "
                f"train {numbers['train_s']:.0f} s, test {numbers['test_s']:.0f} s")
    return ""


COMMANDS = {"environment": environment, "metrics-equal": metrics_equal, "metrics-timing": metrics_timing,
            "pytest-counts": pytest_counts, "bench-train-numbers": bench_train_numbers, "demo-flags": demo_flags,
            "tiny-data": tiny_data, "demo-result": demo_result, "ddp-result": ddp_result,
            "summary": summary}

if __name__ == "__main__":
    sys.exit(main())
