"""Run the paper's comparison: each method at its own recipe, at every code length and seed, in one table.

    python compare.py --dataset fashion_mnist --methods MMHH DCH HashNet --bits 16 48 --output compare/fm \\
        --num_iters 800 --image_network ResNetFc --backbone ResNet18 --pretrained none ...

Every cell (method x bits x seed) trains with train_mmhh.py in its own folder DIR/cells/<cell>/ and
evaluates at the end. A rerun skips the finished cells and redoes the failed or interrupted ones. Flags
compare.py does not know are passed to every run; `--method_flags DCH="--gamma 10"` adds flags to one
method's runs. The results go to DIR/results.csv, DIR/table.md and DIR/map_vs_bits.png.
"""
import argparse
import csv
import glob
import io
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import plots
from runtime import UsageError, format_duration, run_cli, write_text_atomically

REPO = os.path.dirname(os.path.abspath(__file__))
# Each method's published settings (recipes.py); --method_flags METHOD="--recipe ..." picks another.
METHOD_RECIPES = {"MMHH": "mmhh_release", "DCH": "dch_deephash", "HashNet": "hashnet"}
CSV_COLUMNS = ("method", "bits", "seed", "status", "map_radius_deephash", "map_radius_mmhh",
               "empty_ball_fraction", "map_topk", "distinct_codes", "seconds", "error")
# compare.py sets these for every cell itself.
RESERVED_FLAGS = ("--s_dataset", "--t_dataset", "--hash_bit", "--seed", "--annotation", "--snap_path",
                  "--log_dir", "--runs_dir", "--test_output_dir", "--resume")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="dataset name (its folder under --data_dir)")
    parser.add_argument("--data_dir", default="data", help="folder of the dataset folders (default data)")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_RECIPES), choices=list(METHOD_RECIPES),
                        help="methods to compare (default: all three)")
    parser.add_argument("--bits", nargs="+", type=int, default=[16, 32, 48, 64], help="code lengths")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds; the table averages over them")
    parser.add_argument("--output", required=True, help="folder of the cells, results.csv, table.md and the plot")
    parser.add_argument("--num_iters", type=int, default=None,
                        help="training iterations of every run (default: each recipe's)")
    parser.add_argument("--method_flags", action="append", default=[], metavar='METHOD="FLAGS"',
                        help='extra training flags for one method, e.g. DCH="--gamma 10"; repeatable')
    args, training_flags = parser.parse_known_args(argv)
    args.training_flags = training_flags + (["--num_iters", str(args.num_iters)] if args.num_iters else [])
    args.per_method = parse_method_flags(args.method_flags, args.methods)
    for flag in args.training_flags + [f for flags in args.per_method.values() for f in flags]:
        if flag.split("=")[0] in RESERVED_FLAGS:
            raise UsageError(f"{flag.split('=')[0]} is set by compare.py for each cell; drop it")
    if any(bits <= 0 for bits in args.bits):
        raise UsageError(f"--bits {' '.join(map(str, args.bits))}: code lengths must be positive")
    return args


def parse_method_flags(entries, methods):
    """{method: [flags]} from METHOD="FLAGS" entries."""
    per_method = {method: [] for method in methods}
    for entry in entries:
        method, _, flags = entry.partition("=")
        if method not in METHOD_RECIPES or not _:
            raise UsageError(f'--method_flags {entry!r}: expected METHOD="FLAGS" with METHOD one of '
                             f"{', '.join(METHOD_RECIPES)}")
        if method in per_method:
            per_method[method] += shlex.split(flags)
    return per_method


