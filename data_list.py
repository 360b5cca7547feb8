"""Image lists in HashNet format, the datasets they make up, and the image transforms.

A list file holds one image a line: ``path l1 l2 ... lC`` with 0/1 labels. A relative path is
taken relative to the data root when one is given, else to the list file's folder. A dataset is a
folder ``data/NAME/`` with ``train.txt``, ``test.txt`` (queries) and ``database.txt``, and an
optional ``dataset.json`` (written by ``pre_process.py``) with its retrieval presets.
"""
import atexit
import json
import multiprocessing
import os
import random
import re
import signal
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from runtime import CliError, rank_seed

SPLITS = ("train", "test", "database")
# The validation queries that `pre_process.py val` carves out of the training images, for tuning.
VAL_SPLIT = "val"

# R of MAP@TopK (-1: the whole database) and the similar-pair weight of each known dataset.
PRESETS = {
    "coco_80": {"topk": 5000, "similar_weight": 1.0},
    "nuswide_21": {"topk": 5000, "similar_weight": 5.0},
    "nuswide_81": {"topk": 5000, "similar_weight": 5.0},
    "imagenet_100": {"topk": 1000, "similar_weight": 100.0},
    "cifar10": {"topk": -1, "similar_weight": 1.0},
    "fashion_mnist": {"topk": -1, "similar_weight": 1.0},
    # Composites of two Fashion-MNIST images (pre_process.py pairs): 100 classes as ImageNet-100, whose
    # presets they take, and the 10-label union with COCO's.
    "fashion_mnist_pairs": {"topk": 1000, "similar_weight": 100.0},
    "fashion_mnist_pairs_ml": {"topk": 5000, "similar_weight": 1.0},
}
# Any other list: rank the whole database, weigh similar and dissimilar pairs alike.
DEFAULT_PRESET = {"topk": -1, "similar_weight": 1.0}

