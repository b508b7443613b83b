import json

from shardgate.clients.tools.bucket_hits import BucketHits


def write(folder, name, hits, rows):
    (folder / f"decode-buckets-{name}.json").write_text(json.dumps({"hits": hits, "rows": rows}))


def test_hits_of_a_level_sum_the_replicas_and_count_the_padding(tmp_path):
    write(tmp_path, 1, {"1": 2, "4": 1}, {"1": 2, "4": 3})
    before = BucketHits.read(tmp_path)
    write(tmp_path, 1, {"1": 3, "4": 5}, {"1": 3, "4": 18})
    write(tmp_path, 2, {"4": 2}, {"4": 8})  # another replica's driver
    level = BucketHits.read(tmp_path) - before
    assert dict(level.steps) == {1: 1, 4: 6} and dict(level.rows) == {1: 1, 4: 23}
    assert level.padding == 1 - 24 / 25
    lines = level.lines()
    assert "  bucket    4:      6 steps ( 85.7%),    3.8 sequences, padding   4.2%" in lines
    assert lines[-1] == "  padding waste: 4.0% of the rows the compiled steps computed"
    assert level.as_dict()["buckets"]["4"] == {"steps": 6, "sequences": 23}


def test_no_compiled_step_says_so(tmp_path):
    assert BucketHits.read(tmp_path).lines() == ["compiled decode buckets: no decode step ran compiled"]
