"""Any list trains and tests: datasets with no folder or preset, queries inside the database,
saved codes scored with the dataset's R, and which ImageNet weights --pretrained names."""
import json
import shutil

import numpy as np
import pytest
import torch
import torchvision

import data_list
import evaluation
import network
import test_mmhh
import train_mmhh
from conftest import tiny_train_flags


def own_lists(tmp_path, tiny_data):
    """The tiny dataset's lists moved out of data/: a name that has no folder, no preset, no dataset.json."""
    lists = tmp_path / "lists"
    shutil.copytree(tiny_data / "tiny", lists)
    shutil.rmtree(tiny_data / "tiny")
    return {split: str(lists / f"{split}.txt") for split in ("train", "test", "database")}, lists


def test_a_name_without_folder_trains_and_tests_on_the_lists_given(tmp_path, tiny_data, capsys):
    lists, root = own_lists(tmp_path, tiny_data)
    flags = tiny_train_flags(tmp_path, tiny_data, "--train_list", lists["train"], "--test_list", lists["test"],
                             "--database_list", lists["database"], "--data_root", str(root))
    flags[flags.index("tiny")] = "mydata"
    assert train_mmhh.main(flags) == 0
    logged = capsys.readouterr().out
    assert "dataset 'mydata' has no dataset.json and no preset" in logged
    assert "R of MAP@TopK = the whole database" in logged and "similar-pair weight 1" in logged
    result = json.loads((tmp_path / "test_output" / "t_iter_00020" / "metrics.json").read_text())
    assert result["topk"] == 18 and result["dataset"] == "mydata"  # R = all 18 database items

    out = tmp_path / "tested"
    assert test_mmhh.main(["--model_path", str(tmp_path / "snapshot" / "t_mydata_mydata_iter_00020"),
                               "--dataset", "mydata", "--test_list", lists["test"], "--database_list",
                               lists["database"], "--data_root", str(root), "--topk", "5", "--gpu_id", "cpu",
                           "--workers", "0", "--output_path", str(out), "--log_dir", str(tmp_path / "log"),
                           "--data_dir", str(tiny_data)]) == 0
    assert json.loads((out / "metrics.json").read_text())["topk"] == 5
    assert "R of MAP@TopK" not in capsys.readouterr().out  # --topk was given: no default to announce


def test_a_name_without_folder_needs_the_lists_the_script_reads(tmp_path, tiny_data, capsys):
    lists, root = own_lists(tmp_path, tiny_data)
    flags = tiny_train_flags(tmp_path, tiny_data, "--train_list", lists["train"], "--test_list", lists["test"])
    flags[flags.index("tiny")] = "mydata"
    assert train_mmhh.run_cli(train_mmhh.main, flags) == 2
    assert "unknown dataset 'mydata'" in capsys.readouterr().err
    with pytest.raises(data_list.DataError, match="pass --test_list/--database_list"):
        data_list.resolve_dataset("mydata", str(tiny_data), test_list=lists["test"], needs=("test", "database"))
    assert data_list.resolve_dataset("mydata", str(tiny_data), train_list=lists["train"],
                                     needs=("train",)).presets_from == "default"


def test_queries_inside_the_database_are_counted_and_reported(tmp_path, tiny_data, capsys):
    folder = tiny_data / "tiny"
    database = (folder / "database.txt").read_text()
    (folder / "database.txt").write_text(database + (folder / "test.txt").read_text())  # all 9 queries inside
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data)) == 0
    logged = capsys.readouterr().out
    result = json.loads((tmp_path / "test_output" / "t_iter_00020" / "metrics.json").read_text())
    assert result["queries_in_database"] == 9
    assert "queries in the database              9 of 9" in logged
    assert result["empty_ball_fraction"] == 0.0  # every query finds itself


def test_disjoint_queries_count_zero():
    assert evaluation.count_queries_in_database(["/a/x.png", "/a/y.png"], ["/a/z.png", "/a/./x.png"]) == 1
    assert evaluation.count_queries_in_database(["/a/x.png"], ["/b/x.png"]) == 0


def test_saved_codes_use_the_dataset_r_and_refuse_zero_one_bits(tmp_path, tiny_data, capsys):
    (tiny_data / "tiny" / "dataset.json").write_text(json.dumps({"topk": 5, "similar_weight": 1.0}))
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data)) == 0
    codes_dir = tmp_path / "test_output" / "t_iter_00020"
    common = ["--gpu_id", "cpu", "--log_dir", str(tmp_path / "log"), "--data_dir", str(tiny_data)]
    assert test_mmhh.main(["--codes_dir", str(codes_dir), "--output_path", str(tmp_path / "a"), *common]) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["topk"] == 5  # recorded dataset 'tiny'
    assert test_mmhh.main(["--codes_dir", str(codes_dir), "--dataset", "coco_80", "--output_path",
                           str(tmp_path / "b"), *common]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["topk"] == 18  # 5000 > 18: all

    bits = (np.load(codes_dir / "database_code.npy") > 0).astype(np.int64)
    np.save(codes_dir / "database_code.npy", bits)
    code = train_mmhh.run_cli(test_mmhh.main, ["--codes_dir", str(codes_dir), *common])
    err = capsys.readouterr().err
    assert code == 2 and "database_code.npy holds 0/1 bits" in err and "2 * bits - 1" in err
    np.save(codes_dir / "database_code.npy", 2 * bits - 1)  # +-1 integers are fine
    assert test_mmhh.main(["--codes_dir", str(codes_dir), *common]) == 0


def test_pretrained_imagenet_is_the_release_weights():
    assert network.torchvision_weights(torchvision.models.resnet50, "ResNet50", "imagenet").name == "IMAGENET1K_V1"
    assert network.torchvision_weights(torchvision.models.resnet50, "ResNet50", "imagenet_v2").name == "IMAGENET1K_V2"
    assert network.torchvision_weights(torchvision.models.vgg16, "VGG16",
                                       "VGG16_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"
    with pytest.raises(network.PretrainedWeightsError, match="AlexNet has no torchvision weights IMAGENET1K_V2"):
        network.torchvision_weights(torchvision.models.alexnet, "AlexNet", "imagenet_v2")


def test_offline_imagenet_names_the_file_torchvision_looks_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(network.PretrainedWeightsError) as raised:
        network.load_backbone(torchvision.models.resnet50, "ResNet50", "imagenet")
    message = str(raised.value)
    assert str(tmp_path / "cache" / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message  # V1's file
    assert "--pretrained /path/to/weights.pth" in message and "--pretrained none" in message


def _offline(*args, **kwargs):
    raise OSError("network unreachable")


def test_the_map_curve_stops_at_the_radius_unless_asked(tmp_path, tiny_data):
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data)) == 0
    codes_dir = tmp_path / "test_output" / "t_iter_00020"
    curve = json.loads((codes_dir / "metrics.json").read_text())["curves"]["map"]
    assert len(curve) == 17 and curve[3] is None and curve[2] is not None  # radius 2 of 16 bits
    common = ["--codes_dir", str(codes_dir), "--gpu_id", "cpu", "--log_dir", str(tmp_path / "log")]
    assert test_mmhh.main([*common, "--map_curve_radius", "-1", "--output_path", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())["curves"]["map"]
    assert None not in full and full[:3] == pytest.approx(curve[:3], rel=1e-12)
