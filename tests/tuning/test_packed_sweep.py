"""tune.pack: packed sweeps give the trials unpacked sweeps give, in Tune and in MLflow."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from jobs.spec import load_spec
from tests.conftest import EXAMPLES
from trainer.config import SpecError
from tuning.packed_trial import AUTO_SIZE, CPU_AUTO_SIZE, pack_size
from tuning.sweep import run_sweep

SPACE = {"train.lr": {"loguniform": [1e-3, 3e-2]}, "model.dropout": {"uniform": [0.0, 0.3]},
         "train.seed": {"choice": [0, 1, 2]}}


def spec_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str | None,
            **overrides: Any) -> Any:
    monkeypatch.setenv("RUNGWISE_STORAGE", str(tmp_path / "runs"))
    base = {"train.epochs": 3, "train.early_stopping": None, "tune.num_samples": 4,
            "tune.max_concurrent": 1, "tune.search": "random", "tune.space": SPACE,
            "tracking.uri": uri, "tracking.register_as": None, "model.hidden": [16],
            "train.batch_size": 256}
    return load_spec(EXAMPLES / "adult.yaml").with_overrides({**base, **overrides})


def children(uri: str, parent: str) -> list[Any]:
    cl = MlflowClient(uri)
    exp = cl.get_run(parent).info.experiment_id
    return list(cl.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'",
                               max_results=100))


def trials(uri: str, parent: str) -> dict[tuple[str, ...], Any]:
    """The sweep's child runs by their searched values (distinct in these sweeps)."""
    kids = children(uri, parent)
    by_params = {tuple(sorted(k.data.params.items())): k for k in kids}
    assert len(by_params) == len(kids)
    return by_params


def history(uri: str, run: Any, key: str = "val_loss") -> list[float]:
    return [m.value for m in MlflowClient(uri).get_metric_history(run.info.run_id, key)]


def test_pack_settings_are_checked_with_one_line_naming_tune_pack() -> None:
    for value in (1, "sometimes", True):
        with pytest.raises(SpecError, match=r"^tune.pack: must be off, auto or a whole number"):
            load_spec(EXAMPLES / "adult.yaml", {"tune.pack": value})
    cases = {"model.kind": "cnn", "resources.workers_per_trial": 2, "tune.search": "pbt"}
    for key, value in cases.items():
        with pytest.raises(SpecError, match=r"^tune.pack: 4 .*(cnn|workers_per_trial|pauses)"):
            load_spec(EXAMPLES / "adult.yaml", {"tune.pack": 4, key: value})
    assert load_spec(EXAMPLES / "adult.yaml", {"tune.pack": False}).tune.pack == "off"


