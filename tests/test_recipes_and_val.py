"""Recipes by name (resolved, overridden, recorded), and the validation split that tuning uses."""
import json

import pytest
import torch

import pre_process
import recipes
import train_mmhh
from conftest import tiny_train_flags, write_tiny_dataset


def snapshot_args(tmp_path, iterations=20):
    return torch.load(tmp_path / "snapshot" / f"t_tiny_tiny_iter_{iterations:05d}", weights_only=True)["args"]


def test_recipe_sets_its_flags_and_explicit_flags_win(tmp_path, tiny_data, capsys):
    flags = tiny_train_flags(tmp_path, tiny_data, "--recipe", "hashnet", "--batch_size", "8")
    assert train_mmhh.main(flags) == 0
    saved = snapshot_args(tmp_path)
    assert saved["recipe"] == "hashnet" and saved["distance_type"] == "HashNet"
    assert saved["image_loss_type"] == "HashNet" and saved["lr_schedule_type"] == "HashNet_Step"
    assert saved["sigmoid_param"] == pytest.approx(10 / 16) and saved["weight_decay"] == 5e-4
    assert saved["batch_size"] == 8 and saved["num_iters"] == 20  # given explicitly: kept
    logged = capsys.readouterr().out
    assert "recipe hashnet: --sigmoid_param 0.625 (HashNet's PyTorch train.py" in logged
    assert "recipe hashnet: --num_iters 20 (given on the command line)" in logged


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_recipe_resolves_to_valid_flags(name):
    args, explicit = train_mmhh.parse_args(["--recipe", name, "--hash_bit", "32"])
    recipes.apply_recipe(args, explicit)
    train_mmhh.finish_args(args)
    for flag, setting in recipes.RECIPES[name].items():
        expected = setting.value(args) if callable(setting.value) else setting.value
        assert getattr(args, flag) == expected and setting.source
    assert name != "dch_deephash" or (args.dch_distance, args.gamma, args.loss_lambda) == ("euclidean", 20.0, 0.0)


def carve(tmp_path, tiny_data, *extra):
    return pre_process.main(["val", "--dataset", "tiny", "--data_dir", str(tiny_data), *extra])


def test_val_is_carved_out_of_train_seeded_and_recorded(tmp_path, tiny_data):
    folder = tiny_data / "tiny"
    before = (folder / "train.txt").read_text().splitlines()
    assert carve(tmp_path, tiny_data, "--size", "6", "--seed", "3") == 0
    train, val = (folder / "train.txt").read_text().splitlines(), (folder / "val.txt").read_text().splitlines()
    assert len(val) == 6 and len(train) == 18 and not set(train) & set(val)
    assert sorted(train + val) == sorted(before) and val == [line for line in before if line in val]  # order kept
    record = json.loads((folder / "dataset.json").read_text())
    assert record["val"]["size"] == 6 and record["val"]["seed"] == 3 and record["sizes"]["train"] == 18
    again = tmp_path / "again"
    again.mkdir()
    write_tiny_dataset(str(again))
    assert pre_process.main(["val", "--dataset", "tiny", "--data_dir", str(again), "--size", "6", "--seed", "3"]) == 0
    assert (again / "tiny" / "val.txt").read_text() == (folder / "val.txt").read_text()  # seeded


def test_val_into_a_copy_leaves_the_parent_untouched(tmp_path, tiny_data):
    parent = {name: (tiny_data / "tiny" / name).read_text() for name in ("train.txt", "test.txt", "database.txt")}
    assert carve(tmp_path, tiny_data, "--size", "4", "--into", "tiny_tune") == 0
    assert {name: (tiny_data / "tiny" / name).read_text() for name in parent} == parent
    assert not (tiny_data / "tiny" / "val.txt").exists()
    child = tiny_data / "tiny_tune"
    assert len((child / "val.txt").read_text().splitlines()) == 4
    assert (child / "test.txt").read_text() == parent["test.txt"]
    assert pre_process.main(["validate", "--dataset", "tiny_tune", "--data_dir", str(tiny_data)]) == 0
    assert carve(tmp_path, tiny_data, "--size", "4", "--into", "tiny_tune") == 2


def test_val_refuses_to_carve_twice_or_too_much(tmp_path, tiny_data, capsys):
    assert carve(tmp_path, tiny_data, "--size", "24") == 2
    assert "leaves no training or no validation line" in capsys.readouterr().err
    assert not (tiny_data / "tiny" / "val.txt").exists()
    assert carve(tmp_path, tiny_data, "--ratio", "0.25") == 0
    assert carve(tmp_path, tiny_data, "--size", "2") == 2
    assert "val.txt already exists" in capsys.readouterr().err


def test_eval_split_val_scores_the_validation_queries_outside_the_database(tmp_path, tiny_data, capsys):
    folder = tiny_data / "tiny"
    assert carve(tmp_path, tiny_data, "--size", "6") == 0
    # Put the validation images into the database too, as when train is a subset of the database.
    database = (folder / "database.txt").read_text()
    (folder / "database.txt").write_text(database + (folder / "val.txt").read_text())
    assert train_mmhh.main(tiny_train_flags(tmp_path, tiny_data, "--eval_split", "val")) == 0
    result = json.loads((tmp_path / "test_output" / "t_iter_00020" / "metrics.json").read_text())
    assert result["query_split"] == "val" and result["num_queries"] == 6
    assert result["num_database"] == 18 and result["queries_in_database"] == 0
    assert "6 of its 24 items are validation queries and are left out" in capsys.readouterr().out


def test_eval_split_val_without_val_list_says_how_to_carve_it(tmp_path, tiny_data, capsys):
    code = train_mmhh.run_cli(train_mmhh.main, tiny_train_flags(tmp_path, tiny_data, "--eval_split", "val"))
    err = capsys.readouterr().err
    assert code == 2 and "python pre_process.py val --dataset tiny --size N" in err
