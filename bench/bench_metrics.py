"""Time metrics.map_at_radius / map_at_topk against a plain-numpy baseline on the same codes.

The baseline is written the way the fastest original anchor does it: one Q x N float64 inner-product
matrix, a full (stable) argsort per query to rank the Hamming ball, argpartition + sort for the top R,
a Python loop over queries. Codes are class-clustered (tanh of noisy +-1 class centres, some labels
flipped) so that balls are mostly non-empty and precision is below 1.

Each (case, implementation, metric) runs in its own subprocess so that peak memory can be measured:
``peak RSS`` is the rise of the process's peak resident set (ru_maxrss) over its resident set after
loading the inputs -- it covers torch and numpy alike but counts pages, not allocations;
``tracemalloc`` is the Python-visible allocation peak (numpy reports its buffers there, torch does not,
so it is given for the baseline only); on CUDA ``cuda peak`` is torch.cuda.max_memory_allocated over
the allocation before the call (inputs are passed as CPU arrays, so their device copies count).

    python bench/bench_metrics.py                       # 50k x 2k x 48 bits
    python bench/bench_metrics.py --sizes full          # + 16/64 bits and 200k x 5k x 64 (fast only)
    python bench/bench_metrics.py --sizes full --full   # + the baseline at 200k x 5k (~14 GB, ~1 min)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
    "small": [(50_000, 2_000, 48)],
    "full": [(50_000, 2_000, 16), (50_000, 2_000, 48), (50_000, 2_000, 64), (200_000, 5_000, 64)],
}
LARGE = 100_000         # database size from which the baseline is opt-in (--full)


def make_data(n_db, n_q, bits, n_classes, seed=0, noise=0.6, label_noise=0.1):
    """Class-clustered continuous codes and one-hot labels, some labels replaced at random."""
    rng = np.random.default_rng(seed)
    centres = rng.choice([-1.0, 1.0], (n_classes, bits))

    def draw(n):
        cls = rng.integers(0, n_classes, n)
        codes = np.tanh(2.0 * (centres[cls] + noise * rng.standard_normal((n, bits))))
        flip = rng.random(n) < label_noise
        cls[flip] = rng.integers(0, n_classes, int(flip.sum()))
        return codes, np.eye(n_classes, dtype=np.uint8)[cls]

    hd, ld = draw(n_db)
    hq, lq = draw(n_q)
    return hd, ld, hq, lq


def baseline_map_at_radius(hd, ld, hq, lq, radius):
    """deephash MAP@H<=radius: empty ball = AP 0, ball without relevant item left out."""
    bits = hd.shape[1]
    sim = hq @ hd.T                                             # (Q, N) float64
    bd = np.where(hd >= 0, 1.0, -1.0)
    bq = np.where(hq >= 0, 1.0, -1.0)
    ld, lq = ld.astype(np.float32), lq.astype(np.float32)
    aps = []
    for i in range(hq.shape[0]):
        order = np.argsort(-sim[i], kind="stable")
        hamming = (bits - (bd @ bq[i])[order]) / 2
        ball = order[hamming <= radius]
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
    sim = hq @ hd.T                                             # (Q, N) float64
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


def current_rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args):
    """Run one measurement on saved inputs; print a JSON line."""
    import torch

    import metrics

    inputs = np.load(args.worker_data)
    hd, ld, hq, lq = (inputs[k] for k in ("hd", "ld", "hq", "lq"))
    cuda = args.device.startswith("cuda")
    if args.impl == "fast":                                     # warm-up: library loads, CUDA context
        metrics.map_at_radius(hd[:50], ld[:50], hq[:5], lq[:5], device=args.device)
        metrics.map_at_topk(hd[:50], ld[:50], hq[:5], lq[:5], 10, device=args.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before = current_rss()
    traced = args.impl == "baseline"
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    if args.impl == "baseline":
        value = (baseline_map_at_radius(hd, ld, hq, lq, args.radius) if args.metric == "radius"
                 else baseline_map_at_topk(hd, ld, hq, lq, args.topk))
    elif args.metric == "radius":
        value = metrics.map_at_radius(hd, ld, hq, lq, args.radius, "deephash", device=args.device)["map"]
    else:
        value = metrics.map_at_topk(hd, ld, hq, lq, args.topk, False, "hashnet", device=args.device)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "map": value,
              "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before}
    if traced:
        result["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated() - cuda_before
    if args.metric == "radius" and args.impl == "fast":
        result["empty"] = metrics.map_at_radius(hd, ld, hq, lq, args.radius, device=args.device)["empty_fraction"]
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
    for key in ("rss_peak", "tracemalloc_peak", "cuda_peak"):
        if key in best:
            best[key] = max(run[key] for run in runs)
    return best


def mib(value):
    return f"{value / 2**20:8.0f}" if value is not None else "       -"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", choices=sorted(SIZES), default="small")
    parser.add_argument("--full", action="store_true",
                        help=f"also run the numpy baseline at >= {LARGE} database items (~14 GB, ~1 min)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--radius", type=int, default=2)
    parser.add_argument("--topk", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept")
    parser.add_argument("--worker-data", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["fast", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--metric", choices=["radius", "topk"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker_data:
        return worker(args)

    import torch
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, radius {args.radius}, "
          f"top R {args.topk}, {args.classes} classes, best of {args.repeat}; MAP: deephash (radius), "
          f"hashnet (top R); memory in MiB (see the module docstring)")
    header = (f"{'N':>7} {'Q':>5} {'K':>3} {'metric':>7} {'empty':>6} {'base s':>7} {'fast s':>7} "
              f"{'speed-up':>8} {'|dMAP|':>8} {'base RSS':>8} {'base trc':>8} {'fast RSS':>8} {'fast GPU':>8}")
    print(header)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for n_db, n_q, bits in SIZES[args.sizes]:
            path = os.path.join(tmp, f"case_{n_db}_{n_q}_{bits}.npz")
            hd, ld, hq, lq = make_data(n_db, n_q, bits, args.classes)
            np.savez(path, hd=hd, ld=ld, hq=hq, lq=lq)
            del hd, ld, hq, lq
            for metric in ("radius", "topk"):
                fast = run_worker(path, "fast", metric, args)
                base = (run_worker(path, "baseline", metric, args)
                        if n_db < LARGE or args.full else None)
                diff = abs(fast["map"] - base["map"]) if base else None
                worst = max(worst, diff or 0.0)
                print(f"{n_db:>7} {n_q:>5} {bits:>3} {metric:>7} "
                      f"{fast.get('empty', float('nan')) if metric == 'radius' else float('nan'):>6.3f} "
                      f"{base['seconds'] if base else float('nan'):>7.2f} {fast['seconds']:>7.2f} "
                      f"{base['seconds'] / fast['seconds'] if base else float('nan'):>8.1f} "
                      f"{diff if diff is not None else float('nan'):>8.1e} "
                      f"{mib(base['rss_peak'] if base else None)} {mib(base.get('tracemalloc_peak') if base else None)} "
                      f"{mib(fast['rss_peak'])} {mib(fast.get('cuda_peak'))}", flush=True)
            os.remove(path)
    print(f"max |MAP difference| fast vs baseline: {worst:.2e}")


if __name__ == "__main__":
    main()
