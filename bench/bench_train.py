"""Training throughput: the project's training step on synthetic batches, and its data loader on JPEGs.

The step is train_mmhh.train_step itself, on a run that train_mmhh.build_run makes from the project's
flags (``--pretrained none``): the network in channels_last, the forward under bfloat16 autocast when
``--amp``, the MMHH loss against the batch, backward, SGD with the project's parameter groups, and the
one host synchronisation a step that the non-finite check needs. Batches are synthetic, in pinned host
memory on CUDA as the loader delivers them, so the step's time excludes the loader's. Each step is
timed between device synchronisations; the median after the warm-up steps is reported.

The loader is data_list.training_loader over data_list.ImageList with data_list.train_transform, on
640x480 JPEGs written to a temporary folder, timed over whole rounds of its worker processes. When it
is slower than a step, the per-image cost of the JPEG decode and of the transforms (one thread, as a
worker has) says how many workers would keep up; on CUDA, nvJPEG's batched decode
(torchvision.io.decode_jpeg on the device) is timed as the alternative.

    python bench/bench_train.py                       # AlexNet and ResNet50, 224 px, batch 128, fp32 and amp
    python bench/bench_train.py --quick --device cpu  # ResNet18, 32 px, batch 8, 2 steps: a dry run
    python bench/bench_train.py --networks ResNet50 --amp on --json bench_train.json

It imports train_mmhh, hence tensorboardX (bench/gpu_check.sh provides a stand-in where it is missing).
"""
import argparse
import concurrent.futures
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_list  # noqa: E402  (needs the repository root on sys.path)
import network  # noqa: E402
import runtime  # noqa: E402
import train_mmhh  # noqa: E402

