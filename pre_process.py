"""Build the HashNet-format image lists of a dataset or import published ones, derive the
noisy-label and unseen-class protocols from built lists, and validate lists.

Every builder writes DATA_DIR/NAME/{train,test,database}.txt (``path l1 ... lC``, 0/1 labels; paths
relative to the list's folder, or to the ``data_root`` of DATA_DIR/NAME/dataset.json) and that
dataset.json (sizes, retrieval presets, source command, seed, protocol). All random choices are
seeded by --seed, so the same command writes the same lists. The COCO builder follows HashNet's
published lists by default, NUS-WIDE-81 draws its queries from labelled images as the release's
evaluation does, CIFAR-10 makes DCH's split (--protocol names the others); `import` takes published lists
as they are.

Examples:
  python pre_process.py fashion_mnist
  python pre_process.py coco --root /data/coco2014
  python pre_process.py import --dataset coco_80 --train_list train.txt --test_list test.txt \\
      --database_list database.txt --image_root /data/coco2014
  python pre_process.py noise --dataset fashion_mnist --rate 0.3
  python pre_process.py unseen --dataset nuswide_21 --unseen_ratio 0.25
  python pre_process.py pairs --dataset fashion_mnist [--multilabel]
  python pre_process.py validate --dataset fashion_mnist
"""
import argparse
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shlex
import shutil
import struct
import sys

import numpy as np
from PIL import Image

from data_list import (
    DEFAULT_PRESET,
    PRESETS,
    SPLITS,
    DataError,
    image_problem,
    read_image_list,
    require_list,
    resolve_dataset,
)
from runtime import write_bytes_atomically

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# Split sizes and their defaults: so many a class (DHN's recipe) or random draws (HashNet's).
PER_CLASS_SIZES = {"num_queries_per_class": 100, "num_train_per_class": 500}
RANDOM_SIZES = {"num_queries": 5000, "num_train": 10000}
NUSWIDE_SIZES = {"labelled_queries": RANDOM_SIZES, "hashnet": RANDOM_SIZES, "dhn": PER_CLASS_SIZES}
# What each NUS-WIDE protocol follows, printed when the lists are built (README: Data).
NUSWIDE_PROTOCOLS = {
    "labelled_queries": "queries drawn from the labelled images only, as the DeepHash query list the MMHH "
                        "release evaluates on; training images from all the others, unlabelled ones kept, as "
                        "HashNet's train.txt the release trains on; the release's own lists need "
                        "`pre_process.py import`",
    "hashnet": "HashNet's draw: queries and training images from all images, unlabelled ones kept",
    "dhn": "DHN's draw (Zhu et al. AAAI 2016): unlabelled images dropped, queries and training images per "
           "concept",
}
# DeepHash-pytorch's three CIFAR-10 protocols (its names cifar10, cifar10-1, cifar10-2; README: Data).
CIFAR10_SIZES = {"disjoint": PER_CLASS_SIZES, "train_in_database": PER_CLASS_SIZES,
                 "train_is_database": {"num_queries_per_class": 1000, "num_train_per_class": 5000}}
# Composites of each ordered class pair in each split of `pairs`: 100 pairs give 1,000 / 10,000 / 20,000.
PAIRS_SIZES = {"num_queries_per_pair": 10, "num_train_per_pair": 100, "num_database_per_pair": 200}
# How many unmappable lines `import` prints before counting the rest.
MAX_REPORTED = 20


