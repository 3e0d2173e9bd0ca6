"""Numbers on the terminal are rounded to 4 significant digits (#12); MLflow keeps them whole."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tuning.display import short


@pytest.mark.parametrize(("value", "text"), [
    (0.0037829563842536234, "0.003783"), (0.34460365772247314, "0.3446"),
    ("0.0037829563842536234", "0.003783"), (1e-4, "0.0001"), (123456.7, "1.235e+05"),
    (128, "128"), ([128, 64], "[128, 64]"), ("median", "median"), ("relu", "relu"),
    (True, "True"), (None, "None"), (float("nan"), "nan"), ([0.123456, 2], "[0.1235, 2]"),
])
def test_short(value: object, text: str) -> None:
    assert short(value) == text


def test_the_sweep_summary_is_rounded(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.tune import print_summary
    from tuning.sweep import SweepResult

    result = SweepResult(
        parent_run_id="p", strategy="asha", reason="few long evaluations",
        best_overrides={"train.lr": 0.0037829563842536234, "model.hidden": [64]},
        best_value=0.34460365772247314,
        test_metrics={"test_loss": 0.35123456789, "test_accuracy": 0.8412345},
        trials=[{"trial_id": "a", "status": "finished", "epochs": 3,
                 "best_val_loss": 0.34460365772247314, "train.lr": "0.0037829563842536234",
                 "model.hidden": "[64]"}])
    spec = SimpleNamespace(tune=SimpleNamespace(metric="val_loss"),
                           tracking=SimpleNamespace(register_as=None))
    print_summary(spec, result)
    out = capsys.readouterr().out
    assert "best val_loss: 0.3446 with train.lr=0.003783, model.hidden=[64]" in out
    assert "test: test_loss=0.3512  test_accuracy=0.8412" in out
    assert "a      finished  3       0.3446         0.003783  [64]" in out, out
    assert "0.00378295" not in out and "0.344603" not in out
