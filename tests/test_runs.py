"""Runs that survive: resume, interruption, atomic snapshots, non-finite losses, clear errors."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import loss
import test_mmhh
import train_mmhh
from conftest import tiny_train_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(tmp_path, iteration):
    return tmp_path / "snapshot" / f"t_tiny_tiny_iter_{iteration:05d}"


def cli(main, argv, capsys):
    """Exit code and stderr of a script run through its command-line wrapper."""
    code = train_mmhh.run_cli(main, argv)
    return code, capsys.readouterr().err


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, tiny_data):
    flags = tiny_train_flags(tmp_path, tiny_data, "--snapshot-interval", "10", "--batch_type", "BatchInitMem",
                             "--batch_params", "5")
    assert train_mmhh.main(flags) == 0
    straight = torch.load(snapshot(tmp_path, 20), weights_only=True)
    # The straight run went on to 20, so the resumed branch writes elsewhere (--snap_path may change).
    assert train_mmhh.main(["--resume", str(snapshot(tmp_path, 10)), "--log_dir", str(tmp_path / "log2"),
                            "--snap_path", f"{tmp_path}/branch/", "--test_output_dir", str(tmp_path / "out2")]) == 0
    resumed = torch.load(tmp_path / "branch" / "t_tiny_tiny_iter_00020", weights_only=True)
    assert not (tmp_path / "branch" / "t_tiny_tiny_iter_00010").exists()  # only from the resumed iteration on
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed["memory"]["codes"], straight["memory"]["codes"], atol=1e-6, rtol=0)


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_data, capsys):
    flags = tiny_train_flags(tmp_path, tiny_data, "--num_iters", "2")
    assert train_mmhh.main(flags) == 0
    code, err = cli(train_mmhh.main, ["--resume", str(snapshot(tmp_path, 2)), "--lr", "0.5"], capsys)
    assert code == 2 and "--lr" in err and "Traceback" not in err


def test_pre_model_path_initialises_weights_and_restarts_the_count(tmp_path, tiny_data):
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data, "--num_iters", "2")) == 0
    first = torch.load(snapshot(tmp_path, 2), weights_only=True)
    other = tmp_path / "second"
    flags = tiny_train_flags(other, tiny_data, "--num_iters", "1", "--pre_model_path", str(snapshot(tmp_path, 2)),
                             "--lr", "0")
    assert train_mmhh.main(flags) == 0
    second = torch.load(other / "snapshot" / "t_tiny_tiny_iter_00001", weights_only=True)
    assert second["iteration"] == 1
    # With lr 0 only BatchNorm's running statistics move; the weights are the loaded ones.
    torch.testing.assert_close(second["model"]["hash_layer.weight"], first["model"]["hash_layer.weight"])


def test_a_failed_write_leaves_the_previous_snapshot_intact(tmp_path, monkeypatch):
    path = tmp_path / "snap"
    checkpoint.save_snapshot(str(path), {"model": {"w": torch.ones(3)}})

    def broken_save(obj, stream):
        stream.write(b"half a snapshot")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(checkpoint.SnapshotWriteError, match=f"cannot write snapshot {path} .No space left"):
        checkpoint.save_snapshot(str(path), {"model": {"w": torch.zeros(3)}})
    assert torch.equal(checkpoint.load_snapshot(str(path))["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["snap"]


def test_a_non_finite_loss_stops_the_run_and_names_the_last_snapshot(tmp_path, tiny_data, monkeypatch, capsys):
    calls = []
    real_call = loss.HashingLoss.__call__

    def poisoned(self, *args, **kwargs):
        parts = real_call(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:
            parts["pair"] = parts["pair"] * float("nan")
            parts["total"] = parts["pair"]
        return parts

    monkeypatch.setattr(loss.HashingLoss, "__call__", poisoned)
    code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data, "--snapshot-interval", "3"), capsys)
    assert code == 3
    assert "iteration 5" in err and "pair nan" in err and str(snapshot(tmp_path, 3)) in err
    assert not snapshot(tmp_path, 6).exists() and "Traceback" not in err


def test_sigint_snapshots_and_the_snapshot_resumes(tmp_path, tiny_data):
    flags = tiny_train_flags(tmp_path, tiny_data, "--num_iters", "5000", "--print_every", "1")
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "train_mmhh.py"), *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_progress(process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err
    assert "resume with" in err and "Traceback" not in err
    resume_path = err.strip().splitlines()[-1].split("--resume ")[1]
    stopped_at = torch.load(resume_path, weights_only=True)["iteration"]
    assert stopped_at >= 3

    process = subprocess.Popen([sys.executable, os.path.join(REPO, "train_mmhh.py"), "--resume", resume_path],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_progress(process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    later = err.strip().splitlines()[-1].split("--resume ")[1]
    assert torch.load(later, weights_only=True)["iteration"] > stopped_at


def wait_for_progress(process, lines=3, timeout=120):
    """Read progress lines until a few iterations have run."""
    seen, deadline = 0, time.time() + timeout
    while seen < lines and time.time() < deadline:
        line = process.stdout.readline()
        assert line, "training ended before it made progress"
        seen += " iter " in line


@pytest.fixture
def broken_list(tiny_data):
    """Write a line into the tiny train list; returns a function taking the line's text."""
    def write(line):
        path = tiny_data / "tiny" / "train.txt"
        lines = path.read_text().splitlines()
        lines[4] = line
        path.write_text("\n".join(lines) + "\n")
        return f"{path}:5"
    return write


