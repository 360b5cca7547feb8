"""The pieces of pre_process.py's command line that its subcommands share: the common flags, the split-size
flags and their checks, and the value types of the flags."""
import argparse

from runtime import UsageError


def add_command(commands, name, run, shared, summary, description):
    """Subcommand ``name``, which runs ``run(args)``; the ``shared`` flag adders put their flags first."""
    sub = commands.add_parser(name, help=summary, description=description)
    for add_flag in shared:
        add_flag(sub)
    sub.set_defaults(run=run)
    return sub


def add_data_dir(sub):
    sub.add_argument("--data_dir", default="data", help="folder of the dataset folders (default: data)")


def add_seed(sub):
    sub.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")


def add_workers(sub):
    sub.add_argument("--workers", type=positive_int, default=2,
                     help="processes that write or check images (default: 2)")


def add_sizes(sub, sizes, unit="class"):
    """A flag for each split size, with its default."""
    for name, default in sizes.items():
        sub.add_argument(f"--{name}", type=non_negative_int, default=default,
                         help=f"{size_help(name, unit)} (default: {default})")


def add_protocol_sizes(sub, sizes_by_protocol, unit="class"):
    """A flag for each split size of any --protocol; left unset, it takes the chosen protocol's default."""
    for name in dict.fromkeys(name for sizes in sizes_by_protocol.values() for name in sizes):
        defaults = ", ".join(f"{sizes[name]} with --protocol {protocol}"
                             for protocol, sizes in sizes_by_protocol.items() if name in sizes)
        sub.add_argument(f"--{name}", type=non_negative_int, default=None,
                         help=f"{size_help(name, unit)} (default: {defaults})")


def size_help(name, unit):
    return {"num_queries": "random images drawn as queries",
            "num_train": "random images, not queries, drawn for training",
            "num_queries_per_class": f"queries a {unit}",
            "num_train_per_class": f"training images a {unit}"}[name]


def protocol_sizes(args, sizes_by_protocol):
    """The split sizes of ``args.protocol``, flag or default; a size flag of other protocols only is an error."""
    chosen = sizes_by_protocol[args.protocol]
    for name in dict.fromkeys(name for sizes in sizes_by_protocol.values() for name in sizes):
        if name not in chosen and getattr(args, name) is not None:
            owners = [protocol for protocol, sizes in sizes_by_protocol.items() if name in sizes]
            raise UsageError(f"--{name} sets a size of --protocol {' or '.join(owners)}, not of --protocol "
                             f"{args.protocol}; drop it or pass --protocol {owners[0]}")
    return [default if getattr(args, name) is None else getattr(args, name) for name, default in chosen.items()]


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give a count of 0 or more")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return value


def fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def class_indices(text):
    try:
        columns = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        columns = []
    if not columns:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of label columns, "
                                         "e.g. 0,3,7")
    return columns
