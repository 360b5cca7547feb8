"""pre_process.py import: published lists (HashNet's shapes: foreign absolute and ./data/ paths,
80/81/21/100 labels, all-zero rows, queries inside the database) mapped onto local image trees."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import pre_process
from data_list import PRESETS

SPLITS = ("train", "test", "database")


def run(*argv):
    return pre_process.main([str(a) for a in argv])


def write_image(path, value):
    """A 4x4 image, PNG or JPEG by its suffix."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    kind = "PNG" if str(path).endswith(".png") else "JPEG"
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(path, format=kind)


def multi_hot(count, width, zero_rows, seed):
    """Random 0/1 rows with at least one 1, except ``zero_rows``, which are all zero."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((count, width)) < 0.1).astype(int)
    labels[np.arange(count), rng.integers(0, width, count)] = 1
    labels[list(zero_rows)] = 0
    return labels


# Each shape: image paths under the image root, the path each published line gives for them,
# their labels, and the published lists as indices into the images (in published order).

def coco_80():
    """HashNet's COCO: ./data/ and absolute paths; database = every image but the training ones."""
    images = ([f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(1, 7)]
              + [f"val2014/COCO_val2014_{i:012d}.jpg" for i in range(1, 5)])
    foreign = [f"./data/coco/{p}" if k % 2 else f"/home/caozhangjie/run-czj/dataset/coco/{p}"
               for k, p in enumerate(images)]
    splits = {"train": [0, 2, 4], "test": [1, 6], "database": [7, 1, 9, 3, 6, 5, 8]}
    return images, foreign, multi_hot(len(images), 80, (), 80), splits


def nuswide_81():
    """HashNet's NUS-WIDE-81: flat ./data/nuswide_81/images/ paths, all-zero rows, train in the database."""
    images = [f"images/{1000 + k}_{2000 + k}_{k:04x}abcd_m.jpg" for k in range(10)]
    foreign = [f"./data/nuswide_81/{p}" for p in images]
    splits = {"train": [2, 3, 4, 5], "test": [0, 1], "database": [9, 2, 8, 3, 7, 4, 6, 5]}
    return images, foreign, multi_hot(len(images), 81, (0, 3, 5), 81), splits


def nuswide_21():
    """HashNet's nus_wide lists: flat absolute paths, here onto images sorted into Flickr folders."""
    files = [f"{3000 + k}_{4000 + k}_{k:04x}ef01_m.jpg" for k in range(9)]
    images = [f"Flickr/concept{k % 3}/{name}" for k, name in enumerate(files)]
    foreign = [f"/home/caozhangjie/run-czj/dataset/nus_wide/{name}" for name in files]
    splits = {"train": [3, 4, 5], "test": [0, 1, 2], "database": [3, 4, 5, 6, 7, 8]}
    return images, foreign, multi_hot(len(images), 21, (4, 7), 21), splits


def imagenet_100():
    """HashNet's ImageNet-100: val queries from a flat val_image/ folder, train images as database."""
    wnids = ["n01440764", "n01443537"]
    train = [f"train/{w}/{w}_{j}.JPEG" for w in wnids for j in range(3)]
    val = [f"val/{w}/ILSVRC2012_val_{7 + 10 * k + j:08d}.JPEG" for k, w in enumerate(wnids) for j in range(2)]
    images = train + val
    foreign = ([f"/home/x/dataset/imagenet/{p}" for p in train]
               + [f"/home/caozhangjie/run-czj/dataset/imagenet/val_image/{os.path.basename(p)}" for p in val])
    labels = np.zeros((len(images), 100), dtype=int)
    labels[np.arange(len(images)), [0, 0, 0, 57, 57, 57, 0, 0, 57, 57]] = 1
    splits = {"train": [0, 3], "test": [6, 7, 8, 9], "database": [0, 1, 2, 3, 4, 5]}
    return images, foreign, labels, splits


SHAPES = {shape.__name__: shape for shape in (coco_80, nuswide_81, nuswide_21, imagenet_100)}
# (queries, training lines) in the database: COCO as published has every query in it and no
# training image; the others hold their training images and no query.
OVERLAPS = {"coco_80": (2, 0), "nuswide_81": (0, 4), "nuswide_21": (0, 3), "imagenet_100": (0, 2)}


