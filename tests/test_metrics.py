"""metrics.py against metrics_reference.py, the plain per-query implementation of the README's
"Retrieval metrics", plus fixed cases."""
import contextlib
import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metric_kernels
import metrics
import plots
from hamming_index import rank_members
from metrics_reference import ref_map_at_radius, ref_map_at_topk, ref_precision_at_n

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Random inputs with ties, empty balls and all-zero label rows
# ----------------------------------------------------------------------------------------------

@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    n_db, n_q = draw(st.integers(1, 24)), draw(st.integers(1, 6))
    bits, classes = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["pm1", "grid", "fine"]))
    multi = draw(st.booleans())
    rng = np.random.default_rng(seed)

    def codes(n):
        if kind == "pm1":                        # every score an integer: ties everywhere
            return rng.choice([-1.0, 1.0], (n, bits))
        if kind == "grid":                       # a few values, 0 included: sign(0) and ties
            return rng.choice([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0], (n, bits))
        return rng.integers(-1024, 1025, (n, bits)) / 1024.0     # dyadic: exact float64 products

    def labels(n):
        if multi:
            lab = (rng.random((n, classes)) < 0.35).astype(np.int64)
        else:
            lab = np.eye(classes, dtype=np.int64)[rng.integers(0, classes, n)]
            lab[rng.random(n) < 0.15] = 0        # some all-zero rows: relevant to nothing
        return lab

    hd = codes(n_db)
    if n_db > 1 and rng.random() < 0.5:          # duplicated database rows: exact ties
        hd[rng.integers(0, n_db, n_db // 2)] = hd[rng.integers(0, n_db, n_db // 2)]
    return hd, labels(n_db), codes(n_q), labels(n_q)


def close(a, b):
    return abs(a - b) <= 1e-9


@contextlib.contextmanager
def ball_method(method):
    """Force the Hamming-ball member search ('lookup' or 'scan'; None: automatic choice)."""
    saved, metric_kernels._FORCE_BALL_METHOD = metric_kernels._FORCE_BALL_METHOD, method
    try:
        yield
    finally:
        metric_kernels._FORCE_BALL_METHOD = saved


@contextlib.contextmanager
def member_batch(members):
    """Cap the CPU's batches of ranked ball members at about ``members`` (None: the default cap)."""
    saved = metric_kernels._CPU_BATCH_BYTES
    if members:
        metric_kernels._CPU_BATCH_BYTES = members * metric_kernels._BYTES_PER_MEMBER
    try:
        yield
    finally:
        metric_kernels._CPU_BATCH_BYTES = saved


# ----------------------------------------------------------------------------------------------
# Property tests against the reference
# ----------------------------------------------------------------------------------------------

@FAST
@given(problems(), st.data())
def test_map_at_radius_matches_reference(problem, data):
    hd, ld, hq, lq = problem
    radius = data.draw(st.integers(0, hd.shape[1] + 1))
    memory = data.draw(st.sampled_from([None, 64]))       # 64 bytes: a query (and pair block) at a time
    method = data.draw(st.sampled_from(["lookup", "scan"]))
    for convention in ("deephash", "mmhh"):
        with ball_method(method):
            got = metrics.map_at_radius(hd, ld, hq, lq, radius, convention, device="cpu", memory_bytes=memory)
        want = ref_map_at_radius(hd, ld, hq, lq, radius, convention)
        for key, value in want.items():
            assert close(got[key], value), (convention, key, got[key], value)


@FAST
@given(problems(), st.data())
def test_map_at_topk_matches_reference(problem, data):
    hd, ld, hq, lq = problem
    n = hd.shape[0]
    top_r = data.draw(st.integers(1, n))
    use_sign = data.draw(st.booleans())
    memory = data.draw(st.sampled_from([None, 64]))
    numpy_select = data.draw(st.booleans())              # False: torch.topk, the path CUDA takes
    for convention in ("hashnet", "mmhh"):
        saved, metric_kernels._NUMPY_SELECT_ON_CPU = metric_kernels._NUMPY_SELECT_ON_CPU, numpy_select
        try:
            got = metrics.map_at_topk(hd, ld, hq, lq, top_r, use_sign, convention, device="cpu",
                                      memory_bytes=memory)
        finally:
            metric_kernels._NUMPY_SELECT_ON_CPU = saved
        assert close(got, ref_map_at_topk(hd, ld, hq, lq, top_r, use_sign, convention))
    whole = metrics.map_at_topk(hd, ld, hq, lq, None, use_sign, device="cpu")
    assert close(whole, ref_map_at_topk(hd, ld, hq, lq, n, use_sign, "hashnet"))


@FAST
@given(problems(), st.sampled_from(["deephash", "mmhh"]), st.sampled_from([None, 64]),
       st.sampled_from([None, 1, 30]))
def test_curves_match_reference_at_every_radius(problem, convention, memory, members):
    hd, ld, hq, lq = problem
    # members 1: a batch (and radius table) per query; 30: a few queries per batch, as at full scale.
    with member_batch(members):
        curve = metrics.precision_recall_by_radius(hd, ld, hq, lq, convention, device="cpu",
                                                   memory_bytes=memory)
    assert curve["radius"] == list(range(hd.shape[1] + 1))
    for r in curve["radius"]:
        want = ref_map_at_radius(hd, ld, hq, lq, r, convention)
        for key in ("map", "precision", "recall", "empty_fraction"):
            assert close(curve[key][r], want[key]), (r, key, curve[key][r], want[key])


@FAST
@given(problems(), st.data())
def test_evaluate_retrieval_matches_reference(problem, data):
    hd, ld, hq, lq = problem
    K = hd.shape[1]
    top_r = data.draw(st.integers(1, hd.shape[0]))
    radius = data.draw(st.integers(0, K + 1))
    curve_radius = data.draw(st.sampled_from([None, -1, 0, K // 2, K + 1]))
    memory = data.draw(st.sampled_from([None, 64]))
    got = metrics.evaluate_retrieval(hd, ld, hq, lq, radius, top_r, device="cpu", memory_bytes=memory,
                                     map_curve_radius=curve_radius)
    assert close(got["map_topk"], ref_map_at_topk(hd, ld, hq, lq, top_r, False, "hashnet"))
    assert close(got["map_topk_mmhh"], ref_map_at_topk(hd, ld, hq, lq, top_r, False, "mmhh"))
    assert close(got["map_topk_sign"], ref_map_at_topk(hd, ld, hq, lq, top_r, True, "hashnet"))
    want_pn = ref_precision_at_n(hd, ld, hq, lq, top_r)
    assert all(close(g, w) for g, w in zip(got["curves"]["precision_at_n"], want_pn, strict=True))
    for convention, key in (("deephash", "map_radius_deephash"), ("mmhh", "map_radius_mmhh")):
        assert close(got[key], ref_map_at_radius(hd, ld, hq, lq, radius, convention)["map"])
    expected_top = {None: min(radius, K), -1: K}.get(curve_radius, min(curve_radius or 0, K))
    assert got["map_curve_radius"] == expected_top
    assert_curves_match_reference(problem, got)


def assert_curves_match_reference(problem, *results):
    """Every radius's precision, recall and empty share, and MAP up to map_curve_radius (None above)."""
    for r in results[0]["curves"]["radius"]:
        want, want_mmhh = (ref_map_at_radius(*problem, r, c) for c in ("deephash", "mmhh"))
        for result in results:
            curves, top = result["curves"], result["map_curve_radius"]
            for key in ("precision", "recall", "empty_fraction"):
                assert close(curves[key][r], want[key]), (r, key, curves[key][r], want[key])
            if r <= top:
                assert close(curves["map"][r], want["map"]) and close(curves["map_mmhh"][r], want_mmhh["map"])
            else:
                assert curves["map"][r] is None and curves["map_mmhh"][r] is None


@pytest.mark.parametrize("members", [1, 200, None])
def test_curves_restart_per_query_in_a_shared_table(members):
    # Queries with no relevant item at the start, middle and end of a table: the running counts
    # must restart at each query whatever the grouping.
    rng = np.random.default_rng(7)
    hd = rng.integers(-4, 5, (300, 8)) / 4.0
    hq = rng.integers(-4, 5, (12, 8)) / 4.0
    ld = np.eye(3, dtype=np.int64)[rng.integers(0, 3, 300)]
    lq = np.eye(3, dtype=np.int64)[rng.integers(0, 3, 12)]
    lq[[0, 5, 6, 11]] = 0
    with member_batch(members):
        curve = metrics.precision_recall_by_radius(hd, ld, hq, lq, "deephash", device="cpu")
    for r in curve["radius"]:
        want = ref_map_at_radius(hd, ld, hq, lq, r, "deephash")
        assert close(curve["map"][r], want["map"]) and close(curve["recall"][r], want["recall"])


@FAST
@given(problems(), st.data())
def test_precision_at_n_matches_reference(problem, data):
    hd, ld, hq, lq = problem
    top_r = data.draw(st.integers(1, hd.shape[0]))
    got = metrics.precision_at_n(hd, ld, hq, lq, top_r, device="cpu")
    want = ref_precision_at_n(hd, ld, hq, lq, top_r)
    assert len(got) == top_r and all(close(g, w) for g, w in zip(got, want))


def test_larger_random_case_with_many_chunks():
    """Clustered codes, several classes: every fast path (sub-batches, tie fix) vs the reference."""
    rng = np.random.default_rng(3)
    centers = rng.choice([-1.0, 1.0], (6, 12))
    cls_d, cls_q = rng.integers(0, 6, 150), rng.integers(0, 6, 12)
    hd = np.round(np.tanh(centers[cls_d] + 0.8 * rng.standard_normal((150, 12))) * 8) / 8
    hq = np.round(np.tanh(centers[cls_q] + 0.8 * rng.standard_normal((12, 12))) * 8) / 8
    ld, lq = np.eye(6)[cls_d], np.eye(6)[cls_q]
    for memory in (None, 3000):
        for radius, method in itertools.product((0, 2, 5), ("lookup", "scan")):
            with ball_method(method):
                got = metrics.map_at_radius(hd, ld, hq, lq, radius, "mmhh", device="cpu", memory_bytes=memory)
            assert close(got["map"], ref_map_at_radius(hd, ld, hq, lq, radius, "mmhh")["map"])
        for top_r in (1, 37, 150):
            got = metrics.map_at_topk(hd, ld, hq, lq, top_r, True, "hashnet", device="cpu", memory_bytes=memory)
            assert close(got, ref_map_at_topk(hd, ld, hq, lq, top_r, True, "hashnet"))


# ----------------------------------------------------------------------------------------------
# Clustered codes: large balls, duplicated codes, exact ties
# ----------------------------------------------------------------------------------------------

def clustered_problem(seed, n_db=300, n_q=20, bits=12, classes=3):
    """A trained network's codes in miniature: each ball holds a large share of the database, and
    many items tie exactly on score with different relevance (coarse magnitudes, duplicated codes)."""
    rng = np.random.default_rng(seed)
    centres = rng.choice([-1.0, 1.0], (classes, bits))

    def draw(n):
        cls = rng.integers(0, classes, n)
        signs = np.where(rng.random((n, bits)) < 0.04, -centres[cls], centres[cls])
        codes = signs * rng.choice([0.25, 0.5, 1.0], (n, bits))      # dyadic: exact, tied scores
        relabelled = np.where(rng.random(n) < 0.3, rng.integers(0, classes, n), cls)
        return codes, np.eye(classes, dtype=np.int64)[relabelled]

    hd, ld = draw(n_db)
    hd[rng.permutation(n_db)[:n_db // 3]] = hd[rng.integers(0, n_db, n_db // 3)]   # same code, other labels
    hq, lq = draw(n_q)
    return hd, ld, hq, lq


@pytest.fixture(scope="module")
def clustered():
    """A clustered problem and the reference's figures at radii 0..3 (computed once)."""
    problem = clustered_problem(11)
    want = {(r, c): ref_map_at_radius(*problem, r, c) for r in range(4) for c in metrics.RADIUS_CONVENTIONS}
    return problem, want


def test_clustered_problem_has_large_balls_and_ties(clustered):
    (hd, ld, hq, lq), _ = clustered
    signs = np.where(hd >= 0, 1, -1) @ np.where(hq >= 0, 1, -1).T          # (N, Q)
    assert ((hd.shape[1] - signs) / 2 <= 2).mean() > 0.2                   # balls: a fifth of the database
    scores = hd @ hq[0]
    _, counts = np.unique(scores, return_counts=True)
    assert counts.max() >= 10                                               # one query's score ties


@pytest.mark.parametrize("method", ["lookup", "scan"])
@pytest.mark.parametrize("members", [None, 300])
def test_clustered_codes_every_ball_path(clustered, method, members):
    # members None: every query in one batch; 300: one to three queries per batch.
    (hd, ld, hq, lq), want = clustered
    with ball_method(method), member_batch(members):
        for (radius, convention), expected in want.items():
            got = metrics.map_at_radius(hd, ld, hq, lq, radius, convention, device="cpu")
            for key, value in expected.items():
                assert close(got[key], value), (radius, convention, key, got[key], value)


@pytest.mark.parametrize("dense, members", [(1, None), (3, 300), (32, None), (32, 300)])
def test_lookup_in_blocks_of_queries(dense, members, monkeypatch):
    # 70 queries in code order, scored `dense` at a time, in batches of about `members` (blocks merged,
    # or a block of large balls split): the figures of each query land in its own row.
    problem = clustered_problem(17, n_db=400, n_q=70)
    monkeypatch.setattr(metric_kernels, "_DENSE_QUERIES", dense)
    with ball_method("lookup"), member_batch(members):
        got = metrics.evaluate_retrieval(*problem, radius=2, topk=50, map_curve_radius=3, device="cpu")
        for convention in metrics.RADIUS_CONVENTIONS:
            want = ref_map_at_radius(*problem, 2, convention)
            assert close(metrics.map_at_radius(*problem, 2, convention, device="cpu")["map"], want["map"])
    for radius in range(4):
        want = ref_map_at_radius(*problem, radius, "deephash")
        assert close(got["curves"]["map"][radius], want["map"]), radius
        assert close(got["curves"]["precision"][radius], want["precision"]), radius


def test_float32_and_bfloat16_sign_products_agree(clustered):
    # Where the CPU multiplies bfloat16 natively, sign products use it; float32 is the other path.
    (hd, ld, hq, lq), _ = clustered
    results = []
    for bf16 in (True, False):
        saved, metric_kernels._BF16_SIGNS = metric_kernels._BF16_SIGNS, bf16
        try:
            with ball_method("scan"):
                results.append((metrics.evaluate_retrieval(hd, ld, hq, lq, 2, 50, device="cpu"),
                                metrics.map_at_radius(hd, ld, hq, lq, 3, device="cpu")))
        finally:
            metric_kernels._BF16_SIGNS = saved
    assert results[0] == results[1]


def test_clustered_codes_evaluate_retrieval(clustered, tmp_path):
    (hd, ld, hq, lq), want = clustered
    K = hd.shape[1]
    with ball_method("lookup"), member_batch(300):
        fast = metrics.evaluate_retrieval(hd, ld, hq, lq, radius=2, topk=50, device="cpu")
        full = metrics.evaluate_retrieval(hd, ld, hq, lq, radius=2, topk=50, device="cpu", map_curve_radius=-1)
    assert fast["map_curve_radius"] == 2 and full["map_curve_radius"] == K
    assert_curves_match_reference((hd, ld, hq, lq), fast, full)
    assert full["curves"]["map"] == metrics.precision_recall_by_radius(hd, ld, hq, lq, device="cpu")["map"]
    for key in ("map_radius_deephash", "precision_radius", "map_topk", "map_topk_sign"):
        assert fast[key] == full[key]
    for use_sign, key in ((False, "map_topk"), (True, "map_topk_sign")):
        assert close(fast[key], ref_map_at_topk(hd, ld, hq, lq, 50, use_sign, "hashnet"))
    assert close(fast["map_radius_mmhh"], want[2, "mmhh"]["map"])
    json.dumps(fast)                                        # None above map_curve_radius: null
    assert len(plots.save_retrieval_plots(fast, tmp_path)) == 3


# ----------------------------------------------------------------------------------------------
# Hand-computed and synthetic cases
# ----------------------------------------------------------------------------------------------

def test_hand_computed_single_query():
    # K = 4, query code (1, 1, 1, 1). Database (index: code -> Hamming distance, inner product, label):
    #   0: ( 1, 1, 1,-1)       -> d 1, ip 2.0, relevant
    #   1: ( .5,.5,.5,.5)      -> d 0, ip 2.0, not relevant  (ties item 0 at 2.0; index 0 first)
    #   2: ( 1, 1,-1,-1)       -> d 2, ip 0.0, relevant
    #   3: ( 1, 1, 1, 1)       -> d 0, ip 4.0, relevant
    #   4: (-1,-1,-1,-1)       -> d 4, ip -4.0, relevant   (outside radius 2)
    # Ranking inside the ball (d <= 2): 3 (rel), 0 (rel), 1 (not), 2 (rel).
    # AP = (1/1 + 2/2 + 3/4) / 3 = 2.75 / 3. Precision 3/4, recall 3/4 (item 4 is relevant too).
    hd = np.array([[1, 1, 1, -1], [.5, .5, .5, .5], [1, 1, -1, -1], [1, 1, 1, 1], [-1, -1, -1, -1]])
    ld = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [1, 0]])
    hq, lq = np.ones((1, 4)), np.array([[1, 0]])
    got = metrics.map_at_radius(hd, ld, hq, lq, radius=2, device="cpu")
    assert got["map"] == pytest.approx(2.75 / 3, abs=1e-12)
    assert got["precision"] == pytest.approx(0.75) and got["recall"] == pytest.approx(0.75)
    assert got["empty_fraction"] == 0.0
    # Top 3 by inner product: 3 (4.0, rel), 0 (2.0, rel), 1 (2.0, not) -> AP = (1 + 1) / 2 = 1.
    assert metrics.map_at_topk(hd, ld, hq, lq, 3, device="cpu") == pytest.approx(1.0)
    # Top 4 adds item 2 (rel) at rank 4: AP = (1 + 1 + 3/4) / 3.
    assert metrics.map_at_topk(hd, ld, hq, lq, 4, device="cpu") == pytest.approx(2.75 / 3)
    # Sign codes: items 1 and 3 both score 4, 0 scores 2, 2 scores 0: order 1, 3, 0, 2, 4.
    # Top 2 -> rel (0, 1): AP = (1/2) / 1.
    assert metrics.map_at_topk(hd, ld, hq, lq, 2, use_sign=True, device="cpu") == pytest.approx(0.5)
    assert metrics.precision_at_n(hd, ld, hq, lq, 4, device="cpu") == pytest.approx([1, 1, 2 / 3, 3 / 4])


def test_tie_order_is_database_order():
    # Two identical codes with different relevance: the lower index is ranked first.
    hd = np.array([[1.0, 1.0], [1.0, 1.0]])
    hq = np.array([[1.0, 1.0]])
    relevant_first = metrics.map_at_radius(hd, [[1], [0]], hq, [[1]], 0, device="cpu")["map"]
    relevant_second = metrics.map_at_radius(hd, [[0], [1]], hq, [[1]], 0, device="cpu")["map"]
    assert relevant_first == 1.0 and relevant_second == 0.5
    assert metrics.map_at_topk(hd, [[0], [1]], hq, [[1]], 1, convention="mmhh", device="cpu") == 0.0


def test_signed_zero_scores_tie():
    # ip with item 0 is -0.0 (0 * -1 summed), with item 1 +0.0: equal scores, index order.
    hd = np.array([[-1.0, -1.0], [1.0, 1.0]])
    hq = np.array([[0.0, 0.0]])
    assert metrics.map_at_topk(hd, [[0], [1]], hq, [[1]], 2, device="cpu") == 0.5
    # In the ball: -0.0 codes have sign +1, so both items are at distance 0 and score -0.0, +0.0.
    hd = np.array([[-0.0, -0.0], [0.0, 0.0]])
    for method in ("lookup", "scan"):
        with ball_method(method):
            assert metrics.map_at_radius(hd, [[0], [1]], hq, [[1]], 0, device="cpu")["map"] == 0.5


@FAST
@given(st.data())
def test_ranking_of_members_is_exact(data):
    # The ranking of ball members sorts a quantized score and repairs equal keys: scores closer than
    # the quantum (1e9 makes it coarse), equal scores and signed zeros, members in any order.
    n = data.draw(st.integers(0, 60))
    groups = data.draw(st.integers(1, 4))
    values = st.sampled_from([0.0, -0.0, 1.0, 1.0 + 2**-40, -1.0, 3.5, 1e9])
    group = data.draw(st.lists(st.integers(0, groups - 1), min_size=n, max_size=n))
    score = data.draw(st.lists(values, min_size=n, max_size=n))
    index = data.draw(st.permutations(range(n)))
    order, ranked_group = rank_members(
        torch.tensor(group, dtype=torch.int64), torch.tensor(score, dtype=torch.float64),
        torch.tensor(index, dtype=torch.int64), groups)
    want = sorted(range(n), key=lambda i: (group[i], -score[i], index[i]))
    assert order.tolist() == want
    assert ranked_group.tolist() == [group[i] for i in want]


def test_empty_balls_split_the_conventions():
    # 20 queries; only query 0 has a database item within radius 2 (a relevant one). deephash counts
    # the 19 empty balls as AP 0 -> 1/20; mmhh leaves them out -> 1.0.
    rng = np.random.default_rng(0)
    K = 48
    hq = rng.choice([-1.0, 1.0], (20, K))
    hd = np.concatenate([hq[:1], -hq[1:]])          # item i = -query i: distance 48 for i >= 1
    hd[1:, :2] = 1.0
    labels = np.eye(20)
    dh = metrics.map_at_radius(hd, labels, hq, labels, 2, "deephash", device="cpu")
    mm = metrics.map_at_radius(hd, labels, hq, labels, 2, "mmhh", device="cpu")
    assert dh["empty_fraction"] == mm["empty_fraction"] == 0.95
    assert dh["map"] == pytest.approx(0.05) and mm["map"] == 1.0
    assert dh["precision"] == pytest.approx(0.05) and mm["precision"] == 1.0


def test_everything_left_out_gives_zero_not_nan():
    hd, hq = np.array([[1.0, 1.0]]), np.array([[-1.0, -1.0]])
    assert metrics.map_at_radius(hd, [[1]], hq, [[1]], 0, "mmhh", device="cpu")["map"] == 0.0
    assert metrics.map_at_topk(hd, [[0]], hq, [[1]], 1, convention="hashnet", device="cpu") == 0.0


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(1)
    hd, hq = rng.standard_normal((40, 8)), rng.standard_normal((5, 8))
    ld, lq = rng.integers(0, 2, (40, 3)), rng.integers(0, 2, (5, 3))
    as_numpy = metrics.map_at_radius(hd, ld, hq, lq, 3, device="cpu")
    as_torch = metrics.map_at_radius(torch.tensor(hd, dtype=torch.float32), torch.tensor(ld).bool(),
                                     torch.tensor(hq, dtype=torch.float32), torch.tensor(lq), 3, device="cpu")
    assert as_numpy["empty_fraction"] == as_torch["empty_fraction"]
    assert as_numpy["precision"] == pytest.approx(as_torch["precision"])


DEVICES = ("cpu", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", [None, "lookup", "scan"])
def test_cuda_matches_cpu(method):
    # Dyadic codes: every product is exact, so both devices must give the very same figures.
    rng = np.random.default_rng(2)
    random_codes = (rng.choice([-1.0, -0.5, 0.5, 1.0], (300, 16)), rng.integers(0, 2, (300, 4)),
                    rng.choice([-1.0, -0.5, 0.5, 1.0], (20, 16)), rng.integers(0, 2, (20, 4)))
    for problem in (random_codes, clustered_problem(13)):
        for curve_radius in (None, -1):
            with ball_method(method):
                cpu, gpu = (metrics.evaluate_retrieval(*problem, 3, 50, device=device, map_curve_radius=curve_radius)
                            for device in DEVICES)
            assert cpu == gpu
        for radius in (0, 2, 5):
            with ball_method(method):
                cpu, gpu = (metrics.map_at_radius(*problem, radius, "mmhh", device=device) for device in DEVICES)
            assert cpu == gpu
        for use_sign in (False, True):
            cpu, gpu = (metrics.precision_at_n(*problem, 40, use_sign, device=device) for device in DEVICES)
            assert cpu == gpu


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

GOOD = (np.ones((4, 3)), np.eye(4)[:, :2], np.ones((2, 3)), np.eye(2))


@pytest.mark.parametrize("index, value, name", [
    (2, np.ones((2, 5)), "query_codes"),                      # 5 columns vs 3
    (1, np.eye(3)[:, :2], "database_labels"),                 # 3 rows vs 4 codes
    (3, np.eye(2)[:1], "query_labels"),                       # 1 row vs 2 codes
    (3, np.ones((2, 3)), "query_labels"),                     # 3 classes vs 2
    (1, np.full((4, 2), 2), "database_labels"),               # not 0/1
    (3, np.array([[0.5, 0], [0, 1]]), "query_labels"),        # not 0/1
    (0, np.array([[1, 1, np.nan]] * 4), "database_codes"),    # NaN
    (2, np.array([[1, np.inf, 1]] * 2), "query_codes"),       # inf
    (0, np.ones(4), "database_codes"),                        # 1-D
    (2, np.ones((0, 3)), "query_codes"),                      # no rows
])
def test_bad_inputs_name_the_argument(index, value, name):
    args = list(GOOD)
    args[index] = value
    with pytest.raises(ValueError, match=name):
        metrics.map_at_radius(*args, device="cpu")
    with pytest.raises(ValueError, match=name):
        metrics.evaluate_retrieval(*args, device="cpu")


@pytest.mark.parametrize("call, name", [
    (lambda: metrics.map_at_radius(*GOOD, radius=-1, device="cpu"), "radius"),
    (lambda: metrics.map_at_radius(*GOOD, radius=1.5, device="cpu"), "radius"),
    (lambda: metrics.map_at_radius(*GOOD, convention="hashnet", device="cpu"), "convention"),
    (lambda: metrics.map_at_topk(*GOOD, topk=5, device="cpu"), "topk"),
    (lambda: metrics.map_at_topk(*GOOD, topk=0, device="cpu"), "topk"),
    (lambda: metrics.map_at_topk(*GOOD, topk=-2, device="cpu"), "topk"),
    (lambda: metrics.map_at_topk(*GOOD, topk=2, convention="deephash", device="cpu"), "convention"),
    (lambda: metrics.precision_recall_by_radius(*GOOD, convention="x", device="cpu"), "convention"),
    (lambda: metrics.precision_at_n(*GOOD, topk=9, device="cpu"), "topk"),
    (lambda: metrics.evaluate_retrieval(*GOOD, radius=-3, device="cpu"), "radius"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ----------------------------------------------------------------------------------------------
# evaluate_retrieval and plots
# ----------------------------------------------------------------------------------------------

def small_problem():
    rng = np.random.default_rng(5)
    centers = rng.choice([-1.0, 1.0], (4, 16))
    cls_d, cls_q = rng.integers(0, 4, 200), rng.integers(0, 4, 10)
    hd = np.tanh(2 * (centers[cls_d] + 0.5 * rng.standard_normal((200, 16))))
    hq = np.tanh(2 * (centers[cls_q] + 0.5 * rng.standard_normal((10, 16))))
    return hd, np.eye(4)[cls_d], hq, np.eye(4)[cls_q]


def test_evaluate_retrieval_dict():
    hd, ld, hq, lq = small_problem()
    result = metrics.evaluate_retrieval(hd, ld, hq, lq, radius=2, topk=50, device="cpu")
    json.dumps(result)                                      # plain Python types only
    for key in ("map_radius_deephash", "map_radius_mmhh", "precision_radius", "recall_radius",
                "empty_ball_fraction", "map_topk", "map_topk_sign", "map_topk_mmhh"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0 and not math.isnan(result[key])
    assert (result["radius"], result["topk"], result["num_queries"], result["num_database"],
            result["hash_bit"]) == (2, 50, 10, 200, 16)
    curves = result["curves"]
    assert curves["radius"] == list(range(17))
    for key in ("precision", "recall", "map", "map_mmhh", "empty_fraction"):
        assert len(curves[key]) == 17
    assert len(curves["precision_at_n"]) == 50
    # The figures agree with the single-purpose functions.
    assert close(result["map_radius_deephash"], curves["map"][2])
    assert close(result["map_radius_mmhh"], curves["map_mmhh"][2])
    assert close(result["map_radius_mmhh"], metrics.map_at_radius(hd, ld, hq, lq, 2, "mmhh", device="cpu")["map"])
    assert close(result["map_topk_sign"], metrics.map_at_topk(hd, ld, hq, lq, 50, True, device="cpu"))
    # The mean ball size counted plainly: database signs within Hamming distance 2 of each query's.
    distances = (np.where(hq >= 0, 1, -1)[:, None, :] != np.where(hd >= 0, 1, -1)[None, :, :]).sum(2)
    assert close(result["mean_ball_size"], (distances <= 2).sum(1).mean())
    whole = metrics.evaluate_retrieval(hd, ld, hq, lq, 20, -1, device="cpu")   # radius > K: everything
    assert whole["topk"] == 200 and len(whole["curves"]["precision_at_n"]) == 200
    assert close(whole["map_radius_mmhh"], metrics.map_at_radius(hd, ld, hq, lq, 20, "mmhh", device="cpu")["map"])


def test_save_retrieval_plots(tmp_path):
    hd, ld, hq, lq = small_problem()
    result = metrics.evaluate_retrieval(hd, ld, hq, lq, radius=2, topk=50, device="cpu")
    paths = plots.save_retrieval_plots(result, tmp_path / "plots")
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["pr_curve.png", "precision_at_n.png", "precision_radius.png"]
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names     # no temp files left


def test_lookup_handles_64_bit_codes():
    # Bit 63 is the int64 sign bit of the packed key: codes differing there must still be found.
    rng = np.random.default_rng(4)
    hq = rng.choice([-1.0, 1.0], (3, 64))
    hd = np.repeat(hq, 3, axis=0)
    hd[1::3, 63] *= -1                                      # distance 1, through the sign bit
    hd[2::3, [0, 63]] *= -1                                 # distance 2
    ld, lq = np.repeat(np.eye(3), 3, axis=0), np.eye(3)
    for radius in (0, 1, 2):
        want = ref_map_at_radius(hd, ld, hq, lq, radius, "deephash")
        for method in ("lookup", "scan"):
            with ball_method(method):
                got = metrics.map_at_radius(hd, ld, hq, lq, radius, device="cpu")
            assert got["precision"] == want["precision"] == 1.0
            assert close(got["recall"], (radius + 1) / 3)


# ----------------------------------------------------------------------------------------------
# MAP@TopK on the CPU: candidates from a sampled threshold, ranking by integer keys
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 65])                   # 65: no code table, database order kept
@pytest.mark.parametrize("spacing", [1, 2])                 # units in the last place between scores
def test_topk_near_ties_around_the_cut(bits, spacing):
    # Scores 1 + spacing * j * 2^-52, j < 40, with exact duplicates: thousands of items closer than
    # float32 can tell apart around every R-th score. At spacing 1 neighbouring scores share the
    # ranking key's 63 bits (the exact fallback); at 2 they do not (the integer sort alone).
    rng = np.random.default_rng(spacing)
    n = 4000
    hd = rng.choice([-0.5, 0.5], (n, bits))
    hd[:, 0] = 1.0 + spacing * rng.integers(0, 40, n) * 2.0**-52
    hd[:25, 0] = 1.0 + spacing * (40 + np.arange(25)) * 2.0**-52     # 25 distinct best scores
    hq = np.zeros((3, bits))
    hq[:, 0] = [1.0, 0.5, -1.0]                                 # scores h_x0, h_x0 / 2, -h_x0: exact
    ld = np.eye(3)[rng.integers(0, 3, n)]
    lq = np.eye(3)
    for top_r in (1, 10, 25, 26, 130, 1999, 4000):
        got = metrics.map_at_topk(hd, ld, hq, lq, top_r, convention="mmhh", device="cpu")
        assert close(got, ref_map_at_topk(hd, ld, hq, lq, top_r, False, "mmhh")), top_r
    got = metrics.precision_at_n(hd, ld, hq, lq, 130, device="cpu")
    assert all(close(g, w) for g, w in zip(got, ref_precision_at_n(hd, ld, hq, lq, 130), strict=True))


def test_top_candidates_when_the_sample_misjudges():
    # The items of the strided sample score high, the others low: fewer than R items reach the
    # sample's quantile, so the R-th score is selected exactly.
    step = metric_kernels._SAMPLE_STEP
    row = np.zeros(100 * step)
    row[::step] = 10.0 + np.arange(100)
    row[1::step] = 5.0
    for top_r in (200, 150, 101):
        candidates = metric_kernels._top_candidates(row, top_r)
        cut = np.sort(row)[-top_r]
        assert np.array_equal(candidates, np.flatnonzero(row >= cut))


@FAST
@given(st.data())
def test_ranked_relevance_is_exact(data):
    # Scores a few units in the last place apart, equal ones, and signed zeros, against a sort by
    # (-score, index).
    n = data.draw(st.integers(1, 60))
    steps = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    base = data.draw(st.sampled_from([1.0, -1.0, 0.0, 2.0**-1060]))   # 2^-1060: subnormal steps
    values = np.array([np.nextafter(base, np.inf) if s == 6 else base + s * np.spacing(base) for s in steps])
    values[np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))] *= -1.0
    rel = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    index = np.array(data.draw(st.permutations(range(n))))
    top_r = data.draw(st.integers(1, n))
    want = [rel[i] for i in sorted(range(n), key=lambda i: (-values[i], index[i]))[:top_r]]
    assert metric_kernels._ranked_relevance(values.copy(), rel, top_r, lambda: index).tolist() == want


def test_label_rows_of_many_words_are_numbered_exactly():
    # 130 labels: three 64-label words per row, rows equal in some words only.
    rng = np.random.default_rng(5)
    patterns = (rng.random((6, 130)) < 0.3).astype(np.uint8)
    patterns[1, 64:] = patterns[0, 64:]                         # equal to row 0 past the first word
    patterns[2, :128] = patterns[0, :128]                       # differs from row 0 in the last word only
    labels = torch.from_numpy(patterns[rng.integers(0, 6, 500)])
    inverse, rows, counts = metric_kernels._unique_label_rows(labels)
    assert torch.equal(rows[inverse], labels.to(torch.float32))
    assert len(rows) == len(np.unique(labels.numpy(), axis=0)) == len(counts)
    assert counts.sum() == 500 and torch.equal(counts, torch.bincount(inverse).to(torch.float64))
