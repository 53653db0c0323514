"""Training, evaluation, apply, subspace and the pyvene export through the bindings, checked
against the Rust results the run directory holds."""

import json

import numpy as np
import pytest

import hyperdas
from conftest import read_safetensors


def test_training_reports_progress_and_writes_the_run(runs):
    recs = runs["records"]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 4 and all(r["total_steps"] == 4 for r in recs)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert any("eval/groundtruth/causal" in r for r in recs)
    mdas = runs["mdas"]
    assert mdas.method == "mdas" and mdas.config["interpreter"]["rank"] == 4
    assert set(mdas.results) == {"groundtruth"}
    assert set(runs["hyperdas"].results) == {"soft", "bidding_argmax"}


def test_evaluate_equals_the_training_runs_own_scores(runs, rows_path):
    h = runs["hyperdas"]
    by_path = h.evaluate(rows_path, modes=["soft", "bidding_argmax"])
    assert by_path == h.results
    assert (h.dir / "eval" / "city_country_test.results.json").is_file()
    rows = hyperdas.data.read(rows_path)
    assert h.evaluate(rows, modes=["soft"])["soft"] == h.results["soft"]
    assert runs["mdas"].evaluate(rows_path)["groundtruth"] == runs["mdas"].results["groundtruth"]
    assert runs["mdas"].evaluate()["groundtruth"] == runs["mdas"].results["groundtruth"]  # its own test set
    with pytest.raises(hyperdas.HyperdasError, match="sofft"):
        h.evaluate(rows_path, modes=["sofft"])


def test_apply_and_subspace(runs):
    h, mdas = runs["hyperdas"], runs["mdas"]
    q = ("city: Paris, country:", "city: Tokyo, country:", "Paris ; Tokyo - Country")
    a = h.apply(*q, mode="bidding_argmax", top=3)
    assert a["mode"] == "bidding_argmax" and len(a["before"]) == 3 and len(a["after"]) == 3
    w = a["weights"]
    assert w.shape == (len(a["source_tokens"]) + 1, len(a["base_tokens"]))
    assert len(a["choices"]) <= len(a["base_tokens"])
    b1 = h.subspace(*q)
    b2 = h.subspace("city: Rome, country:", "city: Lima, country:", "Rome ; Lima - Continent")
    assert b1.shape[1] == 4 and np.allclose(b1.T @ b1, np.eye(4), atol=1e-4)
    assert np.abs(b1 - b2).max() > 1e-4  # conditioned on the instruction
    # MDAS: one basis for every query, the trained rotation itself.
    r = mdas.subspace(*q)
    params, _ = read_safetensors(mdas.dir / "checkpoint" / "params.safetensors")
    assert np.array_equal(r, params["subspace.rotation"])
    assert mdas.apply(*q)["mode"] == "groundtruth"  # a baseline's own positions
    with pytest.raises(hyperdas.HyperdasError, match="Berlin"):
        h.apply("city: Paris, country:", "city: Tokyo, country:", "x", base_entity="Berlin", source_entity="Tokyo")


def test_export_pyvene(runs, tmp_path):
    files = runs["mdas"].export_pyvene(tmp_path / "pv")
    names = sorted(p.name for p in files)
    assert names == ["config.json", "hyperdas_export.json", "intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin"]
    cfg = json.loads((tmp_path / "pv" / "config.json").read_text())
    assert cfg["representations"][0][:5] == [0, "block_output", "pos", 1, 4]
    files = runs["hyperdas"].export_pyvene(tmp_path / "hb", limit=5)
    bases, meta = read_safetensors(tmp_path / "hb" / "bases.safetensors")
    assert bases["bases"].shape[::2] == (5, 4) and meta["site"] == "blocks.1.hook_resid_pre"


def test_configuration_errors_and_callback_exceptions(runs, tmp_path):
    cfg = dict(runs["config"])
    with pytest.raises(hyperdas.HyperdasError, match="trian"):
        hyperdas.show_config({"trian.lr": 1e-3})
    with pytest.raises(hyperdas.HyperdasError, match="contradicts"):
        hyperdas.train({**cfg, "interpreter.method": "mdas"}, tmp_path / "x", progress=False)
    with pytest.raises(hyperdas.HyperdasError, match="das or mdas"):
        hyperdas.baseline("hyperdas", cfg, tmp_path / "y")

    class Stop(Exception):
        pass

    def stop_at_two(rec):
        if rec.get("step") == 2 and "loss" in rec:
            raise Stop("enough")

    with pytest.raises(Stop):
        hyperdas.baseline("mdas", cfg, tmp_path / "z", progress=stop_at_two)
    assert "lr = " in hyperdas.show_config()
    with pytest.raises(hyperdas.HyperdasError, match="nope.toml"):
        hyperdas.show_config(tmp_path / "nope.toml")


def test_a_run_without_out_goes_to_runs_method_date_n(runs, tmp_path, monkeypatch):
    import datetime

    monkeypatch.chdir(tmp_path)
    with pytest.raises(hyperdas.HyperdasError, match="out="):
        hyperdas.baseline("das", runs["config"], progress=False, resume=True)
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    first = hyperdas.baseline("das", runs["config"], progress=False)
    second = hyperdas.baseline("das", runs["config"], progress=False)
    assert first.dir.resolve() == (tmp_path / "runs" / f"das-{day}-1").resolve()
    assert second.dir.resolve() == (tmp_path / "runs" / f"das-{day}-2").resolve()
