"""Static checks of the Kubernetes manifests and the AWS launcher config beyond test_infra.py:
the real schemas (a subset copied as data), the CronJob's argv as the container execs it, shared
storage on every Ray node, the in-cluster MLflow server, and the launcher's security group.
No cluster, no docker, no network.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.infra.test_infra import (
    CRONJOB,
    INFRA,
    LAUNCHER,
    RAYCLUSTER,
    RAYJOB,
    README,
    ROOT,
    cluster_specs,
    env_of,
    load_docs,
    load_one,
    ray_containers,
    rel,
)

MLFLOW_K8S = INFRA / "kubernetes" / "mlflow.yaml"
K8S_MANIFESTS = [RAYCLUSTER, RAYJOB, CRONJOB, MLFLOW_K8S]
SCHEMA = json.loads((Path(__file__).with_name("k8s_schema_subset.json")).read_text())

RETRAIN = "python -m jobs retrain /app/examples/adult.yaml --set resources.gpus_per_worker=1"
STORAGE_ENV = {"RUNGWISE_STORAGE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


# --------------------------------------------------------------------------- schemas


_TYPES = {"string": str, "integer": int, "boolean": bool, "number": (int, float),
          "object": dict, "array": list}


def schema_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """Unknown fields, wrong types, values outside an enum and missing required fields."""
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, int | str) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is not an int or a string"]
    want = schema.get("type")
    if want and not (isinstance(value, _TYPES[want])
                     and not (want in {"integer", "number"} and isinstance(value, bool))):
        return [f"{path}: {value!r} is not of type {want}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not one of {schema['enum']}"]
    errors: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        errors += [f"{path}.{k}: unknown field (not in the schema subset: a typo, or rebuild "
                   f"it with tests/infra/build_schema_subset.py)" for k in value if k not in props]
        errors += [f"{path}: missing required {k}" for k in schema.get("required", [])
                   if k not in value]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(props[k], v, f"{path}.{k}")
    elif isinstance(value, dict) and "additionalProperties" in schema:
        for k, v in value.items():
            errors += schema_errors(schema["additionalProperties"], v, f"{path}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(schema["items"], v, f"{path}[{i}]")
    return errors


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{rel(p)}#{i}", doc) for p in K8S_MANIFESTS for i, doc in enumerate(load_docs(p))]


@pytest.mark.parametrize(("where", "doc"), k8s_documents(), ids=[w for w, _ in k8s_documents()])
def test_manifest_matches_the_real_schema(where: str, doc: dict[str, Any]) -> None:
    key = f"{doc['apiVersion']} {doc['kind']}"
    assert key in SCHEMA, f"{where}: no schema for {key}"
    assert not schema_errors(SCHEMA[key], doc, where)


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda d: d["spec"].update(concurrencyPolicy="Forbid", schedulle="x"), "unknown field"),
    (lambda d: d["spec"].pop("schedule"), "missing required schedule"),
    (lambda d: d["spec"].update(startingDeadlineSeconds="3600"), "not of type integer"),
])
def test_schema_check_catches_mistakes(mutate: Any, needle: str) -> None:
    doc = load_one(CRONJOB)
    mutate(doc)
    errors = schema_errors(SCHEMA["batch/v1 CronJob"], doc, "cronjob")
    assert any(needle in e for e in errors), errors


def test_schema_check_knows_kuberay_enums() -> None:
    doc = load_one(RAYCLUSTER)
    doc["spec"]["authOptions"]["mode"] = "tokens"
    assert schema_errors(SCHEMA["ray.io/v1 RayCluster"], doc, "rc")


# --------------------------------------------------------------------------- CronJob argv


def expand(text: str, env: dict[str, dict[str, Any]]) -> str:
    """Kubernetes' $(VAR) expansion in command/args: $$ is a literal $, unknown refs stay."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        entry = env.get(m.group(1), {})
        return str(entry["value"]) if "value" in entry else m.group(0)
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def exec_argv(container: dict[str, Any]) -> list[str]:
    """command + args exactly as the kubelet execs them: one list item per argv word."""
    env = env_of(container)
    return [expand(str(w), env) for w in [*container["command"], *container.get("args", [])]]


