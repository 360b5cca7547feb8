"""Train an MMHH hashing network (or the DCH / HashNet baselines), snapshot it, evaluate it at the end.

The original README's command, with our layout:
    python train_mmhh.py --gpu_id=0 --s_dataset="coco_80" --hash_bit=48 --annotation="MMHH-train" \\
        --loss_lambda=0.001 --num_iters=1000 --image_network="AlexNetFc" --batch_size=48 --radius 2 \\
        --distance_type "MMHH" --similar_weight "1" --lr 0.0001 --decay_step 200 --gamma 10.0 --opt-test True
A run interrupted (Ctrl-C, SIGTERM) or stopped continues with ``--resume SNAPSHOT``. On many GPUs, start it
with ``torchrun --nproc_per_node N train_mmhh.py ...`` (README: Many GPUs).
"""
import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tensorboardX import SummaryWriter

import checkpoint
import collapse
import data_list
import distributed
import evaluation
import loss
import network
import recipes
import run_files
from runtime import (
    CliError,
    Stopped,
    StopSignals,
    UsageError,
    autocast,
    format_duration,
    rank_seed,
    run_cli,
    seed_everything,
    setup_logging,
    str2bool,
)

log = logging.getLogger("mmhh")

LR_SCHEDULES = ("Stair_Step", "HashNet_Step", "DANN_INV")
# Weight decay of each schedule when --weight_decay is not given, as released.
DEFAULT_WEIGHT_DECAY = {"Stair_Step": 0.1, "HashNet_Step": 5e-4, "DANN_INV": 5e-4}
# Flags a resumed run may change: where it runs and logs, not what it computes.
RESUME_MAY_CHANGE = {"resume", "gpu_id", "amp", "workers", "snap_path", "log_dir", "runs_dir", "snapshot_interval",
                     "keep_snapshots", "overwrite", "print_every", "check", "test_output_dir", "data_dir", "data_root",
                     "train_list", "test_list", "database_list", "radius", "opt_test", "topk", "test_sample_ratio",
                     "eval_split", "dist_timeout", "sync_bn"}
# Flags that belong to the command at hand, never inherited from the command that wrote the snapshot.
PER_INVOCATION = ("overwrite", "dist_timeout")


