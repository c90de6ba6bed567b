"""Scoring through DataLoader workers gives exactly what the model gives on decoded tensors."""

import numpy as np
import torch

from semisup_tasks.images import decode_table, encode_png, write_shards
from semisup_tasks.models import build_model
from semisup_tasks.score import score_shards, top_p
from semisup_tasks.store import Store
from semisup_tasks.train import predict


def test_worker_scoring_equals_direct_forward(tmp_path):
    store = Store.from_uri(f"file://{tmp_path}")
    rng = np.random.default_rng(0)
    rows = [(f"img-{i:03d}", encode_png(rng.integers(0, 255, (12, 12), dtype=np.uint8)), None) for i in range(70)]
    shards = [s.key for s in write_shards(store, "drops/x/shards", rows, shard_size=25)]  # 25, 25, 20
    torch.manual_seed(0)
    model = build_model("cnn_small", 1, 5, (12, 12))

    results = {}
    for workers in (0, 2):
        out = dict(score_shards(model, store, shards + shards[:1], p=3, channels=1, image_size=(12, 12),
                                batch_size=8, workers=workers, device="cpu"))  # a repeated key is scored once
        assert sorted(out) == sorted(shards)
        results[workers] = out
    for shard in shards:
        table = store.read_table(shard)
        classes, scores = top_p(predict(model, decode_table(table, 1, (12, 12))), 3)
        for workers in (0, 2):
            got = results[workers][shard]
            assert got.column("image_id").to_pylist() == np.repeat(table.column("image_id").to_pylist(), 3).tolist()
            assert got.column("cls").to_numpy().tolist() == classes.reshape(-1).tolist()
            np.testing.assert_allclose(got.column("score").to_numpy(), scores.reshape(-1), rtol=1e-5)
            assert set(got.column("shard").to_pylist()) == {shard}