def entrypoint_problems(argv: list[str], intended: str) -> list[str]:
    """What `ray job submit ARGS -- WORDS` would hand the head's shell, against `intended`."""
    from ray.dashboard.modules.job.cli import submit  # the real CLI's option parser
    if argv[:3] != ["ray", "job", "submit"]:
        return [f"not a ray job submit: {argv[:3]}"]
    words = list(submit.make_context("submit", argv[3:]).params["entrypoint"])
    # Ray's CLI builds the entrypoint with subprocess.list2cmdline; the head runs it in a shell.
    shell_words = shlex.split(subprocess.list2cmdline(words))
    problems = [f"argv item {w!r} has a space: the shell sees one word" for w in words
                if re.search(r"\s", w)]
    if shell_words != shlex.split(intended):
        problems.append(f"the shell runs {shell_words}, not {shlex.split(intended)}")
    return problems


def _cron_container() -> dict[str, Any]:
    return load_one(CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def test_cronjob_entrypoint_is_one_argv_word_per_word() -> None:
    argv = exec_argv(_cron_container())
    assert not entrypoint_problems(argv, RETRAIN)
    words = argv[argv.index("--") + 1:]
    assert re.fullmatch(r"(/[\w./-]+/)?python3?", words[0]), f"not an interpreter: {words[0]}"
    assert words[1:4] == ["-m", "jobs", "retrain"], words
    assert (ROOT / "jobs" / "__main__.py").is_file(), "`python -m jobs` needs jobs/__main__.py"
    assert words[4] == "/app/examples/adult.yaml" and (ROOT / "examples" / "adult.yaml").is_file()
    # The words after `python -m jobs` are a command line the real CLI accepts.
    cli = pytest.importorskip("jobs.cli")
    args = cli.build_parser().parse_args(words[3:])
    assert (args.command, args.spec) == ("retrain", "/app/examples/adult.yaml")


def test_cronjob_submit_options_parse() -> None:
    from ray.dashboard.modules.job.cli import submit
    argv = exec_argv(_cron_container())
    params = submit.make_context("submit", argv[3:]).params
    assert params["address"] == "http://rungwise-head-svc:8265"
    runtime_env = json.loads(params["runtime_env_json"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


@pytest.mark.parametrize("words", [
    ["python -m jobs retrain /app/examples/adult.yaml --set resources.gpus_per_worker=1"],
    ["python", "-m", "jobs", "retrain /app/examples/adult.yaml", "--set",
     "resources.gpus_per_worker=1"],
    ["python", "-m", "jobs", "retrain", "/app/examples/adult.yaml"],
])
def test_entrypoint_check_catches_joined_words(words: list[str]) -> None:
    """The manifest before the fix (one item) must fail the check above."""
    argv = ["ray", "job", "submit", "--address", "http://h:8265", "--", *words]
    assert entrypoint_problems(argv, RETRAIN)


def test_rayjob_entrypoint_runs_tune_with_the_image_python() -> None:
    words = shlex.split(load_one(RAYJOB)["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "jobs", "tune"], words
    cli = pytest.importorskip("jobs.cli")
    assert cli.build_parser().parse_args(words[3:]).command == "tune"


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize("index", [0, 1], ids=[rel(RAYCLUSTER), rel(RAYJOB)])
def test_every_ray_node_gets_the_storage(index: int) -> None:
    where, spec = cluster_specs()[index]
    for role, c in ray_containers(spec):
        env = env_of(c)
        missing = STORAGE_ENV - set(env)
        assert not missing, f"{where} {role}: no {sorted(missing)}"
        for name in STORAGE_ENV:
            assert "value" not in env[name], f"{where} {role}: {name} inline, not from a ref"
        for name in S3_SECRET_KEYS:
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == name and not ref.get("optional"), f"{where} {role}: {ref}"
        storage = env["RUNGWISE_STORAGE"]["valueFrom"]
        assert {"configMapKeyRef", "secretKeyRef"} & set(storage), storage
        endpoint = env["AWS_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]
        assert endpoint.get("optional") is True, "AWS S3 itself needs no endpoint"


def _refs(node: Any) -> set[tuple[str, str, str, bool]]:
    """(kind, name, key, optional) of every configMapKeyRef / secretKeyRef."""
    found = set()
    if isinstance(node, dict):
        for kind in ("configMapKeyRef", "secretKeyRef"):
            if kind in node:
                r = node[kind]
                found.add((kind, r["name"], r["key"], bool(r.get("optional"))))
        for v in node.values():
            found |= _refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= _refs(v)
    return found


def test_readme_says_how_to_create_every_referenced_secret_and_configmap() -> None:
    text = README.read_text()
    refs = set().union(*(_refs(doc) for p in K8S_MANIFESTS for doc in load_docs(p)))
    for kind, name, key, optional in sorted(refs):
        what = "secret generic" if kind == "secretKeyRef" else "configmap"
        assert re.search(rf"kubectl create {what} {re.escape(name)}\b", text), \
            f"infra/README.md never shows `kubectl create {what} {name}`"
        if not optional:
            assert re.search(rf"\b{re.escape(key)}=", text), \
                f"infra/README.md never sets key {key} of {name}"


# --------------------------------------------------------------------------- MLflow in-cluster


def _mlflow_docs() -> dict[str, dict[str, Any]]:
    docs = load_docs(MLFLOW_K8S)
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert kinds == {("apps/v1", "Deployment"), ("v1", "Service")}, kinds
    return {d["kind"]: d for d in docs}


def test_mlflow_service_is_what_the_ray_pods_name() -> None:
    docs = _mlflow_docs()
    svc, dep = docs["Service"], docs["Deployment"]
    uris = {env_of(c)["MLFLOW_TRACKING_URI"]["value"]
            for _, spec in cluster_specs() for _, c in ray_containers(spec)}
    uris.add(env_of(_cron_container())["MLFLOW_TRACKING_URI"]["value"])
    assert uris == {f"http://{svc['metadata']['name']}:5000"}, uris
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", "MLflow has no auth here"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 5000
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), "the Service selects no pod"
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    target = port["targetPort"]
    assert named.get(target, target) == 5000, f"targetPort {target} is not the server's port"


def test_mlflow_server_command_in_cluster() -> None:
    container = _mlflow_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    argv = exec_argv(container)
    assert argv[:2] == ["mlflow", "server"], argv

    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]
    backend = flag("--backend-store-uri")
    assert re.fullmatch(r"postgresql://\$\(PGUSER\)@\$\(PGHOST\):\d+/\$\(PGDATABASE\)", backend)
    assert flag("--artifacts-destination") == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert "--serve-artifacts" in argv and (flag("--host"), flag("--port")) == ("0.0.0.0", "5000")
    assert "mlflow:5000" in flag("--allowed-hosts").split(",")
    env = env_of(container)
    for name in ("PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    for name in ("PGUSER", "PGHOST", "PGDATABASE", "MLFLOW_ARTIFACTS_DESTINATION"):
        assert name in env, f"$({name}) would not be expanded"
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health", "MLflow exempts /health from the Host check"


# --------------------------------------------------------------------------- AWS launcher


def test_launcher_nodes_name_a_security_group_and_nothing_opens_the_world() -> None:
    cfg = load_one(LAUNCHER)
    for name, node_type in cfg["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert isinstance(groups, list) and groups, f"{name}: no SecurityGroupIds"
        assert all(re.fullmatch(r"sg-[\w-]+", g) for g in groups), groups
    text = LAUNCHER.read_text()
    assert "0.0.0.0/0" not in text and "::/0" not in text
    assert "security_group" not in cfg["provider"], "the launcher would create its own group"


def test_readme_describes_the_security_group() -> None:
    text = README.read_text()
    assert "aws ec2 create-security-group" in text
    rules = re.findall(r"aws ec2 authorize-security-group-ingress[^\n]*(?:\\\n[^\n]*)*", text)
    assert rules, "no ingress rules in infra/README.md"
    assert not any("0.0.0.0/0" in r or "::/0" in r for r in rules), rules
    assert any("--port 22" in r and "--cidr" in r for r in rules), "SSH from the operator's CIDR"
    assert any("UserIdGroupPairs" in r for r in rules), "Ray ports between group members"


def test_launcher_exports_the_storage_before_ray_starts() -> None:
    cfg = load_one(LAUNCHER)
    env_file = "~/.rungwise/storage.env"
    assert cfg["file_mounts"].get(env_file) == env_file
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmd = " ".join(cfg[key])
        sourced = re.search(rf"set -a; \. {re.escape(env_file)}\b", cmd)
        assert sourced and sourced.start() < cmd.index("ray start"), f"{key}: {cmd}"
