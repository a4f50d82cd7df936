"""The serving core without Ray: user and history resolution, scoring, masking, errors naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serving_run import CHECKPOINT, PREFERENCES

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def core(serving_run):
    from lane_ray.serving import RankerCore

    return RankerCore(serving_run, CHECKPOINT)


def test_known_user_has_whole_history_and_stored_preferences(core):
    uid = int(core.split.user_ids[0])
    u = core.user(uid)
    seq = core.split.items[core.split.offsets[0]:core.split.offsets[1]]
    assert core.index.decode(np.array(u.history)).tolist() == seq.tolist()  # train + valid + test
    assert u.preferences == PREFERENCES and u.prefs.shape == (len(PREFERENCES), 384)


def test_unknown_user_is_404_naming_user_id(core):
    from lane_ray.serving import RequestError

    with pytest.raises(RequestError) as e:
        core.user(10**9)
    assert e.value.status == 404 and e.value.field == "user_id"


def test_history_resolves_ids_exact_titles_titles_with_year_and_nearest(core):
    cat = core.catalogue
    t0, t1, t2 = cat.titles[0], cat.titles[1], cat.titles[2]
    dense, matches = core.resolve([int(cat.item_ids[3]), t0.upper() + "  ", f"{t1} ({cat.years[1]})", t2 + "s"])
    assert dense == [4, 1, 2, 3]
    assert [m["match"] for m in matches] == ["id", "exact", "exact", "nearest"]
    assert matches[3]["similarity"] >= core.title_min_similarity and matches[3]["title"] == t2


@pytest.mark.parametrize("entry, field", [(10**9, "history[1]"), ("zzqx vvbn ploo", "history[1]")])
def test_unresolvable_entry_is_422_naming_its_position(core, entry, field):
    from lane_ray.serving import RequestError

    with pytest.raises(RequestError) as e:
        core.resolve([int(core.catalogue.item_ids[0]), entry])
    assert e.value.status == 422 and e.value.field == field


def test_scores_mask_seen_items_and_agree_with_a_full_forward(core):
    from lane_ray.serving import RankQuery

    u = core.user(int(core.split.user_ids[1]))
    res = core.score([RankQuery(u.history, 10, u.prefs, target=u.history[-1]),
                      RankQuery(u.history[:3], 5, None)])
    assert len(res[0]["items"]) == 10 and len(res[1]["items"]) == 5
    assert not set(res[0]["items"]) & set(u.history) and 0 not in res[0]["items"]
    assert res[0]["scores"] == sorted(res[0]["scores"], reverse=True)
    w = np.array(res[0]["weights"])
    assert w.shape == (len(PREFERENCES),) and abs(w.sum() - 1) < 1e-4
    assert res[1]["weights"] is None  # ranked without preferences
    # the same user alone gives the same scores (batching does not change results)
    alone = core.score([RankQuery(u.history, 10, u.prefs)])[0]
    assert alone["items"] == res[0]["items"] and np.allclose(alone["scores"], res[0]["scores"], atol=1e-5)
    # the target's rank counts the items scored above it (its own history not masked)
    assert res[0]["target"]["rank"] >= 1


def test_k_larger_than_unseen_items_returns_all_unseen(core):
    from lane_ray.serving import RankQuery

    hist = list(range(1, len(core.index) - 2))
    res = core.score([RankQuery(hist, 50, None)])[0]
    assert sorted(res["items"]) == [len(core.index) - 2, len(core.index) - 1, len(core.index)]


def test_missing_checkpoint_names_what_exists(serving_run):
    from lane_ray.errors import DataError
    from lane_ray.serving import RankerCore

    with pytest.raises(DataError, match=f"have: {CHECKPOINT}"):
        RankerCore(serving_run, "gru4rec-id-seed9")


def test_template_without_preferences_reads_well():
    from lane_ray.llm.explain import ExplainSettings
    from lane_ray.serving import explain_request, template_row

    item = {"item_id": 7, "title": "Heat", "genres": "Action", "year": "1995"}
    row = template_row(explain_request(None, item, 1, 2.5, [item], [], None), ExplainSettings())
    assert row["source"] == "template" and "history only" in row["steps"][0] and " ." not in row["reason"]


def test_serve_batch_resolves_users_and_isolates_errors(core):
    from lane_ray.serving import ServeQuery

    uid = int(core.split.user_ids[0])
    target = int(core.catalogue.item_ids[5])
    out = core.serve([ServeQuery(4, user_id=uid, target_item=target, with_history=True),
                      ServeQuery(4, user_id=10**9),
                      ServeQuery(3, history=[1, 2], target_item=10**9),
                      ServeQuery(3, history=[1, 2])])
    assert out[0]["preferences"] == PREFERENCES and len(out[0]["items"]) == 4
    assert out[0]["target_meta"]["item_id"] == target and out[0]["target"]["rank"] >= 1
    assert len(out[0]["history_items"]) == len(core.user(uid).history)
    assert out[1] == {"error": {"status": 404, "field": "user_id", "error": f"unknown user_id {10**9} (send a "
                                                                            "`history` for a new user)"}}
    assert out[2]["error"]["field"] == "item_id" and out[2]["error"]["status"] == 404
    assert [m["item_id"] for m in out[3]["meta"]] == core.index.decode(np.array(out[3]["items"])).tolist()
    assert not {1, 2} & set(out[3]["items"])


def test_ranked_items_carry_their_attribution(core):
    from lane_ray.data.split import pad_left
    from lane_ray.serving import RankQuery

    u = core.user(int(core.split.user_ids[2]))
    target = u.history[-1]
    res = core.score([RankQuery(u.history, 4, u.prefs, target=target), RankQuery(u.history[:3], 2, None)])
    att = res[0]["attribution"]
    assert len(att) == 4 and all(len(a["pref_contrib"]) == len(PREFERENCES) for a in att)
    # against recomputation: the score without preference k, without any, without an evidence item
    L = core.model.cfg.max_len
    hist = torch.from_numpy(pad_left([np.asarray(u.history[-L:])], L))
    prefs, mask = torch.from_numpy(u.prefs[None]), torch.ones(1, len(PREFERENCES), dtype=torch.bool)
    items = torch.tensor([res[0]["items"]])
    with torch.no_grad():
        base = core.model.score(hist, items, prefs, mask)[0]
        for k in range(len(PREFERENCES)):
            m2 = mask.clone()
            m2[0, k] = False
            want = base - core.model.score(hist, items, prefs, m2)[0]
            assert np.allclose([a["pref_contrib"][k] for a in att], want.numpy(), atol=1e-5)
        share = base - core.model.score(hist, items, prefs, torch.zeros_like(mask))[0]
        assert np.allclose([a["pref_share"] for a in att], share.numpy(), atol=1e-5)
        ev = att[0]["evidence"]
        assert 1 <= len(ev) <= 3 and [e["contrib"] for e in ev] == sorted((e["contrib"] for e in ev), reverse=True)
        d = core.catalogue.dense(ev[0]["item_id"])
        assert d in u.history[-core.attribution_window:] and ev[0]["title"] == core.catalogue.titles[d - 1]
        p = max(i for i, x in enumerate(hist[0].tolist()) if x == d)
        h2 = torch.cat([torch.zeros(1, dtype=hist.dtype), hist[0, :p], hist[0, p + 1:]])[None]
        assert abs(ev[0]["contrib"] - float(base[0] - core.model.score(h2, items, prefs, mask)[0, 0])) < 1e-5
    assert set(res[0]["target"]) == {"rank", "score", "attribution"}
    assert len(res[0]["target"]["attribution"]["pref_contrib"]) == len(PREFERENCES)
    # ranked without preferences: nothing to attribute to them
    assert all(a["pref_contrib"] == [] and a["pref_share"] == 0.0 for a in res[1]["attribution"])
