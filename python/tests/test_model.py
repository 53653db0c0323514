"""hyperdas.Model: tokens, hidden states, logits and the cache by site, against transformers'
reference dump of the same tiny model (tests/fixtures/tiny-llama-reference.safetensors)."""

import json

import numpy as np
import pytest

import hyperdas
from conftest import FIXTURES, read_safetensors


def reference():
    ref, meta = read_safetensors(FIXTURES / "tiny-llama-reference.safetensors")
    return ref, json.loads(meta["prompts"])


def test_hidden_states_and_logits_match_transformers(tiny):
    ref, prompts = reference()
    states, mask = tiny.hidden_states(prompts)
    L, D = tiny.num_layers, tiny.hidden_size
    assert states.shape[0] == 3 and states.shape[2:] == (L + 1, D) and states.dtype == np.float32
    assert mask.shape == states.shape[:2] and mask.dtype == bool
    logits, cache = tiny.run_with_cache(prompts)
    for i in range(3):
        n = int(mask[i].sum())
        assert n == int(ref["attention_mask"][i].sum())
        # Both left-pad: the last n positions of each row are the prompt's tokens.
        ours, theirs = states[i, -n:], ref["hidden_states"][i, -n:]
        assert np.abs(ours - theirs).max() < 1e-4
        assert np.abs(logits[i, -n:] - ref["logits"][i, -n:]).max() < 1e-4
        assert tiny.tokenize(prompts[i]) == [int(t) for t in ref["input_ids"][i, -n:]]
    # The cache holds the same residuals as hidden_states, by site name.
    for l in range(L):
        assert np.array_equal(cache[f"blocks.{l}.hook_resid_pre"], states[:, :, l])
    assert np.array_equal(cache["ln_final.hook_normalized"], states[:, :, L])
    assert np.array_equal(cache.mask, mask)


def test_logits_at_positions_and_site_spellings(tiny):
    prompts = ["city: Paris, country:", "Tokyo"]
    last = tiny.logits(prompts)
    full, cache = tiny.run_with_cache(prompts, sites=["blocks.0.hook_resid_post", "hidden_states.1", "block_output.0"])
    assert last.shape == (2, 1, tiny.vocab_size)
    assert np.allclose(last[:, 0], full[:, -1], atol=1e-5)
    n0 = len(tiny.tokenize(prompts[0]))
    two = tiny.logits(prompts, positions=np.array([[0, -1], [0, -1]]))
    assert np.allclose(two[0, 0], full[0, -n0], atol=1e-5)
    assert np.allclose(two[1, 1], full[1, -1], atol=1e-5)
    # Three spellings of one site (TransformerLens, HF, pyvene).
    assert np.array_equal(cache["blocks.0.hook_resid_post"], cache["hidden_states.1"])
    assert np.array_equal(cache["blocks.0.hook_resid_post"], cache["block_output.0"])


def test_tokens_round_trip(tiny):
    ids = tiny.tokenize("Paris", prompt=False)
    assert tiny.decode(ids) == "Paris"
    assert "".join(tiny.to_str_tokens("Paris is")).endswith("Paris is")
    assert len(tiny.sites()) == 2 * tiny.num_layers + 1


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m: m.logits(["Paris"], positions=[[99]]), ["position 99", "tokens"]),
        (lambda m: m.run_with_cache(["Paris"], sites=["blocks.9.hook_resid_pre"]), ["block 9", "3 blocks"]),
        (lambda m: m.run_with_cache(["Paris"], sites=["blocks.0.resid"]), ["unknown site", "blocks.0.resid"]),
        (lambda m: m.hidden_states([]), ["no prompts"]),
        (lambda m: m.hidden_states(["Paris"], layers=[7]), ["7"]),
        (lambda m: hyperdas.Model.load(FIXTURES / "tiny-llama", dtype="f8"), ["f8"]),
        (lambda m: hyperdas.Model.load("/no/such/model"), ["/no/such/model"]),
    ],
)
def test_bad_input_raises_hyperdas_error_naming_it(tiny, call, words):
    with pytest.raises(hyperdas.HyperdasError) as e:
        call(tiny)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_fetch_names_the_known_models():
    with pytest.raises(hyperdas.HyperdasError) as e:
        hyperdas.fetch("gpt-17")
    assert "gpt-17" in str(e.value) and "smollm2-135m" in str(e.value)
