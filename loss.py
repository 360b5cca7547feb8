"""Pairwise hashing losses, quantization penalties and the semi-batch memory.

The losses follow the MMHH paper (Kang et al., ICCV 2019) and its release; DCH (Cao et al., CVPR 2018)
and HashNet (Cao et al., ICCV 2017) are the baselines. The README lists where we differ from the release.

Notation: `h` is a batch of network outputs (B, K) in (-1, 1), `h_other` its partner set (N, K) (the
batch itself or the memory), `similarity` the (B, N) 0/1 matrix of pairs that share a label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCE_TYPES = ("MMHH", "MMHH_paper", "DCH", "HashNet")
BATCH_TYPES = ("PairBatch", "BatchInitMem", "SemiMem")
DCH_DISTANCES = ("cosine", "euclidean")
# Which pairs DCH's similar weight #pairs / #similar counts: the whole matrix with its self-pairs, as DeepHash's
# code counts before it masks the diagonal, or only the pairs the loss scores (README: Differences).
DCH_BALANCES = ("deephash", "offdiagonal")
# HashNet pairs two half-batches with each other only; "all" pairs every image of the batch with every other.
HASHNET_PAIRINGS = ("halves", "all")
# DeepHash's DCH adds this to its squared Euclidean distance, so coincident codes keep a finite loss.
DEEPHASH_DISTANCE_OFFSET = 0.001

# Above this θ HashNet switches log(1 + e^θ) − sθ for its linear asymptote (HashNet's l_threshold).
HASHNET_LINEAR_THRESHOLD = 15.0
# MMHH's probability p = α γ / (d + γ) never exceeds α, so a similar pair is never fully "certain".
MMHH_ALPHA = 0.5
# Keeps logs of probabilities and divisions by distances finite.
LOG_EPS = 1e-12

MARGIN_PARAMS_FORM = "sim_in:dis_in[:sim_out[:dis_out[:margin]]]"


@dataclass(frozen=True)
class MarginParams:
    """MMHH margin re-weighting: weight factors inside / outside the Hamming ball of radius `margin`."""

    sim_in: float = 0.5
    dis_in: float = 0.8
    sim_out: float = 1.0
    dis_out: float = 1.0
    margin: float = 2.0


def parse_margin_params(text: str) -> MarginParams:
    """Parse `sim_in:dis_in[:sim_out[:dis_out[:margin]]]` (2 to 5 non-negative numbers); missing fields default."""
    fields = text.split(":")
    try:
        values = [float(field) for field in fields]
    except ValueError:
        values = []
    if not 2 <= len(values) <= 5 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(
            f"--margin_params: cannot parse {text!r}; expected {MARGIN_PARAMS_FORM}, "
            "2 to 5 non-negative numbers separated by ':', e.g. 0.5:0.8:1.0:1.0:2.0"
        )
    return MarginParams(*values)


def sigmoid_param_value(value: float | str, hash_bit: int) -> float:
    """HashNet's σ for a code length from --sigmoid_param: a positive number, or 'C/K' for C / hash_bit."""
    text = str(value)
    try:
        number = float(text[:-2] if text.endswith("/K") else text)
    except ValueError:
        number = -1.0
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"--sigmoid_param: cannot parse {text!r}; expected a positive number or C/K "
                         "(C over the code length), e.g. 0.5 or 10/K")
    return number / hash_bit if text.endswith("/K") else number


