"""
### semisup_retrain — teacher/student semi-supervised retraining

The pipeline of Yalniz et al., *Billion-scale semi-supervised learning for image
classification* (2019), over the object store given by the `store` param:

1. **plan** — resolve the labeled dataset version and the unlabeled drops (`drops`, `drops_last`,
   `drops_since`); split the drop shards into groups (`shards_per_task` shards each, at most
   `max_score_tasks` groups); count the images the champion was not trained on.
   **gate** — with fewer than `min_new_images` such images every later task is *skipped* and the run
   ends in success; the gate's log says why. `min_new_images=0` always runs.
2. **train_teacher** — train the teacher on the labeled set. In parallel **train_baseline**
   (the student architecture on labeled data only) and **train_oracle** (the student on the
   pool's true labels, when the store has them).
3. **score** — one mapped task per shard group: the teacher keeps each image's top-`p` classes
   and scores (cached by teacher weights and shard content, so later runs reuse them).
   Each also counts its rows per (class, score bin): the map step of the selection.
4. **thresholds** — sums the histograms: per class, the worst score bin that can still hold
   one of its `k` best rows. **filter** — one mapped task per shard group keeps only the rows
   at or above their class's threshold. **select** — the exact `k` best per class among those
   candidates (ties: score desc, image id asc).
5. **materialize** — the selected images decoded once into shuffled training parts; then
   **pretrain_student** streams them, then **finetune_student** on the labeled set.
6. **evaluate** — top-1/top-5, per-class and head/tail recall for teacher, baseline, student
   and oracle; the *semisup report* link on this task opens the run's report.
7. **register** — the student becomes a new version in the model registry (`models/<dataset>/`)
   with its model card; it replaces the champion only when its validation top-1 beats the
   champion's by more than `promotion_margin`, and the task's result says why either way.
   With `teacher=champion` the next run starts from the champion: the method, iterated.

Each task runs `python -m semisup_tasks stage NAME` where this deployment runs that stage (a
subprocess of the worker, a Docker container or a Kubernetes pod: `SEMISUP_RUNNER` or the file
named by `SEMISUP_DEPLOYMENT`, read when the DAG is parsed) and passes only a small JSON result through
XCom; the stages find each other's outputs under `runs/<run_id>/` in the store. A bad param or a
missing dataset fails the task at once (no retries); other errors are retried.
Runs when `semisup_ingest` registers a new drop (the **semisup-drops** asset) or weekly (Monday
03:00 UTC), whichever comes first. Trigger by hand with the form, or
`airflow dags trigger semisup_retrain -c '{"k": 100, "min_new_images": 0}'`.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable
from semisup_deployment import load_deployment, mapped_stage_task, stage_task
from semisup_drops import DROPS, gate_task
from semisup_operator import score_groups
from semisup_params import pipeline_params

SCORE_PARALLELISM = int(os.environ.get("SEMISUP_SCORE_PARALLELISM", "4"))
# where each stage runs (local subprocess, Docker or Kubernetes): this deployment's environment
DEPLOYMENT = load_deployment()
# scheduled runs (a new drop, the weekly tick) retrain only on this many images the champion has not seen
MIN_NEW_IMAGES = int(os.environ.get("SEMISUP_MIN_NEW_IMAGES", "1"))

with DAG(
    dag_id="semisup_retrain",
    description="Teacher/student semi-supervised retraining (Yalniz et al. 2019)",
    # on new drops or weekly, whichever comes first; each asset-triggered run takes all events queued meanwhile
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"), assets=[DROPS]),
    catchup=False,
    max_active_runs=1,
    params=pipeline_params(defaults={"min_new_images": MIN_NEW_IMAGES}),
    tags=["semisup"],
    doc_md=__doc__,
    default_args={
        "owner": "semisup",
        "retries": 2,
        "retry_delay": timedelta(seconds=15),
        "execution_timeout": timedelta(hours=24),
    },
) as dag:
    plan = stage_task("plan", "plan", DEPLOYMENT)
    gate = gate_task(plan.output)  # too few new images: everything after it is skipped, the run succeeds
    teacher = stage_task("train_teacher", "train-teacher", DEPLOYMENT)
    baseline = stage_task("train_baseline", "train-baseline", DEPLOYMENT)
    oracle = stage_task("train_oracle", "train-oracle", DEPLOYMENT)
    # one mapped task per shard group; the groups' shard keys stay in the store, not in XCom
    groups = score_groups(plan.output)
    score = mapped_stage_task("score", "score", groups, DEPLOYMENT, max_active_tis_per_dagrun=SCORE_PARALLELISM)
    # selection as map -> reduce -> map -> reduce: the passes over every row run in parallel tasks
    thresholds = stage_task("thresholds", "thresholds", DEPLOYMENT)
    filter_ = mapped_stage_task("filter", "filter", groups, DEPLOYMENT)
    select = stage_task("select", "select", DEPLOYMENT)
    materialize = stage_task("materialize", "materialize", DEPLOYMENT)
    pretrain = stage_task("pretrain_student", "pretrain-student", DEPLOYMENT)
    finetune = stage_task("finetune_student", "finetune-student", DEPLOYMENT)
    evaluate = stage_task("evaluate", "evaluate", DEPLOYMENT)
    # one registering task at a time across runs: version numbers and the champion pointer have one writer
    register = stage_task("register", "register", DEPLOYMENT, max_active_tis_per_dag=1)

    gate >> [teacher, baseline, oracle, groups]
    teacher >> score >> thresholds >> filter_ >> select >> materialize >> pretrain >> finetune >> evaluate
    [baseline, oracle] >> evaluate >> register
