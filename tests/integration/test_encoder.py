"""The real all-MiniLM-L6-v2 from the installed package, offline."""

from __future__ import annotations

import numpy as np
import pytest

from lane_ray.text import ModelNotFoundError, TextEncoder, encoder_id, locate_model


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(device="cpu", batch_size=32, num_threads=2)


def test_similar_titles_are_closer_than_unrelated(encoder):
    v = encoder.encode(["Toy Story", "Toy Story 2", "The Lord of the Rings: The Fellowship of the Ring",
                        "The Lord of the Rings: The Two Towers", "Schindler's List"])
    assert v.shape == (5, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 4]
    assert sim[2, 3] > sim[2, 0] and sim[2, 3] > sim[2, 4]


def test_batch_size_does_not_change_results(encoder):
    titles = [f"Movie number {i} about {w}" for i, w in enumerate(["dogs", "space", "love", "war"] * 10)]
    a = encoder.encode(titles, batch_size=7)
    b = encoder.encode(titles, batch_size=64)
    assert np.allclose(a, b, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_locator_is_offline_and_clear(tmp_path):
    assert (locate_model("all-MiniLM-L6-v2") / "modules.json").exists()
    assert locate_model("sentence-transformers/all-MiniLM-L6-v2") == locate_model("all-MiniLM-L6-v2")
    with pytest.raises(ModelNotFoundError, match="models are never downloaded"):
        locate_model("some-org/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a sentence-transformers model directory"):
        locate_model(str(tmp_path / "empty"))
    assert encoder_id("all-MiniLM-L6-v2") == encoder_id(str(locate_model("all-MiniLM-L6-v2"))).replace(
        "model@", "all-MiniLM-L6-v2@")


def test_any_local_directory_works(tmp_path, encoder):
    import shutil

    copy = tmp_path / "my-minilm"
    shutil.copytree(locate_model("all-MiniLM-L6-v2"), copy)
    other = TextEncoder(str(copy), device="cpu", num_threads=2)
    assert np.allclose(other.encode(["Heat"]), encoder.encode(["Heat"]), atol=1e-6)


def test_tokenize_then_encode_tokens_matches_encode(encoder):
    """The split a GPU stage uses (tokenize on CPU workers, forward pass on the GPU actor) gives encode's vectors."""
    titles = ["Toy Story (1995)", "", "a" * 5000, "Ünïcödé — title", "word " * 600, "GoldenEye (1995)"] * 7
    feats = encoder.tokenize(titles)
    assert set(feats) >= {"input_ids", "attention_mask"}
    lengths = [a.size for a in feats["input_ids"]]
    assert max(lengths) == encoder.max_seq_length and min(lengths) == 2  # truncated like encode; [CLS] [SEP]
    assert np.allclose(encoder.encode_tokens(feats, batch_size=8), encoder.encode(titles), atol=1e-5)
    assert encoder.encode_tokens({"input_ids": [], "attention_mask": []}).shape == (0, encoder.dim)


def test_tokenizer_only_load_tokenizes_the_same_and_refuses_to_encode(encoder):
    """Tokenizer actors load the model without its weights: the same token arrays, no parameter storage."""
    light = TextEncoder(device="cpu", weights=False)
    assert all(p.device.type == "meta" for p in light._model.parameters())
    assert (light.dim, light.max_seq_length) == (encoder.dim, encoder.max_seq_length)
    titles = ["Toy Story (1995)", "", "word " * 600, "Ünïcödé — title"]
    mine, ref = light.tokenize(titles), encoder.tokenize(titles)
    assert set(mine) == set(ref)
    for name in ref:
        assert all(np.array_equal(a, b) for a, b in zip(mine[name], ref[name], strict=True)), name
    for call in (lambda: light.encode(titles), lambda: light.encode_tokens(mine)):
        with pytest.raises(RuntimeError, match="without weights"):
            call()