class HashingLoss:
    """Pair loss of the chosen distance type plus λ times its quantization penalty.

    Quantization is log-cosh for MMHH, MMHH_paper and HashNet, Cauchy for DCH. It is always returned
    (for logging), but added to the total only when `loss_lambda` is non-zero.
    """

    def __init__(self, distance_type: str, gamma: float, loss_lambda: float, similar_weight: float | str,
                 margin: MarginParams, sigmoid_param: float, dch_distance: str = "cosine",
                 dch_balance: str = "offdiagonal"):
        if distance_type not in DISTANCE_TYPES:
            raise ValueError(f"unknown distance type {distance_type!r}; expected one of {', '.join(DISTANCE_TYPES)}")
        if dch_distance not in DCH_DISTANCES:
            raise ValueError(f"unknown DCH distance {dch_distance!r}; expected one of {', '.join(DCH_DISTANCES)}")
        if dch_balance not in DCH_BALANCES:
            raise ValueError(f"unknown DCH balance {dch_balance!r}; expected one of {', '.join(DCH_BALANCES)}")
        self.dch_distance = dch_distance
        self.dch_balance = dch_balance
        self.distance_type = distance_type
        self.gamma = gamma
        self.loss_lambda = loss_lambda
        self.similar_weight = checked_similar_weight(similar_weight)
        self.margin = margin
        self.sigmoid_param = sigmoid_param

    def __call__(self, h: Tensor, labels: Tensor, other_h: Tensor, other_labels: Tensor,
                 exclude: Tensor | None = None, halves: bool = False) -> dict[str, Tensor]:
        """Return {"total", "pair", "quantization"}; `exclude` (B, N) bool only affects DCH.

        `halves` (the batch paired with itself, B even) pairs the batch's first half with its second half
        only, as HashNet's two half-batches, instead of `other_h`; the quantization still covers all of `h`.
        """
        anchors, anchor_labels = h, labels
        if halves:
            anchors, anchor_labels, other_h, other_labels = batch_halves(h, labels)
            exclude = None  # the two halves hold different images
        similarity = label_similarity(anchor_labels, other_labels)  # (B, N), or (B/2, B/2) in halves
        pair = self._pair_loss(anchors, other_h, similarity, exclude)
        if self.distance_type == "DCH":
            quantization = cauchy_quantization(h, self.gamma)
        else:
            quantization = logcosh_quantization(h)
        total = pair + self.loss_lambda * quantization if self.loss_lambda != 0 else pair
        return {"total": total, "pair": pair, "quantization": quantization}

    def _pair_loss(self, h: Tensor, other_h: Tensor, similarity: Tensor, exclude: Tensor | None) -> Tensor:
        if self.distance_type == "MMHH":
            return mmhh_pair_loss(h, other_h, similarity, self.similar_weight, self.gamma, self.margin)
        if self.distance_type == "MMHH_paper":
            return mmhh_paper_pair_loss(h, other_h, similarity, self.similar_weight, self.margin.margin)
        if self.distance_type == "DCH":
            return dch_pair_loss(h, other_h, similarity, self.gamma, exclude, self.dch_distance, self.dch_balance)
        return hashnet_pair_loss(h, other_h, similarity, self.sigmoid_param, self.similar_weight)