def parse_args(argv=None):
    """The parsed flags, and the set of flags given explicitly on the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(parser.parse_args(argv)))
    return args, explicit


def build_parser():
    parser = argparse.ArgumentParser(description="Train an MMHH (or DCH / HashNet) hashing network.")
    run = parser.add_argument_group("run")
    run.add_argument("--gpu_id", default="0", help="CUDA device index; 'cpu' forces the CPU (default 0)")
    run.add_argument("--s_dataset", default="fashion_mnist", help="training dataset name (under --data_dir)")
    run.add_argument("--t_dataset", default="", help="evaluation dataset name (default: --s_dataset)")
    run.add_argument("--annotation", default="empty", help="run name: snapshots, logs and TensorBoard use it")
    run.add_argument("--snap_path", default="snapshot/hash/", help="snapshot file prefix (default snapshot/hash/)")
    run.add_argument("--log_dir", default="log/", help="folder of the log file (default log/)")
    run.add_argument("--runs_dir", default="runs/", help="TensorBoard folder; the run logs to RUNS_DIR/ANNOTATION")
    run.add_argument("--snapshot-interval", dest="snapshot_interval", type=int, default=200,
                     help="write a snapshot every N iterations (default 200), on SIGINT/SIGTERM and at the end")
    run.add_argument("--keep_snapshots", type=int, default=2,
                     help="keep the newest N snapshots of the run (default 2; 0 keeps all); the final one and "
                          "the one a resume started from are never removed")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run of the same --annotation (its snapshots, log, TensorBoard "
                          "events and test output) instead of stopping")
    run.add_argument("--resume", default=None, help="continue the run saved in this snapshot")
    run.add_argument("--pre_model_path", default="",
                     help="initialise the weights from this snapshot; the iteration count starts at 0")
    run.add_argument("--seed", type=int, default=0, help="seed of Python, numpy, torch and the data order")
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                     help="DataLoader worker processes (0: load in the main process)")
    run.add_argument("--print_every", type=int, default=10, help="iterations between progress lines")
    run.add_argument("--check", action="store_true",
                     help="validate lists, images, snapshots and flags, then exit without training")
    run.add_argument("--amp", action="store_true",
                     help="bfloat16 autocast for the network (training and encoding); the loss and the memory "
                          "stay in float32, snapshots hold float32 weights")
    run.add_argument("--mission", default="Hashing", choices=["Hashing"], help="kept from the release")
    run.add_argument("--dist_timeout", type=float, default=600.0,
                     help="under torchrun: seconds a process waits for the others in a collective before it stops "
                          "with an error, so that a dead process does not hang the run (default 600)")
    run.add_argument("--sync_bn", action="store_true",
                     help="under torchrun on GPUs: batch-norm statistics of the global batch (SyncBatchNorm) "
                          "instead of each process's share")

    model = parser.add_argument_group("network")
    model.add_argument("--recipe", default=None, choices=list(recipes.RECIPES),
                       help="apply a method's published loss and optimisation flags (README: Reproducing the "
                            "comparison); flags given explicitly win")
    model.add_argument("--image_network", default="AlexNetFc", choices=list(network.BACKBONES),
                       help="backbone family (default AlexNetFc)")
    model.add_argument("--backbone", default=None,
                       help="ResNet18/34/50/101/152 or VGG11..19[BN] (defaults ResNet50, VGG16)")
    model.add_argument("--pretrained", default="imagenet",
                       help="'imagenet' (torchvision's IMAGENET1K_V1, as the release), 'imagenet_v2', a torchvision "
                            "weights name (e.g. IMAGENET1K_V2), 'none' (from scratch) or a local weights file")
    model.add_argument("--hash_bit", type=int, default=48, help="code length K (default 48)")
    model.add_argument("--image_loss_type", default="DHN", choices=["DHN", "HashNet"],
                       help="HashNet: tanh continuation (scale grows every 200 iterations) and no "
                            "quantization loss, as released; DHN: plain tanh")
    model.add_argument("--resize_size", type=int, default=256, help="images are resized to this square")
    model.add_argument("--crop_size", type=int, default=224, help="then cropped to this square")
    model.add_argument("--crop_scale", type=float, default=0.08,
                       help="smallest area fraction of the training random resized crop (default 0.08, "
                            "torchvision's and HashNet's; 1.0 keeps the whole image)")
    model.add_argument("--no_flip", action="store_true",
                       help="no random horizontal flip in training (for images whose left and right mean "
                            "different things, as the ordered composites of pre_process.py pairs)")

    objective = parser.add_argument_group("loss")
    objective.add_argument("--distance_type", default="MMHH",
                           choices=["MMHH", "MMHH_paper", "DCH", "HashNet", "Hamming"],
                           help="pair loss: MMHH (as released), MMHH_paper (reconstructed paper form), DCH, "
                                "HashNet ('Hamming' is the release's name for HashNet)")
    objective.add_argument("--gamma", type=float, default=1.0, help="γ of the MMHH/DCH probability (default 1)")
    objective.add_argument("--dch_distance", default="cosine", choices=list(loss.DCH_DISTANCES),
                           help="DCH's distance: cosine (continuous Hamming, K/2 (1 - cos)) or euclidean "
                                "(squared, as DeepHash's code; the same γ means about 4x less there)")
    objective.add_argument("--dch_balance", default="offdiagonal", choices=list(loss.DCH_BALANCES),
                           help="DCH's similar-pair weight #pairs/#similar: counted over the pairs the loss "
                                "scores (offdiagonal, default) or over the whole batch matrix, self-pairs "
                                "included, as DeepHash's code (deephash)")
    objective.add_argument("--hashnet_pairing", default="all", choices=list(loss.HASHNET_PAIRINGS),
                           help="HashNet's in-batch pairs: every image with every other, self-pairs included "
                                "(all, default), or the batch's first half with its second half only (halves, "
                                "HashNet's two half-batches of 36)")
    objective.add_argument("--loss_lambda", type=float, default=0.1, help="λ of the quantization loss (default 0.1)")
    objective.add_argument("--sigmoid_param", default="1",
                           help="HashNet's inner-product scale σ: a number, or C/K for C over the code length "
                                "(HashNet's is 10/K)")
    objective.add_argument("--similar_weight_type", "--similar_weight", dest="similar_weight_type", default="config",
                           help="similar-pair weight: 'config' (the dataset's preset), 'auto' "
                                "(#dissimilar/#similar per pair matrix) or a number")
    objective.add_argument("--margin_params", default="0.5:0.8:1.0:1.0:2.0",
                           help="MMHH margin re-weighting sim_in:dis_in[:sim_out[:dis_out[:margin]]]")

    memory = parser.add_argument_group("semi-batch memory")
    memory.add_argument("--batch_type", default=None, choices=list(loss.BATCH_TYPES),
                        help="PairBatch (in-batch), BatchInitMem (warm-up then memory), SemiMem (memory "
                             "throughout); default as released: SemiMem when the similar weight > 100")
    memory.add_argument("--batch_params", default="300", help="warm-up iterations of BatchInitMem (default 300)")
    memory.add_argument("--semi_init_type", default="MODEL", choices=["MODEL", "RANDOM"],
                        help="fill the memory by encoding the training set, or with random values")
    memory.add_argument("--semi_init_momentum", type=float, default=0.5, help="μ0 of the momentum schedule")
    memory.add_argument("--norm_memory_batch", action="store_true", help="L2-normalise updated memory rows")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--num_iters", type=int, default=1000, help="training iterations (default 1000)")
    optimisation.add_argument("--batch_size", type=int, default=48, help="images per batch (default 48)")
    optimisation.add_argument("--lr", type=float, default=3e-4, help="initial learning rate (hash layer: 10x)")
    optimisation.add_argument("--lr_schedule_type", default="Stair_Step", choices=LR_SCHEDULES,
                              help="Stair_Step: halve every --decay_step; HashNet_Step: halve every 2000; "
                                   "DANN_INV: lr (1 + 0.0003 t)^-0.75")
    optimisation.add_argument("--decay_step", type=int, default=200, help="Stair_Step's halving period")
    optimisation.add_argument("--weight_decay", type=float, default=None,
                              help="SGD weight decay (default 0.1 for Stair_Step, 5e-4 for the others, as released)")

    evaluation_flags = parser.add_argument_group("evaluation at the end")
    evaluation_flags.add_argument("--radius", type=int, default=0,
                            help="Hamming radius r: report MAP@H<=r when r > 0, else MAP@TopK")
    evaluation_flags.add_argument("--opt-test", dest="opt_test", type=str2bool, nargs="?", const=True, default=False,
                            help="headline in the release's 'mmhh' convention (empty balls left out)")
    evaluation_flags.add_argument("--eval_split", default="test", choices=["test", "val"],
                                  help="queries of the final evaluation: test (the reported queries) or val "
                                       "(data/NAME/val.txt, carved from the training images by pre_process.py "
                                       "val; tune on it, never on the queries you report)")
    evaluation_flags.add_argument("--test_sample_ratio", type=float, default=1.0,
                            help="evaluate a seeded random fraction of each list (release: unseeded 0.1)")
    evaluation_flags.add_argument("--topk", type=int, default=None, help="R of MAP@TopK (default: the dataset's)")
    evaluation_flags.add_argument("--test_output_dir", default="test_output/",
                            help="the final codes, metrics.json and plots go to DIR/<annotation>_iter_<NNNNN>")
    evaluation.add_list_flags(evaluation_flags)
    evaluation_flags.add_argument("--train_list", default=None, help="training list file (overrides the dataset's)")
    return parser


@dataclass
class Run:
    """Everything a training run updates, so it can be saved and resumed as one."""
    args: argparse.Namespace
    model: network.HashNetwork
    parallel: torch.nn.Module  # the model as a training step calls it: itself, or its DDP wrapper under torchrun
    criterion: loss.HashingLoss
    optimizer: torch.optim.Optimizer
    memory: loss.SemiBatchMemory
    device: torch.device
    signals: StopSignals  # this process's SIGINT and SIGTERM
    stop: StopSignals | distributed.AgreedStop  # the stop the training loop acts on (the same alone)
    last_snapshot: str | None = None
    collapse_watch: collapse.CollapseWatch = field(default_factory=collapse.CollapseWatch)


class NonFiniteLoss(CliError):
    exit_code = 3
    every_rank = True  # the loss is the global batch's, the same on every rank: rank 0 alone reports it


class Interrupted(CliError):
    """A SIGINT or SIGTERM stopped the run; the message says what was saved and how to go on."""
    prefix = ""
    every_rank = True  # under torchrun the ranks stop together: rank 0 alone reports it

    def __init__(self, message, stop):
        super().__init__(message)
        self.exit_code = stop.exit_code


def main(argv=None):
    args, explicit = parse_args(argv)
    with distributed.process_group(args.dist_timeout):  # under torchrun, one process of many; else nothing
        return run_training(args, explicit)


def run_training(args, explicit):
    # Rank 0 settles the flags and checks the output files first, so that a mistake is reported once.
    args, resumed, recipe, clashes = distributed.rank_zero_first(settle_run, args, explicit)
    setup_logging(args.log_dir, args.annotation, to_file=not args.check and distributed.is_main())
    distributed.quiet_followers(log)
    if clashes and not args.check:
        log.info("--overwrite: removed %s", ", ".join(clashes))
    for flag, value, source in recipe:
        log.info("recipe %s: --%s %s (%s)", args.recipe, flag, value, source)
    device = distributed.select_device(args.gpu_id)
    seed_everything(rank_seed(args.seed, distributed.rank()))

    source = data_list.resolve_dataset(args.s_dataset, args.data_dir, train_list=args.train_list,
                                       data_root=args.data_root, needs=("train",))
    target = data_list.resolve_dataset(args.t_dataset, args.data_dir, test_list=args.test_list,
                                       database_list=args.database_list, data_root=args.data_root,
                                       needs=(args.eval_split, "database"))
    evaluation.log_default_presets(source, similar_weight=args.similar_weight_type)
    evaluation.log_default_presets(target, topk=args.topk)
    if args.check:
        return check_everything(args, source, target) if distributed.is_main() else 0
    train_list = distributed.rank_zero_first(data_list.read_checked_list, source, "train")
    train_paths, train_labels = train_list.paths, train_list.labels
    # Fail now, not after hours of training.
    distributed.on_rank_zero(check_evaluation_lists, target, args.eval_split)

    # Installed before any DataLoader worker starts, so that a signal to the whole process group
    # (Ctrl-C, scancel, timeout, docker stop) only asks the run to stop at the next safe point.
    with StopSignals() as signals:
        run = build_run(args, source, train_labels, device, signals)
        start = restore_run(run, resumed) if resumed else initialise_run(run, args, train_paths, train_labels)
        train_set = data_list.ImageList(train_paths, train_labels,
                                        data_list.train_transform(args.resize_size, args.crop_size,
                                                                  args.crop_scale, flip=not args.no_flip),
                                        origins=train_list.origins)
        loader = data_list.training_loader(train_set, args.batch_size, args.workers, args.seed, start,
                                           distributed.shard())
        rng = resumed and checkpoint.rank_rng_state(resumed, distributed.rank())
        if rng:
            # After the loader is built: the snapshot's generator state is the one its iteration saw.
            checkpoint.restore_rng_state(rng)
        writer = SummaryWriter(os.path.join(args.runs_dir, args.annotation), purge_step=start) \
            if distributed.is_main() else None
        try:
            train(run, loader, writer, start)
            evaluate(run, target, writer)
        finally:
            if writer:
                writer.close()
    return 0


def settle_run(args, explicit):
    """The run's flags (a resumed run's come from its snapshot) and, on rank 0, its output files checked:
    returns the flags, the snapshot resumed (or None), the recipe's choices and the files --overwrite removed."""
    resumed = checkpoint.load_snapshot(args.resume) if args.resume else None
    if resumed:
        args = resumed_args(args, explicit, resumed["args"], args.resume)
    recipe = recipes.apply_recipe(args, explicit) if args.recipe and not resumed else []
    finish_args(args)
    clashes = []
    if distributed.is_main():  # one process looks at the files; the others follow its verdict
        run_files.check_writable(args)
        clashes = run_files.clashes(args, resumed["iteration"] if resumed else None)  # before the log exists
        if not args.check:
            run_files.remove(clashes)
    return args, resumed, recipe, clashes


