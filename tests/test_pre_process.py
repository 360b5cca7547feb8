"""pre_process.py: builders on tiny fixtures in the real source formats (each split protocol),
the noise and unseen protocols, and validate's defect reports."""
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import dataset_flags
import dataset_sources
import dataset_splits
import pre_process
from data_list import read_list_file, resolve_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- fixtures in the source formats

def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion_root(root, gz=True, per_class=(4, 2)):
    """Fashion-MNIST IDX files: ``per_class`` images a class in train and in t10k."""
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    for part, count in zip(("train", "t10k"), per_class):
        labels = np.tile(np.arange(10), count)
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(root, f"{part}-images-idx3-ubyte{suffix}"),
                  rng.integers(0, 256, (len(labels), 28, 28)))
        write_idx(os.path.join(root, f"{part}-labels-idx1-ubyte{suffix}"), labels)
    return str(root)


def make_cifar_root(root):
    """Six CIFAR-10 python batches, 40 images: four a class."""
    rng = np.random.default_rng(2)
    os.makedirs(root)
    labels = np.tile(np.arange(10), 4)
    for i, batch in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        part = labels[i * 6:(i + 1) * 6] if i < 5 else labels[30:]
        content = {b"data": rng.integers(0, 256, (len(part), 3072), dtype=np.uint8),
                   b"labels": [int(x) for x in part]}
        with open(os.path.join(root, batch), "wb") as handle:
            pickle.dump(content, handle)
    return str(root)


def write_jpeg(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path, format="JPEG")


def make_coco_root(root):
    """COCO 2014 instances JSON with 80 non-contiguous category ids; 2 images have no annotation."""
    category_ids = [i for i in range(1, 91) if i % 9 != 0][:80]
    categories = [{"id": cid, "name": f"cat{cid}"} for cid in reversed(category_ids)]
    rng = np.random.default_rng(3)
    os.makedirs(os.path.join(root, "annotations"))
    annotation_id = 0
    for subset, count in (("train2014", 14), ("val2014", 8)):
        images, annotations = [], []
        for k in range(count):
            image_id = 1000 - k if subset == "train2014" else 5000 + k
            name = f"COCO_{subset}_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name})
            write_jpeg(os.path.join(root, subset, name))
            if k == 3:
                continue  # an image without any label
            for cid in rng.choice(category_ids, size=rng.integers(1, 4), replace=False):
                annotation_id += 1
                annotations.append({"id": annotation_id, "image_id": image_id, "category_id": int(cid)})
        with open(os.path.join(root, "annotations", f"instances_{subset}.json"), "w") as handle:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, handle)
    return str(root), sorted(category_ids)


def make_nuswide_root(root, count=300):
    """NUS-WIDE text files for 81 concepts; every third concept is frequent."""
    rng = np.random.default_rng(4)
    names = [f"concept{c:02d}" for c in range(81)]
    frequent = np.arange(81) % 3 == 1
    labels = rng.random((count, 81)) < np.where(frequent, 0.35, 0.08)
    labels[:5] = False  # images with no label at all
    for dirname in ("ImageList", "Groundtruth/AllLabels"):
        os.makedirs(os.path.join(root, dirname))
    lines = []
    for i in range(count):
        folder = names[i % 7]
        lines.append(f"C:\\ImageData\\Flickr\\{folder}\\{i:04d}_{1000 + i}.jpg")
        write_jpeg(os.path.join(root, "images", folder, f"{i:04d}_{1000 + i}.jpg"))
    with open(os.path.join(root, "ImageList", "Imagelist.txt"), "w") as handle:
        handle.write("\r\n".join(lines) + "\r\n")
    with open(os.path.join(root, "Concepts81.txt"), "w") as handle:
        handle.write("\n".join(names) + "\n")
    for c, name in enumerate(names):
        with open(os.path.join(root, "Groundtruth", "AllLabels", f"Labels_{name}.txt"), "w") as handle:
            handle.write("".join(f"{int(v)}\n" for v in labels[:, c]))
    return str(root), labels, names


def make_imagenet_root(root):
    """Four class folders (one not listed); 5 train and 2 val images each."""
    wnids = ["n01000003", "n01000001", "n01000002", "n09999999"]
    for column, wnid in enumerate(wnids):
        for part, count in (("train", 5), ("val", 2)):
            for k in range(count):
                write_jpeg(os.path.join(root, part, wnid, f"{wnid}_{k}.JPEG"), value=column * 40)
    classes = os.path.join(root, "classes.txt")
    with open(classes, "w") as handle:
        handle.write("n01000003 first class\nn01000001\n\nn01000002\n")
    return str(root), classes, wnids[:3]


def run(*argv):
    """Call pre_process.main in-process; its exit code."""
    return pre_process.main([str(a) for a in argv])


def read_lists(data_dir, name):
    """Resolve a built dataset and read its three lists: (spec, split -> (paths, labels))."""
    spec = resolve_dataset(name, data_dir=str(data_dir))
    listings = {split: read_list_file(path, spec.data_root) for split, path in spec.lists.items()}
    return spec, {split: (listing.paths, listing.labels) for split, listing in listings.items()}