class SemiBatchMemory:
    """The paper's augmented memory (semi-batch optimisation): one row of outputs and labels per training image.

    `PairBatch` never uses it; `BatchInitMem` pairs in-batch and overwrites its rows (momentum 0) for the
    first `warmup_iters` iterations, then pairs the batch against the whole memory; `SemiMem` pairs against
    the memory from the start. Iterations are 0-based.
    """

    def __init__(self, num_items: int, hash_bit: int, num_labels: int, batch_type: str, total_iters: int,
                 warmup_iters: int = 300, init_momentum: float = 0.5, normalize: bool = False,
                 device: str | torch.device = "cpu"):
        if batch_type not in BATCH_TYPES:
            raise ValueError(f"unknown batch type {batch_type!r}; expected one of {', '.join(BATCH_TYPES)}")
        if total_iters <= 0:
            raise ValueError(f"total_iters must be positive, got {total_iters}")
        if not 0.0 <= init_momentum <= 1.0:
            raise ValueError(f"init_momentum must lie in [0, 1], got {init_momentum}")
        self.batch_type = batch_type
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.init_momentum = init_momentum
        self.normalize = normalize
        self.codes = torch.zeros(num_items, hash_bit, dtype=torch.float32, device=device)  # (N, K)
        self.labels = torch.zeros(num_items, num_labels, dtype=torch.float32, device=device)  # (N, C)

    def initialize_random(self, generator: torch.Generator | None = None) -> None:
        """Fill the codes with N(0, 1) draws, as the release's `torch.randn` initialisation."""
        # Drawn on the generator's device so a seed gives the same memory whatever device it lives on.
        draw_device = generator.device if generator is not None else "cpu"
        draws = torch.randn(self.codes.shape, generator=generator, device=draw_device)
        self.codes.copy_(draws)

    def initialize_codes(self, codes: Tensor) -> None:
        """Fill the codes (N, K) with the model's encoding of the training set."""
        _check_shape("codes", tuple(codes.shape), tuple(self.codes.shape))
        self.codes.copy_(codes.detach())

    def set_labels(self, labels: Tensor) -> None:
        """Fill the label rows (N, C)."""
        _check_shape("labels", tuple(labels.shape), tuple(self.labels.shape))
        self.labels.copy_(labels.detach())

    def uses_memory(self, iteration: int) -> bool:
        """Whether this iteration pairs the batch against the memory instead of itself."""
        if self.batch_type == "PairBatch":
            return False
        if self.batch_type == "BatchInitMem":
            return iteration >= self.warmup_iters
        return True

    def momentum(self, iteration: int) -> float:
        """μ = μ0 + (1 − μ0) sqrt(t / T); 0 during the BatchInitMem warm-up."""
        if self.batch_type == "BatchInitMem" and iteration < self.warmup_iters:
            return 0.0
        # Past T (a resumed run trained longer) μ would exceed 1 and extrapolate; hold it at 1.
        progress = min(iteration / self.total_iters, 1.0)
        return self.init_momentum + (1.0 - self.init_momentum) * math.sqrt(progress)

    @torch.no_grad()
    def update(self, indices: Tensor, h_batch: Tensor, iteration: int) -> None:
        """m[idx] = μ m[idx] + (1 − μ) h, optionally L2-normalised per row; nothing for PairBatch."""
        if self.batch_type == "PairBatch":
            return
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.codes.device)
        mu = self.momentum(iteration)
        rows = mu * self.codes[indices] + (1.0 - mu) * h_batch.detach().to(self.codes)  # (B, K)
        if self.normalize:
            rows = F.normalize(rows, dim=1, eps=1e-6)
        self.codes[indices] = rows

    def partner_set(self, h: Tensor, labels: Tensor, indices: Tensor, iteration: int) -> tuple[Tensor, Tensor, Tensor]:
        """(other_h, other_labels, exclude): the batch itself or the memory; `exclude` marks each anchor's own pair."""
        batch_size = h.shape[0]
        if not self.uses_memory(iteration):
            exclude = torch.eye(batch_size, dtype=torch.bool, device=h.device)  # (B, B)
            return h, labels, exclude
        indices = torch.as_tensor(indices, dtype=torch.long, device=h.device)
        exclude = torch.zeros(batch_size, self.codes.shape[0], dtype=torch.bool, device=h.device)  # (B, N)
        exclude[torch.arange(batch_size, device=h.device), indices] = True
        return self.codes.to(dtype=h.dtype), self.labels, exclude

    def state_dict(self) -> dict[str, Tensor]:
        """Codes and labels on the CPU; the schedule is configuration and comes from the constructor."""
        return {"codes": self.codes.to("cpu", copy=True), "labels": self.labels.to("cpu", copy=True)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore codes and labels saved by `state_dict`; ValueError when they do not fit this memory."""
        for name in ("codes", "labels"):
            if name not in state:
                raise ValueError(f"memory snapshot has no {name!r} entry (found: {', '.join(sorted(state))})")
            _check_shape(name, tuple(state[name].shape), tuple(getattr(self, name).shape))
        self.codes.copy_(state["codes"])
        self.labels.copy_(state["labels"])


def _check_shape(name: str, got: tuple, expected: tuple) -> None:
    if got != expected:
        raise ValueError(f"memory {name} shape mismatch: got {got}, this memory holds {expected}")


def mmhh_pair_loss(h: Tensor, h_other: Tensor, similarity: Tensor, similar_weight: float | str, gamma: float,
                   margin: MarginParams | None) -> Tensor:
    """MMHH as released: weighted cross-entropy of p = α γ / (d + γ), mean over all B×N entries.

    `margin=None` leaves the class weights without margin re-weighting.
    """
    distance = continuous_hamming(h, h_other)  # (B, N)
    similarity = similarity.to(distance.dtype)
    weight = class_weights(similarity, resolve_similar_weight(similar_weight, similarity))
    if margin is not None:
        weight = weight * margin_factors(distance.detach(), similarity, margin)
    prob = MMHH_ALPHA * gamma / (distance + gamma)
    # p <= α < 1, so neither log can see 0.
    nll = similarity * -torch.log(prob) + (1 - similarity) * -torch.log1p(-prob)
    return (weight * nll).mean()


def mmhh_paper_pair_loss(h: Tensor, h_other: Tensor, similarity: Tensor, similar_weight: float | str,
                         margin: float) -> Tensor:
    """MMHH as restated from the paper (reconstructed, see the README): hard margin ζ inside a t-distribution.

    Similar pairs pay log(1 + max(0, d − ζ)), dissimilar ones log(1 + 1 / max(ζ, d)); class-weighted,
    mean over all B×N entries as in the released form.
    """
    distance = continuous_hamming(h, h_other)  # (B, N)
    similarity = similarity.to(distance.dtype)
    weight = class_weights(similarity, resolve_similar_weight(similar_weight, similarity))
    similar_nll = torch.log1p(torch.relu(distance - margin))
    # With ζ = 0 a coincident dissimilar pair would divide by zero.
    dissimilar_nll = torch.log1p(1.0 / torch.clamp(distance, min=margin).clamp_min(LOG_EPS))
    return (weight * (similarity * similar_nll + (1 - similarity) * dissimilar_nll)).mean()


def dch_pair_loss(h: Tensor, h_other: Tensor, similarity: Tensor, gamma: float, exclude: Tensor | None = None,
                  distance_form: str = "cosine", balance: str = "offdiagonal") -> Tensor:
    """Deep Cauchy Hashing: cross-entropy of p = γ / (γ + d).

    Over the pairs not in `exclude` (B, N) bool: similar pairs weighted by `dch_similar_weight`, dissimilar
    1, and the weighted sum divided by the number of those pairs (0 when every pair is excluded).
    `distance_form` "cosine" is the continuous Hamming distance K/2 (1 − cos); "euclidean" is DeepHash's
    DCH code: ‖h_i − h_j‖² + 0.001, about 4× the Hamming distance on near-binary codes, so the same γ
    means 4× less there.
    """
    if distance_form == "euclidean":
        distance = squared_euclidean(h, h_other) + DEEPHASH_DISTANCE_OFFSET  # (B, N)
    else:
        distance = continuous_hamming(h, h_other)  # (B, N)
    similarity = similarity.to(distance.dtype)
    kept = torch.ones_like(similarity, dtype=torch.bool) if exclude is None else ~exclude  # (B, N)
    kept = kept.to(distance.dtype)
    weight = kept * (1 - similarity + similarity * dch_similar_weight(similarity, kept, balance))
    # −log p = log(1 + d/γ) and −log(1 − p) = log(1 + γ/d); d is clamped so coincident codes stay finite.
    similar_nll = torch.log1p(distance.clamp_min(0) / gamma)
    dissimilar_nll = torch.log1p(gamma / distance.clamp_min(LOG_EPS))
    nll = similarity * similar_nll + (1 - similarity) * dissimilar_nll
    return (weight * nll).sum() / kept.sum().clamp_min(1)


def dch_similar_weight(similarity: Tensor, kept: Tensor, balance: str) -> Tensor:
    """#pairs / #similar pairs, over the `kept` pairs ("offdiagonal") or over the whole (B, N) matrix, the
    excluded self-pairs included ("deephash": DeepHash's DCH counts them, then masks the diagonal).

    Self-pairs are similar unless the label row is all zero, so "deephash" weighs similar pairs less, and
    the loss is lower, when similar pairs are rare.
    """
    counted = kept if balance == "offdiagonal" else torch.ones_like(kept)
    # Without a counted similar pair the weight multiplies nothing, so the clamp changes no value.
    return counted.sum() / (similarity * counted).sum().clamp_min(1)


def hashnet_pair_loss(h: Tensor, h_other: Tensor, similarity: Tensor, sigmoid_param: float,
                      similar_weight: float | str) -> Tensor:
    """HashNet: log(1 + e^θ) − sθ with θ = σ ⟨h_i, h_j⟩ (linear θ(1 − s) above θ = 15).

    Similar pairs weighted `similar_weight`; the weighted sum is divided by similar_weight·#similar + #dissimilar.
    """
    theta = sigmoid_param * h @ h_other.T  # (B, N)
    similarity = similarity.to(theta.dtype)
    similar_weight = resolve_similar_weight(similar_weight, similarity)
    # Clamping the smooth branch keeps exp finite where the linear branch is taken (and its gradient NaN-free).
    smooth = torch.log1p(torch.exp(theta.clamp(max=HASHNET_LINEAR_THRESHOLD))) - similarity * theta
    linear = theta * (1 - similarity)
    pair_loss = torch.where(theta > HASHNET_LINEAR_THRESHOLD, linear, smooth)
    weight = class_weights(similarity, similar_weight)
    num_similar = similarity.sum()
    return (weight * pair_loss).sum() / (similar_weight * num_similar + (similarity.numel() - num_similar))


def batch_halves(h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, K), (B, C) -> the first half's codes and labels, then the second half's: HashNet's two half-batches."""
    half = h.shape[0] // 2
    return h[:half], labels[:half], h[half:], labels[half:]


def logcosh_quantization(h: Tensor) -> Tensor:
    """(1/B) Σ_i Σ_k log cosh(|h_ik| − 1): pulls every output towards ±1."""
    x = (h.abs() - 1).abs()
    # log cosh x = x + log(1 + e^{−2x}) − log 2, which cannot overflow for large x.
    log_cosh = x + F.softplus(-2 * x) - math.log(2.0)
    return log_cosh.sum() / h.shape[0]


def cauchy_quantization(h: Tensor, gamma: float) -> Tensor:
    """DCH's quantization: mean over the batch of log(1 + d(|h_i|, 1) / γ)."""
    ones = torch.ones(1, h.shape[1], dtype=h.dtype, device=h.device)  # (1, K)
    distance = continuous_hamming(h.abs(), ones)  # (B, 1)
    return torch.log1p(distance.clamp_min(0) / gamma).mean()


def label_similarity(labels_a: Tensor, labels_b: Tensor) -> Tensor:
    """(B, C), (N, C) -> (B, N) float: 1 where the two label rows share at least one label."""
    return (labels_a.float() @ labels_b.float().T > 0).float()


def continuous_hamming(h_a: Tensor, h_b: Tensor, eps: float = 1e-6) -> Tensor:
    """(B, K), (N, K) -> (B, N): K/2 (1 − cos), the Hamming distance on ±1 codes; a zero row gives K/2."""
    cosine = F.normalize(h_a, dim=1, eps=eps) @ F.normalize(h_b, dim=1, eps=eps).T  # (B, N)
    return h_a.shape[1] / 2.0 * (1.0 - cosine)


def squared_euclidean(h_a: Tensor, h_b: Tensor) -> Tensor:
    """(B, K), (N, K) -> (B, N): ‖a − b‖², clamped at 0 against rounding."""
    squared = (h_a * h_a).sum(1, keepdim=True) - 2 * h_a @ h_b.T + (h_b * h_b).sum(1)
    return squared.clamp_min(0)


def resolve_similar_weight(similar_weight: float | str, similarity: Tensor) -> float:
    """A number is returned as is; "auto" gives #dissimilar / #similar of this pair matrix.

    The release divides by #similar unguarded and crashes on a matrix without similar pairs; here such a
    matrix gives 1.0 (the weight multiplies no pair then, so the loss does not depend on it).
    """
    similar_weight = checked_similar_weight(similar_weight)
    if similar_weight != "auto":
        return similar_weight
    num_similar = int(similarity.count_nonzero().item())
    num_dissimilar = similarity.numel() - num_similar
    return num_dissimilar / num_similar if num_similar > 0 else 1.0


def checked_similar_weight(similar_weight: float | str) -> float | str:
    """Return "auto" as is and a number as a float; ValueError for anything else or a negative number."""
    if similar_weight == "auto":
        return similar_weight
    if isinstance(similar_weight, str) or not similar_weight >= 0:
        raise ValueError(f"similar_weight must be a non-negative number or 'auto', got {similar_weight!r}")
    return float(similar_weight)


def class_weights(similarity: Tensor, similar_weight: float) -> Tensor:
    """(B, N): `similar_weight` on similar pairs, 1 on dissimilar ones."""
    return 1 - similarity + similarity * similar_weight


def margin_factors(distance: Tensor, similarity: Tensor, margin: MarginParams) -> Tensor:
    """(B, N) weight factors: sim_in / dis_in inside the ball d <= margin (inclusive), sim_out / dis_out outside."""
    inside_factor = similarity * margin.sim_in + (1 - similarity) * margin.dis_in
    outside_factor = similarity * margin.sim_out + (1 - similarity) * margin.dis_out
    return torch.where(distance <= margin.margin, inside_factor, outside_factor)
