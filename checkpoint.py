"""Snapshots: tensors and plain data only, written atomically, loadable with weights_only=True."""
import glob
import os
import random

import numpy as np
import torch

from network import build_network
from runtime import CliError, UsageError, atomic_write

FORMAT = "mmhh-snapshot/1"


class SnapshotWriteError(CliError):
    """A snapshot could not be written (disk full, no permission); the previous one is intact."""


def snapshot_prefix(args):
    """``<snap_path><annotation>_<s_dataset>_<t_dataset>_iter_``: every snapshot of a run starts so."""
    return f"{args.snap_path}{args.annotation}_{args.s_dataset}_{args.t_dataset}_iter_"


def snapshot_path(args, iteration):
    """``<snap_path><annotation>_<s_dataset>_<t_dataset>_iter_<NNNNN>``, no extension, as released."""
    return f"{snapshot_prefix(args)}{iteration:05d}"


def existing_snapshots(args):
    """{iteration: path} of the run's snapshots on disk."""
    prefix = snapshot_prefix(args)
    found = {}
    for path in glob.glob(glob.escape(prefix) + "*"):
        suffix = path[len(prefix):]
        if suffix.isdigit():
            found[int(suffix)] = path
    return found


def prune_snapshots(args, keep, protected):
    """Remove the run's snapshots but the newest ``keep`` and every path in ``protected``; the removed."""
    ordered = [path for _, path in sorted(existing_snapshots(args).items())]
    doomed = [path for path in ordered[:-keep] if path not in protected]
    for path in doomed:
        os.remove(path)
    return doomed


def save_snapshot(path, state):
    """Write ``state`` (a dict of tensors and plain data) to ``path`` atomically.

    A disk that is full or a folder without permission raise SnapshotWriteError naming the path; what
    was at ``path`` before, and every other snapshot, stays as it was.
    """
    try:
        atomic_write(path, lambda stream: torch.save({"format": FORMAT, **state}, stream))
    except OSError as error:
        raise SnapshotWriteError(f"cannot write snapshot {path} ({error.strerror or error})") from None
    except RuntimeError as error:  # torch reports a failed write of its archive as a RuntimeError
        if "write" not in str(error).lower():
            raise
        raise SnapshotWriteError(f"cannot write snapshot {path} ({error})") from None


def load_snapshot(path, map_location="cpu"):
    """The dict saved by ``save_snapshot``; a UsageError naming the path when it is missing or corrupt."""
    if not os.path.isfile(path):
        raise UsageError(f"snapshot {path} does not exist (snapshots are named "
                         "<snap_path><annotation>_<s_dataset>_<t_dataset>_iter_<NNNNN>)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise UsageError(f"snapshot {path} cannot be read ({type(error).__name__}: {error}); it is "
                         "corrupt, truncated, or a pickled model of the original release") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UsageError(f"snapshot {path} is not an MMHH snapshot of this project (format {FORMAT})")
    return state


def check_network_matches(snapshot_args, path, **given):
    """Fail when a flag given now contradicts the network a snapshot was trained with."""
    for flag, value in given.items():
        if value is not None and snapshot_args.get(flag) != value:
            raise UsageError(f"snapshot {path} was trained with --{flag} {snapshot_args.get(flag)}, "
                             f"but --{flag} {value} was given; drop the flag or pick a matching snapshot")


def capture_rng_state():
    """Python, numpy and torch generator states as tensors and plain data."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def rng_entries(states):
    """Snapshot entries of every rank's generator states: ``rng`` is rank 0's (a single process's), and
    ``other_ranks_rng`` lists the other ranks' in rank order, when there are any."""
    return {"rng": states[0], **({"other_ranks_rng": states[1:]} if len(states) > 1 else {})}


def saved_world_size(snapshot):
    """How many processes trained the run a snapshot saved."""
    return 1 + len(snapshot.get("other_ranks_rng", []))


def rank_rng_state(snapshot, rank):
    """The generator states ``rank`` saved, or None when the saved run had fewer ranks."""
    states = [snapshot["rng"], *snapshot.get("other_ranks_rng", [])]
    return states[rank] if rank < len(states) else None


def restore_rng_state(state):
    """Undo ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    # A snapshot from a machine with more GPUs restores the generators of the GPUs this one has.
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def encoder_from_snapshot(args, device):
    """(snapshot, its network in eval mode on ``device``) of ``args.model_path``; the image sizes not given
    as flags become the snapshot's, so images are encoded as its training's evaluation encoded them."""
    snapshot = load_snapshot(args.model_path)
    args.resize_size = args.resize_size or snapshot["args"]["resize_size"]
    args.crop_size = args.crop_size or snapshot["args"]["crop_size"]
    return snapshot, model_from_snapshot(snapshot).to(device).eval()


def model_from_snapshot(snapshot):
    """The hashing network a snapshot describes, with its trained weights."""
    args = snapshot["args"]
    model = build_network(args["image_network"], args["hash_bit"], backbone=args["backbone"],
                          pretrained="none", continuation=args["image_loss_type"] == "HashNet")
    model.load_state_dict(snapshot["model"])
    return model
