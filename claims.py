"""Test the paper's claims on Fashion-MNIST: five protocols, each method tuned on validation, three seeds.

    python claims.py data        # build the protocols' datasets and their validation copies
    python claims.py tune        # per protocol: each method's lr grid (widened past a winning edge),
                                 # then its knob at the best lr
    python claims.py table       # per protocol: every method at its choice, seeds 0 1 2, test queries
    python claims.py ablation    # the semi-batch memory modes on fashion_mnist_pairs at 48 bits
    python claims.py report      # claims/report.md: every table, from what has finished so far
    python claims.py all         # every stage, two at a time, each as soon as what it needs is done

Every stage runs compare.py, so every stage resumes: rerun the same command after an interruption.
--protocols and --methods narrow a stage, and two stages may run side by side on other protocols or
methods. The choices of `tune` go to claims/<protocol>/tune/<method>/choice.json, which `table` reads
(README, "The paper's claims").
"""
import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import data_list
from result_tables import can_win, cell_summary, cell_text, read_results
from runtime import ForwardedSignals, UsageError, run_cli, write_text_atomically

REPO = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable


@dataclass(frozen=True)
class Protocol:
    dataset: str          # the table's dataset: training list, test queries, database
    tune_dataset: str     # its copy with validation queries carved from the training list
    build: list           # (dataset, pre_process.py arguments) that make both, in order
    flags: list = field(default_factory=list)  # training flags the protocol needs


def built(dataset, *arguments):
    return dataset, list(arguments)


def carved(dataset, size, *extra):
    return built(f"{dataset}_tune", "val", "--dataset", dataset, "--size", str(size), "--into", f"{dataset}_tune",
                 *extra)


PROTOCOLS = {
    "clean": Protocol("fashion_mnist", "fashion_mnist_tune",
                      [built("fashion_mnist", "fashion_mnist"), carved("fashion_mnist", 500)]),
    "noise0.4": Protocol("fashion_mnist_noise0.4", "fashion_mnist_noise0.4_tune",
                         [built("fashion_mnist_noise0.2", "noise", "--dataset", "fashion_mnist", "--rate", "0.2"),
                          built("fashion_mnist_noise0.4", "noise", "--dataset", "fashion_mnist", "--rate", "0.4"),
                          carved("fashion_mnist_noise0.4", 500)]),
    # 3 of the 10 classes unseen: 2 (the default ratio's) would leave a two-class retrieval task. Its
    # validation queries are seen classes, so they are scored against the remaining training images.
    "unseen": Protocol("fashion_mnist_unseen0.3", "fashion_mnist_unseen0.3_tune",
                       [built("fashion_mnist_unseen0.3", "unseen", "--dataset", "fashion_mnist",
                              "--unseen_ratio", "0.3"),
                        carved("fashion_mnist_unseen0.3", 500, "--database", "train")]),
    # A flip swaps the halves of a composite, which changes its ordered pair's class: no flips, in either.
    "pairs": Protocol("fashion_mnist_pairs", "fashion_mnist_pairs_tune",
                      [built("fashion_mnist_pairs", "pairs", "--dataset", "fashion_mnist"),
                       carved("fashion_mnist_pairs", 1000)], ["--no_flip"]),
    "pairs_ml": Protocol("fashion_mnist_pairs_ml", "fashion_mnist_pairs_ml_tune",
                         [built("fashion_mnist_pairs_ml", "pairs", "--dataset", "fashion_mnist", "--multilabel"),
                          carved("fashion_mnist_pairs_ml", 1000)], ["--no_flip"]),
}
METHODS = ["MMHH", "MMHH_paper", "DCH", "HashNet"]
BITS = ["16", "48"]
SEEDS = ["0", "1", "2"]
# Every cell: ResNet18 from scratch on 28-pixel images, 800 iterations, one optimiser (the demo's).
TRAINING = ["--image_network", "ResNetFc", "--backbone", "ResNet18", "--pretrained", "none", "--resize_size", "28",
            "--crop_size", "28", "--crop_scale", "1.0", "--num_iters", "800", "--workers", "0", "--gpu_id", "cpu",
            "--print_every", "100", "--lr_schedule_type", "Stair_Step", "--decay_step", "300",
            "--weight_decay", "5e-4", "--batch_size", "48"]