class PreProcessError(Exception):
    """Unusable input: the message names the file (and line) or flag and how to fix it."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command_line = shlex.join(["pre_process.py", *argv])
    try:
        return args.run(args)
    except (PreProcessError, DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data_dir", default="data", help="folder of the dataset folders (default: data)")
    seeded = argparse.ArgumentParser(add_help=False)
    seeded.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument("--workers", type=positive_int, default=2,
                         help="processes that write or check images (default: 2)")

    def command(name, run, parents, summary, description):
        sub = commands.add_parser(name, parents=parents, help=summary, description=description)
        sub.set_defaults(run=run)
        return sub

    sub = command("fashion_mnist", build_fashion_mnist, [data, seeded, workers],
                  "build 'fashion_mnist' from the Fashion-MNIST IDX files",
                  "Fashion-MNIST as dataset 'fashion_mnist'. The 70,000 train and t10k images are "
                  "pooled and written as images/NNNNN.png (train 0-59999, then t10k); existing PNGs "
                  "of the right size are kept. Queries: --num_queries_per_class a class; database: "
                  "every other image; train: --num_train_per_class a class drawn from the database "
                  "(1,000 / 5,000 / 69,000 by default).")
    sub.add_argument("--root", default="/usr/share/datasets/fashion-mnist",
                     help="folder of the four IDX files, plain or .gz; when they are missing, "
                          "torchvision downloads them there (default: %(default)s)")
    sub.add_argument("--no_download", action="store_true", help="never try to download the IDX files")
    add_sizes(sub, PER_CLASS_SIZES)

    sub = command("cifar10", build_cifar10, [data, seeded, workers],
                  "build 'cifar10' from the CIFAR-10 python batches",
                  "CIFAR-10 as dataset 'cifar10' from the python-version batches (data_batch_1..5, "
                  "test_batch). The 60,000 images are pooled and written as images/NNNNN.png. "
                  "Queries: --num_queries_per_class a class; train: --num_train_per_class a class "
                  "from the rest. Database, by --protocol (DeepHash-pytorch's three): disjoint "
                  "(default, DCH's; DeepHash-pytorch's cifar10): the rest after queries and train, "
                  "1,000 / 5,000 / 54,000; train_in_database (cifar10-1): every image but the "
                  "queries, 1,000 / 5,000 / 59,000; train_is_database (cifar10-2): the training "
                  "images, 1,000 queries and 5,000 training images a class, 10,000 / 50,000 / 50,000.")
    sub.add_argument("--root", required=True, help="folder holding data_batch_1..5 and test_batch")
    sub.add_argument("--protocol", choices=tuple(CIFAR10_SIZES), default="disjoint",
                     help="which images make up the database, and the default sizes (default: disjoint)")
    add_protocol_sizes(sub, CIFAR10_SIZES)

    sub = command("coco", build_coco, [data, seeded], "build 'coco_80' from MS-COCO 2014",
                  "MS-COCO 2014 as dataset 'coco_80'. Images of train2014 and val2014 are pooled; "
                  "images without any annotation are dropped, as HashNet's paper (Cao et al. ICCV "
                  "2017) prunes the images with no category information: 122,218 labelled images "
                  "remain, the 10,000 + 112,218 lines of HashNet's training and database lists. "
                  "Category ids map to label columns in ascending id order. Queries: --num_queries "
                  "random images; train: --num_train random other images. Database, by --protocol: "
                  "hashnet (default), as in HashNet's published lists, which the MMHH release "
                  "trains on: every image but the training ones, so every query is in the database "
                  "and no training image is (5,000 / 10,000 / 112,218); disjoint: every image but "
                  "the queries, so train is a subset of the database (5,000 / 10,000 / 117,218). "
                  "data_root is the absolute COCO root.")
    sub.add_argument("--root", required=True,
                     help="folder with annotations/instances_{train,val}2014.json, train2014/, val2014/")
    sub.add_argument("--protocol", choices=("hashnet", "disjoint"), default="hashnet",
                     help="which images make up the database (default: hashnet)")
    add_sizes(sub, RANDOM_SIZES)

    sub = command("nuswide", build_nuswide, [data, seeded], "build 'nuswide_21' or 'nuswide_81'",
                  "NUS-WIDE as dataset 'nuswide_21' or 'nuswide_81'. Labels: the 21 most frequent "
                  "concepts (ties: Concepts81.txt order) or all 81, as columns in Concepts81.txt "
                  "order. Images listed but missing under --root are counted, reported and left out. "
                  "--protocol labelled_queries, as the MMHH release evaluates: --num_queries random "
                  "images among those with at least one concept are the queries (the release's query "
                  "list, DeepHash's, has no unlabelled image) and --num_train random other images, "
                  "unlabelled ones included, the training set (as HashNet's train.txt, which the "
                  "release trains on); database: every image but the queries (5,000 / 10,000 / the "
                  "rest); the release's exact lists need `pre_process.py import`. "
                  "--protocol hashnet, as in HashNet's published NUS-WIDE-81 lists: --num_queries "
                  "random images are the queries and "
                  "--num_train random other images the training set, drawn from every image, "
                  "including those with none of the concepts (HashNet's lists keep them: 2,185 of "
                  "its 10,000 training rows are all zero); database: every image but the queries, "
                  "so train is a subset of it (5,000 / 10,000 / the rest). --protocol dhn, DHN's "
                  "recipe (Zhu et al. AAAI 2016): images with none of the concepts are dropped; "
                  "for each concept in column order, --num_queries_per_class images having it are "
                  "drawn among those not drawn yet (the queries; 2,100 for 21 concepts), then "
                  "likewise --num_train_per_class a concept among the non-queries (train; 10,500); "
                  "database: every image but the queries. Default: labelled_queries with 81 "
                  "concepts, dhn with 21, because HashNet's published 21-concept lists "
                  "(pytorch/data/nus_wide) hold 2,100 queries and 10,500 training images, DHN's sizes. "
                  "data_root is the "
                  "absolute NUS-WIDE root; an image is images/<folder>/<file>, the last two "
                  "components of its ImageList/Imagelist.txt line.")
    sub.add_argument("--root", required=True,
                     help="folder with ImageList/Imagelist.txt, Groundtruth/AllLabels/, "
                          "Concepts81.txt (or ConceptsList/Concepts81.txt) and images/")
    sub.add_argument("--concepts", type=int, choices=(21, 81), required=True,
                     help="21: the 21 most frequent concepts (nuswide_21); 81: all (nuswide_81)")
    sub.add_argument("--protocol", choices=tuple(NUSWIDE_SIZES), default=None,
                     help="how queries, train and database are drawn (default: labelled_queries with "
                          "--concepts 81, dhn with --concepts 21)")
    add_protocol_sizes(sub, NUSWIDE_SIZES, "concept")

    sub = command("imagenet100", build_imagenet100, [data, seeded], "build 'imagenet_100' from ImageNet",
                  "ImageNet classes as dataset 'imagenet_100'. Queries: every val image of the "
                  "listed classes; database: every train image of them; train: --train_per_class "
                  "random train images a class (a subset of the database). Label columns follow "
                  "the class file. data_root is the absolute ImageNet root.")
    sub.add_argument("--root", required=True, help="folder with train/<wnid>/ and val/<wnid>/")
    sub.add_argument("--classes", required=True,
                     help="file of the class wnids, one a line (the first word of each line)")
    sub.add_argument("--train_per_class", type=non_negative_int, default=130,
                     help="random train images a class drawn for training (default: 130)")

    sub = command("noise", build_noise, [data, seeded], "noisy-label copy NAME_noise<R> of a dataset",
                  "Noisy-label copy DATA_DIR/NAME_noise<R>: round(R*n) seeded training lines get "
                  "the label vector of another, randomly chosen training image whose labels "
                  "differ (single-label lists: a uniformly random other class); images and their "
                  "order are kept; test and database are copied unchanged.")
    sub.add_argument("--dataset", required=True, help="name of a built dataset under DATA_DIR")
    sub.add_argument("--rate", type=fraction, required=True, help="fraction of training lines to relabel")

    sub = command("unseen", build_unseen, [data, seeded], "unseen-class split NAME_unseen<U> of a dataset",
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

    sub = command("pairs", build_pairs, [data, seeded, workers],
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

    sub = command("import", import_lists, [data], "dataset NAME from published list files",
                  "Turn published HashNet-format lists (HashNet's, DeepHash's) into dataset "
                  "DATA_DIR/NAME. Their paths were written on another machine: each line is mapped "
                  "to the file under --image_root sharing the longest path suffix with it, in whole "
                  "components and at least the file name (e.g. /home/x/coco/val2014/a.jpg to "
                  "val2014/a.jpg). Labels and line order are kept; paths are written relative to "
                  "--image_root, which becomes data_root. A line mapping to no file, or to two "
                  "files equally well, is reported as file:line (exit 1, nothing written). "
                  "dataset.json records each source list's sha256, per-list counts and how many "
                  "queries and training lines are in the database. The folder appears whole or "
                  "not at all.")
    sub.add_argument("--dataset", required=True, help="name of the dataset to write under DATA_DIR")
    for split, what in (("train", "training"), ("test", "query"), ("database", "database")):
        sub.add_argument(f"--{split}_list", required=True, help=f"the published {what} list")
    sub.add_argument("--image_root", required=True, help="folder holding the images, in any layout")
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an existing DATA_DIR/NAME (only once the new one is complete)")

    sub = command("val", carve_validation, [data, seeded], "carve a validation list out of a dataset's training list",
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

    sub = command("validate", validate, [data, workers], "check a dataset's lists and images",
                  "Check lists: every line parses (a format error stops that list at its first bad "
                  "line), label widths agree across the lists (unseen protocol: test and database), "
                  "every image exists and PIL decodes it. Prints counts, positives per label, "
                  "all-zero rows and overlaps. Exit 0: clean; 1: defects found, each printed as "
                  "file:line: problem; 2: unusable input.")
    target = sub.add_mutually_exclusive_group(required=True)
    target.add_argument("--dataset", help="name of a dataset under DATA_DIR")
    target.add_argument("--list", action="append", help="a list file (repeat for several)")
    sub.add_argument("--data_root", default=None, help="folder the list paths are relative to")
    return parser.parse_args(argv)


def add_sizes(sub, sizes, unit="class"):
    """A flag for each split size, with its default."""
    for name, default in sizes.items():
        sub.add_argument(f"--{name}", type=non_negative_int, default=default,
                         help=f"{size_help(name, unit)} (default: {default})")


def add_protocol_sizes(sub, sizes_by_protocol, unit="class"):
    """A flag for each split size of any --protocol; left unset, it takes the chosen protocol's default."""
    for name in dict.fromkeys(name for sizes in sizes_by_protocol.values() for name in sizes):
        defaults = ", ".join(f"{sizes[name]} with --protocol {protocol}"
                             for protocol, sizes in sizes_by_protocol.items() if name in sizes)
        sub.add_argument(f"--{name}", type=non_negative_int, default=None,
                         help=f"{size_help(name, unit)} (default: {defaults})")


