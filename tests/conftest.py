"""Shared fixtures: a tiny image dataset in HashNet list format, generated on the fly."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

# Base colours of the tiny dataset's classes: distinct enough that a few iterations learn them.
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 220, 50)]


def write_tiny_dataset(data_dir, name="tiny", classes=3, sizes=(8, 3, 6), image_size=16, seed=0):
    """Write ``data_dir/name/{train,test,database}.txt`` and their PNGs; ``sizes`` are per class."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(data_dir, name)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for split, per_class in zip(("train", "test", "database"), sizes):
        lines = []
        for label in range(classes):
            for item in range(per_class):
                pixels = np.clip(np.array(CLASS_COLOURS[label]) + rng.normal(0, 25, (image_size, image_size, 3)),
                                 0, 255).astype(np.uint8)
                relative = f"images/{split}_{label}_{item}.png"
                Image.fromarray(pixels).save(os.path.join(folder, relative))
                lines.append(relative + " " + " ".join("1" if c == label else "0" for c in range(classes)))
        with open(os.path.join(folder, f"{split}.txt"), "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return folder


# --gpu_id values to run end-to-end tests on: the CPU always, the first GPU where there is one.
GPU_IDS = ["cpu", pytest.param("0", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs CUDA"))]


@pytest.fixture
def tiny_data(tmp_path):
    """A data folder holding the dataset 'tiny' (3 classes, 24 train, 9 query, 18 database images)."""
    data_dir = tmp_path / "data"
    write_tiny_dataset(str(data_dir))
    return data_dir


def tiny_train_flags(tmp_path, data_dir, *extra):
    """Flags of a fast CPU training run on 'tiny' that writes everything under tmp_path."""
    return ["--data_dir", str(data_dir), "--s_dataset", "tiny", "--image_network", "ResNetFc",
            "--backbone", "ResNet18", "--pretrained", "none", "--resize_size", "20", "--crop_size", "16",
            "--batch_size", "8", "--hash_bit", "16", "--num_iters", "20", "--workers", "0", "--gpu_id", "cpu",
            "--snap_path", f"{tmp_path}/snapshot/", "--log_dir", f"{tmp_path}/log",
            "--runs_dir", f"{tmp_path}/runs", "--test_output_dir", f"{tmp_path}/test_output",
            "--annotation", "t", "--radius", "2", *extra]