def check_evaluation_lists(target, eval_split):
    for split in (eval_split, "database"):
        data_list.read_checked_list(target, split)


def resumed_args(given, explicit, saved, path):
    """The snapshot's flags, with the run-time flags given now; other changes are refused."""
    # Flags added since the snapshot was written take their defaults; PER_INVOCATION ones are never inherited.
    this_command = {flag: getattr(given, flag) for flag in PER_INVOCATION}
    args = argparse.Namespace(**{**vars(given), **saved, **this_command})
    for flag in sorted(explicit):
        value = getattr(given, flag)
        if flag in RESUME_MAY_CHANGE:
            setattr(args, flag, value)
        elif value != saved.get(flag):
            raise UsageError(f"--resume {path}: the run was trained with --{flag} {saved.get(flag)!r}; a resumed "
                             f"run keeps its recipe, so drop --{flag} (or start a new run with --pre_model_path)")
    return args


def finish_args(args):
    """Resolve the flags whose defaults depend on others, and check values argparse cannot."""
    args.t_dataset = args.t_dataset or args.s_dataset
    args.distance_type = "HashNet" if args.distance_type == "Hamming" else args.distance_type
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY[args.lr_schedule_type]
    args.backbone = args.backbone or network.DEFAULT_BACKBONE[args.image_network]
    for flag in ("num_iters", "batch_size", "hash_bit", "snapshot_interval", "decay_step", "print_every"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('snapshot_interval', 'snapshot-interval')} must be positive")
    if not 0.0 < args.crop_scale <= 1.0:
        raise UsageError(f"--crop_scale {args.crop_scale}: the smallest crop area fraction, in (0, 1]")
    if not str(args.batch_params).isdigit():
        raise UsageError(f"--batch_params {args.batch_params!r}: the warm-up length, a whole number of iterations")
    check_evaluation_flags(args)
    check_parallel_flags(args)
    check_hashnet_pairing(args)
    checks = [("--gamma", args.gamma > 0, "must be positive"),
              ("--semi_init_momentum", 0.0 <= args.semi_init_momentum <= 1.0, "must lie in [0, 1]"),
              ("--workers", args.workers >= 0, "must be 0 or more"),
              ("--keep_snapshots", args.keep_snapshots >= 0, "must be 0 (keep all) or more")]
    for flag, valid, rule in checks:
        if not valid:
            raise UsageError(f"{flag} {getattr(args, flag[2:])}: {rule}")
    if args.similar_weight_type not in ("config", "preset"):
        resolve_similar_weight(args, source=None)
    try:
        loss.parse_margin_params(args.margin_params)
        loss.sigmoid_param_value(args.sigmoid_param, args.hash_bit)
    except ValueError as error:  # its message names the flag
        raise UsageError(str(error)) from None


