"""Load on serve.py: concurrent clients on 127.0.0.1 search the demo's database by item and by uploaded
image, then both while items are being added; prints requests a second, latency percentiles (p50, p95,
p99) and errors, all measured in this run (README, "Search page and API").

The service runs as `python serve.py` in its own process, on a copy of the demo's database in a temporary
folder (the adds change only that copy). Every phase stops at its request count or at --max_seconds,
whichever comes first; the clients talk HTTP/1.1 with keep-alive, one connection each.

    make demo && python bench/bench_serve.py
    python bench/bench_serve.py --clients 4 --item_requests 2000 --upload_requests 2000 --mixed_requests 1000
"""
import argparse
import contextlib
import http.client
import itertools
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_list  # noqa: E402  (after the path set-up)
import retrieval  # noqa: E402
from hamming_index import HammingIndex  # noqa: E402

DEMO_SNAPSHOT = "snapshot/hash/demo_fashion_mnist_fashion_mnist_iter_00800"
BOUNDARY = "mmhh-bench-boundary"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Load on serve.py: searches by item and by upload, then both "
                                                 "while items are added.")
    parser.add_argument("--codes_dir", default="test_output/demo", help="saved codes to serve (default: the demo's)")
    parser.add_argument("--index", default=None, help="serve a copy of this index file instead of --codes_dir")
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="the dataset the codes were made from; its query images are the uploads")
    parser.add_argument("--data_dir", default="data", help="folder of the dataset folders (default data)")
    parser.add_argument("--model_path", default=DEMO_SNAPSHOT,
                        help="snapshot that encodes uploads (default: the demo's)")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients (default 2)")
    parser.add_argument("--item_requests", type=int, default=4000, help="searches by item (default 4000)")
    parser.add_argument("--upload_requests", type=int, default=4000, help="searches by upload (default 4000)")
    parser.add_argument("--mixed_requests", type=int, default=2000,
                        help="searches, half by item and half by upload, while one more client adds items "
                             "(default 2000)")
    parser.add_argument("--max_adds", type=int, default=200, help="items added at most in the last phase (default 200)")
    parser.add_argument("--max_seconds", type=float, default=120.0, help="each phase stops after this (default 120)")
    parser.add_argument("--radius", type=int, default=2, help="radius of the searches (default 2)")
    parser.add_argument("--topk", type=int, default=10, help="results a search asks for (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the items and images asked for (default 0)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        index_path = os.path.join(tmp, "demo.index")
        items = copy_index(args, index_path)
        images = query_images(args)
        uploads = [multipart_body(path) for path in rng.sample(images, min(200, len(images)))]
        with running_server(args, index_path, tmp) as port:
            search = f"/api/search?radius={args.radius}&topk={args.topk}"
            by_item = lambda n: ("POST", f"{search}&item={rng.randrange(items)}", None)   # noqa: E731
            by_upload = lambda n: ("POST", search, uploads[n % len(uploads)])             # noqa: E731
            mixed = lambda n: by_item(n) if n % 2 else by_upload(n)                       # noqa: E731
            adding = lambda n: ("POST", "/api/items", uploads[n % len(uploads)])          # noqa: E731
            rows = run_phase("search by item", port, args.clients, args.item_requests, args.max_seconds, by_item)
            rows += run_phase("search by upload", port, args.clients, args.upload_requests, args.max_seconds,
                              by_upload)
            rows += run_phase("searches while adding", port, args.clients, args.mixed_requests, args.max_seconds,
                              mixed, writer=(args.max_adds, adding))
    print(f"serve.py on {items:,} items of {args.index or args.codes_dir}, {args.clients} clients on 127.0.0.1, radius "
          f"{args.radius}, top {args.topk}; {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print_table(rows)
    return 0


def copy_index(args, path):
    """Write the database to serve at ``path``: a copy of --index, else --codes_dir's codes named by the
    dataset's list. Its item count."""
    if args.index:
        shutil.copy(args.index, path)
        return len(HammingIndex.load(path))
    flags = argparse.Namespace(codes_dir=args.codes_dir, dataset=args.dataset, database_list=None,
                               data_dir=args.data_dir, data_root=None)
    index = retrieval.saved_codes_index(flags)
    index.save(path)
    return len(index)


def query_images(args):
    """The dataset's query images: never database items, so an upload is encoded, never looked up."""
    spec = data_list.resolve_dataset(args.dataset, args.data_dir, needs=("test",))
    return data_list.read_list_file(data_list.require_list(spec, "test"), spec.data_root).paths


def multipart_body(path):
    """A multipart/form-data body holding the image file as the field 'image'."""
    with open(path, "rb") as handle:
        image = handle.read()
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{os.path.basename(path)}\""
            "\r\nContent-Type: image/png\r\n\r\n").encode()
    return head + image + f"\r\n--{BOUNDARY}--\r\n".encode()


@contextlib.contextmanager
def running_server(args, index_path, folder):
    """`python serve.py` on the index with writes allowed, its log in ``folder``; its port once it answers."""
    port = free_port()
    log_path = os.path.join(folder, "serve.log")
    with open(log_path, "w") as log_file:
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--index", index_path,
                                   "--model_path", args.model_path,
                                   "--allow_writes", "--port", str(port), "--gpu_id", "cpu", "--workers", "0"],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until_up(server, port, log_path)
        yield port
    finally:
        server.terminate()
        server.wait(30)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(server, port, log_path, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve.py stopped before answering:\n{open(log_path).read()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/api/stats")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"serve.py did not answer within {timeout} s; its log: {log_path}")


def send(connection, method, path, body):
    """One request on a keep-alive connection: (status, seconds); status 0 when the connection failed."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"} if body else {}
    started = time.perf_counter()
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    except (OSError, http.client.HTTPException):
        connection.close()                                      # reconnects on the next request
        return 0, time.perf_counter() - started


def run_phase(name, port, clients, total, max_seconds, request, writer=None):
    """``clients`` threads send ``request(n)`` for n = 0, 1, ... until ``total`` or ``max_seconds``; with
    ``writer`` (count, request), one more thread sends those meanwhile. The phase's rows."""
    numbers, stop, merging = itertools.count(), threading.Event(), threading.Lock()
    deadline = time.monotonic() + max_seconds
    results = {name: []}

    def client(label, limit, make, counter):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while not stop.is_set() and time.monotonic() < deadline:
            n = next(counter)
            if n >= limit:
                break
            mine.append(send(connection, *make(n)))
        connection.close()
        with merging:
            results[label] += mine

    threads = [threading.Thread(target=client, args=(name, total, request, numbers)) for _ in range(clients)]
    if writer:
        results["add item (meanwhile)"] = []
        threads.append(threading.Thread(target=client, args=("add item (meanwhile)", writer[0], writer[1],
                                                              itertools.count())))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    threads[0].join()
    for thread in threads[1:clients]:
        thread.join()
    searched = time.perf_counter() - started
    stop.set()                                                  # the writer stops with the searches
    for thread in threads[clients:]:
        thread.join()
    return [summarise(label, answers, searched) for label, answers in results.items()]


def summarise(label, answers, seconds):
    """{phase, requests, per second, p50/p95/p99 in ms, errors} of (status, seconds) pairs."""
    latencies = np.array([elapsed for _, elapsed in answers]) * 1000
    errors = sum(not 200 <= status < 300 for status, _ in answers)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (np.nan,) * 3
    return {"phase": label, "requests": len(answers), "per_second": len(answers) / seconds, "p50_ms": p50,
            "p95_ms": p95, "p99_ms": p99, "errors": errors}


def print_table(rows):
    print("| phase | requests | per second | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['phase']} | {row['requests']:,} | {row['per_second']:.1f} | {row['p50_ms']:.1f} | "
              f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |")


if __name__ == "__main__":
    sys.exit(main())