# How to build each known dataset's lists; shown when they are missing.
BUILD_COMMANDS = {
    "coco_80": "python pre_process.py coco --root /path/to/coco2014",
    "nuswide_21": "python pre_process.py nuswide --concepts 21 --root /path/to/nuswide",
    "nuswide_81": "python pre_process.py nuswide --concepts 81 --root /path/to/nuswide",
    "imagenet_100": "python pre_process.py imagenet100 --root /path/to/imagenet --classes classes.txt",
    "cifar10": "python pre_process.py cifar10 --root /path/to/cifar-10-batches-py",
    "fashion_mnist": "python pre_process.py fashion_mnist",
    "fashion_mnist_pairs": "python pre_process.py pairs --dataset fashion_mnist",
    "fashion_mnist_pairs_ml": "python pre_process.py pairs --dataset fashion_mnist --multilabel",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(CliError, ValueError):
    """Bad or missing data: the message names the file (and line) and how to fix it."""

    @classmethod
    def from_loader(cls, error):
        """The one-line message of a DataError that a DataLoader worker raised, without its traceback."""
        last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        return cls(re.sub(r"^(?:\w+\.)*DataError: ", "", last))


@dataclass
class DatasetSpec:
    """Where a dataset's three lists are and how it is scored."""
    name: str
    lists: dict            # split -> list file path; "val" only when the folder has val.txt
    data_root: str | None  # None: image paths relative to each list's folder
    topk: int              # R of MAP@TopK; -1 means the whole database
    similar_weight: float  # the similar-pair weight preset
    folder: str
    presets_from: str      # "dataset.json", "preset" (a known name) or "default" (neither)


def resolve_dataset(name, data_dir="data", train_list=None, test_list=None, database_list=None,
                    data_root=None, needs=SPLITS):
    """The dataset called ``name``: its folder's lists and presets, with any list overridden.

    A name with no folder and no preset is fine when every split in ``needs`` is given as a list;
    its R is then the whole database and its similar-pair weight 1 (``presets_from == "default"``).
    """
    folder = os.path.join(data_dir, name)
    overrides = {"train": train_list, "test": test_list, "database": database_list}
    info = dict(PRESETS.get(name, DEFAULT_PRESET))
    presets_from = "preset" if name in PRESETS else "default"
    record = read_dataset_json(folder)
    if record:
        info.update({key: record[key] for key in ("topk", "similar_weight", "data_root") if key in record})
        if record.get("data_root") is not None and not os.path.isabs(record["data_root"]):
            info["data_root"] = os.path.normpath(os.path.join(folder, record["data_root"]))
        presets_from = "dataset.json"
    elif presets_from == "default" and not os.path.isdir(folder) and not all(overrides.get(s) for s in needs):
        raise DataError(unknown_dataset_message(name, data_dir, needs))
    lists = {split: overrides.get(split) or os.path.join(folder, f"{split}.txt") for split in SPLITS}
    if os.path.isfile(os.path.join(folder, f"{VAL_SPLIT}.txt")):
        lists[VAL_SPLIT] = os.path.join(folder, f"{VAL_SPLIT}.txt")
    return DatasetSpec(name=name, lists=lists, data_root=data_root or info.get("data_root"),
                       topk=int(info["topk"]), similar_weight=float(info["similar_weight"]),
                       folder=folder, presets_from=presets_from)


def require_list(spec, split):
    """The path of ``split``'s list, or a DataError saying how to build it."""
    path = spec.lists.get(split, os.path.join(spec.folder, f"{split}.txt"))
    if os.path.isfile(path):
        return path
    if split == VAL_SPLIT:
        raise DataError(f"missing validation list {path} for dataset '{spec.name}'; carve one out of the "
                        f"training images with: python pre_process.py val --dataset {spec.name} --size N")
    command = BUILD_COMMANDS.get(spec.name, f"python pre_process.py --help  # or pass --{split}_list FILE")
    raise DataError(f"missing {split} list {path} for dataset '{spec.name}'; build it with: {command}")


def available_datasets(data_dir="data"):
    """Names of the dataset folders under ``data_dir`` that hold at least one list."""
    if not os.path.isdir(data_dir):
        return []
    return sorted(entry for entry in os.listdir(data_dir)
                  if any(os.path.isfile(os.path.join(data_dir, entry, f"{s}.txt")) for s in SPLITS))


def unknown_dataset_message(name, data_dir, needs=SPLITS):
    built = ", ".join(available_datasets(data_dir)) or "none"
    flags = "/".join(f"--{split}_list" for split in needs if split in SPLITS)
    return (f"unknown dataset '{name}': no folder {os.path.join(data_dir, name)}. "
            f"Built under {data_dir}/: {built}. Known names: {', '.join(PRESETS)}. "
            f"Build one with pre_process.py (e.g. `{BUILD_COMMANDS['fashion_mnist']}`), "
            f"or pass {flags}.")


@dataclass(frozen=True)
class ListFile:
    """A parsed list file: one entry a non-blank line, in file order."""
    path: str
    line_numbers: list         # the file's line of each entry
    tokens: list               # each image path as written
    paths: list                # resolved against the data root, else the list file's folder
    labels: np.ndarray | None  # (n, C) uint8; None for a list without labels (``labels_optional``)

    @property
    def origins(self):
        """``file:line`` of each entry, so that an error about an image names its line."""
        return [f"{self.path}:{number}" for number in self.line_numbers]


def read_list_file(list_path, data_root=None, labels_optional=False):
    """Parse a HashNet-format list; a DataError names the file and line and says how to fix it.

    Every line needs 0/1 labels, as many as the first line's; with ``labels_optional`` a list may carry
    none at all (``labels`` is then None), but not labels on some lines only.
    """
    if not os.path.isfile(list_path):
        raise DataError(f"list file {list_path} does not exist")
    try:
        with open(list_path, encoding="utf-8") as handle:
            lines = [(number, line.split()) for number, line in enumerate(handle, start=1)]
    except UnicodeDecodeError as error:
        raise DataError(f"{list_path}: not UTF-8 text ({error}); rewrite the list as UTF-8") from None
    entries = [(number, fields) for number, fields in lines if fields]
    if not entries:
        raise DataError(f"{list_path}: the list is empty; it needs one 'path l1 ... lC' line per image")
    unlabelled = labels_optional and len(entries[0][1]) == 1
    rows = []
    for number, fields in entries:
        if labels_optional and unlabelled != (len(fields) == 1):
            raise DataError(f"{list_path}:{number}: some lines have labels and some do not; give 0/1 labels on "
                            "every line or on none")
        if not unlabelled:
            rows.append(_parse_labels(fields[1:], rows[0] if rows else None, f"{list_path}:{number}"))
    base = data_root if data_root is not None else os.path.dirname(os.path.abspath(list_path))
    tokens = [fields[0] for _, fields in entries]
    return ListFile(path=list_path, line_numbers=[number for number, _ in entries], tokens=tokens,
                    paths=[os.path.join(base, token) for token in tokens],
                    labels=None if unlabelled else np.asarray(rows, dtype=np.uint8))


def read_dataset_json(folder):
    """The record of ``folder/dataset.json`` as written (``{}`` when there is none); DataError when unreadable."""
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); rebuild it with pre_process.py") from None


