"""One typed schema: the config's enums and ranges are written once (tasks/synthval/config.py), published
by `synthval config-schema` into dags/synthval_config_schema.json, and the DAG Params are built from that
file. These tests fail when the checked-in file lags behind the config, and when a trigger form would
accept a value that the step then refuses (or the other way round).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from test_dags import DAGS, load_dags

from synthval.cli import main
from synthval.config import EvalConfig, TrainConfig, config_schema, config_schema_text, load_config
from synthval.errors import ConfigError

SCHEMA_FILE = DAGS / "synthval_config_schema.json"
CONFIGS = {"train": TrainConfig, "evaluate": EvalConfig}


def test_the_checked_in_schema_is_the_generated_one(tmp_path):
    out = tmp_path / "schema.json"
    assert main(["config-schema", "--out", str(out), "--xcom-file", str(tmp_path / "result.json")]) == 0
    assert json.loads((tmp_path / "result.json").read_text()) == {"schema_uri": str(out)}
    assert out.read_text(encoding="utf-8") == config_schema_text()
    assert SCHEMA_FILE.read_text(encoding="utf-8") == config_schema_text(), (
        "dags/synthval_config_schema.json is stale: "
        "run `synthval config-schema --out dags/synthval_config_schema.json`")


def test_without_out_it_prints_only_the_schema(capsys):
    assert main(["config-schema"]) == 0
    assert capsys.readouterr().out == config_schema_text()


def test_the_schema_holds_the_enums_and_ranges_of_the_config():
    train = config_schema()["$defs"]["train"]["properties"]
    assert train["model"]["properties"]["name"]["enum"][-1] == "tiny"
    assert train["optimizer"]["properties"]["lr"] == {"type": "number", "exclusiveMinimum": 0, "default": 0.02}
    assert train["epochs"] == {"type": "integer", "minimum": 1, "default": 12}
    assert train["data"]["properties"]["hflip_prob"] == {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5}
    assert train["schedule"]["properties"]["milestones"]["items"] == {"type": "integer", "minimum": 0}
    assert train["model"]["additionalProperties"] is False
    assert "cpu-demo" in config_schema()["$defs"]["preset"]["enum"]


def _leaves(node: dict[str, Any], key: str = ""):
    """(dotted key, schema) of every field below an object schema."""
    for name, child in node["properties"].items():
        path = f"{key}{name}"
        if child.get("type") == "object":
            yield from _leaves(child, path + ".")
        else:
            yield path, child


def _edges(schema: dict[str, Any]) -> list[tuple[Any, bool]]:
    """Values at the edges of a number's range, each with whether the range admits it."""
    cases: list[tuple[Any, bool]] = []
    integer = "integer" in schema["type"]
    step = 1 if integer else 0.5
    if "minimum" in schema:
        cases += [(schema["minimum"], True), (schema["minimum"] - step, False)]
    if "exclusiveMinimum" in schema:
        low = schema["exclusiveMinimum"]
        cases += [(low, False), (low + (1 if integer else 1e-9), True)]
    if "maximum" in schema:
        cases += [(schema["maximum"], True), (schema["maximum"] + step, False)]
    return cases


def _config_accepts(config: str, key: str, value: Any) -> bool:
    try:
        if key == "preset":
            load_config(TrainConfig, preset=value)
        else:
            load_config(CONFIGS[config], overrides=[f"{key}={json.dumps(value)}"])
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_validation_enforces_every_range_the_schema_publishes(config):
    checked = 0
    for key, schema in _leaves(config_schema()["$defs"][config]):
        if schema.get("type") == "array":
            schema = schema["items"]
            value_of = lambda v: [v]  # noqa: E731 - a list field's items carry its range
        else:
            value_of = lambda v: v  # noqa: E731
        for value, admitted in _edges(schema):
            assert _config_accepts(config, key, value_of(value)) is admitted, (config, key, value)
            checked += 1
    assert checked >= 10  # every number field of either config has a range, at least "not negative"


@pytest.fixture(scope="module")
def config_params() -> dict[str, tuple[str, dict[str, Any], Any]]:
    """Every DAG param that sets a config key: ``"<dag>.<param>"`` -> (its config key, its schema, the Param)."""
    with pytest.MonkeyPatch.context() as mp:
        dags = load_dags(mp, "local", data_root="/tmp/synthval-test-root")
    found = {}
    for dag in dags.values():
        for name, param in dag.params.items():
            if isinstance(param.schema, dict) and "config_key" in param.schema:
                found[f"{dag.dag_id}.{name}"] = (param.schema["config_key"], param.schema, param)
    return found


def _param_accepts(param: Any, value: Any) -> bool:
    from airflow.sdk.definitions.param import ParamValidationError

    try:
        copy.deepcopy(param).resolve(value)
    except ParamValidationError:
        return False
    return True


def test_every_config_knob_of_the_dags_comes_from_the_schema(config_params):
    keys = {key for key, _, _ in config_params.values()}
    assert keys == {"preset", "train.model.name", "train.epochs", "train.optimizer.lr", "train.data.batch_size",
                    "train.data.max_images", "evaluate.batch_size"}
    assert "train_on_synthetic_and_real_dataset.finetune_learning_rate" in config_params
    for where, (key, schema, _) in config_params.items():
        if key == "preset":
            assert schema["enum"] == config_schema()["$defs"]["preset"]["enum"], where
            continue
        config, _, dotted = key.partition(".")
        field = config_schema()["$defs"][config]
        for part in dotted.split("."):
            field = field["properties"][part]
        for word in ("minimum", "maximum", "exclusiveMinimum"):
            assert schema.get(word) == field.get(word), (where, word)
        if "enum" in field:
            assert set(schema["enum"]) - {None} == set(field["enum"]) - {None}, where


def test_a_param_refuses_exactly_what_the_config_refuses(config_params):
    """At each edge of each range, and for each enum value and a typo, the trigger form and the step agree."""
    for where, (key, schema, param) in config_params.items():
        config, _, dotted = key.partition(".")
        cases = _edges(schema)
        if "enum" in schema:
            cases += [(value, True) for value in schema["enum"] if value is not None] + [("resnet18-typo", False)]
        assert cases, where
        for value, admitted in cases:
            assert _param_accepts(param, value) is admitted, (where, value, "Param")
            assert _config_accepts(config, dotted or key, value) is admitted, (where, value, "config")
        if key != "preset":
            assert _param_accepts(param, None)  # empty: the preset's value


def test_dag_files_read_the_schema_not_the_package():
    source = (DAGS / "synthval_params.py").read_text(encoding="utf-8")
    assert "synthval_config_schema.json" in source and "import synthval." not in source
    assert Path(SCHEMA_FILE).is_file()