LRS = ["0.0025", "0.005", "0.01"]
# A best lr on the grid's edge is checked one step past it (halved or doubled), up to WIDEN_STEPS times, so
# that a choice has a worse lr tried on each side (or the report shows it has not).
WIDEN_STEPS = 2
# Each method's main knob: its recipe's value, then the second value tried at the best lr.
KNOBS = {"MMHH": ("--similar_weight", "1", "auto"), "MMHH_paper": ("--similar_weight", "1", "auto"),
         "DCH": ("--gamma", "20", "10"), "HashNet": ("--sigmoid_param", "10/K", "5/K")}
# The ablation: MMHH at its pairs choice of lr, each batch type at similar weight 1 and at the class
# imbalance (the dataset's preset, 100: ImageNet-100's).
BATCH_TYPES = ["PairBatch", "BatchInitMem", "SemiMem"]
ABLATION_WEIGHTS = ["1", "config"]
POLL_SECONDS = 5  # how often `all` looks for finished units


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("data", "tune", "table", "ablation", "report", "all"),
                        help="what to build or run (see above)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS),
                        help="protocols to build, tune, run or report (default: all five)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                        help="methods to tune (default: all); table and report always take all four")
    parser.add_argument("--output", default="claims", help="folder of every stage's outputs (default claims)")
    parser.add_argument("--data_dir", default="data", help="folder of the dataset folders (default data)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="all: stages run side by side, each training on one thread (default 2)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv=None):
    args = parse_args(argv)
    stage = {"data": build_data, "tune": tune, "table": table, "ablation": ablation, "report": report,
             "all": run_all}
    return stage[args.stage](args)


def build_data(args):
    """Each protocol's datasets, skipping those already built."""
    for name in args.protocols:
        for dataset, arguments in PROTOCOLS[name].build:
            if os.path.exists(os.path.join(args.data_dir, dataset, "database.txt")):
                print(f"{dataset}: built before, kept")
                continue
            subprocess.run([PYTHON, os.path.join(REPO, "pre_process.py"), *arguments, "--data_dir", args.data_dir],
                           check=True)
    return 0


def compare(args, dataset, output, methods, bits, seeds, flags, method_flags=None, redo_changed=False):
    """Run (or resume) one compare.py table; its exit status (1 when a cell failed).

    redo_changed: cells that follow a tuned choice are redone when tuning changed it (compare.py logs
    the difference); a tuning cell's flags never change, so there a difference stops the stage.
    """
    command = [PYTHON, os.path.join(REPO, "compare.py"), "--dataset", dataset, "--data_dir", args.data_dir,
               "--methods", *methods, "--bits", *bits, "--seeds", *seeds, "--output", output, *TRAINING, *flags,
               *(["--redo_changed"] if redo_changed else [])]
    for method, extra in (method_flags or {}).items():
        command += ["--method_flags", f"{method}={extra}"]
    print(f"claims: {' '.join(command[1:])}", flush=True)
    # `kill PID` on claims.py reaches compare.py, which stops its training cleanly, instead of orphaning it.
    with ForwardedSignals() as signals:
        with signals.start(command) as child:
            status = child.wait()
    if signals.requested():
        raise SystemExit(signals.exit_code)  # interrupted: the next compare.py does not start
    if status not in (0, 1):
        raise SystemExit(status)  # interrupted, or refused (flags changed): stop the stage here
    return status


def tune(args):
    """Each method's lr on the validation queries, then its knob's second value at that lr."""
    for name in args.protocols:
        protocol = PROTOCOLS[name]
        flags = [*protocol.flags, "--eval_split", "val"]
        for method in args.methods:
            folder = os.path.join(args.output, name, "tune", method)
            lr = tuned_lr(args, protocol.tune_dataset, folder, method, flags)
            knob, _, second = KNOBS[method]
            compare(args, protocol.tune_dataset, os.path.join(folder, f"knob_lr{lr}"), [method], BITS, ["0"],
                    [*flags, "--lr", lr, knob, second])
            # The best of every setting tried: a knob tried at an lr the widened grid moved away from counts too.
            choice = {"flags": setting_flags(method, best_setting(folder, tried_settings(folder), method))}
            write_text_atomically(os.path.join(folder, "choice.json"), json.dumps(choice, indent=1) + "\n")
            print(f"claims: {name}: {method} chose {choice['flags']}", flush=True)
    return 0