def check_images_exist(listing):
    """Fail before any training when an image of the list is missing or unreadable."""
    for origin, path in zip(listing.origins, listing.paths):
        if not os.access(path, os.R_OK):
            raise DataError(f"{origin}: image {path} is missing or unreadable; fix the list or pass --data_root "
                            "to the folder the paths are relative to")


def verify_list_images(list_path, data_root=None, log_every=5000):
    """Parse a list and decode every image it names; a DataError names the first bad one."""
    listing = read_list_file(list_path, data_root)
    for done, (origin, path) in enumerate(zip(listing.origins, listing.paths), start=1):
        problem = image_problem(path)
        if problem:
            raise DataError(f"{origin}: image {path} {problem}")
        if done % log_every == 0:
            print(f"  {list_path}: {done}/{len(listing.paths)} images open", flush=True)
    return listing


def image_problem(path):
    """Why ``path`` cannot be used as an image, or None."""
    if not os.path.isfile(path):
        return "is missing"
    try:
        with Image.open(path) as image:
            image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale; a truncated stream still fails
            image.load()
    except Exception as error:  # any decoder failure here would stop training on this image
        return f"cannot be decoded by PIL ({type(error).__name__}: {error})"
    return None


def _parse_labels(tokens, first_row, where):
    if not tokens:
        raise DataError(f"{where}: no labels after the image path; expected 'path l1 ... lC' with 0/1 labels")
    if any(token not in ("0", "1") for token in tokens):
        bad = next(token for token in tokens if token not in ("0", "1"))
        raise DataError(f"{where}: label '{bad}' is not 0 or 1")
    if first_row is not None and len(tokens) != len(first_row):
        raise DataError(f"{where}: {len(tokens)} labels, but the list's first line has {len(first_row)}")
    return [int(token) for token in tokens]


class ImageList(Dataset):
    """Images of a list with their labels; yields ``(image, label, index)``.

    ``origins`` (``file:line`` of each image, ``ListFile.origins``) let a decoding error name its line.
    """

    def __init__(self, paths, labels, transform=None, origins=None):
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.float32)  # (n, C)
        self.transform = transform
        self.origins = origins

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            with Image.open(self.paths[index]) as image:
                image = image.convert("RGB")
        except Exception as error:  # any decoder failure: name the image and its line, not a traceback
            where = f"{self.origins[index]}: " if self.origins else ""
            raise DataError(f"{where}{self.paths[index]}: cannot be decoded ({type(error).__name__}: {error})") \
                from None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], index


def read_checked_list(spec, split):
    """One of ``spec``'s lists (a ListFile), every image checked to be readable."""
    listing = read_list_file(require_list(spec, split), spec.data_root)
    check_images_exist(listing)
    return listing


