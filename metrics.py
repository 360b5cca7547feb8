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

Every routine works on torch tensors (numpy arrays are converted) on ``device`` (default: CUDA when
available, else CPU), a chunk of queries at a time, so that the working memory stays near
``memory_bytes`` (default 512 MiB) whatever the number of queries; no Q x N float64 matrix is built.
Only the members of a Hamming ball are ranked, never the whole database, unless a figure needs it
(the MAP curve at every radius: ``map_curve_radius=-1``).
"""
import concurrent.futures
import math

import numpy as np
import torch

from hamming_index import MAX_TABLE_BITS, CodeTable, pack_signs, positions
from hamming_index import rank_members as _rank_members

RADIUS_CONVENTIONS = ("deephash", "mmhh")
TOPK_CONVENTIONS = ("hashnet", "mmhh")
DEFAULT_MEMORY_BYTES = 512 * 2**20

# Rough bytes of working memory per element, used only to size chunks.
_SCAN_BYTES_PER_PAIR = 45       # (c, N): sign and float64 products, ball mask, members if all are in
_PRODUCT_BYTES_PER_PAIR = 8     # (c, N): float64 products
_BYTES_PER_MEMBER = 128         # per ball member: indices, distance, score, sort keys and permutations, table
_SIGN_BYTES_PER_PAIR = 16       # (N, c): sign products, int32 relevance and histogram cells, mask
_TOPK_BYTES_PER_PAIR = 24       # (c, N): float64 scores, the selection mask, topk scratch
_TOPK_BYTES_PER_HIT = 72        # (c, R): indices, gathered scores, ranks, relevance, cumsums


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def map_at_radius(database_codes, database_labels, query_codes, query_labels, radius=2,
                  convention="deephash", device=None, memory_bytes=None):
    """MAP, precision and recall inside the Hamming ball of ``radius`` around each query (MAP@H<=r).

    The ball holds every database item whose sign code is within ``radius`` of the query's; it is
    ranked by the continuous inner product. Returns a dict of floats: ``map``, ``precision``,
    ``recall``, ``empty_fraction`` (share of queries whose ball is empty, the same under both
    conventions) and ``convention``.

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
    summary = _summarise_ball(_ball_stats(data, min(radius, data.K), _budget(memory_bytes)), convention)
    return {key: float(value[0]) for key, value in summary.items()} | {"convention": convention}


def map_at_topk(database_codes, database_labels, query_codes, query_labels, topk, use_sign=False,
                convention="hashnet", device=None, memory_bytes=None):
    """MAP over the top ``topk`` items of a linear scan (MAP@TopK); returns a float.

    The whole database is ranked by inner product with the query -- of the continuous codes, or of
    the sign codes when ``use_sign`` (HashNet's protocol) -- and the first R = ``topk`` items are
    scored (``topk`` None or -1: the whole database). ``convention="hashnet"`` leaves out queries
    with no relevant item in the top R; ``convention="mmhh"`` counts them as AP 0. A mean over no
    query is 0.0.
    """
    _check_choice("convention", convention, TOPK_CONVENTIONS)
    data = _prepare(database_codes, database_labels, query_codes, query_labels, device)
    top_r = _check_topk(topk, data.N)
    ap, n_rel, _ = _topk_stats(data, top_r, use_sign, _budget(memory_bytes), want_pn=False)
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
    summary = _summarise_ball(_ball_stats(data, data.K, _budget(memory_bytes), every_radius=True), convention)
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
    _, _, pn = _topk_stats(data, top_r, use_sign, _budget(memory_bytes), want_pn=True)
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
    ranked = _ball_stats(data, max(curve_radius, column), budget, every_radius=True)
    signs = _sign_scan(data, top_r, budget, want_pn=False)     # counts at every radius, sign top R
    counts = ranked if curve_radius == data.K else signs
    curve = {"n_ball": counts["n_ball"], "n_rel_ball": counts["n_rel_ball"],
             "n_rel_db": counts["n_rel_db"], "ap": ranked["ap"][:, :curve_radius + 1]}
    curve_deephash, curve_mmhh = _summarise_ball(curve, "deephash"), _summarise_ball(curve, "mmhh")
    # The figures at `radius` are the curves' column, so metrics.json can never disagree with itself.
    ball = {key: value[:, column:column + 1] if value.dim() == 2 else value for key, value in ranked.items()}
    deephash, mmhh = _summarise_ball(ball, "deephash"), _summarise_ball(ball, "mmhh")
    ap, n_rel, pn = _topk_stats(data, top_r, False, budget, want_pn=True)
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
# Input handling
# ----------------------------------------------------------------------------------------------

