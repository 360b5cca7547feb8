"""Retrieval with a trained MMHH model, shared by retrieve.py and serve.py: the database that the flags
name (an index file, test_mmhh.py's saved codes, or a list encoded by a snapshot), images encoded as the
evaluation encodes them, and each query's answer as the JSON document both scripts give (README,
"Retrieval: the Hamming-ball lookup" and "Search page and API").
"""
import dataclasses
import logging
import os

import torch

import checkpoint
import data_list
import evaluation
from hamming_index import HammingIndex
from runtime import UsageError, autocast

log = logging.getLogger("mmhh")

# Keys of an index's ``source`` that serve.py writes once items were added or removed: each item's
# number, which stays with the item when others are removed, and the number the next added item gets.
ITEM_NUMBERS, NEXT_ITEM_NUMBER = "item_numbers", "next_item_number"


def add_database_flags(parser):
    """The flags that name the database (--index, --codes_dir, or --model_path with a list); the group."""
    database = parser.add_argument_group("the database: --index, --codes_dir, or --model_path with a list")
    database.add_argument("--index", default=None, help="index file written by retrieve.py --save_index")
    database.add_argument("--codes_dir", default=None,
                          help="test_mmhh.py output folder: database_code.npy and database_labels.npy")
    database.add_argument("--model_path", default=None,
                          help="snapshot of train_mmhh.py: encodes the query images, and the database when "
                               "neither --index nor --codes_dir is given")
    database.add_argument("--dataset", default=None,
                          help="dataset under --data_dir whose database list is indexed (default: the "
                               "snapshot's --t_dataset); with --codes_dir, the list that names the items")
    database.add_argument("--database_list", default=None, help="database list file (overrides the dataset's)")
    database.add_argument("--data_dir", default="data", help="folder of the dataset folders (default data)")
    database.add_argument("--data_root", default=None,
                          help="folder that relative image paths of the lists are relative to "
                               "(default: each list's folder)")
    return database


def add_encoding_flags(parser):
    """How the snapshot encodes images, as test_mmhh.py."""
    encoding = parser.add_argument_group("encoding, as test_mmhh.py")
    encoding.add_argument("--gpu_id", default="0", help="CUDA device index; 'cpu' forces the CPU (default 0)")
    encoding.add_argument("--batch_size", type=int, default=16, help="images per encoding batch (default 16)")
    evaluation.add_encoding_flags(encoding)
    return encoding


def check_database_flags(args):
    """The database flags name exactly one database; one line otherwise."""
    sources = [flag for flag in ("index", "codes_dir") if getattr(args, flag)]
    if len(sources) > 1:
        raise UsageError("give one database: --index FILE or --codes_dir DIR, not both")
    if not sources and not args.model_path:
        raise UsageError("give the database: --index FILE, --codes_dir DIR, or --model_path SNAPSHOT with "
                         "--dataset NAME or --database_list FILE")
    if args.index and (args.dataset or args.database_list):
        raise UsageError(f"--index {args.index} holds its database already; drop --dataset/--database_list")


def load_model(args, device):
    """(snapshot, network in eval mode on ``device``) of --model_path, or (None, None) without one; the
    image sizes not given as flags become the snapshot's."""
    if not args.model_path:
        return None, None
    return checkpoint.encoder_from_snapshot(args, device)


def database_index(args, snapshot, model, device):
    """The index to query: loaded, made from saved codes, or encoded from a database list."""
    if args.index:
        index = HammingIndex.load(args.index)
        log.info("index %s: %d %d-bit codes%s", args.index, len(index), index.bits,
                 "" if index.paths else " (no image paths: items are named by database index)")
    elif args.codes_dir:
        index = saved_codes_index(args)
    else:
        index = encoded_index(args, snapshot["args"]["t_dataset"], model, device)
    if snapshot:
        check_snapshot_fits(args.model_path, snapshot, index, args.index or args.codes_dir)
    return index


