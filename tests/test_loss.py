"""Losses and the semi-batch memory against values worked out by hand in plain Python."""
import io
import math

import pytest
import torch

from loss import (
    DISTANCE_TYPES,
    HashingLoss,
    MarginParams,
    SemiBatchMemory,
    cauchy_quantization,
    continuous_hamming,
    dch_pair_loss,
    hashnet_pair_loss,
    label_similarity,
    logcosh_quantization,
    mmhh_pair_loss,
    mmhh_paper_pair_loss,
    parse_margin_params,
    resolve_similar_weight,
)

# Three anchors and three partners, K = 4. Every row but O[2] has equal magnitudes, so its distances are the
# Hamming distances of the sign patterns; H[0] vs O[0] sits exactly on the margin d = 2.
H = [[0.5, 0.5, 0.5, 0.5], [0.9, 0.9, 0.9, -0.9], [0.3, 0.3, -0.3, -0.3]]
O = [[0.6, 0.6, -0.6, -0.6], [-0.7, -0.7, -0.7, 0.7], [0.2, -0.6, 0.4, 0.8]]
L = [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
LO = [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
# Pairs H×O: similar [[1,0,0],[0,0,1],[1,1,1]] -> 5 similar, 4 dissimilar, "auto" = 4/5.
SIGN_DISTANCES = [[2, 3], [1, 4], [0, 3]]  # first two columns of d(H, O)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def hand_distance(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return len(a) / 2 * (1 - dot / norms)


def hand_similar(la, lb):
    return sum(x * y for x, y in zip(la, lb)) > 0


def hand_pairs(rows_a, labels_a, rows_b, labels_b):
    """(d, s, ⟨a, b⟩) for every pair, row-major."""
    return [
        (hand_distance(a, b), hand_similar(la, lb), sum(x * y for x, y in zip(a, b)))
        for a, la in zip(rows_a, labels_a)
        for b, lb in zip(rows_b, labels_b)
    ]


# ---------------------------------------------------------------- distances, similarity, weights

def test_setup_distances_are_the_sign_hamming_distances():
    d = continuous_hamming(t(H), t(O))
    assert torch.allclose(d[:, :2], t(SIGN_DISTANCES), rtol=0, atol=1e-12)
    assert d[0, 0].item() == 2.0  # exactly on the margin
    assert d[:, 2].tolist() == pytest.approx([hand_distance(h, O[2]) for h in H], abs=1e-12)


def test_continuous_hamming_equals_hamming_on_sign_codes():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (5, 16), generator=generator).double() * 2 - 1
    b = torch.randint(0, 2, (7, 16), generator=generator).double() * 2 - 1
    hamming = (a[:, None, :] != b[None, :, :]).sum(-1).double()
    assert torch.allclose(continuous_hamming(a, b), hamming, atol=1e-9)


def test_continuous_hamming_zero_row_gives_half_k_and_finite_gradient():
    a = torch.zeros(2, 6, requires_grad=True)
    b = torch.ones(3, 6)
    d = continuous_hamming(a, b)
    assert torch.equal(d, torch.full((2, 3), 3.0))
    d.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_label_similarity_shares_a_label():
    s = label_similarity(t(L), t(LO))
    assert s.tolist() == [[1, 0, 0], [0, 0, 1], [1, 1, 1]]
    assert label_similarity(t([[0, 0, 0]]), t([[0, 0, 0]])).tolist() == [[0]]


def test_resolve_similar_weight():
    s = label_similarity(t(L), t(LO))
    assert resolve_similar_weight(3, s) == 3.0
    assert resolve_similar_weight("auto", s) == pytest.approx(4 / 5)
    assert resolve_similar_weight("auto", torch.zeros(2, 3)) == 1.0
    with pytest.raises(ValueError, match="similar_weight"):
        resolve_similar_weight("five", s)
    with pytest.raises(ValueError, match="similar_weight"):
        resolve_similar_weight(-1.0, s)


# ---------------------------------------------------------------- margin parameters

@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.3:0.7", MarginParams(0.3, 0.7, 1.0, 1.0, 2.0)),
        ("0.3:0.7:1.5", MarginParams(0.3, 0.7, 1.5, 1.0, 2.0)),
        ("0.3:0.7:1.5:1.2", MarginParams(0.3, 0.7, 1.5, 1.2, 2.0)),
        ("0.3:0.7:1.5:1.2:3", MarginParams(0.3, 0.7, 1.5, 1.2, 3.0)),
    ],
)
def test_parse_margin_params(text, expected):
    assert parse_margin_params(text) == expected