def main(argv=None):
    args = parse_args(argv)
    cells = [(method, bits, seed) for method in args.methods for bits in args.bits for seed in args.seeds]
    results, started, timed = [], time.perf_counter(), []
    for number, cell in enumerate(cells, start=1):
        result = read_result(cell_folder(args, *cell))
        if result and result["status"] == "ok":
            print(f"[{number}/{len(cells)}] {cell_name(*cell)}: done before, skipped", flush=True)
        else:
            result = run_cell(args, *cell, redo=result is not None or os.path.isdir(cell_folder(args, *cell)))
            timed.append(result["seconds"])
            print(progress_line(number, cells, cell, result, started, timed), flush=True)
        results.append(result)
        if result["status"] == "interrupted":
            write_outputs(args, results)
            print(f"interrupted; rerun the same command to continue from {cell_name(*cell)}", file=sys.stderr)
            return 130
    write_outputs(args, results)
    failed = [r for r in results if r["status"] != "ok"]
    print(f"wrote {os.path.join(args.output, 'results.csv')}, table.md and map_vs_bits.png; "
          f"{len(results) - len(failed)} of {len(results)} cells finished"
          + (f", {len(failed)} failed (their rows carry the error)" if failed else ""))
    return 1 if failed else 0


def cell_name(method, bits, seed):
    return f"{method}_{bits}bit_seed{seed}"


def cell_folder(args, method, bits, seed):
    return os.path.join(args.output, "cells", cell_name(method, bits, seed))


def read_result(folder):
    """The cell's result.json, or None when it has none (never run, or stopped before writing it)."""
    try:
        with open(os.path.join(folder, "result.json"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def run_cell(args, method, bits, seed, redo):
    """Train and evaluate one cell in its own folder; its result.json records how it ended."""
    folder = cell_folder(args, method, bits, seed)
    if redo:
        print(f"redoing {cell_name(method, bits, seed)} (failed or interrupted before)", flush=True)
        shutil.rmtree(folder)
    os.makedirs(folder)
    command = cell_command(args, method, bits, seed, folder)
    start = time.perf_counter()
    with open(os.path.join(folder, "train.log"), "w", encoding="utf-8") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        returncode, stderr, signalled = run_forwarding_signals(command, log)
        log.write(stderr)
    result = {"method": method, "bits": bits, "seed": seed, "seconds": round(time.perf_counter() - start, 1),
              "recipe": method_recipe(args, method), "command": shlex.join(command)}
    if returncode == 0:
        result.update(status="ok", **cell_metrics(folder))
    else:
        # A training stopped by the signal exits 128 + its number, or dies of it (-number) when it
        # arrives before the training's handler is installed; either way compare.py stops too.
        interrupted = signalled or returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM,
                                                  -signal.SIGINT, -signal.SIGTERM)
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        result.update(status="interrupted" if interrupted else "failed",
                      error=lines[-1] if lines else f"exit status {returncode}")
    write_text_atomically(os.path.join(folder, "result.json"), json.dumps(result, indent=1))
    return result


def run_forwarding_signals(command, log):
    """Run a training; SIGINT / SIGTERM sent to compare.py reach it, so it snapshots and stops cleanly.

    Returns its exit status, its stderr and whether compare.py received one of the signals.
    """
    received = []
    with subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.PIPE, text=True) as child:
        def forward(signum, frame):
            received.append(signum)
            child.send_signal(signum)

        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            _, stderr = child.communicate()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return child.returncode, stderr, bool(received)


def method_recipe(args, method):
    """The recipe a method's cells train with: its own, or the last --recipe of its --method_flags."""
    flags = args.per_method[method]
    given = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--recipe"]
    given += [flag.split("=", 1)[1] for flag in flags if flag.startswith("--recipe=")]
    return given[-1] if given else METHOD_RECIPES[method]


def cell_command(args, method, bits, seed, folder):
    """The train_mmhh.py command of one cell: the method's recipe, the shared flags, the method's own."""
    name = cell_name(method, bits, seed)
    return [sys.executable, os.path.join(REPO, "train_mmhh.py"), "--s_dataset", args.dataset,
            "--data_dir", os.path.abspath(args.data_dir), "--recipe", METHOD_RECIPES[method],
            "--hash_bit", str(bits), "--seed", str(seed), "--annotation", name,
            "--snap_path", os.path.join(os.path.abspath(folder), "snapshot", ""),
            "--log_dir", os.path.join(os.path.abspath(folder), "log"),
            "--runs_dir", os.path.join(os.path.abspath(folder), "runs"),
            "--test_output_dir", os.path.join(os.path.abspath(folder), "test_output"),
            *args.training_flags, *args.per_method[method]]


