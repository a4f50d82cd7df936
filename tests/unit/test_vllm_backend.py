"""The vllm backend's pure parts: model resolution, the portable constraint regex, sampling parameters, rows,
postprocessing and the ray.data.llm processor config. No vLLM, no Ray cluster, no GPU."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lane_ray.llm.backend import Choice, FreeText, GenerationParams, Template, Text, json_string_array
from lane_ray.llm.vllm_backend import (
    INSTALL_HINT,
    VLLMBackend,
    VLLMError,
    build_rows,
    collect_generations,
    engine_kwargs,
    eos_token_ids,
    model_id_for,
    num_blocks,
    postprocess_row,
    processor_config_kwargs,
    render_prompt,
    resolve_model,
    sampling_params_dict,
)

WORD_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZé '-"
SLOTS = json_string_array(3, 0, 2, 14, head=(Choice(("Drama", "Sci-Fi", "1990s")), Text(" ")), chars=WORD_CHARS)
FREE = json_string_array(2, 0, 1, 4)


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny-llm"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    return d


# ------------------------------------------------------------------------------------------ model


def test_resolve_hf_dir_gguf_and_hub_id(tmp_path: Path, hf_dir: Path):
    assert resolve_model(str(hf_dir)).source == str(hf_dir.resolve())
    assert resolve_model(str(hf_dir)).gguf is None
    g = tmp_path / "m.Q4.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_model(str(g)).gguf == g.resolve()
    folder = tmp_path / "gg"
    folder.mkdir()
    (folder / "x.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(folder)).gguf == (folder / "x.gguf").resolve()
    hub = resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert hub.source == "HuggingFaceTB/SmolLM2-360M-Instruct" and not hub.local


@pytest.mark.parametrize("bad", ["/no/such/model", "./missing-dir", "~/nowhere/x", "weights.gguf", "a/b/c"])
def test_missing_model_path_is_one_line_error(bad: str):
    with pytest.raises(VLLMError, match="path not found") as e:
        resolve_model(bad)
    assert "\n" not in str(e.value)


def test_folder_without_model_is_an_error(tmp_path: Path):
    with pytest.raises(VLLMError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VLLMError, match="must be a .gguf"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_model_id_matches_model_identity(hf_dir: Path):
    from lane_ray.config import LLMConfig
    from lane_ray.llm import model_identity

    for model in (str(hf_dir), "org/served-model"):
        assert model_id_for(model) == model_identity(LLMConfig(backend="vllm", model=model))
    assert model_id_for(str(hf_dir)).startswith("tiny-llm@")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_constructor_without_vllm_says_how_to_install(hf_dir: Path):
    with pytest.raises(VLLMError) as e:
        VLLMBackend(str(hf_dir))
    assert INSTALL_HINT in str(e.value) and "\n" not in str(e.value)


def test_constructor_checks_model_before_vllm():
    with pytest.raises(VLLMError, match="path not found"):
        VLLMBackend("/no/such/model")


def test_eos_ids_join_tokenizer_and_generation_config(hf_dir: Path):
    assert eos_token_ids(2, hf_dir) == (2, 7)
    assert eos_token_ids([3], None) == (3,)
    assert eos_token_ids(None, hf_dir.parent) == ()


# ------------------------------------------------------------------------------------- constraint

def test_template_regex_uses_only_portable_syntax():
    rx = SLOTS.to_regex()
    assert "(?" not in rx  # no non-capturing groups (older xgrammar rejects them)
    assert "\\ " not in rx and "\\-" not in rx  # no identity escapes of non-metacharacters
    assert "\\x20" in rx and "\\x27" in rx  # space and quote of the allowed set, as hex escapes
    assert rx.startswith("(Drama|Sci-Fi|1990s) [\\x20")
    assert FREE.to_regex().startswith('[^"\\\\{}\\[\\]\\x00-\\x1f]{1,')  # no allow-list: the excluded class
    assert rx.endswith('"\\]\\}')


def test_template_regex_escapes_metacharacters_in_text_and_options():
    t = Template((Text('{"a": "'), Choice(("C++", "a.b", "(x)")), FreeText(0, 2), Text('"}')))
    rx = t.to_regex(3)
    assert re.fullmatch(rx, '{"a": "C++"}') and re.fullmatch(rx, '{"a": "a.bxyz"}')
    assert not re.fullmatch(rx, '{"a": "aXb"}') and not re.fullmatch(rx, '{"a": "C++1234567"}')


def test_template_max_chars_bounds_every_accepted_text():
    n = SLOTS.max_chars(4)
    assert n == 3 * (len("Sci-Fi") + 1 + 56) + 2 * len('", "') + len('"]}')
    longest = "Sci-Fi " + "w" * 56
    text = f'{longest}", "{longest}", "{longest}"]}}'
    assert len(text) == n and re.fullmatch(SLOTS.to_regex(4), text)


def test_sampling_params_dict():
    sp = sampling_params_dict(GenerationParams(max_new_tokens=20, temperature=0.9, top_p=0.8, seed=7, stop=("\n",)))
    assert sp == {"temperature": 0.9, "top_p": 0.8, "seed": 7, "frequency_penalty": 0.0, "skip_special_tokens": True,
                  "stop": ["\n"],
                  "structured_outputs": None, "max_tokens": 20}
    greedy = sampling_params_dict(GenerationParams(temperature=0.0, top_p=0.5), SLOTS, chars_per_token=4)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0
    assert greedy["structured_outputs"] == {"regex": SLOTS.to_regex(4)}
    # a constrained generation may run to the template's length bound (+ EOS), never cut off before
    assert greedy["max_tokens"] == SLOTS.max_chars(4) + 1
    assert sampling_params_dict(GenerationParams(max_new_tokens=5000), SLOTS)["max_tokens"] == 5000


def test_sampling_params_are_valid_vllm_structured_outputs():
    sp = sampling_params_dict(GenerationParams(), SLOTS)
    from dataclasses import fields

    vllm = pytest.importorskip("vllm")
    names = {f.name for f in fields(vllm.sampling_params.StructuredOutputsParams)}
    assert set(sp["structured_outputs"]) <= names
    vllm.SamplingParams(**{k: v for k, v in sp.items() if k != "structured_outputs"},
                        structured_outputs=vllm.sampling_params.StructuredOutputsParams(**sp["structured_outputs"]))


# ------------------------------------------------------------------------------------------- rows


class FakeTokenizer:
    def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</s>" for m in conversation) + "<assistant>"


def test_render_prompt_continues_the_prefill():
    text = render_prompt(FakeTokenizer(), [{"role": "user", "content": "hi"}], '{"preferences": ["')
    assert text == '<user>hi</s><assistant>{"preferences": ["'


def test_build_rows_keeps_order_and_max_tokens():
    sp = sampling_params_dict(GenerationParams(max_new_tokens=8))
    rows = build_rows([[1, 2, 3], [4]], [sp, sp], max_model_len=64)
    assert [r["idx"] for r in rows] == [0, 1]
    assert rows[0]["tokenized_prompt"] == [1, 2, 3] and rows[1]["max_tokens"] == 8
    rows[0]["sampling_params"]["seed"] = 99  # rows own their dicts
    assert sp["seed"] == 0


def test_build_rows_rejects_prompts_longer_than_the_context():
    sp = sampling_params_dict(GenerationParams(max_new_tokens=10))
    with pytest.raises(VLLMError, match="conversation 1: prompt of 60 tokens"):
        build_rows([[1] * 5, [1] * 60], [sp, sp], max_model_len=64)


def test_postprocess_row_finish_reason_and_tokens():
    base = {"idx": 3, "max_tokens": 4, "generated_text": 'Drama x"]}'}
    assert postprocess_row({**base, "generated_tokens": [5, 6, 2], "num_generated_tokens": 3}, (2,)) == {
        "idx": 3, "text": 'Drama x"]}', "new_tokens": 3, "finish_reason": "stop"}
    assert postprocess_row({**base, "generated_tokens": [5, 6, 7, 8], "num_generated_tokens": 4},
                           (2,))["finish_reason"] == "length"
    # EOS as the last allowed token is a stop, not a cut
    assert postprocess_row({**base, "generated_tokens": [5, 6, 7, 2], "num_generated_tokens": 4},
                           (2,))["finish_reason"] == "stop"
    import numpy as np  # Ray Data hands lists over as arrays

    out = postprocess_row({**base, "generated_tokens": np.array([5, 2]), "num_generated_tokens": 2}, (2,))
    assert out["new_tokens"] == 2 and out["finish_reason"] == "stop"


def test_collect_generations_restores_input_order():
    rows = [{"idx": i, "text": f"t{i}", "new_tokens": i, "finish_reason": "stop"} for i in (2, 0, 1)]
    gens = collect_generations(rows, 3)
    assert [g.text for g in gens] == ["t0", "t1", "t2"] and [g.new_tokens for g in gens] == [0, 1, 2]
    with pytest.raises(VLLMError, match="2 of 3"):
        collect_generations(rows[:2], 3)


def test_num_blocks():
    assert num_blocks(1, 64, 4) == 1
    assert num_blocks(10, 64, 4) == 4  # one per replica at least
    assert num_blocks(1000, 64, 2) == 16


# ---------------------------------------------------------------------------------------- processor


def test_processor_config_validates_with_ray_data_llm():
    engine = engine_kwargs(tensor_parallel_size=2, gpu_memory_utilization=0.6, max_model_len=2048, max_num_seqs=128,
                           extra={"dtype": "bfloat16"})
    assert engine == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.6, "max_model_len": 2048,
                      "enforce_eager": False, "max_num_seqs": 128, "dtype": "bfloat16"}
    kw = processor_config_kwargs("/models/x", engine, replicas=3, batch_size=32)
    from ray.data.llm import vLLMEngineProcessorConfig

    cfg = vLLMEngineProcessorConfig(**kw)
    assert cfg.model_source == "/models/x" and cfg.concurrency == 3 and cfg.batch_size == 32
    assert cfg.engine_kwargs["tensor_parallel_size"] == 2 and cfg.engine_kwargs["task_type"] == "generate"
    assert cfg.chat_template_stage is False and cfg.tokenize_stage is False and cfg.detokenize_stage is False
    assert "task_type" not in engine  # the config validator writes into its own copy


def test_module_import_loads_no_heavy_library():
    code = ("import sys, lane_ray.llm.vllm_backend; "
            "print([m for m in ('vllm', 'torch', 'transformers', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_reaches_the_vllm_constructor():
    from lane_ray.config import load_config
    from lane_ray.llm import backend_kwargs

    cfg = load_config(None, ["llm.backend=vllm", "llm.enforce_eager=true", "llm.replicas=2"], {})
    kw = backend_kwargs(cfg.llm)
    assert kw["enforce_eager"] is True and kw["replicas"] == 2 and kw["model"] == cfg.llm.model


# ----------------------------------------------------------------------------------------------- scoring


def test_score_rows_and_sampling_params():
    from lane_ray.llm.vllm_backend import build_score_rows, score_sampling_params

    sp = score_sampling_params()
    assert sp["prompt_logprobs"] == 0 and sp["max_tokens"] == 1 and sp["temperature"] == 0.0
    rows = build_score_rows([[1, 2, 3], [4], [5, 6]], [[7, 8], [], [9]], max_model_len=16)
    assert [r["idx"] for r in rows] == [0, 2]  # the empty continuation needs no request
    assert rows[0]["tokenized_prompt"] == [1, 2, 3, 7, 8] and rows[0]["score_from"] == 3
    assert rows[1]["tokenized_prompt"] == [5, 6, 9] and rows[1]["score_from"] == 2
    with pytest.raises(VLLMError, match="conversation 0: prompt \\+ continuation of 5 tokens exceeds"):
        build_score_rows([[1, 2, 3]], [[7, 8]], max_model_len=5)


def test_continuation_logprob_from_prompt_logprobs():
    from lane_ray.llm.vllm_backend import collect_scores, continuation_logprob, postprocess_score_row

    # as the engine stage returns them: None first, then {token_id: {"logprob", "rank", "decoded_token"}};
    # prompt_logprobs=0 may still add the top token beside the actual one
    lps = [None, {2: {"logprob": -1.0, "rank": 1}}, {3: {"logprob": -0.5, "rank": 2}, 9: {"logprob": -0.1}},
           {7: {"logprob": -2.0}}, {8: {"logprob": -0.25}}]
    ids = [1, 2, 3, 7, 8]
    assert continuation_logprob(lps, ids, 3) == -2.25
    assert continuation_logprob(lps, ids, 0) == -3.75  # position 0 has nothing to score
    # through Arrow the keys may come back as strings and a value as a bare float
    assert continuation_logprob([None, {"2": -1.0}, {"3": {"logprob": -0.5}}], [1, 2, 3], 1) == -1.5
    with pytest.raises(VLLMError, match="lack the prompt token 3"):
        continuation_logprob([None, {2: -1.0}, {4: -0.5}], [1, 2, 3], 1)
    row = {"idx": 2, "prompt_logprobs": lps, "prompt_token_ids": ids, "score_from": 3, "tokenized_prompt": ids}
    assert postprocess_score_row(row) == {"idx": 2, "score": -2.25}
    with pytest.raises(VLLMError, match="no prompt_logprobs"):
        postprocess_score_row({**row, "prompt_logprobs": None})
    assert collect_scores([{"idx": 2, "score": -2.25}, {"idx": 0, "score": -1.0}], 3) == [-1.0, 0.0, -2.25]
