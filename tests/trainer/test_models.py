"""trainer.models: every activation, output shapes, seeded He/Xavier init, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from jobs.spec import SpecError, validate_spec
from trainer.config import KINDS, POOLS, ModelSpec
from trainer.models import ACTIVATIONS, Sign, build_model, predict, predict_proba

ROOT = Path(__file__).resolve().parents[2]


def mlp(hidden: list[int] | None = None, activation: str = "relu",
        dropout: float = 0.0) -> ModelSpec:
    return ModelSpec(kind="mlp", hidden=[16, 8] if hidden is None else hidden,
                           activation=activation, dropout=dropout)


def cnn(channels: list[int] | None = None, hidden: list[int] | None = None,
        pool: str = "max", activation: str = "relu") -> ModelSpec:
    return ModelSpec(kind="cnn", channels=[4, 8] if channels is None else channels,
                           hidden=[16] if hidden is None else hidden, activation=activation,
                           dropout=0.1, kernel_size=3, pool=pool)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_builds_and_runs(activation: str) -> None:
    net = build_model(mlp(activation=activation), (5,), 3, seed=0)
    out = net(torch.randn(7, 5))
    assert out.shape == (7, 3)
    assert torch.isfinite(out).all()
    image_net = build_model(cnn(activation=activation), (1, 8, 8), 4, seed=0)
    assert image_net(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_mlp_layout_and_shapes() -> None:
    net = build_model(mlp([16, 8], dropout=0.2), (5,), 1, seed=0)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert net(torch.randn(4, 5)).shape == (4, 1)  # regression: one output
    assert build_model(mlp([16, 8]), (5,), 2, seed=0)(torch.randn(4, 5)).shape == (4, 2)


def test_no_hidden_layer_is_a_single_linear_map() -> None:
    net = build_model(mlp([]), (5,), 2, seed=0)
    assert [type(m) for m in net] == [nn.Linear]
    assert sum(p.numel() for p in net.parameters()) == 5 * 2 + 2


def test_cnn_shapes_and_pooling_stops_at_size_one() -> None:
    net = build_model(cnn([4, 8]), (1, 8, 8), 10, seed=0)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    head = [m for m in net if isinstance(m, nn.Linear)][0]
    assert head.in_features == 8 * 2 * 2  # 8x8 -> 4x4 -> 2x2
    deep = build_model(cnn([2, 2, 2, 2, 2], hidden=[], pool="avg"), (8, 8), 3, seed=0)
    assert sum(isinstance(m, nn.AvgPool2d) for m in deep) == 3  # 8 -> 4 -> 2 -> 1, then none
    assert deep(torch.randn(2, 8, 8)).shape == (2, 3)  # (N, H, W): one channel added
    flat = build_model(cnn([4], pool="none"), (3, 5, 5), 2, seed=0)
    assert [m for m in flat if isinstance(m, nn.Linear)][0].in_features == 4 * 5 * 5


def test_mlp_flattens_images() -> None:
    net = build_model(mlp([8]), (1, 8, 8), 10, seed=0)
    assert isinstance(net[0], nn.Flatten)
    assert net[1].in_features == 64
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_seeded_init_is_identical_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model(cnn(), (1, 8, 8), 10, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(cnn(), (1, 8, 8), 10, seed=7)
    c = build_model(cnn(), (1, 8, 8), 10, seed=8)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(),
                                  c.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
        if name.endswith("weight"):
            assert not torch.equal(pa, pc), name


def _first_weight_std(activation: str, n: int = 400) -> float:
    net = build_model(mlp([n], activation=activation), (n,), 2, seed=0)
    return float(net[0].weight.detach().std())


def test_he_and_xavier_init_statistics() -> None:
    n = 400  # square layer: He std = sqrt(2 / n), Xavier std = sqrt(2 / (n + n)) = sqrt(1 / n)
    for activation in ("relu", "softplus"):
        assert _first_weight_std(activation, n) == pytest.approx((2 / n) ** 0.5, rel=0.03)
    assert _first_weight_std("leaky_relu", n) == pytest.approx(
        (2 / (1 + 0.01**2) / n) ** 0.5, rel=0.03)
    for activation in ("tanh", "sigmoid", "sign"):
        assert _first_weight_std(activation, n) == pytest.approx((1 / n) ** 0.5, rel=0.03)
    ratio = _first_weight_std("relu", n) / _first_weight_std("tanh", n)
    assert ratio == pytest.approx(2**0.5, rel=0.05)
    net = build_model(cnn(), (1, 8, 8), 10, seed=0)
    layers = [m for m in net if isinstance(m, nn.Linear | nn.Conv2d)]
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in layers)


def test_sign_has_zero_gradient() -> None:
    x = torch.randn(10, requires_grad=True)
    Sign()(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) == 0.0


def test_cnn_on_a_table_is_refused_with_the_spec_key() -> None:
    with pytest.raises(ValueError) as err:
        build_model(cnn(), (104,), 2, seed=0)
    assert str(err.value) == (
        "model.kind: cnn needs image data (an .npz with x of shape (N, H, W) or (N, C, H, W)); "
        "this table has 104 features: use mlp")


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("activation", "gelu", ACTIVATIONS), ("kind", "rnn", KINDS), ("pool", "median", POOLS),
])
def test_bad_values_name_the_key(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """A bad choice is refused once, by the spec, with every value the model can build."""
    with pytest.raises(SpecError) as err:
        validate_spec({"name": "t", "data": {"path": "t.csv"}, "model": {key: value}}, None)
    choices = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
    assert str(err.value) == f"model.{key}: Input should be {choices}; got {value!r}"
    for name in allowed:  # and each allowed value builds
        spec = ModelSpec(**{"kind": "cnn", key: name})
        assert build_model(spec, (1, 8, 8), 2, seed=0)(torch.randn(2, 1, 8, 8)).shape == (2, 2)


def test_predict_and_predict_proba() -> None:
    net = build_model(mlp([8]), (5,), 3, seed=0)
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    proba = predict_proba(net, x)
    assert proba.shape == (20, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(predict(net, x), proba.argmax(1))
    reg = build_model(mlp([8]), (5,), 1, seed=0)
    raw = reg(torch.as_tensor(x)).detach().numpy()[:, 0]
    np.testing.assert_allclose(predict(reg, x, y_mean=10.0, y_scale=2.0), raw * 2 + 10, rtol=1e-5)


def test_trainer_imports_without_ray_and_mlflow() -> None:
    code = ("import sys; sys.modules['ray'] = None; sys.modules['mlflow'] = None\n"
            "import trainer.models, trainer.loop, trainer.metrics, trainer.checkpoint\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_digits_example_spec_loads_and_builds_a_cnn() -> None:
    from jobs.spec import load_spec

    spec = load_spec(ROOT / "examples" / "digits.yaml")
    assert (spec.name, spec.data.task, spec.model.kind) == ("digits", "classification", "cnn")
    path = Path(spec.data.path)
    assert path == ROOT / "data" / "digits" / "digits.npz" and path.is_file()
    with np.load(path, allow_pickle=False) as npz:
        x, y = npz["x"], npz["y"]
    assert x.shape == (1797, 8, 8) and y.shape == (1797,) and sorted(set(y.tolist())) == list(
        range(10))
    net = build_model(spec.model, (1, 8, 8), 10, seed=spec.train.seed)
    assert net(torch.as_tensor(x[:5, None], dtype=torch.float32)).shape == (5, 10)
