"""The Hamming-ball lookup (hamming_index.py) and retrieve.py: the table finds exactly the metrics' ball,
answers are ranked as the metric ranks a ball, index files round-trip, and each bad input is one line."""
import json
import os
import shutil
import struct
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hamming_index
import metric_kernels
import metrics
import retrieve
import test_mmhh
import train_mmhh
from conftest import tiny_train_flags, write_tiny_dataset
from hamming_index import HammingIndex, IndexFileError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from clustered_codes import clustered_codes  # noqa: E402  (after the path set-up)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------

def ref_distances(hd, hq):
    """(Q, N) Hamming distances of the sign codes, sign(0) = +1."""
    bd, bq = np.where(hd >= 0, 1, -1), np.where(hq >= 0, 1, -1)
    return (hd.shape[1] - bq @ bd.T) // 2


def ref_answer(hd, hq_row, dist_row, radius, topk):
    """Ball members of one query by (-score, index), the first topk: (indices, scores)."""
    scores = hd.astype(np.float64) @ hq_row.astype(np.float64)
    ball = sorted(np.flatnonzero(dist_row <= radius), key=lambda i: (-scores[i], i))[:topk]
    return [int(i) for i in ball], [float(scores[i]) for i in ball]


def metrics_ball(hd, hq, radius):
    """Sorted (query, item, distance) members that metrics' scan finds."""
    labels_d, labels_q = np.ones((len(hd), 1)), np.ones((len(hq), 1))
    data = metrics._prepare(hd, labels_d, hq, labels_q, "cpu")
    members = set()
    for queries, qi, xi, dist, _ in metric_kernels._ball_members_scan(data, radius, 2**20):
        members |= set(zip(queries[qi].tolist(), xi.tolist(), dist.tolist()))
    return sorted(members)


def index_ball(index, hq, radius):
    qi, xi, dist = index.ball(torch.as_tensor(hq), radius)
    assert (qi[1:] >= qi[:-1]).all()                            # grouped by query
    return sorted(zip(qi.tolist(), xi.tolist(), dist.tolist()))


