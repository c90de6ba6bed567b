"""The Airflow operator that runs one semisup stage (``python -m semisup_tasks stage NAME``).

A plain module on the ``plugins/`` folder (Airflow puts it on ``sys.path``); DAG files import it.
Operators are not registered through ``AirflowPlugin`` in Airflow 3.

Construction is cheap (no I/O, no torch). At run time the operator:

1. takes the DAG run's params, removes ``store`` and validates the rest as
   :class:`semisup_tasks.config.PipelineParams` (a bad value fails the task without retries);
2. runs the stage through a runner (``local`` now; ``docker``/``kubernetes`` later), streaming
   the stage's log lines into the task log;
3. returns the stage's small JSON result (XCom ``return_value``).

Exit status 2 from the stage (a user error: bad params, missing dataset) raises
``AirflowFailException`` (no retry); any other failure raises ``AirflowException`` (retried).

The score and filter stages are mapped over group indices: :func:`score_groups` turns the plan's
group count into ``[0, 1, ...]`` (Airflow 3.3 cannot map over a custom XCom key, and the shard keys
themselves stay in the store, since at scale they would be far too big for XCom).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import BaseOperator, BaseOperatorLink, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException


def _ensure_semisup_tasks_importable() -> None:
    """Fall back to the repository root (``plugins/..``) when semisup isn't installed."""
    try:
        import semisup_tasks.config  # noqa: F401
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent
        if (root / "semisup_tasks").is_dir() and str(root) not in sys.path:
            sys.path.insert(0, str(root))


_ensure_semisup_tasks_importable()

from semisup_runners import (  # noqa: E402
    StageFailed,
    StageRequest,
    StageRunner,
    StageUserError,
    check_runner,
    get_runner,
    resolve_store,
)

from semisup_tasks.config import ConfigError, PipelineParams  # noqa: E402

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

STORE_PARAM = "store"
REPORT_TASK_STAGE = "evaluate"
#: Label mapped score tasks by their shard group in the UI (pass to ``.partial(map_index_template=...)``).
GROUP_MAP_INDEX_TEMPLATE = "shard group {{ task.group }}"
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


class SemisupReportLink(BaseOperatorLink):
    """"semisup report": opens the run's report, served by the ``semisup`` plugin's view.

    Airflow 3 computes links defined on an operator on the worker when the task finishes and
    stores them in XCom; the API server only reads them back. The view looks up the report URI
    in the task's result document (``return_value["report"]``) and serves it from the store.
    """

    name = "semisup report"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk import conf

        base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
        return report_view_path(base, ti_key.dag_id, ti_key.run_id, ti_key.task_id)


def report_view_path(base: str, dag_id: str, run_id: str, task_id: str) -> str:
    q = lambda s: quote(s, safe="")  # noqa: E731
    return f"{base}/semisup/dags/{q(dag_id)}/runs/{q(run_id)}/tasks/{q(task_id)}/report"


class SemisupStageOperator(BaseOperator):
    """Run one semisup pipeline stage and return its result document.

    :param stage: stage name, e.g. ``plan``, ``train-teacher``, ``score``, ``evaluate``.
    :param shards: shard keys for the ``score`` stage.
    :param group: index of one of the plan's shard groups for the ``score`` and ``filter`` stages (mappable:
        ``SemisupStageOperator.partial(...).expand(group=score_groups(plan.output))``).
    :param store: store root URI; defaults to the DAG run's ``store`` param. A relative
        ``file://`` URI is made absolute against the worker's working directory.
    :param processes: for a training stage, data-parallel processes under torchrun (one per GPU).
    :param runner: where the stage runs: ``local`` (a subprocess of the worker). Docker and
        Kubernetes have operators of their own (``semisup_containers``); ``semisup_deployment.stage_task``
        picks the one a deployment is configured for.
    """

    template_fields = ("shards", "group", "store")
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        stage: str,
        shards: list[str] | None = None,
        group: int | None = None,
        store: str | None = None,
        runner: str = "local",
        processes: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_stage_name(stage)
        check_runner(runner)
        self.stage = stage
        self.shards = shards
        self.group = group
        self.store = store
        self.runner = runner
        self.processes = processes
        self._active_runner: StageRunner | None = None

    @property
    def operator_extra_links(self):  # type: ignore[override]
        # Only the evaluate task has a report; mapped operators (score, filter) have no `stage` here.
        if getattr(self, "stage", None) == REPORT_TASK_STAGE:
            return (SemisupReportLink(),)
        return ()

    def build_request(self, context: Context) -> StageRequest:
        return stage_request(self.stage, self.shards, self.group, self.store, context, self.processes)

    # -- Airflow hooks -------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        request = self.build_request(context)
        self.log.info("Stage %s, store %s, run %s, runner %s%s%s", request.stage, request.store,
                      request.run_id, self.runner, f", shards {request.shards}" if request.shards else "",
                      f", shard group {request.group}" if request.group is not None else "")
        self._active_runner = get_runner(self.runner)
        try:
            result = self._active_runner.run(request, self.log)
        except StageUserError as exc:
            raise AirflowFailException(f"Stage {self.stage} refused its input: {exc}") from None
        except StageFailed as exc:
            raise AirflowException(str(exc)) from None
        finally:
            self._active_runner = None
        self.log.info("Stage %s result keys: %s", self.stage, ", ".join(sorted(result)))
        return result

    def on_kill(self) -> None:
        if self._active_runner is not None:
            self._active_runner.kill()


def stage_request(stage: str, shards: Any, group: Any, store: str | None, context: Context,
                  processes: int = 1) -> StageRequest:
    """The request every runner executes: the DAG run's params (``store`` removed) validated as
    PipelineParams (a bad value fails the task without retries), the store and the run id."""
    params = {key: context["params"][key] for key in context["params"]}
    store = store or params.get(STORE_PARAM)
    params.pop(STORE_PARAM, None)
    if not store:
        raise AirflowFailException(f"No store for stage {stage}: set the DAG param '{STORE_PARAM}' or the "
                                   "operator's store=.")
    try:
        pipeline = PipelineParams.from_dict(params)
    except ConfigError as exc:
        raise AirflowFailException(f"Bad pipeline parameters: {exc}") from None
    return StageRequest(stage=stage, store=resolve_store(str(store)), run_id=context["run_id"],
                        params=pipeline.to_dict(),
                        shards=None if shards is None else [str(s) for s in _as_list(shards)],
                        group=None if group is None else int(group), processes=int(processes))


def check_stage_name(stage: Any) -> None:
    if not isinstance(stage, str) or not _STAGE_NAME.match(stage):
        raise ValueError(f"Stage name {stage!r} is not valid; use a name like 'train-teacher'.")


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@task(task_id="score_groups")
def score_groups(plan_result: dict[str, Any]) -> list[int]:
    """``[0, 1, ..., n-1]`` for the plan's n shard groups, so ``score`` can be mapped over them."""
    count = plan_result.get("score_groups") if isinstance(plan_result, dict) else None
    if not isinstance(count, int) or count < 0:
        raise AirflowFailException("The plan result has no 'score_groups' count.")
    return list(range(count))
