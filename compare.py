"""Run the paper's comparison: each method at its own recipe, at every code length and seed, in one table.

    python compare.py --dataset fashion_mnist --methods MMHH DCH HashNet --bits 16 48 --output compare/fm \\
        --num_iters 800 --image_network ResNetFc --backbone ResNet18 --pretrained none ...

Every cell (method x bits x seed) trains with train_mmhh.py in its own folder DIR/cells/<cell>/ and
evaluates at the end; its result.json records the flags it ran with. A rerun skips the finished cells,
resumes an interrupted one from its last snapshot, redoes the failed ones, and stops before training
anything when a finished cell ran with other flags than the command's (--redo_changed redoes those).
Flags compare.py does not know are passed to every run; `--method_flags DCH="--gamma 10"` adds flags to
one method's runs. The results go to DIR/results.csv, DIR/table.md and DIR/map_vs_bits.png, rewritten
after every cell.
"""
import argparse
import csv
import difflib
import glob
import io
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import plots
from result_tables import can_win, cell_summary, cell_text
from runtime import ForwardedSignals, UsageError, format_duration, run_cli, write_text_atomically

REPO = os.path.dirname(os.path.abspath(__file__))
# Each method's published settings (recipes.py); --method_flags METHOD="--recipe ..." picks another.
METHOD_RECIPES = {"MMHH": "mmhh_release", "MMHH_paper": "mmhh_release", "DCH": "dch_deephash",
                  "HashNet": "hashnet"}
# A method that is a recipe plus flags: MMHH_paper is the release's recipe with the paper-form loss.
METHOD_BASE_FLAGS = {"MMHH_paper": ["--distance_type", "MMHH_paper"]}
DEFAULT_METHODS = ["MMHH", "DCH", "HashNet"]
CSV_COLUMNS = ("method", "bits", "seed", "status", "collapsed", "radius", "map_radius_deephash",
               "map_radius_mmhh", "empty_ball_fraction", "map_topk", "distinct_codes", "seconds", "flags",
               "error")
NOT_RUN = "not run"
# compare.py sets these for every cell itself.
RESERVED_FLAGS = ("--s_dataset", "--t_dataset", "--hash_bit", "--seed", "--annotation", "--snap_path",
                  "--log_dir", "--runs_dir", "--test_output_dir", "--resume")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="dataset name (its folder under --data_dir)")
    parser.add_argument("--data_dir", default="data", help="folder of the dataset folders (default data)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHOD_RECIPES),
                        help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--bits", nargs="+", type=int, default=[16, 32, 48, 64], help="code lengths")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds; the table averages over them")
    parser.add_argument("--output", required=True, help="folder of the cells, results.csv, table.md and the plot")
    parser.add_argument("--num_iters", type=int, default=None,
                        help="training iterations of every run (default: each recipe's)")
    parser.add_argument("--method_flags", action="append", default=[], metavar='METHOD="FLAGS"',
                        help='extra training flags for one method, e.g. DCH="--gamma 10"; repeatable')
    parser.add_argument("--redo_changed", action="store_true",
                        help="redo finished cells that ran with other flags than this command's (without it, "
                             "compare.py stops and names the difference)")
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
    earlier = {cell: read_result(cell_folder(args, *cell)) for cell in cells}
    changed = {cell: flags_difference(result.get("flags"), cell_flags(args, cell[0]))
               for cell, result in earlier.items() if result and result["status"] == "ok"}
    changed = {cell: difference for cell, difference in changed.items() if difference}
    if changed and not args.redo_changed:
        cell, difference = next(iter(changed.items()))
        raise UsageError(f"{cell_name(*cell)} (and {len(changed) - 1} more) finished with other flags than "
                         f"this command's ({difference}); pass --redo_changed to redo "
                         f"{'it' if len(changed) == 1 else 'them'}, or choose another --output")
    results = {cell: pending_result(*cell) for cell in cells}
    started, timed = time.perf_counter(), []
    for number, cell in enumerate(cells, start=1):
        result = earlier[cell]
        if result and result["status"] == "ok" and cell not in changed:
            print(f"[{number}/{len(cells)}] {cell_name(*cell)}: done before, skipped", flush=True)
        else:
            snapshot = None if cell in changed or (result or {}).get("status") == "failed" else \
                latest_snapshot(cell_folder(args, *cell))
            reason = (f"its flags changed ({changed[cell]})" if cell in changed else
                      f"it was {result['status']} before" if result else
                      "it stopped before writing its result" if os.path.isdir(cell_folder(args, *cell)) else None)
            result = run_cell(args, *cell, redo_reason=reason, resume_from=snapshot, earlier=result)
            timed.append(result["seconds"])
            print(progress_line(number, cells, cell, result, started, timed), flush=True)
        results[cell] = result
        write_outputs(args, list(results.values()))
        if result["status"] == "interrupted":
            print(f"interrupted; rerun the same command to continue from {cell_name(*cell)}", file=sys.stderr)
            return 130
    failed = [r for r in results.values() if r["status"] != "ok"]
    print(f"wrote {os.path.join(args.output, 'results.csv')}, table.md and map_vs_bits.png; "
          f"{len(results) - len(failed)} of {len(results)} cells finished"
          + (f", {len(failed)} failed (their rows carry the error)" if failed else ""))
    return 1 if failed else 0


