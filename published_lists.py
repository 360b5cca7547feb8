"""pre_process.py import: published HashNet-format lists (HashNet's, DeepHash's), whose paths were written on
another machine, mapped onto the images of this one and written as a dataset."""
import hashlib
import os
import sys

from data_list import DEFAULT_PRESET, PRESETS, SPLITS, DataError, read_list_file
from dataset_flags import add_command, add_data_dir
from dataset_folder import (
    dataset_record,
    label_counts,
    list_text,
    print_written,
    write_folder_whole,
)
from runtime import UsageError

# How many unmappable lines `import` prints before counting the rest.
MAX_REPORTED = 20


def add_import_command(commands):
    """The `import` subcommand and its flags."""
    sub = add_command(commands, "import", import_lists, [add_data_dir], "dataset NAME from published list files",
                      "Turn published HashNet-format lists (HashNet's, DeepHash's) into dataset "
                      "DATA_DIR/NAME. Their paths were written on another machine: each line is mapped "
                      "to the file under --image_root sharing the longest path suffix with it, in whole "
                      "components and at least the file name (e.g. /home/x/coco/val2014/a.jpg to "
                      "val2014/a.jpg). Labels and line order are kept; paths are written relative to "
                      "--image_root, which becomes data_root. A line mapping to no file, or to two "
                      "files equally well, is reported as file:line (exit 1, nothing written). "
                      "dataset.json records each source list's sha256, per-list counts and how many "
                      "queries and training lines are in the database. The folder appears whole or "
                      "not at all.")
    sub.add_argument("--dataset", required=True, help="name of the dataset to write under DATA_DIR")
    for split, what in (("train", "training"), ("test", "query"), ("database", "database")):
        sub.add_argument(f"--{split}_list", required=True, help=f"the published {what} list")
    sub.add_argument("--image_root", required=True, help="folder holding the images, in any layout")
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an existing DATA_DIR/NAME (only once the new one is complete)")


def import_lists(args):
    """Map published lists onto the images under --image_root and write them as dataset NAME."""
    folder = os.path.join(args.data_dir, args.dataset)
    sources = {split: getattr(args, f"{split}_list") for split in SPLITS}
    check_import_paths(args, sources, folder)
    published = {split: read_list_file(path) for split, path in sources.items()}
    width = common_label_width(sources, {split: listing.labels.shape[1] for split, listing in published.items()})
    wanted = {path_components(token)[-1] for listing in published.values() for token in listing.tokens}
    mapped, problems = map_lists(published, sources, index_images(args.image_root, wanted), args.image_root)
    if problems:
        return report_unmapped(problems, args.image_root)
    # the labels were parsed as 0/1 tokens, so writing them back gives the same tokens
    lists = {split: list_text(mapped[split], published[split].labels) for split in SPLITS}
    record = dataset_record(args, args.dataset, width, mapped, root=args.image_root,
                            data_root=os.path.abspath(args.image_root),
                            presets=PRESETS.get(args.dataset, DEFAULT_PRESET),
                            protocol=imported_protocol(sources, published, mapped))
    write_folder_whole(folder, lists, record)
    print_written(folder, record)
    return 0


def check_import_paths(args, sources, folder):
    """Refuse missing inputs, and an existing dataset folder unless --overwrite."""
    for split, path in sources.items():
        if not os.path.isfile(path):
            raise UsageError(f"--{split}_list {path} does not exist; pass the published list file")
    if not os.path.isdir(args.image_root):
        raise UsageError(f"--image_root {args.image_root} is not a folder; pass the folder that holds "
                         "the images")
    if os.path.lexists(folder) and not args.overwrite:
        raise UsageError(f"{folder} already exists; pass --overwrite to replace it, or choose another "
                         "--dataset")


def map_lists(published, sources, by_name, root):
    """Each list's image paths under ``root`` (None where unmapped) and a file:line problem per bad line."""
    mapped, problems = {}, []
    for split, listing in published.items():
        mapped[split] = []
        for number, token in zip(listing.line_numbers, listing.tokens):
            match, problem = best_match(token, by_name, root)
            mapped[split].append(match)
            if problem:
                problems.append(f"{sources[split]}:{number}: {problem}")
    return mapped, problems


def common_label_width(sources, widths):
    """The label width of the three lists, which must agree."""
    for split in ("test", "database"):
        if widths[split] != widths["train"]:
            raise DataError(f"--{split}_list {sources[split]} has {widths[split]} labels a line, but "
                            f"--train_list {sources['train']} has {widths['train']}; pass the three "
                            "lists of one dataset")
    return widths["train"]


def path_components(token):
    """The components of a list path written on any machine, '.' and empty ones dropped (at least one)."""
    return [part for part in token.replace("\\", "/").split("/") if part not in ("", ".")] or [""]


def index_images(root, wanted):
    """Paths (relative to ``root``, '/'-separated) of the files under it named in ``wanted``, by name."""
    top = os.stat(root)
    by_name, scanned, folders, seen = {}, 0, [""], {(top.st_dev, top.st_ino)}
    while folders:
        relative = folders.pop()
        with os.scandir(os.path.join(root, relative)) as entries:
            for entry in entries:
                path = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir():
                    info = entry.stat()
                    if (info.st_dev, info.st_ino) not in seen:  # linked folders are walked once: no loops
                        seen.add((info.st_dev, info.st_ino))
                        folders.append(path)
                elif entry.name in wanted:
                    by_name.setdefault(entry.name, []).append(path)
                scanned += 1
                if scanned % 100000 == 0:
                    print(f"  {scanned} files indexed under {root}", file=sys.stderr, flush=True)
    return by_name


def best_match(token, by_name, root):
    """The indexed path sharing the longest path suffix with ``token``, or None and why."""
    parts = path_components(token)
    candidates = by_name.get(parts[-1], [])
    if not candidates:
        return None, (f"{token} maps to no file under {root}; put the image there or pass the "
                      "--image_root that holds it")
    shared = [common_suffix_length(parts, candidate.split("/")) for candidate in candidates]
    best = sorted(c for c, n in zip(candidates, shared) if n == max(shared))
    if len(best) > 1:
        return None, (f"{token} maps to two or more files under {root} equally well: {', '.join(best)}; "
                      "pass an --image_root that holds only one of them")
    return best[0], None


def common_suffix_length(parts, other):
    """How many trailing path components two paths share."""
    length = 0
    for mine, theirs in zip(reversed(parts), reversed(other)):
        if mine != theirs:
            break
        length += 1
    return length


def report_unmapped(problems, root):
    """Print the first unmappable lines and a count of the rest on stderr; exit status 1."""
    for problem in problems[:MAX_REPORTED]:
        print(problem, file=sys.stderr)
    if len(problems) > MAX_REPORTED:
        print(f"... and {len(problems) - MAX_REPORTED} more", file=sys.stderr)
    print(f"error: {len(problems)} list line(s) do not map to exactly one file under {root}; nothing "
          "written", file=sys.stderr)
    return 1


def imported_protocol(sources, published, mapped):
    """The protocol record of imported lists: source files, per-list counts, overlaps with the database."""
    database = set(mapped["database"])
    return {"type": "imported",
            "source_files": {split: {"path": os.path.abspath(path), "sha256": file_sha256(path)}
                             for split, path in sources.items()},
            "counts": {split: label_counts(listing.labels) for split, listing in published.items()},
            "queries_in_database": sum(path in database for path in mapped["test"]),
            "train_in_database": sum(path in database for path in mapped["train"])}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
