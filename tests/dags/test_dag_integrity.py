"""Every DAG imports, follows the house rules, and keeps torch out of parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"


def test_dagbag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert dagbag.dags, "no DAG found in dags/"
    assert "semisup_retrain" in dagbag.dags


@pytest.mark.parametrize("rule", ["tags", "retries", "doc_md"])
def test_every_dag_follows_house_rules(dagbag, rule):
    for dag_id, dag in dagbag.dags.items():
        if rule == "tags":
            assert dag.tags, f"{dag_id} has no tags"
        elif rule == "retries":
            for t in dag.tasks:
                assert (t.retries or 0) >= 1, f"{dag_id}.{t.task_id} has no retries"
        else:
            assert dag.doc_md and dag.doc_md.strip(), f"{dag_id} has no doc_md"


def test_param_defaults_validate(dagbag):
    for dag in dagbag.dags.values():
        dag.params.validate()


def test_no_torch_at_parse_time():
    """Parse every DAG file in a fresh interpreter, then look at sys.modules."""
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS)!r})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(json.dumps({'errors': {str(k): v for k, v in bag.import_errors.items()},\n"
        "                  'dags': sorted(bag.dags), 'heavy': heavy[:5]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    assert "semisup_retrain" in out["dags"]
    assert out["heavy"] == [], f"torch imported while parsing DAGs: {out['heavy']}"


def test_retrain_dag_wiring(retrain_dag):
    dag = retrain_dag
    assert dag.max_active_runs == 1
    up = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert up["plan"] == set()
    # the gate sits between plan and everything else: when it short-circuits, nothing after plan runs
    assert up["gate"] == {"plan"}
    assert up["train_teacher"] == up["train_baseline"] == up["train_oracle"] == {"gate"}
    assert up["score_groups"] == {"plan", "gate"}
    assert set(dag.get_task("plan").get_flat_relative_ids(upstream=False)) == set(dag.task_ids) - {"plan"}
    assert set(dag.get_task("gate").get_flat_relative_ids(upstream=False)) == set(dag.task_ids) - {"plan", "gate"}
    assert up["score"] == {"score_groups", "train_teacher"}
    assert up["thresholds"] == {"score"}
    assert up["filter"] == {"thresholds", "score_groups"}
    assert up["select"] == {"filter"}
    assert up["materialize"] == {"select"}
    assert up["pretrain_student"] == {"materialize"}
    assert up["finetune_student"] == {"pretrain_student"}
    assert up["evaluate"] == {"finetune_student", "train_baseline", "train_oracle"}
    assert up["register"] == {"evaluate"}
    assert dag.get_task("register").max_active_tis_per_dag == 1  # one writer of the registry at a time

    stages = {t.task_id: getattr(t, "stage", None) for t in dag.tasks if t.task_id not in ("score", "filter")}
    assert stages["train_teacher"] == "train-teacher"
    assert stages["evaluate"] == "evaluate" and stages["register"] == "register"


def test_retrain_runs_on_new_drops_or_weekly(retrain_dag):
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable
    from semisup_drops import DROPS

    schedule = retrain_dag.timetable
    assert isinstance(schedule, AssetOrTimeSchedule)
    assert isinstance(schedule.timetable, CronTriggerTimetable)
    assert schedule.timetable.expression == "0 3 * * 1" and str(schedule.timetable.timezone) == "UTC"
    assert list(schedule.asset_condition.objects) == [DROPS]
    assert retrain_dag.catchup is False
    # the scheduled runs' gate: at least one image the champion has not seen (0 would retrain on nothing new)
    assert retrain_dag.params.get_param("min_new_images").value == 1


def test_gate_is_a_short_circuit_that_ignores_downstream_trigger_rules(retrain_dag):
    gate = retrain_dag.get_task("gate")
    assert gate.inherits_from_skipmixin and gate.ignore_downstream_trigger_rules is True
    assert gate.retries >= 1


def test_ingest_dag_is_daily_by_data_interval_and_emits_the_drops_asset(dagbag):
    from airflow.sdk import CronDataIntervalTimetable
    from semisup_drops import DROPS

    dag = dagbag.dags["semisup_ingest"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.expression == "0 0 * * *" and dag.catchup is False
    from airflow.serialization.encoders import coerce_to_core_timetable

    core = coerce_to_core_timetable(dag.timetable)  # what the scheduler and `airflow backfill create` see
    assert core.periodic  # backfill refuses a non-periodic schedule (DagNonPeriodicScheduleException)
    assert not core.partitioned  # partitioned events would not start semisup_retrain
    (task,) = dag.tasks
    assert task.task_id == "ingest" and task.outlets == [DROPS]
    assert set(dag.params.keys()) == {"store", "landing", "drop_prefix", "date"}


@pytest.mark.parametrize("name, bad", [("date", "2026-1-5"), ("drop_prefix", "a/b"), ("landing", "")])
def test_ingest_form_rejects_bad_values(dagbag, name, bad):
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dagbag.dags["semisup_ingest"].params)
    with pytest.raises(ParamValidationError):
        params[name] = bad


@pytest.mark.parametrize("task_id", ["score", "filter"])
def test_score_and_filter_are_mapped_over_the_plan_s_shard_group_indices(retrain_dag, task_id):
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    mapped = retrain_dag.get_task(task_id)
    assert isinstance(mapped, MappedOperator)
    assert mapped.partial_kwargs["stage"] == task_id
    if task_id == "score":
        assert mapped.partial_kwargs["max_active_tis_per_dagrun"] >= 1
    assert "task.group" in mapped.partial_kwargs["map_index_template"]
    (arg,) = mapped.expand_input.value.values()
    assert arg.operator.task_id == "score_groups" and arg.key == "return_value"


def test_report_link_only_on_evaluate(retrain_dag):
    names = {t.task_id: [link.name for link in t.operator_extra_links]
             for t in retrain_dag.tasks if t.task_id not in ("score", "filter")}
    assert names["evaluate"] == ["semisup report"]
    assert all(not v for k, v in names.items() if k != "evaluate")


def test_retrain_dag_serializes(retrain_dag):
    from airflow.serialization.serialized_objects import DagSerialization

    data = DagSerialization.serialize_dag(retrain_dag)
    ops = {t["__var"]["task_id"]: t["__var"] for t in data["tasks"]}
    assert ops["evaluate"]["_operator_extra_links"] == {"semisup report": "_link_SemisupReportLink"}
    restored = DagSerialization.deserialize_dag(data)
    assert set(restored.task_ids) == set(retrain_dag.task_ids)