def publish(tmp_path, shape, decoys=()):
    """Write the shape's image tree and published lists; (image root, list paths, expected lines)."""
    images, foreign, labels, splits = shape()
    root = tmp_path / "images"
    for k, path in enumerate(list(images) + list(decoys)):
        write_image(root / path, k)
    os.makedirs(tmp_path / "published")
    lists, expected = {}, {}
    for split, index in splits.items():
        tokens = [" ".join(str(v) for v in labels[i]) for i in index]
        lists[split] = str(tmp_path / "published" / f"{split}.txt")
        with open(lists[split], "w", newline="") as handle:  # CRLF, as lists made on Windows have
            handle.write("".join(f"{foreign[i]} {t}\r\n" for i, t in zip(index, tokens)))
        expected[split] = "".join(f"{images[i]} {t}\n" for i, t in zip(index, tokens))
    return str(root), lists, expected, labels, splits


def import_flags(name, lists, root, data_dir):
    return ["import", "--dataset", name, "--train_list", lists["train"], "--test_list", lists["test"],
            "--database_list", lists["database"], "--image_root", root, "--data_dir", data_dir]


def written(data_dir, name):
    return {split: open(os.path.join(data_dir, name, f"{split}.txt")).read() for split in SPLITS}


@pytest.mark.parametrize("name", SHAPES)
def test_import_maps_paths_keeps_labels_and_order(tmp_path, name, capsys):
    decoys = ["backup/COCO_train2014_000000000001.jpg"] if name == "coco_80" else []
    root, lists, expected, labels, splits = publish(tmp_path, SHAPES[name], decoys)
    data_dir = tmp_path / "data"
    assert run(*import_flags(name, lists, root, data_dir)) == 0
    assert written(data_dir, name) == expected  # the decoy shares only the file name: not chosen
    info = json.load(open(data_dir / name / "dataset.json"))
    assert info["name"] == name and info["num_labels"] == labels.shape[1]
    assert info["topk"] == PRESETS[name]["topk"] and info["similar_weight"] == PRESETS[name]["similar_weight"]
    assert info["data_root"] == os.path.abspath(root) and info["seed"] is None
    assert info["sizes"] == {split: len(splits[split]) for split in SPLITS}
    protocol = info["protocol"]
    assert protocol["type"] == "imported"
    for split in SPLITS:
        source = protocol["source_files"][split]
        assert source["path"] == os.path.abspath(lists[split])
        assert source["sha256"] == hashlib.sha256(open(lists[split], "rb").read()).hexdigest()
        rows = labels[splits[split]]
        assert protocol["counts"][split] == {"lines": len(rows), "all_zero_rows": int((~rows.any(1)).sum()),
                                             "positives_per_label": rows.sum(0).tolist()}
    assert (protocol["queries_in_database"], protocol["train_in_database"]) == OVERLAPS[name]
    assert run("validate", "--dataset", name, "--data_dir", data_dir, "--workers", 1) == 0
    assert "no defects found" in capsys.readouterr().out


def test_unknown_name_gets_default_presets(tmp_path):
    root, lists, _, _, _ = publish(tmp_path, nuswide_81)
    assert run(*import_flags("my_lists", lists, root, tmp_path / "data")) == 0
    info = json.load(open(tmp_path / "data" / "my_lists" / "dataset.json"))
    assert info["topk"] == -1 and info["similar_weight"] == 1.0


def nothing_written(data_dir):
    return not os.path.exists(data_dir) or not os.listdir(data_dir)


def test_missing_inputs_and_existing_folder_exit_2(tmp_path, capsys):
    root, lists, _, _, _ = publish(tmp_path, coco_80)
    data_dir = tmp_path / "data"
    flags = import_flags("coco_80", lists, root, data_dir)
    missing_list = [str(tmp_path / "nowhere.txt") if a == lists["test"] else a for a in flags]
    assert run(*missing_list) == 2
    assert f"error: --test_list {tmp_path / 'nowhere.txt'} does not exist" in capsys.readouterr().err
    missing_root = [str(tmp_path / "no_images") if a == root else a for a in flags]
    assert run(*missing_root) == 2
    assert f"error: --image_root {tmp_path / 'no_images'} is not a folder" in capsys.readouterr().err
    assert nothing_written(data_dir)
    os.makedirs(data_dir / "coco_80")
    (data_dir / "coco_80" / "mine.txt").write_text("keep me")
    assert run(*flags) == 2
    err = capsys.readouterr().err
    assert f"error: {data_dir / 'coco_80'} already exists; pass --overwrite" in err
    assert os.listdir(data_dir / "coco_80") == ["mine.txt"] and os.listdir(data_dir) == ["coco_80"]


