"""claims.py: the choice on validation, and its stages end to end on tiny data."""
import json
import os
import signal
import sys
import threading
import time

import pytest

import claims
import compare
from test_compare import TRAINING


def write_tuning(folder, maps):
    """A compare.py results.csv of one method: maps is {bits: (MAP, collapsed)}, or None for a failed cell."""
    folder.mkdir(parents=True)
    rows = [{"method": "MMHH", "bits": int(bits), "seed": 0, "radius": 2, "status": "failed"} if value is None else
            {"method": "MMHH", "bits": int(bits), "seed": 0, "radius": 2, "status": "ok", "collapsed": value[1],
             "map_radius_deephash": value[0]} for bits, value in maps.items()]
    (folder / "results.csv").write_text(compare.results_csv(rows))


def test_the_best_setting_has_the_best_mean_over_bits_and_no_collapse(tmp_path):
    write_tuning(tmp_path / "lr0.0025", {"16": (0.50, False), "48": (0.70, False)})
    write_tuning(tmp_path / "lr0.005", {"16": (0.40, False), "48": (0.90, False)})  # best mean, 0.65
    write_tuning(tmp_path / "lr0.01", {"16": (0.95, True), "48": (0.95, False)})  # higher, but collapsed
    assert claims.best_setting(str(tmp_path), ["lr0.0025", "lr0.005", "lr0.01"], "MMHH") == "lr0.005"
    write_tuning(tmp_path / "knob", {"16": (0.60, False), "48": None})
    with pytest.raises(claims.UsageError, match="knob: MMHH has unfinished cells; rerun the stage"):
        claims.best_setting(str(tmp_path), ["lr0.005", "knob"], "MMHH")


@pytest.mark.parametrize("maps, tried, chosen", [
    # the grid's lowest lr wins: its half is tried, loses, and the choice has a worse lr on each side
    ({"0.00125": 0.6, "0.0025": 0.7, "0.005": 0.6, "0.01": 0.5}, ["0.0025", "0.005", "0.01", "0.00125"], "0.0025"),
    # the highest keeps winning: doubled WIDEN_STEPS times, then chosen on the edge
    ({"0.0025": 0.1, "0.005": 0.2, "0.01": 0.3, "0.02": 0.4, "0.04": 0.5},
     ["0.0025", "0.005", "0.01", "0.02", "0.04"], "0.04"),
    # an inner lr wins: the grid alone
    ({"0.0025": 0.5, "0.005": 0.7, "0.01": 0.6}, ["0.0025", "0.005", "0.01"], "0.005"),
])
def test_tuning_widens_the_lr_grid_past_an_edge_that_wins(tmp_path, monkeypatch, maps, tried, chosen):
    run = fake_tuning(tmp_path, monkeypatch, maps)
    common = ["--protocols", "pairs", "--methods", "MMHH", "--output", str(tmp_path / "claims")]
    assert claims.main(["tune", *common]) == 0
    assert run == [*tried, f"knob at {chosen}"]
    choice = json.loads((tmp_path / "claims" / "pairs" / "tune" / "MMHH" / "choice.json").read_text())
    assert choice == {"flags": f"--lr {chosen} --similar_weight 1"}
    table = claims.tuning_table(claims.parse_args(["report", *common]), "pairs")
    rows = [row for row in table.splitlines() if row.startswith("| MMHH |")]
    assert [row.split("`")[1] for row in rows] == [f"--lr {lr} --similar_weight {w}" for lr, w in
                                                  [*((lr, "1") for lr in sorted(tried, key=float)), (chosen, "auto")]]
    assert [row.endswith("| chosen |") for row in rows] == [row.split("`")[1] == choice["flags"] for row in rows]


def test_the_choice_is_the_best_setting_tried_a_knob_at_an_earlier_lr_included(tmp_path, monkeypatch):
    # A knob run at 0.01 when 0.01 was the best lr (before a widening moved it) still counts.
    folder = tmp_path / "claims" / "pairs" / "tune" / "MMHH"
    write_tuning(folder / "knob_lr0.01", {b: (0.9, False) for b in claims.BITS})
    run = fake_tuning(tmp_path, monkeypatch, {"0.0025": 0.5, "0.005": 0.7, "0.01": 0.6})
    assert claims.main(["tune", "--protocols", "pairs", "--methods", "MMHH", "--output", str(tmp_path / "claims")]) == 0
    assert run == ["0.0025", "0.005", "0.01", "knob at 0.005"]
    assert json.loads((folder / "choice.json").read_text()) == {"flags": "--lr 0.01 --similar_weight auto"}


def fake_tuning(tmp_path, monkeypatch, maps):
    """Make claims.compare write a tuning folder of MMHH with maps[lr] (the knob's second value 0.05 less);
    the list it returns fills with the lrs run, in order."""
    run = []

    def fake_compare(args, dataset, output, methods, bits, seeds, flags, *rest, **options):
        lr = flags[flags.index("--lr") + 1]
        knob = os.path.basename(output).startswith("knob")
        run.append(f"knob at {lr}" if knob else lr)
        write_tuning(tmp_path / "claims" / "pairs" / "tune" / "MMHH" / os.path.basename(output),
                     {b: (maps[lr] - 0.05 * knob, False) for b in claims.BITS})
        return 0
    monkeypatch.setattr(claims, "compare", fake_compare)
    return run


