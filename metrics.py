"""Retrieval metrics for binary hashing codes (README, "Retrieval metrics").

Definitions shared by every function here:

* relevance: a database item is relevant to a query when their 0/1 label rows share a label
  (``l_q . l_x > 0``); an all-zero label row is relevant to nothing.
* sign codes ``b = sign(h)`` with ``sign(0) = +1`` (tanh outputs are essentially never exactly 0, but
  the choice must be fixed for results to be reproducible); Hamming distance ``(K - b_q . b_x) / 2``.
* ranking: by the inner product ``h_q . h_x`` computed in float64 (of the continuous codes, or of the
  sign codes where a function says so); equal scores are ordered by database index, lower first, in
  every function. Scores are exact -- so ties are real ties and every result is independent of
  chunking and device -- whenever the float64 inner products are exact: +-1 codes, codes on a
  dyadic grid, low-precision codes. For arbitrary real codes the float64 rounding of each product
  sum decides near-ties at the 1e-16 level, as it would in any float64 implementation.
* ``AP = sum_k P@k * rel_k / #relevant retrieved`` over the ranked retrieved list.

This module states the figures and their conventions, and averages the per-query statistics that
metric_kernels.py computes; metrics_reference.py computes the same figures one query at a time in
plain Python, and the tests hold every function here to it. Inputs are torch tensors or numpy
arrays. The kernels run on ``device`` (default: CUDA when available, else CPU), a chunk of queries at
a time, so that the working memory stays near ``memory_bytes`` (default 512 MiB) whatever the number
of queries; no Q x N float64 matrix is built. Only the members of a Hamming ball are ranked, never
the whole database, unless a figure needs it (the MAP curve at every radius: ``map_curve_radius=-1``).
"""
import numpy as np
import torch

from metric_kernels import Inputs, ball_stats, sign_scan, topk_stats

RADIUS_CONVENTIONS = ("deephash", "mmhh")
TOPK_CONVENTIONS = ("hashnet", "mmhh")
DEFAULT_MEMORY_BYTES = 512 * 2**20


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def map_at_radius(database_codes, database_labels, query_codes, query_labels, radius=2,
                  convention="deephash", device=None, memory_bytes=None):
    """MAP, precision and recall inside the Hamming ball of ``radius`` around each query (MAP@H<=r).

    The ball holds every database item whose sign code is within ``radius`` of the query's; it is
    ranked by the continuous inner product, equal scores in database order. Returns a dict of floats:
    ``map``, ``precision``, ``recall``, ``empty_fraction`` (share of queries whose ball is empty, the
    same under both conventions) and ``convention``.

    ``convention="deephash"`` (DeepHash, DCH, the MMHH primary function): precision and recall are
    means over all queries, an empty ball counting 0; MAP counts an empty ball as AP 0 and leaves out
    queries whose non-empty ball holds no relevant item.
    ``convention="mmhh"`` (the MMHH ``--opt-test`` function): queries with an empty ball are left out
    of every mean -- MAP, precision and recall are means over the queries with a non-empty ball; a
    ball with no relevant item has AP 0 and precision 0.
    Recall is ``#relevant in ball / #relevant in the database`` (0 when the query has no relevant item
    at all). A mean over no query (every query left out) is reported as 0.0, not NaN.
    """
    _check_choice("convention", convention, RADIUS_CONVENTIONS)
    radius = _check_radius(radius)
    data = _prepare(database_codes, database_labels, query_codes, query_labels, device)
    summary = _summarise_ball(ball_stats(data, min(radius, data.K), _budget(memory_bytes)), convention)
    return {key: float(value[0]) for key, value in summary.items()} | {"convention": convention}


def map_at_topk(database_codes, database_labels, query_codes, query_labels, topk, use_sign=False,
                convention="hashnet", device=None, memory_bytes=None):
    """MAP over the top ``topk`` items of a linear scan (MAP@TopK); returns a float.

    The whole database is ranked by inner product with the query -- of the continuous codes, or of
    the sign codes when ``use_sign`` (HashNet's protocol), equal scores in database order -- and the
    first R = ``topk`` items are scored (``topk`` None or -1: the whole database).
    ``convention="hashnet"`` leaves out queries with no relevant item in the top R;
    ``convention="mmhh"`` counts them as AP 0. A mean over no query is 0.0.
    """
    _check_choice("convention", convention, TOPK_CONVENTIONS)
    data = _prepare(database_codes, database_labels, query_codes, query_labels, device)
    top_r = _check_topk(topk, data.N)
    ap, n_rel, _ = topk_stats(data, top_r, use_sign, _budget(memory_bytes), want_pn=False)
    return _masked_mean(ap, n_rel > 0) if convention == "hashnet" else _masked_mean(ap, None)


