"""Code health on hand-made codes, and the collapse warnings of training and evaluation."""
import json

import torch

import collapse
import train_mmhh
from conftest import tiny_train_flags


def test_code_health_of_hand_made_codes():
    equal = torch.full((6, 4), 0.7)
    assert collapse.code_health(equal) == {"distinct_codes": 1, "bit_balance": 1.0, "constant_bits": 4}
    balanced = torch.tensor([[1., 1, -1, -1], [-1, -1, 1, 1], [1, -1, 1, -1], [-1, 1, -1, 1]]) * 0.5
    assert collapse.code_health(balanced) == {"distinct_codes": 4, "bit_balance": 0.0, "constant_bits": 0}
    one_constant = balanced.clone()
    one_constant[:, 2] = -0.3
    health = collapse.code_health(one_constant)
    assert health["constant_bits"] == 1 and health["bit_balance"] == 0.25 and health["distinct_codes"] == 4
    zero_is_plus = torch.zeros(3, 2)  # sign(0) = +1, as the metrics
    assert collapse.code_health(zero_is_plus)["constant_bits"] == 2


def test_batch_health_counts_saturation_and_balance():
    h = torch.tensor([[0.995, -0.2], [0.999, 0.5], [-0.999, 0.1], [0.3, 0.4]])
    saturated, balance = collapse.batch_health(h)
    assert saturated.item() == 3 / 8
    assert balance.item() == (0.5 + 0.5) / 2


def test_collapse_warning_only_for_collapsed_codes():
    collapsed = collapse.collapse_warning(collapse.code_health(torch.full((500, 8), 0.9)), 500, 8, 10)
    assert "collapsed" in collapsed and "--lr" in collapsed and "--sigmoid_param" in collapsed
    healthy = torch.tensor([[1.0 if (i >> b) & 1 else -1.0 for b in range(8)] for i in range(256)])
    assert collapse.collapse_warning(collapse.code_health(healthy), 256, 8, 10) is None
    # 5 distinct codes for 10 labels: collapsed although no bit is constant.
    few = healthy[torch.arange(1000) % 5 * 51]
    assert collapse.code_health(few)["constant_bits"] < 8
    assert "5 distinct sign codes among 1000 database items for 10 labels" in \
        collapse.collapse_warning(collapse.code_health(few), 1000, 8, 10)
    # 12 codes for 10 classes is what good codes look like, however large the database.
    twelve = healthy[torch.arange(100_000) % 12 * 21]
    assert collapse.collapse_warning(collapse.code_health(twelve), 100_000, 8, 10) is None
    # One code is collapsed even with a single label column.
    assert collapse.collapse_warning(collapse.code_health(healthy[:1].repeat(9, 1)), 9, 8, 1)


def test_collapse_watch_warns_once_after_the_patience():
    watch = collapse.CollapseWatch(patience=3)
    assert [watch.update(1.0, 0.1, t) for t in range(2)] == [None, None]
    assert watch.update(0.2, 0.1, 2) is None  # the streak breaks
    warnings = [watch.update(0.3, 1.0, t) for t in range(3, 8)]
    assert warnings[:2] == [None, None] and "likely collapsed" in warnings[2] and warnings[3:] == [None, None]


def test_a_run_made_to_collapse_warns_in_training_and_evaluation(tmp_path, tiny_data, capsys):
    flags = tiny_train_flags(tmp_path, tiny_data, "--distance_type", "HashNet", "--image_loss_type", "HashNet",
                             "--lr", "1", "--num_iters", "60", "--print_every", "20")
    assert train_mmhh.main(flags) == 0
    logged = capsys.readouterr().out
    assert "iterations in a row; the codes have likely collapsed" in logged
    assert "warning: codes collapsed: 1 distinct sign codes among 18 database items" in logged
    assert "saturated" in logged and "bit balance" in logged
    result = json.loads((tmp_path / "test_output" / "t_iter_00060" / "metrics.json").read_text())
    assert result["distinct_codes"] == 1 and result["bit_balance"] == 1.0 and result["constant_bits"] == 16