@pytest.mark.parametrize("line, message", [
    ("images/train_0_0.png 1 0", "2 labels, but the list's first line has 3"),
    ("images/train_0_0.png 1 2 0", "label '2' is not 0 or 1"),
])
def test_bad_list_lines_name_file_and_line(tmp_path, tiny_data, broken_list, capsys, line, message):
    where = broken_list(line)
    code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data), capsys)
    assert code == 2 and where in err and message in err and "Traceback" not in err


def test_missing_image_is_named_before_training(tmp_path, tiny_data, capsys):
    os.remove(tiny_data / "tiny" / "images" / "database_1_2.png")
    code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data), capsys)
    assert code == 2 and "database_1_2.png" in err
    assert not (tmp_path / "snapshot").exists()


def test_empty_list(tmp_path, tiny_data, capsys):
    (tiny_data / "tiny" / "train.txt").write_text("\n")
    code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data), capsys)
    assert code == 2 and "train.txt: the list is empty" in err


def test_unknown_dataset_lists_the_names_and_the_build_command(tmp_path, tiny_data, capsys):
    flags = tiny_train_flags(tmp_path, tiny_data) + ["--s_dataset", "tinyy"]
    code, err = cli(train_mmhh.main, flags, capsys)
    assert code == 2 and "unknown dataset 'tinyy'" in err and "tiny" in err and "pre_process.py" in err


def test_invalid_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mmhh.parse_args(["--distance_type", "Cosine"])
    assert exit_info.value.code == 2 and "--distance_type" in capsys.readouterr().err


def test_missing_and_corrupt_snapshots_are_named(tmp_path, tiny_data, capsys):
    missing = tmp_path / "nope"
    code, err = cli(test_mmhh.main, ["--model_path", str(missing), "--log_dir", str(tmp_path)], capsys)
    assert code == 2 and str(missing) in err and "does not exist" in err
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(b"not a snapshot")
    code, err = cli(train_mmhh.main, ["--resume", str(corrupt)], capsys)
    assert code == 2 and str(corrupt) in err and "cannot be read" in err


def test_snapshot_that_does_not_match_the_flags(tmp_path, tiny_data, capsys):
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data, "--num_iters", "1")) == 0
    argv = ["--model_path", str(snapshot(tmp_path, 1)), "--hash_bit", "32", "--data_dir", str(tiny_data),
            "--log_dir", str(tmp_path)]
    code, err = cli(test_mmhh.main, argv, capsys)
    assert code == 2 and "--hash_bit 16" in err and "--hash_bit 32" in err


def test_check_validates_without_training(tmp_path, tiny_data, capsys):
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data, "--check")) == 0
    assert "check passed" in capsys.readouterr().out
    assert not (tmp_path / "snapshot").exists()
    (tiny_data / "tiny" / "images" / "test_2_1.png").write_bytes(b"not a png")
    code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data, "--check"), capsys)
    assert code == 2 and "test_2_1.png" in err and "test.txt:" in err


def test_evaluation_sampling_is_seeded_and_reported(tmp_path, tiny_data):
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data, "--num_iters", "1")) == 0
    argv = ["--model_path", str(snapshot(tmp_path, 1)), "--data_dir", str(tiny_data), "--log_dir", str(tmp_path),
            "--test_sample_ratio", "0.5", "--workers", "0", "--gpu_id", "cpu"]
    outputs = []
    for run in ("a", "b"):
        assert test_mmhh.main(argv + ["--output_path", str(tmp_path / run)]) == 0
        outputs.append(np.load(tmp_path / run / "test_code.npy"))
    assert outputs[0].shape[0] == 4 and np.array_equal(outputs[0], outputs[1])
    assert "test: evaluating 4 of 9 items" in (tmp_path / "empty.log").read_text()