def size_help(name, unit):
    return {"num_queries": "random images drawn as queries",
            "num_train": "random images, not queries, drawn for training",
            "num_queries_per_class": f"queries a {unit}",
            "num_train_per_class": f"training images a {unit}"}[name]


def protocol_sizes(args, sizes_by_protocol):
    """The split sizes of ``args.protocol``, flag or default; a size flag of other protocols only is an error."""
    chosen = sizes_by_protocol[args.protocol]
    for name in dict.fromkeys(name for sizes in sizes_by_protocol.values() for name in sizes):
        if name not in chosen and getattr(args, name) is not None:
            owners = [protocol for protocol, sizes in sizes_by_protocol.items() if name in sizes]
            raise PreProcessError(f"--{name} sets a size of --protocol {' or '.join(owners)}, not of --protocol "
                                  f"{args.protocol}; drop it or pass --protocol {owners[0]}")
    return [default if getattr(args, name) is None else getattr(args, name) for name, default in chosen.items()]


# ---------------------------------------------------------------- builders

def build_fashion_mnist(args):
    """Pool Fashion-MNIST, write its PNGs and the per-class split."""
    pixels, classes = read_fashion_mnist(args.root, download=not args.no_download)
    folder = os.path.join(args.data_dir, "fashion_mnist")
    write_pngs(os.path.join(folder, "images"), pixels, args.workers)
    rng = np.random.default_rng(args.seed)
    queries, train = sample_per_class(classes, len(FASHION_MNIST_CLASSES),
                                      (args.num_queries_per_class, args.num_train_per_class), rng)
    database = np.setdiff1d(np.arange(len(classes)), queries)
    splits = {"train": train, "test": queries, "database": database}
    lists = {split: list_text(png_names(index), one_hot(classes[index], len(FASHION_MNIST_CLASSES)))
             for split, index in splits.items()}
    write_dataset(args, "fashion_mnist", lists, dataset_record(
        args, "fashion_mnist", len(FASHION_MNIST_CLASSES), splits, root=args.root,
        label_names=list(FASHION_MNIST_CLASSES)))
    return 0


def build_cifar10(args):
    """Pool CIFAR-10, write its PNGs and the per-class split with a disjoint database."""
    pixels, classes, names = read_cifar10(args.root)
    folder = os.path.join(args.data_dir, "cifar10")
    write_pngs(os.path.join(folder, "images"), pixels, args.workers)
    rng = np.random.default_rng(args.seed)
    queries, train = sample_per_class(classes, len(names), protocol_sizes(args, CIFAR10_SIZES), rng)
    database = cifar10_database(args.protocol, len(classes), queries, train)
    splits = {"train": train, "test": queries, "database": database}
    lists = {split: list_text(png_names(index), one_hot(classes[index], len(names)))
             for split, index in splits.items()}
    write_dataset(args, "cifar10", lists, dataset_record(
        args, "cifar10", len(names), splits, root=args.root, label_names=names,
        protocol={"type": args.protocol}))
    return 0


def cifar10_database(protocol, count, queries, train):
    """The database of a CIFAR10_SIZES protocol: the training images (train_is_database), or every image but
    the queries (train_in_database) or but the queries and the training images (disjoint)."""
    if protocol == "train_is_database":
        return train
    left_out = queries if protocol == "train_in_database" else np.concatenate([queries, train])
    return np.setdiff1d(np.arange(count), left_out)


