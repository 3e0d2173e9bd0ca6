"""Static checks of everything under infra/: no docker, no cluster, no network.

Each YAML file is parsed with yaml.safe_load_all and the Dockerfiles are read as text; the tests
assert the fields a deployment depends on, that the files agree with each other and with
pyproject.toml, that every `rungwise <sub>` they run is a real subcommand, and that no file
carries a secret.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from croniter import croniter

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"

DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
CRONJOB = INFRA / "kubernetes" / "cronjob.yaml"
MLFLOW_K8S = INFRA / "kubernetes" / "mlflow.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
ENV_EXAMPLE = INFRA / "mlflow" / ".env.example"
LAUNCHER = INFRA / "cluster" / "aws.yaml"
README = INFRA / "README.md"
DEMO_SPEC = ROOT / "examples" / "adult.yaml"

REQUIRED_FILES = [DOCKERFILE, DOCKERIGNORE, RAYCLUSTER, RAYJOB, CRONJOB, MLFLOW_K8S, COMPOSE,
                  MLFLOW_DOCKERFILE, ENV_EXAMPLE, LAUNCHER, README]

# The CLI's subcommands (jobs/cli.py and the job commands it registers in jobs/commands.py).
KNOWN_SUBCOMMANDS = {"inspect", "train", "tune", "retrain", "predict", "submit", "schedule", "jobs"}

AUTH_SECRET_KEY = "auth_token"  # KubeRay's data key for the token in an auth Secret
GPU = "nvidia.com/gpu"


# --------------------------------------------------------------------------- helpers


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def load_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict), f"{path.name}: top level is not a mapping"
    return docs[0]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEM = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEM_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def cpu_cores(q: Any) -> float:
    m = _CPU.match(str(q))
    assert m, f"not a Kubernetes CPU quantity: {q!r}"
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def mem_bytes(q: Any) -> float:
    m = _MEM.match(str(q))
    assert m, f"not a Kubernetes memory quantity: {q!r}"
    return float(m.group(1)) * _MEM_UNITS[m.group(2)]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(label, RayClusterSpec) for the RayCluster and the cluster embedded in the RayJob."""
    return [(rel(RAYCLUSTER), load_one(RAYCLUSTER)["spec"]),
            (rel(RAYJOB), load_one(RAYJOB)["spec"]["rayClusterSpec"])]


CLUSTER_IDS = [rel(RAYCLUSTER), rel(RAYJOB)]


