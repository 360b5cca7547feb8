"""Plumbing shared by the scripts: devices, seeds, logging, atomic files, and clean error exits."""
import argparse
import logging
import os
import random
import sys
import tempfile

import numpy as np
import torch

log = logging.getLogger("mmhh")


class CliError(Exception):
    """A failure the scripts report in one line, with this exit code."""
    exit_code = 2


class UsageError(CliError, ValueError):
    """A flag or file the user gave cannot be used; the message says which and how to fix it."""


def run_cli(main, argv=None):
    """Run ``main(argv)``; expected failures print one line and an exit code, not a traceback.

    Bad data, flags, snapshots and weights raise CliError or ValueError subclasses (DataError,
    UsageError, PretrainedWeightsError) with messages written for the user; anything else is a bug
    and keeps its traceback.
    """
    try:
        return main(argv)
    except (CliError, ValueError, FileNotFoundError) as error:
        log.debug("failure", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)


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


def setup_logging(log_dir, annotation):
    """Log to stdout and to ``<log_dir>/<annotation>.log``."""
    os.makedirs(log_dir, exist_ok=True)
    logger = logging.getLogger("mmhh")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout),
                    logging.FileHandler(os.path.join(log_dir, f"{annotation}.log"))):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def atomic_write(path, write):
    """Call ``write(tmp_path)``, then rename onto ``path``: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_text_atomically(path, text):
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_write``."""
    def write(tmp_path):
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
    atomic_write(path, write)


def format_duration(seconds):
    """42s, 3m07s or 2h05m."""
    minutes, seconds = divmod(int(seconds), 60)
    if minutes == 0:
        return f"{seconds}s"
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"