@st.composite
def code_sets(draw):
    """Database and query codes around a few centres: duplicates, exact zeros, every code length."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bits = draw(st.sampled_from([1, 2, 7, 16, 33, 48, 63, 64]))
    n_db, n_q = draw(st.integers(1, 300)), draw(st.integers(1, 12))
    flip = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5]))
    centres = rng.choice([-1.0, 1.0], (3, bits))

    def codes(n):
        signs = centres[rng.integers(0, 3, n)]
        return np.where(rng.random((n, bits)) < flip, -signs, signs) * rng.choice([0.0, 0.25, 1.0], (n, bits))

    hd = codes(n_db)
    if draw(st.booleans()):
        hd[rng.permutation(n_db)[:n_db // 2]] = hd[0]          # a heavy duplicate
    return hd, codes(n_q), draw(st.integers(0, min(bits, 4)))


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("numpy_popcount", [True, False])
def test_popcount_counts_every_bit(numpy_popcount, monkeypatch):
    if numpy_popcount and not hasattr(np, "bitwise_count"):
        pytest.skip("numpy < 2.0 has no bitwise_count")
    monkeypatch.setattr(hamming_index, "_NUMPY_ON_CPU", numpy_popcount)
    rng = np.random.default_rng(0)
    values = [0, 1, -1, -2**63, 2**63 - 1, 0x5555555555555555, -0x5555555555555556]
    values += rng.integers(-2**63, 2**63 - 1, 500, dtype=np.int64).tolist()
    got = hamming_index.popcount(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [bin(v & (2**64 - 1)).count("1") for v in values]


def test_numpy_and_torch_table_code_agree(monkeypatch):
    # The CPU's numpy popcount and repeat against the torch code the GPU runs: same balls, answers, MAP.
    hd, ld, hq, lq, _ = clustered_codes(2000, 70, 64, 8, True, 0.05, seed=5)
    hd, hq = np.round(hd * 64) / 64, np.round(hq * 64) / 64     # dyadic: exact scores, real ties
    monkeypatch.setattr(metric_kernels, "_FORCE_BALL_METHOD", "lookup")
    results = []
    for numpy_on_cpu in (True, False):
        monkeypatch.setattr(hamming_index, "_NUMPY_ON_CPU", numpy_on_cpu)
        index = HammingIndex(hd, labels=ld)
        answers = index.search(hq, 2, 9, query_labels=lq)
        results.append((index_ball(index, hq, 2), [(a.index.tolist(), a.score.tolist(), a.relevant.tolist())
                                                   for a in answers],
                        metrics.evaluate_retrieval(hd, ld, hq, lq, 2, 100, device="cpu")))
    assert results[0] == results[1]


@FAST
@given(code_sets())
def test_lookup_finds_exactly_the_metrics_ball(problem):
    hd, hq, radius = problem
    assert index_ball(HammingIndex(hd), hq, radius) == metrics_ball(hd, hq, radius)


@pytest.mark.parametrize("kind", ["clustered", "random"])
def test_lookup_on_larger_tables_both_row_kinds(kind):
    # Clustered codes repeat: rows are distinct codes with item ranges. Random ones do not: rows are items.
    if kind == "clustered":
        hd, _, hq, _, _ = clustered_codes(6000, 300, 64, 10, False, 0.07, seed=1)
    else:
        rng = np.random.default_rng(1)
        hd, hq = rng.standard_normal((6000, 64)), rng.standard_normal((300, 64))
        hq[:50] = hd[:50]                                       # some balls are not empty
    index = HammingIndex(hd)
    assert (index.table.offsets is None) == (kind == "random")
    for radius in (0, 2, 3):
        assert index_ball(index, hq, radius) == metrics_ball(hd, hq, radius)


@pytest.mark.parametrize("kind", ["clustered", "random"])
def test_table_memory_is_at_most_14_bytes_an_item(kind):
    rng = np.random.default_rng(2)
    codes = (clustered_codes(20000, 1, 64, 81, True, 0.03)[0] if kind == "clustered"
             else rng.standard_normal((20000, 64)))
    table = HammingIndex(codes).table
    assert table.nbytes <= 14 * len(codes) + 8                 # 1.75x the 8-byte packed codes


def test_codes_longer_than_64_bits_are_scanned():
    rng = np.random.default_rng(3)
    hd = rng.choice([-1.0, 1.0], (400, 80)) * rng.random((400, 80))
    hq = hd[:10].copy()
    hq[:, :2] *= -1                                             # two bits off: distance 2 from its item
    index = HammingIndex(hd)
    assert index.table is None
    dist = ref_distances(hd, hq)
    assert index_ball(index, hq, 3) == sorted((q, x, int(dist[q, x])) for q, x in zip(*np.nonzero(dist <= 3)))
    for q, answer in enumerate(index.search(hq, 3, 4)):
        assert answer.index.tolist() == ref_answer(hd, hq[q], dist[q], 3, 4)[0]


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------

@FAST
@given(code_sets(), st.integers(1, 5))
def test_answers_are_ranked_as_the_metric_ranks_a_ball(problem, topk):
    hd, hq, radius = problem
    dist = ref_distances(hd, hq)
    for q, answer in enumerate(HammingIndex(hd).search(hq, radius, topk)):
        indices, scores = ref_answer(hd, hq[q], dist[q], radius, topk)
        assert answer.index.tolist() == indices and answer.score.tolist() == scores
        assert answer.distance.tolist() == [int(dist[q, i]) for i in indices]
        assert answer.ball_size == int((dist[q] <= radius).sum()) and answer.relevant is None


@pytest.mark.parametrize("bits", [48, 70])                  # 70: no table, balls by scanning
@pytest.mark.parametrize("block, members", [(5, 2**21), (32, 40)])
def test_answers_in_blocks_land_with_their_query(bits, block, members, monkeypatch):
    # Queries are answered a block at a time in code order, a block halved while its balls are too
    # large: every answer must still be its own query's.
    monkeypatch.setattr(hamming_index, "_ANSWER_QUERIES", block)
    monkeypatch.setattr(hamming_index, "_ANSWER_MEMBERS", members)
    hd, ld, hq, lq, _ = clustered_codes(600, 80, bits, 6, False, 0.05, seed=9)
    hd, hq = np.round(hd * 64) / 64, np.round(hq * 64) / 64     # dyadic: exact scores, real ties
    dist = ref_distances(hd, hq)
    answers = HammingIndex(hd, labels=ld).search(hq, 2, 7, query_labels=lq)
    for q, answer in enumerate(answers):
        indices, scores = ref_answer(hd, hq[q], dist[q], 2, 7)
        assert answer.index.tolist() == indices and answer.score.tolist() == scores, q
        assert answer.relevant.tolist() == [bool(ld[i] @ lq[q]) for i in indices], q


def test_whole_balls_give_the_metric_map():
    # AP of each answered ball, in the deephash convention, averages to metrics.map_at_radius exactly.
    hd, ld, hq, lq, _ = clustered_codes(3000, 60, 48, 10, False, 0.05, seed=4)
    hd, hq = np.round(hd * 64) / 64, np.round(hq * 64) / 64     # dyadic: exact scores, real ties
    aps = []
    for answer in HammingIndex(hd, labels=ld).search(hq, 2, len(hd), query_labels=lq):
        rel = answer.relevant.numpy()
        if answer.ball_size == 0:
            aps.append(0.0)
        elif rel.any():
            aps.append(float((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / rel.sum()))
    assert np.mean(aps) == pytest.approx(metrics.map_at_radius(hd, ld, hq, lq, 2, device="cpu")["map"], abs=1e-12)


def test_an_empty_ball_falls_back_to_the_nearest_codes():
    rng = np.random.default_rng(5)
    hq = rng.choice([-1.0, 1.0], (2, 32))
    hd = np.concatenate([-hq[:1].repeat(30, 0), hq[1:]]) * rng.choice([0.5, 1.0], (31, 32))
    hd[:10, :5] *= -1                                           # ten items 5 bits nearer than the rest
    plain, fallback = (HammingIndex(hd).search(hq, 2, 4, fallback_topk=n) for n in (0, 12))
    assert plain[0].ball_size == 0 and len(plain[0].index) == 0 and not plain[0].fallback
    assert fallback[0].fallback and fallback[0].ball_size == 0
    dist = ref_distances(hd, hq)[0]
    scores = hd @ hq[0]
    want = sorted(range(len(hd)), key=lambda i: (dist[i], -scores[i], i))[:12]
    assert fallback[0].index.tolist() == want and fallback[0].distance.tolist() == dist[want].tolist()
    assert not fallback[1].fallback and fallback[1].index.tolist() == [30]     # its ball is not empty


def test_index_files_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    index = HammingIndex(rng.standard_normal((50, 16)).astype(np.float32), [f"img{i}.png" for i in range(50)],
                         np.eye(3)[rng.integers(0, 3, 50)], {"model_path": "/snap"})
    path = str(tmp_path / "a.index")
    index.save(path)
    assert torch.load(path, weights_only=True)["format"] == hamming_index.FORMAT
    again = HammingIndex.load(path)
    assert torch.equal(again.codes, index.codes) and torch.equal(again.labels, index.labels)
    assert again.paths == index.paths and again.source == index.source
    assert [os.path.basename(p) for p in os.listdir(tmp_path)] == ["a.index"]    # no temporary left
    truncated = tmp_path / "truncated.index"
    truncated.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(IndexFileError, match=f"index {truncated} cannot be read .* corrupt"):
        HammingIndex.load(str(truncated))


# ----------------------------------------------------------------------------------------------
# retrieve.py on a tiny trained model
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 16-bit model trained 20 iterations on 'tiny', its final evaluation's codes, and an index of them."""
    tmp = tmp_path_factory.mktemp("retrieve")
    data = tmp / "data"
    write_tiny_dataset(str(data))
    assert train_mmhh.main(tiny_train_flags(tmp, data)) == 0
    codes = tmp / "test_output" / "t_iter_00020"
    index = str(tmp / "tiny.index")
    HammingIndex(np.load(codes / "database_code.npy"), labels=np.load(codes / "database_labels.npy")).save(index)
    return types.SimpleNamespace(tmp=tmp, data=data, codes=codes, index=index,
                                 snapshot=str(tmp / "snapshot" / "t_tiny_tiny_iter_00020"),
                                 images=data / "tiny" / "images", queries=str(data / "tiny" / "test.txt"))


