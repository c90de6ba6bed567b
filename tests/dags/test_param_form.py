"""The trigger form: one Param per PipelineParams field, typed, described and sectioned."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from semisup_tasks.config import PipelineParams, param_specs


def test_every_pipeline_param_has_a_form_field(retrain_dag):
    params = retrain_dag.params
    fields = [f.name for f in dataclasses.fields(PipelineParams)]
    assert set(params.keys()) == {"store", *fields}
    specs = param_specs()
    for name in fields:
        param = params.get_param(name)
        assert param.schema["section"] == specs[name]["section"]
        assert param.schema["title"]
        assert param.schema["type"] == specs[name]["schema"]["type"]
        assert param.description == specs[name]["description"]
        # the DAG's own default: its scheduled runs need a new image; PipelineParams (semisup run) has 0
        expected = 1 if name == "min_new_images" else specs[name]["default"]
        assert param.value == expected


def test_store_param_defaults_to_an_absolute_uri(retrain_dag):
    store = retrain_dag.params.get_param("store")
    assert store.schema["section"] and store.schema["type"] == "string"
    assert store.value.startswith(("file:///", "s3://"))


def test_store_default_follows_semisup_store(monkeypatch, tmp_path):
    from semisup_params import default_store, pipeline_params

    monkeypatch.setenv("SEMISUP_STORE", "s3://bucket/semisup")
    assert default_store() == "s3://bucket/semisup"
    monkeypatch.setenv("SEMISUP_STORE", str(tmp_path / "store"))
    assert pipeline_params()["store"].value == f"file://{tmp_path / 'store'}"


def test_form_defaults_are_valid_pipeline_params(retrain_dag):
    values = retrain_dag.params.validate()
    values.pop("store")
    assert PipelineParams.from_dict(values) == PipelineParams(min_new_images=1)


def test_a_bad_dag_default_fails_when_the_dag_is_parsed():
    from semisup_params import pipeline_params

    from semisup_tasks.config import ConfigError

    with pytest.raises(ConfigError, match="min_new_images must be at least 0"):
        pipeline_params(defaults={"min_new_images": -1})
    assert pipeline_params(defaults={"min_new_images": 500})["min_new_images"].value == 500


@pytest.mark.parametrize("name, bad", [("k", 0), ("teacher_arch", "vgg"), ("lr", 0), ("drops", "d1"),
                                       ("drops_last", -1), ("drops_since", "Jan 5"), ("min_new_images", -1)])
def test_form_rejects_bad_values(retrain_dag, name, bad):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(retrain_dag.params)
    with pytest.raises(ParamValidationError):
        params[name] = bad
