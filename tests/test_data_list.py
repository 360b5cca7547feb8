"""List parsing, the dataset registry, the resumable batch order, and the networks."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data_list
import network


def write_list(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_list_parsing_resolves_paths_and_reads_labels(tmp_path):
    listing = write_list(tmp_path / "train.txt", ["a.png 1 0 1", "", "sub/b.png 0 0 0"])
    parsed = data_list.read_list_file(str(listing))
    assert parsed.paths == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")]
    np.testing.assert_array_equal(parsed.labels, [[1, 0, 1], [0, 0, 0]])
    assert parsed.tokens == ["a.png", "sub/b.png"] and parsed.line_numbers == [1, 3]
    assert parsed.origins == [f"{listing}:1", f"{listing}:3"]
    assert data_list.read_list_file(str(listing), data_root="/images").paths[0] == "/images/a.png"


def test_a_list_without_labels_reads_only_where_labels_are_optional(tmp_path):
    listing = write_list(tmp_path / "queries.txt", ["a.png", "", "b.png"])
    parsed = data_list.read_list_file(str(listing), labels_optional=True)
    assert parsed.labels is None and parsed.line_numbers == [1, 3]
    with pytest.raises(data_list.DataError, match="queries.txt:1: no labels after the image path"):
        data_list.read_list_file(str(listing))
    labelled = data_list.read_list_file(str(write_list(tmp_path / "l.txt", ["a.png 0 1"])), labels_optional=True)
    np.testing.assert_array_equal(labelled.labels, [[0, 1]])
    for lines, line in ((["a.png 1", "b.png"], 2), (["a.png", "b.png 1"], 2)):
        mixed = write_list(tmp_path / "mixed.txt", lines)
        with pytest.raises(data_list.DataError, match=f"mixed.txt:{line}: some lines have labels and some do not"):
            data_list.read_list_file(str(mixed), labels_optional=True)


def test_a_list_that_is_not_utf8_names_the_file(tmp_path):
    listing = tmp_path / "latin1.txt"
    listing.write_bytes("caf\u00e9.png 1\n".encode("latin-1"))
    with pytest.raises(data_list.DataError, match="latin1.txt: not UTF-8 text"):
        data_list.read_list_file(str(listing))


@pytest.mark.parametrize("lines, message", [
    (["a.png 1 0", "b.png 1"], "train.txt:2: 1 labels, but the list's first line has 2"),
    (["a.png 1 0", "b.png 1 -1"], "train.txt:2: label '-1' is not 0 or 1"),
    (["a.png"], "train.txt:1: no labels after the image path"),
    ([""], "the list is empty"),
])
def test_list_errors_name_file_and_line(tmp_path, lines, message):
    listing = write_list(tmp_path / "train.txt", lines)
    with pytest.raises(data_list.DataError, match=message):
        data_list.read_list_file(str(listing))


def test_registry_reads_presets_dataset_json_and_overrides(tmp_path):
    spec = data_list.resolve_dataset("coco_80", str(tmp_path))
    assert spec.topk == 5000 and spec.similar_weight == 1.0
    assert spec.lists["train"] == str(tmp_path / "coco_80" / "train.txt")
    with pytest.raises(data_list.DataError, match="python pre_process.py coco"):
        data_list.require_list(spec, "train")

    folder = tmp_path / "mine_noise0.3"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"topk": 7, "similar_weight": 2.5, "data_root": "../mine"}))
    spec = data_list.resolve_dataset("mine_noise0.3", str(tmp_path), test_list="/elsewhere/q.txt")
    assert (spec.topk, spec.similar_weight) == (7, 2.5)
    assert spec.data_root == str(tmp_path / "mine") and spec.lists["test"] == "/elsewhere/q.txt"

    with pytest.raises(data_list.DataError, match=r"unknown dataset 'nope'.*Known names: coco_80.*pre_process\.py"):
        data_list.resolve_dataset("nope", str(tmp_path))


def test_batch_order_resumes_mid_epoch():
    straight = iter(data_list.EpochBatchSampler(10, 3, seed=5))
    batches = [next(straight) for _ in range(7)]
    resumed = iter(data_list.EpochBatchSampler(10, 3, seed=5, start_iteration=4))
    assert [next(resumed) for _ in range(3)] == batches[4:]
    # Each epoch of 3 full batches covers 9 distinct items.
    assert len(set(sum(batches[:3], []))) == 9
    with pytest.raises(data_list.DataError, match="fewer than --batch_size 48"):
        data_list.EpochBatchSampler(10, 48, seed=0)


def test_evaluation_sampling_is_seeded():
    first = data_list.sample_items(100, 0.1, seed=3)
    assert len(first) == 10 and np.array_equal(first, data_list.sample_items(100, 0.1, seed=3))
    assert list(data_list.sample_items(5, 1.0, seed=0)) == [0, 1, 2, 3, 4]
    with pytest.raises(data_list.DataError, match="--test_sample_ratio"):
        data_list.sample_items(5, 0.0, seed=0)


@pytest.mark.parametrize("family, backbone, size", [
    ("AlexNetFc", None, 64), ("ResNetFc", "ResNet18", 32), ("VGGFc", "VGG11BN", 32)])
def test_networks_output_tanh_codes_and_two_learning_rate_groups(family, backbone, size):
    model = network.build_network(family, 12, backbone=backbone, pretrained="none").eval()
    codes = model(torch.randn(2, 3, size, size))
    assert codes.shape == (2, 12) and codes.abs().max() < 1
    groups = model.parameter_groups()
    assert [group["lr_mult"] for group in groups] == [1.0, 10.0]
    assert groups[1]["params"][0] is model.hash_layer.weight
    assert model.hash_layer.bias.abs().max() == 0 and 0.005 < model.hash_layer.weight.std() < 0.015


def test_hashnet_continuation_follows_the_release():
    assert network.continuation_scale(0) == 1.0 and network.continuation_scale(198) == 1.0
    assert network.continuation_scale(199) == pytest.approx(2 ** 0.5)  # the 200th forward pass
    assert network.continuation_scale(599) == pytest.approx(4 ** 0.5)


def test_pretrained_weights_from_a_file_or_a_clear_error(tmp_path, monkeypatch):
    weights = tmp_path / "resnet18.pth"
    reference = network.load_backbone(network.RESNETS["ResNet18"], "ResNet18", "none")
    torch.save(reference.state_dict(), weights)
    loaded = network.load_backbone(network.RESNETS["ResNet18"], "ResNet18", str(weights))
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
    with pytest.raises(network.PretrainedWeightsError, match="no such file"):
        network.load_backbone(network.RESNETS["ResNet18"], "ResNet18", str(tmp_path / "missing.pth"))
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(network.PretrainedWeightsError, match="not a ResNet18 state dict"):
        network.load_backbone(network.RESNETS["ResNet18"], "ResNet18", str(tmp_path / "wrong.pth"))
    # No network and an empty cache: the error says how to pass a local file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(network.PretrainedWeightsError, match="--pretrained /path/to/weights.pth"):
        network.load_backbone(network.RESNETS["ResNet18"], "ResNet18", "imagenet")


def _offline(*args, **kwargs):
    raise OSError("network unreachable")


def test_no_flip_keeps_left_and_right_where_they_are():
    # A composite of two images whose sides differ: a flip would swap them (pre_process.py pairs).
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :8] = 255
    image = Image.fromarray(pixels)
    torch.manual_seed(0)
    flipped = [data_list.train_transform(8, 8, crop_scale=1.0)(image)[0, 0, 0] < 0 for _ in range(40)]
    assert 0 < sum(flipped) < 40  # the default flips about half the time
    kept = [data_list.train_transform(8, 8, crop_scale=1.0, flip=False)(image)[0, 0, 0] > 0 for _ in range(40)]
    assert all(kept)