def precision_recall_by_radius(database_codes, database_labels, query_codes, query_labels,
                               convention="deephash", device=None, memory_bytes=None):
    """Precision, recall and MAP inside the Hamming ball at every radius 0..K, under one convention.

    Returns a dict of lists indexed by radius: ``radius`` [0..K], ``precision``, ``recall``, ``map``,
    ``empty_fraction``, plus ``convention``. Entry r equals ``map_at_radius(..., radius=r)``; the
    precision-recall curve over Hamming radius is the (recall, precision) pairs. Cost: MAP at radius
    K ranks the whole database for every query, plus O(#relevant items x K) counting per query.
    """
    _check_choice("convention", convention, RADIUS_CONVENTIONS)
    data = _prepare(database_codes, database_labels, query_codes, query_labels, device)
    summary = _summarise_ball(ball_stats(data, data.K, _budget(memory_bytes), every_radius=True), convention)
    curves = {key: [float(v) for v in values] for key, values in summary.items()}
    return {"radius": list(range(data.K + 1)), **curves, "convention": convention}


def precision_at_n(database_codes, database_labels, query_codes, query_labels, topk, use_sign=False,
                   device=None, memory_bytes=None):
    """Precision@N for N = 1..R (R = ``topk``; None or -1: the whole database), mean over all queries.

    The ranking is the linear scan of ``map_at_topk`` (continuous inner product unless ``use_sign``).
    Returns a list of R floats.
    """
    data = _prepare(database_codes, database_labels, query_codes, query_labels, device)
    top_r = _check_topk(topk, data.N)
    _, _, pn = topk_stats(data, top_r, use_sign, _budget(memory_bytes), want_pn=True)
    return pn.tolist()