def tuned_lr(args, dataset, folder, method, flags):
    """The best lr of the grid, widened a step past its edge while the best lies on that edge."""
    def run(lr):
        compare(args, dataset, os.path.join(folder, f"lr{lr}"), [method], BITS, ["0"], [*flags, "--lr", lr])

    def best(lrs):
        return best_setting(folder, [f"lr{lr}" for lr in lrs], method)[len("lr"):]

    lrs = list(LRS)
    for lr in lrs:
        run(lr)
    for _ in range(WIDEN_STEPS):
        lr = best(lrs)
        if lr == lrs[0]:
            lrs.insert(0, f"{float(lr) / 2:g}")
            run(lrs[0])
        elif lr == lrs[-1]:
            lrs.append(f"{float(lr) * 2:g}")
            run(lrs[-1])
        else:
            return lr
    return best(lrs)


def tried_settings(folder):
    """A method's tuning folders: its lrs (the grid's until it has started), then its knobs, by lr."""
    def lr_of(setting):
        return float(setting_lr(setting))
    found = os.listdir(folder) if os.path.isdir(folder) else []
    lrs = sorted({f"lr{lr}" for lr in LRS} | {s for s in found if s.startswith("lr")}, key=lr_of)
    return lrs + sorted((s for s in found if s.startswith("knob_lr")), key=lr_of)


def setting_lr(setting):
    """The lr of a tuning folder, ``lr<lr>`` or ``knob_lr<lr>``."""
    return setting.split("lr")[-1]


def setting_flags(method, setting):
    """The training flags of a tuning folder: its lr, and the knob's second value in a knob folder."""
    knob, first, second = KNOBS[method]
    return f"--lr {setting_lr(setting)} {knob} {second if setting.startswith('knob') else first}"


def best_setting(folder, settings, method):
    """Of a method's tuning tables, the one with the best mean MAP@H<=2 (deephash) over the code lengths;
    a setting whose codes collapsed at any length loses to every one whose codes did not."""
    def score(setting):
        rows = read_results(os.path.join(folder, setting, "results.csv"))
        summaries = [cell_summary(rows, method, int(bits), "map_radius_deephash") for bits in BITS]
        if not all(s["n"] for s in summaries):
            raise UsageError(f"{folder}/{setting}: {method} has unfinished cells; rerun the stage")
        return (all(can_win(s) for s in summaries), sum(s["mean_std"][0] for s in summaries) / len(BITS))
    return max(settings, key=score)  # the first of equal scores: the grid's order


def read_choices(args, name):
    """{method: {"flags": ...}} of the methods tuned for a protocol (each in tune/<method>/choice.json)."""
    choices = {}
    for method in METHODS:
        try:
            with open(os.path.join(args.output, name, "tune", method, "choice.json"), encoding="utf-8") as handle:
                choices[method] = json.load(handle)
        except FileNotFoundError:
            pass
    return choices


def table(args):
    """Every method at its choice, three seeds, on the protocol's test queries.

    --methods narrows it to the methods' own cells, and the table files then show only those: `all` runs
    each method's cells once it is tuned, then the whole table, every cell skipped, to write it whole.
    """
    failed = 0
    for name in args.protocols:
        choices = read_choices(args, name)
        missing = [m for m in args.methods if m not in choices]
        if missing:
            raise UsageError(f"{name}: no tuned choice for {', '.join(missing)}; run `python claims.py tune "
                             f"--protocols {name}` first")
        protocol = PROTOCOLS[name]
        failed |= compare(args, protocol.dataset, os.path.join(args.output, name, "table"), args.methods, BITS,
                          SEEDS, protocol.flags, {m: choices[m]["flags"] for m in args.methods},
                          redo_changed=True)
    return failed


def ablation(args):
    """MMHH on fashion_mnist_pairs at 48 bits: each batch type at two similar weights, three seeds."""
    choice = read_choices(args, "pairs").get("MMHH")
    if not choice:
        raise UsageError("no tuned MMHH choice for pairs; run `python claims.py tune --protocols pairs "
                         "--methods MMHH` first")
    lr = choice["flags"].split()[1]
    failed = 0
    for batch_type in BATCH_TYPES:
        for weight in ABLATION_WEIGHTS:
            failed |= compare(args, PROTOCOLS["pairs"].dataset,
                              os.path.join(args.output, "ablation", f"{batch_type}_w{weight}"), ["MMHH"], ["48"],
                              SEEDS, [*PROTOCOLS["pairs"].flags, "--lr", lr, "--batch_type", batch_type,
                                      "--similar_weight", weight], redo_changed=True)
    return failed


