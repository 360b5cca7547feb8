"""Evaluate a snapshot: encode the database and the queries, score retrieval, save codes and metrics.

The original README's command, with our layout:
    python test_mmhh.py --gpu_id=0 --dataset="coco_80" \\
        --model_path "snapshot/hash/MMHH-train_coco_80_coco_80_iter_01000" --batch_size=48 --radius 2 \\
        --opt-test --annotation="MMHH-test" --test_sample_ratio 1.0
Saved codes can be scored again without a model: ``python test_mmhh.py --codes_dir DIR``.
"""
import argparse
import json
import logging
import os
import sys

import numpy as np
import torch

import checkpoint
import data_list
import metrics
import plots
from network import encode
from runtime import UsageError, atomic_write, run_cli, select_device, setup_logging, str2bool

log = logging.getLogger("mmhh")

CODE_FILES = ("database_code", "database_labels", "test_code", "test_labels")


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
    ours.add_argument("--seed", type=int, default=0, help="seed of --test_sample_ratio sampling (default 0)")
    ours.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="DataLoader worker processes")
    ours.add_argument("--resize_size", type=int, default=None, help="default: the snapshot's")
    ours.add_argument("--crop_size", type=int, default=None, help="default: the snapshot's")
    ours.add_argument("--hash_bit", type=int, default=None, help="if given, must match the snapshot")
    ours.add_argument("--image_network", default=None, help="if given, must match the snapshot")
    ours.add_argument("--check", action="store_true",
                      help="validate the snapshot, lists and images, then exit without evaluating")
    add_list_flags(ours)
    return parser.parse_args(argv)


def add_list_flags(group):
    """The list and data flags shared with train_mmhh.py."""
    group.add_argument("--data_dir", default="data", help="folder of the dataset folders (default data)")
    group.add_argument("--test_list", default=None, help="query list file (overrides the dataset's)")
    group.add_argument("--database_list", default=None, help="database list file (overrides the dataset's)")
    group.add_argument("--data_root", default=None,
                       help="folder that relative image paths are relative to (default: each list's folder)")


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.log_dir, args.annotation)
    device = select_device(args.gpu_id)
    if args.codes_dir:
        codes = load_codes(args.codes_dir)
        topk = args.topk if args.topk is not None else -1
        score_codes(*codes, args.radius, topk, args.opt_test, device, args.output_path)
        return 0
    if not args.model_path:
        raise UsageError("give --model_path SNAPSHOT (or --codes_dir DIR to score saved codes)")
    snapshot = checkpoint.load_snapshot(args.model_path)
    trained = snapshot["args"]
    checkpoint.check_network_matches(trained, args.model_path, hash_bit=args.hash_bit,
                                     image_network=args.image_network)
    args.resize_size = args.resize_size or trained["resize_size"]
    args.crop_size = args.crop_size or trained["crop_size"]
    model = checkpoint.model_from_snapshot(snapshot).to(device)
    spec = data_list.resolve_dataset(args.dataset or trained["t_dataset"], args.data_dir,
                                     test_list=args.test_list, database_list=args.database_list,
                                     data_root=args.data_root)
    if args.check:
        check_evaluation_data(spec)
        print(f"check passed: snapshot {args.model_path} ({trained['image_network']}, "
              f"{trained['hash_bit']} bits) and the lists of '{spec.name}' are usable")
        return 0
    evaluate_model(model, spec, args, device, args.output_path)
    return 0


def evaluate_model(model, spec, args, device, output_dir=None):
    """Encode ``spec``'s database and queries with ``model`` and score them; returns the metrics dict."""
    codes = {}
    for split in ("database", "test"):
        dataset = evaluation_dataset(spec, split, args)
        loader = data_list.evaluation_loader(dataset, args.batch_size, args.workers)
        codes[split] = encode(model, loader, device, description=f"encoding {split}")
    topk = args.topk if args.topk is not None else spec.topk
    return score_codes(*codes["database"], *codes["test"], args.radius, topk, args.opt_test, device,
                       output_dir)