class _Data:
    """Validated inputs on the device, in the forms the routines need."""


def _prepare(database_codes, database_labels, query_codes, query_labels, device):
    hd = _as_matrix(database_codes, "database_codes")
    ld = _as_matrix(database_labels, "database_labels")
    hq = _as_matrix(query_codes, "query_codes")
    lq = _as_matrix(query_labels, "query_labels")
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

    data = _Data()
    data.device = _pick_device(device)
    data.N, data.K = hd.shape
    data.Q = hq.shape[0]
    dev = data.device
    data.hd = hd.to(dev, torch.float64)                          # (N, K)
    data.hq = hq.to(dev, torch.float64)                          # (Q, K)
    # sign(0) = +1. b_q . b_x is an integer of magnitude <= K: exact in float32 or bfloat16.
    signs = _sign_dtype(dev, data.K)
    data.bd = (data.hd >= 0).to(signs).mul_(2).sub_(1)          # (N, K)
    data.bq = (data.hq >= 0).to(signs).mul_(2).sub_(1)          # (Q, K)
    # Relevance through the distinct database label rows: a query is scored against U patterns
    # instead of N items (U = #classes for single-label data), and an item's relevance is a lookup.
    data.inv, data.lab_u, data.count_u = _unique_label_rows(ld.to(dev, torch.uint8))
    # Relevance only asks whether l_q . l_x > 0: a sum of 0/1 products is positive in any precision,
    # so the sign codes' fast dtype serves the labels too.
    data.lab_u, data.lq = data.lab_u.to(signs), lq.to(dev, signs)   # (U, C), (Q, C)
    return data


