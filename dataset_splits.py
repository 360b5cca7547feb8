"""The datasets pre_process.py builds from their sources, each subcommand's flags beside its builder, and
the split protocols they draw: so many queries and training images a class (DHN's recipe) or a concept,
or random draws (HashNet's); which images make up the database (every one but the queries or the training
images, or disjoint from both) is each builder's --protocol."""
import os

import numpy as np

from dataset_flags import (
    add_command,
    add_data_dir,
    add_protocol_sizes,
    add_seed,
    add_sizes,
    add_workers,
    non_negative_int,
    protocol_sizes,
)
from dataset_folder import dataset_record, list_text, one_hot, png_names, write_dataset, write_pngs
from dataset_sources import (
    FASHION_MNIST_CLASSES,
    class_images,
    drop_missing_images,
    read_cifar10,
    read_class_file,
    read_coco,
    read_fashion_mnist,
    read_nuswide,
)
from runtime import UsageError

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


def add_fashion_mnist_command(commands):
    """The `fashion_mnist` subcommand and its flags."""
    sub = add_command(commands, "fashion_mnist", build_fashion_mnist, [add_data_dir, add_seed, add_workers],
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


def add_cifar10_command(commands):
    """The `cifar10` subcommand and its flags."""
    sub = add_command(commands, "cifar10", build_cifar10, [add_data_dir, add_seed, add_workers],
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


def add_coco_command(commands):
    """The `coco` subcommand and its flags."""
    sub = add_command(commands, "coco", build_coco, [add_data_dir, add_seed], "build 'coco_80' from MS-COCO 2014",
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


def build_coco(args):
    """Pool COCO 2014 train and val, drop unlabelled images, draw queries and train."""
    paths, labels, names = read_coco(args.root)
    rng = np.random.default_rng(args.seed)
    queries, train = draw_queries_and_train(len(paths), args.num_queries, args.num_train, rng,
                                            f"labelled COCO images under {args.root}")
    # HashNet's lists leave the training images out of the database; disjoint leaves the queries out
    database = np.setdiff1d(np.arange(len(paths)), train if args.protocol == "hashnet" else queries)
    write_image_splits(args, "coco_80", paths, labels, names, {"train": train, "test": queries, "database": database},
                       protocol={"type": args.protocol})
    return 0


def add_nuswide_command(commands):
    """The `nuswide` subcommand and its flags."""
    sub = add_command(commands, "nuswide", build_nuswide, [add_data_dir, add_seed],
                      "build 'nuswide_21' or 'nuswide_81'",
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
    write_image_splits(args, f"nuswide_{args.concepts}", paths, labels, names, splits,
                       protocol={"type": args.protocol, "listed_images": listed, "missing_images": missing})
    return 0


def write_image_splits(args, name, paths, labels, names, splits, protocol):
    """Write dataset `name` whose splits index `paths` (relative to --root) and their (N, C) `labels`."""
    lists = {split: list_text([paths[i] for i in index], labels[index]) for split, index in splits.items()}
    write_dataset(args, name, lists, dataset_record(
        args, name, len(names), splits, root=args.root, data_root=os.path.abspath(args.root),
        label_names=names, protocol=protocol))


def add_imagenet100_command(commands):
    """The `imagenet100` subcommand and its flags."""
    sub = add_command(commands, "imagenet100", build_imagenet100, [add_data_dir, add_seed],
                      "build 'imagenet_100' from ImageNet",
                      "ImageNet classes as dataset 'imagenet_100'. Queries: every val image of the "
                      "listed classes; database: every train image of them; train: --train_per_class "
                      "random train images a class (a subset of the database). Label columns follow "
                      "the class file. data_root is the absolute ImageNet root.")
    sub.add_argument("--root", required=True, help="folder with train/<wnid>/ and val/<wnid>/")
    sub.add_argument("--classes", required=True,
                     help="file of the class wnids, one a line (the first word of each line)")
    sub.add_argument("--train_per_class", type=non_negative_int, default=130,
                     help="random train images a class drawn for training (default: 130)")


def build_imagenet100(args):
    """ImageNet classes of a class file: val images are queries, train images the database."""
    wnids = read_class_file(args.classes)
    rng = np.random.default_rng(args.seed)
    splits = {"train": [], "test": [], "database": []}
    for column, wnid in enumerate(wnids):
        train_images = class_images(args.root, "train", wnid, args.classes)
        if len(train_images) < args.train_per_class:
            raise UsageError(f"{os.path.join(args.root, 'train', wnid)} holds {len(train_images)} "
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


def sample_per_class(classes, num_classes, counts, rng):
    """For each class, disjoint random draws of the given sizes; one sorted index array per size."""
    draws = [[] for _ in counts]
    for label in range(num_classes):
        members = rng.permutation(np.flatnonzero(classes == label))
        if len(members) < sum(counts):
            raise UsageError(f"class {label} has {len(members)} images, fewer than "
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
        raise UsageError(f"--num_queries {num_queries} + --num_train {num_train} exceed the {count} "
                         f"{images}; lower them")
    pool = np.arange(count) if query_pool is None else query_pool
    if num_queries > len(pool):
        raise UsageError(f"--num_queries {num_queries} exceeds the {len(pool)} labelled {images}; lower it")
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
            raise UsageError(f"concept '{names[column]}' has {len(candidates)} images left to draw, "
                             f"fewer than {flag} {count}; lower {flag}")
        drawn[rng.choice(candidates, count, replace=False)] = True
    return np.flatnonzero(drawn)