class EpochBatchSampler(Sampler):
    """Endless shuffled batches; batch t depends only on (seed, t), so a resumed run sees the same data.

    Each epoch is a fresh permutation drawn from ``seed + epoch``; the last incomplete batch of an
    epoch is dropped so every batch has ``batch_size`` items. ``batch_size`` is the global batch: with
    ``shard`` (rank, world size) a rank yields its contiguous slice of each, so the ranks together see the
    single-process run's batches at any world size (README: Many GPUs).
    """

    def __init__(self, num_items, batch_size, seed, start_iteration=0, shard=(0, 1)):
        if num_items < batch_size:
            raise DataError(f"the training list has {num_items} images, fewer than --batch_size {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_iteration = start_iteration
        self.batches_per_epoch = num_items // batch_size
        rank, world_size = shard
        self.share = batch_size // world_size
        self.offset = rank * self.share

    def __iter__(self):
        epoch, position = divmod(self.start_iteration, self.batches_per_epoch)
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_items, generator=generator)
            for batch in range(position, self.batches_per_epoch):
                first = batch * self.batch_size + self.offset
                yield order[first:first + self.share].tolist()
            epoch, position = epoch + 1, 0


def training_loader(dataset, batch_size, workers, seed, start_iteration=0, shard=(0, 1)):
    """An endless loader of shuffled training batches that resumes at ``start_iteration``.

    ``shard`` (rank, world size): this rank's slice of each global batch of ``batch_size``.
    """
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, start_iteration, shard)
    # The generator fixes the workers' seeds, so a run (or a resumed run) is reproducible; each rank
    # augments its images with its own draws.
    generator = torch.Generator().manual_seed(rank_seed(seed + start_iteration, shard[0]))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, generator=generator,
                      worker_init_fn=_seed_worker, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0)


def evaluation_loader(dataset, batch_size, workers, shard=(0, 1)):
    """Items in list order, for encoding; ``shard`` (rank, world size): every world-size-th item from rank."""
    rank, world_size = shard
    return DataLoader(dataset, batch_size=batch_size, sampler=range(rank, len(dataset), world_size),
                      num_workers=workers, worker_init_fn=_ignore_stop_signals,
                      pin_memory=torch.cuda.is_available())


def _ignore_stop_signals(worker_id=None):
    # Ctrl-C and schedulers (scancel, timeout, docker stop) signal the whole process group: workers
    # ignore it, so the main process can finish its iteration and snapshot instead of finding its
    # workers dead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register
def _kill_leftover_workers():
    # At exit multiprocessing SIGTERMs its daemonic children and waits for them; workers ignore SIGTERM,
    # so one left running (its loader never closed, say after an error) would keep the process waiting
    # forever. Registered after multiprocessing's own exit handler, this one runs before it; torch's
    # SIGCHLD handler, which reports killed workers, is set aside first: the process is exiting.
    leftover = [process for process in multiprocessing.active_children() if process.daemon]
    if leftover:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in leftover:
        process.kill()
        process.join()


def _seed_worker(worker_id):
    _ignore_stop_signals()
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def train_transform(resize_size=256, crop_size=224, crop_scale=0.08, flip=True):
    """Resize to a square, random resized crop (area fraction crop_scale..1), flip unless told not to
    (a flip swaps the halves of a two-image composite, so it changes an ordered pair's class),
    ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize((resize_size, resize_size)),
        transforms.RandomResizedCrop(crop_size, scale=(crop_scale, 1.0)),
        *([transforms.RandomHorizontalFlip()] if flip else []),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def test_transform(resize_size=256, crop_size=224):
    """Resize to a square and take the centre crop, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize((resize_size, resize_size)),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def sample_items(num_items, ratio, seed):
    """Indices of a seeded random ``ratio`` of the items, in list order (all of them for ratio 1)."""
    if not 0.0 < ratio <= 1.0:
        raise DataError(f"--test_sample_ratio {ratio}: must be in (0, 1]")
    if ratio == 1.0:
        return np.arange(num_items)
    kept = max(1, int(round(ratio * num_items)))
    return np.sort(np.random.default_rng(seed).choice(num_items, size=kept, replace=False))
