"""`lane submit`'s runtime_env file and entry-point resources: what reaches the job server, and one-line errors."""

from __future__ import annotations

import pytest

from lane_ray.errors import ConfigError
from lane_ray.submit import SUBMIT_EXCLUDES, entrypoint_resources, job_runtime_env, load_runtime_env


def test_runtime_env_file_adds_to_what_lane_ships(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = tmp_path / "env.yaml"
    f.write_text("pip: [rich]\nenv_vars: {HF_HUB_OFFLINE: '0', EXTRA: x}\nexcludes: ['*.ckpt']\n")
    env = job_runtime_env(tmp_path, load_runtime_env(f))
    assert env["pip"] == ["rich"] and env["working_dir"] == str(tmp_path)
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "0", "EXTRA": "x"}  # the file's values win
    assert env["excludes"] == SUBMIT_EXCLUDES + ["*.ckpt"]
    plain = job_runtime_env(tmp_path)
    assert plain["excludes"] == SUBMIT_EXCLUDES and plain["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_runtime_env_json_file_and_own_working_dir(tmp_path):
    f = tmp_path / "env.json"
    f.write_text('{"working_dir": "s3://bucket/code.zip"}')
    assert job_runtime_env(tmp_path, load_runtime_env(f))["working_dir"] == "s3://bucket/code.zip"


@pytest.mark.parametrize("text, expect", [("[1, 2]", "is a mapping"), ("env_vars: [a]", "'env_vars' must be a dict"),
                                          ("a: [", "not YAML or JSON")])
def test_bad_runtime_env_names_the_file(tmp_path, text, expect):
    f = tmp_path / "env.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=expect) as info:
        load_runtime_env(f)
    assert str(f) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_runtime_env(tmp_path / "missing.yaml")


def test_entrypoint_resources():
    assert entrypoint_resources('{"head": 1, "ssd": 0.5}') == {"head": 1.0, "ssd": 0.5}
    assert entrypoint_resources(None) is None
    for bad in ("{", "[1]", '{"a": -1}', '{"a": "x"}'):
        with pytest.raises(ConfigError, match="--entrypoint-resources"):
            entrypoint_resources(bad)