def check_parallel_flags(args):
    """Under torchrun: the global batch splits evenly over the processes, and --sync_bn has GPUs."""
    processes = distributed.world_size()
    if args.batch_size % processes:
        raise UsageError(f"--batch_size {args.batch_size}: the global batch must split evenly over the {processes} "
                         f"processes; use a multiple of {processes}")
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist_timeout {args.dist_timeout:g}: seconds, must be positive")
    if args.sync_bn and distributed.active() and (args.gpu_id == "cpu" or not torch.cuda.is_available()):
        raise UsageError("--sync_bn: synchronised batch-norm needs CUDA GPUs; on the CPU each process normalises "
                         "with its own share of the batch (drop --sync_bn)")


def check_hashnet_pairing(args):
    """--hashnet_pairing halves splits the batch in two equal halves, for HashNet's loss."""
    if args.hashnet_pairing != "halves":
        return
    if args.distance_type != "HashNet":
        raise UsageError(f"--hashnet_pairing halves pairs HashNet's half-batches, but --distance_type is "
                         f"{args.distance_type}; drop it or pass --hashnet_pairing all")
    if args.batch_size % 2:
        raise UsageError(f"--batch_size {args.batch_size}: --hashnet_pairing halves splits the batch into two "
                         f"equal halves; use an even batch size")


