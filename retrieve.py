"""Ask a trained MMHH model for the database images near a query image: every item within Hamming radius
r of the query's sign code, found by table lookup and ranked by the continuous score, printed as a
table, and optionally written as JSON and drawn as a picture (README, "Retrieval: the Hamming-ball lookup").

    python retrieve.py --model_path SNAPSHOT --dataset fashion_mnist --save_index fashion.index
    python retrieve.py --index fashion.index --model_path SNAPSHOT --query shoe.png --grid shoe.png
    python retrieve.py --codes_dir test_output/demo --dataset fashion_mnist --save_index demo.index
"""
import argparse
import json
import logging
import os
import sys

import torch

import data_list
import plots
import retrieval
from runtime import UsageError, run_cli, select_device, setup_logging, write_text_atomically

log = logging.getLogger("mmhh")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Hamming-ball retrieval with an MMHH model: index a "
                                                 "database, query it with images, see the answers.")
    database = retrieval.add_database_flags(parser)
    database.add_argument("--save_index", default=None,
                          help="write the index (codes, paths, labels) to this file for later --index runs")
    queries = parser.add_argument_group("queries")
    queries.add_argument("--query", nargs="+", default=[], metavar="IMAGE", help="query image files")
    queries.add_argument("--query_list", default=None,
                         help="list of query images, one 'path [l1 ... lC]' a line; labels are optional: given "
                              "on every line (0/1, as the database's), the results are marked relevant or not")
    answers = parser.add_argument_group("answers")
    answers.add_argument("--radius", type=int, default=2, help="Hamming radius of the ball (default 2)")
    answers.add_argument("--topk", type=int, default=10, help="results shown per query (default 10)")
    answers.add_argument("--fallback_topk", type=int, default=0,
                         help="for an empty ball, show this many nearest codes instead, by Hamming distance "
                              "then score (default 0: none)")
    answers.add_argument("--json", default=None, help="write the answers to this JSON file")
    answers.add_argument("--grid", default=None, help="draw each query beside its results into this PNG file")
    answers.add_argument("--grid_queries", type=int, default=50,
                         help="queries drawn in --grid, the first ones (default 50; 0: all): a picture of "
                              "hundreds of queries is taller than most image viewers open")
    answers.add_argument("--overwrite", action="store_true",
                         help="replace existing --save_index, --json and --grid files instead of stopping")
    retrieval.add_encoding_flags(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    setup_logging(None, None, to_file=False)
    device = select_device(args.gpu_id)
    snapshot, model = retrieval.load_model(args, device)
    index = retrieval.database_index(args, snapshot, model, device)
    if args.grid and index.paths is None:
        raise UsageError(f"--grid draws the database's images, but {args.index or args.codes_dir} has no image "
                         "paths; give the list the codes were made from (--dataset NAME or --database_list FILE)")
    if args.save_index:
        index.save(args.save_index)
        log.info("saved the index of %d %d-bit codes to %s", len(index), index.bits, args.save_index)
    if not (args.query or args.query_list):
        return 0
    query_paths, query_labels, origins = read_queries(args, index)
    queries = data_list.ImageList(query_paths, torch.zeros(len(query_paths), 1), retrieval.image_transform(args),
                                  origins)
    query_codes = retrieval.encode_images(model, queries, args, device, "encoding queries")
    answers = index.search(query_codes, args.radius, args.topk, args.fallback_topk, query_labels)
    print_answers(query_paths, answers, index, args)
    if args.json:
        write_text_atomically(args.json, json.dumps(answers_json(query_paths, answers, index), indent=1))
        log.info("wrote %s", args.json)
    if args.grid:
        drawn = min(args.grid_queries or len(answers), len(answers))
        plots.save_retrieval_grid(args.grid, query_paths[:drawn], answers[:drawn], index.paths, args.radius)
        cut = f" (the first {drawn} of {len(answers)} queries; --grid_queries 0 draws all)"
        log.info("drew %s%s", args.grid, cut if drawn < len(answers) else "")
    return 0


def check_flags(args):
    """Every flag problem before any work: one line each."""
    retrieval.check_database_flags(args)
    if (args.query or args.query_list) and not args.model_path:
        raise UsageError("queries are images: give --model_path SNAPSHOT, the network that made the index's codes")
    if args.query and args.query_list:
        raise UsageError("give --query IMAGE ... or --query_list FILE, not both")
    if not (args.query or args.query_list or args.save_index):
        raise UsageError("nothing to do: give --query IMAGE ... or --query_list FILE, or --save_index FILE")
    if (args.json or args.grid) and not (args.query or args.query_list):
        raise UsageError("--json and --grid hold answers to queries: give --query IMAGE ... or --query_list FILE")
    for flag, low in (("radius", 0), ("topk", 1), ("fallback_topk", 0), ("grid_queries", 0), ("batch_size", 1),
                      ("workers", 0)):
        if getattr(args, flag) < low:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least {low}")
    if args.grid and not args.grid.lower().endswith(".png"):
        raise UsageError(f"--grid {args.grid}: the picture is a PNG file; name it *.png")
    existing = [path for path in (args.save_index, args.json, args.grid) if path and os.path.exists(path)]
    if existing and not args.overwrite:
        raise UsageError(f"{', '.join(existing)} already exist(s); pass other names, or --overwrite to replace them")


def read_queries(args, index):
    """Query image paths, their 0/1 labels (Q, C) or None, and where each came from (for error lines)."""
    if args.query:
        for path in args.query:
            if not os.path.isfile(path):
                raise data_list.DataError(f"--query {path}: no such image file")
        return list(args.query), None, ["--query"] * len(args.query)
    if not os.path.isfile(args.query_list):
        raise data_list.DataError(f"--query_list {args.query_list} does not exist")
    queries = data_list.read_list_file(args.query_list, args.data_root, labels_optional=True)
    labels = None if queries.labels is None else torch.as_tensor(queries.labels)
    if labels is not None:
        if index.labels is None:
            log.info("the index has no labels: relevance is not shown")
        elif labels.shape[1] != index.labels.shape[1]:
            raise UsageError(f"{args.query_list} has {labels.shape[1]} labels a line but the index's items have "
                             f"{index.labels.shape[1]}: give queries labelled like the database")
    data_list.check_images_exist(queries)
    return queries.paths, labels, queries.origins


def print_answers(query_paths, answers, index, args):
    """A table per query: rank, Hamming distance, score, relevance (when known), item."""
    for number, (query, answer) in enumerate(zip(query_paths, answers), start=1):
        print(f"\nquery {number}/{len(answers)}: {query}")
        if answer.fallback:
            print(f"  ball of radius {args.radius}: empty; the {len(answer.index)} nearest codes, by Hamming "
                  "distance then score:")
        elif answer.ball_size == 0:
            print(f"  ball of radius {args.radius}: empty (--fallback_topk N shows the N nearest codes instead)")
            continue
        else:
            print(f"  ball of radius {args.radius}: {answer.ball_size} items, the first {len(answer.index)} by score:")
        relevant = answer.relevant.tolist() if answer.relevant is not None else None
        header = f"  {'rank':>4}  {'distance':>8}  {'score':>10}  "
        print(header + ("relevant  " if relevant is not None else "") + "item")
        for rank, (item, distance, score) in enumerate(zip(answer.index.tolist(), answer.distance.tolist(),
                                                            answer.score.tolist())):
            mark = f"{'yes' if relevant[rank] else 'no':<8}  " if relevant is not None else ""
            print(f"  {rank + 1:>4}  {distance:>8}  {score:>10.4f}  {mark}{item_name(index, item)}")


def answers_json(query_paths, answers, index):
    """[{query, ball_size, fallback, results: [{rank, index, path, distance, score[, relevant]}]}]."""
    numbers = retrieval.item_numbers(index)
    return [retrieval.answer_document(query, answer, index, numbers) for query, answer in zip(query_paths, answers)]


def item_name(index, item):
    """A database item as the table shows it: its path relative to here when shorter, else #index."""
    if not index.paths:
        return f"#{item}"
    path = index.paths[item]
    relative = os.path.relpath(path)
    return relative if len(relative) < len(path) else path


if __name__ == "__main__":
    sys.exit(run_cli(main))
