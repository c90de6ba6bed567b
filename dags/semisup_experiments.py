"""
### semisup_experiments — the paper's study in miniature, on your data

Maps a grid of pipeline configurations over the same labeled dataset and drops, each with several
seeds, and aggregates them into mean ± std per setting, one plot per study and `REPRODUCTION.md`
(the paper's findings and six recommendations: claim, our measurement, verdict), all under
`experiments/<experiment>/` in the store.

1. **prepare** — expands the grid (`grid`: `default`, `ci` or a grid object) into shared models and
   cells; writes the pool-fraction drops (and, on the demo, simulated weak labels and the shapes
   transfer target).
2. **shared_model** — one mapped task per teacher (architecture × seed × teacher recipe), baseline
   and oracle: trained once, adopted by every cell that uses them, so cells also share the teacher's
   cached scores.
3. **cell** — one mapped task per (setting, seed): the pipeline's own stages (score, thresholds,
   filter, select, materialize, pre-train, fine-tune, evaluate) in run `exp-<experiment>-<cell>`.
   A setting that selects nothing is recorded as failed, not retried.
4. **transfer** — per seed, the base student, the baseline and a fresh model fine-tuned on another task.
5. **aggregate** — `results.json`, `plots/*.png`, `REPRODUCTION.md` (also when the grid has no transfer).

`grid` is a named grid or your own as a JSON object (a file path is refused: it would read the
worker's files). The same `experiment` id resumes: finished shared models and cells are read back,
not rerun. On 2 CPU cores the default grid takes about an hour; `SEMISUP_EXPERIMENTS_QUEUE` sends
the training tasks to GPU workers and `SEMISUP_EXPERIMENTS_PARALLELISM` runs that many at once.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG
from semisup_study import aggregate, cell, experiment_params, ids, prepare, shared_model, transfer

with DAG(
    dag_id="semisup_experiments",
    description="The paper's study in miniature: K, P, pool size, teacher, fine-tuning, selection policy",
    schedule=None,
    catchup=False,
    params=experiment_params(),
    tags=["semisup"],
    doc_md=__doc__,
    default_args={"owner": "semisup", "retries": 1, "retry_delay": timedelta(seconds=15),
                  "execution_timeout": timedelta(hours=12)},
) as dag:
    prepared = prepare()
    shared = shared_model.expand(job=ids.override(task_id="shared_ids")(prepared, "shared"))
    cells = cell.expand(cell=ids.override(task_id="cell_ids")(prepared, "cells"))
    transfers = transfer.expand(seed=ids.override(task_id="transfer_seeds")(prepared, "transfer"))
    shared >> cells >> transfers >> aggregate()