def test_tune_then_table_then_report_on_tiny_data(tmp_path, tiny_data, monkeypatch, capsys):
    monkeypatch.setattr(claims, "PROTOCOLS", {"tiny": claims.Protocol(
        "tiny", "tiny_tune", [claims.carved("tiny", 6)], ["--radius", "2"])})
    monkeypatch.setattr(claims, "METHODS", ["MMHH"])
    monkeypatch.setattr(claims, "LRS", ["0.01", "0.02"])
    monkeypatch.setattr(claims, "WIDEN_STEPS", 0)  # on a grid of two, the best is always on an edge
    monkeypatch.setattr(claims, "BITS", ["16"])
    monkeypatch.setattr(claims, "SEEDS", ["0"])
    monkeypatch.setattr(claims, "TRAINING", [*TRAINING, "--num_iters", "4"])
    common = ["--protocols", "tiny", "--methods", "MMHH", "--output", str(tmp_path / "claims"),
              "--data_dir", str(tiny_data)]

    assert claims.main(["data", *common]) == 0
    assert (tiny_data / "tiny_tune" / "val.txt").exists()
    assert claims.main(["data", *common]) == 0
    assert "tiny_tune: built before, kept" in capsys.readouterr().out

    assert claims.run_cli(claims.main, ["table", *common]) == 2
    assert "tiny: no tuned choice for MMHH; run `python claims.py tune --protocols tiny` first" in \
        capsys.readouterr().err

    assert claims.main(["tune", *common]) == 0
    choice = json.loads((tmp_path / "claims" / "tiny" / "tune" / "MMHH" / "choice.json").read_text())
    choice = {"MMHH": choice}
    assert choice["MMHH"]["flags"] in {f"--lr {lr} --similar_weight {w}" for lr in ("0.01", "0.02")
                                       for w in ("1", "auto")}
    lr = choice["MMHH"]["flags"].split()[1]
    knob_log = (tmp_path / "claims" / "tiny" / "tune" / "MMHH" / f"knob_lr{lr}" / "cells" / "MMHH_16bit_seed0" /
                "train.log").read_text()
    assert "--eval_split val" in knob_log and "--similar_weight auto" in knob_log

    assert claims.main(["table", *common]) == 0
    table_log = (tmp_path / "claims" / "tiny" / "table" / "cells" / "MMHH_16bit_seed0" / "train.log").read_text()
    assert choice["MMHH"]["flags"] in table_log and "--eval_split" not in table_log

    assert claims.main(["report", *common]) == 0
    report = (tmp_path / "claims" / "report.md").read_text()
    assert "## MAP@H<=2 on the test queries" in report and "(n=1)" in report
    assert f"tiny: MMHH `{choice['MMHH']['flags']}`" in report
    assert "## Tuning on tiny_tune" in report and "not run" in report  # the ablation has not run
    # Beside MAP@H<=2, the detail says how many balls were empty, how many codes differ, and MAP@TopK.
    result = json.loads((tmp_path / "claims" / "tiny" / "table" / "cells" / "MMHH_16bit_seed0" /
                         "result.json").read_text())
    detail = report.split("## tiny: the table in detail")[1].split("##")[0]
    empty = f"{100 * result['empty_ball_fraction']:.1f}"
    assert (f"| MMHH | 16 | {result['map_radius_deephash']:.4f} (n=1) | {empty}–{empty}% | "
            f"{result['distinct_codes']}–{result['distinct_codes']} | {result['map_topk']:.4f} (n=1) |") in detail
    # tune: 2 lrs + the knob at one length; table: one cell; the ablation asks 3 batch types x 2 weights x 1 seed
    assert "| tune | 3 of 3 |" in report and "| table | 1 of 1 |" in report and "| ablation | 0 of 6 | 0.0 h | - |" \
        in report


def test_table_narrowed_to_a_method_needs_only_its_choice_and_runs_only_its_cells(tmp_path, monkeypatch):
    folder = tmp_path / "claims" / "pairs" / "tune" / "DCH"
    folder.mkdir(parents=True)
    (folder / "choice.json").write_text(json.dumps({"flags": "--lr 0.0025 --gamma 20"}))
    calls = []
    monkeypatch.setattr(claims, "compare", lambda args, *rest, **options: calls.append((*rest, options)) or 0)
    common = ["--protocols", "pairs", "--output", str(tmp_path / "claims"), "--data_dir", str(tmp_path)]
    assert claims.main(["table", *common, "--methods", "DCH"]) == 0
    dataset, output, methods, bits, seeds, flags, method_flags, options = calls[0]
    assert (dataset, methods, seeds) == ("fashion_mnist_pairs", ["DCH"], claims.SEEDS)
    assert options == {"redo_changed": True}  # cells run at an earlier choice follow the new one
    assert output == str(folder.parent.parent / "table") and method_flags == {"DCH": "--lr 0.0025 --gamma 20"}
    with pytest.raises(claims.UsageError, match="pairs: no tuned choice for MMHH, MMHH_paper, HashNet"):
        claims.main(["table", *common])


