"""A tampered model artifact cannot run code (issue #17).

The attacks are the ones the security review ran: pickles that reach ``subprocess.Popen``
through a dotted global name (``numpy.f2py`` + ``subprocess.Popen``), write a file through
``numpy.memmap`` and reach ``ctypes.CDLL`` through ``numpy.ctypeslib``. Each is first shown to
work on a plain ``pickle.loads`` (so the test can fail), then planted in a real registered
model in a real MLflow store and loaded through ``rungwise predict``, ``rungwise retrain`` and
``mlflow.pyfunc.load_model``. A Python audit hook in each loading process records every
pickle global looked up, every process started, every library loaded and every ``.pkl``
opened: none may appear.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sqlite_store

ROOT = Path(__file__).resolve().parents[1]


def _global(module: str, name: str) -> bytes:
    """Protocol-4 STACK_GLOBAL: the unpickler resolves a dotted ``name`` attribute by attribute."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()
    return text(module) + text(name) + b"\x93"


def _call(module: str, name: str, args: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple's opcodes, no header/STOP
    return b"\x80\x04" + _global(module, name) + body + b"R."


def crafted(folder: Path) -> dict[str, tuple[bytes, Path]]:
    """name -> (pickle bytes, the file whose existence proves the attack ran)."""
    popen, memmap, lib = folder / "popen-ran", folder / "memmap-wrote", folder / "ctypes-loaded"
    return {
        "popen": (_call("numpy.f2py", "subprocess.Popen",
                        (["sh", "-c", f"touch {popen}"],)), popen),
        "memmap": (_call("numpy", "memmap", (str(memmap), "uint8", "w+", 0, (4,))), memmap),
        # CDLL of a library that does not exist: a real unpickler raises OSError naming it
        "ctypes": (_call("numpy.ctypeslib", "ctypes.CDLL", (str(lib),)), lib),
    }


AUDIT = textwrap.dedent("""
    import json, sys
    events = []
    WATCH = ("pickle.find_class", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
             "ctypes.dlopen")
    def hook(event, args):
        # libraries run `uname -p`, `git version`, dlopen(None): only the attacks' own command
        # and library count, and any pickle global at all
        text = repr(args)
        if event == "pickle.find_class" or (event in WATCH and (
                "touch " in text or (event == "ctypes.dlopen" and "rungwise-attack" in text))):
            events.append([event, text[:200]])
        elif event == "open" and str(args[0]).endswith(".pkl"):
            events.append([event, str(args[0])])
    sys.addaudithook(hook)
    import atexit
    atexit.register(lambda: print("AUDIT " + json.dumps(events), file=sys.stderr))
""")


def run_audited(code: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str, list[Any]]:
    """Run ``code`` in a fresh interpreter under the audit hook; its events come back."""
    proc = subprocess.run([sys.executable, "-c", AUDIT + textwrap.dedent(code)], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stderr.splitlines() if x.startswith("AUDIT ")]
    events = json.loads(line[-1][6:]) if line else [["no audit line", proc.stderr[-2000:]]]
    return proc.returncode, proc.stdout, proc.stderr, events


def test_the_crafted_pickles_are_real_attacks(tmp_path: Path) -> None:
    folder = tmp_path / "rungwise-attack-real"
    folder.mkdir()
    seen = {"popen": "subprocess.Popen", "memmap": "pickle.find_class", "ctypes": "ctypes.dlopen"}
    for name, (data, marker) in crafted(folder).items():
        rc, _, err, events = run_audited(f"import pickle\npickle.loads({data!r})", tmp_path, {})
        assert seen[name] in [e[0] for e in events], events  # the hook sees what it must
        marker.unlink(missing_ok=True)
        code = f"import pickle, time; pickle.loads({data!r}); time.sleep(0.5)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
        if name == "ctypes":  # it got as far as asking the loader for the library
            assert str(marker) in proc.stderr and "OSError" in proc.stderr, proc.stderr
        else:
            assert marker.exists(), (name, proc.stderr)


# --- a real registered model, tampered on disk ---------------------------------------------


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A model registered as champion by a real `rungwise retrain` (refit, no Ray)."""
    folder = tmp_path_factory.mktemp("rungwise-attack")
    uri = sqlite_store(folder)
    spec = yaml_spec(folder, uri)
    env = {"RUNGWISE_STORAGE": str(folder / "storage")}
    proc = subprocess.run([sys.executable, "-m", "jobs", "retrain", str(spec)], cwd=folder,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = folder / "rows.csv"
    import pandas as pd

    pd.read_csv(ROOT / "data" / "adult" / "adult-train.csv.gz", header=None, nrows=20).to_csv(
        rows, header=False, index=False)
    return {"folder": folder, "uri": uri, "spec": spec, "rows": rows, "env": env,
            "bundle": bundle_folder(uri)}


def yaml_spec(folder: Path, uri: str) -> Path:
    import yaml

    spec = yaml.safe_load((ROOT / "examples" / "adult.yaml").read_text())
    spec["data"]["path"] = str(ROOT / "data" / "adult" / "adult-train.csv.gz")
    spec["model"]["hidden"] = [8]
    spec["train"]["epochs"] = 1
    spec["tracking"] = {"uri": uri, "register_as": "attack-test"}
    spec["schedule"] = {"retrain": "refit"}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bundle_folder(uri: str) -> Path:
    """Where the champion's bundle lies in the artifact store (a local folder here)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    version = MlflowClient(tracking_uri=uri).get_model_version_by_alias("attack-test",
                                                                         "champion")
    mlflow.set_tracking_uri(uri)
    model_id = version.model_id or version.source.rsplit("/", 1)[-1]  # models:/m-...
    location = mlflow.get_logged_model(model_id).artifact_location
    return Path(location.removeprefix("file://")) / "artifacts" / "bundle"


