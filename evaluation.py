"""Evaluation shared by train_mmhh.py and test_mmhh.py: encode a dataset's lists, score, report, save.

The metrics and their conventions are described in the README's "Retrieval metrics" section.
"""
import json
import logging
import os
import time

import numpy as np
import torch

import collapse
import data_list
import distributed
import metrics
import plots
from hamming_index import HammingIndex
from runtime import Stopped, UsageError, atomic_write, autocast, write_text_atomically

log = logging.getLogger("mmhh")

CODE_FILES = ("database_code", "database_labels", "test_code", "test_labels")
GRID_QUERIES, GRID_RESULTS = 5, 8          # retrieval_grid.png: seeded queries, results shown for each


def add_list_flags(group):
    """The list and data flags both scripts take."""
    group.add_argument("--data_dir", default="data", help="folder of the dataset folders (default data)")
    group.add_argument("--test_list", default=None, help="query list file (overrides the dataset's)")
    group.add_argument("--database_list", default=None, help="database list file (overrides the dataset's)")
    group.add_argument("--data_root", default=None,
                       help="folder that relative image paths are relative to (default: each list's folder)")


def add_encoding_flags(group):
    """How a snapshot encodes images, for the scripts that encode with one (test_mmhh.py, retrieve.py)."""
    group.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    group.add_argument("--amp", action="store_true", help="encode under bfloat16 autocast (codes stay float32)")
    group.add_argument("--resize_size", type=int, default=None, help="default: the snapshot's")
    group.add_argument("--crop_size", type=int, default=None, help="default: the snapshot's")


def log_default_presets(spec, **flags):
    """Name the defaults that a dataset with neither dataset.json nor preset gets for flags not given."""
    if spec.presets_from != "default":
        return
    notes = {"topk": "R of MAP@TopK = the whole database (--topk overrides)",
             "similar_weight": "similar-pair weight 1 (--similar_weight overrides)"}
    defaulted = [notes[flag] for flag, value in flags.items() if value in (None, "config", "preset")]
    if defaulted:
        log.info("dataset '%s' has no dataset.json and no preset: %s", spec.name, "; ".join(defaulted))


def evaluate_model(model, spec, args, device, output_dir=None, query_split="test", should_stop=bool):
    """Encode ``spec``'s database and queries with ``model`` and score them; returns the metrics dict.

    Under torchrun each process encodes its share of the lists, and rank 0 alone scores (the others get None).

    ``query_split`` "val" scores the validation queries; they are training images, so any of them in
    the database list is left out of the database, and no query finds itself. ``should_stop`` is asked
    between batches while encoding (see ``encode``).
    """
    queries = evaluation_dataset(spec, query_split, args)
    leave_out = set()
    if query_split == data_list.VAL_SPLIT:
        leave_out = set(map(_normalised, data_list.read_checked_list(spec, query_split).paths))
    database = evaluation_dataset(spec, "database", args, leave_out)
    codes = {}
    for split, dataset in (("database", database), (query_split, queries)):
        loader = data_list.evaluation_loader(dataset, args.batch_size, args.workers, distributed.shard())
        codes[split] = distributed.combine_shards(*encode(model, loader, device, description=f"encoding {split}",
                                                          amp=args.amp, should_stop=should_stop), device=device)
    if not distributed.is_main():
        return None
    topk = args.topk if args.topk is not None else spec.topk
    context = {"dataset": spec.name, "query_split": query_split,
               "queries_in_database": count_queries_in_database(queries.paths, database.paths)}
    return score_codes(*codes["database"], *codes[query_split], args.radius, topk, args.opt_test, device,
                       output_dir, context, getattr(args, "map_curve_radius", None),
                       paths=(queries.paths, database.paths))


def evaluation_dataset(spec, split, args, leave_out=frozenset()):
    """The images of one evaluation list but ``leave_out``, sampled by --test_sample_ratio (seeded)."""
    listing = data_list.read_checked_list(spec, split)
    paths, labels, origins = listing.paths, listing.labels, listing.origins
    if leave_out:
        kept = [i for i, path in enumerate(paths) if _normalised(path) not in leave_out]
        log.info("%s: %d of its %d items are validation queries and are left out for this evaluation", split,
                 len(paths) - len(kept), len(paths))
        paths, labels, origins = [paths[i] for i in kept], labels[kept], [origins[i] for i in kept]
    kept = data_list.sample_items(len(paths), args.test_sample_ratio, args.seed)
    if len(kept) < len(paths):
        log.info("%s: evaluating %d of %d items (--test_sample_ratio %g, seed %d)", split, len(kept),
                 len(paths), args.test_sample_ratio, args.seed)
    transform = data_list.test_transform(args.resize_size, args.crop_size)
    return data_list.ImageList([paths[i] for i in kept], labels[kept], transform, [origins[i] for i in kept])


