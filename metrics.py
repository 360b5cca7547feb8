"""Retrieval metrics for binary hashing codes (SPEC section 6).

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
"""
import concurrent.futures
import itertools
import math

import numpy as np
import torch

RADIUS_CONVENTIONS = ("deephash", "mmhh")
TOPK_CONVENTIONS = ("hashnet", "mmhh")
DEFAULT_MEMORY_BYTES = 512 * 2**20

# Rough bytes of working memory per element, used only to size chunks.
_BALL_BYTES_PER_PAIR = 24       # (c, N): float32 sign products, ball mask, nonzero output if dense
_BYTES_PER_MEMBER = 112         # per ball member: indices, scores, two sort permutations, cumsums
_TOPK_BYTES_PER_PAIR = 24       # (c, N): float64 scores, the selection mask, topk scratch
_TOPK_BYTES_PER_HIT = 72        # (c, R): indices, gathered scores, ranks, relevance, cumsums
_CURVE_BYTES_PER_PAIR = 88      # (c, N): scores, sort output, distances, relevance, table cells
_CURVE_BYTES_PER_CELL = 56      # (relevant item, radius) table cells: counts, cumsums, AP terms


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
    stats = _ball_stats(data, radius, _budget(memory_bytes))
    summary = _summarise_ball(stats, convention)
    return {key: float(value) for key, value in summary.items()} | {"convention": convention}


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
    precision-recall curve over Hamming radius is the (recall, precision) pairs. Cost: one full
    ranking of the database per query plus O(#relevant items x K) counting per query.
    """
    _check_choice("convention", convention, RADIUS_CONVENTIONS)
    data = _prepare(database_codes, database_labels, query_codes, query_labels, device)
    stats, _ = _curve_stats(data, _budget(memory_bytes))
    summary = _summarise_ball(stats, convention)
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
                       topk=None, device=None, memory_bytes=None):
    """Every retrieval figure of the project in one JSON-serialisable dict (saved as metrics.json).

    Keys: ``map_radius_deephash``, ``map_radius_mmhh``, ``precision_radius`` / ``recall_radius``
    (deephash convention), ``precision_radius_mmhh`` / ``recall_radius_mmhh``,
    ``empty_ball_fraction``, ``map_topk`` (continuous codes, hashnet convention), ``map_topk_mmhh``
    (continuous, mmhh convention), ``map_topk_sign`` (sign codes, hashnet convention), ``radius``,
    ``topk`` (the R used: N for the whole database), ``num_queries``, ``num_database``, ``hash_bit``,
    ``conventions`` (a sentence per figure) and ``curves``: ``radius`` [0..K], ``precision``,
    ``recall``, ``map`` (deephash), ``map_mmhh``, ``empty_fraction`` per radius, and
    ``precision_at_n`` (N = 1..R, continuous codes).
    """
    radius = _check_radius(radius)
    data = _prepare(database_codes, database_labels, query_codes, query_labels, device)
    top_r = _check_topk(topk, data.N)
    budget = _budget(memory_bytes)

    # One full ranking per query serves the curves and the continuous top R.
    curve, (ap, n_rel, pn) = _curve_stats(data, budget, top_r)
    curve_deephash, curve_mmhh = _summarise_ball(curve, "deephash"), _summarise_ball(curve, "mmhh")
    # The figures at `radius` are the curves' column (a radius above K is a ball of the whole
    # database, column K), so metrics.json can never disagree with itself.
    column = min(radius, data.K)
    ball = {key: value[:, column] if value.dim() == 2 else value for key, value in curve.items()}
    deephash, mmhh = _summarise_ball(ball, "deephash"), _summarise_ball(ball, "mmhh")
    ap_sign, n_rel_sign, _ = _topk_stats(data, top_r, True, budget, want_pn=False)

    def floats(values):
        return [float(v) for v in values]

    return {
        "map_radius_deephash": float(deephash["map"]),
        "map_radius_mmhh": float(mmhh["map"]),
        "precision_radius": float(deephash["precision"]),
        "recall_radius": float(deephash["recall"]),
        "precision_radius_mmhh": float(mmhh["precision"]),
        "recall_radius_mmhh": float(mmhh["recall"]),
        "empty_ball_fraction": float(deephash["empty_fraction"]),
        "map_topk": _masked_mean(ap, n_rel > 0),
        "map_topk_mmhh": _masked_mean(ap, None),
        "map_topk_sign": _masked_mean(ap_sign, n_rel_sign > 0),
        "radius": radius,
        "topk": top_r,
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
    # sign(0) = +1. +-1 in float32 keeps b_q . b_x exact (integers) and the products fast.
    data.bd = torch.where(data.hd >= 0, 1.0, -1.0).to(torch.float32)   # (N, K)
    data.bq = torch.where(data.hq >= 0, 1.0, -1.0).to(torch.float32)   # (Q, K)
    # Relevance through the distinct database label rows: a query is scored against U patterns
    # instead of N items (U = #classes for single-label data), and an item's relevance is a lookup.
    data.inv, data.lab_u, data.count_u = _unique_label_rows(ld.to(dev, torch.uint8))
    data.lq = lq.to(dev, torch.float32)                          # (Q, C)
    return data


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
    # Pack each row into int64 words (62 labels per word, exact) so that unique is a cheap 1-D sort
    # for up to 62 labels; torch.unique(dim=0) on the raw rows is several times slower.
    words = []
    for start in range(0, c, 62):
        block = labels[:, start:start + 62].to(torch.int64)
        weights = torch.pow(2, torch.arange(block.shape[1], device=labels.device, dtype=torch.int64))
        words.append((block * weights).sum(1))
    if len(words) == 1:
        _, inverse, counts = torch.unique(words[0], return_inverse=True, return_counts=True)
    else:
        _, inverse, counts = torch.unique(torch.stack(words, 1), dim=0, return_inverse=True,
                                          return_counts=True)
    # Any member of a group represents its row (all members are equal).
    representative = torch.zeros(counts.numel(), dtype=torch.int64, device=labels.device)
    representative.scatter_(0, inverse, torch.arange(n, device=labels.device))
    return inverse, labels[representative].to(torch.float32), counts.to(torch.float64)


# ----------------------------------------------------------------------------------------------
# Per-query statistics (the routines' cores)
# ----------------------------------------------------------------------------------------------

def _relevance(data, start, stop):
    """Relevance of queries [start, stop) to each distinct label row, and #relevant in the database."""
    rel_u = (data.lq[start:stop] @ data.lab_u.T) > 0          # (c, U) exact: 0/1 sums in float32
    n_rel_db = (rel_u.to(torch.float64) @ data.count_u).round().to(torch.int64)   # (c,)
    return rel_u, n_rel_db


def _ball_stats(data, radius, budget):
    """Per query (CPU tensors): ball size, #relevant in ball, #relevant in database, AP in the ball."""
    Q = data.Q
    n_ball = torch.zeros(Q, dtype=torch.int64)
    n_rel_ball = torch.zeros(Q, dtype=torch.int64)
    n_rel_db = torch.zeros(Q, dtype=torch.int64)
    ap = torch.zeros(Q, dtype=torch.float64)
    budget = _batch_budget(budget, data.device)
    members = _ball_members_lookup if _ball_method(data, radius) == "lookup" else _ball_members_matmul
    for start, stop, qi, xi in members(data, radius, budget):
        # qi, xi: (M,) members of queries [start, stop) in (query, database index) order.
        c = stop - start
        sizes = torch.bincount(qi, minlength=c)                 # (c,)
        rel_u, n_rel_here = _relevance(data, start, stop)
        score = _pair_scores(data.hq[start:stop], data.hd, qi, xi, budget)
        order = _rank_within_groups(qi, score)                  # only the members get ranked
        rel = rel_u[qi[order], data.inv[xi[order]]]             # (M,) relevance in rank order
        ap_part, n_rel_part = _segment_ap(qi[order], rel, sizes)
        ap[start:stop] = ap_part.cpu()
        n_rel_ball[start:stop] = n_rel_part.cpu()
        n_rel_db[start:stop] = n_rel_here.cpu()
        n_ball[start:stop] = sizes.cpu()
    return {"n_ball": n_ball, "n_rel_ball": n_rel_ball, "n_rel_db": n_rel_db, "ap": ap}


def _ball_method(data, radius):
    """'lookup' (hash probes) when the ball has few codes compared with the database, else 'matmul'."""
    if _FORCE_BALL_METHOD is not None:
        return _FORCE_BALL_METHOD
    if data.K > 64:
        return "matmul"
    probes = sum(math.comb(data.K, i) for i in range(min(radius, data.K) + 1))
    return "lookup" if probes * _LOOKUP_PROBES_PER_ITEM <= data.N else "matmul"


_FORCE_BALL_METHOD = None       # tests set "lookup" or "matmul" to check both paths on small inputs
_LOOKUP_PROBES_PER_ITEM = 8     # a probe (binary search) costs about as much as 1/8 of a scanned item
_BYTES_PER_PROBE = 48           # (c, P): probe keys, search positions, hit flags and counts


def _ball_members_matmul(data, radius, budget):
    """Ball members by scanning: b_q . b_x for every item (exact integers), a chunk of queries at a time."""
    Q, N, K = data.Q, data.N, data.K
    threshold = K - 2 * radius                                  # d <= r  <=>  b_q . b_x >= K - 2r
    for start, stop in _chunks_by_cost(torch.full((Q,), N * _BALL_BYTES_PER_PAIR), budget):
        inball = (data.bq[start:stop] @ data.bd.T) >= threshold  # (c, N)
        qi, xi = inball.nonzero(as_tuple=True)                  # (M,) row-major: (query, index) order
        del inball
        yield from _member_batches(start, stop, qi, xi, budget)


def _ball_members_lookup(data, radius, budget):
    """Ball members by hash lookup: probe every code within ``radius`` of the query's (K <= 64).

    Sign codes are packed into int64 keys; the database's distinct keys are sorted once, and each of
    the sum_{i<=r} C(K, i) probes (query key XOR a mask of at most r bits) is a binary search. Cost
    O(Q * #probes * log N + #members) instead of O(Q * N * K).
    """
    dev = data.device
    db_keys = _pack_signs(data.bd)                              # (N,)
    sorted_keys, by_key = torch.sort(db_keys, stable=True)      # equal keys keep index order
    keys, counts = torch.unique_consecutive(sorted_keys, return_counts=True)   # (U,)
    firsts = counts.cumsum(0) - counts                          # (U,) offset of each key's items
    masks = _flip_masks(data.K, radius, dev)                    # (P,)
    q_keys = _pack_signs(data.bq)                               # (Q,)
    per_query = torch.full((data.Q,), masks.numel() * _BYTES_PER_PROBE)
    for start, stop in _chunks_by_cost(per_query, budget):
        probes = q_keys[start:stop, None] ^ masks               # (c, P) distinct per query
        slot = torch.searchsorted(keys, probes).clamp_(max=keys.numel() - 1)
        hit = keys[slot] == probes                              # (c, P)
        del probes
        sizes = torch.where(hit, counts[slot], 0).sum(1).cpu()  # (c,) ball sizes, before expanding
        for a, b in _chunks_by_cost(sizes * _BYTES_PER_MEMBER, budget):
            qh, ph = hit[a:b].nonzero(as_tuple=True)            # (H,) probes that hit, by query
            found = slot[a:b][qh, ph]
            n = counts[found]                                   # items behind each hit
            qi = torch.repeat_interleave(qh, n)                 # (M,)
            first_member = n.cumsum(0) - n
            rank = torch.arange(qi.numel(), device=dev) - torch.repeat_interleave(first_member, n)
            xi = by_key[torch.repeat_interleave(firsts[found], n) + rank]
            order = torch.sort(_sort_key(qi * data.N + xi)).indices   # (query, index) order, as a scan gives
            yield start + a, start + b, qi[order], xi[order]


def _member_batches(start, stop, qi, xi, budget):
    """Split the members of queries [start, stop) into sub-batches of whole queries within budget."""
    sizes = torch.bincount(qi, minlength=stop - start).cpu()
    offsets = [0] + sizes.cumsum(0).tolist()
    for a, b in _chunks_by_cost(sizes * _BYTES_PER_MEMBER, budget):
        lo, hi = offsets[a], offsets[b]
        yield start + a, start + b, qi[lo:hi] - a, xi[lo:hi]


def _pack_signs(signs):
    """(n,) int64 keys of (n, K <= 64) +-1 codes: bit k set where code k is +1 (bit 63 is the sign bit)."""
    k = signs.shape[1]
    weights = torch.tensor(_bit_values(k), dtype=torch.int64, device=signs.device)
    return ((signs > 0).to(torch.int64) * weights).sum(1)      # distinct powers: the sum is an OR


def _bit_values(k):
    """int64 value of each bit 0..k-1 (two's complement for bit 63)."""
    return [(1 << i) - (1 << 64 if i == 63 else 0) for i in range(k)]


def _flip_masks(k, radius, device):
    """(P,) int64 XOR masks with at most ``radius`` of the k bits set, P = sum_{i<=r} C(k, i)."""
    bits = _bit_values(k)
    masks = [0]
    for size in range(1, min(radius, k) + 1):
        masks.extend(sum(combo) for combo in itertools.combinations(bits, size))
    return torch.tensor(masks, dtype=torch.int64, device=device)


def _topk_stats(data, top_r, use_sign, budget, want_pn):
    """Per query AP over the top R and #relevant in it; mean precision@N for N = 1..R if asked."""
    Q, N, K = data.Q, data.N, data.K
    ap = torch.zeros(Q, dtype=torch.float64)
    n_rel = torch.zeros(Q, dtype=torch.int64)
    hits_at = torch.zeros(top_r, dtype=torch.int64, device=data.device)   # sum over queries of #rel in top n
    positions = torch.arange(1, top_r + 1, device=data.device, dtype=torch.float64)
    cost = torch.full((Q,), N * _TOPK_BYTES_PER_PAIR + top_r * _TOPK_BYTES_PER_HIT)
    if use_sign:
        # Integer scores b_q . b_x in [-K, K]: the key (score + K) * N + (N - 1 - index) is distinct
        # and orders by (-score, index) exactly (below 2^53, so exact in float64 too).
        tie_break = torch.arange(N - 1, -1, -1, device=data.device, dtype=torch.float64)
        sign_db = data.bd.to(torch.float64)                     # (N, K): products straight into float64
    chunks = _chunks_by_cost(cost, budget)
    buffer = _product_buffer(data, chunks)
    for start, stop in chunks:
        out = buffer[:stop - start]
        if use_sign:
            keys = torch.matmul(data.bq[start:stop].to(torch.float64), sign_db.T, out=out)
            top = _top_sorted(keys.add_(K).mul_(N).add_(tie_break), top_r)[1]   # (c, R) keys are distinct: exact
        else:
            scores = torch.matmul(data.hq[start:stop], data.hd.T, out=out)       # (c, N)
            top = _rank_top(scores, top_r)                      # (c, R)
        rel_u, _ = _relevance(data, start, stop)
        rel = rel_u.gather(1, data.inv[top])                    # (c, R)
        ap_c, n_c, hits = _ranked_ap(rel, positions)
        ap[start:stop], n_rel[start:stop] = ap_c.cpu(), n_c.cpu()
        if want_pn:
            hits_at += hits.sum(0)
    pn = (hits_at.to(torch.float64) / positions / Q).cpu() if want_pn else None
    return ap, n_rel, pn


def _product_buffer(data, chunks):
    """A float64 (largest chunk, N) block that each chunk's query x database products are written into.

    On the CPU, fresh pages for a new block cost more than the product itself (333 x 50,000 x 48:
    0.11 s into a new tensor, 0.04 s into a reused one).
    """
    rows = max(stop - start for start, stop in chunks)
    return torch.empty(rows, data.N, dtype=torch.float64, device=data.device)


def _ranked_ap(rel, positions):
    """AP and #relevant of each row of a ranked (c, R) relevance matrix, and its running #relevant."""
    hits = rel.to(torch.int64).cumsum(1)                        # (c, R) #relevant in the top n
    n = hits[:, -1]
    terms = torch.where(rel, hits / positions, 0.0)             # P@n * rel_n
    return torch.where(n > 0, terms.sum(1) / n.clamp(min=1), 0.0), n, hits


def _curve_stats(data, budget, top_r=None):
    """Like _ball_stats, with a column per radius 0..K: (Q, K+1) tensors, n_rel_db (Q,).

    With ``top_r``, also _topk_stats's (AP, #relevant, precision@N) of the continuous top R, read off
    the same ranking; else None.
    """
    Q, N, K, dev = data.Q, data.N, data.K, data.device
    K1 = K + 1
    R = top_r or 0
    topk_ap = torch.zeros(Q, dtype=torch.float64)
    topk_n_rel = torch.zeros(Q, dtype=torch.int64)
    hits_at = torch.zeros(R, dtype=torch.int64, device=dev)    # sum over queries of #rel in top n
    positions = torch.arange(1, R + 1, device=dev, dtype=torch.float64)
    n_rel_db = torch.cat([_relevance(data, a, b)[1].cpu()
                          for a, b in _chunks_by_cost(torch.full((Q,), data.lab_u.shape[0] * 16), budget)])
    n_ball = torch.zeros(Q, K1, dtype=torch.int64)
    n_rel_ball = torch.zeros(Q, K1, dtype=torch.int64)
    ap = torch.zeros(Q, K1, dtype=torch.float64)
    table_cells = _batch_budget(budget, dev) // _CURVE_BYTES_PER_CELL   # radius tables: a few queries each
    cost = N * _CURVE_BYTES_PER_PAIR + (n_rel_db + 1) * K1 * _CURVE_BYTES_PER_CELL + R * _TOPK_BYTES_PER_HIT
    chunks = _chunks_by_cost(cost, budget)
    buffer = _product_buffer(data, chunks)
    for start, stop in chunks:
        c = stop - start
        scores = torch.matmul(data.hq[start:stop], data.hd.T, out=buffer[:c])   # (c, N)
        perm = _rank_top(scores, N)                             # (c, N) the ranking
        dist = ((K - data.bq[start:stop] @ data.bd.T) / 2).to(torch.int64)    # (c, N) exact
        d_s = dist.gather(1, perm)                              # distances in rank order
        del dist
        rel_u, _ = _relevance(data, start, stop)
        rel_s = rel_u.gather(1, data.inv[perm])                 # (c, N) relevance in rank order
        del perm
        if R:
            ap_c, n_c, hits = _ranked_ap(rel_s[:, :R], positions)
            topk_ap[start:stop], topk_n_rel[start:stop] = ap_c.cpu(), n_c.cpu()
            hits_at += hits.sum(0)
            del hits
        q_ids = torch.arange(c, device=dev)
        n_ball[start:stop] = torch.bincount((q_ids[:, None] * K1 + d_s).flatten(),
                                            minlength=c * K1).view(c, K1).cumsum(1).cpu()
        for a, b in _chunks_by_cost(n_rel_db[start:stop] * K1, table_cells):
            ap_c, n_rel_c = _radius_table_ap(d_s[a:b], rel_s[a:b], K1)
            ap[start + a:start + b] = ap_c.cpu()
            n_rel_ball[start + a:start + b] = n_rel_c.cpu()
    stats = {"n_ball": n_ball, "n_rel_ball": n_rel_ball, "n_rel_db": n_rel_db, "ap": ap}
    topk = (topk_ap, topk_n_rel, (hits_at.to(torch.float64) / positions / Q).cpu()) if R else None
    return stats, topk


def _radius_table_ap(d_s, rel_s, K1):
    """AP and #relevant in the ball at every radius, from full rankings: (c, K1) each.

    d_s, rel_s: (c, N) distance and relevance of each query's database in rank order. For the j-th
    relevant item of a query and radius r, the AP term is A/M with A = #relevant and M = #items
    ranked at or before it with distance <= r. Both are running counts over the ranking, summed over
    distance; the tables are laid out (radius, relevant item) so that every running sum is along
    contiguous memory: O(N + #relevant * K) per query instead of O(N * K). Counts are held in
    float64, exact below 2^53, so that no step converts between types.
    """
    c, _ = d_s.shape
    dev, f64 = d_s.device, torch.float64
    rel_i = rel_s.to(torch.int64)
    n_rel = rel_i.sum(1)                                        # (c,)
    first = n_rel.cumsum(0) - n_rel                             # (c,) column of each query's first relevant item
    T = int(n_rel.sum())                                        # table columns: relevant items, query by query
    q_of_rel = torch.repeat_interleave(torch.arange(c, device=dev), n_rel)   # (T,)
    d_rel = d_s[rel_s]                                          # (T,) in rank order within each query
    n_rel_ball = torch.bincount(q_of_rel * K1 + d_rel, minlength=c * K1).view(c, K1).cumsum(1)

    # M. Each item ranked before the query's last relevant item is counted in the column of the
    # next relevant item at or after it (its segment) and the row of its distance; items after
    # the last relevant one go to a spare cell. A running sum across the columns (over the ranking)
    # then counts the items ranked at or before each relevant item, and one down the rows (over
    # distance) those within each radius.
    segment = rel_i.cumsum(1) - rel_i                           # (c, N) relevant items ranked strictly before
    counted = segment < n_rel[:, None]
    spare = K1 * T
    cells = torch.where(counted, d_s * T + first[:, None] + segment, spare)
    del segment
    ones = torch.ones(cells.numel(), dtype=f64, device=dev)
    m = torch.bincount(cells.flatten(), weights=ones, minlength=spare + 1)[:-1].view(K1, T)
    del cells, ones
    q_ids = torch.arange(c, device=dev)[:, None]
    counted_by_dist = torch.bincount(torch.where(counted, q_ids * K1 + d_s, c * K1).flatten(),
                                     minlength=c * K1 + 1)[:-1].view(c, K1)
    # The running sums cross from one query to the next; each query's first column takes back
    # what the previous query counted, so the sums restart at every query.
    next_first = first[1:]
    has_next = next_first < T
    m.index_add_(1, next_first[has_next], -counted_by_dist[:-1][has_next].T.to(f64))
    m.cumsum_(1)
    m.cumsum_(0)                                                # (K1, T) M

    # A: relevant items ranked at or before, within radius; restarted per query the same way.
    within = (d_rel <= torch.arange(K1, device=dev)[:, None]).to(f64)   # (K1, T) item j in ball r
    terms = within.clone()
    terms.index_add_(1, next_first[has_next], -n_rel_ball[:-1][has_next].T.to(f64))
    terms.cumsum_(1)                                            # (K1, T) A
    terms.mul_(within).div_(m.clamp_(min=1))                    # P@k * rel_k
    num = torch.zeros(K1, c, dtype=f64, device=dev).index_add_(1, q_of_rel, terms)
    ap = torch.where(n_rel_ball > 0, num.T / n_rel_ball.clamp(min=1), 0.0)
    return ap, n_rel_ball


# ----------------------------------------------------------------------------------------------
# Selection and ranking helpers
# ----------------------------------------------------------------------------------------------

def _pair_scores(hq_chunk, hd, qi, xi, budget):
    """float64 inner products h_q . h_x of the (query, item) pairs, in blocks of bounded memory."""
    m, k = qi.numel(), hd.shape[1]
    scores = torch.empty(m, dtype=torch.float64, device=hd.device)
    block = max(1, budget // (k * 8 * 4))
    for b0 in range(0, m, block):
        b1 = min(m, b0 + block)
        # einsum runs as a batched matrix product: several times faster than multiply-then-sum.
        scores[b0:b1] = torch.einsum("mk,mk->m", hq_chunk.index_select(0, qi[b0:b1]),
                                     hd.index_select(0, xi[b0:b1]))
    scores += 0.0                                               # -0.0 -> +0.0
    return scores


def _rank_within_groups(group, score):
    """Permutation ordering pairs by (group, -score, original position); the input is in index order."""
    by_score = torch.sort(score, descending=True, stable=True).indices
    by_group = torch.sort(_sort_key(group[by_score]), stable=True).indices
    return by_score[by_group]


def _sort_key(integers):
    """Integer sort keys as float64 (exact below 2^53): torch sorts floats several times faster."""
    return integers.to(torch.float64)


def _segment_ap(group_sorted, rel_sorted, sizes):
    """AP and #relevant per group from members in rank order, grouped contiguously (sizes (c,))."""
    c, dev = sizes.numel(), sizes.device
    m = group_sorted.numel()
    if m == 0:
        return torch.zeros(c, dtype=torch.float64, device=dev), torch.zeros(c, dtype=torch.int64, device=dev)
    rel_i = rel_sorted.to(torch.int64)
    starts = sizes.cumsum(0) - sizes                            # (c,) first member of each group
    hits = rel_i.cumsum(0)                                      # running over all groups
    base = torch.zeros(c, dtype=torch.int64, device=dev)
    nonempty = sizes > 0
    base[nonempty] = hits[starts[nonempty]] - rel_i[starts[nonempty]]
    hits -= base[group_sorted]                                  # #relevant at or before, within group
    position = torch.arange(1, m + 1, device=dev) - starts[group_sorted]   # rank within group, from 1
    terms = torch.where(rel_sorted, hits.to(torch.float64) / position, 0.0)   # P@k * rel_k
    num = torch.zeros(c, dtype=torch.float64, device=dev).index_add_(0, group_sorted, terms)
    n_rel = torch.zeros(c, dtype=torch.int64, device=dev).index_add_(0, group_sorted, rel_i)
    return torch.where(n_rel > 0, num / n_rel.clamp(min=1), 0.0), n_rel


def _rank_top(scores, top_r):
    """(c, R) indices of each row's R best scores, ordered by (-score, index).

    Selection (topk, argpartition) orders equal scores arbitrarily and picks an arbitrary subset of
    the items tied at the R-th score. Rows whose sorted top R+1 hold no two equal scores are exact
    as they are (comparisons treat -0.0 and +0.0 as equal, so a split pair shows up as a tie); the
    others (rare for continuous codes) are redone by comparisons: the items above the R-th score
    plus the lowest-indexed items equal to it, then a stable sort of them in index order.
    """
    n = scores.shape[1]
    values, top = _top_sorted(scores, min(top_r + 1, n))        # (c, R+1), or (c, N) when R = N
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


def _top_sorted(scores, k):
    """(values, indices) of each row's k largest scores, by decreasing score; ties in any order."""
    if scores.device.type != "cpu" or not _NUMPY_SELECT_ON_CPU:
        return torch.topk(scores, k, dim=1, sorted=True)
    # On the CPU numpy's introselect + a sort of the k winners is 2-3x faster than torch.topk, and
    # row by row (the row still in cache for the gathers) twice as fast again as on the whole block.
    # numpy is single-threaded but releases the GIL: row blocks go to torch's number of threads.
    c, n = scores.shape
    array = scores.numpy()
    values = np.empty((c, k), dtype=array.dtype)
    top = np.empty((c, k), dtype=np.int64)

    def select(lo, hi):
        for i in range(lo, hi):
            row = array[i]
            part = np.argpartition(row, n - k)[n - k:]          # the k largest, unordered
            row_values = row[part]
            order = np.argsort(row_values)[::-1]                # decreasing
            values[i] = row_values[order]
            top[i] = part[order]

    workers = max(1, min(torch.get_num_threads(), c))
    bounds = [c * i // workers for i in range(workers + 1)]
    if workers == 1:
        select(0, c)
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for done in [pool.submit(select, lo, hi) for lo, hi in zip(bounds, bounds[1:])]:
                done.result()
    return torch.from_numpy(values), torch.from_numpy(top)


_NUMPY_SELECT_ON_CPU = True     # tests turn it off to run the torch.topk path (the GPU's) on the CPU


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------

def _summarise_ball(stats, convention):
    """Means over queries (dim 0) of AP, precision, recall under a convention; empty-ball share."""
    n_ball, n_rel_ball, ap = stats["n_ball"], stats["n_rel_ball"], stats["ap"]
    n_rel_db = stats["n_rel_db"]
    if n_ball.dim() == 2:
        n_rel_db = n_rel_db[:, None]
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
        "map": _masked_mean(ap, map_keep, keep_dims=True),
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
