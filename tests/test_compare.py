"""compare.py on tiny data: the cells, the CSV, the table and the plot, skipping and failed cells."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import compare
import runtime

TRAINING = ["--image_network", "ResNetFc", "--backbone", "ResNet18", "--pretrained", "none",
            "--resize_size", "20", "--crop_size", "16", "--batch_size", "8", "--workers", "0",
            "--gpu_id", "cpu", "--print_every", "5"]


def run_compare(tmp_path, tiny_data, *extra):
    return compare.main(["--dataset", "tiny", "--data_dir", str(tiny_data), "--methods", "MMHH", "DCH",
                         "--bits", "16", "--output", str(tmp_path / "cmp"), "--num_iters", "6", *TRAINING, *extra])


def rows(tmp_path):
    with open(tmp_path / "cmp" / "results.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_compare_writes_the_table_and_skips_finished_cells(tmp_path, tiny_data, capsys):
    assert run_compare(tmp_path, tiny_data) == 0
    first = rows(tmp_path)
    assert [(r["method"], r["bits"], r["seed"], r["status"]) for r in first] == [
        ("MMHH", "16", "0", "ok"), ("DCH", "16", "0", "ok")]
    assert all(0 <= float(r["map_radius_deephash"]) <= 1 and int(r["distinct_codes"]) >= 1 for r in first)
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "MAP@H<=2, deephash convention" in table and "mmhh convention" in table
    assert "MMHH: recipe `mmhh_release`" in table and "DCH: recipe `dch_deephash`" in table
    assert "INCOMPLETE" not in table and "(n=1)" in table
    # Shared flags win over the recipes, so the table says which were given.
    assert "which win over the recipes: `--image_network ResNetFc" in table and "--num_iters 6`" in table
    assert (tmp_path / "cmp" / "map_vs_bits.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "[2/2] DCH_16bit_seed0: MAP@H<=2" in out and "left" in out
    # The recipe and the shared flags reach the run; --num_iters overrides the recipe's 1000 / 2000.
    log = (tmp_path / "cmp" / "cells" / "DCH_16bit_seed0" / "train.log").read_text()
    assert "--recipe dch_deephash" in log and "iter 00006/00006" in log
    # A table's cells may come from several machines, and their last digits depend on the CPU: each says which.
    result = json.loads((tmp_path / "cmp" / "cells" / "DCH_16bit_seed0" / "result.json").read_text())
    assert result["cpu"] == compare.cpu_name() and result["cpu"]

    assert run_compare(tmp_path, tiny_data) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2
    assert rows(tmp_path) == first


def test_a_failing_cell_is_a_row_with_its_error_and_the_rest_goes_on(tmp_path, tiny_data, capsys):
    assert run_compare(tmp_path, tiny_data, "--method_flags", 'DCH="--batch_params x"') == 1
    mmhh, dch = rows(tmp_path)
    assert mmhh["status"] == "ok" and dch["status"] == "failed" and "--batch_params" in dch["error"]
    assert "failed" in (tmp_path / "cmp" / "table.md").read_text()
    # Fixed, the rerun redoes only the failed cell.
    assert run_compare(tmp_path, tiny_data) == 0
    out = capsys.readouterr().out
    assert "MMHH_16bit_seed0: done before, skipped" in out and "redoing DCH_16bit_seed0" in out
    assert [r["status"] for r in rows(tmp_path)] == ["ok", "ok"]


def test_flags_compare_sets_itself_are_refused(tmp_path, tiny_data, capsys):
    assert compare.run_cli(compare.main, ["--dataset", "tiny", "--output", str(tmp_path), "--hash_bit", "8"]) == 2
    assert "--hash_bit is set by compare.py for each cell" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results.csv")


def test_sigterm_stops_compare_after_the_running_cell(tmp_path, tiny_data):
    # `kill PID` on compare.py alone: the training gets the signal too, however early in its start-up
    # it arrives (it may die of it before installing its handler), and no further cell starts.
    command = [sys.executable, compare.__file__, "--dataset", "tiny", "--data_dir", str(tiny_data), "--methods",
               "MMHH", "DCH", "--bits", "16", "--output", str(tmp_path / "cmp"), "--num_iters", "500", *TRAINING]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_log = tmp_path / "cmp" / "cells" / "MMHH_16bit_seed0" / "train.log"
    deadline = time.monotonic() + 60
    while not first_log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted; rerun the same command to continue from MMHH_16bit_seed0" in err
    # The outputs of an interrupted comparison say what did not finish, cell by cell.
    assert [(r["method"], r["status"]) for r in rows(tmp_path)] == [("MMHH", "interrupted"), ("DCH", "not run")]
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "**INCOMPLETE: 0 of 2 cells finished**" in table
    assert "| MMHH | — (incomplete: 1 interrupted) |" in table and "| DCH | — (incomplete: 1 not run) |" in table
    assert not (tmp_path / "cmp" / "cells" / "DCH_16bit_seed0").exists()


def synthetic_results(cells):
    """compare.py's result rows from (method, bits, seed, status, MAP, collapsed) tuples."""
    return [{"method": m, "bits": b, "seed": seed, "status": status, "radius": 2, "collapsed": collapsed,
             **({"map_radius_deephash": value, "map_radius_mmhh": value, "empty_ball_fraction": 0.0}
                if status == "ok" else {})}
            for m, b, seed, status, value, collapsed in cells]