@pytest.mark.parametrize("text", ["", "0.5", "a:b", "1:2:3:4:5:6", "1::2", "-1:0.5", "nan:1", "0.5,0.8"])
def test_parse_margin_params_rejects_bad_text(text):
    with pytest.raises(ValueError) as error:
        parse_margin_params(text)
    message = str(error.value)
    assert "--margin_params" in message and repr(text) in message and "sim_in:dis_in" in message


# ---------------------------------------------------------------- MMHH

def hand_mmhh(similar_weight, gamma, factors):
    """factors = (sim_in, dis_in, sim_out, dis_out, margin) or None."""
    total = 0.0
    pairs = hand_pairs(H, L, O, LO)
    for d, s, _ in pairs:
        w = similar_weight if s else 1.0
        if factors is not None:
            sim_in, dis_in, sim_out, dis_out, margin = factors
            if d <= margin:
                w *= sim_in if s else dis_in
            else:
                w *= sim_out if s else dis_out
        p = 0.5 * gamma / (d + gamma)
        total += w * (math.log(1 / p) if s else math.log(1 / (1 - p)))
    return total / len(pairs)


@pytest.mark.parametrize("similar_weight, resolved", [(3.0, 3.0), ("auto", 0.8)])
def test_mmhh_pair_loss_matches_hand_computation(similar_weight, resolved):
    margin = MarginParams(0.5, 0.8, 1.5, 1.2, 2.0)
    s = label_similarity(t(L), t(LO))
    loss = mmhh_pair_loss(t(H), t(O), s, similar_weight, gamma=2.0, margin=margin)
    assert loss.item() == pytest.approx(hand_mmhh(resolved, 2.0, (0.5, 0.8, 1.5, 1.2, 2.0)), rel=1e-12)


def test_mmhh_pair_loss_without_margin_uses_class_weights_only():
    s = label_similarity(t(L), t(LO))
    loss = mmhh_pair_loss(t(H), t(O), s, 3.0, gamma=2.0, margin=None)
    assert loss.item() == pytest.approx(hand_mmhh(3.0, 2.0, None), rel=1e-12)


def test_mmhh_margin_boundary_is_inclusive():
    h, other, similar = t([[1, 1, 1, 1]]), t([[1, 1, -1, -1]]), t([[1.0]])  # d = 2 exactly
    log_inv_p = math.log((2 + 10) / (0.5 * 10))  # γ = 10
    on_margin = mmhh_pair_loss(h, other, similar, 1.0, 10.0, MarginParams(0.5, 0.8, 1.5, 1.2, 2.0))
    below = mmhh_pair_loss(h, other, similar, 1.0, 10.0, MarginParams(0.5, 0.8, 1.5, 1.2, 1.999))
    assert on_margin.item() == pytest.approx(0.5 * log_inv_p, rel=1e-12)
    assert below.item() == pytest.approx(1.5 * log_inv_p, rel=1e-12)


def test_mmhh_paper_pair_loss_matches_hand_computation():
    total = 0.0
    for d, s, _ in hand_pairs(H, L, O, LO):
        if s:
            total += 3.0 * math.log(1 + max(0.0, d - 2.0))
        else:
            total += math.log(1 + 1 / max(2.0, d))
    s = label_similarity(t(L), t(LO))
    loss = mmhh_paper_pair_loss(t(H), t(O), s, 3.0, margin=2.0)
    assert loss.item() == pytest.approx(total / 9, rel=1e-12)


