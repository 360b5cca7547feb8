"""The datasets pre_process.py derives, each subcommand's flags beside its builder: from a built dataset, a
noisy-label copy (noise), an unseen-class split (unseen) and a validation list carved out of the training
list (val); from Fashion-MNIST, composites of two images (pairs)."""
import os
import shutil

import numpy as np

from data_list import SPLITS, DataError, read_dataset_json, read_list_file, require_list, resolve_dataset
from dataset_flags import (
    add_command,
    add_data_dir,
    add_seed,
    add_workers,
    class_indices,
    fraction,
    non_negative_int,
    positive_int,
)
from dataset_folder import (
    dataset_record,
    list_text,
    map_with_progress,
    one_hot,
    write_dataset,
    write_dataset_json,
    write_png_unless_present,
)
from dataset_sources import FASHION_MNIST_CLASSES, read_fashion_mnist
from runtime import UsageError, write_bytes_atomically

# Composites of each ordered class pair in each split of `pairs`: 100 pairs give 1,000 / 10,000 / 20,000.
PAIRS_SIZES = {"num_queries_per_pair": 10, "num_train_per_pair": 100, "num_database_per_pair": 200}


def add_noise_command(commands):
    """The `noise` subcommand and its flags."""
    sub = add_command(commands, "noise", build_noise, [add_data_dir, add_seed],
                      "noisy-label copy NAME_noise<R> of a dataset",
                      "Noisy-label copy DATA_DIR/NAME_noise<R>: round(R*n) seeded training lines get "
                      "the label vector of another, randomly chosen training image whose labels "
                      "differ (single-label lists: a uniformly random other class); images and their "
                      "order are kept; test and database are copied unchanged.")
    sub.add_argument("--dataset", required=True, help="name of a built dataset under DATA_DIR")
    sub.add_argument("--rate", type=fraction, required=True, help="fraction of training lines to relabel")


def build_noise(args):
    """Copy a dataset with a seeded fraction of its training labels replaced."""
    spec, record, entries = read_parent(args.dataset, args.data_dir)
    name = f"{args.dataset}_noise{args.rate:g}"
    rng = np.random.default_rng(args.seed)
    paths, labels = entries["train"]
    noisy, rows = relabel(labels, args.rate, rng)
    lists = {"train": list_text(paths, noisy)}
    for split in ("test", "database"):
        with open(spec.lists[split], encoding="utf-8") as handle:
            lists[split] = handle.read()
    protocol = {"type": "noise", "parent": args.dataset, "rate": args.rate,
                "relabelled_lines": (rows + 1).tolist(), "seed": args.seed}
    write_dataset(args, name, lists, child_record(args, name, spec, record, entries, labels.shape[1],
                                                  record.get("label_names"), protocol))
    return 0


def relabel(labels, rate, rng):
    """A copy of ``labels`` with round(rate * n) random rows replaced by different labels."""
    n, width = labels.shape
    rows = np.sort(rng.choice(n, round(rate * n), replace=False))
    noisy = labels.copy()
    if (labels.sum(1) == 1).all():
        if width < 2:
            raise DataError("the training list has a single class: there is no other label to give")
        new = (labels[rows].argmax(1) + rng.integers(1, width, size=len(rows))) % width
        noisy[rows] = 0
        noisy[rows, new] = 1
    else:
        noisy[rows] = labels[donors_with_other_labels(labels, rows, rng)]
    return noisy, rows