def run(argv, capsys):
    """Exit code, stdout and stderr of retrieve.py."""
    code = retrieve.run_cli(retrieve.main, [*argv, "--gpu_id", "cpu", "--workers", "0", "--batch_size", "8"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_training_and_test_mmhh_draw_the_retrieval_grid(trained, tmp_path):
    assert (trained.codes / "retrieval_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "tested"
    assert test_mmhh.main(["--model_path", trained.snapshot, "--data_dir", str(trained.data), "--gpu_id", "cpu",
                           "--workers", "0", "--output_path", str(out), "--log_dir", str(tmp_path)]) == 0
    assert (out / "retrieval_grid.png").is_file()
    again = tmp_path / "again"                                  # saved codes, no images: no grid
    assert test_mmhh.main(["--codes_dir", str(out), "--output_path", str(again), "--log_dir", str(tmp_path)]) == 0
    assert (again / "metrics.json").is_file() and not (again / "retrieval_grid.png").exists()


def test_index_a_dataset_then_query_it(trained, tmp_path, capsys):
    index = str(tmp_path / "encoded.index")
    code, _, err = run(["--model_path", trained.snapshot, "--data_dir", str(trained.data), "--dataset", "tiny",
                        "--save_index", index], capsys)
    assert code == 0, err
    saved = HammingIndex.load(index)
    assert len(saved) == 18 and saved.paths[0] == str(trained.images / "database_0_0.png")
    # The same images through the same network: the codes of the training's final evaluation.
    assert torch.allclose(saved.codes, torch.from_numpy(np.load(trained.codes / "database_code.npy")), atol=1e-5)

    answers, grid = tmp_path / "answers.json", tmp_path / "grid.png"
    code, out, err = run(["--index", index, "--model_path", trained.snapshot, "--query_list", trained.queries,
                          "--topk", "4", "--json", str(answers), "--grid", str(grid)], capsys)
    assert code == 0, err
    assert "rank  distance       score  relevant  item" in out and "ball of radius 2:" in out
    assert grid.read_bytes()[:4] == b"\x89PNG"
    first_two = tmp_path / "two.png"                            # a long list: the grid draws its first queries
    code, out, err = run(["--index", index, "--model_path", trained.snapshot, "--query_list", trained.queries,
                          "--topk", "4", "--grid", str(first_two), "--grid_queries", "2"], capsys)
    assert code == 0, err
    assert f"drew {first_two} (the first 2 of 9 queries; --grid_queries 0 draws all)" in out
    heights = [struct.unpack(">I", path.read_bytes()[20:24])[0] for path in (first_two, grid)]   # PNG IHDR
    assert 2 * heights[0] < heights[1]
    documents = json.loads(answers.read_text())
    assert len(documents) == 9 and documents[0]["query"] == str(trained.images / "test_0_0.png")
    hd, hq = np.load(trained.codes / "database_code.npy"), np.load(trained.codes / "test_code.npy")
    dist = ref_distances(hd, hq)
    labels_d, labels_q = np.load(trained.codes / "database_labels.npy"), np.load(trained.codes / "test_labels.npy")
    for q, document in enumerate(documents):
        indices, scores = ref_answer(hd, hq[q], dist[q], 2, 4)
        assert [r["index"] for r in document["results"]] == indices
        assert [r["score"] for r in document["results"]] == pytest.approx(scores, abs=1e-4)
        for result in document["results"]:
            assert result["path"] == saved.paths[result["index"]]
            assert result["relevant"] == bool(labels_d[result["index"]] @ labels_q[q] > 0)


def test_saved_codes_are_named_by_the_list_or_by_index(trained, tmp_path, capsys):
    unnamed = str(tmp_path / "unnamed.index")
    code, out, err = run(["--codes_dir", str(trained.codes), "--save_index", unnamed], capsys)
    assert code == 0, err
    assert "named by database index" in out and "metrics.json records dataset 'tiny'" in out
    assert HammingIndex.load(unnamed).paths is None
    answers = tmp_path / "answers.json"
    code, out, err = run(["--codes_dir", str(trained.codes), "--data_dir", str(trained.data), "--dataset", "tiny",
                          "--model_path", trained.snapshot, "--query", str(trained.images / "test_1_0.png"),
                          "--json", str(answers)], capsys)
    assert code == 0, err
    results = json.loads(answers.read_text())[0]["results"]
    assert results and all(r["path"].endswith(".png") and "relevant" not in r for r in results)   # no query labels
    assert "relevant" not in out
    code, _, err = run(["--codes_dir", str(trained.codes), "--database_list", trained.queries, "--save_index",
                        str(tmp_path / "x.index")], capsys)
    assert code == 2 and "lists 9 images but --codes_dir" in err and "holds 18 codes" in err


def test_an_empty_ball_says_so_and_falls_back(trained, tmp_path, capsys):
    # A database of the opposite of query test_0_0's code: 16 bits away, nothing within radius 2.
    codes_dir = tmp_path / "opposite"
    shutil.copytree(trained.codes, codes_dir)
    query_code = np.load(trained.codes / "test_code.npy")[0]
    np.save(codes_dir / "database_code.npy", -np.outer(np.linspace(1, 2, 18), query_code).astype(np.float32))
    query = ["--codes_dir", str(codes_dir), "--model_path", trained.snapshot, "--query",
             str(trained.images / "test_0_0.png")]
    code, out, _ = run(query, capsys)
    assert code == 0 and "ball of radius 2: empty (--fallback_topk N shows" in out
    answers = tmp_path / "answers.json"
    code, out, _ = run([*query, "--fallback_topk", "3", "--json", str(answers)], capsys)
    assert code == 0 and "empty; the 3 nearest codes, by Hamming distance then score" in out
    document = json.loads(answers.read_text())[0]
    assert document["fallback"] and document["ball_size"] == 0
    assert [r["index"] for r in document["results"]] == [0, 1, 2]     # least negative scores first
    assert all(r["distance"] >= 15 and r["path"] is None for r in document["results"])


def bad_inputs(trained, tmp):
    """(argv, words the one error line must hold) for each kind of bad input."""
    broken = tmp / "broken.png"
    broken.write_bytes(b"not a picture")
    short = tmp / "short"
    shutil.copytree(trained.codes, short)
    np.save(short / "database_code.npy", np.load(trained.codes / "database_code.npy")[:, :12])
    torch.save({"format": "mmhh-hamming-index/0", "codes": torch.zeros(2, 2)}, tmp / "old.index")
    (tmp / "corrupt.index").write_bytes(b"\x00garbage" * 10)
    mixed = tmp / "mixed.txt"
    mixed.write_text(f"{trained.images / 'test_0_0.png'} 1 0 0\n{trained.images / 'test_0_1.png'}\n")
    query = ["--model_path", trained.snapshot, "--query", str(trained.images / "test_0_0.png")]
    return {
        "image does not open": (["--index", trained.index, "--model_path", trained.snapshot, "--query", str(broken)],
                                [str(broken), "cannot be decoded"]),
        "image missing": (["--index", trained.index, "--model_path", trained.snapshot, "--query", str(tmp / "no.png")],
                          [str(tmp / "no.png"), "no such image file"]),
        "snapshot bits differ": (["--codes_dir", str(short), *query],
                                 [trained.snapshot, "16-bit codes", str(short), "12-bit"]),
        "index of another version": (["--index", str(tmp / "old.index"), *query],
                                     [str(tmp / "old.index"), "mmhh-hamming-index/0", "rebuild"]),
        "corrupt index": (["--index", str(tmp / "corrupt.index"), *query], [str(tmp / "corrupt.index"), "corrupt"]),
        "snapshot as index": (["--index", trained.snapshot, *query], [trained.snapshot, "mmhh-snapshot/1"]),
        "missing index": (["--index", str(tmp / "none.index"), *query], [str(tmp / "none.index"), "does not exist"]),
        "mixed query list": (["--index", trained.index, "--model_path", trained.snapshot, "--query_list", str(mixed)],
                             [str(mixed), "some lines have labels"]),
        "no database": (query[2:], ["give the database"]),
        "dataset not built": ([*query, "--data_dir", str(tmp / "nowhere")], ["unknown dataset 'tiny'",
                                                                             "--database_list"]),
        "queries without a model": (["--index", trained.index, "--query", str(broken)], ["--model_path"]),
        "output exists": (["--index", trained.index, *query, "--json", str(broken)], [str(broken), "--overwrite"]),
        "bad radius": (["--index", trained.index, *query, "--radius", "-1"], ["--radius -1"]),
        "bad grid_queries": (["--index", trained.index, *query, "--grid_queries", "-2"],
                             ["--grid_queries -2", "at least 0"]),
    }


def test_each_bad_input_is_one_line_naming_it(trained, tmp_path, capsys):
    for case, (argv, words) in bad_inputs(trained, tmp_path).items():
        code, _, err = run(argv, capsys)
        assert code == 2, (case, err)
        assert err.count("\n") == 1 and err.startswith("error: "), (case, err)
        for word in words:
            assert word in err, (case, word, err)


def test_the_bench_runs_and_checks_index_against_scan(capsys):
    import bench_index  # bench/ is on the path (see the imports)

    threads = torch.get_num_threads()
    try:
        bench_index.main(["--database", "5000", "--queries", "40", "--repeat", "1", "--cases", "c81", "random"])
    finally:
        torch.set_num_threads(threads)                          # the bench runs on one thread
    table = capsys.readouterr().out.split("| codes |")[1]
    assert table.count("\n| c81 |") == 1 and table.count("\n| random |") == 1
