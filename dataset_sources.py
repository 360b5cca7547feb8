"""Readers of the published datasets in their own formats: Fashion-MNIST's IDX files, CIFAR-10's python
batches, COCO 2014's instances JSON, NUS-WIDE's image list and concept labels, ImageNet's class folders.
Each error names the file and how to fix it."""
import gzip
import json
import os
import pickle
import struct
import sys

import numpy as np

from data_list import DataError

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def read_fashion_mnist(root, download):
    """Pooled (70000, 28, 28) pixels and class ids: train first, then t10k."""
    files = fashion_mnist_files(root, download)
    pixels, classes = [], []
    for part in ("train", "t10k"):
        images, labels = read_idx(files[part, "images-idx3"]), read_idx(files[part, "labels-idx1"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{files[part, 'images-idx3']} and {files[part, 'labels-idx1']} do not hold "
                            "matching images (n, rows, cols) and labels (n); replace them")
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{files[part, 'labels-idx1']}: label {labels.max()} is not a class 0..9")
        pixels.append(images)
        classes.append(labels)
    return np.concatenate(pixels), np.concatenate(classes).astype(np.int64)


def read_cifar10(root):
    """Pooled (60000, 32, 32, 3) pixels, class ids and class names: data batches, then test."""
    pixels, classes = [], []
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = load_pickle(os.path.join(root, batch))
        try:
            data = np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(content[b"labels"], dtype=np.int64)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{os.path.join(root, batch)}: not a CIFAR-10 batch (a dict with "
                            "b'data' (n, 3072) and b'labels'); use the python-version batches") from None
        if len(data) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise DataError(f"{os.path.join(root, batch)}: labels do not match the images or are not 0..9")
        pixels.append(data.transpose(0, 2, 3, 1))
        classes.append(labels)
    meta_path = os.path.join(root, "batches.meta")
    names = list(CIFAR10_CLASSES)
    if os.path.isfile(meta_path):
        names = [name.decode() for name in load_pickle(meta_path).get(b"label_names", names)]
    return np.concatenate(pixels), np.concatenate(classes), names


def read_coco(root):
    """Relative image paths, (n, C) labels and category names of labelled COCO 2014 images."""
    subsets = {}
    for subset in ("train2014", "val2014"):
        path = os.path.join(root, "annotations", f"instances_{subset}.json")
        try:
            with open(path, encoding="utf-8") as handle:
                subsets[subset] = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"{path}: cannot read the COCO annotations ({error}); pass --root "
                            "the COCO 2014 folder with annotations/instances_{train,val}2014.json") from None
    try:
        categories = {c["id"]: c["name"] for content in subsets.values() for c in content["categories"]}
        column = {cid: i for i, cid in enumerate(sorted(categories))}
        paths, rows = [], []
        for subset, content in subsets.items():
            labelled = {}
            for annotation in content["annotations"]:
                labelled.setdefault(annotation["image_id"], set()).add(column[annotation["category_id"]])
            for image in sorted(content["images"], key=lambda image: image["id"]):
                if image["id"] in labelled:
                    paths.append(f"{subset}/{image['file_name']}")
                    rows.append(sorted(labelled[image["id"]]))
    except (KeyError, TypeError) as error:
        raise DataError(f"{root}/annotations: not COCO instances JSON (missing {error}); use the "
                        "instances_*2014.json files") from None
    labels = np.zeros((len(paths), len(column)), dtype=np.uint8)
    for i, row in enumerate(rows):
        labels[i, row] = 1
    return paths, labels, [categories[cid] for cid in sorted(categories)]


