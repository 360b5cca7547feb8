"""The figures of metrics.py computed one query at a time, straight from the definitions (README,
"Retrieval metrics"): plain Python and numpy, slow, and easy to check by reading. The tests hold
metrics.py to these to 1e-9.

Arguments as in metrics.py, as numpy arrays: codes ``hd`` (N, K) and ``hq`` (Q, K), 0/1 labels ``ld``
(N, C) and ``lq`` (Q, C); a function of one query takes that query's row ``hq``, ``lq`` instead.
Relevance is sharing a label, signs have sign(0) = +1, and every ranking is by the float64 inner
product, equal scores in database order.
"""
import numpy as np


def ref_rank(scores):
    """Database indices by (-score, index)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def ref_ap(rel):
    """AP = sum_k P@k rel_k / #relevant retrieved (0 when none)."""
    found, total = 0, 0.0
    for k, r in enumerate(rel, start=1):
        if r:
            found += 1
            total += found / k
    return total / found if found else 0.0


def ref_sign(h):
    """+-1 signs, sign(0) = +1."""
    return np.where(h >= 0, 1.0, -1.0)


def ref_query_ball(hd, ld, hq, lq, radius):
    """(ball size, #relevant in ball, #relevant in db, AP) of one query."""
    K = hd.shape[1]
    dist = (K - ref_sign(hd) @ ref_sign(hq)) / 2
    scores = [float(np.dot(hq, x)) for x in hd]
    relevant = [(np.asarray(labels, float) @ np.asarray(lq, float)) > 0 for labels in ld]
    ball = [i for i in ref_rank(scores) if dist[i] <= radius]
    rel = [relevant[i] for i in ball]
    return len(ball), sum(rel), sum(relevant), ref_ap(rel)


def ref_mean(values):
    """The mean, 0.0 over no value."""
    return sum(values) / len(values) if values else 0.0


def ref_map_at_radius(hd, ld, hq, lq, radius, convention):
    """metrics.map_at_radius: deephash counts an empty ball 0 for precision, recall and AP, and leaves
    a ball with no relevant item out of MAP; mmhh leaves empty balls out of every mean."""
    rows = [ref_query_ball(hd, ld, hq[i], lq[i], radius) for i in range(len(hq))]
    prec = [f / n if n else 0.0 for n, f, _, _ in rows]
    rec = [f / t if t else 0.0 for _, f, t, _ in rows]
    if convention == "deephash":
        aps = [ap for n, f, _, ap in rows if n == 0 or f > 0]
        pr = range(len(rows))
    else:
        aps = [ap for n, f, _, ap in rows if n > 0]
        pr = [i for i, row in enumerate(rows) if row[0] > 0]
    return {"map": ref_mean(aps), "precision": ref_mean([prec[i] for i in pr]),
            "recall": ref_mean([rec[i] for i in pr]),
            "empty_fraction": sum(r[0] == 0 for r in rows) / len(rows)}


def ref_top_rel(hd, ld, hq, lq, top_r, use_sign):
    """Relevance of one query's top R, in rank order (by sign codes when ``use_sign``)."""
    a, b = (ref_sign(hd), ref_sign(hq)) if use_sign else (hd, hq)
    scores = [float(np.dot(b, x)) for x in a]
    return [(np.asarray(ld[i], float) @ np.asarray(lq, float)) > 0 for i in ref_rank(scores)[:top_r]]


def ref_map_at_topk(hd, ld, hq, lq, top_r, use_sign, convention):
    """metrics.map_at_topk: hashnet leaves out queries with no relevant item in the top R, mmhh counts
    them 0."""
    aps = []
    for i in range(len(hq)):
        rel = ref_top_rel(hd, ld, hq[i], lq[i], top_r, use_sign)
        if any(rel) or convention == "mmhh":
            aps.append(ref_ap(rel))
    return ref_mean(aps)


def ref_precision_at_n(hd, ld, hq, lq, top_r):
    """metrics.precision_at_n of the continuous codes: mean over queries of P@N, N = 1..R."""
    rows = [ref_top_rel(hd, ld, hq[i], lq[i], top_r, False) for i in range(len(hq))]
    return [sum(sum(rel[:n]) / n for rel in rows) / len(rows) for n in range(1, top_r + 1)]
