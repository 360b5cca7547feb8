"""Runs under a scheduler: signals to the process group, resuming elsewhere, no silent overwrites,
snapshot retention, early checks, undecodable images, file permissions, and which errors are one line."""
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

import checkpoint
import evaluation
import runtime
import train_mmhh
from conftest import tiny_train_flags
from test_runs import REPO, cli, snapshot, wait_for_progress


def start_in_own_group(flags):
    """A training process in a new session, as a scheduler starts one, so the group can be signalled."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train_mmhh.py"), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_sigterm_to_the_process_group_with_workers_snapshots_and_resumes(tmp_path, tiny_data):
    flags = tiny_train_flags(tmp_path, tiny_data, "--num_iters", "5000", "--print_every", "1", "--workers", "2")
    process = start_in_own_group(flags)
    wait_for_progress(process)
    os.killpg(process.pid, signal.SIGTERM)  # what scancel, timeout and docker stop do
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "killed by signal" not in err
    resume_path = err.strip().splitlines()[-1].split("--resume ")[1]
    stopped_at = torch.load(resume_path, weights_only=True)["iteration"]

    process = start_in_own_group(["--resume", resume_path, "--workers", "2"])
    wait_for_progress(process)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err
    later = err.strip().splitlines()[-1].split("--resume ")[1]
    assert torch.load(later, weights_only=True)["iteration"] > stopped_at


class ArmedStop(runtime.StopSignals):
    """StopSignals that behaves as if SIGTERM arrived once ``armed`` is set."""
    armed = False

    def requested(self):
        if ArmedStop.armed and not self.received:
            self.received.append(signal.SIGTERM)
        return bool(self.received)


@pytest.fixture
def armed_stop(monkeypatch):
    ArmedStop.armed = False
    monkeypatch.setattr(train_mmhh, "StopSignals", ArmedStop)
    return ArmedStop


def test_a_stop_while_initialising_the_memory_says_nothing_was_saved(tmp_path, tiny_data, armed_stop, capsys):
    armed_stop.armed = True
    code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data, "--batch_type", "SemiMem"), capsys)
    assert code == 143 and "while initialising the memory" in err and "--overwrite" in err
    assert not (tmp_path / "snapshot").exists()


def test_a_stop_during_the_final_evaluation_names_the_final_snapshot(tmp_path, tiny_data, armed_stop, monkeypatch,
                                                                       capsys):
    real = evaluation.evaluate_model

    def arm_then_evaluate(*args, **kwargs):
        armed_stop.armed = True
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_model", arm_then_evaluate)
    code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data), capsys)
    assert code == 143 and "during the final evaluation" in err
    assert f"python test_mmhh.py --model_path {snapshot(tmp_path, 20)}" in err
    assert snapshot(tmp_path, 20).exists()


def test_a_new_run_does_not_overwrite_an_earlier_one(tmp_path, tiny_data, capsys):
    flags = tiny_train_flags(tmp_path, tiny_data, "--num_iters", "2")
    assert train_mmhh.main(flags) == 0
    before = snapshot(tmp_path, 2).stat().st_mtime_ns
    code, err = cli(train_mmhh.main, flags, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a run of that name exists" in err and "snapshot" in err and "t.log" in err
    assert "--annotation NEW" in err and "--overwrite" in err
    assert snapshot(tmp_path, 2).stat().st_mtime_ns == before
    assert train_mmhh.main(flags + ["--overwrite"]) == 0
    assert snapshot(tmp_path, 2).stat().st_mtime_ns != before


def test_a_resume_keeps_the_later_snapshots_of_the_old_branch(tmp_path, tiny_data, capsys):
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data, "--snapshot-interval", "5",
                                            "--keep_snapshots", "0")) == 0
    later = snapshot(tmp_path, 15).stat().st_mtime_ns
    code, err = cli(train_mmhh.main, ["--resume", str(snapshot(tmp_path, 10))], capsys)
    assert code == 2 and "t_tiny_tiny_iter_00015" in err and "--snap_path NEW/" in err
    assert snapshot(tmp_path, 15).stat().st_mtime_ns == later
    # A branch written elsewhere leaves the old one whole.
    assert train_mmhh.main(["--resume", str(snapshot(tmp_path, 10)), "--snap_path", f"{tmp_path}/branch/",
                            "--test_output_dir", str(tmp_path / "branch_out")]) == 0
    assert (tmp_path / "branch" / "t_tiny_tiny_iter_00020").is_file() and snapshot(tmp_path, 20).is_file()


def test_snapshots_default_to_every_200_and_only_the_newest_are_kept(tmp_path, tiny_data):
    args, _ = train_mmhh.parse_args([])
    assert args.snapshot_interval == 200 and args.keep_snapshots == 2
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data, "--snapshot-interval", "4")) == 0
    assert sorted(os.listdir(tmp_path / "snapshot")) == ["t_tiny_tiny_iter_00016", "t_tiny_tiny_iter_00020"]
    # A resume never removes the snapshot it started from, nor the final one.
    assert train_mmhh.main(["--resume", str(snapshot(tmp_path, 16)), "--num_iters", "20", "--overwrite",
                            "--keep_snapshots", "1"]) == 0
    assert sorted(os.listdir(tmp_path / "snapshot")) == ["t_tiny_tiny_iter_00016", "t_tiny_tiny_iter_00020"]


@pytest.mark.parametrize("extra, message", [
    (["--radius", "17"], "--radius 17: a Hamming radius between 0 and --hash_bit 16"),
    (["--topk", "0"], "--topk 0"),
    (["--test_sample_ratio", "1.5"], "--test_sample_ratio 1.5"),
    (["--similar_weight", "-2"], "--similar_weight '-2'"),
    (["--semi_init_momentum", "2"], "--semi_init_momentum 2.0"),
])
def test_evaluation_and_loss_flags_fail_before_training(tmp_path, tiny_data, capsys, extra, message):
    for check in ([], ["--check"]):
        code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data, *extra, *check), capsys)
        assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "snapshot").exists() and not (tmp_path / "log").exists()


def test_an_output_folder_that_cannot_be_written_is_named_up_front(tmp_path, tiny_data, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    flags = tiny_train_flags(tmp_path, tiny_data, "--runs_dir", str(blocker / "runs"))
    code, err = cli(train_mmhh.main, flags, capsys)
    assert code == 2 and f"--runs_dir {blocker / 'runs'}" in err and "is a file" in err
    assert not (tmp_path / "snapshot").exists()


def test_an_image_that_does_not_decode_stops_training_with_a_snapshot(tmp_path, tiny_data, capsys):
    # The file exists (so the up-front check passes) but is not an image.
    (tiny_data / "tiny" / "images" / "train_2_7.png").write_bytes(b"not a png at all")
    flags = tiny_train_flags(tmp_path, tiny_data, "--workers", "2", "--num_iters", "40")
    code, err = cli(train_mmhh.main, flags, capsys)
    line = 8 * 2 + 7 + 1  # 8 images a class, class 2, item 7
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"train.txt:{line}: {tiny_data / 'tiny' / 'images' / 'train_2_7.png'}: cannot be decoded" in err
    assert "python train_mmhh.py --resume" in err
    saved = err.split("--resume ")[1].strip()
    assert os.path.isfile(saved) and torch.load(saved, weights_only=True)["iteration"] < 40
    # --check decodes every image, so it finds this one before any training.
    code, err = cli(train_mmhh.main, flags + ["--check", "--annotation", "c"], capsys)
    assert code == 2 and f"train.txt:{line}" in err


def test_files_are_written_with_the_users_umask_and_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    previous = os.umask(0o022)
    try:
        checkpoint.save_snapshot(str(tmp_path / "snap"), {"model": {"w": torch.ones(2)}})
        runtime.write_text_atomically(str(tmp_path / "metrics.json"), "{}")
    finally:
        os.umask(previous)
    for name in ("snap", "metrics.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert len(synced) == 4  # each file and, after its rename, the folder
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "snap"]


def test_a_full_disk_while_snapshotting_is_one_line_and_keeps_the_previous(tmp_path, tiny_data, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save_then_fill_up(obj, stream):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, stream)

    monkeypatch.setattr(torch, "save", save_then_fill_up)
    code, err = cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data, "--snapshot-interval", "5"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot write snapshot {snapshot(tmp_path, 10)} (No space left on device)" in err
    assert f"the previous snapshot {snapshot(tmp_path, 5)} is intact" in err
    assert torch.load(snapshot(tmp_path, 5), weights_only=True)["iteration"] == 5
    assert sorted(os.listdir(tmp_path / "snapshot")) == ["t_tiny_tiny_iter_00005"]


def test_only_user_errors_lose_their_traceback(tmp_path, tiny_data, monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise ValueError("a programming error")

    monkeypatch.setattr(train_mmhh, "learning_rate", bug)
    with pytest.raises(ValueError, match="a programming error"):
        train_mmhh.run_cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data))


def test_a_snapshot_from_a_machine_with_more_gpus_restores_on_this_one(monkeypatch):
    state = checkpoint.capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 4  # four GPUs there
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, device: restored.append(device))
    checkpoint.restore_rng_state(state)
    assert restored == [0]


def test_a_failed_start_does_not_block_its_rerun(tmp_path, tiny_data, capsys):
    # Bad input stops the run before any snapshot: fixed, the same command runs, no --overwrite needed.
    train = tiny_data / "tiny" / "train.txt"
    good = train.read_text()
    lines = good.splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0]  # a label missing
    train.write_text("\n".join(lines) + "\n")
    flags = tiny_train_flags(tmp_path, tiny_data, "--num_iters", "2")
    code, err = cli(train_mmhh.main, flags, capsys)
    assert code == 2 and "train.txt:4" in err
    assert (tmp_path / "log" / "t.log").exists() and not snapshot(tmp_path, 2).exists()
    train.write_text(good)
    assert train_mmhh.main(flags) == 0 and snapshot(tmp_path, 2).exists()
    # The failed start's lines stay: the rerun appends to the log.
    assert (tmp_path / "log" / "t.log").read_text().count("similar-pair weight 1 (--similar_weight") == 2