def donors_with_other_labels(labels, rows, rng):
    """For each row, a uniformly random other image whose label vector differs from the row's."""
    _, group, sizes = np.unique(labels, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")  # images of one label vector are contiguous in order
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    own = group[rows]
    others = len(labels) - sizes[own]
    if (others == 0).any():
        raise DataError("every training image has the same labels: there is no other label vector")
    pick = rng.integers(0, others)  # rank among the images outside the row's own block
    return order[np.where(pick < starts[own], pick, pick + sizes[own])]


def add_unseen_command(commands):
    """The `unseen` subcommand and its flags."""
    sub = add_command(commands, "unseen", build_unseen, [add_data_dir, add_seed],
                      "unseen-class split NAME_unseen<U> of a dataset",
                      "Unseen-class split DATA_DIR/NAME_unseen<U> (or NAME_unseen_c<i-j-k>), after "
                      "Sablayrolles et al. 2017: the classes are split into seen and unseen; train: the "
                      "training images with at least one label, all of them seen, with the seen "
                      "columns only; test and database: the parent's images with at least one unseen "
                      "label, with the unseen columns only.")
    sub.add_argument("--dataset", required=True, help="name of a built dataset under DATA_DIR")
    split = sub.add_mutually_exclusive_group()
    split.add_argument("--unseen_ratio", type=fraction, default=None,
                       help="fraction of the classes drawn as unseen, rounded (default: 0.25)")
    split.add_argument("--unseen_classes", type=class_indices, default=None,
                       help="explicit unseen label columns, e.g. 0,3,7")


def build_unseen(args):
    """Split a dataset's classes into seen (train) and unseen (queries and database)."""
    spec, record, entries = read_parent(args.dataset, args.data_dir)
    if (record.get("protocol") or {}).get("type") == "unseen":
        raise DataError(f"--dataset {args.dataset} is already an unseen-class split; "
                        "pass the dataset it was made from")
    width = entries["train"][1].shape[1]
    for split in ("test", "database"):
        if entries[split][1].shape[1] != width:
            raise DataError(f"{spec.lists[split]}: {entries[split][1].shape[1]} labels a line, but "
                            f"{spec.lists['train']} has {width}; rebuild --dataset {args.dataset}")
    rng = np.random.default_rng(args.seed)
    unseen = unseen_columns(args, width, rng)
    seen = np.setdiff1d(np.arange(width), unseen)
    if args.unseen_classes is not None:
        name = f"{args.dataset}_unseen_c{'-'.join(str(c) for c in unseen)}"
    else:
        name = f"{args.dataset}_unseen{(0.25 if args.unseen_ratio is None else args.unseen_ratio):g}"
    paths, labels = entries["train"]
    keep = labels[:, seen].any(1) & ~labels[:, unseen].any(1)
    children = {"train": ([p for p, k in zip(paths, keep) if k], labels[keep][:, seen])}
    for split in ("test", "database"):
        paths, labels = entries[split]
        keep = labels[:, unseen].any(1)
        children[split] = ([p for p, k in zip(paths, keep) if k], labels[keep][:, unseen])
    for split, (paths, _) in children.items():
        if not paths:
            raise DataError(f"the {split} list of the unseen split of {args.dataset} would be "
                            "empty; choose other --unseen_classes or another --seed")
    names = record.get("label_names")
    protocol = {"type": "unseen", "parent": args.dataset, "seen_classes": seen.tolist(),
                "unseen_classes": unseen.tolist(), "seed": args.seed}
    lists = {split: list_text(*children[split]) for split in SPLITS}
    write_dataset(args, name, lists, child_record(
        args, name, spec, record, children, len(unseen),
        [names[c] for c in unseen] if names else None, protocol))
    return 0


def unseen_columns(args, width, rng):
    """The sorted unseen label columns: the explicit list, or a seeded draw of round(U * C)."""
    if args.unseen_classes is not None:
        unseen = sorted(set(args.unseen_classes))
        if unseen[0] < 0 or unseen[-1] >= width or len(unseen) == width:
            raise UsageError(f"--unseen_classes must name some, not all, of the columns 0..{width - 1}")
        return np.asarray(unseen)
    ratio = 0.25 if args.unseen_ratio is None else args.unseen_ratio
    count = round(ratio * width)
    if not 1 <= count < width:
        raise UsageError(f"--unseen_ratio {ratio:g} makes {count} of {width} classes unseen; choose a "
                         "ratio that leaves at least one seen and one unseen class")
    return np.sort(rng.choice(width, count, replace=False))


def add_pairs_command(commands):
    """The `pairs` subcommand and its flags."""
    sub = add_command(commands, "pairs", build_pairs, [add_data_dir, add_seed, add_workers],
                      "composites of two Fashion-MNIST images: 'fashion_mnist_pairs' or '_pairs_ml'",
                      "Each image is two Fashion-MNIST images side by side (28x56), written as "
                      "images/<left>_<right>.png (indices in the pooled IDX files, train then t10k). "
                      "fashion_mnist_pairs: one label a composite, the ordered pair of its classes (100 "
                      "classes, about 1% similar pairs: extreme imbalance, as ImageNet-100); with "
                      "--multilabel, fashion_mnist_pairs_ml: the union of the two classes (10 labels, one "
                      "or two set: similarity as COCO and NUS-WIDE). Every ordered class pair gets the "
                      "same number of composites in each split, and no source image is used twice, so "
                      "queries, train and database come from disjoint images (1,000 / 10,000 / 20,000 "
                      "by default). The same --seed gives the same composites in both variants.")
    sub.add_argument("--dataset", choices=("fashion_mnist",), required=True,
                     help="the source of the halves (only fashion_mnist)")
    sub.add_argument("--multilabel", action="store_true",
                     help="label a composite with the union of its two classes (fashion_mnist_pairs_ml)")
    sub.add_argument("--root", default="/usr/share/datasets/fashion-mnist",
                     help="folder of the four Fashion-MNIST IDX files, plain or .gz (default: %(default)s)")
    sub.add_argument("--no_download", action="store_true", help="never try to download the IDX files")
    for name, default in PAIRS_SIZES.items():
        sub.add_argument(f"--{name}", type=non_negative_int, default=default,
                         help=f"{name.split('_')[1]} composites of each ordered class pair (default: {default})")


def build_pairs(args):
    """Composites of two Fashion-MNIST images, labelled by their class pair or by the union of the classes."""
    pixels, classes = read_fashion_mnist(args.root, download=not args.no_download)
    num_classes = len(FASHION_MNIST_CLASSES)
    per_pair = {"test": args.num_queries_per_pair, "train": args.num_train_per_pair,
                "database": args.num_database_per_pair}
    halves = draw_composites(classes, num_classes, per_pair, np.random.default_rng(args.seed))
    name = "fashion_mnist_pairs_ml" if args.multilabel else "fashion_mnist_pairs"
    folder = os.path.join(args.data_dir, name)
    names = {split: [f"images/{left:05d}_{right:05d}.png" for left, right in zip(*pair)]
             for split, pair in halves.items()}
    write_composites(folder, pixels, halves, names, args.workers)
    labels = {split: pair_labels(classes[left], classes[right], num_classes, args.multilabel)
              for split, (left, right) in halves.items()}
    label_names = (list(FASHION_MNIST_CLASSES) if args.multilabel else
                   [f"{a} | {b}" for a in FASHION_MNIST_CLASSES for b in FASHION_MNIST_CLASSES])
    protocol = {"type": "pairs", "source": "fashion_mnist", "multilabel": args.multilabel,
                "composites_per_class_pair": per_pair, "seed": args.seed,
                "similar_pair_fraction": {split: similar_pair_fraction(labels[split]) for split in SPLITS}}
    lists = {split: list_text(names[split], labels[split]) for split in SPLITS}
    write_dataset(args, name, lists, dataset_record(args, name, labels["train"].shape[1], names, root=args.root,
                                                    label_names=label_names, protocol=protocol))
    print(f"similar pairs among the training images: {protocol['similar_pair_fraction']['train']:.2%}")
    return 0


def draw_composites(classes, num_classes, per_pair, rng):
    """(left, right) source indices of each split's composites, per_pair[split] for every ordered class
    pair, in a seeded order; each source image serves at most one composite of one split."""
    stock = [rng.permutation(np.flatnonzero(classes == c)) for c in range(num_classes)]
    needed = 2 * num_classes * sum(per_pair.values())
    if min(len(images) for images in stock) < needed:
        raise UsageError(f"the splits need {needed} images of every class (each class is the left and the "
                         f"right half of {num_classes} class pairs), but a class has only "
                         f"{min(len(images) for images in stock)}; lower --num_*_per_pair")
    used = [0] * num_classes

    def take(c, count):
        used[c] += count
        return stock[c][used[c] - count:used[c]]

    halves = {}
    for split, count in per_pair.items():
        pairs = [(take(a, count), take(b, count)) for a in range(num_classes) for b in range(num_classes)]
        order = rng.permutation(count * num_classes ** 2)
        halves[split] = tuple(np.concatenate(side)[order] for side in zip(*pairs))
    return halves


def pair_labels(left_classes, right_classes, num_classes, multilabel):
    """One-hot of the ordered pair (a * C + b), or the union of the two one-hot classes."""
    if multilabel:
        return one_hot(left_classes, num_classes) | one_hot(right_classes, num_classes)
    return one_hot(left_classes * num_classes + right_classes, num_classes ** 2)


def similar_pair_fraction(labels):
    """Share of ordered image pairs (i, j), i = j included, that share a label."""
    rows, counts = np.unique(labels, axis=0, return_counts=True)
    similar = (rows.astype(np.int64) @ rows.T.astype(np.int64)) > 0
    return float(counts @ similar @ counts) / len(labels) ** 2


def write_composites(folder, pixels, halves, names, workers):
    """Write each composite (left | right, 28x56) once; existing PNGs of the right size are kept, since a
    name says which two images it holds."""
    tasks = []
    for split, (left, right) in halves.items():
        for start in range(0, len(left), 2000):
            chunk = slice(start, start + 2000)
            tasks.append((folder, names[split][chunk], pixels[left[chunk]], pixels[right[chunk]]))
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    written = sum(map_with_progress(write_composite_chunk, tasks, workers, "composite chunks written", chunksize=1))
    total = sum(len(left) for left, _ in halves.values())
    print(f"images in {os.path.join(folder, 'images')}: {written} written, {total - written} already there")


def write_composite_chunk(task):
    folder, names, left, right = task
    return sum(write_png_unless_present(os.path.join(folder, name), image)
               for name, image in zip(names, np.concatenate([left, right], axis=2)))


def add_val_command(commands):
    """The `val` subcommand and its flags."""
    sub = add_command(commands, "val", carve_validation, [add_data_dir, add_seed],
                      "carve a validation list out of a dataset's training list",
                      "Move a seeded random choice of --size lines (or --ratio of them) from DATA_DIR/NAME/"
                      "train.txt into DATA_DIR/NAME/val.txt, lines and their order kept, so the two lists "
                      "are disjoint; dataset.json records it. train_mmhh.py --eval_split val then scores "
                      "on these queries: tune on them, never on the test queries you report.")
    sub.add_argument("--dataset", required=True, help="name of a built dataset under DATA_DIR")
    size = sub.add_mutually_exclusive_group(required=True)
    size.add_argument("--size", type=positive_int, help="number of training lines to move")
    size.add_argument("--ratio", type=fraction, help="fraction of the training lines to move")
    sub.add_argument("--into", default=None, metavar="NEW",
                     help="leave NAME as it is and write the carved dataset as DATA_DIR/NEW (its images "
                          "stay where NAME's are)")
    sub.add_argument("--database", choices=("parent", "train"), default="parent",
                     help="with --into: NEW's database is NAME's (parent, the default) or NEW's remaining "
                          "training list (train: for protocols whose database holds other classes than "
                          "training, as unseen, so that validation queries have relevant items)")


def carve_validation(args):
    """Move a seeded choice of training lines into val.txt; train.txt keeps the others.

    With --into NEW the parent stays as it is: NEW gets the carved lists, the parent's test and database
    lists, and a dataset.json whose data_root points at the parent's images.
    """
    spec = resolve_dataset(args.dataset, args.data_dir)
    train_path = require_list(spec, "train")
    folder = os.path.join(args.data_dir, args.into) if args.into else spec.folder
    if args.into and os.path.lexists(folder):
        raise UsageError(f"{folder} already exists; choose another --into")
    if os.path.exists(os.path.join(folder, "val.txt")):
        raise DataError(f"{os.path.join(folder, 'val.txt')} already exists; the training list is already "
                        "carved (rebuild the dataset, or carve a copy with --into NEW)")
    if args.database == "train" and not args.into:
        raise UsageError("--database train replaces the database list, so it needs --into NEW; NAME's own "
                         "lists stay as they are")
    read_list_file(train_path)  # a clear file:line error before anything moves
    with open(train_path, encoding="utf-8") as handle:
        lines = [line if line.endswith("\n") else line + "\n" for line in handle if line.strip()]
    size = args.size if args.size is not None else round(args.ratio * len(lines))
    if not 1 <= size < len(lines):
        raise UsageError(f"a validation list of {size} lines out of {len(lines)} training lines leaves no "
                         "training or no validation line; choose --size between 1 and "
                         f"{len(lines) - 1}")
    chosen = np.zeros(len(lines), dtype=bool)
    chosen[np.random.default_rng(args.seed).choice(len(lines), size, replace=False)] = True
    record = read_dataset_json(spec.folder)
    if args.into:
        record.update(name=args.into, data_root=os.path.relpath(spec.data_root or spec.folder, folder))
        os.makedirs(folder)
        for split in ("test", "database")[:2 if args.database == "parent" else 1]:
            shutil.copyfile(require_list(spec, split), os.path.join(folder, f"{split}.txt"))
    record.setdefault("sizes", {}).update({"train": int((~chosen).sum()), "val": size})
    kept = "".join(line for line, c in zip(lines, chosen) if not c)
    validation = "".join(line for line, c in zip(lines, chosen) if c)
    if args.database == "train":
        write_bytes_atomically(os.path.join(folder, "database.txt"), kept.encode())
        record["sizes"]["database"] = int((~chosen).sum())
    record["val"] = {"size": size, "carved_from": train_path, "carved_from_lines": len(lines),
                     "seed": args.seed, "command": args.command_line, "database": args.database}
    # val.txt first: until train.txt is replaced an interrupted run leaves both, and a rerun refuses
    write_bytes_atomically(os.path.join(folder, "val.txt"), validation.encode())
    write_dataset_json(folder, record)
    write_bytes_atomically(os.path.join(folder, "train.txt"), kept.encode())
    print(f"wrote {os.path.join(folder, 'val.txt')}: {size} validation lines; {folder}/train.txt keeps "
          f"{len(lines) - size}")
    return 0


def read_parent(name, data_dir):
    """A built dataset's spec, dataset.json record and (path token, labels) of each list."""
    spec = resolve_dataset(name, data_dir)
    entries = {}
    for split in SPLITS:
        path = require_list(spec, split)
        listing = read_list_file(path)
        entries[split] = (listing.tokens, listing.labels)
    return spec, read_dataset_json(spec.folder), entries


def child_record(args, name, spec, record, entries, num_labels, label_names, protocol):
    """dataset.json of a protocol built from ``spec``: same presets, images found through data_root."""
    root = record.get("data_root")
    if root is None or not os.path.isabs(root):
        # the path tokens are unchanged, so point back at the folder they are relative to
        root = os.path.relpath(spec.data_root or spec.folder, os.path.join(args.data_dir, name))
    splits = {split: entries[split][0] for split in SPLITS}
    return dataset_record(args, name, num_labels, splits, root=spec.folder, data_root=root,
                          label_names=label_names, presets={"topk": spec.topk,
                                                            "similar_weight": spec.similar_weight},
                          protocol=protocol)