def build_coco(args):
    """Pool COCO 2014 train and val, drop unlabelled images, draw queries and train."""
    paths, labels, names = read_coco(args.root)
    rng = np.random.default_rng(args.seed)
    queries, train = draw_queries_and_train(len(paths), args.num_queries, args.num_train, rng,
                                            f"labelled COCO images under {args.root}")
    # HashNet's lists leave the training images out of the database; disjoint leaves the queries out
    database = np.setdiff1d(np.arange(len(paths)), train if args.protocol == "hashnet" else queries)
    splits = {"train": train, "test": queries, "database": database}
    lists = {split: list_text([paths[i] for i in index], labels[index]) for split, index in splits.items()}
    write_dataset(args, "coco_80", lists, dataset_record(
        args, "coco_80", len(names), splits, root=args.root, data_root=os.path.abspath(args.root),
        label_names=names, protocol={"type": args.protocol}))
    return 0


def build_nuswide(args):
    """NUS-WIDE with 21 or 81 concepts: labelled queries, HashNet's random draw or DHN's per concept."""
    args.protocol = args.protocol or ("labelled_queries" if args.concepts == 81 else "dhn")
    sizes = protocol_sizes(args, NUSWIDE_SIZES)
    print(f"protocol {args.protocol}: {NUSWIDE_PROTOCOLS[args.protocol]}")
    paths, labels, names = read_nuswide(args.root)
    # The concepts are chosen on every listed image, whichever of them this copy holds.
    columns = (np.arange(len(names)) if args.concepts == 81
               else np.sort(np.argsort(-labels.sum(0), kind="stable")[:21]))
    labels, names = labels[:, columns], [names[c] for c in columns]
    listed = len(paths)
    paths, labels = drop_missing_images(args.root, paths, labels)
    missing = listed - len(paths)
    rng = np.random.default_rng(args.seed)
    images = f"NUS-WIDE images under {args.root}"
    if args.protocol == "labelled_queries":
        queries, train = draw_queries_and_train(len(paths), *sizes, rng, images, np.flatnonzero(labels.any(1)))
    elif args.protocol == "hashnet":
        queries, train = draw_queries_and_train(len(paths), *sizes, rng, images)
    else:
        kept = np.flatnonzero(labels.any(1))
        paths, labels = [paths[i] for i in kept], labels[kept]
        queries, train = sample_dhn(labels, names, *sizes, rng)
    splits = {"train": train, "test": queries, "database": np.setdiff1d(np.arange(len(paths)), queries)}
    lists = {split: list_text([paths[i] for i in index], labels[index]) for split, index in splits.items()}
    name = f"nuswide_{args.concepts}"
    write_dataset(args, name, lists, dataset_record(
        args, name, len(columns), splits, root=args.root, data_root=os.path.abspath(args.root),
        label_names=names, protocol={"type": args.protocol, "listed_images": listed,
                                     "missing_images": missing}))
    return 0


def build_imagenet100(args):
    """ImageNet classes of a class file: val images are queries, train images the database."""
    wnids = read_class_file(args.classes)
    rng = np.random.default_rng(args.seed)
    splits = {"train": [], "test": [], "database": []}
    for column, wnid in enumerate(wnids):
        train_images = class_images(args.root, "train", wnid, args.classes)
        if len(train_images) < args.train_per_class:
            raise PreProcessError(f"{os.path.join(args.root, 'train', wnid)} holds {len(train_images)} "
                                  f"images, fewer than --train_per_class {args.train_per_class}")
        picked = np.sort(rng.choice(len(train_images), args.train_per_class, replace=False))
        splits["train"] += [(train_images[i], column) for i in picked]
        splits["database"] += [(path, column) for path in train_images]
        splits["test"] += [(path, column) for path in class_images(args.root, "val", wnid, args.classes)]
    lists = {split: list_text([path for path, _ in rows], one_hot([c for _, c in rows], len(wnids)))
             for split, rows in splits.items()}
    write_dataset(args, "imagenet_100", lists, dataset_record(
        args, "imagenet_100", len(wnids), splits, root=args.root, data_root=os.path.abspath(args.root),
        label_names=wnids))
    return 0


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


