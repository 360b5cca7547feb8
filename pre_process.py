"""Build the HashNet-format image lists of a dataset or import published ones, derive the
noisy-label and unseen-class protocols from built lists, and validate lists.

Every builder writes DATA_DIR/NAME/{train,test,database}.txt (``path l1 ... lC``, 0/1 labels; paths
relative to the list's folder, or to the ``data_root`` of DATA_DIR/NAME/dataset.json) and that
dataset.json (sizes, retrieval presets, source command, seed, protocol). All random choices are
seeded by --seed, so the same command writes the same lists. The COCO builder follows HashNet's
published lists by default, NUS-WIDE-81 draws its queries from labelled images as the release's
evaluation does, CIFAR-10 makes DCH's split (--protocol names the others); `import` takes published lists
as they are.

Examples:
  python pre_process.py fashion_mnist
  python pre_process.py coco --root /data/coco2014
  python pre_process.py import --dataset coco_80 --train_list train.txt --test_list test.txt \\
      --database_list database.txt --image_root /data/coco2014
  python pre_process.py noise --dataset fashion_mnist --rate 0.3
  python pre_process.py unseen --dataset nuswide_21 --unseen_ratio 0.25
  python pre_process.py pairs --dataset fashion_mnist [--multilabel]
  python pre_process.py validate --dataset fashion_mnist
"""
import argparse
import shlex
import sys

from data_list import DataError
from dataset_splits import (
    add_cifar10_command,
    add_coco_command,
    add_fashion_mnist_command,
    add_imagenet100_command,
    add_nuswide_command,
)
from derived_datasets import add_noise_command, add_pairs_command, add_unseen_command, add_val_command
from list_validation import add_validate_command
from published_lists import add_import_command
from runtime import run_cli

# The subcommands, in the order --help lists them; each module adds its own with their flags.
COMMANDS = (add_fashion_mnist_command, add_cifar10_command, add_coco_command, add_nuswide_command,
            add_imagenet100_command, add_noise_command, add_unseen_command, add_pairs_command, add_import_command,
            add_val_command, add_validate_command)


def main(argv=None):
    """Run a subcommand; its exit code: 0 done, 1 defects found (validate, import), 2 unusable input."""
    return run_cli(run_command, argv)


def run_command(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command_line = shlex.join(["pre_process.py", *argv])
    try:
        return args.run(args)
    except OSError as error:
        # A file that cannot be read or written is unusable input too: one line and exit 2, no traceback.
        raise DataError(str(error)) from error


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
