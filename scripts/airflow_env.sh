# Source me from the repository root: `. scripts/airflow_env.sh` (POSIX sh, bash, zsh).
# Points a local Airflow 3 at this checkout: own AIRFLOW_HOME (SQLite, LocalExecutor),
# dags/ and plugins/, no example DAGs, and semisup_tasks importable without installing it.
if [ -n "${BASH_SOURCE:-}" ]; then
  _semisup_root="$(cd "$(dirname "$BASH_SOURCE")/.." && pwd)"
else
  _semisup_root="$PWD"
fi

export AIRFLOW_HOME="${AIRFLOW_HOME:-$PWD/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$_semisup_root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$_semisup_root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-False}"
# the "DAG parsing" timeout must cover importing semisup_tasks.config on a slow machine
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="${AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT:-120}"
unset AIRFLOW__CORE__UNIT_TEST_MODE
case ":${PYTHONPATH:-}:" in
  *":$_semisup_root:"*) ;;
  *) export PYTHONPATH="$_semisup_root${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
mkdir -p "$AIRFLOW_HOME"
unset _semisup_root