def test_mmhh_paper_pair_loss_is_finite_for_coincident_dissimilar_codes_with_zero_margin():
    h = t([[1, 1, 1, 1]])
    assert torch.isfinite(mmhh_paper_pair_loss(h, h, t([[0.0]]), 1.0, margin=0.0))


# ---------------------------------------------------------------- DCH

def test_dch_in_batch_with_diagonal_excluded():
    # Off-diagonal pairs of H: d01 = d12 = 1 (dissimilar), d02 = 2 (similar). 6 pairs, 2 similar -> weight 3.
    # γ = 2: p(1) = 2/3, p(2) = 1/2.
    expected = (4 * -math.log(1 - 2 / 3) + 2 * 3 * -math.log(1 / 2)) / 6
    s = label_similarity(t(L), t(L))
    loss = dch_pair_loss(t(H), t(H), s, gamma=2.0, exclude=torch.eye(3, dtype=torch.bool))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_dch_deephash_balance_counts_the_self_pairs_before_masking_them():
    # DeepHash's weight: 9 entries of the 3x3 matrix, 5 similar (the 2 off-diagonal ones and the 3 self-pairs)
    # -> 9/5; the loss still averages the 6 off-diagonal pairs: d01 = d12 = 1 dissimilar, d02 = 2 similar.
    expected = (4 * -math.log(1 - 2 / 3) + 2 * 9 / 5 * -math.log(1 / 2)) / 6
    s = label_similarity(t(L), t(L))
    loss = dch_pair_loss(t(H), t(H), s, gamma=2.0, exclude=torch.eye(3, dtype=torch.bool), balance="deephash")
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    criterion = HashingLoss("DCH", 2.0, 0.0, 1.0, MarginParams(), 1.0, dch_balance="deephash")
    assert criterion(t(H), t(L), t(H), t(L), torch.eye(3, dtype=torch.bool))["pair"].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown DCH balance"):
        HashingLoss("DCH", 2.0, 0.0, 1.0, MarginParams(), 1.0, dch_balance="diagonal")


def test_dch_without_exclusion_matches_hand_computation():
    pairs = hand_pairs(H, L, O, LO)
    similar_weight = len(pairs) / sum(s for _, s, _ in pairs)
    total = 0.0
    for d, s, _ in pairs:
        p = 2.0 / (2.0 + d)
        total += similar_weight * -math.log(p) if s else -math.log(1 - p)
    s = label_similarity(t(L), t(LO))
    assert dch_pair_loss(t(H), t(O), s, gamma=2.0).item() == pytest.approx(total / len(pairs), rel=1e-12)


def test_dch_euclidean_form_matches_deephash_by_hand():
    # DeepHash's DCH: d = ||h_i - h_j||^2 + 0.001, the same cross-entropy and weights.
    pairs = [(sum((x - y) ** 2 for x, y in zip(a, b)) + 0.001, int(any(p and q for p, q in zip(la, lb))))
             for a, la in zip(H, L) for b, lb in zip(O, LO)]
    similar_weight = len(pairs) / sum(s for _, s in pairs)
    total = sum(similar_weight * -math.log(20 / (20 + d)) if s else -math.log(1 - 20 / (20 + d)) for d, s in pairs)
    s = label_similarity(t(L), t(LO))
    loss = dch_pair_loss(t(H), t(O), s, gamma=20.0, distance_form="euclidean")
    assert loss.item() == pytest.approx(total / len(pairs), rel=1e-12)
    criterion = HashingLoss("DCH", 20.0, 0.0, 1.0, MarginParams(), 1.0, dch_distance="euclidean")
    assert criterion(t(H), t(L), t(O), t(LO))["pair"].item() == pytest.approx(loss.item(), rel=1e-12)
    with pytest.raises(ValueError, match="unknown DCH distance"):
        HashingLoss("DCH", 20.0, 0.0, 1.0, MarginParams(), 1.0, dch_distance="manhattan")


