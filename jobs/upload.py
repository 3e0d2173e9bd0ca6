"""What `rungwise submit` uploads as the job's working_dir, and the zip it hands to Ray.

rungwise does not let Ray walk the folder: Ray's walker (ray/_private/runtime_env/packaging.py,
2.60) follows symlinks to their targets and knows no secrets. Instead :func:`collect` lists the
files, :func:`write_zip` zips exactly that list, and the job's ``working_dir`` is that zip (Ray
uploads a local ``.zip`` byte for byte). ``--dry-run`` prints the zip's own entries.

Left out, in this order:

- files and folders matching :data:`SECRET_PATTERNS` (gitignore syntax; nothing re-includes them,
  not even a ``!pattern`` in ``.gitignore``);
- :data:`EXCLUDES` (run state, caches, environments, ``tests`` unless the spec lies in it);
- whatever a ``.gitignore`` or ``.rayignore`` in the folder or any subfolder ignores (each file's
  patterns relative to its folder, as Ray and git read them); ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``
  skips the ``.gitignore`` files, as it does for Ray;
- symlinks, unless they point at a file inside the folder that is itself uploaded (then that
  file's bytes go under the link's name); a link out of the folder is never followed.

The folder is the nearest one above the spec holding ``pyproject.toml`` (the project), or the one
``--working-dir`` names; a spec in no project is refused, and so is a project that is the home
folder or ``/`` itself.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import UserError

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec

    Ignores = list[tuple[str, GitIgnoreSpec]]
    """(folder relative to root, its ignore file's patterns) met on the way down."""

SECRET_PATTERNS = (
    # environment files, netrc-style credential files, package-manager tokens
    ".env", ".env.*", "*.env", ".envrc", ".netrc", "_netrc", ".pgpass", ".my.cnf", ".npmrc",
    ".pypirc", ".git-credentials", ".htpasswd", ".vault-token", ".databrickscfg",
    # keys and certificates
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx",
    "*.jks", "*.keystore", "*.gpg", "*.kdbx", "*.ovpn",
    # cloud and cluster credentials
    ".ssh/", ".gnupg/", ".aws/", ".azure/", ".gcloud/", "**/.config/gcloud/", ".kube/",
    "kubeconfig*", ".docker/", ".dockercfg", ".ray/", "auth_token", ".mlflow/", ".terraform/",
    "*.tfstate*", "*.tfvars", "service-account*.json", "*service_account*.json", "*-sa-key*.json",
    "credentials", "credentials.json", "client_secret*.json", "token.json", "*.secret",
    "secrets.y*ml", "secrets.json", "secrets.toml",
    # shell and REPL histories
    ".*history",
)
EXCLUDES = (".venv", "venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "rungwise-runs",
            "*.pyc", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
            ".hypothesis", "*.egg-info", "tests")
IGNORE_FILES = (".gitignore", ".rayignore")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same files give the same zip, so Ray reuses it


@dataclass(slots=True)
class Upload:
    """The files of one working_dir upload, relative to ``root`` (POSIX paths, sorted)."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    """Name in the zip -> the regular file whose bytes go there."""
    secrets: list[str] = field(default_factory=list)
    """Left out as secrets (names only)."""
    links: list[str] = field(default_factory=list)
    """Symlinks left out: pointing out of the folder, at a folder, or at a file not uploaded."""


# --- which folder ------------------------------------------------------------------------


def project_root(spec_file: Path, working_dir: str | None = None) -> Path:
    """``--working-dir``, else the nearest folder above the spec holding pyproject.toml."""
    spec_file = spec_file.resolve()
    if working_dir is not None:
        root = Path(working_dir).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"--working-dir {working_dir}: not a folder")
        if not spec_file.is_relative_to(root):
            raise UserError(f"--working-dir {working_dir}: the spec {spec_file} is not inside "
                            "it; the spec is uploaded with the folder and run from there")
        return root
    for folder in spec_file.parents:
        if (folder / "pyproject.toml").is_file():
            if folder in (Path.home().resolve(), Path(folder.anchor)):
                raise UserError(f"the project folder of {spec_file} would be {folder} (it holds "
                                "pyproject.toml), which is too broad to upload; pass "
                                "--working-dir with the project's own folder")
            return folder
    raise UserError(f"{spec_file} is in no project (no pyproject.toml in its folder or above), "
                    "so there is no folder to upload safely; pass --working-dir FOLDER (a folder "
                    "holding the spec; see --dry-run for what it would upload)")


def excludes_for(rel_spec: Path) -> list[str]:
    """The upload excludes, minus any that would drop the spec itself (tests/...)."""
    parts = rel_spec.parts
    return [p for p in EXCLUDES if not any(fnmatch.fnmatch(part, p) for part in parts)]


# --- which files -------------------------------------------------------------------------


class _Rules:
    """Gitignore-style matching: secrets, excludes, and the ignore files met on the way down."""

    def __init__(self, excludes: list[str], use_gitignore: bool) -> None:
        from pathspec import GitIgnoreSpec

        self._spec = GitIgnoreSpec.from_lines
        self.secret = self._spec(SECRET_PATTERNS)
        self.excluded = self._spec(excludes)
        self.names = IGNORE_FILES if use_gitignore else IGNORE_FILES[1:]

    def ignore_files(self, folder: Path, rel: str) -> Ignores:
        found: Ignores = []
        for name in self.names:
            path = folder / name
            if path.is_file() and not path.is_symlink():
                lines = path.read_text(errors="replace").splitlines()
                found.append((rel, self._spec(lines)))
        return found

    @staticmethod
    def ignored(rel: str, is_dir: bool, ignores: Ignores) -> bool:
        for base, spec in ignores:
            sub = rel[len(base) + 1:] if base else rel
            if spec.match_file(sub + "/" if is_dir else sub):
                return True
        return False


def collect(root: Path, excludes: list[str], use_gitignore: bool | None = None) -> Upload:
    """Walk root without following symlinks; see the module docstring for what is left out."""
    if use_gitignore is None:
        use_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    root = root.resolve()
    rules = _Rules(excludes, use_gitignore)
    upload, links = Upload(root=root), []
    stack: list[tuple[Path, str, Ignores]] = [(root, "", [])]
    while stack:
        folder, rel_folder, ignores = stack.pop()
        ignores = ignores + rules.ignore_files(folder, rel_folder)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            rel = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            probe = rel + "/" if is_dir else rel
            if rules.secret.match_file(probe):
                upload.secrets.append(probe)
            elif rules.excluded.match_file(probe) or rules.ignored(rel, is_dir, ignores):
                continue
            elif entry.is_symlink():
                links.append(rel)
            elif is_dir:
                stack.append((Path(entry.path), rel, ignores))
            elif entry.is_file(follow_symlinks=False):
                upload.files[rel] = Path(entry.path)
    _add_links(upload, links)
    upload.files = dict(sorted(upload.files.items()))
    upload.secrets.sort()
    return upload


def _add_links(upload: Upload, links: list[str]) -> None:
    """A link to a file inside root that is uploaded anyway carries that file; others go."""
    for rel in links:
        target = (upload.root / rel).resolve()
        inside = target.is_relative_to(upload.root)
        name = target.relative_to(upload.root).as_posix() if inside else None
        if name is not None and name in upload.files:
            upload.files[rel] = upload.files[name]
        else:
            upload.links.append(rel)
    upload.links.sort()


# --- the zip -------------------------------------------------------------------------------


def write_zip(upload: Upload, dest: Path) -> Path:
    """Zip exactly ``upload.files`` (no symlink is opened), with fixed timestamps."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, path in upload.files.items():
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                mode = os.fstat(fh.fileno()).st_mode
                if not stat.S_ISREG(mode):  # replaced since it was listed
                    raise UserError(f"{path} changed while packaging; run again")
                info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
                info.external_attr = (stat.S_IFREG | (mode & 0o755)) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, fh.read())
    return dest