def pending_result(method, bits, seed):
    return {"method": method, "bits": bits, "seed": seed, "status": NOT_RUN}


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


def latest_snapshot(folder):
    """The last snapshot an interrupted cell wrote, or None (train_mmhh.py names them ..._iter_<NNNNN>)."""
    found = glob.glob(os.path.join(glob.escape(folder), "snapshot", "*_iter_[0-9][0-9][0-9][0-9][0-9]"))
    return max(found, key=lambda path: int(path.rsplit("_", 1)[1])) if found else None


def run_cell(args, method, bits, seed, redo_reason=None, resume_from=None, earlier=None):
    """Train and evaluate one cell in its own folder; its result.json records how it ended and its flags.

    An interrupted cell with a snapshot resumes from it (``resume_from``); any other redo starts over.
    """
    folder = cell_folder(args, method, bits, seed)
    if resume_from:
        print(f"resuming {cell_name(method, bits, seed)} from {os.path.basename(resume_from)}: {redo_reason}",
              flush=True)
    elif redo_reason:
        print(f"redoing {cell_name(method, bits, seed)}: {redo_reason}", flush=True)
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=bool(resume_from))
    command = cell_command(args, method, bits, seed, folder) + (["--resume", resume_from] if resume_from else [])
    start = time.perf_counter()
    returncode, stderr, signalled = run_forwarding_signals(command, os.path.join(folder, "train.log"),
                                                           append=bool(resume_from))
    # A resumed cell's time includes the time its interrupted part took.
    seconds = time.perf_counter() - start + (earlier or {}).get("seconds", 0.0) * bool(resume_from)
    result = {"method": method, "bits": bits, "seed": seed, "seconds": round(seconds, 1),
              "recipe": method_recipe(args, method), "flags": cell_flags(args, method),
              "command": shlex.join(command), "cpu": cpu_name()}
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


def cpu_name():
    """The processor's model name: the last digits of a cell depend on it, and a table's cells may come from
    several machines (README, "The paper's claims")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def run_forwarding_signals(command, log_path, append=False):
    """Run a training, its command line, output and errors into `log_path`; SIGINT / SIGTERM sent to
    compare.py reach it, so it snapshots and stops cleanly.

    Returns its exit status, its stderr and whether compare.py received one of the signals.
    """
    # The forwarding starts before the log appears and the training starts: no signal after that is lost.
    with ForwardedSignals() as signals:
        with open(log_path, "a" if append else "w", encoding="utf-8") as log:
            log.write(shlex.join(command) + "\n")
            log.flush()
            with signals.start(command, cwd=REPO, stdout=log, stderr=subprocess.PIPE, text=True) as child:
                _, stderr = child.communicate()
            log.write(stderr)
    return child.returncode, stderr, signals.requested()


def method_recipe(args, method):
    """The recipe a method's cells train with: its own, or the last --recipe of its --method_flags."""
    flags = args.per_method[method]
    given = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--recipe"]
    given += [flag.split("=", 1)[1] for flag in flags if flag.startswith("--recipe=")]
    return given[-1] if given else METHOD_RECIPES[method]


