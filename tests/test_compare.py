"""compare.py on tiny data: the cells, the CSV, the table and the plot, skipping and failed cells."""
import csv
import os
import signal
import subprocess
import sys
import time

import compare

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
    assert "MAP@H<=2, deephash convention" in table and "mmhh convention" in table and "**" in table
    assert "MMHH: mmhh_release" in table and "DCH: dch_deephash" in table
    # Shared flags win over the recipes, so the table says which were given.
    assert "which win over the recipes: `--image_network ResNetFc" in table and "--num_iters 6`" in table
    assert (tmp_path / "cmp" / "map_vs_bits.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "[2/2] DCH_16bit_seed0: MAP@H<=2" in out and "left" in out
    # The recipe and the shared flags reach the run; --num_iters overrides the recipe's 1000 / 2000.
    log = (tmp_path / "cmp" / "cells" / "DCH_16bit_seed0" / "train.log").read_text()
    assert "--recipe dch_deephash" in log and "iter 00006/00006" in log

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
    assert [(r["method"], r["status"]) for r in rows(tmp_path)] == [("MMHH", "interrupted")]
    assert not (tmp_path / "cmp" / "cells" / "DCH_16bit_seed0").exists()
