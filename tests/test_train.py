"""Models and the training loop: every architecture builds and runs; the same seed gives the same weights."""

import numpy as np
import pytest
import torch

from semisup_tasks.config import ConfigError
from semisup_tasks.models import build_model, checkpoint_bytes, load_checkpoint
from semisup_tasks.train import Recipe, augment_batch, epoch_order, predict, prepare, train


def toy(n=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = np.zeros((n, 1, 16, 16), dtype=np.uint8)
    for i, c in enumerate(y):  # class = which third of the image is bright
        x[i, 0, :, c * 5:(c + 1) * 5] = 255
    return x, y


@pytest.mark.parametrize("arch", ["cnn_small", "resnet18", "mobilenet_v3_small"])
def test_architectures_build_for_small_grayscale_images(arch):
    model = build_model(arch, in_channels=1, num_classes=7, image_size=(28, 28))
    assert predict(model, np.zeros((3, 1, 28, 28), dtype=np.uint8)).shape == (3, 7)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="Unknown architecture 'vgg1'"):
        build_model("vgg1", 1, 2, (8, 8))


def test_training_learns_and_is_deterministic():
    x, y = toy()
    recipe = Recipe(epochs=8, lr=0.05, batch_size=16, augment="none", seed=3)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("cnn_small", 1, 3, (16, 16))
        summary = train(model, x, y, recipe)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert summary["steps"] == 8 * 4
    assert (predict(model, x).argmax(1).numpy() == y).mean() > 0.9


def test_balanced_sampling_draws_rare_classes_as_often():
    y = torch.zeros(1000, dtype=torch.int64)
    y[:50] = 1  # 5% of the samples in class 1
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([y[epoch_order(y, True, gen)] for _ in range(5)])
    assert 0.45 < drawn.float().mean() < 0.55
    plain = y[epoch_order(y, False, gen)]
    assert plain.float().mean() == pytest.approx(0.05)


def test_checkpoint_round_trip_uses_weights_only():
    model = build_model("cnn_small", 1, 3, (16, 16))
    data = checkpoint_bytes(model, "cnn_small", 1, 3, (16, 16))
    loaded, ckpt = load_checkpoint(data)
    x = np.random.default_rng(0).integers(0, 255, (4, 1, 16, 16), dtype=np.uint8)
    assert torch.allclose(predict(model, x), predict(loaded, x))
    assert ckpt["arch"] == "cnn_small"


def test_augmentation_keeps_shape_and_changes_pixels():
    x = prepare(torch.from_numpy(toy(8)[0]))
    out = augment_batch(x, "affine+flip", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    assert augment_batch(x, "none", torch.Generator()) is x


def test_weights_digest_depends_on_weights_only():
    from semisup_tasks.models import weights_digest

    torch.manual_seed(0)
    a = build_model("cnn_small", 1, 3, (16, 16))
    torch.manual_seed(0)
    b = build_model("cnn_small", 1, 3, (16, 16))
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.head[-1].bias[0] += 1e-6
    assert weights_digest(a) != weights_digest(b)


class _Planted:
    """What a tampered checkpoint carries: code that runs when it is unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    import io

    from semisup_tasks.config import ConfigError

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"arch": "cnn_small", "state_dict": {}, "payload": _Planted(str(marker))}, buf)
    with pytest.raises(ConfigError, match="holds more than weights .* and was refused"):
        load_checkpoint(buf.getvalue())
    assert not marker.exists()
    # the same bytes through plain pickle would have run it: the test's payload is real
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert marker.exists()