def evaluate_retrieval(database_codes, database_labels, query_codes, query_labels, radius=2,
                       topk=None, device=None, memory_bytes=None, map_curve_radius=None):
    """Every retrieval figure of the project in one JSON-serialisable dict (saved as metrics.json).

    Keys: ``map_radius_deephash``, ``map_radius_mmhh``, ``precision_radius`` / ``recall_radius``
    (deephash convention), ``precision_radius_mmhh`` / ``recall_radius_mmhh``,
    ``empty_ball_fraction``, ``mean_ball_size`` (database items within the radius, mean over queries),
    ``map_topk`` (continuous codes, hashnet convention), ``map_topk_mmhh``
    (continuous, mmhh convention), ``map_topk_sign`` (sign codes, hashnet convention), ``radius``,
    ``topk`` (the R used: N for the whole database), ``map_curve_radius``, ``num_queries``,
    ``num_database``, ``hash_bit``, ``conventions`` (a sentence per figure) and ``curves``:
    ``radius`` [0..K], ``precision``, ``recall``, ``empty_fraction`` per radius, ``map`` (deephash)
    and ``map_mmhh`` per radius, and ``precision_at_n`` (N = 1..R, continuous codes).

    The MAP curve is computed for radii 0..``map_curve_radius`` (default None: ``radius``; -1: every
    radius up to K) and is None above it: MAP at radius r ranks every member of the ball of radius r,
    and at large radii that is the whole database for every query -- the bulk of the cost. Precision,
    recall and the empty-ball share only count items, and are always given at every radius.
    """
    radius = _check_radius(radius)
    data = _prepare(database_codes, database_labels, query_codes, query_labels, device)
    top_r = _check_topk(topk, data.N)
    curve_radius = _check_map_curve_radius(map_curve_radius, radius, data.K)
    budget = _budget(memory_bytes)

    # A radius above K is a ball of the whole database: column K.
    column = min(radius, data.K)
    ranked = ball_stats(data, max(curve_radius, column), budget, every_radius=True)
    signs = sign_scan(data, top_r, budget, want_pn=False)     # counts at every radius, sign top R
    counts = ranked if curve_radius == data.K else signs
    curve = {"n_ball": counts["n_ball"], "n_rel_ball": counts["n_rel_ball"],
             "n_rel_db": counts["n_rel_db"], "ap": ranked["ap"][:, :curve_radius + 1]}
    curve_deephash, curve_mmhh = _summarise_ball(curve, "deephash"), _summarise_ball(curve, "mmhh")
    # The figures at `radius` are the curves' column, so metrics.json can never disagree with itself.
    ball = {key: value[:, column:column + 1] if value.dim() == 2 else value for key, value in ranked.items()}
    deephash, mmhh = _summarise_ball(ball, "deephash"), _summarise_ball(ball, "mmhh")
    ap, n_rel, pn = topk_stats(data, top_r, False, budget, want_pn=True)
    ap_sign, n_rel_sign, _ = signs["topk"]

    def floats(values, length=data.K + 1):
        return [float(v) for v in values] + [None] * (length - len(values))

    return {
        "map_radius_deephash": float(deephash["map"][0]),
        "map_radius_mmhh": float(mmhh["map"][0]),
        "precision_radius": float(deephash["precision"][0]),
        "recall_radius": float(deephash["recall"][0]),
        "precision_radius_mmhh": float(mmhh["precision"][0]),
        "recall_radius_mmhh": float(mmhh["recall"][0]),
        "empty_ball_fraction": float(deephash["empty_fraction"][0]),
        "mean_ball_size": float(ball["n_ball"].to(torch.float64).mean()),
        "map_topk": _masked_mean(ap, n_rel > 0),
        "map_topk_mmhh": _masked_mean(ap, None),
        "map_topk_sign": _masked_mean(ap_sign, n_rel_sign > 0),
        "radius": radius,
        "topk": top_r,
        "map_curve_radius": curve_radius,
        "num_queries": data.Q,
        "num_database": data.N,
        "hash_bit": data.K,
        "conventions": {
            "radius": "deephash: empty ball = 0 for P, R and AP; ball without relevant item left out "
                      "of MAP. mmhh: empty balls left out of every mean; no relevant item = AP 0.",
            "topk": "hashnet: queries with no relevant item in the top R left out; mmhh: counted 0.",
            "ranking": "inner product in float64, ties by database index; sign(0) = +1.",
        },
        "curves": {
            "radius": list(range(data.K + 1)),
            "precision": floats(curve_deephash["precision"]),
            "recall": floats(curve_deephash["recall"]),
            "map": floats(curve_deephash["map"]),
            "map_mmhh": floats(curve_mmhh["map"]),
            "empty_fraction": floats(curve_deephash["empty_fraction"]),
            "precision_at_n": pn.tolist(),
        },
    }


# ----------------------------------------------------------------------------------------------
# The conventions: per-query statistics to means
# ----------------------------------------------------------------------------------------------

def _summarise_ball(stats, convention):
    """Means over queries of AP, precision and recall per radius column under a convention, and the
    empty-ball share. ``n_ball``, ``n_rel_ball``: (Q, W); ``n_rel_db``: (Q,); ``ap``: (Q, W') with
    W' <= W, the first W' columns (MAP is given for those only)."""
    n_ball, n_rel_ball, ap = stats["n_ball"], stats["n_rel_ball"], stats["ap"]
    n_rel_db = stats["n_rel_db"][:, None]
    empty = n_ball == 0
    found = n_rel_ball.to(torch.float64)                        # int / int would give float32
    precision = torch.where(empty, 0.0, found / n_ball.clamp(min=1))
    recall = torch.where(n_rel_db > 0, found / n_rel_db.clamp(min=1), 0.0)
    if convention == "deephash":
        map_keep = empty | (n_rel_ball > 0)
        pr_keep = None
    else:
        map_keep = pr_keep = ~empty
    return {
        "map": _masked_mean(ap, map_keep[:, :ap.shape[1]], keep_dims=True),
        "precision": _masked_mean(precision, pr_keep, keep_dims=True),
        "recall": _masked_mean(recall, pr_keep, keep_dims=True),
        "empty_fraction": _masked_mean(empty.to(torch.float64), None, keep_dims=True),
    }


