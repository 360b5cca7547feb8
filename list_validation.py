"""pre_process.py validate: every line, label width and image of a dataset's lists (or of given lists), the
defects printed as file:line: problem."""
import os

from data_list import DataError, image_problem, read_dataset_json, read_list_file, require_list, resolve_dataset
from dataset_flags import add_command, add_data_dir, add_workers
from dataset_folder import label_counts, map_with_progress


def add_validate_command(commands):
    """The `validate` subcommand and its flags."""
    sub = add_command(commands, "validate", validate, [add_data_dir, add_workers], "check a dataset's lists and images",
                      "Check lists: every line parses (a format error stops that list at its first bad "
                      "line), label widths agree across the lists (unseen protocol: test and database), "
                      "every image exists and PIL decodes it. Prints counts, positives per label, "
                      "all-zero rows and overlaps. Exit 0: clean; 1: defects found, each printed as "
                      "file:line: problem; 2: unusable input.")
    target = sub.add_mutually_exclusive_group(required=True)
    target.add_argument("--dataset", help="name of a dataset under DATA_DIR")
    target.add_argument("--list", action="append", help="a list file (repeat for several)")
    sub.add_argument("--data_root", default=None, help="folder the list paths are relative to")


def validate(args):
    """Check every line, label width and image of a dataset's lists (or given lists)."""
    lists, data_root, protocol = validation_targets(args)
    defects, parsed = [], {}
    for name, path in lists.items():
        try:
            parsed[name] = read_list_file(path, data_root)
        except DataError as error:
            defects.append(str(error))
    defects += width_defects(parsed, lists, protocol)
    defects += image_defects(parsed, args.workers)
    print_list_stats(parsed, lists)
    print_overlaps(parsed)
    for defect in defects:
        print(defect)
    print(f"{len(defects)} defect(s) found" if defects else "no defects found")
    return 1 if defects else 0


def validation_targets(args):
    """The lists to check (name -> path), their data root, and the dataset's protocol type."""
    if args.list:
        return {path: path for path in args.list}, args.data_root, None
    spec = resolve_dataset(args.dataset, args.data_dir, data_root=args.data_root)
    if not any(os.path.isfile(path) for path in spec.lists.values()):
        require_list(spec, "train")  # raises, naming the command that builds the lists
    protocol = (read_dataset_json(spec.folder).get("protocol") or {}).get("type")
    return spec.lists, spec.data_root, protocol


def width_defects(parsed, lists, protocol):
    """Lists whose label width differs from the first list of their group."""
    groups = [["train", "val"], ["test", "database"]] if protocol == "unseen" else [list(lists)]
    defects = []
    for group in groups:
        present = [name for name in group if name in parsed]
        for name in present[1:]:
            reference, width = present[0], parsed[present[0]].labels.shape[1]
            listing = parsed[name]
            if listing.labels.shape[1] != width:
                defects.append(f"{listing.origins[0]}: {listing.labels.shape[1]} labels a line, but "
                               f"{lists[reference]} has {width}; rebuild the lists so the widths agree")
    return defects


def image_defects(parsed, workers):
    """Each list line whose image is missing or does not decode."""
    unique = sorted({path for listing in parsed.values() for path in listing.paths})
    problems = dict(zip(unique, map_with_progress(image_problem, unique, workers, "images checked")))
    return [f"{origin}: image {path} {problems[path]}"
            for listing in parsed.values() for origin, path in zip(listing.origins, listing.paths) if problems[path]]


def print_list_stats(parsed, lists):
    for name, listing in parsed.items():
        counts = label_counts(listing.labels)
        print(f"{name} ({lists[name]}): {counts['lines']} images, {listing.labels.shape[1]} labels, "
              f"{counts['all_zero_rows']} all-zero label rows")
        positives = enumerate(counts["positives_per_label"])
        print("  positives per label: " + " ".join(f"{c}:{n}" for c, n in positives))


def print_overlaps(parsed):
    images = {name: {os.path.normpath(os.path.abspath(p)) for p in listing.paths}
              for name, listing in parsed.items()}
    names = list(images)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            print(f"overlap {first} & {second}: {len(images[first] & images[second])} images")