def list_texts(data_dir, name):
    return {split: open(os.path.join(data_dir, name, f"{split}.txt")).read()
            for split in ("train", "test", "database")}


def assert_images_open(lists):
    for paths, _ in lists.values():
        for path in paths:
            with Image.open(path) as image:
                image.load()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A built fashion_mnist (1 query, 2 train a class) over a 60-image fixture."""
    base = tmp_path_factory.mktemp("fashion")
    root = make_fashion_root(str(base / "raw"))
    data_dir = base / "data"
    assert run("fashion_mnist", "--root", root, "--data_dir", data_dir, "--workers", 1,
               "--num_queries_per_class", 1, "--num_train_per_class", 2, "--no_download") == 0
    return root, data_dir


# ---------------------------------------------------------------- builders

def test_fashion_mnist_sizes_labels_and_images(fashion, capsys):
    root, data_dir = fashion
    spec, lists = read_lists(data_dir, "fashion_mnist")
    sizes = {split: len(paths) for split, (paths, _) in lists.items()}
    assert sizes == {"train": 20, "test": 10, "database": 50}
    for _, labels in lists.values():
        assert labels.shape[1] == 10 and (labels.sum(1) == 1).all()
    assert (lists["test"][1].sum(0) == 1).all() and (lists["train"][1].sum(0) == 2).all()
    assert set(lists["train"][0]) <= set(lists["database"][0])
    assert not set(lists["test"][0]) & set(lists["database"][0])
    assert len(os.listdir(os.path.join(data_dir, "fashion_mnist", "images"))) == 60
    assert_images_open(lists)
    with Image.open(lists["test"][0][0]) as image:
        assert image.size == (28, 28) and image.mode == "L"
    info = json.load(open(os.path.join(data_dir, "fashion_mnist", "dataset.json")))
    assert info["sizes"] == sizes and info["num_labels"] == 10 and info["topk"] == -1
    assert info["data_root"] is None and info["protocol"] is None and info["seed"] == 0
    assert info["label_names"][0] == "T-shirt/top" and info["source"]["command"].startswith("pre_process.py")
    assert spec.topk == -1 and spec.similar_weight == 1.0


def test_fashion_mnist_pixels_follow_the_pooled_index(fashion):
    root, data_dir = fashion
    images = dataset_sources.read_idx(os.path.join(root, "t10k-images-idx3-ubyte.gz"))
    png = np.asarray(Image.open(os.path.join(data_dir, "fashion_mnist", "images", "00041.png")))
    np.testing.assert_array_equal(png, images[1])  # train holds 40 images, so 41 is t10k's second


def test_fashion_mnist_seeded_and_rerun_keeps_pngs(fashion, tmp_path, capsys):
    root, data_dir = fashion
    png = os.path.join(data_dir, "fashion_mnist", "images", "00000.png")
    before = os.stat(png).st_mtime_ns
    first = list_texts(data_dir, "fashion_mnist")
    flags = ["--root", root, "--no_download", "--num_queries_per_class", 1, "--num_train_per_class", 2]
    assert run("fashion_mnist", "--data_dir", data_dir, "--workers", 2, *flags) == 0
    assert "0 written, 60 already there" in capsys.readouterr().out
    assert os.stat(png).st_mtime_ns == before
    assert list_texts(data_dir, "fashion_mnist") == first
    assert run("fashion_mnist", "--data_dir", tmp_path, "--seed", 1, "--workers", 1, *flags) == 0
    other = list_texts(tmp_path, "fashion_mnist")
    assert other["train"] != first["train"] and other["test"] != first["test"]
    assert not [name for name in os.listdir(os.path.join(data_dir, "fashion_mnist")) if name.endswith(".tmp")]


def test_fashion_mnist_reads_plain_idx_and_reports_bad_files(tmp_path, capsys):
    root = make_fashion_root(str(tmp_path / "plain"), gz=False)
    assert run("fashion_mnist", "--root", root, "--data_dir", tmp_path / "data", "--workers", 1,
               "--num_queries_per_class", 1, "--num_train_per_class", 1, "--no_download") == 0
    assert "train 10, test 10, database 50" in capsys.readouterr().out
    with open(os.path.join(root, "train-labels-idx1-ubyte"), "r+b") as handle:
        handle.write(b"\x00\x00\x0d\x01")  # float IDX: not ours
    assert run("fashion_mnist", "--root", root, "--data_dir", tmp_path / "data", "--no_download") == 2
    assert "train-labels-idx1-ubyte: not an unsigned-byte IDX file" in capsys.readouterr().err
    assert run("fashion_mnist", "--root", tmp_path / "nowhere", "--no_download") == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_too_few_images_a_class_names_the_flags(fashion, tmp_path, capsys):
    root, _ = fashion
    assert run("fashion_mnist", "--root", root, "--data_dir", tmp_path, "--no_download", "--workers", 1,
               "--num_queries_per_class", 5, "--num_train_per_class", 2) == 2
    assert "--num_queries_per_class + --num_train_per_class = 7" in capsys.readouterr().err


def test_cifar10_disjoint_splits(tmp_path):
    root = make_cifar_root(tmp_path / "cifar-10-batches-py")
    data_dir = tmp_path / "data"
    flags = ["--root", root, "--num_queries_per_class", 1, "--num_train_per_class", 2, "--workers", 1]
    assert run("cifar10", "--data_dir", data_dir, *flags) == 0
    _, lists = read_lists(data_dir, "cifar10")
    assert {s: len(p) for s, (p, _) in lists.items()} == {"train": 20, "test": 10, "database": 10}
    assert all((labels.sum(1) == 1).all() and labels.shape[1] == 10 for _, labels in lists.values())
    names = [set(paths) for paths, _ in lists.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert_images_open(lists)
    with Image.open(lists["train"][0][0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    first = list_texts(data_dir, "cifar10")
    assert run("cifar10", "--data_dir", tmp_path / "again", *flags) == 0
    assert list_texts(tmp_path / "again", "cifar10") == first
    assert run("cifar10", "--data_dir", tmp_path / "other", "--seed", 3, *flags) == 0
    assert list_texts(tmp_path / "other", "cifar10")["train"] != first["train"]
    assert json.load(open(os.path.join(data_dir, "cifar10", "dataset.json")))["protocol"] == {"type": "disjoint"}


@pytest.mark.parametrize("protocol, per_class, sizes", [
    ("train_in_database", (1, 2), {"train": 20, "test": 10, "database": 30}),  # DeepHash-pytorch's cifar10-1
    ("train_is_database", (1, 3), {"train": 30, "test": 10, "database": 30}),  # its cifar10-2
])
def test_cifar10_protocols_with_training_images_in_the_database(tmp_path, protocol, per_class, sizes):
    root = make_cifar_root(tmp_path / "cifar-10-batches-py")
    assert run("cifar10", "--root", root, "--data_dir", tmp_path, "--workers", 1, "--protocol", protocol,
               "--num_queries_per_class", per_class[0], "--num_train_per_class", per_class[1]) == 0
    _, lists = read_lists(tmp_path, "cifar10")
    assert {s: len(p) for s, (p, _) in lists.items()} == sizes
    train, test, database = (set(lists[split][0]) for split in ("train", "test", "database"))
    assert not test & database and not test & train
    assert train <= database if protocol == "train_in_database" else train == database
    assert len(train | test | database) == 40  # every image of the fixture is used
    assert json.load(open(os.path.join(tmp_path, "cifar10", "dataset.json")))["protocol"] == {"type": protocol}


@pytest.mark.parametrize("protocol, sizes", [("disjoint", [100, 500]), ("train_in_database", [100, 500]),
                                             ("train_is_database", [1000, 5000])])
def test_cifar10_protocol_default_sizes(protocol, sizes):
    args = pre_process.parse_args(["cifar10", "--root", "r", "--protocol", protocol])
    assert dataset_flags.protocol_sizes(args, dataset_splits.CIFAR10_SIZES) == sizes  # 1,000 / 5,000 or 10,000 / 50,000


@pytest.mark.parametrize("protocol", ["hashnet", "disjoint"])
def test_coco_pools_drops_unlabelled_and_maps_ids(tmp_path, protocol):
    root, category_ids = make_coco_root(str(tmp_path / "coco"))
    data_dir = tmp_path / "data"
    flags = ["--root", root, "--num_queries", 3, "--num_train", 4, "--protocol", protocol]
    assert run("coco", "--data_dir", data_dir, *flags) == 0
    spec, lists = read_lists(data_dir, "coco_80")
    train, test, database = (set(lists[split][0]) for split in ("train", "test", "database"))
    assert not train & test
    if protocol == "hashnet":  # as HashNet's lists: every image but the training ones
        assert len(database) == 20 - 4 and test <= database and not train & database
    else:  # every image but the queries
        assert len(database) == 20 - 3 and train <= database and not test & database
    assert (len(train), len(test)) == (4, 3)
    assert spec.data_root == os.path.abspath(root) and spec.topk == 5000
    assert all(labels.shape[1] == 80 and labels.any(1).all() for _, labels in lists.values())
    assert_images_open(lists)
    info = json.load(open(os.path.join(data_dir, "coco_80", "dataset.json")))
    assert info["label_names"] == [f"cat{cid}" for cid in category_ids]
    assert info["protocol"] == {"type": protocol}
    # the label columns of one image match its annotations, in sorted id order
    annotations = json.load(open(os.path.join(root, "annotations", "instances_val2014.json")))
    path, row = next((p, r) for p, r in zip(*lists["database"]) if "val2014" in p)
    image_id = int(os.path.basename(path)[-16:-4])
    expected = {category_ids.index(a["category_id"]) for a in annotations["annotations"]
                if a["image_id"] == image_id}
    assert set(np.flatnonzero(row)) == expected
    first = list_texts(data_dir, "coco_80")
    assert run("coco", "--data_dir", tmp_path / "again", *flags) == 0
    assert list_texts(tmp_path / "again", "coco_80") == first
    assert run("coco", "--data_dir", tmp_path / "other", "--seed", 5, *flags) == 0
    assert list_texts(tmp_path / "other", "coco_80") != first


def test_coco_protocols_draw_the_same_queries_and_train(tmp_path, capsys):
    root, _ = make_coco_root(str(tmp_path / "coco"))
    texts = {}
    for protocol in ("hashnet", "disjoint"):
        assert run("coco", "--root", root, "--num_queries", 3, "--num_train", 4, "--protocol", protocol,
                   "--data_dir", tmp_path / protocol) == 0
        texts[protocol] = list_texts(tmp_path / protocol, "coco_80")
    assert texts["hashnet"]["test"] == texts["disjoint"]["test"]
    assert texts["hashnet"]["train"] == texts["disjoint"]["train"]
    assert run("coco", "--root", root, "--num_queries", 15, "--num_train", 6, "--data_dir", tmp_path) == 2
    assert "--num_queries 15 + --num_train 6 exceed the 20 labelled COCO images" in capsys.readouterr().err


@pytest.mark.parametrize("concepts", [21, 81])
def test_nuswide_dhn_per_concept_sampling(tmp_path, concepts):
    root, labels, names = make_nuswide_root(str(tmp_path / "nuswide"))
    data_dir = tmp_path / "data"
    protocol = [] if concepts == 21 else ["--protocol", "dhn"]  # dhn is the default for 21 concepts
    flags = ["--root", root, "--concepts", concepts, "--num_queries_per_class", 1, "--num_train_per_class", 1,
             *protocol]
    assert run("nuswide", "--data_dir", data_dir, *flags) == 0
    name = f"nuswide_{concepts}"
    spec, lists = read_lists(data_dir, name)
    columns = (np.arange(81) if concepts == 81
               else np.sort(np.argsort(-labels.sum(0), kind="stable")[:21]))
    kept = int(labels[:, columns].any(1).sum())
    sizes = {s: len(p) for s, (p, _) in lists.items()}
    assert sizes == {"train": concepts, "test": concepts, "database": kept - concepts}
    assert all(labels.shape[1] == concepts and labels.any(1).all() for _, labels in lists.values())
    for split in ("train", "test"):
        assert (lists[split][1].sum(0) >= 1).all()  # every concept drawn at least once
    assert set(lists["train"][0]) <= set(lists["database"][0])
    assert not set(lists["test"][0]) & set(lists["database"][0])
    assert spec.topk == 5000 and spec.similar_weight == 5.0
    info = json.load(open(os.path.join(data_dir, name, "dataset.json")))
    assert info["label_names"] == [names[c] for c in columns]
    assert info["protocol"] == {"type": "dhn", "listed_images": 300, "missing_images": 0}
    assert lists["test"][0][0].startswith(os.path.join(os.path.abspath(root), "images", "concept0"))
    assert_images_open(lists)
    # a listed image carries exactly its concepts from the label files
    index = int(os.path.basename(lists["test"][0][0])[:4])
    np.testing.assert_array_equal(lists["test"][1][0], labels[index, columns])
    first = list_texts(data_dir, name)
    assert run("nuswide", "--data_dir", tmp_path / "other", "--seed", 9, *flags) == 0
    assert list_texts(tmp_path / "other", name) != first


@pytest.mark.parametrize("concepts", [21, 81])
def test_nuswide_hashnet_random_draw_keeps_unlabelled_images(tmp_path, concepts):
    root, labels, _ = make_nuswide_root(str(tmp_path / "nuswide"))
    data_dir = tmp_path / "data"
    assert run("nuswide", "--root", root, "--concepts", concepts, "--num_queries", 20, "--num_train", 40,
               "--data_dir", data_dir, "--protocol", "hashnet") == 0
    name = f"nuswide_{concepts}"
    _, lists = read_lists(data_dir, name)
    train, test, database = (set(lists[split][0]) for split in ("train", "test", "database"))
    assert (len(train), len(test), len(database)) == (40, 20, 300 - 20)
    assert train <= database and not test & database  # as HashNet's NUS-WIDE-81 lists
    columns = (np.arange(81) if concepts == 81
               else np.sort(np.argsort(-labels.sum(0), kind="stable")[:21]))
    unlabelled = int((~labels[:, columns].any(1)).sum())
    assert unlabelled >= 5  # the fixture's first five images have no concept at all
    zero_rows = sum(int((lists[split][1].sum(1) == 0).sum()) for split in ("test", "database"))
    assert zero_rows == unlabelled  # every image is a query or in the database, none dropped
    info = json.load(open(os.path.join(data_dir, name, "dataset.json")))
    assert info["protocol"] == {"type": "hashnet", "listed_images": 300, "missing_images": 0}


def test_nuswide_81_default_draws_queries_from_labelled_images_only(tmp_path, capsys):
    root, labels, _ = make_nuswide_root(str(tmp_path / "nuswide"))
    unlabelled = int((~labels.any(1)).sum())
    assert unlabelled == 5  # the fixture's first five images
    # 200 of 300 queries: a draw from every image would take an unlabelled one with probability 0.996
    assert run("nuswide", "--root", root, "--concepts", 81, "--num_queries", 200, "--num_train", 90,
               "--data_dir", tmp_path) == 0
    assert "protocol labelled_queries: queries drawn from the labelled images only" in capsys.readouterr().out
    _, lists = read_lists(tmp_path, "nuswide_81")
    assert {s: len(p) for s, (p, _) in lists.items()} == {"train": 90, "test": 200, "database": 100}
    assert lists["test"][1].any(1).all()
    assert int((lists["database"][1].sum(1) == 0).sum()) == 5  # the unlabelled images stay in the database
    train, test, database = (set(lists[split][0]) for split in ("train", "test", "database"))
    assert train <= database and not test & database
    info = json.load(open(os.path.join(tmp_path, "nuswide_81", "dataset.json")))
    assert info["protocol"]["type"] == "labelled_queries"
    assert run("nuswide", "--root", root, "--concepts", 81, "--num_queries", 296, "--num_train", 0,
               "--data_dir", tmp_path / "more") == 2
    assert "--num_queries 296 exceeds the 295 labelled NUS-WIDE images under" in capsys.readouterr().err


def test_nuswide_leaves_out_and_counts_listed_images_missing_on_disk(tmp_path, capsys):
    root, _, _ = make_nuswide_root(str(tmp_path / "nuswide"), count=40)
    gone = [os.path.join(root, "images", f"concept0{i % 7}", f"{i:04d}_{1000 + i}.jpg") for i in (6, 13, 20)]
    for path in gone:
        os.remove(path)
    assert run("nuswide", "--root", root, "--concepts", 81, "--num_queries", 5, "--num_train", 10,
               "--data_dir", tmp_path) == 0
    assert "3 of the 40 images listed in" in capsys.readouterr().out
    _, lists = read_lists(tmp_path, "nuswide_81")
    assert len(lists["test"][0]) + len(lists["database"][0]) == 37
    assert not set(gone) & {path for paths, _ in lists.values() for path in paths}
    info = json.load(open(os.path.join(tmp_path, "nuswide_81", "dataset.json")))
    assert (info["protocol"]["listed_images"], info["protocol"]["missing_images"]) == (40, 3)


def test_nuswide_refuses_the_size_flags_of_the_other_protocol(tmp_path, capsys):
    root, _, _ = make_nuswide_root(str(tmp_path / "nuswide"), count=20)
    flags = ["--root", root, "--data_dir", tmp_path / "d"]
    assert run("nuswide", "--concepts", 81, "--num_queries_per_class", 1, *flags) == 2
    assert ("--num_queries_per_class sets a size of --protocol dhn, not of --protocol labelled_queries"
            in capsys.readouterr().err)
    assert run("nuswide", "--concepts", 21, "--num_train", 5, *flags) == 2
    assert ("--num_train sets a size of --protocol labelled_queries or hashnet, not of --protocol dhn"
            in capsys.readouterr().err)
    assert run("nuswide", "--concepts", 81, *flags) == 2
    assert "--num_queries 5000 + --num_train 10000 exceed the 20 NUS-WIDE images" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")


def test_nuswide_bad_label_file_names_file_and_line(tmp_path, capsys):
    root, _, names = make_nuswide_root(str(tmp_path / "nuswide"), count=20)
    path = os.path.join(root, "Groundtruth", "AllLabels", f"Labels_{names[2]}.txt")
    values = open(path).read().splitlines()
    values[6] = "7"
    open(path, "w").write("\n".join(values) + "\n")
    assert run("nuswide", "--root", root, "--concepts", 81, "--data_dir", tmp_path / "d") == 2
    assert f"Labels_{names[2]}.txt:7: '7' is not 0 or 1" in capsys.readouterr().err


def test_imagenet100_val_queries_train_database(tmp_path):
    root, classes, wnids = make_imagenet_root(str(tmp_path / "imagenet"))
    data_dir = tmp_path / "data"
    assert run("imagenet100", "--root", root, "--classes", classes, "--train_per_class", 2,
               "--data_dir", data_dir) == 0
    spec, lists = read_lists(data_dir, "imagenet_100")
    assert {s: len(p) for s, (p, _) in lists.items()} == {"train": 6, "test": 6, "database": 15}
    assert all(labels.shape[1] == 3 and (labels.sum(1) == 1).all() for _, labels in lists.values())
    assert set(lists["train"][0]) <= set(lists["database"][0]) and spec.topk == 1000
    for paths, labels in lists.values():
        for path, row in zip(paths, labels):
            assert os.path.basename(os.path.dirname(path)) == wnids[row.argmax()]
    assert all("/val/" in p for p in lists["test"][0])
    assert_images_open(lists)
    first = list_texts(data_dir, "imagenet_100")
    assert run("imagenet100", "--root", root, "--classes", classes, "--train_per_class", 2,
               "--data_dir", tmp_path / "other", "--seed", 4) == 0
    assert list_texts(tmp_path / "other", "imagenet_100")["train"] != first["train"]


# ---------------------------------------------------------------- protocols

def test_noise_relabels_exactly_round_rate_n(fashion):
    _, data_dir = fashion
    assert run("noise", "--dataset", "fashion_mnist", "--rate", 0.3, "--seed", 7, "--data_dir", data_dir) == 0
    _, parent = read_lists(data_dir, "fashion_mnist")
    spec, noisy = read_lists(data_dir, "fashion_mnist_noise0.3")
    assert noisy["train"][0] == parent["train"][0]  # same images, same order, paths resolve
    changed = np.flatnonzero((noisy["train"][1] != parent["train"][1]).any(1))
    assert len(changed) == round(0.3 * 20)
    assert (noisy["train"][1].sum(1) == 1).all()
    for split in ("test", "database"):
        assert noisy[split][0] == parent[split][0]
        np.testing.assert_array_equal(noisy[split][1], parent[split][1])
    texts, parent_texts = list_texts(data_dir, "fashion_mnist_noise0.3"), list_texts(data_dir, "fashion_mnist")
    assert texts["test"] == parent_texts["test"] and texts["database"] == parent_texts["database"]
    info = json.load(open(os.path.join(data_dir, "fashion_mnist_noise0.3", "dataset.json")))
    assert info["data_root"] == os.path.join("..", "fashion_mnist")
    assert info["protocol"] == {"type": "noise", "parent": "fashion_mnist", "rate": 0.3,
                                "relabelled_lines": (changed + 1).tolist(), "seed": 7}
    assert spec.topk == -1
    assert_images_open(noisy)
    resolved = resolve_dataset("fashion_mnist_noise0.3", data_dir=str(data_dir))
    read_list_file(resolved.lists["train"], resolved.data_root)


def test_noise_multilabel_takes_another_images_labels_and_is_seeded(tmp_path):
    root, _ = make_coco_root(str(tmp_path / "coco"))
    data_dir = tmp_path / "data"
    assert run("coco", "--root", root, "--data_dir", data_dir, "--num_queries", 3, "--num_train", 12) == 0
    texts = []
    for seed in (0, 0, 1):
        assert run("noise", "--dataset", "coco_80", "--rate", 0.5, "--seed", seed, "--data_dir", data_dir) == 0
        texts.append(list_texts(data_dir, "coco_80_noise0.5")["train"])
    assert texts[0] == texts[1] and texts[0] != texts[2]
    _, parent = read_lists(data_dir, "coco_80")
    spec, noisy = read_lists(data_dir, "coco_80_noise0.5")
    old, new = parent["train"][1], noisy["train"][1]
    changed = np.flatnonzero((old != new).any(1))
    assert len(changed) == 6
    parent_rows = {tuple(row) for row in old}
    assert all(tuple(new[i]) in parent_rows for i in changed)
    assert spec.data_root == os.path.abspath(root)  # the parent's absolute data_root is kept
    assert_images_open(noisy)


def test_noise_of_a_noise_dataset_still_resolves(fashion):
    _, data_dir = fashion
    assert run("noise", "--dataset", "fashion_mnist", "--rate", 0.3, "--data_dir", data_dir) == 0
    assert run("noise", "--dataset", "fashion_mnist_noise0.3", "--rate", 0.1, "--data_dir", data_dir) == 0
    _, lists = read_lists(data_dir, "fashion_mnist_noise0.3_noise0.1")
    assert_images_open(lists)


def test_unseen_single_label_split(fashion):
    _, data_dir = fashion
    assert run("unseen", "--dataset", "fashion_mnist", "--unseen_ratio", 0.3, "--seed", 2,
               "--data_dir", data_dir) == 0
    info = json.load(open(os.path.join(data_dir, "fashion_mnist_unseen0.3", "dataset.json")))
    protocol = info["protocol"]
    unseen, seen = protocol["unseen_classes"], protocol["seen_classes"]
    assert len(unseen) == 3 and sorted(seen + unseen) == list(range(10))
    assert protocol["type"] == "unseen" and protocol["parent"] == "fashion_mnist" and protocol["seed"] == 2
    _, parent = read_lists(data_dir, "fashion_mnist")
    _, lists = read_lists(data_dir, "fashion_mnist_unseen0.3")
    assert lists["train"][1].shape[1] == 7 and lists["test"][1].shape[1] == 3
    assert lists["train"][1].any(1).all() and lists["test"][1].any(1).all() and lists["database"][1].any(1).all()
    # every train image has a seen class in the parent; every query/database image an unseen one
    parent_class = {p: int(row.argmax()) for s in parent.values() for p, row in zip(*s)}
    assert all(parent_class[p] in seen for p in lists["train"][0])
    assert all(parent_class[p] in unseen for s in ("test", "database") for p in lists[s][0])
    assert len(lists["train"][0]) == 14 and len(lists["test"][0]) == 3 and len(lists["database"][0]) == 15
    assert info["label_names"] == [dataset_sources.FASHION_MNIST_CLASSES[c] for c in unseen]
    assert_images_open(lists)
    first = list_texts(data_dir, "fashion_mnist_unseen0.3")
    assert run("unseen", "--dataset", "fashion_mnist", "--unseen_ratio", 0.3, "--seed", 2,
               "--data_dir", data_dir) == 0
    assert list_texts(data_dir, "fashion_mnist_unseen0.3") == first
    # a clean unseen split validates despite the different label widths
    assert run("validate", "--dataset", "fashion_mnist_unseen0.3", "--data_dir", data_dir, "--workers", 1) == 0


def test_unseen_multilabel_explicit_classes(tmp_path):
    root, labels, _ = make_nuswide_root(str(tmp_path / "nuswide"))
    data_dir = tmp_path / "data"
    assert run("nuswide", "--root", root, "--concepts", 21, "--data_dir", data_dir,
               "--num_queries_per_class", 1, "--num_train_per_class", 1) == 0
    assert run("unseen", "--dataset", "nuswide_21", "--unseen_classes", "5,0,11",
               "--data_dir", data_dir) == 0
    _, parent = read_lists(data_dir, "nuswide_21")
    spec, lists = read_lists(data_dir, "nuswide_21_unseen_c0-5-11")
    unseen = [0, 5, 11]
    seen = [c for c in range(21) if c not in unseen]
    rows = {p: row for s in parent.values() for p, row in zip(*s)}
    for path, row in zip(*lists["train"]):
        assert not rows[path][unseen].any()
        np.testing.assert_array_equal(row, rows[path][seen])
    for split in ("test", "database"):
        for path, row in zip(*lists[split]):
            np.testing.assert_array_equal(row, rows[path][unseen])
            assert row.any()
    both = [p for p, row in zip(*parent["database"]) if row[unseen].any() and row[seen].any()]
    assert both and set(both) <= set(lists["database"][0])  # mixed images stay, with unseen columns
    expected_train = [p for p, row in zip(*parent["train"]) if not row[unseen].any()]
    assert lists["train"][0] == expected_train
    assert spec.topk == 5000 and spec.similar_weight == 5.0


def test_unseen_bad_flags(fashion, capsys):
    _, data_dir = fashion
    assert run("unseen", "--dataset", "fashion_mnist", "--unseen_classes", "3,12", "--data_dir", data_dir) == 2
    assert "--unseen_classes" in capsys.readouterr().err
    assert run("unseen", "--dataset", "fashion_mnist", "--unseen_ratio", 0.01, "--data_dir", data_dir) == 2
    assert "--unseen_ratio 0.01 makes 0 of 10" in capsys.readouterr().err
    assert run("unseen", "--dataset", "nothing_here", "--data_dir", data_dir) == 2
    assert "unknown dataset 'nothing_here'" in capsys.readouterr().err


# ---------------------------------------------------------------- validate

def write_list(path, lines):
    with open(path, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture
def images(tmp_path):
    """Three good PNGs and a corrupt one in tmp_path/img."""
    folder = tmp_path / "img"
    folder.mkdir()
    for k in range(3):
        Image.new("L", (4, 4), k).save(folder / f"{k}.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    return folder


def test_validate_clean_dataset(fashion, capsys):
    _, data_dir = fashion
    assert run("validate", "--dataset", "fashion_mnist", "--data_dir", data_dir, "--workers", 2) == 0
    out = capsys.readouterr().out
    assert "train (" in out and "20 images, 10 labels, 0 all-zero label rows" in out
    assert "positives per label: 0:2 1:2" in out
    assert "overlap train & database: 20 images" in out and "overlap test & database: 0 images" in out
    assert "no defects found" in out


@pytest.mark.parametrize("lines, line, problem", [
    (["img/0.png 1 0", "img/1.png 0 2"], 2, "label '2' is not 0 or 1"),
    (["img/0.png 1 0", "", "img/1.png 0 1 1"], 3, "3 labels, but the list's first line has 2"),
    (["img/0.png 1 0", "img/missing.png 0 1"], 2, "img/missing.png is missing"),
    (["img/0.png 1 0", "img/1.png 0 1", "img/bad.png 1 1"], 3, "cannot be decoded by PIL"),
])
def test_validate_reports_each_defect_with_file_and_line(images, tmp_path, capsys, lines, line, problem):
    path = write_list(tmp_path / "list.txt", lines)
    assert run("validate", "--list", path, "--workers", 1) == 1
    out = capsys.readouterr().out
    assert any(row.startswith(f"{path}:{line}: ") and problem in row for row in out.splitlines()), out
    assert "1 defect(s) found" in out


def test_validate_width_mismatch_and_empty_list(images, tmp_path, capsys):
    folder = tmp_path / "data" / "mine"
    folder.mkdir(parents=True)
    for k in range(3):
        os.link(images / f"{k}.png", folder / f"{k}.png")
    write_list(folder / "train.txt", ["0.png 1 0", "1.png 0 1"])
    write_list(folder / "test.txt", ["", "2.png 1 0 0"])
    write_list(folder / "database.txt", [])
    assert run("validate", "--dataset", "mine", "--data_dir", tmp_path / "data", "--workers", 1) == 1
    out = capsys.readouterr().out
    test_list, database_list = (os.path.join(str(folder), f"{s}.txt") for s in ("test", "database"))
    assert f"{test_list}:2: 3 labels a line, but {os.path.join(str(folder), 'train.txt')} has 2" in out
    assert f"{database_list}: the list is empty" in out
    assert "2 defect(s) found" in out


def test_validate_cli_exit_codes_without_traceback(images, tmp_path):
    script = os.path.join(REPO, "pre_process.py")

    def cli(*argv):
        return subprocess.run([sys.executable, script, *map(str, argv)], capture_output=True, text=True,
                              cwd=str(tmp_path))

    path = write_list(tmp_path / "list.txt", ["img/0.png 1", "img/bad.png 1", "img/gone.png 0"])
    defects = cli("validate", "--list", path, "--workers", 1)
    assert defects.returncode == 1, defects.stderr
    assert f"{path}:2: image" in defects.stdout and f"{path}:3: image" in defects.stdout
    unusable = cli("validate", "--dataset", "no_such_dataset", "--data_dir", tmp_path)
    assert unusable.returncode == 2 and "unknown dataset 'no_such_dataset'" in unusable.stderr
    assert "Traceback" not in defects.stderr + unusable.stderr


def test_unusable_input_exits_2(fashion, tmp_path, capsys):
    _, data_dir = fashion
    assert run("validate", "--dataset", "coco_80", "--data_dir", data_dir) == 2
    assert "pre_process.py coco --root" in capsys.readouterr().err
    assert run("cifar10", "--root", tmp_path / "nowhere", "--data_dir", tmp_path / "d") == 2
    assert "data_batch_1 is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run("noise", "--dataset", "fashion_mnist", "--rate", 1.5)
    assert exit_.value.code == 2 and "--rate: 1.5 is not a fraction" in capsys.readouterr().err


# ---------------------------------------------------------------- pairs (extreme imbalance, multi-label)

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Both pairs variants over a 1,300-image fixture: 1 query, 2 train, 3 database composites a class pair."""
    base = tmp_path_factory.mktemp("pairs")
    root = make_fashion_root(str(base / "raw"), per_class=(100, 30))
    data_dir = base / "data"
    sizes = ("--num_queries_per_pair", 1, "--num_train_per_pair", 2, "--num_database_per_pair", 3)
    for variant in ((), ("--multilabel",)):
        assert run("pairs", "--dataset", "fashion_mnist", "--root", root, "--data_dir", data_dir, "--workers", 1,
                   "--no_download", *sizes, *variant) == 0
    return root, data_dir


