"""Each method's published settings by name (--recipe), every value with its source.

A recipe sets the loss and optimisation flags its authors published; the network, image sizes, code
length and data stay the experiment's choice. Flags given on the command line win over the recipe.
The README's "Reproducing the comparison" section lists the same table.
"""
from dataclasses import dataclass

RELEASE = "the MMHH release's README command"
DEEPHASH = "DeepHash's DCH script and model (thuml/DeepHash)"
HASHNET = "HashNet's PyTorch train.py (thuml/HashNet)"
HASHNET_CAFFE = "HashNet's Caffe configurations (thuml/HashNet, models/train/*/train_val.prototxt)"


@dataclass(frozen=True)
class Setting:
    value: object  # a flag value, or a function of the parsed flags (HashNet's σ = 10/K)
    source: str


RECIPES = {
    "mmhh_release": {
        "distance_type": Setting("MMHH", RELEASE),
        "gamma": Setting(10.0, RELEASE),
        "loss_lambda": Setting(0.001, RELEASE),
        "similar_weight_type": Setting("1", RELEASE),
        "lr": Setting(1e-4, RELEASE),
        "lr_schedule_type": Setting("Stair_Step", RELEASE + " (its default)"),
        "decay_step": Setting(200, RELEASE),
        "weight_decay": Setting(0.1, "the release's default for Stair_Step"),
        "batch_size": Setting(48, RELEASE),
        "num_iters": Setting(1000, RELEASE),
        "radius": Setting(2, RELEASE),
        "opt_test": Setting(True, RELEASE),
    },
    "dch_deephash": {
        "distance_type": Setting("DCH", DEEPHASH),
        "dch_distance": Setting("euclidean", DEEPHASH + ": squared Euclidean distance (normed=False)"),
        "dch_balance": Setting("deephash", DEEPHASH + ": #similar counted over the whole batch matrix, "
                                                      "self-pairs included, then the diagonal masked"),
        "gamma": Setting(20.0, DEEPHASH),
        "loss_lambda": Setting(0.0, DEEPHASH + ": q_lambda 0"),
        "lr": Setting(0.005, DEEPHASH + "; its gradients of biases are scaled 2x, of the last layer's weights "
                                        "10x and bias 20x, ours: hash layer 10x, the rest 1x (README: Differences)"),
        "lr_schedule_type": Setting("Stair_Step", DEEPHASH + ": decay step 10000 > 2000 iterations, so "
                                                           "the rate stays constant"),
        "decay_step": Setting(10000, DEEPHASH),
        "weight_decay": Setting(0.0, DEEPHASH + ": no weight decay in its loss"),
        "batch_size": Setting(128, DEEPHASH),
        "num_iters": Setting(2000, DEEPHASH),
        "radius": Setting(2, "DCH's evaluation (MAP@H<=2)"),
    },
    "hashnet": {
        "distance_type": Setting("HashNet", HASHNET),
        "image_loss_type": Setting("HashNet", HASHNET + ": tanh continuation"),
        "sigmoid_param": Setting(lambda args: 10.0 / args.hash_bit, HASHNET + ": σ = 10/K"),
        "similar_weight_type": Setting("config", "class_num, the dataset's preset, from " + HASHNET_CAFFE +
                                       ": COCO 1, NUS-WIDE 5, ImageNet 100 (train.py takes it as a flag, 1.0 "
                                       "in its README)"),
        "lr": Setting(3e-4, HASHNET),
        "lr_schedule_type": Setting("HashNet_Step", HASHNET + ": halved every 2000 iterations"),
        "weight_decay": Setting(5e-4, HASHNET),
        "batch_size": Setting(72, HASHNET + ": two independently shuffled batches of 36; here the two halves "
                                            "of one shuffled batch of 72"),
        "hashnet_pairing": Setting("halves", HASHNET + ": the loss pairs the first 36 with the second 36 "
                                                       "only, 36 x 36 pairs"),
        "num_iters": Setting(10000, HASHNET + "; its README evaluates snapshot iter_09000, the last it saves "
                                              "(every 3,000 iterations, before the step): the weights after "
                                              "9,000 updates"),
        "radius": Setting(2, "MAP@H<=2, the comparison's metric"),
    },
}


def apply_recipe(args, explicit):
    """Set the recipe's flags on ``args`` except those in ``explicit``; returns (flag, value, source) lines."""
    applied = []
    for flag, setting in RECIPES[args.recipe].items():
        if flag in explicit:
            applied.append((flag, getattr(args, flag), "given on the command line"))
            continue
        value = setting.value(args) if callable(setting.value) else setting.value
        setattr(args, flag, value)
        applied.append((flag, value, setting.source))
    return applied