def count_queries_in_database(query_paths, database_paths):
    """How many queries are database images too (same file): each finds itself at distance 0."""
    database = set(map(_normalised, database_paths))
    return sum(_normalised(path) in database for path in query_paths)



def score_codes(database_codes, database_labels, query_codes, query_labels, radius, topk, opt_test,
                device, output_dir=None, context=None, map_curve_radius=None, paths=None):
    """All retrieval metrics of the codes, logged as a table and saved when ``output_dir`` is given.

    ``context`` (the dataset's name, queries_in_database) is added to the result as it is;
    ``map_curve_radius`` is metrics.evaluate_retrieval's (None: the MAP curve up to ``radius``).
    ``paths`` (query image paths, database image paths) adds retrieval_grid.png to the saved outputs.
    """
    if topk > len(database_codes):
        log.info("R = %d exceeds the database's %d items: MAP@TopK ranks the whole database", topk,
                 len(database_codes))
        topk = -1
    result = metrics.evaluate_retrieval(database_codes, database_labels, query_codes, query_labels,
                                        radius=radius, topk=topk, device=device,
                                        map_curve_radius=map_curve_radius)
    result.update({"dataset": None, "query_split": "test", "queries_in_database": None, **(context or {})})
    result.update(collapse.code_health(torch.as_tensor(database_codes)))
    result["convention"] = "mmhh" if opt_test else "deephash"
    result["unlabelled_queries"] = int((torch.as_tensor(query_labels).sum(1) == 0).sum())
    result["headline"] = headline_metric(result, opt_test)
    log_report(result)
    warning = collapse.collapse_warning(result, result["num_database"], result["hash_bit"],
                                           num_labels=database_labels.shape[1])
    result["collapsed"] = warning is not None
    if warning:
        log.warning("warning: %s", warning)
    if result["unlabelled_queries"]:
        log.warning("warning: %s", unlabelled_queries_warning(result["unlabelled_queries"], result["num_queries"]))
    if output_dir:
        save_outputs(output_dir, result, database_codes, database_labels, query_codes, query_labels, paths)
    return result


def unlabelled_queries_warning(count, num_queries):
    """What queries with all-zero labels do to the MAPs: each is relevant to nothing (README: Data)."""
    return (f"{count} of {num_queries} queries have all-zero labels and are relevant to nothing. MAP@H<=r, "
            "deephash convention: such a query scores 0 when its ball is empty and is left out otherwise; mmhh "
            "convention: left out when its ball is empty, 0 otherwise. MAP@TopK: left out (hashnet), 0 (mmhh). "
            "These MAPs then move with how many of their balls are empty, not with retrieval quality; draw the "
            "queries from labelled images (pre_process.py nuswide's default) or import lists without such rows")


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
    log.info("  %-36s %.1f of %d", f"mean ball size (r={r})", result["mean_ball_size"], result["num_database"])
    log.info("  %-36s %d of %d", "distinct database codes", result["distinct_codes"], result["num_database"])
    log.info("  %-36s %.4f (0: every bit splits evenly)", "bit balance", result["bit_balance"])
    inside = result["queries_in_database"]
    if inside is not None:
        log.info("  %-36s %d of %d%s", "queries in the database", inside, result["num_queries"],
                 " (each finds itself at distance 0: its ball is never empty)" if inside else "")
    log.info("  headline (%s convention): %.4f", result["convention"], result["headline"])


def save_outputs(output_dir, result, database_codes, database_labels, query_codes, query_labels, paths=None):
    """Codes and labels as .npy (continuous outputs, as released), metrics.json and the plots; with
    ``paths`` (query paths, database paths), retrieval_grid.png too."""
    arrays = dict(zip(CODE_FILES, (database_codes, database_labels, query_codes, query_labels)))
    for name, array in arrays.items():
        atomic_write(os.path.join(output_dir, f"{name}.npy"), lambda stream, a=array: np.save(stream, np.asarray(a)))
    write_text_atomically(os.path.join(output_dir, "metrics.json"), json.dumps(result, indent=1))
    written = plots.save_retrieval_plots(result, output_dir)
    if paths is not None:
        written.append(save_retrieval_grid(output_dir, result["radius"], paths, database_codes, database_labels,
                                           query_codes, query_labels))
    log.info("saved codes, labels, metrics.json and %d plots to %s", len(written), output_dir)