@pytest.fixture(params=[0, 1], ids=CLUSTER_IDS)
def cluster(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return cluster_specs()[request.param]


def ray_containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    for c in head:
        yield "head", c
    for group in spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            yield f"worker group {group['groupName']}", c


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = container.get("env") or []
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env names in {container['name']}: {names}"
    return {e["name"]: e for e in env}


def assert_resources(where: str, container: dict[str, Any]) -> None:
    res = container.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for key in ("cpu", "memory"):
        assert key in req, f"{where}: container {container['name']} has no requests.{key}"
        assert key in lim, f"{where}: container {container['name']} has no limits.{key}"
    assert cpu_cores(req["cpu"]) <= cpu_cores(lim["cpu"]), f"{where}: cpu request > limit"
    assert mem_bytes(req["memory"]) <= mem_bytes(lim["memory"]), f"{where}: memory request > limit"
    if GPU in req or GPU in lim:
        # Kubernetes requires extended resources to have request == limit.
        assert req.get(GPU) == lim.get(GPU), f"{where}: {GPU} request and limit differ"


def image_of(where: str, container: dict[str, Any]) -> str:
    image = container.get("image")
    assert isinstance(image, str) and image.strip(), f"{where}: container without an image"
    name, _, tag = image.rpartition(":")
    assert name and tag and "/" not in tag, f"{where}: image {image!r} has no tag"
    assert tag != "latest", f"{where}: image {image!r} is not pinned"
    return image


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.match(rf"^{re.escape(package)}(\[[^\]]*\])?\s*(.*)$", dep)
        if m:
            return m.group(2).strip()
    raise AssertionError(f"{package} not in pyproject dependencies")


def dockerfile_arg_default(text: str, name: str) -> str | None:
    m = re.search(rf"^ARG\s+{name}=(\S+)\s*$", text, re.M)
    return m.group(1) if m else None


def command_text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return " ".join(str(value or "").split())


# --------------------------------------------------------------------------- all files


@pytest.mark.parametrize("path", REQUIRED_FILES, ids=rel)
def test_required_file_exists(path: Path) -> None:
    assert path.is_file(), f"missing {rel(path)}"
    assert path.read_text(encoding="utf-8").strip(), f"{rel(path)} is empty"


def test_every_yaml_file_is_listed() -> None:
    """A new YAML file under infra/ must be added to the checks above."""
    known = {RAYCLUSTER, RAYJOB, CRONJOB, MLFLOW_K8S, COMPOSE, LAUNCHER}
    assert set(yaml_files()) == known


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses_to_mappings(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{rel(path)} has no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{rel(path)}: a document is not a mapping"


@pytest.mark.parametrize(("path", "api_version", "kind"), [
    (RAYCLUSTER, "ray.io/v1", "RayCluster"),
    (RAYJOB, "ray.io/v1", "RayJob"),
    (CRONJOB, "batch/v1", "CronJob"),
], ids=lambda v: rel(v) if isinstance(v, Path) else str(v))
def test_kubernetes_kind_and_api_version(path: Path, api_version: str, kind: str) -> None:
    doc = load_one(path)
    assert doc["apiVersion"] == api_version
    assert doc["kind"] == kind
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


# --------------------------------------------------------------------------- RayCluster / RayJob


def test_ray_version_matches_pyproject(cluster: tuple[str, dict[str, Any]]) -> None:
    where, spec = cluster
    assert spec["rayVersion"] == "2.60.0", f"{where}: rayVersion {spec['rayVersion']!r}"
    assert isinstance(spec["rayVersion"], str)
    assert pyproject_pin("ray") == "==" + spec["rayVersion"], "rayVersion != pyproject's ray pin"


def test_ray_start_params_are_strings(cluster: tuple[str, dict[str, Any]]) -> None:
    """KubeRay's CRD types rayStartParams as map[string]string: 0 must be written "0"."""
    where, spec = cluster
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for key, value in (group.get("rayStartParams") or {}).items():
            assert isinstance(value, str), \
                f"{where}: rayStartParams.{key} = {value!r} is not a string"


def test_head_has_no_gpu(cluster: tuple[str, dict[str, Any]]) -> None:
    where, spec = cluster
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", f"{where}: head must set num-gpus '0'"
    for c in head["template"]["spec"]["containers"]:
        res = c.get("resources") or {}
        for section in ("requests", "limits"):
            assert GPU not in (res.get(section) or {}), f"{where}: head container asks for a GPU"


def test_head_dashboard_stays_inside_the_cluster(cluster: tuple[str, dict[str, Any]]) -> None:
    where, spec = cluster
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head service exposed"
    assert not head.get("enableIngress", False), f"{where}: dashboard ingress enabled"


def test_gpu_worker_group(cluster: tuple[str, dict[str, Any]]) -> None:
    where, spec = cluster
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        lo, hi = group["minReplicas"], group["maxReplicas"]
        replicas = group.get("replicas", lo)
        assert 0 <= lo <= replicas <= hi, f"{where}: {group['groupName']} replicas out of bounds"
        assert hi >= 1, f"{where}: {group['groupName']} can never have a worker"
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources") or {}
            if int((res.get("limits") or {}).get(GPU, 0)) >= 1:
                assert int(res["requests"][GPU]) >= 1
                gpu_groups.append(group)
    assert gpu_groups, f"{where}: no worker group requests {GPU}"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
    assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), \
        f"{where}: GPU group cannot scale"


def test_ray_containers_have_image_and_resources(cluster: tuple[str, dict[str, Any]]) -> None:
    where, spec = cluster
    images = set()
    for role, c in ray_containers(spec):
        images.add(image_of(f"{where} {role}", c))
        assert_resources(f"{where} {role}", c)
    # Head and workers must run the same Python and Ray: one image.
    assert len(images) == 1, f"{where}: head and workers use different images {images}"
    assert next(iter(images)).rpartition(":")[0].endswith("rungwise"), images
    autoscaler = spec.get("autoscalerOptions") or {}
    if autoscaler:
        assert "requests" in autoscaler["resources"] and "limits" in autoscaler["resources"]


def test_token_authentication(cluster: tuple[str, dict[str, Any]]) -> None:
    where, spec = cluster
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", f"{where}: authOptions.mode must be token"
    secret = auth.get("secretName")
    assert secret, f"{where}: authOptions.secretName names the token Secret"
    for role, c in ray_containers(spec):
        env = env_of(c)
        mode = env.get("RAY_AUTH_MODE", {}).get("value")
        assert mode == "token", f"{where} {role}: RAY_AUTH_MODE={mode!r}"
        tok = env.get("RAY_AUTH_TOKEN")
        assert tok is not None, f"{where} {role}: no RAY_AUTH_TOKEN"
        assert "value" not in tok, f"{where} {role}: RAY_AUTH_TOKEN must come from a Secret"
        ref = tok["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret, "key": AUTH_SECRET_KEY}, f"{where} {role}: {ref}"


def test_tracking_uri_reaches_every_ray_node(cluster: tuple[str, dict[str, Any]]) -> None:
    where, spec = cluster
    for role, c in ray_containers(spec):
        uri = env_of(c).get("MLFLOW_TRACKING_URI", {}).get("value", "")
        assert re.match(r"^https?://[\w.-]+:\d+/?$", uri), \
            f"{where} {role}: MLFLOW_TRACKING_URI {uri!r}"


def test_rayjob_runs_the_sweep_and_cleans_up() -> None:
    spec = load_one(RAYJOB)["spec"]
    entry = spec["entrypoint"]
    assert "-m jobs tune" in entry, entry
    assert "/app/examples/adult.yaml" in entry, "the spec baked into the image"
    assert spec["shutdownAfterJobFinishes"] is True
    ttl = spec["ttlSecondsAfterFinished"]
    assert isinstance(ttl, int) and ttl >= 0
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "SidecarMode"}


def test_all_kubernetes_workloads_share_one_auth_secret() -> None:
    secrets = {spec["authOptions"]["secretName"] for _, spec in cluster_specs()}
    cron_env = env_of(_cron_container())
    secrets.add(cron_env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    assert len(secrets) == 1, secrets


# --------------------------------------------------------------------------- CronJob


def _cron_container() -> dict[str, Any]:
    pod = load_one(CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    containers = pod["containers"]
    assert len(containers) == 1
    return containers[0]


def test_cronjob_schedule_and_concurrency() -> None:
    spec = load_one(CRONJOB)["spec"]
    schedule = spec["schedule"]
    assert isinstance(schedule, str)
    assert len(schedule.split()) == 5, f"not a 5-field cron expression: {schedule!r}"
    assert croniter.is_valid(schedule), schedule
    assert spec["concurrencyPolicy"] == "Forbid", "two retrains must never run at once"
    job = spec["jobTemplate"]["spec"]
    assert job["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


def test_cronjob_matches_the_spec_schedule() -> None:
    if not DEMO_SPEC.is_file():
        pytest.skip("examples/adult.yaml not present")
    cron = (yaml.safe_load(DEMO_SPEC.read_text()) or {}).get("schedule", {}).get("cron")
    if not cron:
        pytest.skip("the demo spec has no schedule.cron")
    assert load_one(CRONJOB)["spec"]["schedule"] == cron


def test_cronjob_runs_retrain() -> None:
    c = _cron_container()
    image_of(rel(CRONJOB), c)
    assert_resources(rel(CRONJOB), c)
    # Flags only: the words of the command itself are checked as argv, item by item, in
    # test_manifests.py::test_cronjob_entrypoint_is_one_argv_word_per_word.
    cmd = command_text(c.get("command")) + " " + command_text(c.get("args"))
    # Either `ray job submit ... -- python -m jobs retrain SPEC` or
    # `rungwise submit SPEC --command retrain --follow`: both wait for the Ray job to end.
    via_submit = re.search(r"rungwise submit\b.*--command[ =]retrain\b", cmd)
    assert "-m jobs retrain" in cmd or via_submit, cmd
    if via_submit:
        assert "--follow" in cmd, "without --follow the pod ends when the job starts"
    assert "/app/examples/adult.yaml" in cmd, cmd
    env = env_of(c)
    assert env["MLFLOW_TRACKING_URI"].get("value", "").startswith("http"), "MLFLOW_TRACKING_URI"
    if cmd.startswith("ray job submit") or "rungwise submit" in cmd:
        # A client of the token-protected cluster: token from the Secret, never inline.
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert "--no-wait" not in cmd, "Forbid only works while the pod waits for the Ray job"
        assert re.search(r"--address\s+https?://rungwise-head-svc[.:]", cmd), \
            "submit to the RayCluster's head service (<name>-head-svc)"


def test_cronjob_targets_the_raycluster_head_service() -> None:
    name = load_one(RAYCLUSTER)["metadata"]["name"]
    cmd = command_text(_cron_container().get("args"))
    if "--address" in cmd:
        assert f"{name}-head-svc" in cmd


# --------------------------------------------------------------------------- MLflow compose


def _services() -> dict[str, Any]:
    return load_one(COMPOSE)["services"]


def _mlflow_command() -> list[str]:
    cmd = _services()["mlflow"]["command"]
    return [str(a) for a in cmd] if isinstance(cmd, list) else shlex.split(cmd)


def _flag(args: list[str], name: str) -> str:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in mlflow command {args}")


def test_compose_services() -> None:
    services = _services()
    assert {"postgres", "minio", "mlflow"} <= set(services)
    init = [n for n, s in services.items() if "minio/mc" in s.get("image", "")]
    assert init, "no bucket-creation (minio/mc) service"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "minio/minio" in services["minio"]["image"]
    for name in ("postgres", "minio", "mlflow"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
    deps = services["mlflow"]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps[init[0]]["condition"] == "service_completed_successfully"
    mc_cmd = command_text(services[init[0]].get("command"))
    assert "mc mb" in mc_cmd and "local/mlflow" in mc_cmd, "the artifact bucket is created"


def test_compose_images_are_pinned() -> None:
    for name, svc in _services().items():
        if "build" in svc:
            continue
        image_of(f"{rel(COMPOSE)} {name}", svc)


def test_mlflow_server_command() -> None:
    args = _mlflow_command()
    assert args[:2] == ["mlflow", "server"], args
    backend = _flag(args, "--backend-store-uri")
    assert backend.startswith("postgresql://"), backend
    plain = re.sub(r"\$\{[^}]*\}", "VAR", backend)  # compose interpolations
    assert not re.match(r"^postgresql://[^@/]*:[^@/]*@", plain), "password inside the URI"
    artifacts = _flag(args, "--artifacts-destination")
    assert artifacts.startswith("s3://"), artifacts
    assert "--no-serve-artifacts" not in args
    assert _flag(args, "--port") == "5000"
    assert _flag(args, "--host") == "0.0.0.0"  # inside the container; the host side is 127.0.0.1
    allowed = _flag(args, "--allowed-hosts").split(",")
    assert "mlflow:5000" in allowed, "containers on the compose network must be allowed"


def test_mlflow_server_environment() -> None:
    env = _services()["mlflow"]["environment"]
    assert isinstance(env, dict)
    assert env["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert str(env[key]).startswith("${"), f"{key} must come from the env file"


def test_compose_ports_bind_localhost_only() -> None:
    published = 0
    for name, svc in _services().items():
        for port in svc.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: port {port!r} not on 127.0.0.1"
    assert published, "the MLflow port must be published (on 127.0.0.1)"
    assert "127.0.0.1:5000:5000" in [str(p) for p in _services()["mlflow"]["ports"]]
    assert "ports" not in _services()["postgres"], "the database is not published"


def test_compose_variables_are_defined_in_env_example() -> None:
    text = COMPOSE.read_text()
    # ${VAR}, ${VAR:-default}, ${VAR:?error}; $${VAR} is for the container's shell.
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}", text))
    defined = set(_env_example())
    assert used, "compose interpolates nothing from .env?"
    assert used <= defined, f"not in .env.example: {sorted(used - defined)}"


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip()
    return out


def test_env_example_holds_placeholders_only() -> None:
    env = _env_example()
    for key, value in env.items():
        if _looks_secret(key):
            assert _is_placeholder(value), f".env.example: {key} must be a change-me placeholder"


def test_mlflow_image() -> None:
    text = MLFLOW_DOCKERFILE.read_text()
    assert re.search(r"^FROM\s+python:3\.11", text, re.M)
    version = dockerfile_arg_default(text, "MLFLOW_VERSION")
    assert version == "3.17.*", version
    # The server and the client rungwise installs have the same minor version.
    assert pyproject_pin("mlflow") in {">=3.17,<3.18", ">=3.17, <3.18"}
    assert "mlflow==${MLFLOW_VERSION}" in text
    for pkg in ("psycopg2-binary", "boto3"):
        assert pkg in text, pkg
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0", "0:0"}
    build = _services()["mlflow"]["build"]
    context = COMPOSE.parent / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (context / dockerfile).resolve() == MLFLOW_DOCKERFILE.resolve()


def test_mlflow_env_file_is_git_and_build_ignored() -> None:
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()
    ignore = (INFRA / "mlflow" / ".dockerignore").read_text().split()
    assert "*" in ignore or ".env" in ignore


# --------------------------------------------------------------------------- cluster launcher


def test_launcher_provider_and_auth() -> None:
    cfg = load_one(LAUNCHER)
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", cfg["provider"]["region"])
    assert cfg["auth"]["ssh_user"]
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] >= 1


def test_launcher_node_types() -> None:
    cfg = load_one(LAUNCHER)
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types, "head_node_type must be one of available_node_types"
    assert not types[head].get("resources", {}).get("GPU"), "the head must not offer a GPU"
    assert "CPU" in types[head].get("resources", {})
    assert types[head]["node_config"]["InstanceType"].startswith("m5.")
    gpu_types = [n for n, t in types.items()
                 if n != head and t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    for name in gpu_types:
        t = types[name]
        assert t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5"))
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]


def test_launcher_runs_the_project_image() -> None:
    cfg = load_one(LAUNCHER)
    docker = cfg["docker"]
    image = image_of(rel(LAUNCHER), docker)
    assert image.rpartition(":")[0].endswith("rungwise")
    assert image.endswith("-cuda"), "GPU workers need the cuda variant"
    run_options = " ".join(docker.get("run_options", []))
    # The launcher starts `docker run ... IMAGE bash`: the rungwise ENTRYPOINT must be cleared.
    assert re.search(r"--entrypoint(=|\s+)(\"\"|'')", run_options), run_options


def test_launcher_ray_start_commands() -> None:
    cfg = load_one(LAUNCHER)
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head
    assert re.search(r"--dashboard-host[ =]127\.0\.0\.1\b", head), "dashboard on loopback only"
    assert "0.0.0.0" not in head
    assert "--num-gpus=0" in head or "--num-gpus 0" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    all_cmds = head + " " + workers + " " + " ".join(cfg["docker"].get("run_options", []))
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers, all_cmds
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert isinstance(cfg[key], list), key


def test_launcher_copies_the_token_file() -> None:
    mounts = load_one(LAUNCHER)["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> str:
    return DOCKERFILE.read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_variant_and_versions() -> None:
    text = _dockerfile()
    assert dockerfile_arg_default(text, "VARIANT") == "cpu"
    assert pyproject_pin("torch") == f"=={dockerfile_arg_default(text, 'TORCH_VERSION')}"
    assert pyproject_pin("ray") == f"=={dockerfile_arg_default(text, 'RAY_VERSION')}"
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"https://download\.pytorch\.org/whl/(cu\d+|\$\{CUDA_TAG\})", text)
    cuda_tag = dockerfile_arg_default(text, "CUDA_TAG")
    assert cuda_tag is None or re.fullmatch(r"cu\d{3}", cuda_tag), cuda_tag
    froms = [args for ins, args in _instructions(text) if ins == "FROM"]
    assert any("cpu" in f for f in froms) and any(("gpu" in f or "cuda" in f) for f in froms)
    assert any("${VARIANT}" in f for f in froms), "VARIANT must select the base"


def test_dockerfile_installs_the_project() -> None:
    runs = " ".join(args for ins, args in _instructions(_dockerfile()) if ins == "RUN")
    assert re.search(r"pip install(\s+--?\S+)*\s+(\.|/app/?)(\s|$|&|;)", runs), runs
    copies = [args for ins, args in _instructions(_dockerfile()) if ins == "COPY"]
    for needed in ("pyproject.toml", "trainer", "tuning", "jobs", "examples", "data"):
        assert any(needed in c for c in copies), f"{needed} not copied into the image"


def test_dockerfile_entrypoint_and_user() -> None:
    ins = _instructions(_dockerfile())
    entry = [args for i, args in ins if i == "ENTRYPOINT"]
    assert entry, "no ENTRYPOINT"
    assert json.loads(entry[-1]) == ["rungwise"], "exec-form ENTRYPOINT [\"rungwise\"]"
    users = [args for i, args in ins if i == "USER"]
    assert users, "no USER: the image would run as root"
    last = users[-1].split(":")[0]
    assert last not in {"root", "0"}, f"last USER is {users[-1]}"
    # The final stage itself switches user (a USER in an earlier stage does not carry over).
    last_from = max(n for n, (i, _) in enumerate(ins) if i == "FROM")
    assert any(i == "USER" for i, _ in ins[last_from:]), "final stage runs as the base's user"


def test_dockerignore_keeps_secrets_and_environments_out() -> None:
    patterns = {ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    for must in (".git", ".venv", "**/.env"):
        assert must in patterns, f"{must} not ignored"
    # ...but never what the image copies.
    for needed in ("trainer", "tuning", "jobs", "examples", "data", "pyproject.toml", "README.md"):
        assert needed not in patterns, f"{needed} is ignored but the image copies it"


# --------------------------------------------------------------------------- commands


_SUB = re.compile(r"(?:\brungwise|-m[ \t]+jobs)[ \t]+([a-z][\w-]*)")


def _yaml_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _yaml_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _yaml_strings(v)
    elif isinstance(node, str):
        yield node


def _rungwise_subcommands() -> list[tuple[str, str]]:
    """(file, subcommand) for every `rungwise <sub>` that infra files run: YAML string values
    (not comments), Dockerfile instructions, README code."""
    found: list[tuple[str, str]] = []
    sources: list[tuple[Path, str]] = [
        (p, "\n".join(s for doc in load_docs(p) for s in _yaml_strings(doc))) for p in yaml_files()]
    sources.append((DOCKERFILE, "\n".join(f"{i} {a}" for i, a in _instructions(_dockerfile())
                                          if i in {"RUN", "CMD", "ENTRYPOINT"})))
    readme_blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S)
    readme_inline = re.findall(r"`([^`\n]+)`", README.read_text())
    sources.append((README, "\n".join(readme_blocks + readme_inline)))
    for path, text in sources:
        for m in _SUB.finditer(text):
            found.append((rel(path), m.group(1)))
    # List-form commands: ["rungwise", "tune", ...]
    for path in yaml_files():
        for doc in load_docs(path):
            for seq in _string_lists(doc):
                for i, item in enumerate(seq[:-1]):
                    if item == "rungwise" or (item == "jobs" and i and seq[i - 1] == "-m"):
                        found.append((rel(path), seq[i + 1]))
    return found


def _string_lists(node: Any) -> Iterator[list[str]]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _string_lists(v)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node):
            yield node
        for v in node:
            yield from _string_lists(v)


def test_rungwise_commands_are_known_subcommands() -> None:
    found = _rungwise_subcommands()
    subs = {s for _, s in found}
    assert {"tune", "retrain"} <= subs, f"expected tune and retrain to be used, found {found}"
    unknown = [(f, s) for f, s in found if s not in KNOWN_SUBCOMMANDS]
    assert not unknown, f"unknown rungwise subcommands: {unknown}"


def test_rungwise_commands_exist_in_the_cli() -> None:
    """Against the real parser, once the CLI registers all of its subcommands."""
    cli = pytest.importorskip("jobs.cli")
    parser = cli.build_parser()
    choices: set[str] = set()
    for action in parser._actions:  # argparse keeps subparsers here
        if getattr(action, "choices", None) and isinstance(action.choices, dict):
            choices |= set(action.choices)
    if not KNOWN_SUBCOMMANDS - {"jobs"} <= choices:
        pytest.skip(f"CLI does not register all subcommands yet: {sorted(choices)}")
    used = {s for _, s in _rungwise_subcommands()}
    assert used <= choices, sorted(used - choices)


def test_readme_mentions_only_existing_infra_files() -> None:
    text = README.read_text()
    for ref in set(re.findall(r"(?<![\w/.-])infra/[\w./-]+", text)):
        ref = ref.rstrip(".")
        if ref == "infra/mlflow/.env":  # created by the user from .env.example, git-ignored
            continue
        assert (ROOT / ref).exists(), f"infra/README.md mentions {ref}, which does not exist"


def test_readme_covers_token_flow_and_port_forwarding() -> None:
    text = README.read_text()
    for needle in ("ray get-auth-token", "~/.ray/auth_token", "RAY_AUTH_TOKEN",
                   "RAY_AUTH_MODE=token", "kubectl port-forward", "8265", "ray dashboard",
                   "docker compose", "--build-arg VARIANT=cpu", "--build-arg VARIANT=cuda"):
        assert needle in text, f"infra/README.md does not cover {needle!r}"


# --------------------------------------------------------------------------- secrets

_SECRET_KEY = re.compile(r"(?i)(password|passwd|secret_access_key|secret_key|private_key|"
                         r"api_key|access_token|auth_token|^token$|_token$|_secret$)")
_PLACEHOLDER = re.compile(r"(?i)^(change-?me\b.*|<[^>]+>|\.\.\.|x{3,}|placeholder.*|)$")
_SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                                 # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),                       # GitHub tokens
    re.compile(r"xox[baprs]-[A-Za-z0-9-]{10,}"),                     # Slack tokens
    re.compile(r"://[^/\s:@$]+:(?!\$)[^@\s/]+@"),                    # user:password@ in a URI
]


def _looks_secret(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def _is_placeholder(value: str) -> bool:
    """A placeholder, a reference ($VAR, ${VAR}, $(VAR), {{ tpl }}) or a file path."""
    value = value.strip().strip("'\"")
    return (bool(_PLACEHOLDER.match(value)) or value.startswith(("${", "$(", "$${", "{{"))
            or bool(re.fullmatch(r"(~|\.{1,2})?/[\w./-]*", value)))


def _secret_findings(path: Path, text: str, docs: list[Any] | None) -> list[str]:
    problems = [f"{rel(path)}: matches {p.pattern}" for p in _SECRET_PATTERNS if p.search(text)]

    def walk(node: Any, trail: str) -> None:
        if isinstance(node, dict):
            # Kubernetes env entry: {name: X, value: Y}
            if "name" in node and "value" in node and _looks_secret(str(node["name"])):
                if not _is_placeholder(str(node["value"])):
                    problems.append(f"{rel(path)}: {trail}: env {node['name']} has a literal value")
            for k, v in node.items():
                if isinstance(v, str | int | float) and _looks_secret(str(k)) \
                        and not _is_placeholder(str(v)):
                    problems.append(f"{rel(path)}: {trail}.{k} has a literal value")
                walk(v, f"{trail}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, str) and "=" in v:  # compose list-form environment
                    k, _, val = v.partition("=")
                    if _looks_secret(k) and not _is_placeholder(val):
                        problems.append(f"{rel(path)}: {trail}[{i}] {k} has a literal value")
                walk(v, f"{trail}[{i}]")

    for doc in docs or []:
        walk(doc, "")
    if path.name.startswith(".env"):
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#") and _looks_secret(key) \
                    and not _is_placeholder(value):
                problems.append(f"{rel(path)}: {key} has a literal value")
    return problems


@pytest.mark.parametrize("path", text_files(), ids=rel)
def test_no_secrets_in_infra(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    docs = load_docs(path) if path.suffix in {".yaml", ".yml"} else None
    assert not _secret_findings(path, text, docs)


def test_no_real_env_file_in_infra() -> None:
    stray = [rel(p) for p in INFRA.rglob(".env") if p.is_file()]
    if stray:
        # A developer's filled-in .env is fine locally as long as git ignores it.
        assert (INFRA / "mlflow" / ".gitignore").is_file(), stray


@pytest.mark.parametrize(("name", "text", "docs"), [
    ("leaky.yaml", "", [{"env": [{"name": "RAY_AUTH_TOKEN", "value": "abc123def"}]}]),
    ("leaky.yaml", "", [{"services": {"db": {"environment": {"POSTGRES_PASSWORD": "hunter22"}}}}]),
    ("leaky.yaml", "", [{"services": {"db": {"environment": ["AWS_SECRET_ACCESS_KEY=abcd1234"]}}}]),
    ("leaky.yaml", "uri: postgresql://mlflow:hunter22@postgres/mlflow", None),
    ("leaky.yaml", "id: AKIAABCDEFGHIJKLMNOP", None),
    (".env.example", "POSTGRES_PASSWORD=hunter22\n", None),
])
def test_secret_scanner_catches_leaks(name: str, text: str, docs: list[Any] | None) -> None:
    """The scanner above must flag these, or test_no_secrets_in_infra proves nothing."""
    assert _secret_findings(INFRA / name, text, docs)


@pytest.mark.parametrize(("name", "text", "docs"), [
    ("ok.yaml", "", [{"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "s", "key": "auth_token"}}}]}]),
    ("ok.yaml", "", [{"environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set it}"}}]),
    ("ok.yaml", "uri: postgresql://${POSTGRES_USER:-mlflow}@postgres:5432/mlflow", None),
    (".env.example", "POSTGRES_PASSWORD=change-me-postgres\n", None),
])
def test_secret_scanner_accepts_references_and_placeholders(
        name: str, text: str, docs: list[Any] | None) -> None:
    assert not _secret_findings(INFRA / name, text, docs)