def test_report_shows_every_finished_cell_of_a_table_whose_results_csv_one_method_rewrote(tmp_path):
    # `all` runs each method's table cells alone, and each such run rewrites results.csv with its rows only.
    folder = tmp_path / "claims" / "pairs" / "table"
    rows = [{"method": "DCH", "bits": bits, "seed": seed, "radius": 2, "status": "ok", "collapsed": False,
             "map_radius_deephash": 0.3 + seed / 100} for bits in (16, 48) for seed in (0, 1, 2)]
    rows += [{"method": "MMHH", "bits": bits, "seed": 0, "radius": 2, "status": "ok", "collapsed": False,
              "map_radius_deephash": 0.2} for bits in (16, 48)]
    for row in rows:
        cell = folder / "cells" / f"{row['method']}_{row['bits']}bit_seed{row['seed']}"
        cell.mkdir(parents=True)
        (cell / "result.json").write_text(json.dumps(row))
    (folder / "results.csv").write_text(compare.results_csv(rows[-2:]))  # the MMHH run's
    args = claims.parse_args(["report", "--protocols", "pairs", "--output", str(tmp_path / "claims")])
    table = claims.main_table(args)
    assert "| DCH | **0.3100 ± 0.0100 (n=3)** | **0.3100 ± 0.0100 (n=3)** |" in table
    assert "| MMHH | 0.2000 (n=1 of 3; incomplete: 2 not run) | 0.2000 (n=1 of 3; incomplete: 2 not run) |" in table
    assert "| HashNet | not run | not run |" in table


def test_kill_on_claims_stops_the_running_training_cleanly_and_no_further_compare(tmp_path, tiny_data):
    # `kill PID` on claims.py (a background run) used to leave compare.py and its training running.
    args = claims.parse_args(["tune", "--output", str(tmp_path / "claims"), "--data_dir", str(tiny_data)])
    first_log = tmp_path / "cmp" / "cells" / "MMHH_16bit_seed0" / "train.log"

    def kill_once_training():
        deadline = time.monotonic() + 60
        while not first_log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_once_training, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        claims.compare(args, "tiny", str(tmp_path / "cmp"), ["MMHH", "DCH"], ["16"], ["0"],
                       [*TRAINING, "--num_iters", "500"])
    assert stopped.value.code == 128 + signal.SIGTERM
    results = (tmp_path / "cmp" / "results.csv").read_text()
    assert "MMHH,16,0,interrupted" in results and "DCH,16,0,not run" in results


def test_all_runs_units_side_by_side_each_after_what_it_needs(tmp_path, monkeypatch, capsys):
    events = tmp_path / "events.txt"
    script = ("import sys, time; name, path, code, seconds = sys.argv[1:]; open(path, 'a').write(f'start {name}\\n'); "
              "time.sleep(float(seconds)); open(path, 'a').write(f'end {name}\\n'); sys.exit(int(code))")

    def fake_unit(args, unit):  # each unit records when it ran; noise0.4's DCH tuning fails; pairs' HashNet is slow
        return [sys.executable, "-c", script, unit.name, str(events), "2" if unit.name == "tune noise0.4 DCH" else "0",
                "3" if unit.name == "tune pairs HashNet" else "0.2"]

    monkeypatch.setattr(claims, "unit_command", fake_unit)
    monkeypatch.setattr(claims, "build_data", lambda args: 0)
    monkeypatch.setattr(claims, "POLL_SECONDS", 0.02)
    assert claims.main(["all", "--protocols", "noise0.4", "pairs", "--output", str(tmp_path / "claims"),
                        "--data_dir", str(tmp_path / "data")]) == 1
    lines = events.read_text().splitlines()
    order = {line: i for i, line in enumerate(lines)}
    running, most = 0, 0
    for line in lines:
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    assert most == 2  # --jobs 2 by default
    # A method's table cells start once it is tuned, not once all are: the other core is not left idle.
    assert all(order[f"end tune pairs {m}"] < order[f"start table pairs {m}"] for m in claims.METHODS)
    assert order["start table pairs MMHH"] < order["end tune pairs HashNet"]
    assert all(order[f"end table pairs {m}"] < order["start table pairs"] for m in claims.METHODS)
    assert order["end tune pairs MMHH"] < order["start ablation"]
    assert "end table noise0.4 MMHH" in order and "start table noise0.4 DCH" not in order
    assert "start table noise0.4" not in order and "end tune noise0.4 HashNet" in order
    out = capsys.readouterr().out
    assert "claims: tune noise0.4 DCH stopped (2)" in out
    assert "claims: table noise0.4 DCH not run: tune noise0.4 DCH did not finish" in out
    assert "claims: table noise0.4 not run: table noise0.4 DCH did not finish" in out
    assert (tmp_path / "claims" / "logs" / "tune_pairs_MMHH.log").exists()
    assert (tmp_path / "claims" / "report.md").exists()
