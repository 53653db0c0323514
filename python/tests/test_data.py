"""hyperdas.data: build from the knowledge base, read and write both formats, bad rows."""

import json

import pytest

import hyperdas
from conftest import FIXTURES

COLUMNS = 13


def test_build_without_a_model_and_write_both_formats(tmp_path):
    sets = hyperdas.data.build(None, attributes=["Country"], causal=20, isolate=10, seed=1, out=tmp_path)
    assert set(sets) == {"train", "val", "test"}
    train = sets["train"]
    assert len(train) == 30 and all(len(r) == COLUMNS for r in train)
    assert sum(r["attribute_type"] == "causal" for r in train) == 20
    written = hyperdas.data.read(tmp_path / "city_country_train.jsonl")
    assert written == train
    summary = json.loads((tmp_path / "city_country_train.summary.json").read_text())
    assert summary["rows"] == 30 and summary["model"] is None
    # The same seed gives the same rows; one split comes back as a list.
    again = hyperdas.data.build(None, attributes="Country", split="test", causal=20, isolate=10, seed=1)
    assert again == sets["test"]
    # Arrow (datasets save_to_disk) round trip.
    hyperdas.data.write(train, tmp_path / "arrow_dir")
    assert hyperdas.data.read(tmp_path / "arrow_dir") == train
    # Existing outputs are not overwritten without force.
    with pytest.raises(hyperdas.HyperdasError, match="exists"):
        hyperdas.data.build(None, causal=5, isolate=5, out=tmp_path)
    hyperdas.data.build(None, causal=5, isolate=5, out=tmp_path, force=True)


def test_build_from_what_a_model_knows(tiny, tmp_path):
    # The toy world's tiny model (trained once into the test cache, seconds) knows its facts:
    # rows come from its own knowledge base, and only from facts it answers right.
    toy = hyperdas.Model.load("toy:tiny")
    sets = hyperdas.data.build(toy, attributes=["Country"], causal=20, isolate=10, seed=3)
    assert set(sets) == {"train", "test"}  # the toy world has no val templates
    assert sum(r["attribute_type"] == "causal" for r in sets["test"]) == 20
    # A random tiny model knows nothing: a clear error naming the attribute and split.
    with pytest.raises(hyperdas.HyperdasError) as e:
        hyperdas.data.build(tiny, attributes=["Country"], split="test", causal=5, isolate=5)
    assert "Country" in str(e.value) and "test" in str(e.value)


def test_bad_rows_are_errors_naming_the_row(tmp_path):
    rows = hyperdas.data.read(FIXTURES / "ravel" / "city_country_test.jsonl")
    assert len(rows) == 49
    bad = [dict(r) for r in rows[:3]]
    del bad[1]["target"]
    with pytest.raises(hyperdas.HyperdasError) as e:
        hyperdas.data.write(bad, tmp_path / "x.jsonl")
    assert "row 2" in str(e.value) and "target" in str(e.value)
    (tmp_path / "broken.jsonl").write_text('{"input_prefix": 1}\n')
    with pytest.raises(hyperdas.HyperdasError, match="broken.jsonl"):
        hyperdas.data.read(tmp_path / "broken.jsonl")
    with pytest.raises(hyperdas.HyperdasError, match="Contry"):
        hyperdas.data.build(None, attributes=["Contry"])
