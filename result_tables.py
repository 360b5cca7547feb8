"""The cells of a results table: a mean over seeds that says how many finished and what went wrong.

compare.py writes results.csv (a row a cell and seed) and its table.md from these; claims.py reads the
CSVs back to choose settings on validation and to draw the README's tables. A cell shows its count,
``0.7683 ± 0.0108 (n=3)``, and says so when seeds are missing or collapsed; only a complete cell with no
collapsed seed may be bolded as the best.
"""
import csv
import statistics

NUMERIC = ("map_radius_deephash", "map_radius_mmhh", "empty_ball_fraction", "map_topk", "seconds")


def read_results(path):
    """The rows of a compare.py results.csv, typed: bits, seed, radius, distinct_codes int; figures float."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("bits", "seed", "radius", "distinct_codes"):
            row[key] = int(row[key]) if row.get(key) else None
        for key in NUMERIC:
            row[key] = float(row[key]) if row.get(key) else None
        row["collapsed"] = row.get("collapsed") == "True"
    return rows


def cell_summary(results, method, bits, key):
    """A table cell: ``key`` over the seeds of a method and code length, and how many of them finished.

    mean_std is (mean, sample std) over the finished seeds (std None for one seed), () when none finished;
    statuses counts the seeds by status; collapsed lists the finished seeds whose codes collapsed.
    """
    seeds = [r for r in results if (r["method"], r["bits"]) == (method, bits)]
    finished = [r for r in seeds if r["status"] == "ok"]
    values = [r[key] for r in finished]
    statuses = {}
    for r in seeds:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"mean_std": (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
            if values else (), "n": len(values), "asked": len(seeds), "statuses": statuses,
            "collapsed": [r["seed"] for r in finished if r.get("collapsed")]}


def can_win(summary):
    """Only a complete cell with no collapsed seed may be bolded as the best (a cell never asked is not)."""
    return 0 < summary["n"] == summary["asked"] and not summary["collapsed"]


def cell_text(summary):
    """'0.7683 ± 0.0108 (n=3)', with what is missing or collapsed said in the cell itself."""
    notes = []
    if summary["n"] < summary["asked"]:
        missing = ", ".join(f"{count} {status}" for status, count in summary["statuses"].items() if status != "ok")
        notes.append(f"incomplete: {missing}")
    if summary["collapsed"]:
        notes.append("collapsed: seed " + ", ".join(map(str, summary["collapsed"])))
    if not summary["mean_std"]:
        return "— (" + "; ".join(notes) + ")"
    mean, std = summary["mean_std"]
    count = f"n={summary['n']}" + (f" of {summary['asked']}" if summary["n"] < summary["asked"] else "")
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f" ({'; '.join([count, *notes])})"