JPEG_SIZE = (640, 480)
NUM_CLASSES = 10
HASH_BIT = 48
# The project's default resize before the crop is 256 for a 224 crop; other sizes keep that ratio.
RESIZE_PER_CROP = 256 / 224
# The loader is timed over this many whole rounds of its workers (one batch per worker a round).
LOADER_ROUNDS = 2
QUICK = {"networks": "ResNet18", "size": 32, "batch_size": 8, "steps": 2, "warmup": 1, "images": 32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--networks", default="AlexNet,ResNet50",
                        help="comma-separated backbones of network.BACKBONES (AlexNet, ResNet18..152, VGG16...)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--size", type=int, default=224, help="crop size of the images (pixels)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--amp", choices=["both", "on", "off"], default="both",
                        help="time float32 (off), bfloat16 autocast (on), or both")
    parser.add_argument("--images", type=int, default=512, help="JPEGs written for the loader")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="loader worker processes (default: min(16, CPU count))")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for a dry run: " + ", ".join(f"--{k} {v}" for k, v in QUICK.items()))
    parser.add_argument("--json", default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} must be at least --batch_size {args.batch_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    resize = resize_size(args.size)
    failures = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
        dataset = write_jpeg_dataset(folder, args.images, args.workers)
        paths, labels = dataset[1:]
        training = [attempt(failures, {"network": image_network, "backbone": backbone, "amp": amp},
                            time_training_step, args, device, dataset, image_network, backbone, amp)
                    for image_network, backbone in parse_networks(args.networks)
                    for amp in amp_modes(args.amp)]
        loader = attempt(failures, {"part": "loader"}, time_loader, paths, labels, args.batch_size, args.workers,
                         resize, args.size)
        costs = time_per_image(paths, resize, args.size)
        gpu_decode = time_gpu_decode(paths, args.batch_size) if device.type == "cuda" else None
    result = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
              "settings": {key: getattr(args, key) for key in
                           ("networks", "batch_size", "size", "steps", "warmup", "amp", "images", "workers",
                            "quick")},
              "training": training, "loader": loader, "per_image": costs, "gpu_decode": gpu_decode}
    result["loader_vs_step"] = compare_loader(training, loader, costs, args.workers)
    result["failures"] = failures
    print_report(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return 1 if failures else 0


def attempt(failures, identity, measure, *args):
    """``measure(*args)``, or ``identity`` with the error when it raises (also added to ``failures``)."""
    try:
        return measure(*args)
    except Exception as error:  # one failure (out of memory, a killed loader worker) must not cost the rest
        failed = {**identity, "error": f"{type(error).__name__}: {error}"}
        print(f"  failed: {failed}", file=sys.stderr, flush=True)
        failures.append(failed)
        return failed


def parse_networks(text):
    """(image_network, backbone) for each backbone name, its family looked up in network.BACKBONES."""
    families = {backbone: family for family, backbones in network.BACKBONES.items() for backbone in backbones}
    pairs = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        if name not in families:
            raise SystemExit(f"--networks: unknown backbone {name!r}; choose from {', '.join(families)}")
        pairs.append((families[name], name))
    return pairs


def resize_size(crop_size):
    return round(crop_size * RESIZE_PER_CROP)


def amp_modes(choice):
    return {"both": [False, True], "on": [True], "off": [False]}[choice]


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_jpeg_dataset(folder, count, threads, seed=0):
    """``count`` photo-like 640x480 JPEGs and a HashNet-format train list; the dataset's spec, paths, labels."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, NUM_CLASSES, count)
    labels = np.eye(NUM_CLASSES, dtype=np.uint8)[classes]
    # Smooth colour fields plus grain: JPEG sizes and decode costs like photos', unlike pure noise.
    coarse = rng.integers(0, 256, (count, 6, 8, 3), dtype=np.uint8)
    grain = rng.normal(0, 12, (JPEG_SIZE[1], JPEG_SIZE[0], 3))
    shifts = rng.integers(0, JPEG_SIZE[1], count)
    os.makedirs(os.path.join(folder, "bench", "images"))

    def write(index):
        smooth = np.asarray(Image.fromarray(coarse[index]).resize(JPEG_SIZE, Image.BICUBIC), dtype=np.float64)
        pixels = np.clip(smooth + np.roll(grain, shifts[index], axis=0), 0, 255).astype(np.uint8)
        relative = f"images/{index:05d}.jpg"
        Image.fromarray(pixels).save(os.path.join(folder, "bench", relative), quality=90)
        return relative

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:  # PIL encodes without the GIL
        relatives = list(pool.map(write, range(count)))
    with open(os.path.join(folder, "bench", "train.txt"), "w", encoding="utf-8") as handle:
        for relative, row in zip(relatives, labels):
            handle.write(relative + " " + " ".join(map(str, row)) + "\n")
    source = data_list.resolve_dataset("bench", folder, needs=("train",))
    train_list = data_list.read_checked_list(source, "train")
    paths, labels = train_list.paths, train_list.labels
    return source, paths, labels


def build_run(args, device, dataset, image_network, backbone, amp):
    """The project's run (network, loss, optimizer, memory) for this configuration, as train_mmhh builds it."""
    source, paths, labels = dataset
    flags = ["--image_network", image_network, "--backbone", backbone, "--pretrained", "none",
             "--hash_bit", str(HASH_BIT), "--batch_size", str(args.batch_size), "--crop_size", str(args.size),
             "--resize_size", str(resize_size(args.size)), "--num_iters",
             str(args.warmup + args.steps), "--gpu_id", "cpu" if device.type == "cpu" else str(device.index or 0)]
    run_args, _ = train_mmhh.parse_args(flags + (["--amp"] if amp else []))
    train_mmhh.finish_args(run_args)
    # Never entered, so never asked to stop: the bench has no snapshot to write on Ctrl-C.
    run = train_mmhh.build_run(run_args, source, labels, device, runtime.StopSignals())
    train_mmhh.initialise_run(run, run_args, paths, labels)
    run.model.train()
    return run


def synthetic_batches(labels, batch_size, size, count, device, seed=0):
    """``count`` (images, labels, indices) batches in host memory, pinned on CUDA as the loader's are."""
    def staged(tensor):
        return tensor.pin_memory() if device.type == "cuda" else tensor

    generator = torch.Generator().manual_seed(seed)
    all_labels = torch.as_tensor(labels, dtype=torch.float32)
    # One image tensor for every batch: the pixel values do not change the step's cost.
    images = staged(torch.randn(batch_size, 3, size, size, generator=generator))
    batches = []
    for step in range(count):
        indices = (torch.arange(batch_size) + step * batch_size) % len(all_labels)
        batches.append((images, staged(all_labels[indices]), staged(indices)))
    return batches


def time_training_step(args, device, dataset, image_network, backbone, amp):
    """Median seconds of train_mmhh.train_step over --steps after --warmup, and images per second."""
    run = build_run(args, device, dataset, image_network, backbone, amp)
    batches = synthetic_batches(dataset[2], args.batch_size, args.size, args.warmup + args.steps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for iteration, (images, batch_labels, indices) in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        parts, _ = train_mmhh.train_step(run, iteration, images, batch_labels, indices)
        synchronize(device)
        if iteration >= args.warmup:
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    result = {"network": image_network, "backbone": backbone, "size": args.size, "batch_size": args.batch_size,
              "amp": amp, "steps": len(seconds), "median_step_s": median, "min_step_s": min(seconds),
              "images_per_s": args.batch_size / median, "final_loss": parts["total"]}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"  step {backbone:>9} {args.size}px batch {args.batch_size} {'amp ' if amp else 'fp32'}: "
          f"{median * 1e3:8.1f} ms  {result['images_per_s']:8.0f} images/s", flush=True)
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def time_loader(paths, labels, batch_size, workers, resize, crop):
    """Images per second of the training loader over LOADER_ROUNDS whole rounds of its workers.

    Each worker makes whole batches, so batches arrive a round (one per worker) at a time; the first
    round, which includes starting the workers, is left out, and the timing spans whole rounds.
    """
    dataset = data_list.ImageList(paths, labels, data_list.train_transform(resize, crop))
    loader = data_list.training_loader(dataset, batch_size, workers, seed=0)
    batches = iter(loader)
    per_round = max(workers, 1)
    started = time.perf_counter()
    for _ in range(per_round):
        next(batches)
    first_round_s = time.perf_counter() - started
    start = time.perf_counter()
    for _ in range(LOADER_ROUNDS * per_round):
        next(batches)
    seconds = time.perf_counter() - start
    del batches, loader  # stops the persistent workers
    images = LOADER_ROUNDS * per_round * batch_size
    result = {"workers": workers, "batch_size": batch_size, "resize": resize, "crop": crop,
              "pin_memory": torch.cuda.is_available(), "images_timed": images, "seconds": seconds,
              "images_per_s": images / seconds, "first_round_s": first_round_s}
    print(f"  loader {workers} workers, batch {batch_size}: {result['images_per_s']:8.0f} images/s", flush=True)
    return result


def time_per_image(paths, resize, crop, count=64):
    """Milliseconds per image, on one thread as a worker has, of the JPEG decode and of the transforms."""
    sample = paths[:count]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        decoded = [decode(path) for path in sample]
        decode_s = (time.perf_counter() - start) / len(sample)
        transform = data_list.train_transform(resize, crop)
        start = time.perf_counter()
        for image in decoded:
            transform(image)
        transform_s = (time.perf_counter() - start) / len(sample)
    finally:
        torch.set_num_threads(threads)
    return {"images": len(sample), "decode_ms": decode_s * 1e3, "transform_ms": transform_s * 1e3,
            "one_worker_images_per_s": 1.0 / (decode_s + transform_s)}


def decode(path):
    """What data_list.ImageList does before its transform."""
    with Image.open(path) as image:
        return image.convert("RGB")


def time_gpu_decode(paths, batch_size, repeats=5):
    """Images per second of nvJPEG's batched decode of ``batch_size`` files read beforehand; None on error."""
    from torchvision.io import decode_jpeg, read_file
    files = [read_file(path) for path in paths[:batch_size]]
    try:
        decode_jpeg(files, device="cuda")  # warm-up: loads nvJPEG
        seconds = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            decode_jpeg(files, device="cuda")
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    except Exception as error:  # an optional alternative: its failure is a finding, not a crash
        return {"error": f"{type(error).__name__}: {error}"}
    median = statistics.median(seconds)
    return {"images": len(files), "median_batch_s": median, "images_per_s": len(files) / median}


def compare_loader(training, loader, costs, workers):
    """Per configuration: loader rate over step rate, and the workers that rate would need if short."""
    per_image_s = (costs["decode_ms"] + costs["transform_ms"]) / 1e3
    rows = []
    for config in training:
        if "error" in config or "error" in loader:
            continue
        ratio = loader["images_per_s"] / config["images_per_s"]
        row = {"backbone": config["backbone"], "amp": config["amp"], "ratio": ratio, "keeps_up": ratio >= 1.0}
        if ratio < 1.0:
            # Workers scale about linearly until the cores run out; one worker does 1 / per_image_s.
            row["workers_needed"] = math.ceil(config["images_per_s"] * per_image_s)
            row["workers_needed_measured_scaling"] = math.ceil(workers / ratio)
        rows.append(row)
    return rows


def print_report(result):
    print(f"\n### Training throughput on {result['device_name']} (torch {result['torch']})\n")
    print("| network | size | batch | precision | step ms (median) | training images/s | loader/step |")
    print("|---|---|---|---|---|---|---|")
    matches = {(match["backbone"], match["amp"]): match for match in result["loader_vs_step"]}
    for config in result["training"]:
        precision = "bf16 autocast" if config["amp"] else "fp32"
        if "error" in config:
            print(f"| {config['network']} {config['backbone']} | | | {precision} | failed: {config['error']} | | |")
            continue
        match = matches.get((config["backbone"], config["amp"]))
        ratio = f"{match['ratio']:.2f}{'' if match['keeps_up'] else ' (short)'}" if match else "-"
        print(f"| {config['network']} {config['backbone']} | {config['size']} | {config['batch_size']} | "
              f"{precision} | {config['median_step_s'] * 1e3:.1f} | {config['images_per_s']:.0f} | {ratio} |")
    print()
    print_loader_report(result)


def print_loader_report(result):
    loader, costs = result["loader"], result["per_image"]
    if "error" in loader:
        print(f"Loader failed: {loader['error']}")
    else:
        print(f"Loader ({loader['workers']} workers, {JPEG_SIZE[0]}x{JPEG_SIZE[1]} JPEGs -> {loader['crop']} px): "
              f"{loader['images_per_s']:.0f} images/s.")
    print(f"Per image on one thread: JPEG decode {costs['decode_ms']:.2f} ms, transforms "
          f"{costs['transform_ms']:.2f} ms ({costs['one_worker_images_per_s']:.0f} images/s per worker).")
    for match in result["loader_vs_step"]:
        if not match["keeps_up"]:
            print(f"- {match['backbone']} {'amp' if match['amp'] else 'fp32'}: the loader is short by "
                  f"{1 / match['ratio']:.1f}x; at the step's rate it needs about {match['workers_needed']} "
                  f"workers by the per-image cost ({match['workers_needed_measured_scaling']} by the measured "
                  f"rate), on {result['cpu_count']} CPUs.")
    decoded = result["gpu_decode"]
    if decoded:
        print("nvJPEG batched decode on the GPU: "
              + (f"{decoded['images_per_s']:.0f} images/s" if "error" not in decoded else decoded["error"]))


if __name__ == "__main__":
    sys.exit(main())