def table_rows(table, title):
    section = table.split(title)[1].split("###")[0]
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")}


def test_a_cell_shows_its_count_and_only_a_complete_healthy_cell_is_bold():
    args = compare.parse_args(["--dataset", "fm", "--output", "x", "--methods", "MMHH", "MMHH_paper", "DCH",
                               "HashNet", "--bits", "16", "48", "--seeds", "0", "1", "2"])
    results = synthetic_results(
        [("MMHH", 16, s, "ok", v, False) for s, v in enumerate((0.70, 0.72, 0.74))]
        # Two of three seeds failed: its one number is the highest, but it is no winner.
        + [("DCH", 16, 0, "ok", 0.30, False)] + [("DCH", 16, s, "failed", None, False) for s in (1, 2)]
        + [("DCH", 48, 0, "interrupted", None, False)]
        + [("HashNet", 16, s, "ok", 0.9, s == 1) for s in range(3)]  # the best mean, but seed 1 collapsed
        + [("HashNet", 48, s, "ok", 0.5, False) for s in range(3)])
    everything = {(m, b, s) for m in args.methods for b in args.bits for s in args.seeds}
    done = {(r["method"], r["bits"], r["seed"]) for r in results}
    results += [compare.pending_result(*cell) for cell in sorted(everything - done)]
    table = compare.results_table(results, args)
    deephash = table_rows(table, "MAP@H<=2, deephash convention")
    assert deephash["MMHH"][0] == "**0.7200 ± 0.0200 (n=3)**"
    assert deephash["DCH"][0] == "0.3000 (n=1 of 3; incomplete: 2 failed)"
    assert deephash["HashNet"][0] == "0.9000 ± 0.0000 (n=3; collapsed: seed 1)"
    assert deephash["DCH"][1] == "— (incomplete: 1 interrupted, 2 not run)"
    assert deephash["MMHH_paper"] == ["— (incomplete: 3 not run)"] * 2
    assert deephash["HashNet"][1] == "**0.5000 ± 0.0000 (n=3)**"
    assert "sample standard deviation" in table and "INCOMPLETE: 10 of 24 cells finished" in table
    assert "MMHH_paper: recipe `mmhh_release`, its own flags `--distance_type MMHH_paper`" in table
    # results.csv tells every status apart, and marks the collapsed seed.
    lines = list(csv.DictReader(compare.results_csv(results).splitlines()))
    assert {r["status"] for r in lines} == {"ok", "failed", "interrupted", "not run"} and len(lines) == 24
    assert [r["collapsed"] for r in lines if r["method"] == "HashNet" and r["bits"] == "16"] == \
        ["False", "True", "False"]