def saved_codes_index(args):
    """An index of test_mmhh.py's saved database codes, the items named by the list given, if any."""
    database_codes, database_labels, _, _ = evaluation.load_codes(args.codes_dir)
    paths = None
    if args.dataset or args.database_list:
        listing = read_database_list(args, None)
        paths = listing.paths
        if len(paths) != len(database_codes):
            raise UsageError(f"{listing.path} lists {len(paths)} images but --codes_dir {args.codes_dir} holds "
                             f"{len(database_codes)} codes: give the database list the codes were made from")
    else:
        recorded = evaluation.saved_dataset_name(args.codes_dir)
        log.info("no image paths: items are named by database index; to name them, pass the list the codes were "
                 "made from (--dataset NAME or --database_list FILE%s)",
                 f"; metrics.json records dataset '{recorded}'" if recorded else "")
    source = {"codes_dir": os.path.abspath(args.codes_dir), "dataset": args.dataset}
    return HammingIndex(database_codes, paths, database_labels, source)


def encoded_index(args, default_dataset, model, device):
    """Encode a database list (--database_list, else --dataset's, else the snapshot's dataset's)."""
    listing = read_database_list(args, default_dataset)
    data_list.check_images_exist(listing)
    log.info("indexing the %d images of %s", len(listing.paths), listing.path)
    database = data_list.ImageList(listing.paths, listing.labels, image_transform(args), listing.origins)
    codes = encode_images(model, database, args, device, "encoding database")
    source = {"model_path": os.path.abspath(args.model_path), "database_list": os.path.abspath(listing.path)}
    return HammingIndex(codes, listing.paths, listing.labels, source)


def read_database_list(args, default_dataset):
    """The ListFile of --database_list, else of the dataset's database list, its image paths absolute."""
    if args.database_list and not args.dataset:
        list_path, root = args.database_list, args.data_root
    else:
        spec = data_list.resolve_dataset(args.dataset or default_dataset, args.data_dir,
                                         database_list=args.database_list, data_root=args.data_root,
                                         needs=("database",))
        list_path, root = data_list.require_list(spec, "database"), spec.data_root
    listing = data_list.read_list_file(list_path, root)
    return dataclasses.replace(listing, paths=[os.path.abspath(path) for path in listing.paths])


def check_snapshot_fits(model_path, snapshot, index, index_name):
    """The query network must make codes of the index's length, and should be the one that made them."""
    bits = snapshot["args"]["hash_bit"]
    if bits != index.bits:
        raise UsageError(f"snapshot {model_path} makes {bits}-bit codes, but {index_name} holds {index.bits}-bit "
                         "codes; query with the snapshot that made the index")
    made_by = index.source.get("model_path")
    if made_by and made_by != os.path.abspath(model_path):
        log.warning("warning: %s was made by snapshot %s, the queries are encoded by %s: their codes compare "
                    "only if it is the same network", index_name, made_by, model_path)


def image_transform(args):
    """The evaluation transform at the snapshot's (or the flags') sizes."""
    return data_list.test_transform(args.resize_size, args.crop_size)


def encode_images(model, dataset, args, device, description):
    """(n, K) continuous codes of an ImageList's images."""
    loader = data_list.evaluation_loader(dataset, args.batch_size, args.workers)
    codes, _ = evaluation.encode(model, loader, device, description=description, amp=args.amp)
    return codes


@torch.no_grad()
def encode_image(model, image, transform, device, amp=False):
    """(1, K) continuous code of one decoded PIL image: the code encode_images gives it in a batch of one."""
    with autocast(device, amp):
        return model(transform(image.convert("RGB"))[None].to(device)).float().cpu()


def item_numbers(index):
    """(N,) int64 number of each item, ascending: its position, unless serve.py removed items before it."""
    numbers = index.source.get(ITEM_NUMBERS)
    return torch.arange(len(index)) if numbers is None else torch.as_tensor(numbers, dtype=torch.int64)


def answer_document(query, answer, index, numbers):
    """{query, ball_size, fallback, results: [{rank, index, path, distance, score[, relevant]}]} of one
    hamming_index.Answer; ``numbers`` are ``item_numbers(index)``."""
    results = []
    for rank, (item, number, distance, score) in enumerate(zip(answer.index.tolist(),
                                                                numbers.index_select(0, answer.index).tolist(),
                                                                answer.distance.tolist(), answer.score.tolist()),
                                                            start=1):
        result = {"rank": rank, "index": number, "path": index.paths[item] if index.paths else None,
                  "distance": distance, "score": score}
        if answer.relevant is not None:
            result["relevant"] = bool(answer.relevant[rank - 1])
        results.append(result)
    return {"query": query, "ball_size": answer.ball_size, "fallback": answer.fallback, "results": results}