def build_unseen(args):
    """Split a dataset's classes into seen (train) and unseen (queries and database)."""
    spec, record, entries = read_parent(args.dataset, args.data_dir)
    if (record.get("protocol") or {}).get("type") == "unseen":
        raise PreProcessError(f"--dataset {args.dataset} is already an unseen-class split; "
                              "pass the dataset it was made from")
    width = entries["train"][1].shape[1]
    for split in ("test", "database"):
        if entries[split][1].shape[1] != width:
            raise PreProcessError(f"{spec.lists[split]}: {entries[split][1].shape[1]} labels a line, but "
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
            raise PreProcessError(f"the {split} list of the unseen split of {args.dataset} would be "
                                  "empty; choose other --unseen_classes or another --seed")
    names = record.get("label_names")
    protocol = {"type": "unseen", "parent": args.dataset, "seen_classes": seen.tolist(),
                "unseen_classes": unseen.tolist(), "seed": args.seed}
    lists = {split: list_text(*children[split]) for split in SPLITS}
    write_dataset(args, name, lists, child_record(
        args, name, spec, record, children, len(unseen),
        [names[c] for c in unseen] if names else None, protocol))
    return 0


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
        raise PreProcessError(f"the splits need {needed} images of every class (each class is the left and the "
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
    written = 0
    for name, image in zip(names, np.concatenate([left, right], axis=2)):
        path = os.path.join(folder, name)
        if not png_matches(path, image):
            write_bytes_atomically(path, png_bytes(image), durable=False)
            written += 1
    return written


def carve_validation(args):
    """Move a seeded choice of training lines into val.txt; train.txt keeps the others.

    With --into NEW the parent stays as it is: NEW gets the carved lists, the parent's test and database
    lists, and a dataset.json whose data_root points at the parent's images.
    """
    spec = resolve_dataset(args.dataset, args.data_dir)
    train_path = require_list(spec, "train")
    folder = os.path.join(args.data_dir, args.into) if args.into else spec.folder
    if args.into and os.path.lexists(folder):
        raise PreProcessError(f"{folder} already exists; choose another --into")
    if os.path.exists(os.path.join(folder, "val.txt")):
        raise PreProcessError(f"{os.path.join(folder, 'val.txt')} already exists; the training list is already "
                              "carved (rebuild the dataset, or carve a copy with --into NEW)")
    if args.database == "train" and not args.into:
        raise PreProcessError("--database train replaces the database list, so it needs --into NEW; NAME's own "
                              "lists stay as they are")
    read_list(train_path, None)  # a clear file:line error before anything moves
    with open(train_path, encoding="utf-8") as handle:
        lines = [line if line.endswith("\n") else line + "\n" for line in handle if line.strip()]
    size = args.size if args.size is not None else round(args.ratio * len(lines))
    if not 1 <= size < len(lines):
        raise PreProcessError(f"a validation list of {size} lines out of {len(lines)} training lines leaves no "
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
    write_bytes_atomically(os.path.join(folder, "dataset.json"), (json.dumps(record, indent=2) + "\n").encode())
    write_bytes_atomically(os.path.join(folder, "train.txt"), kept.encode())
    print(f"wrote {os.path.join(folder, 'val.txt')}: {size} validation lines; {folder}/train.txt keeps "
          f"{len(lines) - size}")
    return 0


# ---------------------------------------------------------------- published lists

def import_lists(args):
    """Map published lists onto the images under --image_root and write them as dataset NAME."""
    folder = os.path.join(args.data_dir, args.dataset)
    sources = {split: getattr(args, f"{split}_list") for split in SPLITS}
    check_import_paths(args, sources, folder)
    published = {split: read_published_list(path) for split, path in sources.items()}
    width = common_label_width(sources, {split: labels.shape[1] for split, (*_, labels) in published.items()})
    wanted = {path_components(token)[-1] for _, tokens, _ in published.values() for token in tokens}
    mapped, problems = map_lists(published, sources, index_images(args.image_root, wanted), args.image_root)
    if problems:
        return report_unmapped(problems, args.image_root)
    # the labels were parsed as 0/1 tokens, so writing them back gives the same tokens
    lists = {split: list_text(mapped[split], published[split][2]) for split in SPLITS}
    record = dataset_record(args, args.dataset, width, mapped, root=args.image_root,
                            data_root=os.path.abspath(args.image_root),
                            presets=PRESETS.get(args.dataset, DEFAULT_PRESET),
                            protocol=imported_protocol(sources, published, mapped))
    write_folder_whole(folder, lists, record)
    print_written(folder, record)
    return 0


def check_import_paths(args, sources, folder):
    """Refuse missing inputs, and an existing dataset folder unless --overwrite."""
    for split, path in sources.items():
        if not os.path.isfile(path):
            raise PreProcessError(f"--{split}_list {path} does not exist; pass the published list file")
    if not os.path.isdir(args.image_root):
        raise PreProcessError(f"--image_root {args.image_root} is not a folder; pass the folder that holds "
                              "the images")
    if os.path.lexists(folder) and not args.overwrite:
        raise PreProcessError(f"{folder} already exists; pass --overwrite to replace it, or choose another "
                              "--dataset")


def map_lists(published, sources, by_name, root):
    """Each list's image paths under ``root`` (None where unmapped) and a file:line problem per bad line."""
    mapped, problems = {}, []
    for split, (numbers, tokens, _) in published.items():
        mapped[split] = []
        for number, token in zip(numbers, tokens):
            match, problem = best_match(token, by_name, root)
            mapped[split].append(match)
            if problem:
                problems.append(f"{sources[split]}:{number}: {problem}")
    return mapped, problems


def common_label_width(sources, widths):
    """The label width of the three lists, which must agree."""
    for split in ("test", "database"):
        if widths[split] != widths["train"]:
            raise PreProcessError(f"--{split}_list {sources[split]} has {widths[split]} labels a line, but "
                                  f"--train_list {sources['train']} has {widths['train']}; pass the three "
                                  "lists of one dataset")
    return widths["train"]


def read_published_list(path):
    """Line numbers, path tokens and labels of a HashNet-format list."""
    _, _, labels = read_list(path, None)
    numbers, tokens = zip(*list_entries(path))
    return list(numbers), list(tokens), labels


def path_components(token):
    """The components of a list path written on any machine, '.' and empty ones dropped (at least one)."""
    return [part for part in token.replace("\\", "/").split("/") if part not in ("", ".")] or [""]


def index_images(root, wanted):
    """Paths (relative to ``root``, '/'-separated) of the files under it named in ``wanted``, by name."""
    top = os.stat(root)
    by_name, scanned, folders, seen = {}, 0, [""], {(top.st_dev, top.st_ino)}
    while folders:
        relative = folders.pop()
        with os.scandir(os.path.join(root, relative)) as entries:
            for entry in entries:
                path = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir():
                    info = entry.stat()
                    if (info.st_dev, info.st_ino) not in seen:  # linked folders are walked once: no loops
                        seen.add((info.st_dev, info.st_ino))
                        folders.append(path)
                elif entry.name in wanted:
                    by_name.setdefault(entry.name, []).append(path)
                scanned += 1
                if scanned % 100000 == 0:
                    print(f"  {scanned} files indexed under {root}", file=sys.stderr, flush=True)
    return by_name


def best_match(token, by_name, root):
    """The indexed path sharing the longest path suffix with ``token``, or None and why."""
    parts = path_components(token)
    candidates = by_name.get(parts[-1], [])
    if not candidates:
        return None, (f"{token} maps to no file under {root}; put the image there or pass the "
                      "--image_root that holds it")
    shared = [common_suffix_length(parts, candidate.split("/")) for candidate in candidates]
    best = sorted(c for c, n in zip(candidates, shared) if n == max(shared))
    if len(best) > 1:
        return None, (f"{token} maps to two or more files under {root} equally well: {', '.join(best)}; "
                      "pass an --image_root that holds only one of them")
    return best[0], None


def common_suffix_length(parts, other):
    """How many trailing path components two paths share."""
    length = 0
    for mine, theirs in zip(reversed(parts), reversed(other)):
        if mine != theirs:
            break
        length += 1
    return length


def report_unmapped(problems, root):
    """Print the first unmappable lines and a count of the rest on stderr; exit status 1."""
    for problem in problems[:MAX_REPORTED]:
        print(problem, file=sys.stderr)
    if len(problems) > MAX_REPORTED:
        print(f"... and {len(problems) - MAX_REPORTED} more", file=sys.stderr)
    print(f"error: {len(problems)} list line(s) do not map to exactly one file under {root}; nothing "
          "written", file=sys.stderr)
    return 1


def imported_protocol(sources, published, mapped):
    """The protocol record of imported lists: source files, per-list counts, overlaps with the database."""
    database = set(mapped["database"])
    return {"type": "imported",
            "source_files": {split: {"path": os.path.abspath(path), "sha256": file_sha256(path)}
                             for split, path in sources.items()},
            "counts": {split: label_counts(labels) for split, (_, _, labels) in published.items()},
            "queries_in_database": sum(path in database for path in mapped["test"]),
            "train_in_database": sum(path in database for path in mapped["train"])}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def label_counts(labels):
    """Lines, all-zero label rows and positives per label of a (n, C) label matrix."""
    return {"lines": len(labels), "all_zero_rows": int((labels.sum(1) == 0).sum()),
            "positives_per_label": labels.sum(0).tolist()}


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


# ---------------------------------------------------------------- validation

def validate(args):
    """Check every line, label width and image of a dataset's lists (or given lists)."""
    lists, data_root, protocol = validation_targets(args)
    defects, parsed = [], {}
    for name, path in lists.items():
        try:
            parsed[name] = read_list(path, data_root)
        except DataError as error:
            defects.append(str(error))
    defects += width_defects(parsed, lists, protocol)
    defects += image_defects(parsed, lists, args.workers)
    print_list_stats(parsed, lists)
    print_overlaps(parsed)
    for defect in defects:
        print(defect)
    print(f"{len(defects)} defect(s) found" if defects else "no defects found")
    return 1 if defects else 0


def validation_targets(args):
    """The lists to check (name -> path), their data root, and the dataset's protocol type."""
    if args.list:
        return {path: path for path in args.list}, args.data_root, None
    spec = resolve_dataset(args.dataset, args.data_dir, data_root=args.data_root)
    if not any(os.path.isfile(path) for path in spec.lists.values()):
        require_list(spec, "train")  # raises, naming the command that builds the lists
    protocol = (read_dataset_json(spec.folder).get("protocol") or {}).get("type")
    return spec.lists, spec.data_root, protocol


def width_defects(parsed, lists, protocol):
    """Lists whose label width differs from the first list of their group."""
    groups = [["train", "val"], ["test", "database"]] if protocol == "unseen" else [list(lists)]
    defects = []
    for group in groups:
        present = [name for name in group if name in parsed]
        for name in present[1:]:
            reference, width = present[0], parsed[present[0]][2].shape[1]
            line_numbers, _, labels = parsed[name]
            if labels.shape[1] != width:
                defects.append(f"{lists[name]}:{line_numbers[0]}: {labels.shape[1]} labels a line, but "
                               f"{lists[reference]} has {width}; rebuild the lists so the widths agree")
    return defects


def image_defects(parsed, lists, workers):
    """Each list line whose image is missing or does not decode."""
    unique = sorted({path for _, paths, _ in parsed.values() for path in paths})
    problems = dict(zip(unique, map_with_progress(image_problem, unique, workers, "images checked")))
    return [f"{lists[name]}:{number}: image {path} {problems[path]}"
            for name, (line_numbers, paths, _) in parsed.items()
            for number, path in zip(line_numbers, paths) if problems[path]]


def print_list_stats(parsed, lists):
    for name, (_, _, labels) in parsed.items():
        counts = label_counts(labels)
        print(f"{name} ({lists[name]}): {counts['lines']} images, {labels.shape[1]} labels, "
              f"{counts['all_zero_rows']} all-zero label rows")
        positives = enumerate(counts["positives_per_label"])
        print("  positives per label: " + " ".join(f"{c}:{n}" for c, n in positives))


def print_overlaps(parsed):
    images = {name: {os.path.normpath(os.path.abspath(p)) for p in paths}
              for name, (_, paths, _) in parsed.items()}
    names = list(images)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            print(f"overlap {first} & {second}: {len(images[first] & images[second])} images")


def read_list(path, data_root):
    """Line numbers, resolved image paths and labels of a list; DataError names file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: the list file does not exist; build it with pre_process.py")
    try:
        paths, labels = read_image_list(path, data_root)
        line_numbers = [number for number, _ in list_entries(path)]
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); rewrite the list as UTF-8") from None
    return line_numbers, paths, labels


# ---------------------------------------------------------------- protocol helpers

def read_parent(name, data_dir):
    """A built dataset's spec, dataset.json record and (path token, labels) of each list."""
    spec = resolve_dataset(name, data_dir)
    entries = {}
    for split in SPLITS:
        path = require_list(spec, split)
        _, _, labels = read_list(path, None)
        entries[split] = ([token for _, token in list_entries(path)], labels)
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


def relabel(labels, rate, rng):
    """A copy of ``labels`` with round(rate * n) random rows replaced by different labels."""
    n, width = labels.shape
    rows = np.sort(rng.choice(n, round(rate * n), replace=False))
    noisy = labels.copy()
    if (labels.sum(1) == 1).all():
        if width < 2:
            raise PreProcessError("the training list has a single class: there is no other label to give")
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
        raise PreProcessError("every training image has the same labels: there is no other label vector")
    pick = rng.integers(0, others)  # rank among the images outside the row's own block
    return order[np.where(pick < starts[own], pick, pick + sizes[own])]


def unseen_columns(args, width, rng):
    """The sorted unseen label columns: the explicit list, or a seeded draw of round(U * C)."""
    if args.unseen_classes is not None:
        unseen = sorted(set(args.unseen_classes))
        if unseen[0] < 0 or unseen[-1] >= width or len(unseen) == width:
            raise PreProcessError(f"--unseen_classes must name some, not all, of the columns 0..{width - 1}")
        return np.asarray(unseen)
    ratio = 0.25 if args.unseen_ratio is None else args.unseen_ratio
    count = round(ratio * width)
    if not 1 <= count < width:
        raise PreProcessError(f"--unseen_ratio {ratio:g} makes {count} of {width} classes unseen; choose a "
                              "ratio that leaves at least one seen and one unseen class")
    return np.sort(rng.choice(width, count, replace=False))


# ---------------------------------------------------------------- source readers

def read_fashion_mnist(root, download):
    """Pooled (70000, 28, 28) pixels and class ids: train first, then t10k."""
    files = fashion_mnist_files(root, download)
    pixels, classes = [], []
    for part in ("train", "t10k"):
        images, labels = read_idx(files[part, "images-idx3"]), read_idx(files[part, "labels-idx1"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PreProcessError(f"{files[part, 'images-idx3']} and {files[part, 'labels-idx1']} do not hold "
                                  "matching images (n, rows, cols) and labels (n); replace them")
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise PreProcessError(f"{files[part, 'labels-idx1']}: label {labels.max()} is not a class 0..9")
        pixels.append(images)
        classes.append(labels)
    return np.concatenate(pixels), np.concatenate(classes).astype(np.int64)


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
    raise PreProcessError(f"Fashion-MNIST IDX files not found in {root}; install them with "
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
        raise PreProcessError(f"{path}: cannot read ({error}); replace the file") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise PreProcessError(f"{path}: not an unsigned-byte IDX file (bad magic number); replace the file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else None
    if dims is None or len(data) - header != int(np.prod(dims)):
        raise PreProcessError(f"{path}: the IDX data does not match its header; the file is truncated")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_cifar10(root):
    """Pooled (60000, 32, 32, 3) pixels, class ids and class names: data batches, then test."""
    pixels, classes = [], []
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = load_pickle(os.path.join(root, batch))
        try:
            data = np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(content[b"labels"], dtype=np.int64)
        except (KeyError, TypeError, ValueError):
            raise PreProcessError(f"{os.path.join(root, batch)}: not a CIFAR-10 batch (a dict with "
                                  "b'data' (n, 3072) and b'labels'); use the python-version batches") from None
        if len(data) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise PreProcessError(f"{os.path.join(root, batch)}: labels do not match the images or are not 0..9")
        pixels.append(data.transpose(0, 2, 3, 1))
        classes.append(labels)
    meta_path = os.path.join(root, "batches.meta")
    names = list(CIFAR10_CLASSES)
    if os.path.isfile(meta_path):
        names = [name.decode() for name in load_pickle(meta_path).get(b"label_names", names)]
    return np.concatenate(pixels), np.concatenate(classes), names


def load_pickle(path):
    if not os.path.isfile(path):
        raise PreProcessError(f"{path} is missing; pass --root the folder of the extracted "
                              "cifar-10-python.tar.gz (data_batch_1..5, test_batch)")
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise PreProcessError(f"{path}: not a readable pickle ({error}); replace the file") from None


def read_coco(root):
    """Relative image paths, (n, C) labels and category names of labelled COCO 2014 images."""
    subsets = {}
    for subset in ("train2014", "val2014"):
        path = os.path.join(root, "annotations", f"instances_{subset}.json")
        try:
            with open(path, encoding="utf-8") as handle:
                subsets[subset] = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise PreProcessError(f"{path}: cannot read the COCO annotations ({error}); pass --root "
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
        raise PreProcessError(f"{root}/annotations: not COCO instances JSON (missing {error}); use the "
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
            raise PreProcessError(f"{label_path}: {len(values)} labels, but {list_path} lists {len(paths)} "
                                  "images; both must come from the same NUS-WIDE release")
        bad = next((i for i, value in enumerate(values) if value not in ("0", "1")), None)
        if bad is not None:
            raise PreProcessError(f"{label_path}:{bad + 1}: '{values[bad]}' is not 0 or 1")
        labels[:, column] = np.asarray(values) == "1"
    return paths, labels, names


def drop_missing_images(root, paths, labels):
    """The listed images that are files under ``root``, with their labels; the others are reported.

    HashNet's copy of NUS-WIDE (nus_wide.tar.gz) holds about 223,000 of the 269,648 images listed.
    """
    present = np.array([os.path.isfile(os.path.join(root, path)) for path in paths], dtype=bool)
    missing = len(paths) - int(present.sum())
    if missing == len(paths):
        raise PreProcessError(f"none of the {len(paths)} images listed in {root}/ImageList/Imagelist.txt is "
                              f"under {root}/images/<folder>/<file>; check --root")
    if missing:
        print(f"{missing} of the {len(paths)} images listed in {root}/ImageList/Imagelist.txt are missing under "
              f"{root}/images: left out")
    return [path for path, here in zip(paths, present) if here], labels[present]


def read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().splitlines()
    except OSError as error:
        raise PreProcessError(f"{path}: cannot read ({error.strerror}); check --root") from None


def find_existing(candidates):
    found = next((path for path in candidates if os.path.isfile(path)), None)
    if found is None:
        raise PreProcessError(f"none of {', '.join(candidates)} exists; check --root")
    return found


def read_class_file(path):
    """The class wnids of a class file: the first word of each non-empty line, no repeats."""
    wnids = [line.split()[0] for line in read_lines(path) if line.split()]
    if not wnids:
        raise PreProcessError(f"{path}: no class names; write one wnid a line")
    repeated = next((w for i, w in enumerate(wnids) if w in wnids[:i]), None)
    if repeated:
        raise PreProcessError(f"{path}: class {repeated} is listed twice; list each class once")
    return wnids


def class_images(root, part, wnid, classes_path):
    """Sorted relative paths (``part/wnid/file``) of a class's images."""
    folder = os.path.join(root, part, wnid)
    if not os.path.isdir(folder):
        raise PreProcessError(f"{folder} is missing for class {wnid} of {classes_path}; expected "
                              f"{part}/<wnid>/ folders under --root (val images sorted into class folders)")
    return [f"{part}/{wnid}/{name}" for name in sorted(os.listdir(folder))
            if name.lower().endswith(IMAGE_SUFFIXES)]


# ---------------------------------------------------------------- splits and writing

def sample_per_class(classes, num_classes, counts, rng):
    """For each class, disjoint random draws of the given sizes; one sorted index array per size."""
    draws = [[] for _ in counts]
    for label in range(num_classes):
        members = rng.permutation(np.flatnonzero(classes == label))
        if len(members) < sum(counts):
            raise PreProcessError(f"class {label} has {len(members)} images, fewer than "
                                  f"--num_queries_per_class + --num_train_per_class = {sum(counts)}")
        start = 0
        for draw, count in zip(draws, counts):
            draw.append(members[start:start + count])
            start += count
    return [np.sort(np.concatenate(draw)) for draw in draws]


def draw_queries_and_train(count, num_queries, num_train, rng, images, query_pool=None):
    """HashNet's draw: random queries (among ``query_pool``, default every image), then random training images
    among the rest (sorted indices)."""
    if num_queries + num_train > count:
        raise PreProcessError(f"--num_queries {num_queries} + --num_train {num_train} exceed the {count} "
                              f"{images}; lower them")
    pool = np.arange(count) if query_pool is None else query_pool
    if num_queries > len(pool):
        raise PreProcessError(f"--num_queries {num_queries} exceeds the {len(pool)} labelled {images}; lower it")
    queries = np.sort(rng.choice(pool, num_queries, replace=False))
    train = np.sort(rng.choice(np.setdiff1d(np.arange(count), queries), num_train, replace=False))
    return queries, train


def sample_dhn(labels, names, queries_per_concept, train_per_concept, rng):
    """DHN's draw: queries per concept, then training images per concept among the non-queries."""
    everyone = np.ones(len(labels), dtype=bool)
    queries = sample_per_concept(labels, names, queries_per_concept, everyone, rng, "--num_queries_per_class")
    is_query = np.zeros(len(labels), dtype=bool)
    is_query[queries] = True
    train = sample_per_concept(labels, names, train_per_concept, ~is_query, rng, "--num_train_per_class")
    return queries, train


def sample_per_concept(labels, names, count, allowed, rng, flag):
    """Per concept, ``count`` allowed images having it, none drawn twice."""
    drawn = np.zeros(len(labels), dtype=bool)
    for column in range(labels.shape[1]):
        candidates = np.flatnonzero(labels[:, column].astype(bool) & allowed & ~drawn)
        if len(candidates) < count:
            raise PreProcessError(f"concept '{names[column]}' has {len(candidates)} images left to draw, "
                                  f"fewer than {flag} {count}; lower {flag}")
        drawn[rng.choice(candidates, count, replace=False)] = True
    return np.flatnonzero(drawn)


def one_hot(classes, num_classes):
    labels = np.zeros((len(classes), num_classes), dtype=np.uint8)
    labels[np.arange(len(classes)), np.asarray(classes, dtype=np.int64)] = 1
    return labels


def png_names(index):
    return [f"images/{i:05d}.png" for i in index]


def list_text(paths, labels):
    """HashNet-format lines ``path l1 ... lC``."""
    rows = [" ".join(row) for row in np.asarray(labels, dtype=np.uint8).astype(str)]
    return "".join(f"{path} {row}\n" for path, row in zip(paths, rows))


def list_entries(list_path):
    """(line number, path token) of every non-blank line, as read_image_list counts them."""
    entries = []
    with open(list_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if fields:
                entries.append((number, fields[0]))
    return entries


def read_dataset_json(folder):
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise PreProcessError(f"{path} is not valid JSON ({error}); rebuild it with pre_process.py") from None


def dataset_record(args, name, num_labels, splits, root, data_root=None, label_names=None,
                   presets=None, protocol=None):
    """The dataset.json content; ``splits`` maps each split to its entries (for the sizes)."""
    presets = presets or PRESETS[name]
    return {"name": name, "num_labels": int(num_labels), "topk": int(presets["topk"]),
            "similar_weight": float(presets["similar_weight"]), "data_root": data_root,
            "sizes": {split: len(splits[split]) for split in SPLITS}, "label_names": label_names,
            "source": {"command": args.command_line, "root": os.path.abspath(root)},
            "seed": getattr(args, "seed", None), "protocol": protocol}


def write_dataset(args, name, lists, record):
    """Write NAME's three list texts and dataset.json, then print the sizes."""
    folder = os.path.join(args.data_dir, name)
    write_dataset_files(folder, lists, record)
    print_written(folder, record)


def write_dataset_files(folder, lists, record):
    for split in SPLITS:
        write_bytes_atomically(os.path.join(folder, f"{split}.txt"), lists[split].encode("utf-8"))
    write_bytes_atomically(os.path.join(folder, "dataset.json"),
                     (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def print_written(folder, record):
    sizes = ", ".join(f"{split} {count}" for split, count in record["sizes"].items())
    print(f"wrote {folder}: {sizes} ({record['num_labels']} labels)")


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
    written = 0
    for offset, image in enumerate(pixels):
        path = os.path.join(folder, f"{start + offset:05d}.png")
        if not png_matches(path, image):
            # Not synced one by one (70,000 fsyncs take minutes): a rerun checks every PNG and redoes lost ones.
            write_bytes_atomically(path, png_bytes(image), durable=False)
            written += 1
    return written


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


# ---------------------------------------------------------------- argument types

def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give a count of 0 or more")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return value


def fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def class_indices(text):
    try:
        columns = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        columns = []
    if not columns:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of label columns, "
                                         "e.g. 0,3,7")
    return columns


if __name__ == "__main__":
    sys.exit(main())
