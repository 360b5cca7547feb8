"""The memory-bounded kernels behind metrics.py (README, "Retrieval metrics", "How").

metrics.py states the definitions; these kernels compute the per-query statistics that it averages
under each convention: a Hamming ball's size, relevant members and AP (``ball_stats``), the counts at
every radius and the sign codes' top R (``sign_scan``), and the AP of the top R of a linear scan
(``topk_stats``). They follow metrics.py's definitions exactly -- ranking by the float64 inner
product, equal scores by database index, sign(0) = +1 -- on the CPU or CUDA, a chunk of queries at a
time within a ``budget`` of working memory in bytes: no Q x N float64 matrix is built, and only the
members of a Hamming ball are ranked. The statistics come back as CPU tensors.

Several module constants switch between equivalent paths (``_FORCE_BALL_METHOD``, ``_BF16_SIGNS``,
``_NUMPY_SELECT_ON_CPU``) or set batch sizes: the tests change them to run every path on the CPU.
"""
import concurrent.futures
import dataclasses
import functools
import math

import numpy as np
import torch

from hamming_index import MAX_TABLE_BITS, CodeTable, pack_signs, positions, rank_members

# Rough bytes of working memory per element, used only to size chunks.
_SCAN_BYTES_PER_PAIR = 45       # (c, N): sign and float64 products, ball mask, members if all are in
_PRODUCT_BYTES_PER_PAIR = 8     # (c, N): float64 products
_BYTES_PER_MEMBER = 128         # per ball member: indices, distance, score, sort keys and permutations, table
_SIGN_BYTES_PER_PAIR = 16       # (N, c): sign products, int32 relevance and histogram cells, mask
_TOPK_BYTES_PER_PAIR = 24       # (c, N): float64 scores, the selection mask, topk scratch
_TOPK_BYTES_PER_HIT = 72        # (c, R): indices, gathered scores, ranks, relevance, cumsums


# ----------------------------------------------------------------------------------------------
# The inputs
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)            # compared by identity: tensors have no single truth value
class Inputs:
    """Validated codes and labels on one device, in the forms the kernels need (``Inputs.build``)."""

    device: torch.device
    hd: torch.Tensor            # (N, K) float64 database codes
    hq: torch.Tensor            # (Q, K) float64 query codes
    bd: torch.Tensor            # (N, K) database signs +-1, sign(0) = +1, in _sign_dtype
    bq: torch.Tensor            # (Q, K) query signs
    inv: torch.Tensor           # (N,) int64: each database item's distinct label row
    lab_u: torch.Tensor         # (U, C) the distinct database label rows, in the signs' dtype
    count_u: torch.Tensor       # (U,) float64: database items with each distinct label row
    lq: torch.Tensor            # (Q, C) query labels, in the signs' dtype

    @classmethod
    def build(cls, hd, ld, hq, lq, device):
        """From validated 2-D tensors on any device -- codes (N, K), (Q, K) and 0/1 labels (N, C),
        (Q, C) -- to ``device`` (None: CUDA when available, else CPU)."""
        device = _pick_device(device)
        hd, hq = hd.to(device, torch.float64), hq.to(device, torch.float64)
        # b_q . b_x is an integer of magnitude <= K: exact in float32 or bfloat16.
        signs = _sign_dtype(device, hd.shape[1])
        # Relevance through the distinct database label rows: a query is scored against U patterns
        # instead of N items (U = #classes for single-label data), and an item's relevance is a lookup.
        inv, lab_u, count_u = _unique_label_rows(ld.to(device, torch.uint8))
        # Relevance only asks whether l_q . l_x > 0: a sum of 0/1 products is positive in any precision,
        # so the sign codes' fast dtype serves the labels too.
        return cls(device=device, hd=hd, hq=hq, bd=_signs(hd, signs), bq=_signs(hq, signs),
                   inv=inv, lab_u=lab_u.to(signs), count_u=count_u, lq=lq.to(device, signs))

    @property
    def N(self):
        return self.hd.shape[0]

    @property
    def Q(self):
        return self.hq.shape[0]

    @property
    def K(self):
        return self.hd.shape[1]

    @functools.cached_property
    def code_table(self):
        """The table of the database's sign codes (K <= 64), built on first use."""
        return CodeTable(pack_signs(self.bd), self.K)


# ----------------------------------------------------------------------------------------------
# Per-query statistics (the entry points)
# ----------------------------------------------------------------------------------------------

def ball_stats(data, radius, budget, every_radius=False):
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
        order, qi = rank_members(qi, score, xi, c)              # qi in rank order
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


def sign_scan(data, top_r, budget, want_pn):
    """One scan of the sign codes: per query, the counts at every radius -- ``n_ball``,
    ``n_rel_ball`` (Q, K + 1), ``n_rel_db`` (Q,) -- and ``topk``: topk_stats's (AP, #relevant,
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
        ap_c, n_c, found_at = _ranked_ap(_sign_top_relevance(cell, counts, offset, top_r, K))
        ap[start:stop], n_rel[start:stop] = ap_c.cpu(), n_c.cpu()
        if want_pn:
            found += found_at
    n_at = n_at.cumsum(1)                                       # within each radius
    pn = _precision_at_n(found, Q) if want_pn else None
    return {"n_ball": n_at.sum(2), "n_rel_ball": n_at[:, :, 1], "n_rel_db": n_rel_db,
            "topk": (ap, n_rel, pn)}


def topk_stats(data, top_r, use_sign, budget, want_pn):
    """Per query AP over the top R and #relevant in it; mean precision@N for N = 1..R if asked."""
    if use_sign:
        return sign_scan(data, top_r, budget, want_pn)["topk"]
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


