from __future__ import annotations

import pytest
from pydantic import BaseModel

from lane_ray.config import LaneConfig, dump_config, load_config
from lane_ray.errors import ConfigError


def _walk(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, prefix + name + ".")


def test_every_field_is_defaulted_and_described():
    cfg = LaneConfig()  # all defaults
    assert cfg.data.dataset == "ml-100k"
    for name, field in _walk(LaneConfig):
        assert field.description, f"{name} has no description"


def test_yaml_then_overrides_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  dataset: ml-1m\n  user_k_core: 5\nrun:\n  seed: 3\n")
    cfg = load_config(f, ["data.user_k_core=7", "data.columns.user_id=uid"], {"run.out": "x"})
    assert (cfg.data.dataset, cfg.data.user_k_core, cfg.run.seed, cfg.run.out) == ("ml-1m", 7, 3, "x")
    assert cfg.data.columns.user_id == "uid"
    # the dump reads back to the same config
    g = tmp_path / "d.yaml"
    g.write_text(dump_config(cfg))
    assert load_config(g) == cfg


def test_explain_section_yaml_then_overrides_then_flags(tmp_path):
    assert LaneConfig().explain.top_k == 5 and LaneConfig().explain.actor_niceness == -5
    f = tmp_path / "c.yaml"
    f.write_text("explain:\n  top_k: 3\n  batch_size: 4\n  max_users: 2\n")
    cfg = load_config(f, ["explain.top_k=2", "explain.batch_size=8"], {"explain.top_k": 1})
    assert (cfg.explain.top_k, cfg.explain.batch_size, cfg.explain.max_users) == (1, 8, 2)


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.user_k_core=abc", "data.user_k_core"),
        ("data.user_k_core=-1", "data.user_k_core"),
        ("data.format=xml", "data.format"),
        ("data.nonsense=1", "data.nonsense"),
        ("synth.items=0", "synth.items"),
        ("explain.top_k=0", "explain.top_k"),
        ("explain.not_copied_threshold=1.5", "explain.not_copied_threshold"),
        ("explain.actor_niceness=-21", "explain.actor_niceness"),
    ],
)
def test_bad_value_is_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"'{field}'" in msg


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(f)
    f.write_text("data:\n  min_user_interactions: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: config field 'data.min_user_interactions'"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["novalue"])
