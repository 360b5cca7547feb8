"""The evaluation's warning about queries with all-zero labels, on codes whose figures are worked out by hand."""
import logging

import pytest
import torch

import evaluation

K = 6
ALL_PLUS, ALL_MINUS = [1.0] * K, [-1.0] * K
DATABASE_CODES, DATABASE_LABELS = [ALL_PLUS, ALL_MINUS], [[1, 0], [0, 1]]
SPLIT = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]  # 3 bits from each database code: an empty ball of radius 2
NEAR_FIRST = [1.0, 1.0, 1.0, 1.0, -1.0, -1.0]  # 2 and 4 bits away: database item 0 alone in its ball


def score(query_codes, query_labels):
    database, queries = [torch.tensor(rows, dtype=torch.float64) for rows in (DATABASE_CODES, query_codes)]
    labels = [torch.tensor(rows, dtype=torch.float64) for rows in (DATABASE_LABELS, query_labels)]
    return evaluation.score_codes(database, labels[0], queries, labels[1], radius=2, topk=-1, opt_test=False,
                                  device="cpu")


@pytest.fixture
def warnings(caplog, monkeypatch):
    monkeypatch.setattr(evaluation.log, "propagate", True)  # setup_logging may have turned it off
    caplog.set_level(logging.WARNING, logger="mmhh")
    return caplog


def test_queries_without_labels_are_counted_and_each_convention_named(warnings):
    # A labelled query finding its item (AP 1); an unlabelled one whose ball holds an irrelevant item; two
    # unlabelled ones with empty balls. deephash: (1 + 0 + 0) / 3, the non-empty one left out; mmhh: (1 + 0) / 2.
    result = score([ALL_PLUS, NEAR_FIRST, SPLIT, SPLIT], [[1, 0], [0, 0], [0, 0], [0, 0]])
    assert result["map_radius_deephash"] == pytest.approx(1 / 3) and result["map_radius_mmhh"] == pytest.approx(0.5)
    assert result["unlabelled_queries"] == 3
    text = " ".join(record.getMessage() for record in warnings.records)
    assert "3 of 4 queries have all-zero labels" in text
    assert "deephash convention: such a query scores 0 when its ball is empty and is left out otherwise" in text
    assert "mmhh convention: left out when its ball is empty, 0 otherwise" in text


def test_labelled_queries_give_no_warning(warnings):
    result = score([ALL_PLUS, SPLIT], [[1, 0], [0, 1]])
    assert result["unlabelled_queries"] == 0
    assert not any("all-zero labels" in record.getMessage() for record in warnings.records)