def cell_metrics(folder):
    """The figures of the cell's final evaluation (its metrics.json)."""
    found = glob.glob(os.path.join(folder, "test_output", "*", "metrics.json"))
    with open(found[0], encoding="utf-8") as handle:
        metrics = json.load(handle)
    return {key: metrics[key] for key in CSV_COLUMNS if key in metrics}


def progress_line(number, cells, cell, result, started, timed):
    elapsed = time.perf_counter() - started
    remaining = statistics.mean(timed) * (len(cells) - number)
    outcome = (f"MAP@H<=2 {result['map_radius_deephash']:.4f} (deephash)" if result["status"] == "ok"
               else f"{result['status']}: {result.get('error', '')}")
    return (f"[{number}/{len(cells)}] {cell_name(*cell)}: {outcome} in {format_duration(result['seconds'])}; "
            f"elapsed {format_duration(elapsed)}, about {format_duration(remaining)} left")


def write_outputs(args, results):
    """results.csv (a row a cell), table.md (mean ± std over seeds) and map_vs_bits.png."""
    os.makedirs(args.output, exist_ok=True)
    write_text_atomically(os.path.join(args.output, "results.csv"), results_csv(results))
    write_text_atomically(os.path.join(args.output, "table.md"), results_table(results, args, args.bits))
    series = {method: [(bits, *mean_std(results, method, bits, "map_radius_deephash")) for bits in args.bits
                       if mean_std(results, method, bits, "map_radius_deephash")] for method in args.methods}
    plots.save_map_vs_bits(series, args.output)


def results_csv(results):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    return buffer.getvalue()


def mean_std(results, method, bits, key):
    """(mean, std) of ``key`` over the finished seeds of a method and code length; () when none finished."""
    values = [r[key] for r in results if (r["method"], r["bits"], r["status"]) == (method, bits, "ok")]
    if not values:
        return ()
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def results_table(results, args, bits_list):
    """Markdown tables of MAP@H<=2 in both conventions, and the empty-ball fraction; best MAP in bold."""
    methods, sections = args.methods, []
    for key, title, best_is_max in (
            ("map_radius_deephash", "MAP@H<=2, deephash convention (empty balls count 0)", True),
            ("map_radius_mmhh", "MAP@H<=2, mmhh convention (empty balls left out)", True),
            ("empty_ball_fraction", "fraction of queries whose ball is empty", None)):
        rows = ["| method | " + " | ".join(f"{bits} bits" for bits in bits_list) + " |",
                "|---" * (len(bits_list) + 1) + "|"]
        best = {bits: max((mean_std(results, m, bits, key) or (-1.0,))[0] for m in methods) for bits in bits_list}
        for method in methods:
            cells = []
            for bits in bits_list:
                stats = mean_std(results, method, bits, key)
                text = "failed" if not stats else f"{stats[0]:.4f}" + (f" ± {stats[1]:.4f}" if stats[1] else "")
                cells.append(f"**{text}**" if stats and best_is_max and stats[0] == best[bits] else text)
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
        sections.append(f"### {title}\n\n" + "\n".join(rows) + "\n")
    seeds = sorted({r["seed"] for r in results})
    shared = (f" Flags of every run, which win over the recipes: `{shlex.join(args.training_flags)}`."
              if args.training_flags else "")
    return (f"Mean ± std over seeds {', '.join(map(str, seeds))}; each method at its recipe "
            f"({', '.join(f'{m}: {method_recipe(args, m)}' for m in methods)}).{shared}\n\n" + "\n".join(sections))


if __name__ == "__main__":
    sys.exit(run_cli(main))
