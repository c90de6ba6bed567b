"""
### semisup_ingest — register each day's drop of unlabeled images

Whatever lands under `<landing>/<YYYY-MM-DD>/` (a prefix inside the store, or a `file://` or `s3://`
URI: the `landing` param) becomes the drop `<drop_prefix><YYYY-MM-DD>`: images validated (corrupt ones
skipped and counted), sharded, manifest written last. Each run ingests the day of its logical date
(or the `date` param), so the schedule is one run per day after the day has ended, and the past is
ingested with a backfill:

    airflow backfill create --dag-id semisup_ingest --from-date 2026-01-01 --to-date 2026-01-31

A newly registered drop updates the asset **semisup-drops** with `extra = {drop_id, images, skipped,
date, store}`, which starts `semisup_retrain`. Ingesting a day twice changes nothing: the task is
*skipped* ("already registered") and emits no asset event. A day with nothing landed is skipped too.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, CronDataIntervalTimetable
from semisup_drops import ingest_params, ingest_task

with DAG(
    dag_id="semisup_ingest",
    description="Register each day's landed drop; emits semisup-drops asset events",
    # a data-interval timetable: a run's logical date is the day it ingests, and it runs once that day
    # is over. Not CronPartitionTimetable: Airflow 3.3 queues no non-partitioned DAG (semisup_retrain)
    # on an asset event that carries a partition key (AssetManager._queue_dagruns).
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    catchup=False,  # the past is ingested by backfill, on purpose, not by surprise
    params=ingest_params(),
    tags=["semisup"],
    doc_md=__doc__,
    default_args={"owner": "semisup", "retries": 2, "retry_delay": timedelta(seconds=30),
                  "execution_timeout": timedelta(hours=6)},
) as dag:
    ingest_task()