def method_flags(args, method):
    """The flags one method's cells add to the shared ones: its base flags and its --method_flags."""
    return METHOD_BASE_FLAGS.get(method, []) + args.per_method[method]


def cell_flags(args, method):
    """What a cell's training depends on besides its code length and seed: data, recipe and flags."""
    return ["--s_dataset", args.dataset, "--data_dir", repo_path(args.data_dir),
            "--recipe", METHOD_RECIPES[method], *args.training_flags, *method_flags(args, method)]


def repo_path(path):
    """`path` relative to the checkout when it lies inside it (cells run there), so that the flags a cell
    records hold in any clone that has committed its results; absolute otherwise."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, REPO)
    return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def flags_difference(recorded, current):
    """'' when a finished cell's recorded flags are the current ones, else the difference in words."""
    if recorded is None:
        return "it recorded no flags"
    # Cells recorded before --data_dir was kept relative to the checkout name it in full.
    recorded = [repo_path(flag) if previous == "--data_dir" else flag
                for previous, flag in zip([None, *recorded], recorded)]
    if recorded == current:
        return ""
    removed, added = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=recorded, b=current, autojunk=False).get_opcodes():
        if tag != "equal":
            removed += recorded[i1:i2]
            added += current[j1:j2]
    return "; ".join(part for part in (f"then: {shlex.join(removed)}" if removed else "",
                                       f"now: {shlex.join(added)}" if added else "") if part)


def cell_command(args, method, bits, seed, folder):
    """The train_mmhh.py command of one cell: the method's recipe, the shared flags, the method's own."""
    name = cell_name(method, bits, seed)
    return [sys.executable, os.path.join(REPO, "train_mmhh.py"),
            "--hash_bit", str(bits), "--seed", str(seed), "--annotation", name,
            "--snap_path", os.path.join(os.path.abspath(folder), "snapshot", ""),
            "--log_dir", os.path.join(os.path.abspath(folder), "log"),
            "--runs_dir", os.path.join(os.path.abspath(folder), "runs"),
            "--test_output_dir", os.path.join(os.path.abspath(folder), "test_output"),
            # Snapshots are written atomically, so the newest alone resumes a cell; a full claims run
            # keeps one per cell instead of two (README, "The paper's claims"). A --keep_snapshots among
            # the training flags comes later and wins.
            "--keep_snapshots", "1", *cell_flags(args, method)]


def cell_metrics(folder):
    """The figures of the cell's final evaluation (its metrics.json)."""
    found = glob.glob(os.path.join(folder, "test_output", "*", "metrics.json"))
    with open(found[0], encoding="utf-8") as handle:
        metrics = json.load(handle)
    return {key: metrics[key] for key in CSV_COLUMNS if key in metrics}


def progress_line(number, cells, cell, result, started, timed):
    elapsed = time.perf_counter() - started
    remaining = statistics.mean(timed) * (len(cells) - number)
    outcome = (f"MAP@H<={result['radius']} {result['map_radius_deephash']:.4f} (deephash)"
               + (", collapsed" if result.get("collapsed") else "") if result["status"] == "ok"
               else f"{result['status']}: {result.get('error', '')}")
    return (f"[{number}/{len(cells)}] {cell_name(*cell)}: {outcome} in {format_duration(result['seconds'])}; "
            f"elapsed {format_duration(elapsed)}, about {format_duration(remaining)} left")