def _sign_dtype(device, bits):
    """bfloat16 for the +-1 codes where the CPU multiplies it natively (AVX512-BF16 or AMX), else
    float32. Their products are integers of magnitude <= K, exact in bfloat16 up to K = 256, and
    6x faster (100,000 x 227 x 64 bits: 3.6 ms against 21 ms on this project's 2-core machine)."""
    native = any(getattr(torch.cpu, check, lambda: False)()
                 for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if device.type == "cpu" and bits <= 256 and native and _BF16_SIGNS else torch.float32


_BF16_SIGNS = True              # tests turn it off to run the float32 path (the GPU's) on the CPU


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


def _pick_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def _batch_budget(budget, device):
    """Working memory of one batch of members or table cells: the budget, capped on the CPU."""
    return min(budget, _CPU_BATCH_BYTES) if device.type == "cpu" else budget


# On the CPU a temporary tensor beyond a few tens of MiB gets fresh pages from the system at every
# allocation, which costs more than the arithmetic on it; batches below this size reuse memory.
# Measured on 2 cores: the ball 1.3-1.7x faster than with 512 MiB batches, the radius tables 3x.
_CPU_BATCH_BYTES = 32 * 2**20


def _unique_label_rows(labels):
    """(inverse (N,), distinct rows (U, C) float32, their counts (U,) float64) of a 0/1 matrix."""
    n, c = labels.shape
    dev = labels.device
    # Pack each row into int64 words of 64 labels (a byte holds 8, as in pack_signs), then number
    # the distinct rows a word at a time with 1-D uniques (cheap sorts) of (row number so far, word
    # number), both below N: the pair fits an int64 below N^2. torch.unique(dim=0) on the rows is
    # several times slower.
    bits = torch.zeros(n, -(-c // 64) * 64, dtype=torch.uint8, device=dev)
    bits[:, :c] = labels
    shifts = torch.arange(8, dtype=torch.uint8, device=dev)
    words = (bits.view(n, -1, 8) << shifts).sum(2, dtype=torch.uint8).view(torch.int64)   # (N, words)
    inverse = None
    for word in words.unbind(1):
        _, number = torch.unique(word, return_inverse=True)
        inverse = number if inverse is None else torch.unique(inverse * n + number, return_inverse=True)[1]
    counts = torch.bincount(inverse)
    # Any member of a group represents its row (all members are equal).
    representative = torch.zeros(counts.numel(), dtype=torch.int64, device=labels.device)
    representative.scatter_(0, inverse, torch.arange(n, device=labels.device))
    return inverse, labels[representative].to(torch.float32), counts.to(torch.float64)


# ----------------------------------------------------------------------------------------------
# Per-query statistics (the routines' cores)
# ----------------------------------------------------------------------------------------------

def _relevance(data, queries):
    """Relevance of the (c,) ``queries`` to each distinct label row (c, U), and #relevant in the database."""
    rel_u = (data.lq[queries] @ data.lab_u.T) > 0              # (c, U)
    n_rel_db = (rel_u.to(torch.float64) @ data.count_u).round().to(torch.int64)   # (c,)
    return rel_u, n_rel_db


def _ball_stats(data, radius, budget, every_radius=False):
    """Per query: ball size, #relevant in the ball and AP, as (Q, W) CPU tensors ``n_ball``,
    ``n_rel_ball``, ``ap`` -- W = 1: the ball of ``radius`` (<= K); with ``every_radius``, W = radius + 1,
    a column per radius 0..radius -- and ``n_rel_db`` (Q,), #relevant in the database.

    Only the members of each query's ball of ``radius`` are ranked.
    """
    Q, W = data.Q, radius + 1 if every_radius else 1
    n_ball = torch.zeros(Q, W, dtype=torch.int64)
    n_rel_ball = torch.zeros(Q, W, dtype=torch.int64)
    ap = torch.zeros(Q, W, dtype=torch.float64)
    n_rel_db = torch.zeros(Q, dtype=torch.int64)

    members = (_ball_members_scan if _ball_method(data, radius) == "scan" else _ball_members_lookup)
    for queries, qi, xi, dist, score in members(data, radius, budget):
        # (M,) members of the (c,) queries, qi indexing them.
        c = queries.numel()
        rel_u, n_rel_here = _relevance(data, queries)
        rel = rel_u[qi, data.inv.index_select(0, xi)]           # (M,)
        order, qi = _rank_members(qi, score, xi, c)             # qi in rank order
        rel = rel.index_select(0, order)
        if every_radius:
            dist = dist.index_select(0, order)
            ap_c, n_rel_c = _radius_table_ap(qi, dist, rel, c, W)
            sizes = torch.bincount(qi * W + dist, minlength=c * W).view(c, W).cumsum(1)
        else:
            sizes = torch.bincount(qi, minlength=c)
            ap_c, n_rel_c = _ball_ap(qi, rel, sizes)
        queries = queries.cpu()
        ap[queries], n_rel_ball[queries] = ap_c.view(c, W).cpu(), n_rel_c.view(c, W).cpu()
        n_ball[queries], n_rel_db[queries] = sizes.view(c, W).cpu(), n_rel_here.cpu()
    return {"n_ball": n_ball, "n_rel_ball": n_rel_ball, "n_rel_db": n_rel_db, "ap": ap}


def _ball_method(data, radius):
    """How the ball members are found, whichever costs least:

    * "scan": b_q . b_x with every item (exact integer products), and the members' scores read off the
      float64 products h_q . h_x with every item (BLAS);
    * "lookup": the table of packed sign codes (hamming_index.CodeTable, K <= 64), the members' scores
      from a dense product of a few queries with the union of their balls: no Q x N work at all.

    The lookup's cost (rows checked) and the balls' mean size are measured on a sample of queries.
    """
    if _FORCE_BALL_METHOD is not None:
        return _FORCE_BALL_METHOD
    scan = data.N * (1 + _SCAN_COST)
    table = _code_table(data) if data.K <= MAX_TABLE_BITS else None
    if table is None or table.probes(radius) * _PROBE_COST >= scan:
        return "scan"
    sample = torch.linspace(0, data.Q - 1, min(data.Q, _SAMPLE_QUERIES), device=data.device).long()
    keys, step = pack_signs(data.bq[sample]), table.query_block(radius)
    checked = members = 0
    for start in range(0, keys.numel(), step):
        hits = table.within(keys[start:start + step], radius)
        checked += hits.candidates
        members += int(table.sizes(hits.row).sum())
    lookup = ((table.probes(radius) + checked / sample.numel()) * _PROBE_COST
              + members / sample.numel() * _MEMBER_COST)
    return "lookup" if lookup < scan else "scan"


_FORCE_BALL_METHOD = None       # tests set one of _ball_method's answers to check every path
_SAMPLE_QUERIES = 256           # queries probed to choose the method
# Costs per query in units of one item's float64 product h_q . h_x, measured on the CPU (K = 48-64):
# the sign product, mask and member extraction of a scanned item; a prefix read or a row checked in
# the table; a member found and scored by the lookup.
_SCAN_COST = 1.2
_PROBE_COST = 5
_MEMBER_COST = 8


def _ball_members_scan(data, radius, budget):
    """Ball members by scanning: b_q . b_x for every item (exact integers), a chunk of
    queries at a time; the members' scores are read off the chunk's float64 products h_q . h_x.
    Yields (queries (c,), query (M,) indexing them, item, distance, score), members by query."""
    N, K, dev = data.N, data.K, data.device
    chunks = _query_chunks(data, N * _SCAN_BYTES_PER_PAIR, budget)   # the members go in smaller batches
    agree, scores = _product_buffer(data, chunks, data.bd.dtype), _product_buffer(data, chunks, torch.float64)
    for start, stop in chunks:
        c = stop - start
        products = torch.matmul(data.bq[start:stop], data.bd.T, out=agree[:c])     # (c, N)
        flat = positions(products >= K - 2 * radius)           # d <= r, in (query, index) order
        dist = ((K - products.view(-1).index_select(0, flat)) / 2).to(torch.int64)
        score = torch.matmul(data.hq[start:stop], data.hd.T, out=scores[:c]).view(-1).index_select(0, flat)
        qi = torch.div(flat, N, rounding_mode="floor")
        sizes = torch.bincount(qi, minlength=c).cpu()
        offsets = [0] + sizes.cumsum(0).tolist()
        for a, b in _chunks_by_cost(sizes * _BYTES_PER_MEMBER, _batch_budget(budget, dev)):
            lo, hi = offsets[a], offsets[b]
            queries = torch.arange(start + a, start + b, device=dev)
            yield queries, qi[lo:hi] - a, flat[lo:hi] - qi[lo:hi] * N, dist[lo:hi], score[lo:hi]


def _ball_members_lookup(data, radius, budget):
    """Ball members by table lookup (hamming_index.CodeTable, K <= 64): each query reads the buckets
    of the prefixes within ``radius`` of its code's and keeps the codes within ``radius``,
    O(#prefixes + #codes checked + #members) instead of O(N * K). The queries go in the order of their
    codes, a few at a time scored by one dense product (CodeTable.scored_items): neighbours in that
    order share most of their balls. Yields as _ball_members_scan does, batches of about the working
    memory: several blocks of queries, or part of one with large balls.
    """
    table = _code_table(data)
    batch = _batch_budget(budget, data.device)
    step = min(table.query_block(radius), _DENSE_QUERIES)
    keys, queries = torch.sort(pack_signs(data.bq))            # (Q,) queries in key order
    pending, cost = [], 0
    for first in range(0, queries.numel(), step):
        block = queries[first:first + step]
        hits = table.within(keys[first:first + step], radius)  # (H,) codes found, by query
        members = torch.zeros(block.numel(), dtype=torch.int64, device=data.device)
        members.index_add_(0, hits.query, table.sizes(hits.row))   # (c,) ball sizes
        bounds = [0] + torch.bincount(hits.query, minlength=block.numel()).cumsum(0).tolist()
        for a, b in _chunks_by_cost(members.cpu() * _BYTES_PER_MEMBER, batch):
            part = hits._replace(query=hits.query[bounds[a]:bounds[b]] - a, row=hits.row[bounds[a]:bounds[b]],
                                 distance=hits.distance[bounds[a]:bounds[b]])
            pending.append((block[a:b], table.scored_items(part, data.hq[block[a:b]], data.hd)))
            cost += pending[-1][1][0].numel() * _BYTES_PER_MEMBER
            if cost >= batch:                                   # rank several blocks' members at once
                yield _merge_blocks(pending)
                pending, cost = [], 0
    if pending:
        yield _merge_blocks(pending)


_DENSE_QUERIES = 32             # queries scored by one dense product (1.2-5 entries a member)


def _merge_blocks(blocks):
    """One batch (queries, query, item, distance, score) from blocks of queries and their members."""
    queries, columns, seen = [], [], 0
    for block, (qi, xi, dist, score) in blocks:
        queries.append(block)
        columns.append((qi + seen, xi, dist, score))
        seen += block.numel()
    return (torch.cat(queries), *(torch.cat(column) for column in zip(*columns)))


def _code_table(data):
    """The table of the database's sign codes, built once per input and kept on ``data``."""
    if getattr(data, "code_table", None) is None:
        data.code_table = CodeTable(pack_signs(data.bd), data.K)
    return data.code_table


def _ball_ap(group, rel, sizes):
    """AP and #relevant of each query from its ball's members (M,) in rank order, grouped by query;
    sizes (c,): each query's number of members."""
    dev, c = group.device, sizes.numel()
    where = positions(rel)                                      # (T,) positions of the relevant members
    q = group.index_select(0, where)
    n_rel = torch.bincount(q, minlength=c)                      # (c,)
    start = sizes.cumsum(0) - sizes                             # (c,) each query's first position
    found_before = n_rel.cumsum(0) - n_rel
    rank = where - start.index_select(0, q) + 1                 # rank in the ball
    # Relevant members ranked at or before each relevant member.
    found = torch.arange(1, q.numel() + 1, device=dev) - found_before.index_select(0, q)
    terms = found.to(torch.float64) / rank                      # P@rank at each relevant member
    num = torch.segment_reduce(terms, "sum", lengths=n_rel)     # q is sorted: sums of runs
    return torch.where(n_rel > 0, num / n_rel.clamp(min=1), 0.0), n_rel


def _radius_table_ap(group, dist, rel, c, K1):
    """AP and #relevant within every radius 0..K1-1 of ranked members: (c, K1) each.

    group, dist, rel: (M,) ball members in rank order, each query's members contiguous and the c
    queries in order; dist < K1. For the j-th relevant member of a query and radius r, the AP term
    is A/M with A = #relevant and M = #members ranked at or before it within distance r. Both are
    running counts over the ranking, summed over distance; the tables are laid out (radius,
    relevant member) so that every running sum is along contiguous memory: O(M + #relevant * K1)
    instead of O(M * K1). The running counts are held in float64, exact below 2^53.
    """
    dev, f64 = group.device, torch.float64
    where = positions(rel)
    q_of_rel, d_rel = group.index_select(0, where), dist.index_select(0, where)   # (T,) relevant, by query
    T = q_of_rel.numel()
    n_rel_ball = torch.bincount(q_of_rel * K1 + d_rel, minlength=c * K1).view(c, K1).cumsum(1)
    if T == 0:
        return torch.zeros(c, K1, dtype=f64, device=dev), n_rel_ball
    end = torch.bincount(q_of_rel, minlength=c).cumsum(0)       # (c,) one past each query's last column
    first = end - n_rel_ball[:, -1]                             # (c,) column of its first relevant member

    # M. Each member ranked before its query's last relevant member is counted in the column of the
    # next relevant member at or after it (its segment) and the row of its distance; the others go to
    # a spare cell. A running sum across the columns (over the ranking) then counts the members
    # ranked at or before each relevant member, and one down the rows (over distance) those within
    # each radius.
    rel_i = rel.to(torch.int64)
    column = rel_i.cumsum(0) - rel_i                            # (M,) relevant members ranked before, all queries
    counted = column < end.index_select(0, group)
    spare = K1 * T
    cells = torch.where(counted, dist * T + column, spare)
    m = torch.bincount(cells, minlength=spare + 1)[:-1].view(K1, T).to(f64)   # unweighted: 6x faster
    del cells
    counted_by_dist = torch.bincount(torch.where(counted, group * K1 + dist, c * K1),
                                     minlength=c * K1 + 1)[:-1].view(c, K1)
    # The running sums cross from one query to the next; each query's first column takes back
    # what the previous query counted, so the sums restart at every query.
    next_first = first[1:]
    has_next = next_first < T
    m.index_add_(1, next_first[has_next], -counted_by_dist[:-1][has_next].T.to(f64))
    m.cumsum_(1)
    m.cumsum_(0)                                                # (K1, T) M

    # A: relevant members ranked at or before, within radius; restarted per query the same way.
    within = (d_rel <= torch.arange(K1, device=dev)[:, None]).to(f64)   # (K1, T) member j in ball r
    terms = within.clone()
    terms.index_add_(1, next_first[has_next], -n_rel_ball[:-1][has_next].T.to(f64))
    terms.cumsum_(1)                                            # (K1, T) A
    terms.mul_(within).div_(m.clamp_(min=1))                    # P@k * rel_k
    # Sums of runs along the rows' contiguous memory: 6x faster than down the columns of terms.T.
    num = torch.segment_reduce(terms, "sum", lengths=n_rel_ball[:, -1].expand(K1, c).contiguous(), axis=1).T
    ap = torch.where(n_rel_ball > 0, num / n_rel_ball.clamp(min=1), 0.0)
    return ap, n_rel_ball


def _sign_scan(data, top_r, budget, want_pn):
    """One scan of the sign codes: per query, the counts at every radius -- ``n_ball``,
    ``n_rel_ball`` (Q, K + 1), ``n_rel_db`` (Q,) -- and ``topk``: _topk_stats's (AP, #relevant,
    precision@N) of the top R by sign inner product b_q . b_x = K - 2d, ties by index.

    Each query's histogram over (distance d, relevance) gives the distance d* at which its top R
    ends; the items within d*, ranked by (d, index) with one stable sort of small keys, start with
    the top R: no selection over the whole database. The blocks are laid out (database item,
    query): an item's relevance to the chunk's queries is then a copy of one row of the (label row,
    query) table, several times faster than a gather per query.
    """
    Q, N, K, dev = data.Q, data.N, data.K, data.device
    K1 = K + 1
    n_at = torch.zeros(Q, K1, 2, dtype=torch.int64)
    n_rel_db = torch.zeros(Q, dtype=torch.int64)
    ap = torch.zeros(Q, dtype=torch.float64)
    n_rel = torch.zeros(Q, dtype=torch.int64)
    found = torch.zeros(top_r, dtype=torch.int64, device=dev)      # relevant items at each rank, all queries
    chunks = _query_chunks(data, N * _SIGN_BYTES_PER_PAIR + top_r * _TOPK_BYTES_PER_HIT, budget)
    products = _product_buffer(data, chunks, data.bd.dtype)
    rel, cells = _product_buffer(data, chunks, torch.int32), _product_buffer(data, chunks, torch.int32)
    for start, stop in chunks:
        c = stop - start
        rel_u, n_rel_here = _relevance(data, slice(start, stop))
        n_rel_db[start:stop] = n_rel_here.cpu()
        agree = torch.matmul(data.bd, data.bq[start:stop].T, out=products[:c].view(N, c))   # (N, c)
        rel_c = torch.index_select(rel_u.to(torch.int32).T.contiguous(), 0, data.inv, out=rel[:c].view(N, c))
        # Histogram cell of (query, distance d, relevance): K - b_q . b_x + rel = 2d + rel, offset by
        # the query.
        offset = torch.arange(K, K + c * 2 * K1, 2 * K1, device=dev, dtype=torch.int32)
        cell = cells[:c].view(N, c).copy_(agree)
        torch.sub(offset, cell, out=cell).add_(rel_c)
        counts = torch.bincount(cell.flatten(), minlength=c * 2 * K1).view(c, K1, 2)
        n_at[start:stop] = counts.cpu()

        # The top R: the first R of the items within d*, ranked by (d, index). A histogram cell
        # holds all three: cell // 2 = (query, d), cell % 2 = relevance.
        within = counts.sum(2).cumsum(1)                        # (c, K1) items within each radius
        d_star = (within < top_r).sum(1)                        # (c,) first radius holding R items
        last = (offset - K + 2 * d_star + 1).to(torch.int32)    # (c,) the largest cell within d*
        near = positions(cell <= last)                         # (index, query) order
        near_cells = cell.view(-1).index_select(0, near)
        order = torch.sort(near_cells >> 1, stable=True).indices   # (query, d, index)
        candidates = within.gather(1, d_star[:, None]).flatten()   # (c,) items within d*
        first = candidates.cumsum(0) - candidates
        top = order.index_select(0, (first[:, None] + torch.arange(top_r, device=dev)).view(-1))   # (c R,)
        top_rel = (near_cells.index_select(0, top) & 1).view(c, top_r) > 0   # (c, R) relevance in rank order
        ap_c, n_c, found_at = _ranked_ap(top_rel)
        ap[start:stop], n_rel[start:stop] = ap_c.cpu(), n_c.cpu()
        if want_pn:
            found += found_at
    n_at = n_at.cumsum(1)                                       # within each radius
    pn = _precision_at_n(found, Q) if want_pn else None
    return {"n_ball": n_at.sum(2), "n_rel_ball": n_at[:, :, 1], "n_rel_db": n_rel_db,
            "topk": (ap, n_rel, pn)}


def _topk_stats(data, top_r, use_sign, budget, want_pn):
    """Per query AP over the top R and #relevant in it; mean precision@N for N = 1..R if asked."""
    if use_sign:
        return _sign_scan(data, top_r, budget, want_pn)["topk"]
    Q, N = data.Q, data.N
    ap = torch.zeros(Q, dtype=torch.float64)
    n_rel = torch.zeros(Q, dtype=torch.int64)
    found = torch.zeros(top_r, dtype=torch.int64, device=data.device)   # relevant items at each rank, all queries
    numpy_select = data.device.type == "cpu" and _NUMPY_SELECT_ON_CPU
    per_pair = _PRODUCT_BYTES_PER_PAIR if numpy_select else _TOPK_BYTES_PER_PAIR   # numpy works a row at a time
    chunks = _query_chunks(data, N * per_pair + top_r * _TOPK_BYTES_PER_HIT, budget)
    buffer = _product_buffer(data, chunks, torch.float64)
    columns = _locality_order(data) if numpy_select else None
    hd, inv = (data.hd, data.inv) if columns is None else (data.hd[columns], data.inv[columns])
    for start, stop in chunks:
        scores = torch.matmul(data.hq[start:stop], hd.T, out=buffer[:stop - start])   # (c, N)
        rel_u, _ = _relevance(data, slice(start, stop))
        if numpy_select:
            rel = _top_relevance_numpy(scores, top_r, rel_u, inv, columns)   # (c, R)
        else:
            rel = rel_u.gather(1, inv[_rank_top(scores, top_r)])
        ap_c, n_c, found_at = _ranked_ap(rel)
        ap[start:stop], n_rel[start:stop] = ap_c.cpu(), n_c.cpu()
        if want_pn:
            found += found_at
    pn = _precision_at_n(found, Q) if want_pn else None
    return ap, n_rel, pn


def _query_chunks(data, bytes_per_query, budget):
    """Consecutive [start, stop) query ranges within budget; on the CPU at most _CPU_CHUNK_QUERIES.

    BLAS re-packs the database at every product, so chunks need enough queries to amortise it;
    beyond that, larger blocks only cost fresh pages (1,024 queries x 69,000 items x 48 bits, one
    core: 0.13 s into a reused block, 0.32 s into a fresh one; 256 queries at a time: 0.13 s and
    0.18 s; 32: 0.19 s).
    """
    rows = max(1, budget // bytes_per_query)
    if data.device.type == "cpu":
        rows = min(rows, _CPU_CHUNK_QUERIES)
    return [(start, min(start + rows, data.Q)) for start in range(0, data.Q, rows)]


_CPU_CHUNK_QUERIES = 256


def _product_buffer(data, chunks, dtype):
    """A (largest chunk, N) block that each chunk's query x database products are written into.

    On the CPU, fresh pages for a new block cost more than the product itself (333 x 50,000 x 48:
    0.11 s into a new tensor, 0.04 s into a reused one).
    """
    rows = max(stop - start for start, stop in chunks)
    return torch.empty(rows, data.N, dtype=dtype, device=data.device)


def _precision_at_n(found, queries):
    """Mean precision@N for N = 1..R, from the relevant items at each rank summed over queries."""
    ranks = torch.arange(1, found.numel() + 1, device=found.device, dtype=torch.float64)
    return (found.cumsum(0) / ranks / queries).cpu()


def _ranked_ap(rel):
    """AP and #relevant of each row of a ranked (c, R) relevance matrix, and the #relevant at each
    rank summed over the rows (R,)."""
    hits = rel.cumsum(1, dtype=torch.float64)                   # (c, R) #relevant in the top n
    n = hits[:, -1].to(torch.int64)
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
    terms = hits.mul_(rel).div_(ranks)                          # P@n * rel_n
    return terms.sum(1) / n.clamp(min=1), n, rel.sum(0)         # AP 0 where n = 0: every term is 0


# ----------------------------------------------------------------------------------------------
# Selection and ranking helpers
# ----------------------------------------------------------------------------------------------

def _locality_order(data):
    """Database indices ordered by packed sign code (the code table's order; K <= 64), else None.

    Items with similar codes score alike, so in this order a query's best items form runs instead
    of being scattered: numpy's nonzero, which branches per item, finds them 4x faster (demo codes).
    BLAS may round a product against the reordered database differently in the last place (c50k:
    0.005% of pairs, demo: none): for inexact real codes that decides near-ties at the 1e-16 level,
    as the module docstring says; exact products are the same numbers.
    """
    return _code_table(data).order.to(torch.int64) if data.K <= MAX_TABLE_BITS else None


def _rank_top(scores, top_r):
    """(c, R) indices of each row's R best scores, ordered by (-score, index).

    Selection (topk) orders equal scores arbitrarily and picks an arbitrary subset of the items
    tied at the R-th score. Rows whose sorted top R+1 hold no two equal scores are exact as they
    are (comparisons treat -0.0 and +0.0 as equal, so a split pair shows up as a tie); the others
    (rare for continuous codes) are redone by comparisons: the items above the R-th score plus the
    lowest-indexed items equal to it, then a stable sort of them in index order.
    """
    n = scores.shape[1]
    values, top = torch.topk(scores, min(top_r + 1, n), dim=1, sorted=True)   # (c, R+1), or (c, N)
    tied = (values[:, 1:] == values[:, :-1]).any(1).nonzero().flatten()
    top = top[:, :top_r]
    if tied.numel():
        sub, cut = scores[tied], values[tied, top_r - 1, None]  # R-th best score of each tied row
        above, equal = sub > cut, sub == cut
        need = top_r - above.sum(1, keepdim=True)
        chosen = above | (equal & (equal.cumsum(1) <= need))
        picked = chosen.nonzero()[:, 1].view(-1, top_r)         # ascending database index
        picked_scores = sub.gather(1, picked) + 0.0
        order = torch.sort(picked_scores, dim=1, descending=True, stable=True).indices
        top[tied] = picked.gather(1, order)
    return top


def _top_relevance_numpy(scores, top_r, rel_u, inv, columns=None):
    """(c, R) relevance of each row's R best items in rank order (-score, index), on the CPU, row
    by row in numpy (several times faster than torch.topk, and the row stays in cache): a superset
    of the top R (_top_candidates), ranked by _ranked_relevance. Column j of ``scores`` is database
    item ``columns[j]`` (None: item j) and has label row inv[j]; rel_u (c, U) is each row's
    relevance to the label rows. numpy releases the GIL in its loops: row blocks go to torch's
    threads."""
    array, item_rel, inv = scores.numpy(), rel_u.numpy(), inv.numpy()
    index = None if columns is None else columns.numpy()
    relevance = np.zeros((array.shape[0], top_r), dtype=bool)

    def rank_rows(lo, hi):
        for i in range(lo, hi):
            row = array[i]
            candidates = _top_candidates(row, top_r)
            relevance[i] = _ranked_relevance(row[candidates], item_rel[i][inv[candidates]], top_r,
                                             lambda: candidates if index is None else index[candidates])

    _in_threads(rank_rows, array.shape[0])
    return torch.from_numpy(relevance)


def _ranked_relevance(values, rel, top_r, index):
    """Relevance of the R best of float64 ``values`` in rank order (-value, index); ``rel`` holds
    each value's relevance, and ``index()`` returns their database indices (asked only for ties).

    One sort of int64 keys -- the float's decreasing order as an integer, its last bit replaced by
    the relevance: an integer sort, faster than numpy's argsort of floats, and the sorted keys hold
    the answer, with no gather. It is exact when no two of the R + 1 first keys share their other 63 bits (no
    equal scores, -0.0 and +0.0 included, and none 1 unit in the last place apart); other rows are
    ranked by comparisons of (-value, index).
    """
    keys = (values + 0.0).view(np.int64)                       # + 0.0 turns -0.0 into +0.0
    keys ^= (keys >> 63) & 0x7FFF_FFFF_FFFF_FFFF              # flip negative floats' magnitude bits
    np.invert(keys, out=keys)                                   # ascending keys: decreasing values
    keys &= -2
    keys |= rel
    keys.sort()
    best = keys[:top_r + 1] >> 1
    if np.all(best[1:] != best[:-1]):
        return (keys[:top_r] & 1).astype(bool)
    return rel[np.lexsort((index(), -values))[:top_r]]


def _top_candidates(row, top_r):
    """Ascending indices of the items scoring at least the R-th best score -- every item of the top
    R and every item tied with its last -- and possibly a few more.

    The threshold is first a quantile of a strided sample, set so that about R plus 4 standard
    deviations items reach it: one pass over the row instead of a selection over all of it.
    Should fewer than R reach it, the R-th best score is selected exactly.
    """
    n = row.size
    if top_r >= n:
        return np.arange(n)
    sample = row[::_SAMPLE_STEP]
    expected = top_r / _SAMPLE_STEP
    k = math.ceil(expected + 4 * math.sqrt(expected))         # sample items at or above the guess
    if k < sample.size:
        guess = np.partition(sample, sample.size - k)[sample.size - k]
        candidates = np.flatnonzero(row >= guess)
        if candidates.size >= top_r:                            # then the R-th best score >= guess
            return candidates
    return np.flatnonzero(row >= np.partition(row, n - top_r)[n - top_r])


_SAMPLE_STEP = 16


def _in_threads(work, rows):
    """work(lo, hi) on blocks of rows [0, rows), one per torch thread (numpy releases the GIL)."""
    workers = max(1, min(torch.get_num_threads(), rows))
    bounds = [rows * i // workers for i in range(workers + 1)]
    if workers == 1:
        work(0, rows)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(work, lo, hi) for lo, hi in zip(bounds, bounds[1:])]:
            done.result()


_NUMPY_SELECT_ON_CPU = True     # tests turn it off to run the torch.topk path (the GPU's) on the CPU


# ----------------------------------------------------------------------------------------------
# Aggregation
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


def _chunks_by_cost(costs, budget):
    """Consecutive [start, stop) ranges whose summed cost stays within budget (at least one item)."""
    costs = costs.tolist()
    ranges, start, total = [], 0, 0
    for i, cost in enumerate(costs):
        if i > start and total + cost > budget:
            ranges.append((start, i))
            start, total = i, 0
        total += cost
    if start < len(costs):
        ranges.append((start, len(costs)))
    return ranges
