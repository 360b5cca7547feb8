"""Plumbing shared by the scripts: devices, seeds, logging, atomic files, and clean error exits."""
import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile

import numpy as np
import torch

log = logging.getLogger("mmhh")


class CliError(Exception):
    """A failure the scripts report in one line, with this exit code."""
    exit_code = 2
    prefix = "error: "


class UsageError(CliError, ValueError):
    """A flag or file the user gave cannot be used; the message says which and how to fix it."""


def run_cli(main, argv=None):
    """Run ``main(argv)``; user errors print one line and an exit code, not a traceback.

    Bad data, flags, snapshots and weights raise CliError subclasses (DataError, UsageError,
    PretrainedWeightsError...) with messages written for the user; anything else is a bug and keeps
    its traceback.
    """
    try:
        return main(argv)
    except CliError as error:
        log.debug("failure", exc_info=True)
        print(f"{error.prefix}{error}", file=sys.stderr)
        return error.exit_code


class Stopped(Exception):
    """Work stopped early because a SIGINT or SIGTERM arrived; the argument says what was going on."""


class StopSignals:
    """While active, SIGINT and SIGTERM are only recorded, so that a run can finish a step and snapshot.

    Processes started meanwhile (DataLoader workers) inherit the recording handler, then ignore both.
    """

    def __init__(self):
        self.received = []
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame):
        self.received.append(signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def requested(self):
        return bool(self.received)

    @property
    def name(self):
        return signal.Signals(self.received[0]).name

    @property
    def exit_code(self):
        return 128 + self.received[0]


class ForwardedSignals(StopSignals):
    """While active, SIGINT and SIGTERM are recorded and passed on to the processes started with ``start``,
    so that `kill PID` on a runner stops its children cleanly instead of orphaning them. A signal that
    arrives before a child starts reaches it as it starts."""

    def __init__(self):
        super().__init__()
        self.children = []

    def _record(self, signum, frame):
        super()._record(signum, frame)
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def start(self, command, **popen_args):
        """subprocess.Popen(command, **popen_args), under the forwarding."""
        child = subprocess.Popen(command, **popen_args)
        self.children.append(child)
        if self.received:
            child.send_signal(self.received[0])
        return child


def str2bool(text):
    """Accept the release's `--opt-test True` as well as yes/no/1/0."""
    lowered = str(text).lower()
    if lowered in ("true", "yes", "1", "y"):
        return True
    if lowered in ("false", "no", "0", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def select_device(gpu_id):
    """``cuda:<gpu_id>`` when CUDA is there, else the CPU; ``--gpu_id cpu`` forces the CPU."""
    if gpu_id == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(gpu_id.split(",")[0])
    if index >= torch.cuda.device_count():
        raise UsageError(f"--gpu_id {gpu_id}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def autocast(device, enabled):
    """bfloat16 autocast on ``device`` when enabled (--amp); a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def seed_everything(seed):
    """Seed Python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed, rank_number):
    """The seed of a rank's own randomness (augmentation): ``seed`` itself on rank 0, so one process is
    unchanged, and an independent one on every other rank, so the ranks do not crop and flip alike."""
    if rank_number == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**63, rank_number]).generate_state(1)[0])

def setup_logging(log_dir, annotation, to_file=True):
    """Log to stdout and, with ``to_file``, to ``<log_dir>/<annotation>.log``."""
    logger = logging.getLogger("mmhh")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if to_file:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(log_dir, f"{annotation}.log")))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def atomic_write(path, write, durable=True):
    """Write ``path`` so that readers find the old file or the whole new one, never half of one.

    ``write(stream)`` fills a binary file in the same folder, which is flushed and synced to disk, given
    the permissions the user's umask gives a new file (0644 under 022), renamed onto ``path``; then the
    folder is synced so that the rename survives a crash too. The temporary file never outlives a failure.
    ``durable=False`` skips the two syncs, for bulk files that a rerun checks and rewrites anyway.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
        if durable:
            _fsync_folder(folder)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_bytes_atomically(path, data, durable=True):
    """Write ``data`` to ``path`` through ``atomic_write``."""
    atomic_write(path, lambda stream: stream.write(data), durable)


def write_text_atomically(path, text):
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_write``."""
    write_bytes_atomically(path, text.encode("utf-8"))


def _fsync_folder(folder):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def format_duration(seconds):
    """42s, 3m07s or 2h05m."""
    minutes, seconds = divmod(int(seconds), 60)
    if minutes == 0:
        return f"{seconds}s"
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"