def plant(bundle: Path, data: bytes, *, replace: bool) -> None:
    """Plant the pickle beside the JSON format, or in its place (an old-format artifact)."""
    (bundle / "preprocessor.pkl").write_bytes(data)
    for name in ("preprocessor.json", "preprocessor.npz"):
        saved = bundle / (name + ".saved")
        if replace and (bundle / name).exists():
            (bundle / name).rename(saved)
        elif not replace and saved.exists():
            saved.rename(bundle / name)


VARIANTS = [(attack, replace) for replace in (False, True)
            for attack in ("popen", "memmap", "ctypes")]
"""Each payload planted beside the JSON format (the model works from its JSON + npz, the
pickle lies there unread) and in its place (an old-format artifact: refused)."""

LOADERS = {
    "predict": """
        from jobs.cli import main
        return main(["predict", {spec!r}, "--input", {rows!r}])
    """,
    "pyfunc": """
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/attack-test@champion")
        cols = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
                "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
                "hours_per_week", "native_country", "income"]
        numbers = ["age", "fnlwgt", "education_num", "capital_gain", "capital_loss",
                   "hours_per_week"]  # optional numbers are doubles in the model's signature
        rows = pd.read_csv({rows!r}, header=None, names=cols, na_values=["?"],
                           dtype={{c: "float64" for c in numbers}}).drop(columns=["income"])
        print("predicted", len(model.predict(rows)))
        return 0
    """,
}

RUNNER = """
    import os, tempfile, traceback
    from pathlib import Path
    from tests.test_artifact_attacks import VARIANTS, crafted, plant

    def load():
    {load}

    def captured(file):
        file.seek(0)
        return file.read().decode(errors="replace")

    results = []
    for attack, replace in VARIANTS:
        data, marker = crafted(Path({folder!r}) / f"{{attack}}-{{replace}}")[attack]
        marker.parent.mkdir(exist_ok=True)
        plant(Path({bundle!r}), data, replace=replace)
        events.clear()  # planting wrote a .pkl: only what the loading does counts
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)  # the fds: all the loading prints
        try:
            rc = load()
        except SystemExit as exc:
            rc = exc.code
        except Exception:
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        results.append({{"attack": attack, "replace": replace, "rc": rc,
                         "out": captured(out), "err": captured(err),
                         "events": list(events), "ran": marker.exists()}})
    print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_planted_pickle_runs_nothing_through_predict_or_pyfunc(
        registered: dict[str, Any], loader: str) -> None:
    """Every payload of ``crafted``, beside the JSON format and instead of it, through one
    loader: one audited interpreter loads the tampered model once per variant (the test
    process plants nothing: the runner plants each variant, then clears the audit events)."""
    r = registered
    load = textwrap.indent(textwrap.dedent(LOADERS[loader].format(
        spec=str(r["spec"]), rows=str(r["rows"]), uri=r["uri"])), "    ")
    code = textwrap.dedent(RUNNER).format(load=load, folder=str(r["folder"] / loader),
                                          bundle=str(r["bundle"]))
    (r["folder"] / loader).mkdir()
    rc, out, err, _ = run_audited(code, r["folder"], r["env"])
    time.sleep(0.2)  # a started process would have touched its marker by now
    written = [p for p in (r["folder"] / loader).rglob("*") if p.is_file()]
    assert written == [], written  # no attack's marker, checked again after the process
    lines = [x for x in out.splitlines() if x.startswith("RESULTS ")]
    assert rc == 0 and lines, err[-3000:]
    results = json.loads(lines[-1][8:])
    assert [[x["attack"], x["replace"]] for x in results] == [list(v) for v in VARIANTS]
    for x in results:
        what = (loader, x["attack"], "instead" if x["replace"] else "beside", x["err"][-2000:])
        assert not x["ran"], what
        assert x["events"] == [], (what, x["events"])
        if x["replace"]:  # an old-format artifact: refused, with what to do
            assert x["rc"] != 0 and "re-register the model" in x["err"], what
            if loader == "predict":
                assert x["rc"] == 2 and x["err"].count("\n") == 1, what  # one line
        else:  # the pickle lies there unread; the model works from its JSON + npz
            assert x["rc"] == 0, what
            if loader == "predict":
                assert x["out"].count("\n") == 21, what  # the header and 20 rows
            else:
                assert "predicted 20" in x["out"], what


@pytest.mark.slow
def test_retrain_never_reads_a_planted_pickle_and_replaces_an_unloadable_champion(
        registered: dict[str, Any]) -> None:
    r = registered
    data, marker = crafted(r["folder"] / "retrain")["popen"]
    marker.parent.mkdir(exist_ok=True)
    plant(r["bundle"], data, replace=True)
    code = f"""
        from jobs.cli import main
        sys.exit(main(["retrain", {str(r['spec'])!r}]))
    """
    rc, out, err, events = run_audited(code, r["folder"], r["env"])
    time.sleep(0.2)
    assert not marker.exists() and events == [], (events, err)
    assert rc == 0, err
    assert "cannot be scored" in err and "re-register the model" in err
    from mlflow.tracking import MlflowClient

    champion = MlflowClient(tracking_uri=r["uri"]).get_model_version_by_alias(
        "attack-test", "champion")
    assert str(champion.version) == "2"  # the working challenger replaced the unloadable champion
    plant(r["bundle"], data, replace=False)