def check_evaluation_flags(args):
    """The final evaluation's flags, checked before training rather than after it."""
    if not 0 <= args.radius <= args.hash_bit:
        raise UsageError(f"--radius {args.radius}: a Hamming radius between 0 and --hash_bit {args.hash_bit}")
    if args.topk is not None and args.topk != -1 and args.topk < 1:
        raise UsageError(f"--topk {args.topk}: R of MAP@TopK is a positive count, or -1 for the whole database")
    if not 0.0 < args.test_sample_ratio <= 1.0:
        raise UsageError(f"--test_sample_ratio {args.test_sample_ratio}: a fraction in (0, 1]")


def resolve_similar_weight(args, source):
    """The similar-pair weight: the dataset's preset, 'auto', or a number."""
    value = args.similar_weight_type
    if value in ("config", "preset"):
        return source.similar_weight
    if value == "auto":
        return "auto"
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not weight >= 0:
        raise UsageError(f"--similar_weight {value!r}: expected 'config', 'auto' or a non-negative number")
    return weight


def default_batch_type(similar_weight):
    """The release's rule: the memory pays off when similar pairs are rare (weight above 100)."""
    return "SemiMem" if similar_weight != "auto" and similar_weight > 100 else "PairBatch"


def build_run(args, source, train_labels, device, signals):
    model = network.build_network(args.image_network, args.hash_bit, backbone=args.backbone,
                                  pretrained=args.pretrained,
                                  continuation=args.image_loss_type == "HashNet").to(device)
    parallel = distributed.data_parallel(model, device, args.sync_bn)
    similar_weight = resolve_similar_weight(args, source)
    args.batch_type = args.batch_type or default_batch_type(similar_weight)
    # As released, HashNet's continuation comes without the quantization loss.
    loss_lambda = 0.0 if args.image_loss_type == "HashNet" else args.loss_lambda
    criterion = loss.HashingLoss(args.distance_type, args.gamma, loss_lambda, similar_weight,
                                 loss.parse_margin_params(args.margin_params),
                                 loss.sigmoid_param_value(args.sigmoid_param, args.hash_bit),
                                 args.dch_distance, args.dch_balance)
    groups = model.parameter_groups()
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    memory = loss.SemiBatchMemory(len(train_labels), args.hash_bit, train_labels.shape[1], args.batch_type,
                                  args.num_iters, warmup_iters=int(args.batch_params),
                                  init_momentum=args.semi_init_momentum, normalize=args.norm_memory_batch,
                                  device=device)
    log.info("%s %s, %d bits, %s loss (similar weight %s), %s, %d training images, device %s",
             args.image_network, args.backbone, args.hash_bit, args.distance_type, similar_weight,
             args.batch_type, len(train_labels), device)
    world = distributed.describe(args.batch_size, device)
    if world:
        log.info("%s", world)
    return Run(args, model, parallel, criterion, optimizer, memory, device, signals,
               distributed.agreed_stop(signals))


