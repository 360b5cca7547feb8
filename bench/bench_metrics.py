"""Time metrics.map_at_radius, map_at_topk and evaluate_retrieval against plain numpy on the same codes.

Codes shaped like a trained network's, where a Hamming ball of radius 2 holds 1-10% of the
database (random codes leave it nearly empty and flatter every ball method):

* ``demo``: the demo's saved codes (``make demo`` writes test_output/demo/{database,test}_{code,labels}.npy:
  69,000 x 1,000 x 48 bits, 10 classes); skipped with a note when they are not there;
* ``c50k``, ``c100k``, ``c190k``: clustered synthetic codes (bench/clustered_codes.py: class centres,
  per-bit flip noise solved for a target ball fraction, multi-label with a Zipf-like label
  popularity) of 50,000 x 2,000 x 48 bits (21 labels), 100,000 x 2,000 x 64 and 190,000 x 5,000 x 64
  (81 labels: a NUS-WIDE-sized evaluation);
* ``random``: random codes (50,000 x 2,000 x 48), an extra row showing the nearly empty balls.

Baselines, plain numpy with a Python loop over queries and one Q x N float64 matrix of inner
products (its memory is the baseline's): MAP@H<=r finds each query's ball by a matrix-vector product
of the sign codes and ranks it by a stable argsort of the ball's scores ("ball argsort"); the
released MMHH / DeepHash code instead argsorts the whole row and keeps the ball ("full argsort");
MAP@R takes argpartition then a stable sort of the R winners. For the whole evaluation (every
figure and curve of evaluate_retrieval) the baseline is the sum of its MAP@H<=2 and MAP@R runs,
which compute only those two numbers. Every pair of runs is checked to give the same MAP (to 1e-9).

Each (case, implementation, metric) runs in its own subprocess, ``--repeat`` times, keeping the
fastest: ``peak extra memory`` is the rise of the process's peak resident set (VmHWM; not ru_maxrss,
which keeps the forking parent's size) over its resident set after loading the inputs (the largest
over the repeats); on CUDA it is torch.cuda.max_memory_allocated over the allocation before the
call (inputs are passed as CPU arrays, so their device copies count). The Markdown table at the
end is the README's; the load average at the start and end tells whether the machine was busy.

    python bench/bench_metrics.py                        # every case, baselines below 150k items
    python bench/bench_metrics.py --cases demo c50k      # a subset
    python bench/bench_metrics.py --full                 # + the baselines at 190k x 5k (~8 GB each)
    python bench/bench_metrics.py --device cuda          # ours on the GPU (baselines stay numpy)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clustered_codes import clustered_codes, mean_ball_size  # noqa: E402  (after the path set-up)

DEMO_DIR = os.path.join(ROOT, "test_output", "demo")
DEMO_FILES = ("database_code", "database_labels", "test_code", "test_labels")
# name: (database, queries, bits, labels, multi-label, target ball fraction at radius 2)
CLUSTERED = {
    "c50k": (50_000, 2_000, 48, 21, True, 0.03),
    "c100k": (100_000, 2_000, 64, 81, True, 0.03),
    "c190k": (190_000, 5_000, 64, 81, True, 0.03),
}
CASES = ("demo", *CLUSTERED, "random")
LARGE = 150_000         # database size from which the baselines are opt-in (--full)
FIGURES = {"radius": "MAP@H≤{r}", "topk": "MAP@{R}", "evaluate": "whole evaluation"}
BASELINES = ("radius", "radius_full_sort", "topk")


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------

def baseline_map_at_radius(hd, ld, hq, lq, radius, full_sort=False):
    """deephash MAP@H<=radius: empty ball = AP 0, ball without relevant item left out."""
    hd, hq = hd.astype(np.float64), hq.astype(np.float64)
    bits = hd.shape[1]
    sim = hq @ hd.T                                             # (Q, N) float64
    bd = np.where(hd >= 0, 1.0, -1.0)
    bq = np.where(hq >= 0, 1.0, -1.0)
    ld, lq = ld.astype(np.float32), lq.astype(np.float32)
    aps = []
    for i in range(hq.shape[0]):
        hamming = (bits - bd @ bq[i]) / 2
        if full_sort:
            order = np.argsort(-sim[i], kind="stable")
            ball = order[hamming[order] <= radius]
        else:
            ball = np.flatnonzero(hamming <= radius)
            ball = ball[np.argsort(-sim[i, ball], kind="stable")]
        rel = (ld[ball] @ lq[i]) > 0
        found = rel.sum()
        if ball.size == 0:
            aps.append(0.0)
        elif found:
            precision = np.cumsum(rel) / np.arange(1, ball.size + 1)
            aps.append(float((precision * rel).sum() / found))
    return float(np.mean(aps)) if aps else 0.0


def baseline_map_at_topk(hd, ld, hq, lq, top_r):
    """hashnet MAP@R over continuous codes: queries without a relevant item in the top R left out."""
    sim = hq.astype(np.float64) @ hd.astype(np.float64).T      # (Q, N) float64
    ld, lq = ld.astype(np.float32), lq.astype(np.float32)
    aps = []
    for i in range(hq.shape[0]):
        part = np.argpartition(-sim[i], top_r - 1)[:top_r]
        idx = part[np.lexsort((part, -sim[i][part]))]
        rel = (ld[idx] @ lq[i]) > 0
        found = rel.sum()
        if found:
            precision = np.cumsum(rel) / np.arange(1, top_r + 1)
            aps.append(float((precision * rel).sum() / found))
    return float(np.mean(aps)) if aps else 0.0


# ----------------------------------------------------------------------------------------------
# One measurement per process
# ----------------------------------------------------------------------------------------------

def memory_status(field):
    """A field of /proc/self/status in bytes: VmRSS (resident now), VmHWM (peak resident)."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def worker(args):
    """Run one measurement on saved inputs; print a JSON line."""
    import torch

    import metrics

    inputs = np.load(args.worker_data)
    hd, ld, hq, lq = (inputs[k] for k in ("hd", "ld", "hq", "lq"))
    cuda = args.device.startswith("cuda")
    if args.impl == "fast":                                     # warm-up: library loads, CUDA context
        metrics.evaluate_retrieval(hd[:50], ld[:50], hq[:5], lq[:5], 2, 10, device=args.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before = memory_status("VmRSS")
    start = time.perf_counter()
    if args.impl == "baseline":
        value = (baseline_map_at_topk(hd, ld, hq, lq, args.topk) if args.metric == "topk"
                 else baseline_map_at_radius(hd, ld, hq, lq, args.radius, args.metric == "radius_full_sort"))
    elif args.metric == "radius":
        value = metrics.map_at_radius(hd, ld, hq, lq, args.radius, "deephash", device=args.device)["map"]
    elif args.metric == "topk":
        value = metrics.map_at_topk(hd, ld, hq, lq, args.topk, False, "hashnet", device=args.device)
    else:
        result = metrics.evaluate_retrieval(hd, ld, hq, lq, radius=args.radius, topk=args.topk,
                                            device=args.device)
        value = [result["map_radius_deephash"], result["map_topk"]]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "map": value,
              "rss_peak": memory_status("VmHWM") - rss_before}
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated() - cuda_before
    print(json.dumps(result))