def read_nuswide(root):
    """Image paths (relative to ``root``), (n, 81) labels and the 81 concept names."""
    list_path = os.path.join(root, "ImageList", "Imagelist.txt")
    paths = [os.path.join("images", *line.strip().replace("\\", "/").split("/")[-2:]).replace(os.sep, "/")
             for line in read_lines(list_path) if line.strip()]
    concepts_path = find_existing([os.path.join(root, "Concepts81.txt"),
                                   os.path.join(root, "ConceptsList", "Concepts81.txt")])
    names = [line.strip() for line in read_lines(concepts_path) if line.strip()]
    labels = np.zeros((len(paths), len(names)), dtype=np.uint8)
    for column, name in enumerate(names):
        label_path = os.path.join(root, "Groundtruth", "AllLabels", f"Labels_{name}.txt")
        values = [line.strip() for line in read_lines(label_path) if line.strip()]
        if len(values) != len(paths):
            raise DataError(f"{label_path}: {len(values)} labels, but {list_path} lists {len(paths)} "
                            "images; both must come from the same NUS-WIDE release")
        bad = next((i for i, value in enumerate(values) if value not in ("0", "1")), None)
        if bad is not None:
            raise DataError(f"{label_path}:{bad + 1}: '{values[bad]}' is not 0 or 1")
        labels[:, column] = np.asarray(values) == "1"
    return paths, labels, names


def drop_missing_images(root, paths, labels):
    """The listed images that are files under ``root``, with their labels; the others are reported.

    HashNet's copy of NUS-WIDE (nus_wide.tar.gz) holds about 223,000 of the 269,648 images listed.
    """
    present = np.array([os.path.isfile(os.path.join(root, path)) for path in paths], dtype=bool)
    missing = len(paths) - int(present.sum())
    if missing == len(paths):
        raise DataError(f"none of the {len(paths)} images listed in {root}/ImageList/Imagelist.txt is "
                        f"under {root}/images/<folder>/<file>; check --root")
    if missing:
        print(f"{missing} of the {len(paths)} images listed in {root}/ImageList/Imagelist.txt are missing under "
              f"{root}/images: left out")
    return [path for path, here in zip(paths, present) if here], labels[present]


def read_class_file(path):
    """The class wnids of a class file: the first word of each non-empty line, no repeats."""
    wnids = [line.split()[0] for line in read_lines(path) if line.split()]
    if not wnids:
        raise DataError(f"{path}: no class names; write one wnid a line")
    repeated = next((w for i, w in enumerate(wnids) if w in wnids[:i]), None)
    if repeated:
        raise DataError(f"{path}: class {repeated} is listed twice; list each class once")
    return wnids


def class_images(root, part, wnid, classes_path):
    """Sorted relative paths (``part/wnid/file``) of a class's images."""
    folder = os.path.join(root, part, wnid)
    if not os.path.isdir(folder):
        raise DataError(f"{folder} is missing for class {wnid} of {classes_path}; expected "
                        f"{part}/<wnid>/ folders under --root (val images sorted into class folders)")
    return [f"{part}/{wnid}/{name}" for name in sorted(os.listdir(folder))
            if name.lower().endswith(IMAGE_SUFFIXES)]


def fashion_mnist_files(root, download):
    """The four IDX files (key: part, kind) in ``root``, downloading them there if allowed."""
    for attempt in range(2):
        for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
            files = {(part, kind): find_plain_or_gz(os.path.join(folder, f"{part}-{kind}-ubyte"))
                     for part in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")}
            if all(files.values()):
                return files
        if attempt == 0 and download:
            print(f"Fashion-MNIST IDX files not in {root}; downloading them there with torchvision",
                  file=sys.stderr)
            try:
                from torchvision.datasets import FashionMNIST
                for train in (True, False):
                    FashionMNIST(root, train=train, download=True)
            except Exception as error:  # no network, proxy, mirror errors: all end in the hint below
                print(f"download failed: {error}", file=sys.stderr)
    raise DataError(f"Fashion-MNIST IDX files not found in {root}; install them with "
                    "`apt-get install dataset-fashion-mnist` or pass --root DIR holding "
                    "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")


def find_plain_or_gz(path):
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_idx(path):
    """The unsigned-byte array stored in an IDX file (plain or gzip)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error}); replace the file") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number); replace the file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else None
    if dims is None or len(data) - header != int(np.prod(dims)):
        raise DataError(f"{path}: the IDX data does not match its header; the file is truncated")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_pickle(path):
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; pass --root the folder of the extracted "
                        "cifar-10-python.tar.gz (data_batch_1..5, test_batch)")
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(f"{path}: not a readable pickle ({error}); replace the file") from None


def read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror}); check --root") from None


def find_existing(candidates):
    found = next((path for path in candidates if os.path.isfile(path)), None)
    if found is None:
        raise DataError(f"none of {', '.join(candidates)} exists; check --root")
    return found
