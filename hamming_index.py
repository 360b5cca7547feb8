"""The Hamming-ball lookup: the database items whose sign codes lie within Hamming radius r of a query's,
found without scanning the database and ranked by the continuous score (README, "Retrieval: the
Hamming-ball lookup"). metrics.py finds and ranks its balls with the same functions.

MMHH (Kang et al., ICCV 2019) trains codes so that a query's relevant items fall inside its Hamming ball
of radius 2, which a hash lookup returns in constant time where a linear scan costs O(N).

The table. A sign code of K <= 64 bits is an int64 key, bit k set where code k is >= 0 (sign(0) = +1).
The keys are sorted, and a directory indexed by their top b bits (2^b about a quarter to a half of the
rows) gives the rows that start with any b-bit prefix. A query reads the sum_{i<=r} C(b, i) prefixes
within r of its own -- 154 at b = 17, r = 2, where probing every code within r of a 64-bit code takes
2,081 -- and keeps the rows of those buckets that are within r of it, counted by popcount. No member is
missed: a row within r has a prefix within r. A read is a directory lookup, not a search, and a bucket
holds a few rows on average, so a query costs O(#prefixes + #rows in its buckets + #members).

A row is a distinct key with the range of its items, when there are fewer than 2N/3 distinct keys
(trained codes repeat), else an item. Memory: 8 bytes a row, 4 an item, 4 a directory entry; at most 14
bytes an item, 1.75x the 64-bit packed codes. An index of longer codes (K > 64) scans instead.
"""
import collections
import dataclasses
import itertools
import math
import os

import numpy as np
import torch

from runtime import CliError, atomic_write

FORMAT = "mmhh-hamming-index/1"
MAX_TABLE_BITS = 64

# Prefixes read per call of CodeTable.within, so that its blocks stay in the core's caches
# (bench/bench_index.py measures the lookup).
_PROBE_BLOCK = 16384
# Codes packed or scanned at a time (the scan: K > 64, and the nearest codes of an empty ball).
_SCAN_ROWS = 65536
# Queries answered at a time (neighbours in code order: they share most of their balls, see
# CodeTable.scored_items), and at most this many ball members ranked at a time (about 100 MiB).
_ANSWER_QUERIES = 32
_ANSWER_MEMBERS = 2**21
# Dense products a ball member may cost before scoring member by member is cheaper (measured on the
# CPU, K = 48-64: a dense entry is a BLAS multiply-add, a member's gathered score several times that).
_DENSE_ENTRIES_PER_MEMBER = 8
# Working memory of one block of pair_scores.
_BLOCK_BYTES = 32 * 2**20


class IndexFileError(CliError):
    """An index file is missing, corrupt or from another version; the message names it."""


# ----------------------------------------------------------------------------------------------
# Packed sign codes and the table
# ----------------------------------------------------------------------------------------------

def pack_signs(codes):
    """(n,) int64 keys of (n, K <= 64) codes: bit k set where code k is >= 0 (bit 63 is the sign bit)."""
    n, k = codes.shape
    if k > MAX_TABLE_BITS:
        raise ValueError(f"codes of {k} bits do not fit a {MAX_TABLE_BITS}-bit key")
    keys = torch.empty(n, dtype=torch.int64, device=codes.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    for start in range(0, n, _SCAN_ROWS):
        block = codes[start:start + _SCAN_ROWS]
        bits = torch.zeros(len(block), 64, dtype=torch.uint8, device=codes.device)
        bits[:, :k] = block >= 0
        # Bit k in byte k // 8: the 8 bytes of a little-endian int64 (every platform torch runs on).
        packed = (bits.view(-1, 8, 8) << shifts).sum(2, dtype=torch.uint8)   # (b, 8) bytes
        keys[start:start + len(block)] = packed.view(torch.int64).view(-1)
    return keys


def popcount(x):
    """Set bits of each int64, as int64: numpy's popcount instruction on the CPU (numpy >= 2.0), else
    SWAR arithmetic (bit pairs, nibbles, bytes, then their sum; int64 wraps around), 5x slower."""
    if x.device.type == "cpu" and _NUMPY_ON_CPU and hasattr(np, "bitwise_count"):
        # As unsigned: numpy counts the bits of |x| for a signed integer.
        return torch.from_numpy(np.bitwise_count(x.numpy().view(np.uint64)).astype(np.int64))
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56) & 0xFF