def run_worker(data_path, impl, metric, args):
    """Best (fastest) of --repeat runs, each in a fresh process; memory figures are the largest."""
    command = [sys.executable, os.path.abspath(__file__), "--worker-data", data_path, "--impl", impl,
               "--metric", metric, "--device", args.device, "--radius", str(args.radius),
               "--topk", str(args.topk)]
    runs = []
    for _ in range(args.repeat):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{impl} {metric} failed:\n{done.stderr}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda run: run["seconds"])
    for key in ("rss_peak", "cuda_peak"):
        if key in best:
            best[key] = max(run[key] for run in runs)
    return best


# ----------------------------------------------------------------------------------------------
# Cases and the table
# ----------------------------------------------------------------------------------------------

def load_case(name, seed):
    """(hd, ld, hq, lq, description) of a case, or None when the demo's codes are missing."""
    if name == "demo":
        paths = [os.path.join(DEMO_DIR, f"{f}.npy") for f in DEMO_FILES]
        if not all(os.path.exists(p) for p in paths):
            return None
        hd, ld, hq, lq = (np.load(p) for p in paths)
        return hd, ld, hq, lq, f"demo (Fashion-MNIST, {ld.shape[1]} classes)"
    if name == "random":
        rng = np.random.default_rng(seed)
        hd, hq = rng.standard_normal((50_000, 48)), rng.standard_normal((2_000, 48))
        ld, lq = (np.eye(21, dtype=np.uint8)[rng.integers(0, 21, n)] for n in (50_000, 2_000))
        return hd, ld, hq, lq, "random (21 classes)"
    n_db, n_q, bits, labels, multi, target = CLUSTERED[name]
    hd, ld, hq, lq, info = clustered_codes(n_db, n_q, bits, labels, multi, target, seed)
    return hd, ld, hq, lq, (f"clustered ({labels} labels, {info['labels_per_item']:.1f} per item, "
                            f"flip p = {info['flip_probability']:.3f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--full", action="store_true",
                        help=f"also run the numpy baselines at >= {LARGE} database items (~8 GB each)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--radius", type=int, default=2)
    parser.add_argument("--topk", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-data", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["fast", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--metric", choices=[*FIGURES, *BASELINES], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker_data:
        return worker(args)

    import torch
    began = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at start, radius {args.radius}, R {args.topk}, best of {args.repeat}")
    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            case = load_case(name, args.seed)
            if case is None:
                print(f"{name}: skipped, no demo codes in {DEMO_DIR} (run `make demo`)")
                continue
            hd, ld, hq, lq, description = case
            ball = mean_ball_size(hd, hq, args.radius)
            shape = f"{hd.shape[0] // 1000}k × {hq.shape[0] / 1000:g}k × {hd.shape[1]}"
            print(f"{name}: {description}, {shape}, mean ball at radius {args.radius}: {ball:.0f} items "
                  f"({100 * ball / hd.shape[0]:.2f}% of the database)", flush=True)
            path = os.path.join(tmp, f"{name}.npz")
            np.savez(path, hd=hd, ld=ld, hq=hq, lq=lq)
            with_baseline = hd.shape[0] < LARGE or args.full
            del hd, ld, hq, lq
            ours = {m: run_worker(path, "fast", m, args) for m in FIGURES}
            numpy = {m: run_worker(path, "baseline", m, args) for m in BASELINES} if with_baseline else {}
            if numpy:                                           # the whole evaluation's two baselines
                numpy["evaluate"], numpy["evaluate_full_sort"] = (
                    {"seconds": radius["seconds"] + numpy["topk"]["seconds"],
                     "map": [radius["map"], numpy["topk"]["map"]],
                     "rss_peak": max(radius["rss_peak"], numpy["topk"]["rss_peak"])}
                    for radius in (numpy["radius"], numpy["radius_full_sort"]))
            for figure in FIGURES:
                against = [numpy.get(figure), numpy.get(f"{figure}_full_sort")]
                for theirs in filter(None, against):
                    worst = max(worst, float(np.max(np.abs(np.subtract(ours[figure]["map"], theirs["map"])))))
                rows.append((name, shape, ball, figure, ours[figure], *against))
                print(f"  {figure:>8}: ours {ours[figure]['seconds']:7.2f} s" + "".join(
                    f", {kind} {theirs['seconds']:7.2f} s ({theirs['seconds'] / ours[figure]['seconds']:.1f}x)"
                    for kind, theirs in zip(("numpy", "full argsort"), against) if theirs), flush=True)
            os.remove(path)
    print(f"\nmax |MAP difference| ours vs baseline: {worst:.2e}; bench took {time.perf_counter() - began:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print_table(rows, args)
    if worst > 1e-9:
        raise SystemExit(f"ours and the baseline disagree by {worst:.2e}")


def print_table(rows, args):
    """The README's table: ours against both numpy baselines (MAP@R has one: argpartition)."""
    gpu = args.device.startswith("cuda")
    ours = "ours (GPU)" if gpu else "ours"
    print(f"| codes | database × queries × bits | mean ball (r = {args.radius}) | figure | {ours} "
          f"| numpy, ball argsort | speed-up | numpy, full argsort (as released) | speed-up "
          f"| peak extra memory: ours / numpy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, ball, figure, ours, ball_sort, full_sort in rows:
        label = FIGURES[figure].format(r=args.radius, R=args.topk)
        memory = ours.get("cuda_peak", ours["rss_peak"]) if gpu else ours["rss_peak"]
        cells = []
        for theirs in (ball_sort, full_sort):
            cells += ([f"{theirs['seconds']:.2f} s", f"{theirs['seconds'] / ours['seconds']:.1f}×"] if theirs
                      else ["-", "-"])
        numpy_memory = f"{ball_sort['rss_peak'] / 2**20:.0f}" if ball_sort else "-"
        print(f"| {name} | {shape} | {ball:.0f} | {label} | {ours['seconds']:.2f} s | {' | '.join(cells)} "
              f"| {memory / 2**20:.0f} / {numpy_memory} MiB |")


if __name__ == "__main__":
    main()
