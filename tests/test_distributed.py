"""Training on two processes with gloo on the CPU, as torchrun runs it (README: Many GPUs).

The unit-level check spawns two ranks that train a network without batch-norm on the same global batches as
one process: losses, gradients, weights and the semi-batch memory must agree. The end-to-end checks launch
train_mmhh.py with torchrun: one set of files, an exact resume, SIGTERM to every process, a dead process.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import checkpoint
import data_list
import distributed
import network
import runtime
import test_mmhh
import train_mmhh
from conftest import tiny_train_flags, write_tiny_dataset
from test_runs import REPO, snapshot, wait_for_progress

STEPS = 4
# One loss and memory schedule per distance type: in-batch pairs, the warm-up into the memory, the memory;
# and HashNet's half-batch pairing.
CONFIGS = {
    "mmhh": ["--distance_type", "MMHH", "--batch_type", "BatchInitMem", "--batch_params", "2"],
    "dch": ["--distance_type", "DCH", "--batch_type", "SemiMem", "--semi_init_type", "RANDOM"],
    "hashnet": ["--distance_type", "HashNet", "--image_loss_type", "HashNet", "--similar_weight", "auto"],
    "hashnet_halves": ["--distance_type", "HashNet", "--hashnet_pairing", "halves"],  # halves of the global batch
}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def small_network(image_network, hash_bit, backbone=None, pretrained="none", continuation=False):
    """A hashing network without batch-norm or dropout, so a split batch gives the same outputs."""
    features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU())
    return network.HashNetwork(features, 32, hash_bit, continuation)


def join_as_rank(rank, world_size, port):
    """This spawned process as torchrun would start rank ``rank``, building the small network."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    network.build_network = checkpoint.build_network = small_network


def train_steps(rank, world_size, port, data_dir, out_dir):
    """STEPS training steps of every CONFIG on this rank, and a flag mistake; saves what each rank saw."""
    join_as_rank(rank, world_size, port)
    with distributed.process_group(timeout_s=60):
        for name, flags in CONFIGS.items():
            torch.save(train_config(flags, data_dir), os.path.join(out_dir, f"{name}_{world_size}_{rank}.pt"))
        odd_batch, _ = train_mmhh.parse_args(["--batch_size", "7"])
        try:
            distributed.rank_zero_first(train_mmhh.finish_args, odd_batch)
        except runtime.UsageError as error:
            outcome = f"error: {error}"
        except SystemExit as leaving:  # quietly: rank 0 reports it
            outcome = f"exit {leaving.code}"
        torch.save(outcome, os.path.join(out_dir, f"odd_batch_{rank}.pt"))


def train_config(flags, data_dir):
    args, _ = train_mmhh.parse_args(["--hash_bit", "16", "--batch_size", "8", "--resize_size", "20",
                                     "--crop_size", "16", "--workers", "0", "--gpu_id", "cpu", "--lr", "0.01",
                                     "--similar_weight", "1", "--loss_lambda", "0.1", *flags])
    train_mmhh.finish_args(args)
    spec = data_list.resolve_dataset("tiny", data_dir, needs=("train",))
    train_list = data_list.read_checked_list(spec, "train")
    paths, labels = train_list.paths, train_list.labels
    torch.manual_seed(0)
    run = train_mmhh.build_run(args, spec, labels, torch.device("cpu"), runtime.StopSignals())
    train_mmhh.initialise_run(run, args, paths, labels)
    # The test transform: no random augmentation, so one process and two see the same images.
    images = data_list.ImageList(paths, labels, data_list.test_transform(args.resize_size, args.crop_size))
    batches = iter(data_list.training_loader(images, args.batch_size, 0, args.seed, 0, distributed.shard()))
    values = [train_mmhh.train_step(run, iteration, *next(batches))[0] for iteration in range(STEPS)]
    return {"values": values, "weights": run.model.state_dict(), "memory": run.memory.codes.clone(),
            "grads": {name: p.grad.clone() for name, p in run.model.named_parameters()}}