def evaluation_dataset(spec, split, args):
    """The images of one evaluation list, sampled by --test_sample_ratio (seeded)."""
    paths, labels = data_list.read_checked_list(spec, split)
    kept = data_list.sample_items(len(paths), args.test_sample_ratio, args.seed)
    if len(kept) < len(paths):
        log.info("%s: evaluating %d of %d items (--test_sample_ratio %g, seed %d)", split, len(kept),
                 len(paths), args.test_sample_ratio, args.seed)
    transform = data_list.test_transform(args.resize_size, args.crop_size)
    return data_list.ImageList([paths[i] for i in kept], labels[kept], transform)


def score_codes(database_codes, database_labels, query_codes, query_labels, radius, topk, opt_test,
                device, output_dir=None):
    """All retrieval metrics of the codes, logged as a table and saved when ``output_dir`` is given."""
    if topk > len(database_codes):
        log.info("R = %d exceeds the database's %d items: MAP@TopK ranks the whole database", topk,
                 len(database_codes))
        topk = -1
    result = metrics.evaluate_retrieval(database_codes, database_labels, query_codes, query_labels,
                                        radius=radius, topk=topk, device=device)
    result["convention"] = "mmhh" if opt_test else "deephash"
    result["headline"] = headline_metric(result, opt_test)
    log_report(result)
    if output_dir:
        save_outputs(output_dir, result, database_codes, database_labels, query_codes, query_labels)
    return result


def headline_metric(result, opt_test):
    """The run's one number: MAP@H<=r when r > 0 (as the release), else MAP@TopK."""
    if result["radius"] > 0:
        return result["map_radius_mmhh" if opt_test else "map_radius_deephash"]
    return result["map_topk_mmhh" if opt_test else "map_topk"]


def log_report(result):
    r, topk = result["radius"], result["topk"]
    rows = [
        (f"MAP@H<={r} (deephash)", result["map_radius_deephash"]),
        (f"MAP@H<={r} (mmhh)", result["map_radius_mmhh"]),
        (f"P@H<={r}", result["precision_radius"]),
        (f"R@H<={r}", result["recall_radius"]),
        (f"empty balls (r={r})", result["empty_ball_fraction"]),
        (f"MAP@{topk} (continuous)", result["map_topk"]),
        (f"MAP@{topk} (sign codes)", result["map_topk_sign"]),
        (f"MAP@{topk} (mmhh: misses count 0)", result["map_topk_mmhh"]),
    ]
    log.info("retrieval: %d queries x %d database items, %d bits", result["num_queries"],
             result["num_database"], result["hash_bit"])
    for name, value in rows:
        log.info("  %-36s %.4f", name, value)
    log.info("  headline (%s convention): %.4f", result["convention"], result["headline"])


def save_outputs(output_dir, result, database_codes, database_labels, query_codes, query_labels):
    """Codes and labels as .npy (continuous outputs, as released), metrics.json and the plots."""
    arrays = dict(zip(CODE_FILES, (database_codes, database_labels, query_codes, query_labels)))
    for name, array in arrays.items():
        atomic_write(os.path.join(output_dir, f"{name}.npy"), lambda tmp, a=array: _save_npy(tmp, a))
    atomic_write(os.path.join(output_dir, "metrics.json"),
                 lambda tmp: _write_text(tmp, json.dumps(result, indent=1)))
    written = plots.save_retrieval_plots(result, output_dir)
    log.info("saved codes, labels, metrics.json and %d plots to %s", len(written), output_dir)


def load_codes(codes_dir):
    """The four arrays that ``save_outputs`` wrote."""
    arrays = []
    for name in CODE_FILES:
        path = os.path.join(codes_dir, f"{name}.npy")
        if not os.path.isfile(path):
            raise UsageError(f"--codes_dir {codes_dir}: {name}.npy is missing; it needs "
                             + ", ".join(f"{n}.npy" for n in CODE_FILES))
        try:
            arrays.append(torch.from_numpy(np.load(path, allow_pickle=False)))
        except ValueError as error:
            raise UsageError(f"{path} is not a plain numeric .npy array ({error})") from None
    return arrays


def check_evaluation_data(spec):
    """Every list of the evaluation parses and every image opens."""
    for split in ("test", "database"):
        data_list.verify_list_images(data_list.require_list(spec, split), spec.data_root)


def _save_npy(path, array):
    with open(path, "wb") as handle:
        np.save(handle, np.asarray(array))


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    sys.exit(run_cli(main))
