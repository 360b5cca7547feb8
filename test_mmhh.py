"""Evaluate a snapshot: encode the database and the queries, score retrieval, save codes and metrics.

The original README's command, with our layout:
    python test_mmhh.py --gpu_id=0 --dataset="coco_80" \\
        --model_path "snapshot/hash/MMHH-train_coco_80_coco_80_iter_01000" --batch_size=48 --radius 2 \\
        --opt-test --annotation="MMHH-test" --test_sample_ratio 1.0
Saved codes can be scored again without a model: ``python test_mmhh.py --codes_dir DIR``.
"""
import argparse
import logging
import os
import sys

import checkpoint
import data_list
import evaluation
from runtime import UsageError, run_cli, select_device, setup_logging, str2bool

log = logging.getLogger("mmhh")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate an MMHH snapshot (or saved codes) on a dataset.")
    release = parser.add_argument_group("flags of the original release")
    release.add_argument("--gpu_id", default="0", help="CUDA device index; 'cpu' forces the CPU (default 0)")
    release.add_argument("--dataset", default=None,
                         help="dataset name under --data_dir (default: the snapshot's --t_dataset)")
    release.add_argument("--batch_size", type=int, default=16, help="images per encoding batch (default 16)")
    release.add_argument("--output_path", default=None,
                         help="folder for database_code.npy, test_code.npy, the labels, metrics.json and plots")
    release.add_argument("--model_path", default=None, help="snapshot written by train_mmhh.py")
    release.add_argument("--radius", type=int, default=2, help="Hamming ball radius r of MAP@H<=r (default 2)")
    release.add_argument("--opt-test", dest="opt_test", type=str2bool, nargs="?", const=True, default=False,
                         help="headline MAP@H<=r in the 'mmhh' convention (empty balls left out) instead "
                              "of 'deephash'; both are always computed and saved")
    release.add_argument("--log_dir", default="log/", help="folder of the log file (default log/)")
    release.add_argument("--annotation", default="empty", help="name of this evaluation (log file name)")
    release.add_argument("--test_sample_ratio", type=float, default=1.0,
                         help="evaluate a seeded random fraction of each list (default 1.0: all)")
    ours = parser.add_argument_group("added flags")
    ours.add_argument("--codes_dir", default=None,
                      help="score the .npy codes and labels saved in this folder; no model, no images")
    ours.add_argument("--topk", type=int, default=None,
                      help="R of MAP@TopK (default: the dataset's preset; -1: the whole database)")
    ours.add_argument("--map_curve_radius", type=int, default=None,
                      help="MAP curve up to this radius (default: --radius; -1: every radius, which ranks the "
                           "whole database for every query)")
    ours.add_argument("--seed", type=int, default=0, help="seed of --test_sample_ratio sampling (default 0)")
    evaluation.add_encoding_flags(ours)
    ours.add_argument("--hash_bit", type=int, default=None, help="if given, must match the snapshot")
    ours.add_argument("--image_network", default=None, help="if given, must match the snapshot")
    ours.add_argument("--overwrite", action="store_true",
                      help="replace the evaluation already in --output_path instead of stopping")
    ours.add_argument("--check", action="store_true",
                      help="validate the snapshot, lists and images, then exit without evaluating")
    evaluation.add_list_flags(ours)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    refuse_overwrite(args)
    setup_logging(args.log_dir, args.annotation)
    device = select_device(args.gpu_id)
    if args.codes_dir:
        return score_saved_codes(args, device)
    if not args.model_path:
        raise UsageError("give --model_path SNAPSHOT (or --codes_dir DIR to score saved codes)")
    snapshot, model = checkpoint.encoder_from_snapshot(args, device)
    trained = snapshot["args"]
    checkpoint.check_network_matches(trained, args.model_path, hash_bit=args.hash_bit,
                                     image_network=args.image_network)
    spec = data_list.resolve_dataset(args.dataset or trained["t_dataset"], args.data_dir,
                                     test_list=args.test_list, database_list=args.database_list,
                                     data_root=args.data_root, needs=("test", "database"))
    evaluation.log_default_presets(spec, topk=args.topk)
    if args.check:
        evaluation.check_evaluation_data(spec)
        print(f"check passed: snapshot {args.model_path} ({trained['image_network']}, "
              f"{trained['hash_bit']} bits) and the lists of '{spec.name}' are usable")
        return 0
    evaluation.evaluate_model(model, spec, args, device, args.output_path)
    return 0


def refuse_overwrite(args):
    """Stop before any work when --output_path holds an earlier evaluation, unless --overwrite."""
    if args.output_path and not args.overwrite:
        earlier = [name for name in ("metrics.json", *(f"{n}.npy" for n in evaluation.CODE_FILES))
                   if os.path.exists(os.path.join(args.output_path, name))]
        if earlier:
            raise UsageError(f"--output_path {args.output_path} holds an earlier evaluation ({', '.join(earlier)}); "
                             "pass another --output_path, or --overwrite to replace it")


def score_saved_codes(args, device):
    """--codes_dir: score saved codes with the R of --dataset, or of the dataset they were saved from."""
    codes = evaluation.load_codes(args.codes_dir)
    name = args.dataset or evaluation.saved_dataset_name(args.codes_dir)
    topk = args.topk
    if topk is None:
        topk = data_list.resolve_dataset(name, args.data_dir, needs=()).topk if name else -1
        log.info("R of MAP@TopK: %s (%s)", "the whole database" if topk < 0 else topk,
                 f"dataset '{name}'" if name else "no --dataset given and none recorded in the codes' metrics.json")
    evaluation.score_codes(*codes, args.radius, topk, args.opt_test, device, args.output_path,
                           {"dataset": name}, args.map_curve_radius)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
