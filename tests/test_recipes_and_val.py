"""Recipes by name (resolved, overridden, recorded), and the validation split that tuning uses."""
import json

import pytest
import torch

import data_list
import network
import pre_process
import recipes
import runtime
import train_mmhh
from conftest import tiny_train_flags, write_tiny_dataset
from loss import hashnet_pair_loss, label_similarity, sigmoid_param_value
from test_distributed import small_network


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
    assert saved["hashnet_pairing"] == "halves" and saved["dch_balance"] == "offdiagonal"
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


def test_dch_deephash_recipe_uses_deephash_balance():
    args, explicit = train_mmhh.parse_args(["--recipe", "dch_deephash"])
    recipes.apply_recipe(args, explicit)
    assert (args.dch_balance, args.hashnet_pairing) == ("deephash", "all")
    plain, _ = train_mmhh.parse_args(["--distance_type", "DCH"])
    assert plain.dch_balance == "offdiagonal"  # the default (README: Differences)


def test_hashnet_recipe_steps_on_the_loss_of_the_two_half_batches(tiny_data, monkeypatch):
    monkeypatch.setattr(network, "build_network", small_network)
    args, explicit = train_mmhh.parse_args(["--recipe", "hashnet", "--hash_bit", "16", "--batch_size", "8",
                                            "--resize_size", "20", "--crop_size", "16", "--workers", "0",
                                            "--gpu_id", "cpu"])
    recipes.apply_recipe(args, explicit)
    train_mmhh.finish_args(args)
    spec = data_list.resolve_dataset("tiny", str(tiny_data), needs=("train",))
    train_list = data_list.read_checked_list(spec, "train")
    paths, labels = train_list.paths, train_list.labels
    run = train_mmhh.build_run(args, spec, labels, torch.device("cpu"), runtime.StopSignals())
    train_mmhh.initialise_run(run, args, paths, labels)
    images = data_list.ImageList(paths, labels, data_list.test_transform(args.resize_size, args.crop_size))
    batch = next(iter(data_list.training_loader(images, 8, 0, args.seed, 0, (0, 1))))
    run.model.set_iteration(0)
    with torch.no_grad():
        h = run.model(batch[0])  # the codes the step's loss sees (no batch-norm, no dropout)
    values, _ = train_mmhh.train_step(run, 0, *batch)
    batch_labels = batch[1].float()
    expected = hashnet_pair_loss(h[:4], h[4:], label_similarity(batch_labels[:4], batch_labels[4:]),
                                 run.criterion.sigmoid_param, spec.similar_weight)  # σ = 10/K
    assert values["pair"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("flags, problem", [
    (["--distance_type", "MMHH", "--hashnet_pairing", "halves"], "--distance_type is MMHH"),
    (["--recipe", "hashnet", "--batch_size", "9"], "use an even batch size"),
])
def test_halves_needs_hashnet_and_an_even_batch(flags, problem):
    args, explicit = train_mmhh.parse_args(flags)
    if args.recipe:
        recipes.apply_recipe(args, explicit)
    with pytest.raises(runtime.UsageError, match=problem):
        train_mmhh.finish_args(args)


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


def test_val_into_a_copy_whose_database_is_the_remaining_training_list(tmp_path, tiny_data, capsys):
    # The unseen protocol's database holds other classes than training, so its validation queries are
    # scored against the training images they were carved from.
    assert carve(tmp_path, tiny_data, "--size", "4", "--database", "train") == 2
    assert "--database train replaces the database list, so it needs --into NEW" in capsys.readouterr().err
    assert carve(tmp_path, tiny_data, "--size", "4", "--into", "tiny_tune", "--database", "train") == 0
    child = tiny_data / "tiny_tune"
    assert (child / "database.txt").read_text() == (child / "train.txt").read_text()
    validation, database = ((child / name).read_text().splitlines() for name in ("val.txt", "database.txt"))
    assert not set(validation) & set(database)
    record = json.loads((child / "dataset.json").read_text())
    assert record["sizes"]["database"] == 20 and record["val"]["database"] == "train"
    assert pre_process.main(["validate", "--dataset", "tiny_tune", "--data_dir", str(tiny_data)]) == 0


@pytest.mark.parametrize("given, bits, sigma", [("5/K", 16, 5 / 16), ("5/K", 48, 5 / 48), ("0.25", 48, 0.25)])
def test_sigmoid_param_may_scale_with_the_code_length(given, bits, sigma):
    # A knob tuned across code lengths keeps HashNet's form σ = C/K.
    args, explicit = train_mmhh.parse_args(["--recipe", "hashnet", "--sigmoid_param", given, "--hash_bit", str(bits)])
    recipes.apply_recipe(args, explicit)
    train_mmhh.finish_args(args)
    assert args.sigmoid_param == given  # the snapshot keeps the flag as given
    assert sigmoid_param_value(args.sigmoid_param, args.hash_bit) == pytest.approx(sigma)


@pytest.mark.parametrize("given", ["x/K", "-2", "0/K", "nan"])
def test_a_bad_sigmoid_param_names_the_flag_and_the_forms(given):
    args, _ = train_mmhh.parse_args(["--sigmoid_param", given])
    with pytest.raises(runtime.UsageError, match="--sigmoid_param: cannot parse .* a positive number or C/K"):
        train_mmhh.finish_args(args)