@dataclass(frozen=True)
class Unit:
    """One claims.py stage narrowed to a protocol (and a method), and the units it waits for."""
    name: str
    argv: list
    needs: tuple = ()


def planned_units(args):
    """Per protocol, each method's tuning, then its table cells, then the table written whole; with pairs,
    the ablation once its MMHH is tuned."""
    units = []
    for name in args.protocols:
        units += [Unit(f"tune {name} {method}", ["tune", "--protocols", name, "--methods", method])
                  for method in METHODS]
        units += [Unit(f"table {name} {method}", ["table", "--protocols", name, "--methods", method],
                       (f"tune {name} {method}",)) for method in METHODS]
        units.append(Unit(f"table {name}", ["table", "--protocols", name],
                          tuple(f"table {name} {method}" for method in METHODS)))
    if "pairs" in args.protocols:
        units.append(Unit("ablation", ["ablation"], ("tune pairs MMHH",)))
    return units


def unit_command(args, unit):
    return [PYTHON, os.path.join(REPO, "claims.py"), *unit.argv, "--output", args.output, "--data_dir", args.data_dir]


def run_all(args):
    """Every stage's units, --jobs at a time, each as soon as the units it needs have finished; then the report.

    Each unit is a claims.py process with its output in <output>/logs/; `kill PID` stops them all cleanly.
    """
    build_data(args)
    units = planned_units(args)
    os.makedirs(os.path.join(args.output, "logs"), exist_ok=True)
    print(f"claims: {len(units)} units, {args.jobs} at a time; `kill {os.getpid()}` stops them after "
          "a snapshot, and the same command resumes", flush=True)
    running, finished, failed = {}, set(), set()  # running: {unit name: (process, its log file)}
    with ForwardedSignals() as signals:
        while True:
            reap_units(running, finished, failed)
            if not signals.requested():
                waiting = [u for u in units if u.name not in finished | failed | set(running)]
                for unit in ready_units(waiting, finished, failed)[:args.jobs - len(running)]:
                    running[unit.name] = start_unit(args, unit, signals)
            if not running:
                break
            time.sleep(POLL_SECONDS)
    if signals.requested():
        print("claims: interrupted; rerun the same command to resume", file=sys.stderr)
        return signals.exit_code
    report(args)
    return 1 if failed else 0


def reap_units(running, finished, failed):
    """Move the units whose process has ended from running to finished (exit 0) or failed."""
    for name, (child, log) in list(running.items()):
        if child.poll() is not None:
            log.close()
            del running[name]
            (finished if child.returncode == 0 else failed).add(name)
            print(f"claims: {name} {'done' if child.returncode == 0 else f'stopped ({child.returncode})'}", flush=True)


def ready_units(waiting, finished, failed):
    """The waiting units whose needs have all finished, in plan order; those that need a failed one fail too."""
    for unit in waiting:
        if any(need in failed for need in unit.needs):
            failed.add(unit.name)
            print(f"claims: {unit.name} not run: {', '.join(n for n in unit.needs if n in failed)} did not finish",
                  flush=True)
    return [u for u in waiting if u.name not in failed and all(need in finished for need in u.needs)]


def start_unit(args, unit, signals):
    log = open(os.path.join(args.output, "logs", unit.name.replace(" ", "_") + ".log"), "a", encoding="utf-8")
    child = signals.start(unit_command(args, unit), stdout=log, stderr=subprocess.STDOUT)
    print(f"claims: {unit.name} started (log: {log.name})", flush=True)
    return child, log