def test_label_width_mismatch_names_both_files(tmp_path, capsys):
    root, lists, _, _, _ = publish(tmp_path, coco_80)
    lines = open(lists["database"]).read().splitlines()
    open(lists["database"], "w").write("".join(f"{line} 0\n" for line in lines))  # 81 labels on every line
    assert run(*import_flags("coco_80", lists, root, tmp_path / "data")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --database_list {lists['database']} has 81 labels a line, but --train_list "
                   f"{lists['train']} has 80; pass the three lists of one dataset")
    assert nothing_written(tmp_path / "data")


def test_unmappable_lines_reported_with_file_and_line(tmp_path, capsys):
    root, lists, _, _, _ = publish(tmp_path, nuswide_81)
    os.remove(os.path.join(root, "images", "1006_2006_0006abcd_m.jpg"))  # database line 7, no file now
    write_image(os.path.join(root, "copy", "images", "1009_2009_0009abcd_m.jpg"), 0)
    write_image(os.path.join(root, "other", "images", "1009_2009_0009abcd_m.jpg"), 0)
    os.remove(os.path.join(root, "images", "1009_2009_0009abcd_m.jpg"))  # database line 1: two copies
    data_dir = tmp_path / "data"
    assert run(*import_flags("nuswide_81", lists, root, data_dir)) == 1
    err = capsys.readouterr().err
    assert (f"{lists['database']}:7: ./data/nuswide_81/images/1006_2006_0006abcd_m.jpg maps to no file "
            f"under {root}") in err
    assert (f"{lists['database']}:1: ./data/nuswide_81/images/1009_2009_0009abcd_m.jpg maps to two or more "
            f"files under {root} equally well: copy/images/1009_2009_0009abcd_m.jpg, "
            "other/images/1009_2009_0009abcd_m.jpg") in err
    assert "error: 2 list line(s) do not map to exactly one file" in err and "nothing written" in err
    assert nothing_written(data_dir)


def test_many_unmappable_lines_print_the_first_20_and_a_count(tmp_path, capsys):
    root = tmp_path / "images"
    write_image(root / "a.png", 0)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"/far/away/missing{k}.png 1 0\n" for k in range(25)))
    assert run("import", "--dataset", "x", "--train_list", listed, "--test_list", listed, "--database_list",
               listed, "--image_root", root, "--data_dir", tmp_path / "data") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:20] == [f"{listed}:{k + 1}: /far/away/missing{k}.png maps to no file under {root}; put the "
                        "image there or pass the --image_root that holds it" for k in range(20)]
    assert err[20] == "... and 55 more" and err[21].startswith("error: 75 list line(s)")
    assert nothing_written(tmp_path / "data")


def test_overwrite_replaces_the_folder_whole(tmp_path):
    root, lists, expected, _, _ = publish(tmp_path, imagenet_100)
    data_dir = tmp_path / "data"
    os.makedirs(data_dir / "imagenet_100")
    (data_dir / "imagenet_100" / "stale.txt").write_text("old")
    (data_dir / "imagenet_100" / "train.txt").write_text("old list\n")
    assert run(*import_flags("imagenet_100", lists, root, data_dir), "--overwrite") == 0
    assert sorted(os.listdir(data_dir / "imagenet_100")) == ["database.txt", "dataset.json", "test.txt",
                                                             "train.txt"]
    assert written(data_dir, "imagenet_100") == expected
    assert os.listdir(data_dir) == ["imagenet_100"]  # no temporary folder left behind


def test_noise_unseen_and_validate_read_an_imported_dataset(tmp_path):
    root, lists, _, _, _ = publish(tmp_path, imagenet_100)
    data_dir = tmp_path / "data"
    assert run(*import_flags("imagenet_100", lists, root, data_dir)) == 0
    assert run("noise", "--dataset", "imagenet_100", "--rate", 0.5, "--data_dir", data_dir) == 0
    assert run("unseen", "--dataset", "imagenet_100", "--unseen_classes", 57, "--data_dir", data_dir) == 0
    for child in ("imagenet_100_noise0.5", "imagenet_100_unseen_c57"):
        assert run("validate", "--dataset", child, "--data_dir", data_dir, "--workers", 1) == 0