def _masked_mean(values, keep, keep_dims=False):
    """Mean over dim 0 of the kept entries; 0.0 where nothing is kept (never NaN)."""
    values = values.to(torch.float64)
    if keep is None:
        keep = torch.ones_like(values, dtype=torch.bool)
    total = torch.where(keep, values, 0.0).sum(0)
    count = keep.sum(0)
    mean = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    return mean if keep_dims else float(mean)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def _prepare(database_codes, database_labels, query_codes, query_labels, device):
    """The four arrays checked -- each error names its argument -- and put on the device for the kernels."""
    hd = _as_matrix(database_codes, "database_codes")
    ld = _as_matrix(database_labels, "database_labels")
    hq = _as_matrix(query_codes, "query_codes")
    lq = _as_matrix(query_labels, "query_labels")
    _check_shapes(hd, ld, hq, lq)
    _check_values(hd, ld, hq, lq)
    return Inputs.build(hd, ld, hq, lq, device)


def _check_shapes(hd, ld, hq, lq):
    for codes, labels, c_name, l_name in ((hd, ld, "database_codes", "database_labels"),
                                          (hq, lq, "query_codes", "query_labels")):
        if codes.shape[0] == 0:
            raise ValueError(f"{c_name} has no rows: nothing to evaluate")
        if labels.shape[0] != codes.shape[0]:
            raise ValueError(f"{l_name} has {labels.shape[0]} rows but {c_name} has {codes.shape[0]}")
    if hd.shape[1] == 0:
        raise ValueError("database_codes has 0 columns: codes need at least one bit")
    if hq.shape[1] != hd.shape[1]:
        raise ValueError(f"query_codes has {hq.shape[1]} columns but database_codes has {hd.shape[1]}")
    if ld.shape[1] == 0:
        raise ValueError("database_labels has 0 columns: labels need at least one class")
    if lq.shape[1] != ld.shape[1]:
        raise ValueError(f"query_labels has {lq.shape[1]} columns but database_labels has {ld.shape[1]}")


def _check_values(hd, ld, hq, lq):
    """Codes real and finite (not boolean: a 0/1 code would be all +1 signs); labels 0/1."""
    for codes, name in ((hd, "database_codes"), (hq, "query_codes")):
        if codes.dtype == torch.bool:
            raise ValueError(f"{name} is boolean: pass +-1 or real-valued codes")
        if codes.is_floating_point() and not bool(torch.isfinite(codes).all()):
            row = int((~torch.isfinite(codes)).any(1).nonzero()[0, 0])
            raise ValueError(f"{name} contains NaN or inf (first in row {row})")
    for labels, name in ((ld, "database_labels"), (lq, "query_labels")):
        bad = ~((labels == 0) | (labels == 1))
        if bool(bad.any()):
            value = labels[bad][0].item()
            raise ValueError(f"{name} must hold only 0 and 1 (a 0/1 row per item), found {value!r}")


def _as_matrix(value, name):
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        array = np.asarray(value)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"{name} must be a numeric array, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (one row per item), got shape {tuple(tensor.shape)}")
    if tensor.is_complex():
        raise ValueError(f"{name} must be real, got {tensor.dtype}")
    return tensor


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_radius(radius):
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be a non-negative integer (Hamming distance), got {radius!r}")
    return int(radius)


def _check_topk(topk, n_database):
    if topk is None or (not isinstance(topk, bool) and isinstance(topk, (int, np.integer)) and topk == -1):
        return n_database
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 1 <= topk <= n_database:
        raise ValueError(f"topk must be None, -1 (whole database) or an integer from 1 to {n_database} "
                         f"(the database size), got {topk!r}")
    return int(topk)


def _check_map_curve_radius(map_curve_radius, radius, bits):
    """The largest radius of the MAP curve: None -> ``radius``, -1 -> K; never above K."""
    if map_curve_radius is None:
        return min(radius, bits)
    if isinstance(map_curve_radius, bool) or not isinstance(map_curve_radius, (int, np.integer)) \
            or map_curve_radius < -1:
        raise ValueError(f"map_curve_radius must be None, -1 (every radius) or a non-negative integer, "
                         f"got {map_curve_radius!r}")
    return bits if map_curve_radius == -1 else min(int(map_curve_radius), bits)


def _budget(memory_bytes):
    if memory_bytes is None:
        return DEFAULT_MEMORY_BYTES
    if memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be positive, got {memory_bytes!r}")
    return int(memory_bytes)