def table_results(args, name):
    """A protocol's test-table rows, read from its cells' result.json rather than results.csv: a narrowed
    `table --methods` run rewrites results.csv with its own methods' rows alone until `all` writes it whole.
    A seed not yet finished of a method that has started is a "not run" row."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(os.path.join(args.output, name, "table")), "cells", "*",
                                       "result.json")):
        with open(path, encoding="utf-8") as handle:
            row = json.load(handle)
        found[row["method"], str(row["bits"]), str(row["seed"])] = row
    started = {method for method, _, _ in found}
    return [found.get((method, bits, seed), {"method": method, "bits": int(bits), "seed": int(seed),
                                             "status": "not run"})
            for method in METHODS if method in started for bits in BITS for seed in SEEDS]


def results_so_far(path):
    """The rows of a compare.py results.csv, or none when that stage has not started."""
    return read_results(path) if os.path.exists(path) else []


def report(args):
    """claims/report.md: the tuning, the five-protocol table and the ablation, from what has finished."""
    parts = ["# The paper's claims on Fashion-MNIST\n", report_preamble()]
    parts.append(main_table(args))
    for name in args.protocols:
        parts.append(detail_table(args, name))
    for name in args.protocols:
        parts.append(tuning_table(args, name))
    parts.append(ablation_table(args))
    parts.append(time_table(args))
    path = os.path.join(args.output, "report.md")
    write_text_atomically(path, "\n".join(parts))
    print(f"wrote {path}")
    return 0


def report_preamble():
    return (f"Every cell trains with `{shlex.join(TRAINING)}` and the protocol's flags (`--no_flip` for the "
            f"pairs), each method's lr from {', '.join(LRS)} (halved or doubled, up to {WIDEN_STEPS} times, "
            "while the best lies on the grid's edge) and then its knob chosen on validation queries "
            "carved from the protocol's training list (seed 0). Cells: MAP@H<=2 (deephash convention: empty "
            "balls count 0), mean ± sample standard deviation over the finished seeds, n of them; bold: the "
            "best complete cell of a column with no collapsed seed.\n")


def main_table(args):
    header = "| method | " + " | ".join(f"{p} {b}" for p in args.protocols for b in BITS) + " |"
    rows = [header, "|---" * (len(args.protocols) * len(BITS) + 1) + "|"]
    summaries = {}
    for name in args.protocols:
        results = table_results(args, name)
        for method in METHODS:
            for bits in BITS:
                summaries[method, name, bits] = cell_summary(results, method, int(bits), "map_radius_deephash")
    for method in METHODS:
        cells = []
        for name in args.protocols:
            for bits in BITS:
                summary = summaries[method, name, bits]
                if not summary["asked"]:
                    cells.append("not run")
                    continue
                rivals = [summaries[m, name, bits]["mean_std"][0] for m in METHODS
                          if can_win(summaries[m, name, bits])]
                best = can_win(summary) and summary["mean_std"][0] == max(rivals)
                cells.append(f"**{cell_text(summary)}**" if best else cell_text(summary))
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    chosen = "; ".join(f"{name}: " + ", ".join(f"{m} `{c['flags']}`" for m, c in read_choices(args, name).items())
                       for name in args.protocols if read_choices(args, name))
    return ("## MAP@H<=2 on the test queries\n\n" + "\n".join(rows) + "\n\nChosen on validation: "
            + (chosen or "nothing tuned yet") + ".\n")


def detail_table(args, name):
    """One protocol's test table beside what MAP@H<=2 leaves out: empty balls, distinct codes, MAP@TopK."""
    results = table_results(args, name)
    if not any(r["status"] == "ok" for r in results):
        return f"## {name}: the table in detail\n\nNo cell has finished.\n"
    rows = ["| method | bits | MAP@H<=2 | empty balls | distinct codes | MAP@TopK |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        for bits in map(int, BITS):
            finished = [r for r in results if (r["method"], r["bits"], r["status"]) == (method, bits, "ok")]
            empty = [100 * r["empty_ball_fraction"] for r in finished]
            codes = [r["distinct_codes"] for r in finished]
            ranges = (f"{min(empty):.1f}–{max(empty):.1f}% | {min(codes):,}–{max(codes):,}" if finished
                      else "– | –")
            rows.append(f"| {method} | {bits} | {cell_text(cell_summary(results, method, bits, 'map_radius_deephash'))}"
                        f" | {ranges} | {cell_text(cell_summary(results, method, bits, 'map_topk'))} |")
    topk = data_list.read_dataset_json(os.path.join(args.data_dir, PROTOCOLS[name].dataset)).get("topk")
    depth = {None: "the dataset's preset R", -1: "R = the whole database"}.get(topk, f"R = {topk}")
    return (f"## {name}: the table in detail\n\nFinished seeds only (ranges over them); MAP@TopK ({depth}, "
            "hashnet convention) ranks the whole database rather than a ball, and empty balls count 0 in "
            "MAP@H<=2.\n\n" + "\n".join(rows) + "\n")


def tuning_table(args, name):
    """Every setting each method tried on validation, one row each; the mean over the lengths chose."""
    rows = ["| method | setting | " + " | ".join(f"{b} bits" for b in BITS) + " | mean | |",
            "|---" * (len(BITS) + 4) + "|"]
    choices = read_choices(args, name)
    for method in METHODS:
        folder = os.path.join(args.output, name, "tune", method)
        for setting in tried_settings(folder):
            results = results_so_far(os.path.join(folder, setting, "results.csv"))
            summaries = [cell_summary(results, method, int(bits), "map_radius_deephash") for bits in BITS]
            cells = [cell_text(s) if s["asked"] else "not run" for s in summaries]
            mean = (f"{sum(s['mean_std'][0] for s in summaries) / len(BITS):.4f}" if all(s["n"] for s in summaries)
                    else "–")
            flags = setting_flags(method, setting)
            chosen = "chosen" if choices.get(method, {}).get("flags") == flags else ""
            rows.append(f"| {method} | `{flags}` | " + " | ".join(cells) + f" | {mean} | {chosen} |")
    return (f"## Tuning on {PROTOCOLS[name].tune_dataset} (validation queries, seed 0)\n\nEach method's lr "
            f"grid at its recipe's knob, then the knob's second value at the best lr; a collapsed setting loses "
            f"to every one that did not collapse.\n\n" + "\n".join(rows) + "\n")


def ablation_table(args):
    rows = ["| batch type | " + " | ".join(f"similar weight {w}" for w in ABLATION_WEIGHTS) + " |",
            "|---" * (len(ABLATION_WEIGHTS) + 1) + "|"]
    for batch_type in BATCH_TYPES:
        cells = []
        for weight in ABLATION_WEIGHTS:
            path = os.path.join(args.output, "ablation", f"{batch_type}_w{weight}", "results.csv")
            results = results_so_far(path)
            summary = cell_summary(results, "MMHH", 48, "map_radius_deephash")
            cells.append(cell_text(summary) if summary["asked"] else "not run")
        rows.append(f"| {batch_type} | " + " | ".join(cells) + " |")
    return "## The semi-batch memory on fashion_mnist_pairs, MMHH at 48 bits\n\n" + "\n".join(rows) + "\n"


def time_table(args):
    """Per stage: cells finished of those it asks, and the time they took (one thread each)."""
    tuning = {folder: tried_settings(folder) for folder in
              (os.path.join(args.output, name, "tune", method) for name in args.protocols for method in METHODS)}
    stages = {
        # a method not yet at its knob still asks for one
        "tune": ([os.path.join(folder, setting) for folder, settings in tuning.items() for setting in settings],
                 len(BITS) * sum(len(s) + (not s[-1].startswith("knob")) for s in tuning.values())),
        "table": ([os.path.join(args.output, name, "table") for name in args.protocols],
                  len(args.protocols) * len(METHODS) * len(BITS) * len(SEEDS)),
        "ablation": ([os.path.join(args.output, "ablation", f"{batch_type}_w{weight}") for batch_type in BATCH_TYPES
                      for weight in ABLATION_WEIGHTS], len(BATCH_TYPES) * len(ABLATION_WEIGHTS) * len(SEEDS)),
    }
    rows = ["| stage | cells finished | time, summed | per cell |", "|---|---|---|---|"]
    for stage, (folders, asked) in stages.items():
        finished = [row for folder in folders for row in results_so_far(os.path.join(folder, "results.csv"))
                    if row["status"] == "ok"]
        seconds = sum(row["seconds"] for row in finished)
        per_cell = f"{seconds / len(finished) / 60:.1f} min" if finished else "-"
        rows.append(f"| {stage} | {len(finished)} of {asked} | {seconds / 3600:.1f} h | {per_cell} |")
    return ("## Cells run and their time\n\nEach cell trains and evaluates on one thread (`OMP_NUM_THREADS=1`); "
            "a resumed cell counts the time of its interrupted part too.\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
