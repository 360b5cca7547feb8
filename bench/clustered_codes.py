"""Synthetic hashing codes clustered by label, shaped like a trained network's outputs.

A trained hashing network maps the images of a class to nearly the same sign code, so a query's
Hamming ball of radius 2 holds a few per cent of the database (the demo's Fashion-MNIST codes: 7%),
not the nothing that random codes give. These codes reproduce that:

* labels: single-label items get one class, uniformly (balanced datasets such as CIFAR-10);
  ``multi_label`` items get a primary label from a Zipf-like popularity (label l with weight
  1 / (l + 1)) and a Poisson(1) number of extra labels from the same popularity, as in NUS-WIDE or
  COCO. Relevance (sharing a label) then also links clusters.
* sign codes: the primary label's centre (a random +-1 vector) with each bit flipped independently
  with probability p.
* continuous codes: ``sign * tanh(a)`` with a ~ |N(2, 0.5)| for kept bits and a ~ |N(0, 0.5)| for
  flipped ones (the network is unsure of the bits it gets wrong), at least 1e-3 so that the sign is
  never lost.

Two items of one cluster differ in Binomial(K, 2p(1 - p)) bits; items of different clusters in
about K / 2, so the mean ball at radius r covers ``sum_l share_l^2 * P(Binomial <= r)`` of the
database. p is solved from that formula (bisection) so that the ball fraction hits
``target_ball_fraction``; ``measured_ball_fraction`` reports what the drawn codes really give.
"""
import math

import numpy as np

BALL_RADIUS = 2


def clustered_codes(n_database, n_queries, bits, n_labels, multi_label, target_ball_fraction, seed=0):
    """Database and query codes (float32) and 0/1 labels (uint8), and a dict describing them.

    Returns ``(database_codes, database_labels, query_codes, query_labels, info)``; ``info`` holds
    ``flip_probability``, ``target_ball_fraction``, ``measured_ball_fraction`` and
    ``mean_ball_size`` (mean over the queries of the radius-2 ball, exact) and ``labels_per_item``.
    """
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_labels + 1) if multi_label else np.ones(n_labels)
    popularity /= popularity.sum()
    flip = flip_probability(bits, popularity, target_ball_fraction)
    centres = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), (n_labels, bits))

    def draw(n):
        primary = rng.choice(n_labels, n, p=popularity)
        labels = np.zeros((n, n_labels), dtype=np.uint8)
        labels[np.arange(n), primary] = 1
        if multi_label:
            extra = rng.poisson(1.0, n)
            rows = np.repeat(np.arange(n), extra)
            labels[rows, rng.choice(n_labels, rows.size, p=popularity)] = 1
        flipped = rng.random((n, bits)) < flip
        signs = np.where(flipped, -centres[primary], centres[primary])
        strength = np.abs(rng.normal(np.where(flipped, 0.0, 2.0), 0.5)).astype(np.float32)
        return signs * np.maximum(np.tanh(strength), 1e-3), labels

    database_codes, database_labels = draw(n_database)
    query_codes, query_labels = draw(n_queries)
    ball = mean_ball_size(database_codes, query_codes, BALL_RADIUS)
    info = {"flip_probability": flip, "target_ball_fraction": target_ball_fraction,
            "measured_ball_fraction": ball / n_database, "mean_ball_size": ball,
            "labels_per_item": float(database_labels.sum(1).mean())}
    return database_codes, database_labels, query_codes, query_labels, info


def flip_probability(bits, popularity, target_ball_fraction, radius=BALL_RADIUS):
    """Per-bit flip probability p whose expected ball fraction at ``radius`` is the target."""
    same_cluster = float(np.sum(popularity ** 2))           # chance that two items share a centre
    if not 0 < target_ball_fraction < same_cluster:
        raise ValueError(f"target_ball_fraction must be in (0, {same_cluster:.4f}) with this label "
                         f"popularity, got {target_ball_fraction}")

    def fraction(p):
        differ = 2 * p * (1 - p)                            # two flipped copies differ in a bit
        return same_cluster * sum(math.comb(bits, k) * differ ** k * (1 - differ) ** (bits - k)
                                  for k in range(radius + 1))

    low, high = 0.0, 0.5                                    # fraction decreases with p
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if fraction(middle) > target_ball_fraction else (low, middle)
    return (low + high) / 2


def mean_ball_size(database_codes, query_codes, radius, block=256):
    """Mean number of database items within Hamming ``radius`` of a query's sign code (sign(0) = +1)."""
    bits = database_codes.shape[1]
    database_signs = np.where(database_codes >= 0, 1.0, -1.0).astype(np.float32)
    query_signs = np.where(query_codes >= 0, 1.0, -1.0).astype(np.float32)
    total = 0
    for start in range(0, len(query_signs), block):
        products = query_signs[start:start + block] @ database_signs.T   # exact: integers in float32
        total += int(np.count_nonzero(products >= bits - 2 * radius))
    return total / len(query_signs)
