"""The files a training run writes, checked before it starts: writable folders and no silent overwrite.

A run named by --annotation writes its snapshots (``<snap_path><annotation>_<s>_<t>_iter_<N>``), the
log ``<log_dir>/<annotation>.log``, TensorBoard events under ``<runs_dir>/<annotation>/`` and its
final evaluation under ``<test_output_dir>/<annotation>_iter_<N>/`` (README: Long runs). A new run
stops unless --overwrite when a run of its name wrote a snapshot or a test output (a start that failed
before either is rerun as it is); a resumed run may not overwrite snapshots from later in the run it
continues, which another branch of it wrote.
"""
import glob
import os
import shutil
import tempfile

import checkpoint
from runtime import UsageError

# Flags that name output folders, and the folder each names.
OUTPUT_FOLDERS = {"--snap_path": lambda args: os.path.dirname(args.snap_path) or ".",
                  "--log_dir": lambda args: args.log_dir, "--runs_dir": lambda args: args.runs_dir,
                  "--test_output_dir": lambda args: args.test_output_dir}


def check_writable(args):
    """Every output folder takes a file, or can be made where it is missing; a UsageError names the flag."""
    for flag, folder_of in OUTPUT_FOLDERS.items():
        folder = folder_of(args)
        problem = writable_problem(folder)
        if problem:
            raise UsageError(f"{flag} {folder}: {problem}; pass a folder you can write to")


def writable_problem(folder):
    """Why no file could be written in ``folder``, or None; nothing is created to find out."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:  # where the folder is missing, its nearest existing parent must take the folders to be made
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"cannot write in {existing} ({error.strerror or error})"
    return None


def final_output_dir(args):
    return os.path.join(args.test_output_dir, f"{args.annotation}_iter_{args.num_iters:05d}")


def existing_outputs(args):
    """(kind, description, paths) of each kind of file of this run that is already on disk; kinds are
    snapshots, log, tensorboard and test output."""
    found = []
    snapshots = sorted(checkpoint.existing_snapshots(args).values())
    if snapshots:
        found.append(("snapshots", f"{len(snapshots)} snapshot(s) {checkpoint.snapshot_prefix(args)}*", snapshots))
    log_file = os.path.join(args.log_dir, f"{args.annotation}.log")
    events = os.path.join(args.runs_dir, args.annotation)
    for kind, description, path in (("log", "log", log_file), ("tensorboard", "TensorBoard folder", events)):
        if os.path.lexists(path):
            found.append((kind, f"{description} {path}", [path]))
    outputs = sorted(glob.glob(os.path.join(glob.escape(args.test_output_dir), glob.escape(args.annotation))
                               + "_iter_[0-9]*"))
    if outputs:
        found.append(("test output", f"test output {', '.join(outputs)}", outputs))
    return found


def clashes(args, start=None):
    """The paths this run would overwrite; a UsageError naming them unless --overwrite.

    A new run (``start`` None) clashes with the files of a run of the same name that wrote a snapshot or
    a test output; a start that failed before either left nothing to protect. A run resumed at
    iteration ``start`` clashes with the snapshots from later in the run, and with its final test output.
    """
    if start is None:
        found = existing_outputs(args)
        if not any(kind in ("snapshots", "test output") for kind, _, _ in found):
            # The new run appends to the failed start's log and replaces its TensorBoard folder.
            return [path for kind, _, paths in found if kind == "tensorboard" for path in paths]
        if not args.overwrite:
            raise UsageError(f"--annotation {args.annotation}: a run of that name exists ("
                             + "; ".join(description for _, description, _ in found)
                             + "); pass --annotation NEW for a new run, or --overwrite to replace it")
        return [path for _, _, paths in found for path in paths]
    later = [path for iteration, path in sorted(checkpoint.existing_snapshots(args).items()) if iteration > start]
    found = later + ([final_output_dir(args)] if os.path.lexists(final_output_dir(args)) else [])
    if found and not args.overwrite:
        raise UsageError(f"--resume from iteration {start}: this run already went further, and its "
                         f"{', '.join(found)} would be overwritten; pass --snap_path NEW/ and "
                         "--test_output_dir NEW/ to write the new branch elsewhere, or --overwrite to replace them")
    return found


def remove(paths):
    """Delete files and folders (what --overwrite replaces)."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