def initialise_run(run, args, train_paths, train_labels):
    """A new run: optional weights from --pre_model_path, then the memory's first contents."""
    if args.pre_model_path:
        run.model.load_state_dict(load_pre_model(args)["model"])
        log.info("initialised the weights from %s", args.pre_model_path)
    run.memory.set_labels(torch.as_tensor(train_labels, dtype=torch.float32))
    if args.batch_type == "PairBatch":
        return 0
    if args.semi_init_type == "RANDOM":
        run.memory.initialize_random(torch.Generator(device=run.device).manual_seed(args.seed))
    else:
        train_set = data_list.ImageList(train_paths, train_labels,
                                        data_list.test_transform(args.resize_size, args.crop_size))
        # Each rank encodes its share of the training set; the shares are combined on every rank.
        loader = data_list.evaluation_loader(train_set, args.batch_size, args.workers, distributed.shard())
        try:
            codes, _ = evaluation.encode(run.model, loader, run.device, description="initialising the memory",
                                      amp=args.amp, should_stop=run.signals.requested)
        except Stopped:
            raise Interrupted(f"stopped by {run.signals.name} while initialising the memory: nothing was trained "
                              "or saved; start again with the same command and --overwrite", run.signals) from None
        codes, = distributed.combine_shards(codes, device=run.device)
        run.memory.initialize_codes(codes.to(run.device))
    return 0


def load_pre_model(args):
    """The --pre_model_path snapshot, checked to fit the network the flags describe."""
    snapshot = checkpoint.load_snapshot(args.pre_model_path)
    checkpoint.check_network_matches(snapshot["args"], args.pre_model_path, image_network=args.image_network,
                                     backbone=args.backbone, hash_bit=args.hash_bit)
    return snapshot


def restore_run(run, snapshot):
    """Put the model, optimizer and memory back where the snapshot left them; returns its iteration."""
    run.model.load_state_dict(snapshot["model"])
    run.optimizer.load_state_dict(snapshot["optimizer"])
    run.memory.load_state_dict(snapshot["memory"])
    run.last_snapshot = run.args.resume
    log.info("resuming %s at iteration %d of %d", run.args.resume, snapshot["iteration"], run.args.num_iters)
    saved_world = checkpoint.saved_world_size(snapshot)
    if saved_world != distributed.world_size():
        log.info("the run was trained by %d process(es), it goes on with %d: the same global batches, weights, "
                 "optimizer and memory; augmentation draws and per-process batch-norm statistics differ from an "
                 "uninterrupted run", saved_world, distributed.world_size())
    return snapshot["iteration"]


