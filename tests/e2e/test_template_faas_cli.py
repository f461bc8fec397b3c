"""What faas-cli does with the python3-llm template, reproduced as file operations.

docs/contract.md "faas-cli templates": ``template pull`` copies ``<repo>/template/<lang>/``;
``new`` checks the name, copies the handler folder and writes ``stack.yaml``;
``build --shrinkwrap`` overlays the handler folder on a copy of the template. The
repository keeps one source (``templates/``) and a relative ``template`` symlink.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "templates" / "python3-llm"
FUNCTION_FILES = {
    "handler.py",
    "handler_test.py",
    "requirements.txt",
    "tox.ini",
    "openai_api.py",
    "generation.py",
    "batching.py",
    "admission.py",
}


def files_in(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".tox" not in p.parts
    }


def test_template_is_a_relative_symlink_to_templates_in_git() -> None:
    link = REPO / "template"
    assert link.is_symlink()
    assert os.readlink(link) == "templates"  # relative: survives any clone location
    assert (link / "python3-llm").resolve() == SOURCE.resolve()
    staged = subprocess.run(
        ["git", "ls-files", "--stage", "template"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert staged[0] == "120000", "git must store template as a symlink, not a copy"


def test_template_pull_finds_python3_llm_through_the_link(faas_cli) -> None:
    faas_cli.template_pull(REPO)
    pulled = faas_cli.workdir / "template" / "python3-llm"
    assert not pulled.is_symlink()
    assert files_in(pulled) == files_in(SOURCE)
    _, mismatch, errors = filecmp.cmpfiles(SOURCE, pulled, sorted(files_in(SOURCE)), False)
    assert (mismatch, errors) == ([], [])


def test_template_yml_declares_what_faas_cli_reads() -> None:
    meta = yaml.safe_load((SOURCE / "template.yml").read_text())
    assert meta["language"] == "python3-llm"
    assert meta["fprocess"] == DockerfileParser(str(SOURCE / "Dockerfile")).envs["fprocess"]
    assert meta["welcome_message"].strip()
    for option in meta["build_options"]:
        assert set(option) == {"name", "packages"} and option["packages"]
    # handler_folder is left to its default, function/, which must exist.
    assert meta.get("handler_folder", "function") == "function"
    assert files_in(SOURCE / "function") >= FUNCTION_FILES


@pytest.mark.parametrize("name", ["chat", "my-fn", "fn2", "a", "0x"])
def test_new_accepts_dns_style_names(faas_cli, name: str) -> None:
    faas_cli.template_pull(REPO)
    assert faas_cli.new(name, "python3-llm").is_dir()


@pytest.mark.parametrize("name", ["My-Fn", "-fn", "fn-", "fn_x", "fn.x", ""])
def test_new_rejects_other_names(faas_cli, name: str) -> None:
    faas_cli.template_pull(REPO)
    with pytest.raises(ValueError):
        faas_cli.new(name, "python3-llm")


def test_new_copies_the_handler_folder_and_writes_stack_yaml(faas_cli) -> None:
    faas_cli.template_pull(REPO)
    handler = faas_cli.new("chat", "python3-llm")
    assert files_in(handler) == files_in(SOURCE / "function")
    faas_cli.new("summarise", "python3-llm")
    stack = yaml.safe_load((faas_cli.workdir / "stack.yaml").read_text())
    assert stack["version"] == 1.0
    assert stack["provider"]["name"] == "openfaas"
    assert stack["functions"]["chat"] == {
        "lang": "python3-llm",
        "handler": "./chat",
        "image": "chat:latest",
    }
    assert set(stack["functions"]) == {"chat", "summarise"}


def test_shrinkwrap_overlays_the_users_handler_on_the_template(faas_cli) -> None:
    faas_cli.template_pull(REPO)
    handler = faas_cli.new("echo", "python3-llm")
    (handler / "handler.py").write_text("def handle(event, context):\n    return event.body\n")
    (handler / "openai_api.py").unlink()
    (handler / "prompts").mkdir()
    (handler / "prompts" / "system.txt").write_text("be brief")
    context = faas_cli.shrinkwrap()["echo"]
    assert (context / "function" / "handler.py").read_text().startswith("def handle")
    assert (context / "function" / "prompts" / "system.txt").read_text() == "be brief"
    # An overlay: what the user removed is still there from the template.
    assert (context / "function" / "openai_api.py").exists()
    for runtime_file in ("Dockerfile", "index.py", "model_cache.py"):
        assert (context / runtime_file).is_file()


def test_the_repository_stack_yml_builds_with_this_template() -> None:
    stack = yaml.safe_load((REPO / "stack.yml").read_text())
    (fn,) = stack["functions"].values()
    assert fn["lang"] == "python3-llm"
    assert (REPO / fn["handler"]).is_dir()
    assert (REPO / "template" / fn["lang"] / "template.yml").is_file()
    assert fn["annotations"]["com.openfaas.profile"] == "gpu"
    env = fn["environment"]
    for timeout in ("read_timeout", "write_timeout", "exec_timeout"):
        assert int(env[timeout].rstrip("s")) >= 120, timeout
    # faas-cli only knows memory and cpu limits; the GPU comes from the profile.
    assert set(fn.get("limits", {})) <= {"memory", "cpu"}
