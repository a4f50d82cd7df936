"""docs/python_api.md's worked example runs as it stands (in a temporary working directory), on the session's
Ray cluster, and its results hold what the page says they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "python_api.md"


def test_the_worked_example_runs_verbatim(ray_cluster, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "one worked example on the page"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), scope)  # noqa: S102 - the documented example, run as a user would
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "api-example"
    for artifact in ("metrics.json", "preferences.parquet", "candidates.parquet", "report/report.md"):
        assert (run / artifact).exists(), artifact
    assert set(scope["metrics"]) == {"sasrec/id/seed0", "sasrec/lane/seed0"}
    top, new, why = scope["top"], scope["new"], scope["why"]
    assert [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert all(len(t["pref_contrib"]) == len(scope["rec"].recommend(user_id=1, k=1)[0]["pref_contrib"]) for t in top)
    assert 1 <= len(new) <= 3 and not {t["item_id"] for t in new} & {top[0]["item_id"], top[1]["item_id"]}
    assert why["source"] in ("llm", "template") and len(why["steps"]) == 4 and why["reason"]
    assert "report:" in out and "test NDCG@10" in out