def test_dch_is_finite_for_coincident_dissimilar_codes():
    h = t([[0.5, -0.5], [0.5, -0.5]]).requires_grad_()
    loss = dch_pair_loss(h, h, t([[1, 0], [0, 1]]), gamma=2.0, exclude=torch.eye(2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()


# ---------------------------------------------------------------- HashNet

@pytest.mark.parametrize("similar_weight, resolved", [(2.0, 2.0), ("auto", 0.8)])
def test_hashnet_pair_loss_matches_hand_computation(similar_weight, resolved):
    sigmoid_param = 25.0
    pairs = hand_pairs(H, L, O, LO)
    thetas = [sigmoid_param * dot for _, _, dot in pairs]
    assert sum(theta > 15 for theta in thetas) == 2  # one similar (18), one dissimilar (27)
    total, count = 0.0, 0.0
    for (_, s, _), theta in zip(pairs, thetas):
        value = theta * (1 - s) if theta > 15 else math.log(1 + math.exp(theta)) - s * theta
        total += (resolved if s else 1.0) * value
        count += resolved if s else 1.0
    s = label_similarity(t(L), t(LO))
    loss = hashnet_pair_loss(t(H), t(O), s, sigmoid_param, similar_weight)
    assert loss.item() == pytest.approx(total / count, rel=1e-12)


def test_halves_pair_the_first_half_of_the_batch_with_the_second_only():
    # HashNet's pairing: anchors H[0], H[1] against partners O[0], O[1]; the quantization covers all four rows.
    h, labels = torch.cat([t(H[:2]), t(O[:2])]), torch.cat([t(L[:2]), t(LO[:2])])
    sigmoid_param = 0.5
    total, count = 0.0, 0.0
    for _, s, dot in hand_pairs(H[:2], L[:2], O[:2], LO[:2]):  # 4 pairs, 1 similar; every θ below 15
        theta = sigmoid_param * dot
        total += (2.0 if s else 1.0) * (math.log(1 + math.exp(theta)) - s * theta)
        count += 2.0 if s else 1.0
    criterion = HashingLoss("HashNet", 2.0, 0.25, 2.0, MarginParams(), sigmoid_param)
    out = criterion(h, labels, h, labels, torch.eye(4, dtype=torch.bool), halves=True)
    assert out["pair"].item() == pytest.approx(total / count, rel=1e-12)
    assert out["quantization"].item() == pytest.approx(logcosh_quantization(h).item(), rel=1e-12)


def test_hashnet_is_finite_for_huge_inner_products():
    h = t([[1, 1, 1, 1], [-1, -1, -1, -1]]).requires_grad_()
    loss = hashnet_pair_loss(h, h, t([[1, 0], [0, 1]]), sigmoid_param=1000.0, similar_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()


# ---------------------------------------------------------------- quantization

def test_logcosh_quantization_matches_hand_computation():
    expected = sum(math.log(math.cosh(abs(x) - 1)) for row in O for x in row) / 3
    assert logcosh_quantization(t(O)).item() == pytest.approx(expected, rel=1e-12)


def test_logcosh_quantization_does_not_overflow():
    value = logcosh_quantization(torch.tensor([[1e4, -1e4]])).item()  # float32 cosh(9999) is inf
    assert value == pytest.approx(2 * (9999 - math.log(2)), rel=1e-6)


def test_cauchy_quantization_matches_hand_computation():
    expected = sum(math.log(1 + hand_distance([abs(x) for x in row], [1] * 4) / 2.0) for row in O) / 3
    assert cauchy_quantization(t(O), gamma=2.0).item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- HashingLoss

@pytest.mark.parametrize("distance_type", DISTANCE_TYPES)
def test_hashing_loss_total_is_pair_plus_lambda_quantization(distance_type):
    criterion = HashingLoss(distance_type, 2.0, 0.25, 2.0, MarginParams(), 0.5)
    out = criterion(t(H), t(L), t(O), t(LO))
    expected_q = cauchy_quantization(t(H), 2.0) if distance_type == "DCH" else logcosh_quantization(t(H))
    assert out["quantization"].item() == pytest.approx(expected_q.item(), rel=1e-12)
    assert out["total"].item() == pytest.approx(out["pair"].item() + 0.25 * expected_q.item(), rel=1e-12)


def test_hashing_loss_zero_lambda_total_is_pair():
    out = HashingLoss("MMHH", 2.0, 0.0, 1.0, MarginParams(), 1.0)(t(H), t(L), t(O), t(LO))
    assert out["total"] is out["pair"] and out["quantization"].item() > 0


def test_hashing_loss_passes_exclude_to_dch_only():
    exclude = torch.eye(3, dtype=torch.bool)
    mmhh = HashingLoss("MMHH", 2.0, 0.0, 1.0, MarginParams(), 1.0)
    dch = HashingLoss("DCH", 2.0, 0.0, 1.0, MarginParams(), 1.0)
    assert mmhh(t(H), t(L), t(H), t(L), exclude)["pair"].item() == mmhh(t(H), t(L), t(H), t(L))["pair"].item()
    assert dch(t(H), t(L), t(H), t(L), exclude)["pair"].item() != dch(t(H), t(L), t(H), t(L))["pair"].item()


def test_hashing_loss_rejects_unknown_settings():
    with pytest.raises(ValueError, match="distance type"):
        HashingLoss("Hamming", 2.0, 0.0, 1.0, MarginParams(), 1.0)
    with pytest.raises(ValueError, match="similar_weight"):
        HashingLoss("MMHH", 2.0, 0.0, "config", MarginParams(), 1.0)


@pytest.mark.parametrize("distance_type", DISTANCE_TYPES)
@pytest.mark.parametrize("partner", ["batch", "memory"])
def test_gradients_flow_to_h(distance_type, partner):
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(6, 8, generator=generator).tanh().requires_grad_()
    labels = torch.eye(3)[torch.randint(0, 3, (6,), generator=generator)]
    memory = SemiBatchMemory(10, 8, 3, "SemiMem" if partner == "memory" else "PairBatch", total_iters=10)
    memory.initialize_random(generator)
    memory.set_labels(torch.eye(3)[torch.randint(0, 3, (10,), generator=generator)])
    other_h, other_labels, exclude = memory.partner_set(h, labels, torch.arange(6), iteration=0)
    criterion = HashingLoss(distance_type, 2.0, 0.1, "auto" if distance_type != "DCH" else 1.0, MarginParams(), 0.5)
    criterion(h, labels, other_h, other_labels, exclude)["total"].backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


# ---------------------------------------------------------------- semi-batch memory

def test_batch_init_mem_warm_up_then_memory():
    memory = SemiBatchMemory(5, 2, 1, "BatchInitMem", total_iters=10, warmup_iters=2)
    assert [memory.uses_memory(i) for i in range(4)] == [False, False, True, True]
    assert memory.momentum(0) == memory.momentum(1) == 0.0
    assert memory.momentum(2) == pytest.approx(0.5 + 0.5 * math.sqrt(0.2))
    memory.codes.fill_(7.0)
    memory.update(torch.tensor([1, 3]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), iteration=1)
    assert memory.codes.tolist() == [[7, 7], [1, 2], [7, 7], [3, 4], [7, 7]]  # overwritten, μ = 0


def test_momentum_schedule_and_modes():
    semi = SemiBatchMemory(3, 2, 1, "SemiMem", total_iters=16, init_momentum=0.5)
    assert semi.uses_memory(0)
    assert [semi.momentum(i) for i in (0, 4, 16)] == pytest.approx([0.5, 0.75, 1.0])
    pair = SemiBatchMemory(3, 2, 1, "PairBatch", total_iters=16)
    assert not any(pair.uses_memory(i) for i in (0, 300, 10_000))
    pair.update(torch.tensor([0]), torch.ones(1, 2), iteration=5)
    assert not pair.codes.any()
    with pytest.raises(ValueError, match="batch type"):
        SemiBatchMemory(3, 2, 1, "BatchSelectMem", total_iters=16)


def test_update_rule_with_momentum():
    memory = SemiBatchMemory(3, 2, 1, "SemiMem", total_iters=16)
    memory.initialize_codes(torch.tensor([[2.0, 0.0], [0.0, 4.0], [1.0, 1.0]]))
    h = torch.tensor([[0.0, 2.0]], requires_grad=True)
    memory.update(torch.tensor([1]), h, iteration=4)  # μ = 0.75
    assert memory.codes.tolist() == [[2, 0], [0, 0.75 * 4 + 0.25 * 2], [1, 1]]
    assert not memory.codes.requires_grad


def test_update_rule_with_normalisation_and_zero_row():
    memory = SemiBatchMemory(2, 2, 1, "SemiMem", total_iters=16, normalize=True)
    memory.initialize_codes(torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    memory.update(torch.tensor([0, 1]), torch.tensor([[1.0, 4.0], [0.0, 0.0]]), iteration=0)  # μ = 0.5
    assert memory.codes[0].tolist() == pytest.approx([2 / math.sqrt(8), 2 / math.sqrt(8)])
    assert memory.codes[1].tolist() == [0.0, 0.0]


def test_partner_set_exclude_masks():
    memory = SemiBatchMemory(5, 2, 3, "BatchInitMem", total_iters=10, warmup_iters=1)
    memory.set_labels(torch.eye(3)[[0, 1, 2, 0, 1]])
    h, labels, indices = torch.randn(2, 2), torch.eye(3)[[2, 0]], torch.tensor([4, 1])
    other_h, other_labels, exclude = memory.partner_set(h, labels, indices, iteration=0)
    assert other_h is h and other_labels is labels and torch.equal(exclude, torch.eye(2, dtype=torch.bool))
    other_h, other_labels, exclude = memory.partner_set(h, labels, indices, iteration=1)
    assert other_h.shape == (5, 2) and torch.equal(other_labels, memory.labels)
    assert exclude.tolist() == [[False, False, False, False, True], [False, True, False, False, False]]


def test_initialize_random_is_reproducible():
    a = SemiBatchMemory(4, 3, 1, "SemiMem", total_iters=10)
    b = SemiBatchMemory(4, 3, 1, "SemiMem", total_iters=10)
    a.initialize_random(torch.Generator().manual_seed(5))
    b.initialize_random(torch.Generator().manual_seed(5))
    assert torch.equal(a.codes, b.codes) and a.codes.std() > 0


def test_state_dict_round_trip(tmp_path):
    memory = SemiBatchMemory(4, 3, 2, "SemiMem", total_iters=10)
    memory.initialize_random(torch.Generator().manual_seed(2))
    memory.set_labels(torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]))
    torch.save(memory.state_dict(), tmp_path / "memory.pt")
    restored = SemiBatchMemory(4, 3, 2, "SemiMem", total_iters=10)
    restored.load_state_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
    assert torch.equal(restored.codes, memory.codes) and torch.equal(restored.labels, memory.labels)


def test_state_dict_is_a_copy():
    memory = SemiBatchMemory(2, 2, 1, "SemiMem", total_iters=10)
    state = memory.state_dict()
    memory.codes.fill_(1.0)
    assert not state["codes"].any()


def test_load_state_dict_shape_mismatch():
    buffer = io.BytesIO()
    torch.save(SemiBatchMemory(4, 3, 2, "SemiMem", total_iters=10).state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    with pytest.raises(ValueError, match=r"codes shape mismatch.*\(4, 3\).*\(5, 3\)"):
        SemiBatchMemory(5, 3, 2, "SemiMem", total_iters=10).load_state_dict(state)
    with pytest.raises(ValueError, match="labels shape mismatch"):
        SemiBatchMemory(4, 3, 7, "SemiMem", total_iters=10).load_state_dict(state)
    with pytest.raises(ValueError, match="no 'labels' entry"):
        SemiBatchMemory(4, 3, 2, "SemiMem", total_iters=10).load_state_dict({"codes": state["codes"]})