def test_pairs_composites_are_two_images_labelled_by_their_ordered_class_pair(pairs):
    root, data_dir = pairs
    spec, lists = read_lists(data_dir, "fashion_mnist_pairs")
    pixels, classes = dataset_sources.read_fashion_mnist(root, download=False)
    sources = {}
    for split, per_pair in (("test", 1), ("train", 2), ("database", 3)):
        paths, labels = lists[split]
        assert labels.shape == (100 * per_pair, 100) and (labels.sum(1) == 1).all()
        assert (labels.sum(0) == per_pair).all()  # every ordered class pair equally often
        halves = np.array([[int(i) for i in os.path.basename(p)[:-4].split("_")] for p in paths])
        assert (labels.argmax(1) == classes[halves[:, 0]] * 10 + classes[halves[:, 1]]).all()
        sources[split] = set(halves.ravel())
        assert len(sources[split]) == 2 * len(paths)  # no source image twice
        with Image.open(paths[0]) as image:
            assert image.size == (56, 28)
            assert (np.asarray(image) == np.hstack([pixels[halves[0, 0]], pixels[halves[0, 1]]])).all()
    assert not (sources["test"] & sources["train"] or sources["test"] & sources["database"]
                or sources["train"] & sources["database"])
    record = json.load(open(os.path.join(data_dir, "fashion_mnist_pairs", "dataset.json")))
    assert record["protocol"]["type"] == "pairs" and record["protocol"]["similar_pair_fraction"]["train"] == 0.01
    assert record["label_names"][12] == "Trouser | Pullover" and record["topk"] == 1000
    assert run("validate", "--dataset", "fashion_mnist_pairs", "--data_dir", data_dir, "--workers", 1) == 0