def test_two_ranks_give_the_loss_gradients_weights_and_memory_of_one_process(tmp_path, tiny_data, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(network, "build_network", small_network)
    try:
        torch.set_num_threads(1)
        alone = {name: train_config(flags, str(tiny_data)) for name, flags in CONFIGS.items()}
    finally:
        torch.set_num_threads(threads)
    mp.spawn(train_steps, args=(2, free_port(), str(tiny_data), str(tmp_path)), nprocs=2)
    for name in CONFIGS:
        ranks = [torch.load(tmp_path / f"{name}_2_{rank}.pt", weights_only=True) for rank in range(2)]
        for rank in ranks:
            for step, (got, expected) in enumerate(zip(rank["values"], alone[name]["values"])):
                for part in ("total", "pair", "quantization"):
                    assert got[part] == pytest.approx(expected[part], abs=1e-5), (name, step, part)
            for kind in ("weights", "grads"):
                for key, value in alone[name][kind].items():
                    torch.testing.assert_close(rank[kind][key], value, atol=1e-5, rtol=1e-5,
                                               msg=f"{name} {kind} {key}")
            torch.testing.assert_close(rank["memory"], alone[name]["memory"], atol=1e-5, rtol=0)
        assert torch.equal(ranks[0]["memory"], ranks[1]["memory"])  # the same on every rank, bit for bit
    # A flag mistake: rank 0 reports it, the other rank leaves quietly with its exit status.
    assert torch.load(tmp_path / "odd_batch_0.pt") == ("error: --batch_size 7: the global batch must split evenly "
                                                      "over the 2 processes; use a multiple of 2")
    assert torch.load(tmp_path / "odd_batch_1.pt") == "exit 2"


def evaluation_flags(model_path, data_dir, output_dir):
    return ["--model_path", str(model_path), "--data_dir", str(data_dir), "--workers", "0", "--gpu_id", "cpu",
            "--batch_size", "4", "--log_dir", str(output_dir), "--output_path", str(output_dir)]


def evaluate_on_rank(rank, world_size, port, model_path, data_dir, output_dir):
    """test_mmhh.py's evaluation on this rank's share of the lists, as train_mmhh.py's final evaluation runs
    under torchrun: rank 0 gathers the codes, scores them and writes metrics.json."""
    join_as_rank(rank, world_size, port)
    with distributed.process_group(timeout_s=60):
        test_mmhh.main(evaluation_flags(model_path, data_dir, f"{output_dir}/rank{rank}"))


def assert_same_figures(got, expected, where):
    """Every number equal to 1e-6, every other value exactly, through nested dicts and lists."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same_figures(got[key], expected[key], f"{where}: {key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for index, (mine, theirs) in enumerate(zip(got, expected)):
            assert_same_figures(mine, theirs, f"{where}[{index}]")
    elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9, nan_ok=True), where
    else:
        assert got == expected, where


def test_a_two_process_evaluation_gives_every_figure_of_one_process(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(network, "build_network", small_network)
    monkeypatch.setattr(checkpoint, "build_network", small_network)
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data, "--num_iters", "2")) == 0
    model_path = snapshot(tmp_path, 2)
    assert test_mmhh.main(evaluation_flags(model_path, tiny_data, tmp_path / "alone")) == 0
    mp.spawn(evaluate_on_rank, args=(2, free_port(), str(model_path), str(tiny_data), str(tmp_path / "two")),
             nprocs=2)
    alone, two = tmp_path / "alone", tmp_path / "two" / "rank0"
    assert not (tmp_path / "two" / "rank1" / "metrics.json").exists()  # rank 0 alone scores and writes
    expected, sharded = (json.loads((folder / "metrics.json").read_text()) for folder in (alone, two))
    # Codes that do not collapse: database rows a missing combine left at zero would change the figures.
    assert expected["distinct_codes"] >= 6 and expected["num_database"] == 18 and expected["num_queries"] == 9
    assert_same_figures(sharded, expected, "metrics.json")
    for name in ("database_code", "test_code", "database_labels", "test_labels"):
        np.testing.assert_allclose(np.load(two / f"{name}.npy"), np.load(alone / f"{name}.npy"), rtol=0, atol=1e-6)


def test_each_rank_takes_its_slice_of_the_single_process_batch():
    alone = iter(data_list.EpochBatchSampler(20, 6, seed=3, start_iteration=2))
    ranks = [iter(data_list.EpochBatchSampler(20, 6, seed=3, start_iteration=2, shard=(rank, 3))) for rank in range(3)]
    for _ in range(7):  # across an epoch boundary
        assert sum((next(rank) for rank in ranks), []) == next(alone)


def test_a_resume_takes_the_timeout_and_overwrite_of_its_own_command():
    given, explicit = train_mmhh.parse_args(["--resume", "snap"])
    saved = {**vars(train_mmhh.parse_args([])[0]), "dist_timeout": 30.0, "overwrite": True}
    args = train_mmhh.resumed_args(given, explicit, saved, "snap")
    assert args.dist_timeout == 600.0 and not args.overwrite


def torchrun(flags):
    """train_mmhh.py under torchrun with two gloo processes, in a session of its own (as a scheduler)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(REPO, "train_mmhh.py"), *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_pid(launcher, rank):
    """The process id of ``rank`` among torchrun's children."""
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as handle:
        for child in handle.read().split():
            with open(f"/proc/{child}/environ", "rb") as environ:
                if f"RANK={rank}".encode() in environ.read().split(b"\0"):
                    return int(child)
    raise AssertionError(f"no rank {rank} among torchrun's children")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 10-iteration run of two processes with snapshots at 5 and 10: (folder, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    write_tiny_dataset(str(folder / "data"))
    flags = tiny_train_flags(folder, folder / "data", "--num_iters", "10", "--snapshot-interval", "5",
                             "--print_every", "5", "--batch_type", "BatchInitMem", "--batch_params", "3")
    launcher = torchrun(flags)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    return folder, out, err


def test_a_two_process_run_writes_one_set_of_files(two_rank_run, capsys):
    folder, out, _ = two_rank_run
    assert "torchrun: 2 processes on 1 node(s), gloo; global batch 8 = 2 x 4" in out
    assert out.count("iter 00005/00010") == 1
    assert "[rank 1]" not in out  # the other rank logs warnings and errors only
    assert os.listdir(folder / "log") == ["t.log"] and len(os.listdir(folder / "runs" / "t")) == 1
    assert sorted(os.listdir(folder / "snapshot")) == ["t_tiny_tiny_iter_00005", "t_tiny_tiny_iter_00010"]
    assert os.listdir(folder / "test_output") == ["t_iter_00010"]
    saved = torch.load(snapshot(folder, 10), weights_only=True)
    assert not any(key.startswith("module.") for key in saved["model"]) and len(saved["other_ranks_rng"]) == 1
    # The snapshot evaluates on one process.
    argv = ["--model_path", str(snapshot(folder, 10)), "--data_dir", str(folder / "data"), "--workers", "0",
            "--gpu_id", "cpu", "--log_dir", str(folder / "eval"), "--output_path", str(folder / "eval")]
    assert test_mmhh.main(argv) == 0


def test_a_two_process_run_resumes_exactly_on_two_processes_and_on_one(two_rank_run, capsys):
    folder, _, _ = two_rank_run
    branch = ["--resume", str(snapshot(folder, 5)), "--snap_path", f"{folder}/branch/", "--test_output_dir",
              str(folder / "branch_out"), "--log_dir", str(folder / "branch_log")]
    resumed = torchrun(branch)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    straight = torch.load(snapshot(folder, 10), weights_only=True)
    again = torch.load(folder / "branch" / "t_tiny_tiny_iter_00010", weights_only=True)
    for key, value in straight["model"].items():
        torch.testing.assert_close(again["model"][key], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(again["memory"]["codes"], straight["memory"]["codes"], atol=1e-6, rtol=0)
    # On one process: the same global batches; it goes on and says what differs.
    alone = ["--resume", str(snapshot(folder, 5)), "--snap_path", f"{folder}/alone/", "--test_output_dir",
             str(folder / "alone_out"), "--log_dir", str(folder / "alone_log")]
    assert train_mmhh.main(alone) == 0
    assert "trained by 2 process(es), it goes on with 1" in capsys.readouterr().out
    assert (folder / "alone" / "t_tiny_tiny_iter_00010").is_file()


def test_sigterm_to_every_process_gives_one_snapshot_and_one_resume_command(tmp_path, tiny_data):
    flags = tiny_train_flags(tmp_path, tiny_data, "--num_iters", "5000", "--print_every", "1")
    launcher = torchrun(flags)
    wait_for_progress(launcher)
    os.killpg(launcher.pid, signal.SIGTERM)  # scancel: torchrun and both ranks
    _, err = launcher.communicate(timeout=120)
    assert err.count("resume with:") == 1, err
    command = err.split("resume with:\n")[1].splitlines()[0].strip()
    assert command.startswith("torchrun --nproc_per_node 2 train_mmhh.py --resume ")
    stopped_at = int(err.split("stopped by SIGTERM at iteration ")[1].split(";")[0])
    saved = torch.load(command.split("--resume ")[1], weights_only=True)
    assert saved["iteration"] == stopped_at


@pytest.mark.parametrize("fate", ["killed", "frozen"])
def test_a_dead_or_frozen_process_stops_the_other_with_one_line(tmp_path, tiny_data, fate):
    flags = tiny_train_flags(tmp_path, tiny_data, "--num_iters", "5000", "--print_every", "1",
                             "--dist_timeout", "10")
    launcher = torchrun(flags)
    wait_for_progress(launcher)
    victim = rank_pid(launcher, 1)
    os.kill(victim, signal.SIGKILL if fate == "killed" else signal.SIGSTOP)
    started = time.time()
    # Rank 0 reports within the timeout; then the frozen one is killed so that torchrun need not wait for it.
    for line in launcher.stderr:
        if "rank 0: another process of this run died or did not answer" in line:
            break
    assert time.time() - started < 30
    assert "--dist_timeout 10 s" in line and "Resume from the run's newest snapshot" in line
    if fate == "frozen":
        os.kill(victim, signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