def save_retrieval_grid(output_dir, radius, paths, database_codes, database_labels, query_codes, query_labels):
    """retrieval_grid.png: a seeded few queries beside the first results of their Hamming ball."""
    query_paths, database_paths = paths
    chosen = np.sort(np.random.default_rng(0).choice(len(query_paths), min(GRID_QUERIES, len(query_paths)),
                                                     replace=False))
    index = HammingIndex(database_codes, database_paths, database_labels)
    answers = index.search(torch.as_tensor(query_codes)[chosen], radius, GRID_RESULTS,
                           query_labels=torch.as_tensor(query_labels)[chosen])
    return plots.save_retrieval_grid(os.path.join(output_dir, "retrieval_grid.png"),
                                     [query_paths[i] for i in chosen], answers, database_paths, radius)


def load_codes(codes_dir):
    """The four arrays that ``save_outputs`` wrote, checked to be continuous or +-1 codes and 0/1 labels."""
    arrays = []
    for name in CODE_FILES:
        path = os.path.join(codes_dir, f"{name}.npy")
        if not os.path.isfile(path):
            raise UsageError(f"--codes_dir {codes_dir}: {name}.npy is missing; it needs "
                             + ", ".join(f"{n}.npy" for n in CODE_FILES))
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise UsageError(f"{path} is not a plain numeric .npy array ({error})") from None
        if name.endswith("_code"):
            _check_codes(array, path)
        arrays.append(torch.from_numpy(array if array.dtype == np.float64 else array.astype(np.float32)))
    return arrays


def saved_dataset_name(codes_dir):
    """The dataset name a codes folder's metrics.json records, or None."""
    try:
        with open(os.path.join(codes_dir, "metrics.json"), encoding="utf-8") as handle:
            return json.load(handle).get("dataset")
    except (OSError, ValueError, AttributeError):
        return None


def check_evaluation_data(spec):
    """Every list of the evaluation parses and every image opens."""
    for split in ("test", "database"):
        data_list.verify_list_images(data_list.require_list(spec, split), spec.data_root)


def _check_codes(array, path):
    """Codes must be continuous outputs or +-1: 0/1 bits would all become +1 under sign (sign(0) = +1)."""
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise UsageError(f"{path}: codes must be a real (N, K) array, got shape {array.shape} and dtype {array.dtype}")
    if array.size and np.isin(array, (0, 1)).all() and (array == 0).any():
        raise UsageError(f"{path} holds 0/1 bits, but codes are read as signs (0 would count as +1, so every "
                         "bit would be +1); save the network's continuous outputs or +-1 codes (2 * bits - 1)")


def _normalised(path):
    return os.path.normpath(os.path.abspath(path))


@torch.no_grad()
def encode(model, loader, device, description="encoding", log_every_s=10.0, amp=False, should_stop=bool):
    """Continuous codes and labels of the items ``loader`` yields, in dataset order: (N, K) and (N, C)
    over the whole dataset, rows of items it does not yield (another rank's share) left at zero.

    ``amp``: run the network under bfloat16 autocast; the codes are returned in float32.
    ``should_stop()`` is asked after every batch; when it is true, ``Stopped`` is raised.
    """
    was_training = model.training
    model.eval()
    dataset = loader.dataset
    codes = torch.zeros(len(dataset), model.hash_layer.out_features)  # (N, K)
    labels = torch.zeros(len(dataset), dataset.labels.shape[1])       # (N, C)
    done, start, last_log = 0, time.perf_counter(), time.perf_counter()
    for images, batch_labels, indices in _batches(loader):
        with autocast(device, amp):
            codes[indices] = model(images.to(device, non_blocking=True)).float().cpu()
        labels[indices] = batch_labels.float()
        done += len(indices)
        if time.perf_counter() - last_log > log_every_s:
            last_log = time.perf_counter()
            log.info("%s: %d/%d images (%.0f img/s)", description, done, len(loader.sampler),
                     done / (last_log - start))
        if should_stop():
            raise Stopped(description)
    model.train(was_training)
    return codes, labels


def _batches(loader):
    """The loader's batches; a worker's DataError arrives as one line, without the worker's traceback."""
    try:
        yield from loader
    except data_list.DataError as error:
        raise data_list.DataError.from_loader(error) from None