def test_pairs_multilabel_are_the_same_composites_labelled_with_both_classes(pairs):
    _, data_dir = pairs
    _, single = read_lists(data_dir, "fashion_mnist_pairs")
    _, multi = read_lists(data_dir, "fashion_mnist_pairs_ml")
    for split in ("train", "test", "database"):
        assert [os.path.basename(p) for p in multi[split][0]] == [os.path.basename(p) for p in single[split][0]]
        pair_class = single[split][1].argmax(1)
        expected = np.zeros((len(pair_class), 10), dtype=int)
        expected[np.arange(len(pair_class)), pair_class // 10] = 1
        expected[np.arange(len(pair_class)), pair_class % 10] = 1
        assert (multi[split][1] == expected).all()
    record = json.load(open(os.path.join(data_dir, "fashion_mnist_pairs_ml", "dataset.json")))
    labels = multi["train"][1].astype(int)
    assert record["protocol"]["similar_pair_fraction"]["train"] == pytest.approx(((labels @ labels.T) > 0).mean())
    assert run("validate", "--dataset", "fashion_mnist_pairs_ml", "--data_dir", data_dir, "--workers", 1) == 0


def test_pairs_with_too_few_images_a_class_names_the_flags(pairs, tmp_path, capsys):
    root, _ = pairs
    assert run("pairs", "--dataset", "fashion_mnist", "--root", root, "--data_dir", tmp_path, "--no_download",
               "--num_database_per_pair", 10) == 2
    err = capsys.readouterr().err
    assert "need 2400 images of every class" in err and "has only 130" in err and "--num_*_per_pair" in err
    assert not os.path.exists(tmp_path / "fashion_mnist_pairs")