# numpy's popcount, repeat and flatnonzero on the CPU; tests turn them off to run the torch code (the GPU's) on the CPU.
_NUMPY_ON_CPU = True


Hits = collections.namedtuple("Hits", "query row distance candidates")
Hits.__doc__ = """Table rows within the radius of queries, (H,) tensors by query, and the rows checked."""


class CodeTable:
    """Sorted packed sign codes with a directory of their top bits; see the module docstring.

    ``rows`` (U,) int64 ascending; ``offsets`` (U + 1,) int32, the items of row u being
    ``order[offsets[u]:offsets[u + 1]]``, or None when each row is one item, ``order[u]``; ``order``
    (N,) int32 database indices by key, equal keys in database order; ``directory`` (2^b + 1,) int32,
    the rows with prefix p being ``rows[directory[p]:directory[p + 1]]``.
    """

    def __init__(self, keys, bits):
        n = keys.numel()
        if n >= 2**31:
            raise ValueError(f"{n} codes: the table holds fewer than 2^31; split the database")
        self.bits, self.size = bits, n
        sorted_keys, order = torch.sort(keys, stable=True)    # equal keys keep database order
        self.order = order.to(torch.int32)
        distinct, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        if 3 * distinct.numel() < 2 * n:                        # distinct rows take less memory
            self.rows = distinct
            self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        else:
            self.rows, self.offsets = sorted_keys, None
        self.prefix_bits = min(bits, max(1, self.rows.numel().bit_length() - 2))
        self._shift = bits - self.prefix_bits
        # With 64 bits the sign bit leads: flipping it makes the prefixes ascend with the signed keys.
        self._sign_flip = 1 << (self.prefix_bits - 1) if bits == 64 else 0
        buckets = torch.arange(2**self.prefix_bits + 1, device=keys.device)
        self.directory = torch.searchsorted(self._prefix(self.rows), buckets).to(torch.int32)
        self._masks = {}

    @property
    def nbytes(self):
        """Bytes of the table's tensors."""
        parts = (self.rows, self.order, self.directory) + ((self.offsets,) if self.offsets is not None else ())
        return sum(part.numel() * part.element_size() for part in parts)

    def probes(self, radius):
        """Prefixes a query reads at ``radius``: sum_{i<=r} C(b, i)."""
        return sum(math.comb(self.prefix_bits, i) for i in range(min(radius, self.prefix_bits) + 1))

    def query_block(self, radius):
        """Queries to pass to ``within`` at a time: their (query, prefix) block stays in cache."""
        return max(1, _PROBE_BLOCK // self.probes(radius))

    def within(self, q_keys, radius):
        """The rows within ``radius`` of each of the (c,) query keys: Hits, by query."""
        masks = self._prefix_masks(radius)
        probes = (self._prefix(q_keys)[:, None] ^ masks).view(-1)         # (c P,) prefixes read
        lo = self.directory.take(probes).to(torch.int64)
        n = self.directory.take(probes + 1) - lo
        hit = positions(n > 0)                                              # prefixes with rows
        n = n.index_select(0, hit)
        row = ranges(lo.index_select(0, hit), n)                            # (C,) candidates
        query = repeat(torch.div(hit, masks.numel(), rounding_mode="floor"), n)
        dist = popcount(self.rows.index_select(0, row) ^ q_keys.index_select(0, query))
        keep = positions(dist <= radius)
        return Hits(query.index_select(0, keep), row.index_select(0, keep), dist.index_select(0, keep), row.numel())

    def sizes(self, row):
        """(H,) items behind each row."""
        return self._spans(row)[1]

    def items(self, query, row, dist):
        """The database items of the rows ``within`` found: (query, item, distance), (M,) each, by query."""
        if self.offsets is None:
            return query, self.order.index_select(0, row).to(torch.int64), dist
        first, size = self._spans(row)
        item = self.order.index_select(0, ranges(first, size)).to(torch.int64)
        return repeat(query, size), item, repeat(dist, size)

    def scored_items(self, hits, hq, codes):
        """``items`` of ``hits`` with each member's score h_q . h_x: (query, item, distance, score), (M,)
        each, by query. ``hq`` (c, K) are the hits' queries, ``codes`` (N, K) the database's continuous
        codes; the scores are in ``hq``'s dtype.

        Queries with close codes (neighbours in key order) share most of their balls: then one dense
        product of the queries with the union of the rows they hit scores every member, 1.2-5 entries a
        member at 32 queries (the demo's and clustered codes), each a BLAS multiply-add. When the
        union is too large for that (queries far apart), each member is scored from its gathered
        codes, several times slower a member.
        """
        wanted, which = torch.unique(hits.row, return_inverse=True)           # (R,) rows hit, ascending
        first, size = self._spans(wanted)
        union = self.order.index_select(0, ranges(first, size)).to(torch.int64)   # (U,) their items
        row_column = size.cumsum(0) - size                                     # (R,) its first column
        size = size.index_select(0, which)                                     # (H,) each hit's items
        column = ranges(row_column.index_select(0, which), size)
        query, item = repeat(hits.query, size), union.index_select(0, column)
        if hq.shape[0] * union.numel() <= _DENSE_ENTRIES_PER_MEMBER * column.numel():
            dense = hq @ codes.index_select(0, union).to(hq.dtype).T          # (c, U)
            score = dense.view(-1).index_select(0, query * union.numel() + column)
        else:
            score = pair_scores(hq, codes, query, item).to(hq.dtype)
        return query, item, repeat(hits.distance, size), score

    def _spans(self, row):
        """(first position in key order, number of items) of each row."""
        if self.offsets is None:
            return row, torch.ones_like(row)
        first = self.offsets.index_select(0, row)
        return first.to(torch.int64), (self.offsets.index_select(0, row + 1) - first).to(torch.int64)

    def _prefix(self, keys):
        """Top b bits of each key, as bucket numbers that ascend with the keys."""
        return ((keys >> self._shift) & (2**self.prefix_bits - 1)) ^ self._sign_flip

    def _prefix_masks(self, radius):
        if radius not in self._masks:
            combos = itertools.chain.from_iterable(itertools.combinations(range(self.prefix_bits), size)
                                                   for size in range(min(radius, self.prefix_bits) + 1))
            self._masks[radius] = torch.tensor([sum(1 << bit for bit in combo) for combo in combos],
                                               dtype=torch.int64, device=self.rows.device)
        return self._masks[radius]


def ranges(first, length):
    """The concatenated ranges [first, first + length) of (n,) int64 tensors."""
    entries = repeat(first - (length.cumsum(0) - length), length)
    return entries.add_(torch.arange(entries.numel(), device=entries.device))


def positions(mask):
    """(n,) int64 positions of the true entries of a bool tensor, read as flat."""
    if mask.device.type == "cpu" and _NUMPY_ON_CPU:             # numpy's flatnonzero beats nonzero there
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.view(-1).nonzero().view(-1)


def repeat(values, counts):
    """Each of the (n,) ``values`` repeated ``counts`` times, in order."""
    if values.device.type == "cpu" and _NUMPY_ON_CPU:           # numpy's repeat beats repeat_interleave there
        return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))
    return torch.repeat_interleave(values, counts)