def test_a_rerun_with_other_flags_stops_before_training_and_redo_changed_redoes(tmp_path, tiny_data, capsys):
    assert run_compare(tmp_path, tiny_data, "--radius", "1", "--method_flags", 'DCH=--gamma 10') == 0
    first = rows(tmp_path)
    table = (tmp_path / "cmp" / "table.md").read_text()
    # The table names the radius the cells were scored at and the flags each method got.
    assert "MAP@H<=1, deephash convention" in table and "H<=2" not in table
    assert "DCH: recipe `dch_deephash`, its own flags `--gamma 10`" in table
    assert "MMHH: recipe `mmhh_release`, its own flags none" in table
    assert "--gamma 10" in first[1]["flags"] and "--radius 1" in first[0]["flags"]

    code = compare.run_cli(compare.main, ["--dataset", "tiny", "--data_dir", str(tiny_data), "--methods", "MMHH",
                                          "DCH", "--bits", "16", "--output", str(tmp_path / "cmp"), "--num_iters",
                                          "6", *TRAINING, "--radius", "1", "--method_flags", 'DCH=--gamma 5'])
    err = capsys.readouterr().err
    assert code == 2 and "DCH_16bit_seed0 (and 0 more) finished with other flags" in err
    assert "then: 10; now: 5" in err and "--redo_changed" in err
    assert rows(tmp_path) == first  # nothing ran, nothing was rewritten

    assert run_compare(tmp_path, tiny_data, "--radius", "1", "--method_flags", 'DCH=--gamma 5',
                       "--redo_changed") == 0
    out = capsys.readouterr().out
    assert "MMHH_16bit_seed0: done before, skipped" in out
    assert "redoing DCH_16bit_seed0: its flags changed (then: 10; now: 5)" in out
    assert "--gamma 5" in rows(tmp_path)[1]["flags"]


def test_an_interrupted_cell_resumes_from_its_last_snapshot_to_the_same_result(tmp_path, tiny_data, capsys):
    assert run_compare(tmp_path, tiny_data, "--methods", "MMHH", "--snapshot-interval", "3") == 0
    cell = tmp_path / "cmp" / "cells" / "MMHH_16bit_seed0"
    # A cell keeps its newest snapshot only (a claims run holds hundreds of cells).
    assert [p.name for p in (cell / "snapshot").iterdir()] == ["MMHH_16bit_seed0_tiny_tiny_iter_00006"]
    # A training flag overrides that: keep two, so that the snapshot of iteration 3 is there to resume from.
    keep_two = ["--methods", "MMHH", "--snapshot-interval", "3", "--keep_snapshots", "2", "--redo_changed"]
    assert run_compare(tmp_path, tiny_data, *keep_two) == 0
    finished = rows(tmp_path)[0]
    # As a stop at iteration 3..5 leaves it: the snapshot of iteration 3, no final snapshot or evaluation.
    for path in (cell / "snapshot").glob("*_iter_00006"):
        path.unlink()
    for path in (cell / "test_output").iterdir():
        shutil.rmtree(path)
    result = json.loads((cell / "result.json").read_text())
    (cell / "result.json").write_text(json.dumps({**result, "status": "interrupted"}))
    assert run_compare(tmp_path, tiny_data, *keep_two) == 0
    assert "resuming MMHH_16bit_seed0 from MMHH_16bit_seed0_tiny_tiny_iter_00003: it was interrupted before" \
        in capsys.readouterr().out
    assert "--resume" in (cell / "train.log").read_text()
    again = rows(tmp_path)[0]
    assert again["status"] == "ok" and again["map_radius_deephash"] == finished["map_radius_deephash"]
    assert float(again["seconds"]) > float(finished["seconds"])  # the interrupted part's time counts


def test_a_data_dir_inside_the_checkout_is_recorded_relative_so_a_clone_reuses_the_cells():
    inside = os.path.join(compare.REPO, "data")
    assert compare.repo_path(inside) == "data"
    assert compare.repo_path(os.path.join(compare.REPO, os.pardir, "elsewhere")) == \
        os.path.abspath(os.path.join(compare.REPO, os.pardir, "elsewhere"))
    current = ["--s_dataset", "tiny", "--data_dir", "data", "--lr", "0.01"]
    # A cell recorded with the absolute path of this checkout's data is the same cell.
    assert compare.flags_difference(["--s_dataset", "tiny", "--data_dir", inside, "--lr", "0.01"], current) == ""
    assert compare.flags_difference(["--s_dataset", "tiny", "--data_dir", "/other/data", "--lr", "0.01"],
                                    current) == "then: /other/data; now: data"


def test_a_signal_while_the_training_starts_still_stops_it(tmp_path, monkeypatch):
    real_popen = subprocess.Popen

    def popen_after_a_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would, between the log's creation and the start
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(runtime.subprocess, "Popen", popen_after_a_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    returncode, _, signalled = compare.run_forwarding_signals(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "train.log")
    assert signalled and returncode == -signal.SIGTERM and time.monotonic() - started < 30
    assert "time.sleep(60)" in (tmp_path / "train.log").read_text()
    assert signal.getsignal(signal.SIGTERM) == before