def learning_rate(args, iteration):
    """The base learning rate at 0-based ``iteration``."""
    if args.lr_schedule_type == "Stair_Step":
        return args.lr * 0.5 ** (iteration // args.decay_step)
    if args.lr_schedule_type == "HashNet_Step":
        return args.lr * 0.5 ** (iteration // 2000)
    return args.lr * (1.0 + 0.0003 * iteration) ** -0.75


def train(run, loader, writer, start):
    """Iterations ``start``..num_iters-1, snapshotting on schedule and when a stop signal arrives."""
    args, model = run.args, run.model
    batches = iter(loader)
    model.train()
    tick, tick_iteration = time.perf_counter(), start
    for iteration in range(start, args.num_iters):
        images, labels, indices = next_batch(run, batches, iteration, start)
        parts, h = train_step(run, iteration, images, labels, indices)
        warning = run.collapse_watch.update(parts["saturated"], parts["bit_balance"], iteration)
        if warning:
            log.warning("warning: %s", warning)
        completed = iteration + 1
        if writer and (completed % args.print_every == 0 or completed == args.num_iters):
            speed = (completed - tick_iteration) / (time.perf_counter() - tick)
            log_progress(run, writer, iteration, parts, h, speed)
            tick, tick_iteration = time.perf_counter(), completed
        if completed % args.snapshot_interval == 0 or completed == args.num_iters or run.stop.requested():
            save_run(run, completed)
        if run.stop.requested():
            raise Interrupted(f"stopped by {run.stop.name} at iteration {completed}; resume with:\n"
                              f"  {resume_command(run.last_snapshot)}", run.stop)


def resume_command(snapshot):
    return f"{distributed.launcher()} train_mmhh.py --resume {snapshot}"


def next_batch(run, batches, iteration, start):
    """The next training batch; an image that does not decode stops the run with a snapshot.

    Under torchrun the other processes wait in the step's gather and cannot join a snapshot: the last one
    stands.
    """
    try:
        return next(batches)
    except data_list.DataError as error:
        if distributed.world_size() == 1 and (iteration > start or not run.last_snapshot):
            save_run(run, iteration)
        then = f"resume with: {resume_command(run.last_snapshot)}" if run.last_snapshot else \
            "start again with --overwrite"
        raise data_list.DataError(
            f"{data_list.DataError.from_loader(error)}. Stopped at iteration {iteration}: fix or drop that line "
            f"(`python pre_process.py validate` lists every such image), then {then}") from None


def train_step(run, iteration, images, labels, indices):
    """One SGD step on the global batch (this process's share of it under torchrun); returns the loss
    parts (floats) and the global batch's codes."""
    args, device = run.args, run.device
    lr = learning_rate(args, iteration)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    run.model.set_iteration(iteration)
    images, labels, indices = (images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                               indices.to(device, non_blocking=True))
    with autocast(device, args.amp):
        h = run.parallel(images).float()  # (b, K); the loss and the memory stay in float32
    # The pair loss couples every pair of the global batch, and the memory must stay the same everywhere.
    h, labels, indices = distributed.global_batch(h, labels, indices, run.stop)  # (B, K), (B, C), (B,)
    other_h, other_labels, exclude = run.memory.partner_set(h, labels, indices, iteration)
    parts = run.criterion(h, labels, other_h, other_labels, exclude, halves=pairs_halves(run, iteration))
    saturated, bit_balance = collapse.batch_health(h.detach())
    monitored = {**{name: value.detach() for name, value in parts.items()}, "saturated": saturated,
                 "bit_balance": bit_balance}
    # One host synchronisation a step: the non-finite check and the collapse watch need the values.
    values = dict(zip(monitored, torch.stack(list(monitored.values())).tolist()))
    if not all(math.isfinite(value) for value in values.values()):
        raise NonFiniteLoss(f"iteration {iteration}: the loss is not finite (total {values['total']}, pair "
                            f"{values['pair']}, quantization {values['quantization']}); stopped before the "
                            f"update. Last good snapshot: {run.last_snapshot or 'none'}. Try a lower --lr, "
                            f"then --resume from that snapshot or start again.")
    run.optimizer.zero_grad(set_to_none=True)
    (parts["total"] * distributed.loss_scale()).backward()
    run.optimizer.step()
    run.memory.update(indices, h.detach(), iteration)
    values["lr"] = lr
    return values, h.detach()


def pairs_halves(run, iteration):
    """--hashnet_pairing halves: while the batch pairs with itself, its first half pairs with its second."""
    return run.args.hashnet_pairing == "halves" and not run.memory.uses_memory(iteration)


def log_progress(run, writer, iteration, parts, h, speed):
    args = run.args
    momentum = run.memory.momentum(iteration) if run.memory.uses_memory(iteration) else 0.0
    remaining = (args.num_iters - iteration - 1) / max(speed, 1e-9)
    log.info("iter %05d/%05d  loss %.4f (pair %.4f, quant %.4f)  lr %.2e  momentum %.3f  saturated %.1f%%  "
             "bit balance %.2f  %.2f it/s  eta %s", iteration + 1, args.num_iters, parts["total"], parts["pair"],
             parts["quantization"], parts["lr"], momentum, 100 * parts["saturated"], parts["bit_balance"], speed,
             format_duration(remaining))
    step = iteration + 1
    writer.add_scalar("Train/loss", parts["total"], step)
    writer.add_scalar("Train/pair_loss", parts["pair"], step)
    writer.add_scalar("Train/quantization_loss", parts["quantization"], step)
    writer.add_scalar("Train/lr", parts["lr"], step)
    writer.add_scalar("Train/memory_momentum", momentum, step)
    writer.add_scalar("Train/continuation_scale", run.model.scale.item(), step)
    writer.add_scalar("Train/saturated_fraction", parts["saturated"], step)
    writer.add_scalar("Train/bit_balance", parts["bit_balance"], step)
    writer.add_histogram("Train/code_values", h.float().cpu().numpy(), step)


def save_run(run, iteration):
    """Snapshot everything the run needs to continue exactly from ``iteration``; prune older snapshots."""
    path = checkpoint.snapshot_path(run.args, iteration)
    rng = distributed.gather_to_rank_zero(checkpoint.capture_rng_state())  # each rank's augmentation draws
    distributed.on_rank_zero(write_snapshot, run, path, iteration, rng)
    run.last_snapshot = path


def write_snapshot(run, path, iteration, rng):
    args = run.args
    try:
        checkpoint.save_snapshot(path, {
            "args": vars(args), "iteration": iteration, "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "memory": run.memory.state_dict(),
            **checkpoint.rng_entries(rng),
        })
    except checkpoint.SnapshotWriteError as error:
        previous = run.last_snapshot or "none"
        raise checkpoint.SnapshotWriteError(
            f"{error}; the previous snapshot {previous} is intact. Free some space or choose another "
            f"--snap_path, then resume from it with --resume {previous} --snap_path NEW/") from None
    log.info("snapshot %s", path)
    if args.keep_snapshots > 0:
        protected = {path, args.resume, checkpoint.snapshot_path(args, args.num_iters)}
        for removed in checkpoint.prune_snapshots(args, args.keep_snapshots, protected):
            log.info("removed the older snapshot %s (--keep_snapshots %d)", removed, args.keep_snapshots)


def evaluate(run, target, writer):
    """The release's final evaluation: encode the test and database lists and score them.

    Under torchrun each process encodes a share of the lists with rank 0's model, and rank 0 scores.
    """
    args = run.args
    output_dir = run_files.final_output_dir(args)
    distributed.rank_zero_buffers(run.model)
    try:
        result = evaluation.evaluate_model(run.model, target, args, run.device, output_dir, args.eval_split,
                                           should_stop=run.signals.requested)
    except Stopped:
        raise Interrupted(f"stopped by {run.signals.name} during the final evaluation; the final snapshot is "
                          f"saved. Evaluate it with:\n  python test_mmhh.py --model_path {run.last_snapshot} "
                          f"--dataset {args.t_dataset} --radius {args.radius} --output_path {output_dir}",
                          run.signals) from None
    if result is None:  # another process: rank 0 reports
        return
    for key, value in result.items():
        if isinstance(value, float):
            writer.add_scalar(f"Test/{key}", value, args.num_iters)
    log.info("finished: final snapshot %s; codes and metrics in %s; TensorBoard: tensorboard --logdir %s",
             run.last_snapshot, output_dir, args.runs_dir)


def check_everything(args, source, target):
    """--check: every list parses, every image opens, the network and its weights can be built."""
    for spec, split in ((source, "train"), (target, args.eval_split), (target, "database")):
        listing = data_list.verify_list_images(data_list.require_list(spec, split), spec.data_root)
        print(f"{split}: {spec.lists[split]}: {len(listing.paths)} images, all open")
    if args.pre_model_path:
        load_pre_model(args)
    network.build_network(args.image_network, args.hash_bit, backbone=args.backbone, pretrained=args.pretrained)
    resolve_similar_weight(args, source)
    print("check passed: lists, images, snapshots and flags are usable")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
