"""jobs.spec: the examples load, defaults, --set overrides, flat params, one-line errors.

Every refusal is a ``SpecError`` (a ``ValueError``) whose one-line message starts with the
key path, and says what was received where that helps.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from jobs.spec import (
    MAX_SPEC_BYTES,
    JobSpec,
    SpecError,
    flatten,
    load_spec,
    parse_overrides,
    validate_spec,
)
from tests.conftest import EXAMPLES, ROOT, write_file

MINIMAL: dict[str, Any] = {"name": "t", "data": {"path": "/abs/table.csv"}}


def spec_of(**sections: Any) -> dict[str, Any]:
    """MINIMAL with whole sections replaced, or merged when both are mappings."""
    raw = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return raw


def refusal(raw: Any) -> str:
    with pytest.raises(SpecError) as info:
        validate_spec(raw, base_dir=None)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def write(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    return write_file(tmp_path, text, name)


# --- the examples ------------------------------------------------------------------------


def test_adult_example_loads() -> None:
    spec = load_spec(EXAMPLES / "adult.yaml")
    assert spec.name == "adult-income"
    assert Path(spec.data.path) == ROOT / "data" / "adult" / "adult-train.csv.gz"
    assert Path(spec.data.path).is_file()
    assert spec.data.target == "income" and spec.data.task == "classification"
    assert len(spec.data.columns or []) == 15 and spec.data.columns[-1] == "income"
    assert spec.data.na_values == ["?"]
    assert spec.impute.indicator is True and spec.impute.drop_columns_above == 0.6
    assert spec.train.lr == pytest.approx(2e-3) and spec.train.early_stopping.patience == 3
    assert spec.tune.metric == "val_loss" and spec.tune.mode == "min"
    assert set(spec.tune.space) == {"train.lr", "model.hidden", "model.dropout",
                                    "impute.numeric"}
    assert spec.schedule.cron == "0 3 * * *"


def test_california_example_loads() -> None:
    spec = load_spec(EXAMPLES / "california_housing.yaml")
    assert spec.data.task == "regression" and spec.data.target == "median_house_value"
    assert Path(spec.data.path).is_file()
    assert spec.tune.metric == "val_rmse" and spec.tune.mode == "min"
    assert spec.train.lr_schedule == "cosine"


@pytest.mark.skipif(not (EXAMPLES / "digits.yaml").exists(), reason="no digits example")
def test_digits_example_loads() -> None:
    spec = load_spec(EXAMPLES / "digits.yaml")
    assert spec.model.kind == "cnn" and spec.model.channels == [16, 32]
    assert spec.data.path.endswith("digits.npz")


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_round_trips(name: str) -> None:
    """to_dict -> validate gives the same spec: nothing is lost or renamed on the way."""
    spec = load_spec(EXAMPLES / name)
    again = validate_spec(spec.to_dict(), base_dir=None)
    assert again == spec
    json.dumps(spec.to_dict())  # plain data only


# --- defaults and paths ------------------------------------------------------------------------


def test_defaults() -> None:
    spec = validate_spec(MINIMAL, base_dir=None)
    assert (spec.data.target, spec.data.task, spec.data.format) == ("y", "classification", "auto")
    assert (spec.data.split.val, spec.data.split.test, spec.data.split.seed,
            spec.data.split.stratify) == (0.15, 0.15, 0, True)
    assert spec.data.features is None and spec.data.categorical is None
    assert spec.data.delimiter == "," and spec.data.na_values == []
    assert (spec.impute.numeric, spec.impute.categorical) == ("median", "category")
    assert spec.impute.drop_columns_above is None and spec.impute.indicator is False
    assert (spec.model.kind, spec.model.hidden, spec.model.activation) == ("mlp", [128, 64],
                                                                             "relu")
    assert (spec.train.epochs, spec.train.batch_size, spec.train.optimizer) == (30, 256, "adamw")
    assert spec.train.lr == 1e-3 and spec.train.early_stopping is None and spec.train.seed == 0
    assert (spec.tune.search, spec.tune.metric, spec.tune.mode) == ("asha", "val_loss", "min")
    assert spec.tune.space == {}
    assert spec.resources.gpus_per_worker == "auto" and spec.resources.workers_per_trial == 1
    assert spec.tracking.uri is None and spec.schedule.cron is None


@pytest.mark.parametrize(("metric", "task", "mode"), [
    ("val_loss", "classification", "min"), ("val_accuracy", "classification", "max"),
    ("val_rmse", "regression", "min"), ("train_loss", "regression", "min")])
def test_tune_mode_follows_the_metric(metric: str, task: str, mode: str) -> None:
    raw = spec_of(data={"task": task}, tune={"metric": metric})
    assert validate_spec(raw, base_dir=None).tune.mode == mode


def test_explicit_tune_mode_wins() -> None:
    raw = spec_of(tune={"metric": "val_loss", "mode": "max"})
    assert validate_spec(raw, base_dir=None).tune.mode == "max"


def test_relative_data_path_is_resolved_against_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", "name: t\ndata: {path: ../data/t.csv}\n")
    assert load_spec(path).data.path == str((tmp_path / "data" / "t.csv").resolve())
    for kept in ("/abs/t.csv", "s3://bucket/t.parquet"):
        path = write(tmp_path, f"name: t\ndata: {{path: '{kept}'}}\n")
        assert load_spec(path).data.path == kept


def test_numbers_written_the_yaml_1_1_way_are_numbers(tmp_path: Path) -> None:
    """PyYAML reads ``1e-3`` (no dot) as a string; the spec must still take it as 0.001."""
    spec = load_spec(write(tmp_path, "name: t\ndata: {path: /t.csv}\ntrain: {lr: 1e-3}\n"))
    assert spec.train.lr == pytest.approx(1e-3)


# --- --set overrides ----------------------------------------------------------------------------


def test_parse_overrides_reads_yaml_values() -> None:
    got = parse_overrides(["train.lr=0.01", "model.hidden=[64, 32]", "name=run 2",
                           "train.early_stopping=null", "data.split.stratify=false",
                           "tracking.uri=http://host:5000/?a=b"])
    assert got == {"train.lr": 0.01, "model.hidden": [64, 32], "name": "run 2",
                   "train.early_stopping": None, "data.split.stratify": False,
                   "tracking.uri": "http://host:5000/?a=b"}


@pytest.mark.parametrize("item", ["train.lr", "=0.1", " =0.1"])
def test_parse_overrides_refuses_items_without_a_key(item: str) -> None:
    with pytest.raises(SpecError, match="--set takes key.path=value"):
        parse_overrides([item])


def test_parse_overrides_keeps_unparsable_yaml_as_text() -> None:
    assert parse_overrides(["name=a: b: c"]) == {"name": "a: b: c"}


def test_load_spec_applies_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\ndata: {path: /t.csv}\ntrain: {lr: 0.1}\n")
    spec = load_spec(path, parse_overrides(["train.lr=1e-3", "model.hidden=[8]",
                                            "train.early_stopping.patience=2"]))
    assert spec.train.lr == pytest.approx(1e-3) and spec.model.hidden == [8]
    assert spec.train.early_stopping is not None and spec.train.early_stopping.patience == 2


@pytest.mark.parametrize(("item", "message"), [
    ("model.hiden=[8]", "model.hiden: unknown key"),
    ("trian.lr=0.1", "trian: unknown key"),
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("name.first=x", "name.first: name is not a section"),
    ("tracking.artifact_location=/etc", "tracking.artifact_location: unknown key"),
])
def test_load_spec_override_errors_name_the_key(tmp_path: Path, item: str, message: str) -> None:
    path = write(tmp_path, "name: t\ndata: {path: /t.csv}\n")
    with pytest.raises(SpecError, match="^" + message.replace(".", r"\.")):
        load_spec(path, parse_overrides([item]))


def test_with_overrides_returns_a_new_validated_spec() -> None:
    spec = validate_spec(MINIMAL, base_dir=None)
    new = spec.with_overrides({"train.lr": 0.05, "model.hidden": [32], "impute.numeric": "mean"})
    assert (new.train.lr, new.model.hidden, new.impute.numeric) == (0.05, [32], "mean")
    assert (spec.train.lr, spec.model.hidden, spec.impute.numeric) == (1e-3, [128, 64], "median")
    assert new.data.path == spec.data.path  # already resolved: not re-resolved


def test_with_overrides_reaches_into_an_unset_optional_section() -> None:
    """early_stopping is null by default; a sweep over its patience must still work."""
    spec = validate_spec(MINIMAL, base_dir=None)
    new = spec.with_overrides({"train.early_stopping.patience": 4})
    assert new.train.early_stopping is not None and new.train.early_stopping.patience == 4
    with pytest.raises(SpecError, match=r"^train\.early_stopping\.patienc: unknown key"):
        spec.with_overrides({"train.early_stopping.patienc": 4})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.lrr": 0.1}, r"^train\.lrr: no such key in the spec; allowed here: .*\blr\b"),
    ({"trian.lr": 0.1}, r"^trian: no such section in the spec \(setting trian\.lr\)"),
    ({"train.lr.x": 0.1}, r"^train\.lr: no such section"),
    ({"train.lr": 0}, r"^train\.lr: Input should be greater than 0"),
    ({"model.activation": "swish"}, r"^model\.activation: Input should be 'relu'"),
    ({"data.task": "regression", "tune.metric": "val_accuracy"}, r"^tune\.metric: val_accuracy"),
])
def test_with_overrides_errors_name_the_key(overrides: dict[str, Any], message: str) -> None:
    spec = validate_spec(MINIMAL, base_dir=None)
    with pytest.raises(SpecError, match=message):
        spec.with_overrides(overrides)


# --- flat params --------------------------------------------------------------------------------


def test_flat_has_dotted_keys_and_plain_values() -> None:
    spec = validate_spec(spec_of(tune={"space": {"train.lr": {"loguniform": [1e-4, 1e-1]}}}),
                         base_dir=None)
    flat = spec.flat()
    assert flat["name"] == "t" and flat["train.lr"] == 1e-3
    assert flat["data.split.val"] == 0.15 and flat["model.hidden"] == [128, 64]
    assert flat["train.early_stopping"] is None
    assert flat["tune.space"] == {"train.lr": {"loguniform": [1e-4, 1e-1]}}  # kept whole
    assert all(not isinstance(v, dict) for k, v in flat.items() if k != "tune.space")
    # every key of the spec is there exactly once, under its section
    sections = {k.split(".")[0] for k in flat}
    assert sections == set(JobSpec.model_fields)
    json.dumps(flat)


def test_flat_of_a_set_optional_section_lists_its_keys() -> None:
    spec = validate_spec(spec_of(train={"early_stopping": {"patience": 3}}), base_dir=None)
    flat = spec.flat()
    assert flat["train.early_stopping.patience"] == 3
    assert flat["train.early_stopping.min_delta"] == 0.0
    assert "train.early_stopping" not in flat


def test_flatten_keeps_empty_sections_as_values() -> None:
    assert flatten({"a": {}, "b": {"c": 1}}) == {"a": {}, "b.c": 1}


# --- one-line errors naming the key path ----------------------------------------------------


BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown model key", spec_of(model={"hiden": [64]}),
     r"^model\.hiden: unknown key; allowed: activation, channels, dropout, hidden, "),
    ("unknown top-level key", spec_of(nmae="x"), r"^nmae: unknown key; allowed: data, impute"),
    ("artifact location is no key", spec_of(tracking={"artifact_location": "/etc"}),
     r"^tracking\.artifact_location: unknown key; allowed: experiment, register_as, uri$"),
    ("nested unknown key", spec_of(train={"early_stopping": {"patient": 2}}),
     r"^train\.early_stopping\.patient: unknown key"),
    ("missing name", {"data": {"path": "/t.csv"}}, r"^name: required key is missing$"),
    ("missing data.path", {"name": "t", "data": {}}, r"^data\.path: required key is missing$"),
    ("lr not a number", spec_of(train={"lr": "fast"}),
     r"^train\.lr: Input should be a valid number.*; got 'fast'$"),
    ("lr negative", spec_of(train={"lr": -0.1}), r"^train\.lr: .*greater than 0; got -0\.1$"),
    ("lr nan", spec_of(train={"lr": float("nan")}), r"^train\.lr: .*; got nan$"),
    ("epochs zero", spec_of(train={"epochs": 0}), r"^train\.epochs: .*greater than or equal to 1"),
    ("optimizer", spec_of(train={"optimizer": "rmsprop"}),
     r"^train\.optimizer: Input should be 'sgd', 'adam' or 'adamw'; got 'rmsprop'$"),
    ("activation", spec_of(model={"activation": "gelu"}), r"^model\.activation: .*got 'gelu'$"),
    ("hidden zero", spec_of(model={"hidden": [64, 0]}),
     r"^model\.hidden: layer sizes must be >= 1, got \[64, 0\]$"),
    ("loguniform zero", spec_of(tune={"space": {"train.lr": {"loguniform": [0, 0.1]}}}),
     r"^tune\.space\.train\.lr: loguniform bounds must be positive, got \[0, 0\.1\]$"),
    ("uniform reversed", spec_of(tune={"space": {"model.dropout": {"uniform": [0.5, 0.1]}}}),
     r"^tune\.space\.model\.dropout: uniform bounds must be increasing, got \[0\.5, 0\.1\]$"),
    ("unknown dimension", spec_of(tune={"space": {"train.lr": {"normal": [0, 1]}}}),
     r"^tune\.space\.train\.lr: unknown dimension kind 'normal', allowed: choice, grid"),
    ("dimension not a mapping", spec_of(tune={"space": {"train.lr": 0.1}}),
     r"^tune\.space\.train\.lr: Input should be a valid dictionary; got 0\.1$"),
    ("quniform step", spec_of(tune={"space": {"train.batch_size": {"quniform": [16, 64, 0]}}}),
     r"^tune\.space\.train\.batch_size: quniform step must be positive"),
    ("cron", spec_of(schedule={"cron": "every night"}),
     r"^schedule\.cron: not a valid cron expression: 'every night' \(five fields"),
    ("impute.numeric", spec_of(impute={"numeric": "knn"}),
     r"^impute\.numeric: Input should be 'mean', .*; got 'knn'$"),
    ("impute.drop_columns_above", spec_of(impute={"drop_columns_above": 1.5}),
     r"^impute\.drop_columns_above: .*less than or equal to 1; got 1\.5$"),
    ("split sum", spec_of(data={"split": {"val": 0.5, "test": 0.5}}),
     r"^data\.split: val \+ test must be below 0\.9, got 1$"),
    ("split val zero", spec_of(data={"split": {"val": 0}}), r"^data\.split\.val: .*greater than 0"),
    ("delimiter", spec_of(data={"delimiter": "::"}),
     r"^data\.delimiter: must be one character, got '::'$"),
    ("task", spec_of(data={"task": "clustering"}), r"^data\.task: .*got 'clustering'$"),
    ("gpus negative", spec_of(resources={"gpus_per_worker": -1}),
     r"^resources\.gpus_per_worker: must be 'auto', a fraction in \[0, 1\] or a whole number"),
    ("gpus 1.5", spec_of(resources={"gpus_per_worker": 1.5}),
     r"^resources\.gpus_per_worker: must be 'auto'.*got 1\.5$"),
    ("gpus word", spec_of(resources={"gpus_per_worker": "all"}),
     r"^resources\.gpus_per_worker: Input should be 'auto'; got 'all'"),  # no union tag
    ("fill_value list", spec_of(impute={"fill_value": [1]}), r"^impute\.fill_value: "),
    ("fill_value text for numbers", spec_of(impute={"numeric": "constant", "fill_value": "abc"}),
     r"^impute\.fill_value: got 'abc', allowed: a number when impute\.numeric=constant$"),
    ("accuracy on regression", spec_of(data={"task": "regression"},
                                       tune={"metric": "val_accuracy"}),
     r"^tune\.metric: val_accuracy needs data\.task: classification"),
    ("rmse on classification", spec_of(tune={"metric": "val_rmse"}),
     r"^tune\.metric: val_rmse needs data\.task: regression"),
    ("section is a scalar", spec_of(model=5), r"^model: Input should be a valid dictionary"),
    ("name with a slash", spec_of(name="../etc"), r"^name: String should match pattern"),
    ("features a string", spec_of(data={"features": "age"}), r"^data\.features: .*valid list"),
]


@pytest.mark.parametrize(("raw", "message"), [(r, m) for _, r, m in BAD_SPECS],
                         ids=[i for i, _, _ in BAD_SPECS])
def test_bad_spec_message_names_the_key_path(raw: dict[str, Any], message: str) -> None:
    import re

    msg = refusal(raw)
    assert re.search(message, msg), msg


def test_several_errors_report_the_first_and_count_the_rest() -> None:
    msg = refusal(spec_of(train={"lr": -1, "epochs": 0}, model={"hiden": 1}))
    assert msg.endswith("(and 2 more)"), msg


@pytest.mark.parametrize("raw", [None, [], "name: t", 3])
def test_a_spec_is_a_mapping(raw: Any) -> None:
    assert refusal(raw).startswith("a job spec is a mapping of sections, got ")


def test_long_values_are_shortened_in_messages() -> None:
    msg = refusal(spec_of(train={"lr": "x" * 500}))
    assert len(msg) < 250 and msg.endswith("..."), msg


def test_spec_error_is_a_value_error() -> None:
    """tuning/ catches ValueError around with_overrides without importing jobs."""
    assert issubclass(SpecError, ValueError)


# --- reading YAML safely ------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghijklmnop"
    for prev, cur in zip(names[:levels - 1], names[1:levels], strict=True):
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    return "name: t\ndata: {path: /t.csv}\n" + "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    path = write(tmp_path, billion_laughs())  # 9**9 = 387 million strings if expanded
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"YAML aliases \(\*a\) are not allowed in a job spec"):
        load_spec(path)
    assert time.perf_counter() - t0 < 2.0


def test_a_single_harmless_alias_is_refused_too(tmp_path: Path) -> None:
    path = write(tmp_path, "name: &n t\ndata: {path: /t.csv}\ntracking: {experiment: *n}\n")
    with pytest.raises(SpecError, match=r"aliases .* \(line 3\)"):
        load_spec(path)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']",
                                 "!!python/object:collections.OrderedDict {}",
                                 "!!python/name:os.getcwd ''"])
def test_python_tags_are_refused(tmp_path: Path, tag: str) -> None:
    path = write(tmp_path, f"name: {tag}\ndata: {{path: /t.csv}}\n")
    with pytest.raises(SpecError, match="could not determine a constructor for the tag"):
        load_spec(path)


def test_spec_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\ndata: {path: /t.csv}\n" + "#" * MAX_SPEC_BYTES)
    with pytest.raises(SpecError, match=r"spec file is 1,000,0\d\d bytes; the limit is 1,000,000"):
        load_spec(path)


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    """A recursion bomb: without a depth limit this is a RecursionError (exit code 1)."""
    path = write(tmp_path, "name: t\ndata: {path: /t.csv}\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SpecError, match=r"^YAML nested more than \d+ levels deep \(line 3\)"):
        load_spec(path)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    """PyYAML lets the second ``train:`` replace the first silently."""
    path = write(tmp_path, "name: t\ndata: {path: /t.csv}\ntrain: {lr: 0.1}\ntrain: {epochs: 2}\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line 4: duplicate key 'train'"):
        load_spec(path)


@pytest.mark.parametrize(("text", "message"), [
    (b"name: caf\xe9\ndata: {path: /t.csv}\n", "not UTF-8 text"),
    ("model: {hidden: [64\n", "not valid YAML at line 2"),
    ("name: t\n\tdata: 1\n", "not valid YAML at line 2"),
])
def test_unreadable_yaml_is_one_line(tmp_path: Path, text: str | bytes, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        load_spec(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_spec_file(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.yaml", tmp_path):
        with pytest.raises(SpecError, match="spec file not found"):
            load_spec(path)


def test_a_space_key_that_does_not_exist_is_refused_on_load_in_every_command(
        tmp_path: Path) -> None:
    """`rungwise inspect` and `train` refuse what `tune` refuses (issue #13)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    for command in ("inspect", "train"):
        proc = subprocess.run(
            [sys.executable, "-m", "jobs", command, str(root / "examples" / "adult.yaml"),
             "--set", "tune.space={train.nope: {choice: [1, 2]}}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**__import__("os").environ, "PYTHONPATH": str(root)})
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.strip().splitlines() == [
            "rungwise: error: tune.space.train.nope: value 1 is refused by the spec: train.nope: "
            "no such key in the spec; allowed here: batch_size, deterministic, device, "
            "early_stopping, epochs, gamma, grad_clip, lr, lr_schedule, momentum, optimizer, "
            "seed, step_size, threads, weight_decay"], command
        assert not (tmp_path / "mlflow.db").exists()


def test_a_device_this_machine_lacks_is_a_user_error(tmp_path: Path) -> None:
    """`--set train.device=cuda` on a machine without CUDA: exit 2 and one line, not exit 1."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: train.device=cuda is valid here")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", "train", str(root / "examples" / "adult.yaml"),
         "--set", "train.device=cuda", "--set", "train.epochs=1", "--no-tracking"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "rungwise: error: train.device: cuda, but torch.cuda.is_available() is False here; "
        "use auto or cpu"]