def test_auto_packs_only_where_pack_pays_for_every_model_of_the_space() -> None:
    def size(**kw: Any) -> int:
        return pack_size(load_spec(EXAMPLES / "adult.yaml", {"tune.pack": "auto", **kw}))

    small = {"model.hidden": {"choice": [[32], [64]]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}
    gpu = {"train.device": "cuda"}
    assert size(**{"tune.space": small, "train.batch_size": 128, **gpu}) == AUTO_SIZE
    # on a CPU, only where whole sweeps measured faster packed (bench_pack_sweep.py): small
    # models, enough trials x epochs x rows, every trial running its whole budget
    def cpu(rows: int | None = 22_792, **kw: Any) -> int:
        over = {"tune.space": small, "train.batch_size": 128, "train.device": "cpu",
                "train.early_stopping": None, "tune.search": "random", "tune.num_samples": 32,
                "train.epochs": 20, **kw}
        return pack_size(load_spec(EXAMPLES / "adult.yaml", {"tune.pack": "auto", **over}),
                         rows)

    assert cpu() == CPU_AUTO_SIZE  # 32 x 20 x adult: measured 1.54x / 1.12x
    assert cpu(rows=None) == 1  # the work is not known
    assert cpu(**{"tune.num_samples": 16, "train.epochs": 6}) == 1  # measured 0.66x
    assert cpu(**{"tune.space": {"train.epochs": {"choice": [2, 20]}, **small}}) == 1
    assert cpu(**{"model.hidden": [128, 64], "train.batch_size": 512,
                  "tune.space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}) == 1  # 0.79x
    assert cpu(**{"train.early_stopping": {"patience": 2}}) == 1  # less work than the budget
    assert cpu(**{"tune.search": "asha"}) == 1  # stops trials: less work than the budget
    assert cpu(**{"train.batch_size": 512}) == 1  # [64] x 512 is past 8,192
    assert cpu(**{"tune.space": {"model.hidden": {"choice": [[32], [128]]}},
                  "train.batch_size": 64}) == 1  # [128] was never measured at 3x
    assert cpu(**{"tune.space": {"model.hidden": {"choice": [[32], [32, 32]]}}}) == 1
    # grid runs each combination once: 2 combinations are not 32 trials of work
    grid = {"model.hidden": {"grid": [[32], [64]]}}
    assert cpu(**{"tune.search": "grid", "tune.space": grid}) == 1
    many = {**grid, "train.lr": {"grid": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2]},
            "train.seed": {"grid": [0, 1]}}  # 32 combinations
    assert cpu(**{"tune.search": "grid", "tune.num_samples": 1, "tune.space": many}) == 4
    # train.device: auto may settle on a GPU: the CPU rule only where no GPU is asked for
    assert cpu(**{"train.device": "auto", "resources.gpus_per_worker": 0}) == CPU_AUTO_SIZE
    assert cpu(**{"train.device": "auto", "resources.gpus_per_worker": 1}) == 1
    # a model outside the GPU rule anywhere in the space: no packing at all
    wide = {"model.hidden": {"choice": [[32], [4096, 4096]]}}
    assert size(**{"tune.space": wide, "train.batch_size": 2048, **gpu}) == 1
    assert size(**{"tune.space": small, "model.kind": "cnn", **gpu}) == 1
    assert size(**{"tune.space": small, "tune.search": "hyperband", **gpu}) == 1
    assert pack_size(load_spec(EXAMPLES / "adult.yaml", {"tune.pack": 4})) == 4


@pytest.mark.ray
@pytest.mark.slow
def test_packed_sweep_gives_the_unpacked_sweeps_trials(ray_session: None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       mlflow_uri: str) -> None:
    got = {}
    for pack in ("off", 4):
        spec = spec_of(tmp_path, monkeypatch, mlflow_uri, **{"tune.pack": pack})
        result = run_sweep(spec, quiet=True, register=False)
        got[pack] = (result, trials(mlflow_uri, result.parent_run_id))
    # the sweep's registry and packs are gone with it (a second sweep in this driver once
    # found them still alive)
    deadline = time.time() + 60
    while time.time() < deadline and _descendants_titled(("ray::PackRegistry",
                                                            "ray::PackServer")):
        time.sleep(0.5)
    assert _descendants_titled(("ray::PackRegistry", "ray::PackServer")) == []
    (plain, plain_runs), (packed, packed_runs) = got["off"], got[4]
    assert len(packed_runs) == 4 and set(packed_runs) == set(plain_runs)
    for params, mine in packed_runs.items():
        theirs = plain_runs[params]
        assert mine.info.status == theirs.info.status == "FINISHED"
        assert mine.data.tags["rungwise.status"] == theirs.data.tags["rungwise.status"]
        assert history(mlflow_uri, mine) == pytest.approx(history(mlflow_uri, theirs),
                                                          rel=1e-4)
        for key in ("val_accuracy", "train_loss"):
            assert mine.data.metrics[key] == pytest.approx(theirs.data.metrics[key], rel=1e-4)
    assert packed.best_overrides == plain.best_overrides
    assert packed.test_metrics == pytest.approx(plain.test_metrics, rel=1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_packed_members_one_by_one(ray_session: None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               mlflow_uri: str) -> None:
    space = {"train.lr": {"choice": [1e-5, 1e-5, 3e-3, 3e-3, 1e-5, 1e-5]}}
    spec = spec_of(tmp_path, monkeypatch, mlflow_uri, **{
        "tune.search": "asha", "tune.space": space, "tune.num_samples": 6, "tune.pack": 3,
        "train.epochs": 6, "tune.grace_period": 1, "tune.reduction_factor": 3,
        "train.optimizer": "sgd", "train.momentum": 0.0})
    result = run_sweep(spec, quiet=True, register=False)
    kids = children(mlflow_uri, result.parent_run_id)
    assert len(kids) == 6 and {k.info.status for k in kids} == {"FINISHED"}
    stopped = [k for k in kids if k.data.tags["rungwise.status"] == "stopped_by_scheduler"]
    assert stopped and len(stopped) < 6, [k.data.tags["rungwise.status"] for k in kids]
    for kid in stopped:  # each its own run, its curve ending where ASHA stopped it
        at = int(kid.data.tags["rungwise.stopped_at_epoch"])
        assert at < 6 and len(history(mlflow_uri, kid)) == at
    assert result.best_overrides["train.lr"] == 3e-3


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverging_member_fails_alone(ray_session: None, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        mlflow_uri: str) -> None:
    # lr 10 with SGD momentum 0.99 on batches of 32: NaN in epoch 1 (tests/reliability)
    spec = spec_of(tmp_path, monkeypatch, mlflow_uri, **{
        "tune.search": "grid", "tune.space": {"train.lr": {"grid": [10.0, 3e-3, 1e-2]}},
        "tune.pack": 3, "train.epochs": 2, "train.optimizer": "sgd", "train.momentum": 0.99,
        "train.batch_size": 32})
    result = run_sweep(spec, quiet=True, register=False)
    by_lr = {float(dict(p)["train.lr"]): k for p, k in
             trials(mlflow_uri, result.parent_run_id).items()}
    bad = by_lr.pop(10.0)
    assert bad.info.status == "FAILED" and bad.data.tags["rungwise.status"] == "diverged"
    assert "train.lr: loss became" in bad.data.tags["rungwise.error"]
    for good in by_lr.values():
        assert good.info.status == "FINISHED" and good.data.tags["rungwise.status"] == "finished"
        assert len(history(mlflow_uri, good)) == 2
    assert result.best_overrides["train.lr"] in (3e-3, 1e-2)


def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epochs: int,
           **overrides: Any) -> tuple[Any, Any, Any]:
    """A spec settled as the driver hands it over, its prepared data and the ``Shared`` a
    ``PackServer`` gets (the session Ray's object store holds the arrays)."""
    from trainer.pipeline import split_data
    from tuning.sweep import prepare_variants, share_data
    from tuning.trainable import Shared

    spec = spec_of(tmp_path, monkeypatch, None, **{
        "tune.pack": 2, "train.epochs": epochs, "train.device": "cpu",
        "resources.gpus_per_worker": 0, **overrides})
    prepared = prepare_variants(spec, split_data(spec.data))
    return spec, prepared, Shared(spec=spec, prepared=share_data(prepared), raw=None,
                                  checkpoint_every=1)


@pytest.mark.ray
@pytest.mark.slow
def test_a_member_resumes_from_its_trial_checkpoint_and_the_best_model_rebuilds(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.checkpoint import load_checkpoint
    from trainer.loop import TensorData, evaluate
    from trainer.run import Hooks, train_run
    from tuning.pack_actor import PACK_FILE, PackServer
    from tuning.trainable import CKPT_FILE

    spec, prepared, shared = served(tmp_path, monkeypatch, epochs=3, **{"model.dropout": 0.1})
    config = {"train.lr": 1e-2, "train.seed": 3}
    whole = PackServer(shared, config, 1)
    whole.join("t", config, None)
    uninterrupted = [whole.next("t") for _ in range(3)]
    first = PackServer(shared, config, 1)
    first.join("t", config, None)
    files = [first.next("t") for _ in range(2)][-1]["files"]  # a crash after epoch 2
    second = PackServer(shared, config, 1)
    second.join("t", config, files)
    last = second.next("t")
    assert last["done"] and last["metrics"]["epoch"] == 3
    assert last["metrics"]["val_loss"] == pytest.approx(
        uninterrupted[-1]["metrics"]["val_loss"], rel=1e-6)
    # the fit-format file rebuilds the best epoch's model, as tuning/results.py does
    path = tmp_path / CKPT_FILE
    path.write_bytes(last["files"][CKPT_FILE])
    state = load_checkpoint(path)
    data = next(iter(prepared.values()))
    trial = spec.with_overrides(config)
    run = train_run(trial.model, trial.train, data,
                    Hooks(resume_from=state, until_epoch=int(state["epoch"])))
    losses = [r["metrics"]["val_loss"] for r in uninterrupted]
    assert run.fit.best_val_loss == pytest.approx(min(losses), rel=1e-6)
    tensors = TensorData.from_prepared(data)
    got = evaluate(run.fit.model, tensors.x_val, tensors.y_val, tensors, prefix="val_")
    assert got["val_loss"] == pytest.approx(min(losses), rel=1e-5)
    assert set(last["files"]) == {CKPT_FILE, PACK_FILE}
    # a driver that died between the last report and Tune's "complete": the resumed member has
    # nothing left to train and ends at once, reporting nothing more (as fit returns)
    finished = PackServer(shared, config, 1)
    finished.join("t", config, last["files"])
    assert finished.next("t") == {"metrics": None, "files": None, "done": True}


@pytest.mark.ray
def test_a_late_leave_of_a_slots_last_member_does_not_stop_the_member_that_took_it(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member that ended frees its slot at once; a trial Tune starts next may take it before
    the ended trial's ``leave`` arrives (they come from different processes). That late leave
    stopped the new member, whose relay then waited forever: a sweep that never ended."""
    from tuning.pack_actor import PackServer

    _, _, shared = served(tmp_path, monkeypatch, epochs=2)
    config = {"train.lr": 1e-2, "train.seed": 3}
    pack = PackServer(shared, config, 1)
    pack.join("first", config, None)
    assert [pack.next("first")["done"] for _ in range(2)] == [False, True]
    assert pack.join("second", config, None) == 0  # the ended member's slot
    assert pack.leave("first") == 1  # late: "second" is still in, and still trains
    out = [pack.next("second") for _ in range(2)]
    assert [o["metrics"]["epoch"] for o in out] == [1, 2] and out[-1]["done"]
    pack.leave("second")
    with pytest.raises(RuntimeError, match="not in this pack"):
        pack.next("second")


@pytest.mark.ray
def test_an_idle_pack_gives_its_resources_to_a_pack_that_waits_for_them(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for one pack: the first pack's members all leave while a pack of another key waits
    for resources. The idle pack is ended so that the waiting one starts (kept idle, it held
    them and the waiting pack's trials waited forever)."""
    import ray

    from tuning.pack_actor import PackRegistry

    _, _, shared = served(tmp_path, monkeypatch, epochs=2)
    room = float(ray.available_resources().get("CPU", 0))
    registry = ray.remote(PackRegistry).options(num_cpus=0).remote(shared, 1, room, 0.0)
    try:
        first = ray.get(registry.assign.remote("a", {"train.batch_size": 128}))
        assert ray.get(first.ping.remote(), timeout=120)
        second = ray.get(registry.assign.remote("b", {"train.batch_size": 256}))  # other key
        waiting = second.ping.remote()
        assert ray.wait([waiting], timeout=3)[1]  # no room while the first pack is there
        ray.get(registry.release.remote("a"))  # the first pack is idle now
        assert ray.get(waiting, timeout=120)  # and gave its CPUs to the waiting pack
    finally:
        ray.get(registry.close.remote())
        ray.kill(registry)


def _descendants_titled(title: str | tuple[str, ...]) -> list[int]:
    """Processes under this one (the session's Ray) whose command line starts with ``title``."""
    parent: dict[int, int] = {}
    titles: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            titles[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        parent[int(proc.name)] = int(stat.rpartition(")")[2].split()[1])
    me, found = os.getpid(), []
    for pid, text in titles.items():
        p = pid
        while p in parent and p not in (me, 0, 1):
            p = parent[p]
        if p == me and text.startswith(title):
            found.append(pid)
    return found


def _kill_a_pack_after_its_first_checkpoint(runs: Path, killed: list[int]) -> None:
    """SIGKILL a PackServer process once a trial has checkpointed (a test-side fault)."""
    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        if any(runs.rglob("checkpoint_000000")):
            for pid in _descendants_titled("ray::PackServer")[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.1)


@pytest.mark.ray
@pytest.mark.slow
def test_members_of_a_crashed_pack_are_retried_from_their_checkpoints(
        ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        mlflow_uri: str) -> None:
    import json
    import threading

    spec = spec_of(tmp_path, monkeypatch, mlflow_uri, **{
        "tune.pack": 3, "tune.num_samples": 3, "tune.max_failures": 2, "train.epochs": 4,
        "train.batch_size": 32})
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_a_pack_after_its_first_checkpoint,
                               args=(tmp_path / "runs", killed), daemon=True)
    watcher.start()
    result = run_sweep(spec, quiet=True, register=False)
    watcher.join(timeout=1)
    assert killed, "the pack finished before it could be killed"
    kids = children(mlflow_uri, result.parent_run_id)
    assert len(kids) == 3
    restored = 0
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.data.tags["rungwise.status"] == "finished"
        assert [m.step for m in MlflowClient(mlflow_uri).get_metric_history(
            kid.info.run_id, "val_loss")] == [1, 2, 3, 4]
        tid = kid.data.tags["rungwise.trial_id"]
        folder = next(Path(result.experiment_path).glob(f"*{tid}*"))
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # no epoch reported twice
        restored += rows[-1]["iterations_since_restore"] < 4
    assert restored >= 1
