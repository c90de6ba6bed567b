"""Selection benchmark: semisup's streaming exact top-K vs DuckDB and pandas, same Parquet input.

    python benchmarks/bench_select.py --rows 10_000_000          # C=1000, P=10, K=1000 by default
    python benchmarks/bench_select.py --rows 100_000_000 --keep /tmp/preds

Writes synthetic top-P predictions (image ids as strings, scores crowded near 1.0 for the top
class) as Parquet files, then runs each method in its own process so its peak RSS is its own:
``read`` (pyarrow reads the three columns: the floor), ``semisup`` (semisup_tasks.select.select,
one file at a time), ``sharded`` (the DAG's map -> reduce -> map -> reduce: a histogram per file,
the thresholds, a filter per file, then select over the candidates; run serially here, its
per-phase times show what the mapped tasks would share), ``duckdb`` (QUALIFY row_number() ... <= K)
and ``pandas`` (sort, then head per group). Every method's selection is checked equal to
semisup's. Prints rows/s, seconds, peak RSS and ratios against DuckDB measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COLUMNS = ["image_id", "cls", "score"]


def generate(folder: Path, rows: int, classes: int, p: int, rows_per_file: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    images_per_file = max(1, rows_per_file // p)
    files, image = [], 0
    while image * p < rows:
        n = min(images_per_file, rows // p - image)
        base = rng.integers(0, classes, n)
        step = rng.integers(1, max(2, classes // p), n)  # j*step < classes: P distinct classes per image
        cls = ((base[:, None] + np.arange(p)[None, :] * step[:, None]) % classes).astype(np.int32)
        raw = rng.exponential(size=(n, p)) ** 4  # one dominant class: top scores crowd near 1.0
        score = -np.sort(-(raw / raw.sum(axis=1, keepdims=True)), axis=1).astype(np.float32)
        ids = np.char.add("img-", np.arange(image, image + n).astype("U10"))
        table = pa.table({"image_id": pa.array(np.repeat(ids, p)), "cls": cls.reshape(-1),
                          "score": score.reshape(-1)})
        path = folder / f"part-{len(files):05d}.parquet"
        pq.write_table(table, path)
        files.append(path)
        image += n
    return files


def run_method(method: str, folder: Path, k: int, out: Path) -> dict:
    files = sorted(folder.glob("part-*.parquet"))
    start = time.perf_counter()
    extra: dict = {}
    if method == "read":
        rows = sum(pq.read_table(f, columns=COLUMNS).num_rows for f in files)
        result = None
    elif method == "semisup":
        from semisup_tasks.select import select

        result, counts = select((pq.read_table(f, columns=COLUMNS) for f in files), k)
        rows = counts["rows_scored"]
    elif method == "sharded":
        from semisup_tasks.select import histogram, keep_candidates, select, thresholds

        phases = {}
        t = time.perf_counter()
        hist_files = []
        for f in files:  # as each mapped score task does: one histogram object per group
            hist_files.append(folder / f"hist-{f.stem}.parquet")
            pq.write_table(histogram([pq.read_table(f, columns=["cls", "score"])]), hist_files[-1])
        phases["map: histograms"] = time.perf_counter() - t
        t = time.perf_counter()
        classes = max(int(pq.read_table(h, columns=["cls"]).column("cls").to_numpy().max()) for h in hist_files) + 1
        cut = thresholds(lambda: (pq.read_table(h) for h in hist_files), k, classes)
        phases["reduce: thresholds"] = time.perf_counter() - t
        t = time.perf_counter()
        candidates = [keep_candidates(pq.read_table(f, columns=COLUMNS), cut["threshold_bin"]) for f in files]
        phases["map: filter"] = time.perf_counter() - t
        t = time.perf_counter()
        result, _ = select(candidates, k)
        phases["reduce: select"] = time.perf_counter() - t
        rows = sum(cut["rows"])
        extra = {"phases": phases, "candidates": sum(c.num_rows for c in candidates)}
    elif method == "duckdb":
        import duckdb

        con = duckdb.connect()
        result = con.sql(
            f"SELECT image_id, cls, score FROM read_parquet('{folder}/part-*.parquet') "
            f"QUALIFY row_number() OVER (PARTITION BY cls ORDER BY score DESC, image_id) <= {k} "
            "ORDER BY cls, score DESC, image_id").to_arrow_table()
        rows = con.execute(f"SELECT count(*) FROM read_parquet('{folder}/part-*.parquet')").fetchone()[0]
    elif method == "pandas":
        import pandas as pd

        df = pd.concat([pq.read_table(f, columns=COLUMNS).to_pandas() for f in files], ignore_index=True)
        rows = len(df)
        df = df.sort_values(["cls", "score", "image_id"], ascending=[True, False, True], kind="stable")
        result = pa.Table.from_pandas(df.groupby("cls", sort=False).head(k), preserve_index=False)
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - start
    if result is not None:
        pq.write_table(result.select(COLUMNS).cast(pa.schema([("image_id", pa.string()), ("cls", pa.int32()),
                                                              ("score", pa.float32())])), out)
    return {"method": method, "rows": int(rows), "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=lambda s: int(float(s.replace("_", ""))), default=10_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("-p", type=int, default=10)
    ap.add_argument("-k", type=int, default=1000)
    ap.add_argument("--rows-per-file", type=int, default=2_000_000)
    ap.add_argument("--methods", default="read,semisup,sharded,duckdb,pandas")
    ap.add_argument("--keep", default=None, help="folder for the generated input (kept and reused)")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_method(args.child[0], Path(args.child[1]), args.k, Path(args.child[2]))))
        return

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-select-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if not list(folder.glob("part-*.parquet")):
            t = time.perf_counter()
            files = generate(folder, args.rows, args.classes, args.p, args.rows_per_file, seed=0)
            print(f"generated {args.rows:,} rows in {len(files)} files in {time.perf_counter() - t:.1f} s",
                  flush=True)
        results = {}
        for method in args.methods.split(","):
            out = folder / f"result-{method}.parquet"
            proc = subprocess.run([sys.executable, __file__, "-k", str(args.k), "--child", method, str(folder),
                                   str(out)], capture_output=True, text=True, check=True)
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[method]
            print(f"{method:8s} {r['seconds']:8.2f} s  {r['rows'] / r['seconds'] / 1e6:8.1f} M rows/s  "
                  f"peak RSS {r['peak_rss_mib']:8.0f} MiB", flush=True)
            for phase, seconds in r.get("phases", {}).items():
                print(f"    {phase:20s} {seconds:8.2f} s", flush=True)
            if "candidates" in r:
                print(f"    candidates {r['candidates']:,} of {r['rows']:,} rows "
                      f"({r['candidates'] / r['rows']:.2%})", flush=True)
        reference = folder / "result-semisup.parquet"
        for method in results:
            if method not in ("read", "semisup") and reference.exists():
                same = pq.read_table(reference).equals(pq.read_table(folder / f"result-{method}.parquet"))
                print(f"{method} output equals semisup's: {same}")
                if not same:
                    raise SystemExit(f"{method} and semisup disagree")
        if "duckdb" in results:
            base = results["duckdb"]
            for method, r in results.items():
                print(f"ratio vs duckdb  {method:8s} throughput x{base['seconds'] / r['seconds']:.2f}  "
                      f"peak RSS x{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