# ----------------------------------------------------------------------------------------------
# Ranking ball members: inner product of the continuous codes in float64, ties by database index
# ----------------------------------------------------------------------------------------------

def pair_scores(hq, hd, qi, xi, budget=_BLOCK_BYTES):
    """float64 inner products h_q . h_x of the (query, item) pairs, in blocks of bounded memory."""
    m, k = qi.numel(), hd.shape[1]
    scores = torch.empty(m, dtype=torch.float64, device=hd.device)
    block = max(1, budget // (k * 8 * 4))
    for b0 in range(0, m, block):
        b1 = min(m, b0 + block)
        # einsum runs as a batched matrix product: several times faster than multiply-then-sum.
        scores[b0:b1] = torch.einsum("mk,mk->m", hq.index_select(0, qi[b0:b1]).to(torch.float64),
                                     hd.index_select(0, xi[b0:b1]).to(torch.float64))
    return scores


def rank_members(group, score, index, n_groups):
    """Order members by (group, -score, index): the permutation, and the group in that order.

    One stable radix sort of a 31-bit key -- the group, then the score quantized over the batch's
    range -- orders everything but the runs of equal keys: the quantization is monotone, so members
    with different keys are in score order already. Inside a run, scores closer than the quantum or
    equal scores out of index order are sorted exactly (three sorts of those runs only; rare for
    continuous codes). Integer sorts are radix sorts on the CPU, several times faster than float
    ones, and int32 keys twice as fast as int64.
    """
    group_bits = max(1, (n_groups - 1).bit_length())
    score_bits = max(16, 31 - group_bits)
    key_type = torch.int32 if group_bits + score_bits <= 31 else torch.int64
    if score.numel():
        low, high = (float(v) for v in torch.aminmax(score))
        span = high - low
        scale = (2**score_bits - 1) / span if 0 < span < math.inf else 0.0
        quantum = ((high - score) * scale).to(key_type)         # decreasing with the score, never crossing it
    else:
        quantum = torch.zeros_like(group, dtype=key_type)
    keys, order = torch.sort(group.to(key_type) << score_bits | quantum, stable=True)
    tie = positions(keys[1:] == keys[:-1])                      # (P,) positions equal to the next
    before, after = order[tie], order[tie + 1]
    wrong = tie[(score[after] > score[before]) | ((score[after] == score[before]) & (index[after] < index[before]))]
    if wrong.numel():
        bad = torch.unique(keys[wrong])                         # the runs to redo, by key
        first = torch.searchsorted(keys, bad)
        length = torch.searchsorted(keys, bad, right=True) - first
        run = repeat(torch.arange(bad.numel(), device=keys.device), length)
        where = ranges(first, length)                           # their positions, run by run
        members = order[where]
        order[where] = members[exact_order(run, score[members], index[members])]
    return order, keys >> score_bits


def exact_order(group, score, index):
    """Permutation ordering by (group, -score, index): three stable sorts, least significant first."""
    by_index = torch.sort(index, stable=True).indices
    by_score = by_index[torch.sort(_descending_key(score[by_index]), stable=True).indices]
    return by_score[torch.sort(group[by_score], stable=True).indices]


def _descending_key(score):
    """int64 keys whose increasing order is the float64 scores' decreasing order (-0.0 = +0.0)."""
    bits = (score + 0.0).view(torch.int64)                      # IEEE bits; + 0.0 turns -0.0 into +0.0
    # Non-negative floats order as their bits; negative ones in reverse: flip their magnitude bits.
    increasing = bits ^ ((bits >> 63) & 0x7FFF_FFFF_FFFF_FFFF)
    return ~increasing                                          # ~x = -1 - x reverses the order exactly


# ----------------------------------------------------------------------------------------------
# The index: codes, the table, and what the items are
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Answer:
    """One query's results, best first: database ``index``, Hamming ``distance``, ``score`` (h_q . h_x)
    and ``relevant`` (shares a label; None when labels are unknown), as (k,) tensors. ``ball_size``
    counts the ball's members; ``fallback`` marks nearest codes returned for an empty ball."""
    index: torch.Tensor
    distance: torch.Tensor
    score: torch.Tensor
    relevant: torch.Tensor | None
    ball_size: int
    fallback: bool = False


class HammingIndex:
    """A database for Hamming-ball queries: continuous codes (N, K) for ranking, their table (K <= 64)
    for the lookup, and optionally each item's image path and 0/1 label row (N, C)."""

    def __init__(self, codes, paths=None, labels=None, source=None):
        self.codes = torch.as_tensor(codes).detach().cpu()
        if self.codes.dim() != 2 or not self.codes.is_floating_point() or not len(self.codes):
            raise ValueError(f"codes must be a non-empty real (N, K) matrix, got {tuple(self.codes.shape)} "
                             f"{self.codes.dtype}")
        self.paths = None if paths is None else [str(path) for path in paths]
        self.labels = None if labels is None else torch.as_tensor(labels).to(torch.uint8).cpu()
        for name, rows in (("paths", self.paths), ("labels", self.labels)):
            if rows is not None and len(rows) != len(self.codes):
                raise ValueError(f"{len(rows)} {name} for {len(self.codes)} codes")
        self.source = dict(source or {})
        self.bits = self.codes.shape[1]
        self.table = CodeTable(pack_signs(self.codes), self.bits) if self.bits <= MAX_TABLE_BITS else None

    def __len__(self):
        return len(self.codes)

    def search(self, query_codes, radius=2, topk=10, fallback_topk=0, query_labels=None):
        """An Answer per query: its ball of ``radius`` ranked as metrics.py ranks a ball (h_q . h_x in
        float64, ties by database index), the first ``topk``. An empty ball gets, with
        ``fallback_topk`` N > 0, the N nearest codes instead, by (distance, -score, index)."""
        hq = torch.as_tensor(query_codes).detach().cpu()
        if hq.dim() != 2 or hq.shape[1] != self.bits:
            raise ValueError(f"query codes of shape {tuple(hq.shape)} for an index of {self.bits}-bit codes")
        relevance = self._relevance(query_labels)
        in_order = torch.sort(pack_signs(hq)).indices if self.table is not None else torch.arange(len(hq))
        answers = [None] * len(hq)
        for queries in in_order.split(_ANSWER_QUERIES):
            for query, answer in zip(queries.tolist(), self._answer(hq, queries, radius, topk, relevance)):
                answers[query] = answer
        if fallback_topk > 0:
            for i, answer in enumerate(answers):
                if answer.ball_size == 0:
                    answers[i] = self._nearest(hq[i], fallback_topk, relevance, i)
        return answers

    def ball(self, query_codes, radius):
        """Ball members (query, item, distance), (M,) each, by query: by table lookup, or a scan when
        K > 64."""
        parts = []
        if self.table is not None:
            keys, step = pack_signs(query_codes), self.table.query_block(radius)
            for start in range(0, len(keys), step):
                query, row, dist, _ = self.table.within(keys[start:start + step], radius)
                parts.append(self.table.items(query + start, row, dist))
        else:
            for start, dist in self._scan(query_codes):
                query, item = (dist <= radius).nonzero(as_tuple=True)
                parts.append((query, item + start, dist[query, item]))
        return tuple(torch.cat(columns) if len(columns) > 1 else columns[0] for columns in zip(*parts))

    def save(self, path):
        """Write the index to ``path`` atomically: tensors and plain data, read with weights_only=True."""
        state = {"format": FORMAT, "codes": self.codes, "paths": self.paths, "labels": self.labels,
                 "source": self.source}
        try:
            atomic_write(path, lambda stream: torch.save(state, stream))
        except OSError as error:
            raise IndexFileError(f"cannot write index {path} ({error.strerror or error})") from None

    @classmethod
    def load(cls, path):
        """The index saved at ``path``; an IndexFileError naming it when it cannot be used."""
        if not os.path.isfile(path):
            raise IndexFileError(f"index {path} does not exist; build one with: python retrieve.py --save_index "
                                 f"{path} ...")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated archives, foreign pickles, garbage: all the same to the user
            why = (str(error).strip().splitlines() or [""])[0]   # torch's unpickling errors run to many lines
            raise IndexFileError(f"index {path} cannot be read ({type(error).__name__}: {why}); it is corrupt "
                                 "or not an index: rebuild it with retrieve.py --save_index") from None
        found = state.get("format") if isinstance(state, dict) else None
        if found != FORMAT:
            raise IndexFileError(f"index {path} has format {found!r}, but this version reads {FORMAT!r}: rebuild "
                                 "it with retrieve.py --save_index")
        try:
            return cls(state["codes"], state["paths"], state["labels"], state["source"])
        except (KeyError, TypeError, ValueError) as error:
            raise IndexFileError(f"index {path} is inconsistent ({type(error).__name__}: {error}): rebuild it "
                                 "with retrieve.py --save_index") from None

    def _relevance(self, query_labels):
        """A function (queries, items) -> relevance, or None when either side has no labels."""
        if query_labels is None or self.labels is None:
            return None
        lq = torch.as_tensor(query_labels).to(torch.float32).cpu()
        if lq.shape[1] != self.labels.shape[1]:
            raise ValueError(f"query labels have {lq.shape[1]} columns, the index's {self.labels.shape[1]}")
        return lambda qi, xi: (lq[qi] * self.labels[xi].to(torch.float32)).sum(1) > 0

    def _answer(self, hq, queries, radius, topk, relevance):
        """Answers of the (c,) ``queries`` of ``hq``; halved until their members fit the working memory."""
        qi, xi, dist, score = self._scored_ball(hq[queries], radius)
        if qi.numel() > _ANSWER_MEMBERS and len(queries) > 1:
            half = len(queries) // 2
            return (self._answer(hq, queries[:half], radius, topk, relevance)
                    + self._answer(hq, queries[half:], radius, topk, relevance))
        order, group = rank_members(qi, score, xi, len(queries))
        sizes = torch.bincount(qi, minlength=len(queries))      # (c,) ball sizes
        rank = torch.arange(order.numel()) - (sizes.cumsum(0) - sizes).index_select(0, group)
        kept = order.index_select(0, positions(rank < topk))    # each query's first topk, best first
        shown = torch.clamp(sizes, max=topk).tolist()
        columns = [column[kept].split(shown) for column in (xi, dist, score)]
        relevant = (relevance(queries[qi[kept]], xi[kept]).split(shown) if relevance else [None] * len(queries))
        return [Answer(*parts, ball_size) for *parts, ball_size in zip(*columns, relevant, sizes.tolist())]

    def _scored_ball(self, query_codes, radius):
        """``ball`` with each member's float64 score h_q . h_x: (query, item, distance, score), by query."""
        if self.table is None:
            qi, xi, dist = self.ball(query_codes, radius)
            return qi, xi, dist, pair_scores(query_codes, self.codes, qi, xi)
        hits = self.table.within(pack_signs(query_codes), radius)
        return self.table.scored_items(hits, query_codes.to(torch.float64), self.codes)

    def _nearest(self, hq, count, relevance, query):
        """The ``count`` items nearest to one query's sign code, by (distance, -score, index)."""
        dist = torch.cat([block[0] for _, block in self._scan(hq[None])])     # (N,)
        within = torch.bincount(dist, minlength=self.bits + 1).cumsum(0)
        reach = int((within < count).sum())                     # the distance holding the count-th item
        xi = positions(dist <= reach)
        score = pair_scores(hq[None], self.codes, torch.zeros_like(xi), xi)
        best = exact_order(dist[xi], score, xi)[:count]
        rel = relevance(torch.full_like(best, query), xi[best]) if relevance else None
        return Answer(xi[best], dist[xi][best], score[best], rel, 0, fallback=True)

    def _scan(self, query_codes):
        """(start, (c, n) Hamming distances) for each block of database rows: (K - b_q . b_x) / 2,
        exact in float32 (integers up to K)."""
        bq = torch.where(query_codes >= 0, 1.0, -1.0)           # (c, K)
        step = min(_SCAN_ROWS, max(1, _SCAN_ROWS * 64 // len(bq)))   # (c, step) blocks of at most 4M pairs
        for start in range(0, len(self.codes), step):
            bd = torch.where(self.codes[start:start + step] >= 0, 1.0, -1.0)
            yield start, ((self.bits - bq @ bd.T) / 2).to(torch.int64)