def _relevance(data, queries):
    """Relevance of the (c,) ``queries`` to each distinct label row (c, U), and #relevant in the database."""
    rel_u = (data.lq[queries] @ data.lab_u.T) > 0              # (c, U)
    n_rel_db = (rel_u.to(torch.float64) @ data.count_u).round().to(torch.int64)   # (c,)
    return rel_u, n_rel_db


# ----------------------------------------------------------------------------------------------
# The members of each ball
# ----------------------------------------------------------------------------------------------

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
    table = data.code_table if data.K <= MAX_TABLE_BITS else None
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
    table = data.code_table
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


# ----------------------------------------------------------------------------------------------
# AP of ranked lists
# ----------------------------------------------------------------------------------------------

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
    m = torch.bincount(cells, minlength=spare + 1)[:-1].view(K1, T).to(f64)   # unweighted: the faster path
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
    # Sums of runs along the rows' contiguous memory, which is faster than down the columns of terms.T.
    num = torch.segment_reduce(terms, "sum", lengths=n_rel_ball[:, -1].expand(K1, c).contiguous(), axis=1).T
    ap = torch.where(n_rel_ball > 0, num / n_rel_ball.clamp(min=1), 0.0)
    return ap, n_rel_ball


def _ranked_ap(rel):
    """AP and #relevant of each row of a ranked (c, R) relevance matrix, and the #relevant at each
    rank summed over the rows (R,)."""
    hits = rel.cumsum(1, dtype=torch.float64)                   # (c, R) #relevant in the top n
    n = hits[:, -1].to(torch.int64)
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
    terms = hits.mul_(rel).div_(ranks)                          # P@n * rel_n
    return terms.sum(1) / n.clamp(min=1), n, rel.sum(0)         # AP 0 where n = 0: every term is 0


def _precision_at_n(found, queries):
    """Mean precision@N for N = 1..R, from the relevant items at each rank summed over queries."""
    ranks = torch.arange(1, found.numel() + 1, device=found.device, dtype=torch.float64)
    return (found.cumsum(0) / ranks / queries).cpu()


# ----------------------------------------------------------------------------------------------
# The top R of a linear scan
# ----------------------------------------------------------------------------------------------

def _sign_top_relevance(cell, counts, offset, top_r, K):
    """(c, R) relevance of each query's top R by sign inner product, in rank order (d, index).

    ``cell`` (N, c): sign_scan's histogram cells, which hold all three: cell // 2 = (query, d),
    cell % 2 = relevance; ``counts`` (c, K + 1, 2): their histogram; ``offset`` (c,): each query's
    first cell plus K. The top R are the first R of the items within d*, the first distance that
    holds R items.
    """
    c, dev = counts.shape[0], cell.device
    within = counts.sum(2).cumsum(1)                            # (c, K1) items within each radius
    d_star = (within < top_r).sum(1)                            # (c,) first radius holding R items
    last = (offset - K + 2 * d_star + 1).to(torch.int32)        # (c,) the largest cell within d*
    near = positions(cell <= last)                              # (index, query) order
    near_cells = cell.view(-1).index_select(0, near)
    order = torch.sort(near_cells >> 1, stable=True).indices    # (query, d, index)
    candidates = within.gather(1, d_star[:, None]).flatten()    # (c,) items within d*
    first = candidates.cumsum(0) - candidates
    top = order.index_select(0, (first[:, None] + torch.arange(top_r, device=dev)).view(-1))   # (c R,)
    return (near_cells.index_select(0, top) & 1).view(c, top_r) > 0


def _locality_order(data):
    """Database indices ordered by packed sign code (the code table's order; K <= 64), else None.

    Items with similar codes score alike, so in this order a query's best items form runs instead
    of being scattered: numpy's nonzero, which branches per item, finds them 4x faster (demo codes).
    BLAS may round a product against the reordered database differently in the last place (c50k:
    0.005% of pairs, demo: none): for inexact real codes that decides near-ties at the 1e-16 level,
    as the module docstring says; exact products are the same numbers.
    """
    return data.code_table.order.to(torch.int64) if data.K <= MAX_TABLE_BITS else None


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
# Chunks within the memory budget
# ----------------------------------------------------------------------------------------------

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


def _batch_budget(budget, device):
    """Working memory of one batch of members or table cells: the budget, capped on the CPU."""
    return min(budget, _CPU_BATCH_BYTES) if device.type == "cpu" else budget


# On the CPU a temporary tensor beyond a few tens of MiB gets fresh pages from the system at every
# allocation, which costs more than the arithmetic on it; batches below this size reuse memory
# (bench/bench_metrics.py measures the effect).
_CPU_BATCH_BYTES = 32 * 2**20


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


# ----------------------------------------------------------------------------------------------
# The inputs' forms on the device
# ----------------------------------------------------------------------------------------------

def _pick_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sign_dtype(device, bits):
    """bfloat16 for the +-1 codes where the CPU multiplies it natively (AVX512-BF16 or AMX), else
    float32. Their products are integers of magnitude <= K, exact in bfloat16 up to K = 256, and
    6x faster (100,000 x 227 x 64 bits: 3.6 ms against 21 ms on this project's 2-core machine)."""
    native = any(getattr(torch.cpu, check, lambda: False)()
                 for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if device.type == "cpu" and bits <= 256 and native and _BF16_SIGNS else torch.float32


_BF16_SIGNS = True              # tests turn it off to run the float32 path (the GPU's) on the CPU


def _signs(codes, dtype):
    """+-1 signs of float64 codes in ``dtype``, sign(0) = +1."""
    return (codes >= 0).to(dtype).mul_(2).sub_(1)


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
