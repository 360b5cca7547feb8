"""A dataset folder DATA_DIR/NAME as pre_process.py's subcommands write and read it: the list files
(``path l1 ... lC``), dataset.json, and the PNG images of the datasets made from pixel arrays."""
import io
import json
import multiprocessing
import os
import shutil
import sys

import numpy as np
from PIL import Image

from data_list import PRESETS, SPLITS
from runtime import write_bytes_atomically

# ---------------------------------------------------------------- writing

def write_dataset(args, name, lists, record):
    """Write NAME's three list texts and dataset.json, then print the sizes."""
    folder = os.path.join(args.data_dir, name)
    write_dataset_files(folder, lists, record)
    print_written(folder, record)


def write_folder_whole(folder, lists, record):
    """Write the dataset into a temporary sibling folder, then move it into place (over an old one)."""
    parent, name = os.path.split(os.path.abspath(folder))
    staging, old = (os.path.join(parent, f".{name}.{os.getpid()}.{kind}") for kind in ("new", "old"))
    for leftover in (staging, old):  # left by a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write_dataset_files(staging, lists, record)
        if os.path.lexists(folder):
            os.rename(folder, old)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(folder):
            os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_dataset_files(folder, lists, record):
    """The three list files and dataset.json, each written atomically."""
    for split in SPLITS:
        write_bytes_atomically(os.path.join(folder, f"{split}.txt"), lists[split].encode("utf-8"))
    write_dataset_json(folder, record)


def write_dataset_json(folder, record):
    write_bytes_atomically(os.path.join(folder, "dataset.json"), (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def print_written(folder, record):
    sizes = ", ".join(f"{split} {count}" for split, count in record["sizes"].items())
    print(f"wrote {folder}: {sizes} ({record['num_labels']} labels)")


def dataset_record(args, name, num_labels, splits, root, data_root=None, label_names=None,
                   presets=None, protocol=None):
    """The dataset.json content; ``splits`` maps each split to its entries (for the sizes)."""
    presets = presets or PRESETS[name]
    return {"name": name, "num_labels": int(num_labels), "topk": int(presets["topk"]),
            "similar_weight": float(presets["similar_weight"]), "data_root": data_root,
            "sizes": {split: len(splits[split]) for split in SPLITS}, "label_names": label_names,
            "source": {"command": args.command_line, "root": os.path.abspath(root)},
            "seed": getattr(args, "seed", None), "protocol": protocol}


def list_text(paths, labels):
    """HashNet-format lines ``path l1 ... lC``."""
    rows = [" ".join(row) for row in np.asarray(labels, dtype=np.uint8).astype(str)]
    return "".join(f"{path} {row}\n" for path, row in zip(paths, rows))


def one_hot(classes, num_classes):
    labels = np.zeros((len(classes), num_classes), dtype=np.uint8)
    labels[np.arange(len(classes)), np.asarray(classes, dtype=np.int64)] = 1
    return labels


def png_names(index):
    return [f"images/{i:05d}.png" for i in index]


def write_pngs(folder, pixels, workers):
    """Write ``pixels[i]`` as folder/NNNNN.png, keeping existing PNGs of the right size."""
    os.makedirs(folder, exist_ok=True)
    chunk = 2000
    tasks = [(folder, start, pixels[start:start + chunk]) for start in range(0, len(pixels), chunk)]
    written = sum(map_with_progress(write_png_chunk, tasks, workers, "image chunks written", chunksize=1))
    print(f"images in {folder}: {written} written, {len(pixels) - written} already there")


def write_png_chunk(task):
    """Write one chunk of images; the number written."""
    folder, start, pixels = task
    return sum(write_png_unless_present(os.path.join(folder, f"{start + offset:05d}.png"), image)
               for offset, image in enumerate(pixels))


def write_png_unless_present(path, pixels):
    """Write ``pixels`` as the PNG ``path`` unless a PNG of the right size is there; whether it wrote one."""
    if png_matches(path, pixels):
        return False
    # Not synced one by one (70,000 fsyncs take minutes): a rerun checks every PNG and redoes lost ones.
    write_bytes_atomically(path, png_bytes(pixels), durable=False)
    return True


def png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_matches(path, pixels):
    """Whether ``path`` already holds a PNG of the size and mode ``pixels`` would give."""
    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.size == (pixels.shape[1], pixels.shape[0]) \
                and image.mode == ("L" if pixels.ndim == 2 else "RGB")
    except OSError:
        return False


# ---------------------------------------------------------------- parallel work

def map_with_progress(function, items, workers, what, chunksize=64):
    """``function`` over ``items`` in order, on a pool when workers > 1; progress on stderr."""
    total, results = len(items), []
    step = max(1, total // 10)
    with (multiprocessing.Pool(workers) if workers > 1 and total > 1 else _Serial()) as pool:
        for done, result in enumerate(pool.imap(function, items, chunksize=chunksize), start=1):
            results.append(result)
            if total >= 20 and (done % step == 0 or done == total):
                print(f"  {what}: {done}/{total}", file=sys.stderr, flush=True)
    return results


class _Serial:
    """Stands in for a pool of one: no processes to start for small jobs."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, function, items, chunksize=1):
        return map(function, items)


# ---------------------------------------------------------------- label statistics

def label_counts(labels):
    """Lines, all-zero label rows and positives per label of a (n, C) label matrix."""
    return {"lines": len(labels), "all_zero_rows": int((labels.sum(1) == 0).sum()),
            "positives_per_label": labels.sum(0).tolist()}
