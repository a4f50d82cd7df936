"""Request and response bodies of the HTTP API (docs/design.md "HTTP API"), as pydantic models.

Types are strict: ``"k": "10"`` or ``"user_id": true`` is refused rather than coerced. Limits that depend on the
deployment (``serve.max_k``, ``serve.max_history``, ``serve.max_explain``) are checked by the Ingress, which
names the field in the same error shape (:class:`ErrorBody`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, model_validator

Title = Annotated[str, StringConstraints(min_length=1, max_length=500)]
HistoryEntry = StrictInt | Title


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _WhoBody(_Body):
    user_id: StrictInt | None = Field(None, description="A user of the run's dataset (their stored history and "
                                      "preferences are used). Give this or `history`, not both.")
    history: list[HistoryEntry] | None = Field(
        None, description="A raw history, oldest first: catalogue item ids (integers) or titles (strings; matched "
        "exactly, else by embedding nearest neighbour, reported back in `history`).",
    )

    @model_validator(mode="after")
    def _one_of(self) -> _WhoBody:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of `user_id` or `history`")
        if self.history is not None and not self.history:
            raise ValueError("`history` is empty")
        return self


class RecommendRequest(_WhoBody):
    k: StrictInt = Field(10, ge=1, description="How many items to return (at most serve.max_k).")
    explain: StrictBool = Field(False, description="Also explain the top `explain_top` items.")
    explain_top: StrictInt = Field(1, ge=1, description="How many of the top items to explain (at most "
                                   "serve.max_explain and `k`).")


class ExplainBody(_WhoBody):
    item_id: StrictInt = Field(..., description="The catalogue item to explain for this user or history.")


class HistoryMatch(BaseModel):
    input: int | str = Field(..., description="The history entry as sent.")
    item_id: int = Field(..., description="The catalogue item it resolved to.")
    title: str = Field(..., description="That item's title.")
    match: Literal["id", "exact", "nearest"] = Field(..., description="How it was resolved.")
    similarity: float | None = Field(None, description="Cosine similarity of a `nearest` title match.")


class EvidenceItem(BaseModel):
    item_id: int = Field(..., description="A history item (catalogue id).")
    title: str = Field(..., description="Its title.")
    contrib: float = Field(..., description="The item's score minus its score with this history item removed "
                           "from the sequence: how much the recommendation rests on it (> 0: it supports it).")


class RankedItem(BaseModel):
    rank: int = Field(..., description="1 = best.")
    item_id: int = Field(..., description="Catalogue item id.")
    title: str = Field(..., description="Catalogue title.")
    score: float = Field(..., description="Dot product of the user representation and the item vector.")
    pref_contrib: list[float] | None = Field(
        None, description="Item-level attribution, per preference (in `preferences` order): the score minus the "
        "score with that preference left out (exact leave-one-out). Empty when ranked without preferences; absent "
        "when the Ranker computes no attributions.")
    pref_share: float | None = Field(
        None, description="The score minus the score with no preference at all: the part of the score the "
        "preferences carry (0 without preferences or for a model without alignment).")
    evidence: list[EvidenceItem] | None = Field(
        None, description="The history items whose removal lowers this item's score most (of the most recent "
        "ones), largest drop first.")


class ExplanationOut(BaseModel):
    item_id: int = Field(..., description="The explained item.")
    rank: int = Field(..., description="Its rank for this user.")
    title: str = Field(..., description="Its title.")
    steps: list[str] = Field(..., description="The four chain-of-thought steps: the model's attribution, the "
                             "evidence, the likelihood, the reason.")
    likelihood: str = Field(..., description="high | medium | low.")
    reason: str = Field(..., description="The final, personal reason.")
    fit: list[float] = Field(..., description="judge mode: how well the item fits each preference according to "
                             "the LLM (0-1); empty otherwise and for templates.")
    source: Literal["llm", "template"] = Field(..., description="`template`: built from the attribution alone "
                                               "because the LLM failed, timed out or gave no parseable reply.")
    degraded_reason: str | None = Field(None, description="Why a template was returned, when it was.")
    checks: dict[str, Any] = Field(default_factory=dict, description="The explanation's checks "
                                   "(docs/explanations.md).")
    main_preference: str | None = Field(None, description="The preference the explanation cites as the main "
                                        "reason; empty when it cites history items instead.")
    evidence_item_ids: list[int] | None = Field(None, description="The history items the explanation cites.")
    preferences: list[str] | None = Field(None, description="The user's preferences, in their stored order.")
    labels: list[str] | None = Field(None, description="Per preference: main, also or unused (from pref_contrib).")
    pref_contrib: list[float] | None = Field(None, description="Per preference: the score minus the score "
                                             "without it (the model's leave-one-out attribution).")
    pref_share: float | None = Field(None, description="The score minus the score without any preference.")
    attribution: str | None = Field(None, description="Where the contributions come from: model (leave-one-out) "
                                    "or alignment weights (a stand-in, flagged).")


class RecommendResponse(BaseModel):
    user_id: int | None = Field(..., description="The user, when the request named one.")
    model: str = Field(..., description="The served checkpoint.")
    history: list[HistoryMatch] | None = Field(None, description="How a raw history was resolved.")
    preferences: list[str] = Field(..., description="The user's preferences (empty: ranked without).")
    preference_source: Literal["stored", "llm", "none"] = Field(
        ..., description="stored (the run's preferences.parquet), llm (extracted now, cached) or none.")
    preference_status: str | None = Field(None, description="ok | repaired | fallback for LLM preferences.")
    preference_note: str | None = Field(None, description="Why there are no preferences, when there are none.")
    preference_weights: list[float] | None = Field(
        None, description="Alignment weight of each preference (aligned models only).")
    items: list[RankedItem] = Field(..., description="Top-k items, seen items excluded.")
    explanations: list[ExplanationOut] = Field(default_factory=list, description="When `explain` was set.")


class ExplainResponse(BaseModel):
    user_id: int | None = Field(..., description="The user, when the request named one.")
    history: list[HistoryMatch] | None = Field(None, description="How a raw history was resolved.")
    item: RankedItem = Field(..., description="The item with its rank and score for this user.")
    preferences: list[str] = Field(..., description="The user's preferences.")
    preference_weights: list[float] | None = Field(None, description="Alignment weight of each preference.")
    explanation: ExplanationOut = Field(..., description="The explanation.")


class ItemOut(BaseModel):
    item_id: int = Field(..., description="Catalogue item id.")
    title: str = Field(..., description="Title.")
    genres: str | None = Field(None, description="'|'-separated genres, where the dataset has them.")
    year: str | None = Field(None, description="Release year, where the dataset has it.")


class Health(BaseModel):
    status: Literal["ok"] = Field(..., description="ok when every deployment answered.")
    model: str = Field(..., description="The served checkpoint.")
    items: int = Field(..., description="Catalogue size.")
    users: int = Field(..., description="Known users.")
    llm: str = Field(..., description="LLM backend and model of the explanations.")


class ErrorBody(BaseModel):
    error: str = Field(..., description="One line naming the problem.")
    field: str | None = Field(None, description="The offending field (dotted path, list positions in [])")
