"""Data-parallel training: two CPU processes under torchrun (gloo) follow the one-process run with
the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_train_script.py"


def run(cmd: list[str], tmp_path: Path, expect_failure: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode != 0) == expect_failure, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stderr


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run([sys.executable, str(SCRIPT), str(tmp_path / "one.pt")], tmp_path)
    run([torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPT), str(tmp_path / "two.pt")], tmp_path)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert two["summary"]["processes"] == 2 and "processes" not in one["summary"]
    assert one["summary"]["steps"] == two["summary"]["steps"] == 9
    assert abs(one["summary"]["final_loss"] - two["summary"]["final_loss"]) < 1e-4
    assert one["state"].keys() == two["state"].keys()
    for key, value in one["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(two["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(two["state"][key], value), key
    # training moved the weights: the comparison is not between two untouched models
    torch.manual_seed(7)
    from semisup_tasks.models import build_model

    fresh = build_model("cnn_small", 1, 3, (12, 12)).state_dict()
    assert any(not torch.allclose(fresh[k], v) for k, v in one["state"].items() if v.is_floating_point())

    # with dropout on, uninterrupted; then rank 0 dies after its 3rd save (epoch 2, batch 1 of 3: mid-epoch)
    # and both processes resume from it, each with its own RNG state
    run([torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPT), str(tmp_path / "whole.pt"),
         str(tmp_path / "whole-checkpoints")], tmp_path)
    ckpt = tmp_path / "checkpoints"
    run([torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPT), str(tmp_path / "dead.pt"), str(ckpt), "3"],
        tmp_path, expect_failure=True)
    assert (ckpt / "ddp-test.pt").exists() and not (tmp_path / "dead.pt").exists()
    log = run([torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPT), str(tmp_path / "resumed.pt"),
               str(ckpt)], tmp_path)
    assert "resuming at step 4 of 9 (epoch 2, batch 1)" in log
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["summary"] == whole["summary"]
    assert all(torch.equal(resumed["state"][k], v) for k, v in whole["state"].items())
    assert any(not torch.equal(whole["state"][k], v) for k, v in two["state"].items())  # dropout was on


def test_a_training_stage_under_torchrun_writes_once_from_rank_0(tmp_path):
    import json

    from test_stages import make_tiny, params

    from semisup_tasks.stages import run_stage
    from semisup_tasks.store import Store

    store = Store.from_uri(f"file://{tmp_path}/store")
    make_tiny(store)
    p = params(teacher_epochs=2)
    run_stage("plan", store, "ddp", p)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "result.json"
    run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "semisup_tasks", "stage", "train-teacher",
         "--store", store.uri, "--run-id", "ddp", "--params-json", json.dumps(p), "--result-file", str(out)],
        tmp_path)
    result = json.loads(out.read_text())
    assert result["train"]["processes"] == 2 and result["val_top1"] is not None
    manifest = store.read_json("runs/ddp/teacher/_SUCCESS.json")
    assert manifest["result"] == result  # rank 0's result, recorded once
    assert store.exists("runs/ddp/teacher/model.pt")
