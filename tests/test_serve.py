"""serve.py's JSON API with an in-process client: its answers are retrieve.py's, every bad input is a 4xx
naming the problem, writes are refused without --allow_writes, and added items are found, survive a
restart (and a kill -9 in the middle of writing), and keep their numbers when others are removed."""
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx2
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import checkpoint
import hamming_index
import retrieval
import retrieve
import serve
from conftest import write_tiny_dataset
from hamming_index import HammingIndex
from network import build_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def write_untrained_snapshot(path, bits=16):
    """A seeded, untrained 16-bit ResNet18 snapshot: serve.py only needs a network that encodes images."""
    torch.manual_seed(0)
    model = build_network("ResNetFc", bits, backbone="ResNet18", pretrained="none")
    args = {"image_network": "ResNetFc", "backbone": "ResNet18", "hash_bit": bits, "image_loss_type": "DHN",
            "resize_size": 20, "crop_size": 16, "t_dataset": "tiny"}
    checkpoint.save_snapshot(path, {"args": args, "model": model.state_dict()})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny dataset, a snapshot, and the index retrieve.py builds of its database (batch size 1: the
    codes serve.py computes for one image are then the index's to the last bit)."""
    tmp = tmp_path_factory.mktemp("serve")
    data = tmp / "data"
    write_tiny_dataset(str(data))
    snapshot, index = str(tmp / "snapshot"), str(tmp / "tiny.index")
    write_untrained_snapshot(snapshot)
    assert retrieve.main(["--model_path", snapshot, "--data_dir", str(data), "--dataset", "tiny", "--save_index",
                          index, *ENCODING]) == 0
    images = data / "tiny" / "images"
    return types.SimpleNamespace(tmp=tmp, data=data, snapshot=snapshot, index=index, images=images,
                                 query=images / "test_1_0.png", database=HammingIndex.load(index))


ENCODING = ["--gpu_id", "cpu", "--workers", "0", "--batch_size", "1"]


def client_of(served, *flags, index=None):
    """An in-process client of serve.py on the index (default: the fixture's)."""
    service = serve.build_service(["--index", index or served.index, "--model_path", served.snapshot, *ENCODING,
                                   *flags])
    return TestClient(serve.create_app(service))


@pytest.fixture(scope="module")
def client(served):
    return client_of(served)


def upload(path):
    return {"image": (os.path.basename(path), Path(path).read_bytes(), "image/png")}


def retrieve_json(served, tmp_path, *query):
    """retrieve.py --json's documents for the query flags, on the fixture's index."""
    out = tmp_path / f"answers{len(os.listdir(tmp_path))}.json"
    assert retrieve.main(["--index", served.index, "--model_path", served.snapshot, *ENCODING, "--json", str(out),
                          *query]) == 0
    return json.loads(out.read_text())


def without_extras(document):
    """The part of serve.py's answer that retrieve.py --json writes."""
    return {key: document[key] for key in ("query", "ball_size", "fallback", "results")}


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("radius, topk", [(2, 4), (0, 10), (3, 18)])
def test_search_by_upload_is_retrieve_py_answer(served, client, tmp_path, radius, topk):
    answer = client.post(f"/api/search?radius={radius}&topk={topk}", files=upload(served.query))
    assert answer.status_code == 200, answer.text
    document = answer.json()
    [expected] = retrieve_json(served, tmp_path, "--query", str(served.query), "--radius", str(radius),
                               "--topk", str(topk))
    assert without_extras(document) == {**expected, "query": "test_1_0.png"}
    assert document["results"] and document["radius"] == radius and document["topk"] == topk
    assert len(document["code"]) == 16 and set(document["code"]) <= {"0", "1"}
    assert set(document["timings_ms"]) == {"encode", "lookup"} and document["timings_ms"]["encode"] > 0


def test_search_by_item_is_retrieve_py_answer_with_its_labels(served, client, tmp_path):
    item = 7                                                   # class 1, relevant to the other class-1 items
    line = served.tmp / "item.txt"
    line.write_text(f"{served.database.paths[item]} 0 1 0\n")
    [expected] = retrieve_json(served, tmp_path, "--query_list", str(line), "--topk", "18")
    document = client.post(f"/api/search?item={item}&topk=18").json()
    assert without_extras(document) == expected
    assert document["query"] == served.database.paths[item] and document["query_item"] == item
    itself = [result for result in document["results"] if result["index"] == item]
    assert itself and itself[0]["distance"] == 0 and itself[0]["relevant"] is True
    assert document["timings_ms"]["encode"] < 1                 # its stored code: nothing is encoded


def test_an_empty_ball_offers_the_nearest_codes(served, tmp_path):
    # A database of the opposite of the query's code: 16 bits away, nothing within radius 3.
    query_code = client_of(served).post("/api/search", files=upload(served.query)).json()["code"]
    signs = torch.tensor([1.0 if bit == "1" else -1.0 for bit in query_code])
    opposite = str(tmp_path / "opposite.index")
    HammingIndex(-torch.outer(torch.linspace(1, 2, 5), signs), served.database.paths[:5]).save(opposite)
    for fallback, shown in (("4", 4), ("0", 0)):
        document = client_of(served, "--fallback_topk", fallback, index=opposite).post(
            "/api/search?radius=3", files=upload(served.query)).json()
        assert document["ball_size"] == 0 and document["fallback"] == (shown > 0)
        assert [result["index"] for result in document["results"]] == [0, 1, 2, 3][:shown]
        assert all(result["distance"] == 16 for result in document["results"])


def test_stats_name_the_database(served, client):
    stats = client.get("/api/stats").json()
    assert stats["items"] == 18 and stats["bits"] == 16 and stats["labels"] == 3 and stats["images"]
    assert stats["distinct_codes"] == len(torch.unique(served.database.codes >= 0, dim=0))
    assert stats["snapshot"] == served.snapshot and stats["index_file"] == served.index
    assert stats["allow_writes"] is False and stats["max_radius"] == 3


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        answer = client.get(asset)
        assert asset in page.text and answer.status_code == 200
        assert "//" not in answer.text.replace("// ", "")       # nothing from outside: it works offline
    assert "//" not in page.text


def test_only_indexed_images_are_served(served, client):
    image = client.get("/api/items/4/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == open(served.database.paths[4], "rb").read()
    for path in ("/api/items/18/image", "/api/items/-1/image"):
        answer = client.get(path)
        assert answer.status_code == 404 and "no database item" in answer.json()["error"]
    for path in ("/api/items/..%2F..%2Fsnapshot/image", "/static/..%2Fserve.py", "/static/%2e%2e/serve.py",
                 "/static/../serve.py", "/api/items/4/..%2F..%2F..%2Fserve.py"):
        answer = client.get(path)
        assert answer.status_code in (404, 422) and "import" not in answer.text, path


def test_a_random_item_is_an_item(client):
    assert 0 <= client.get("/api/items/random").json()["index"] < 18


def test_each_request_is_one_log_line(client, caplog):
    logger = logging.getLogger("mmhh")                         # the scripts' logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        client.post("/api/search?item=3&radius=1")
        client.get("/api/items/99/image")
    finally:
        logger.removeHandler(caplog.handler)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("testclient POST /api/search?item=3&radius=1 200 ") and lines[0].endswith(" ms")
    assert " GET /api/items/99/image 404 " in lines[1]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def png_bytes(width, height):
    stream = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(stream, "PNG")
    return stream.getvalue()


def bad_requests(served):
    """(method, path, files, status, words the JSON error must hold) for each kind of bad input."""
    png = png_bytes(16, 16)
    return {
        "not an image": ("post", "/api/search", {"image": ("notes.txt", b"hello, world", "text/plain")}, 415,
                         ["not an image"]),
        "empty upload": ("post", "/api/search", {"image": ("empty.png", b"", "image/png")}, 400, ["empty"]),
        "truncated image": ("post", "/api/search", {"image": ("cut.png", png[:60], "image/png")}, 400,
                            ["cannot be decoded"]),
        "over the upload limit": ("post", "/api/search", {"image": ("big.png", png_bytes(300, 300) + bytes(3000),
                                                                    "image/png")}, 413,
                                  ["the image is", "bytes, over --max_upload_mb 0.002 (2,097 bytes)"]),
        "over the body limit": ("post", "/api/search", {"image": ("huge.png", bytes(200_000), "image/png")}, 413,
                                ["the upload is over --max_upload_mb 0.002 MiB"]),
        "over the pixel limit": ("post", "/api/search", {"image": ("wide.png", png_bytes(400, 3), "image/png")},
                                 413, ["400x3 = 1,200 pixels", "--max_pixels 1,000"]),
        "unknown item": ("post", "/api/search?item=40", None, 404, ["no database item 40", "0 to 17"]),
        "radius too large": ("post", "/api/search?item=1&radius=4", None, 422, ["radius 4", "0 to 3"]),
        "negative radius": ("post", "/api/search?item=1&radius=-1", None, 422, ["radius -1"]),
        "radius not a number": ("post", "/api/search?item=1&radius=two", None, 422, ["radius", "integer"]),
        "topk 0": ("post", "/api/search?item=1&topk=0", None, 422, ["topk 0", "1 to 100"]),
        "no query": ("post", "/api/search", None, 400, ["give one query"]),
        "image and item": ("post", "/api/search?item=1", upload(served.query), 400, ["give one query"]),
        "no such route": ("get", "/api/nothing", None, 404, ["no such page or API route: GET /api/nothing"]),
        "add without --allow_writes": ("post", "/api/items", upload(served.query), 403, ["--allow_writes"]),
        "remove without --allow_writes": ("delete", "/api/items/3", None, 403, ["--allow_writes"]),
    }


def test_each_bad_input_is_a_4xx_naming_it_and_the_service_stays_up(served):
    client = client_of(served, "--max_upload_mb", "0.002", "--max_pixels", "1000")
    for case, (method, path, files, status, words) in bad_requests(served).items():
        answer = getattr(client, method)(path, **({"files": files} if files else {}))
        assert answer.status_code == status, (case, answer.text)
        error = answer.json()["error"]
        for word in words:
            assert word in error, (case, word, error)
        assert client.post("/api/search?item=2").status_code == 200, case
    # A chunked upload has no Content-Length: it is refused once the bytes received pass the limit.
    chunks = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n",
              *[bytes(10_000)] * 20)
    answer = client.post("/api/search", content=iter(chunks),
                         headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert answer.status_code == 413 and answer.json()["error"] == "the upload is over --max_upload_mb 0.002 MiB"
    assert client.post("/api/search", files=upload(served.query)).status_code == 200


def test_flags_that_cannot_serve_are_one_line(served, capsys):
    cases = {("--index", served.index): "give --model_path",
             ("--index", served.index, "--model_path", served.snapshot, "--port", "70000"): "--port 70000",
             ("--codes_dir", str(served.tmp), "--model_path", served.snapshot, "--allow_writes"): "give --index FILE"}
    for argv, words in cases.items():
        assert serve.run_cli(serve.main, list(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)


# ----------------------------------------------------------------------------------------------
# Writes
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def writable(served, tmp_path):
    """A copy of the fixture's index that the test may write."""
    path = str(tmp_path / "live.index")
    shutil.copy(served.index, path)
    return path


def test_added_items_are_found_kept_over_a_restart_and_keep_their_numbers(served, writable, tmp_path):
    client = client_of(served, "--allow_writes", index=writable)
    new_image = served.images / "train_2_5.png"                # not in the database
    added = client.post("/api/items", files=upload(new_image), data={"labels": "0 0 1"})
    assert added.status_code == 201, added.text
    assert added.json() == {"index": 18, "items": 19}
    found = client.post("/api/search?radius=0&topk=100", files=upload(new_image)).json()["results"]
    assert 18 in [result["index"] for result in found] and found[0]["distance"] == 0
    assert client.get("/api/items/18/image").content == new_image.read_bytes()
    assert client.post("/api/search?item=18").json()["results"][0]["relevant"] is True      # its labels
    assert client.delete("/api/items/3").json() == {"removed": 3, "items": 18}
    assert client.delete("/api/items/3").status_code == 404

    restarted = client_of(served, "--allow_writes", index=writable)                  # a new process's view
    assert restarted.get("/api/stats").json()["items"] == 18
    assert restarted.post("/api/search?item=3").status_code == 404
    assert restarted.get("/api/items/4/image").content == open(served.database.paths[4], "rb").read()
    assert restarted.get("/api/items/18/image").content == new_image.read_bytes()
    assert restarted.post("/api/items", files=upload(served.images / "train_0_1.png")).json()["index"] == 19
    # retrieve.py reads the served index with the same item numbers.
    answers = tmp_path / "answers.json"
    assert retrieve.main(["--index", writable, "--model_path", served.snapshot, *ENCODING, "--query", str(new_image),
                          "--radius", "0", "--json", str(answers)]) == 0
    assert 18 in [result["index"] for result in json.loads(answers.read_text())[0]["results"]]
    labels = restarted.post("/api/items", files=upload(new_image), data={"labels": "1 0"})
    assert labels.status_code == 422 and "give 3 values" in labels.json()["error"]


def test_searches_answer_while_an_item_is_being_written(served, writable, monkeypatch):
    writing, release = threading.Event(), threading.Event()
    save = HammingIndex.save

    def slow_save(index, path):
        writing.set()
        release.wait(30)
        save(index, path)

    monkeypatch.setattr(hamming_index.HammingIndex, "save", slow_save)
    client = client_of(served, "--allow_writes", index=writable)
    adding = threading.Thread(target=lambda: client.post("/api/items", files=upload(served.images / "train_0_0.png")))
    adding.start()
    try:
        assert writing.wait(30)
        started = time.perf_counter()
        for item in range(5):
            assert client.post(f"/api/search?item={item}").status_code == 200
        assert client.get("/api/stats").json()["items"] == 18      # the add is not acknowledged yet
        assert time.perf_counter() - started < 10
    finally:
        release.set()
        adding.join()
    assert client.get("/api/stats").json()["items"] == 19


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_kill_9_while_writing_loses_no_acknowledged_item(served, writable):
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--index", writable, "--model_path",
                               served.snapshot, *ENCODING, "--allow_writes", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    acknowledged = []
    try:
        with httpx2.Client(base_url=base, timeout=30) as http:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    http.get("/api/stats")
                    break
                except httpx2.TransportError:
                    assert server.poll() is None, server.stderr.read().decode()
                    time.sleep(0.2)
            images = sorted(served.images.glob("train_*.png"))
            for count, image in enumerate(images):
                if count == 6:                                  # the next add is being written: kill it now
                    threading.Timer(0.05, server.send_signal, [signal.SIGKILL]).start()
                try:
                    answer = http.post("/api/items", files=upload(image))
                except httpx2.TransportError:
                    break
                assert answer.status_code == 201, answer.text
                acknowledged.append(answer.json()["index"])
    finally:
        server.kill()
        server.wait()
    assert server.returncode == -signal.SIGKILL and len(acknowledged) >= 6
    numbers = retrieval.item_numbers(HammingIndex.load(writable)).tolist()
    assert set(acknowledged) <= set(numbers) and numbers[:18] == list(range(18))


def test_the_bench_drives_the_service_without_errors(served, capsys):
    import bench_serve  # bench/ is on the path (see the imports)

    bench_serve.main(["--index", served.index, "--model_path", served.snapshot, "--dataset", "tiny", "--data_dir",
                      str(served.data), "--clients", "2", "--item_requests", "30", "--upload_requests", "20",
                      "--mixed_requests", "20", "--max_adds", "3"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "phase" not in line}
    counts = {phase: (int(cells[0].replace(",", "")), int(cells[-1])) for phase, cells in rows.items()}
    assert counts == {"search by item": (30, 0), "search by upload": (20, 0), "searches while adding": (20, 0),
                      "add item (meanwhile)": (counts["add item (meanwhile)"][0], 0)}
    assert 1 <= counts["add item (meanwhile)"][0] <= 3
