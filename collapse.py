"""Collapse: the signs that a hashing network's codes have collapsed.

A collapsed network gives (nearly) every image the same sign code: its outputs sit at ±1 where tanh
passes no gradient, a bit takes the same sign everywhere, and MAP drops to chance level (the share of
relevant items). Nothing in the loss says so, so training and evaluation watch for it here.
"""
import torch

# |h| above this is saturated: tanh's gradient there is below 0.02.
SATURATION = 0.99
# Training warns after this many iterations in a row in which at least this share of the outputs is
# saturated, or the batch's bit balance is at least this high (every image has the same code).
SATURATED_SHARE = 0.99
CONSTANT_BALANCE = 0.99
COLLAPSE_PATIENCE = 50
ADVICE = ("Likely cause: the outputs saturated early (too high a --lr, or a --sigmoid_param too large for "
          "it), so tanh stopped passing gradient. Try a 10x lower --lr, a smaller --sigmoid_param (HashNet: "
          "10/K), or the method's published settings with --recipe.")


def batch_health(h):
    """(B, K) outputs -> (saturated share, bit balance) as 0-d tensors, without a host synchronisation.

    Bit balance is the mean over bits of |mean sign|: 0 when every bit splits the batch evenly, 1 when
    every bit has one sign throughout.
    """
    saturated = (h.abs() > SATURATION).float().mean()
    signs = torch.where(h >= 0, 1.0, -1.0)
    return saturated, signs.mean(0).abs().mean()


def code_health(codes):
    """Distinct sign codes, bit balance and constant bits of (N, K) codes (sign(0) = +1, as the metrics)."""
    signs = codes >= 0  # (N, K)
    per_bit = (2.0 * signs.double() - 1).mean(0).abs()  # (K,)
    distinct = int(torch.unique(signs, dim=0).shape[0]) if len(signs) else 0
    return {"distinct_codes": distinct, "bit_balance": float(per_bit.mean()) if len(signs) else 0.0,
            "constant_bits": int((per_bit == 1).sum())}


def collapse_warning(health, num_codes, hash_bit, num_labels):
    """A warning naming the cause and the fix when the codes have collapsed, else None.

    Collapsed: fewer distinct database codes than the label columns they should tell apart, or every
    bit constant. Not a share of the database: ideal codes of 10 classes are 10 codes, and a healthy
    16-bit run on Fashion-MNIST (MAP@H<=2 0.80) had 591 among 69,000.
    """
    if num_codes == 0:
        return None
    too_few = health["distinct_codes"] < max(2, num_labels)
    if not (too_few or health["constant_bits"] == hash_bit):
        return None
    return (f"codes collapsed: {health['distinct_codes']} distinct sign codes among {num_codes} database "
            f"items for {num_labels} labels, {health['constant_bits']} of {hash_bit} bits constant (bit "
            f"balance {health['bit_balance']:.3f}), so Hamming balls cannot tell the labels apart. {ADVICE}")


class CollapseWatch:
    """Counts training iterations in a row whose batch looks collapsed; warns once at the patience.

    A batch looks collapsed when nearly all its outputs are saturated, or when nearly every bit has
    one sign across the whole batch (every image gets the same code).
    """

    def __init__(self, patience=COLLAPSE_PATIENCE):
        self.patience = patience
        self.streak = 0
        self.warned = False

    def update(self, saturated_share, bit_balance, iteration):
        """The warning to log at 0-based ``iteration``, or None."""
        saturated = saturated_share >= SATURATED_SHARE
        constant = bit_balance >= CONSTANT_BALANCE
        self.streak = self.streak + 1 if saturated or constant else 0
        if self.warned or self.streak < self.patience:
            return None
        self.warned = True
        symptom = (f"{saturated_share:.1%} of the outputs have |h| > {SATURATION}" if saturated else
                   f"the batch's bits have one sign almost throughout (bit balance {bit_balance:.3f})")
        return (f"iteration {iteration + 1}: {symptom}, for {self.streak} iterations in a row; the codes have "
                f"likely collapsed. {ADVICE}")
