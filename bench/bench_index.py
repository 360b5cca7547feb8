"""Time the Hamming-ball index (hamming_index.HammingIndex) against a brute-force scan, on 1,000,000
database codes of 64 bits and 1,000 queries, at radius 2.

Codes (bench/clustered_codes.py: class centres and per-bit flip noise solved for a target ball size,
as a trained network's codes cluster by class):

* ``c1000``: 1,000 single-label classes, an ImageNet-sized label set: the ball holds 0.05% of the
  database (about 500 items);
* ``c81``: 81 labels, multi-label with a Zipf-like popularity (NUS-WIDE's), the ball 3% of the
  database (30,000 items), as in bench/bench_metrics.py's 64-bit cases;
* ``random``: random codes, whose balls are nearly empty.

Measured in one process on the same codes, on one thread (the scan, numpy, runs on one):

* build: packing the sign codes (both need it) and building the table; the table's bytes against the
  packed codes' (8 bytes a code);
* lookup: the members (query, item, distance) of every ball: ``HammingIndex.ball`` against a scan of
  the packed codes per query (XOR, numpy.bitwise_count, flatnonzero);
* top 10: ``HammingIndex.search`` (the ball ranked by h_q . h_x in float64, ties by index, first
  10) against the same ranking of the scan's members.

Both give the same members and answers (checked; the index scores a ball by one BLAS product for 32
queries, the scan member by member, so a score may differ in the last place). The queries go in
blocks of 100 that alternate between index and scan, so that a change in the machine's load reaches
both; each figure is the best of ``--repeat`` passes. The load average at the start and end says how
busy the machine was.

    python bench/bench_index.py                  # every case, ~2 minutes on 2 cores
    python bench/bench_index.py --cases c1000
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clustered_codes import clustered_codes  # noqa: E402  (after the path set-up)
from hamming_index import CodeTable, HammingIndex, pack_signs  # noqa: E402

# name: (labels, multi-label, target ball fraction at radius 2)
CLUSTERED = {"c1000": (1000, False, 0.0005), "c81": (81, True, 0.03)}
CASES = (*CLUSTERED, "random")
BLOCK = 100             # queries timed at a time, alternating between index and scan


class ScanIndex(HammingIndex):
    """The baseline: HammingIndex's answers, with every ball found by scanning the packed codes."""

    def __init__(self, codes):
        super().__init__(codes)
        self.table = None                                                       # every ball by ``ball``
        self.keys = pack_signs(self.codes).numpy().view(np.uint64)             # (N,)

    def ball(self, query_codes, radius):
        parts = []
        for q, key in enumerate(pack_signs(query_codes).numpy().view(np.uint64)):
            dist = np.bitwise_count(self.keys ^ key)                           # (N,) Hamming distances
            item = np.flatnonzero(dist <= radius)
            parts.append((np.full(item.size, q), item, dist[item]))
        return tuple(torch.from_numpy(np.concatenate(column).astype(np.int64)) for column in zip(*parts))


def load_case(name, n_database, n_queries, seed):
    """(database codes, query codes, description)."""
    if name == "random":
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((n_database, 64), dtype=np.float32),
                rng.standard_normal((n_queries, 64), dtype=np.float32), "random")
    labels, multi, target = CLUSTERED[name]
    hd, _, hq, _, info = clustered_codes(n_database, n_queries, 64, labels, multi, target, seed)
    return hd, hq, (f"{labels} labels{', multi-label' if multi else ''}, flip p = {info['flip_probability']:.4f}")


def measure(name, args):
    hd, hq, description = load_case(name, args.database, args.queries, args.seed)
    hd, hq = torch.from_numpy(hd), torch.from_numpy(hq)
    start = time.perf_counter()
    keys = pack_signs(hd)
    packed = time.perf_counter() - start
    table = CodeTable(keys, 64)
    built = time.perf_counter() - start - packed
    index, scan = HammingIndex(hd), ScanIndex(hd)
    print(f"{name}: {description}; {len(hd)} x {len(hq)} x 64 bits; table rows: "
          f"{'items' if table.offsets is None else 'distinct codes'}, prefix bits {table.prefix_bits}", flush=True)
    best = {}
    for repeat in range(args.repeat):
        seconds = {key: 0.0 for key in ("lookup index", "lookup scan", "top index", "top scan")}
        members = 0
        for first in range(0, len(hq), BLOCK):
            block = hq[first:first + BLOCK]
            found = {}
            for key, method in (("lookup index", index.ball), ("lookup scan", scan.ball)):
                began = time.perf_counter()
                found[key] = method(block, args.radius)
                seconds[key] += time.perf_counter() - began
            ours, theirs = (sorted(zip(*[column.tolist() for column in found[key]])) for key in found)
            assert ours == theirs, f"{name}: the index and the scan disagree on queries {first}.."
            members += len(ours)
            answers = {}
            for key, source in (("top index", index), ("top scan", scan)):
                began = time.perf_counter()
                answers[key] = source.search(block, args.radius, args.topk)
                seconds[key] += time.perf_counter() - began
            for a, b in zip(*answers.values()):
                # Scores from different BLAS calls may differ in the last place (README, "Retrieval metrics").
                assert torch.equal(a.index, b.index) and torch.allclose(a.score, b.score, rtol=1e-13, atol=0), \
                    f"{name}: answers differ"
        best = {key: min(value, best.get(key, value)) for key, value in seconds.items()}
        print(f"  pass {repeat + 1}: " + ", ".join(f"{key} {value / len(hq) * 1e6:.0f} us" for key, value in
                                                   seconds.items()), flush=True)
    return {"name": name, "shape": f"{len(hd) // 1000}k × {len(hq)} × 64",
            "distinct": int(torch.unique(keys).numel()),
            "ball": members / len(hq), "packed": packed, "built": built, "table_bytes": table.nbytes,
            "packed_bytes": 8 * len(hd), "per_query": {key: value / len(hq) for key, value in best.items()}}


def print_table(rows, args):
    print(f"| codes | database × queries × bits | distinct codes | mean ball (r = {args.radius}) "
          f"| pack + table build | table / packed codes | lookup: index | lookup: scan | speed-up "
          f"| top {args.topk}: index | top {args.topk}: scan | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        t = row["per_query"]
        print(f"| {row['name']} | {row['shape']} | {row['distinct']:,} | {row['ball']:,.0f} "
              f"| {row['packed']:.2f} + {row['built']:.2f} s "
              f"| {row['table_bytes'] / 2**20:.1f} / {row['packed_bytes'] / 2**20:.1f} MiB "
              f"({row['table_bytes'] / row['packed_bytes']:.2f}×) "
              f"| {t['lookup index'] * 1e6:.0f} µs | {t['lookup scan'] * 1e6:.0f} µs "
              f"| {t['lookup scan'] / t['lookup index']:.1f}× "
              f"| {t['top index'] * 1e6:.0f} µs | {t['top scan'] * 1e6:.0f} µs "
              f"| {t['top scan'] / t['top index']:.1f}× |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--database", type=int, default=1_000_000, help="database codes (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=1000, help="query codes (default 1,000)")
    parser.add_argument("--radius", type=int, default=2)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the queries; the fastest is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    print(f"load average {os.getloadavg()[0]:.2f} at start; one thread; radius {args.radius}, top {args.topk}, "
          f"best of {args.repeat}", flush=True)
    rows = [measure(name, args) for name in args.cases]
    print(f"\nbench took {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at the end\n")
    print_table(rows, args)


if __name__ == "__main__":
    main()