def write_outputs(args, results):
    """results.csv (a row a cell, run or not), table.md and map_vs_bits.png, of the cells finished so far."""
    os.makedirs(args.output, exist_ok=True)
    write_text_atomically(os.path.join(args.output, "results.csv"), results_csv(results))
    write_text_atomically(os.path.join(args.output, "table.md"), results_table(results, args))
    series = {method: [] for method in args.methods}
    for method in args.methods:
        for bits in args.bits:
            summary = cell_summary(results, method, bits, "map_radius_deephash")
            if summary["mean_std"]:
                mean, std = summary["mean_std"]
                series[method].append((bits, mean, std or 0.0))
    plots.save_map_vs_bits(series, args.output, ylabel=f"MAP@H<={table_radius(results, args)} (deephash)")


def results_csv(results):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "flags": shlex.join(r["flags"])} if "flags" in r else r for r in results)
    return buffer.getvalue()


def table_radius(results, args):
    """The radius the cells were scored at: what they recorded, else the last --radius given, else 2."""
    recorded = sorted({r["radius"] for r in results if r["status"] == "ok" and "radius" in r})
    if recorded:
        return "/".join(map(str, recorded))
    given = [flag.split("=")[-1] if "=" in flag else args.training_flags[i + 1]
             for i, flag in enumerate(args.training_flags) if flag.split("=")[0] == "--radius"]
    return given[-1] if given else "2"


def results_table(results, args):
    """Markdown tables of MAP@H<=r in both conventions and the empty-ball fraction, with what produced them."""
    radius, sections = table_radius(results, args), []
    for key, title, best_is_max in (
            ("map_radius_deephash", f"MAP@H<={radius}, deephash convention (empty balls count 0)", True),
            ("map_radius_mmhh", f"MAP@H<={radius}, mmhh convention (empty balls left out)", True),
            ("empty_ball_fraction", f"fraction of queries whose ball (radius {radius}) is empty", False)):
        summaries = {(m, bits): cell_summary(results, m, bits, key) for m in args.methods for bits in args.bits}
        rows = ["| method | " + " | ".join(f"{bits} bits" for bits in args.bits) + " |",
                "|---" * (len(args.bits) + 1) + "|"]
        for method in args.methods:
            cells = []
            for bits in args.bits:
                summary, text = summaries[method, bits], cell_text(summaries[method, bits])
                rivals = [s["mean_std"][0] for (m, b), s in summaries.items() if b == bits and can_win(s)]
                best = best_is_max and can_win(summary) and summary["mean_std"][0] == max(rivals)
                cells.append(f"**{text}**" if best else text)
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
        sections.append(f"### {title}\n\n" + "\n".join(rows) + "\n")
    return table_preamble(results, args, radius) + "\n".join(sections)


def table_preamble(results, args, radius):
    """What the tables are: status, seeds, statistics, and every flag each method's cells ran with."""
    finished = sum(r["status"] == "ok" for r in results)
    status = ("" if finished == len(results) else
              f"**INCOMPLETE: {finished} of {len(results)} cells finished** (rerun the same command to go on).\n\n")
    method_lines = "".join(
        f"- {m}: recipe `{method_recipe(args, m)}`, its own flags "
        + (f"`{shlex.join(method_flags(args, m))}`" if method_flags(args, m) else "none") + "\n"
        for m in args.methods)
    shared = f"`{shlex.join(args.training_flags)}`" if args.training_flags else "none"
    return (f"{status}Dataset `{args.dataset}`, seeds {', '.join(map(str, args.seeds))}, Hamming radius {radius}. "
            "Each cell: mean ± sample standard deviation over its finished seeds, and n, the number of "
            "them. Bold: the best complete cell of a column with no collapsed seed (fewer distinct database "
            "codes than labels, or every bit constant); an incomplete or collapsed cell is never bold.\n\n"
            f"Flags of every cell, which win over the recipes: {shared}.\n\nEach method:\n{method_lines}\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
