"""Registry readiness checks that need no ComfyUI: pyproject fields, no exec/eval, ignore file."""
import ast
import os

import tomllib

from support.pack_loader import REPO_ROOT


def load_pyproject():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_pyproject_has_what_the_registry_needs():
    data = load_pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] and "comfyui" not in project["name"].lower()
    major, minor, patch = project["version"].split(".")
    assert all(part.isdigit() for part in (major, minor, patch))
    assert project["license"] == {"file": "LICENSE"} and os.path.isfile(os.path.join(REPO_ROOT, "LICENSE"))
    assert not any(dep.split("=")[0].split(">")[0].strip().lower() in ("torch", "torchvision")
                   for dep in project.get("dependencies", []))
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]
    assert comfy["requires-comfyui"] == ">=0.3.64" and comfy["web"] == "js"
    assert os.path.isdir(os.path.join(REPO_ROOT, comfy["web"]))


def test_no_exec_or_eval_in_shipped_code():
    shipped = [os.path.join(REPO_ROOT, "__init__.py")]
    for folder in ("nodes", "multilora"):
        for base, _, names in os.walk(os.path.join(REPO_ROOT, folder)):
            shipped += [os.path.join(base, n) for n in names if n.endswith(".py")]
    for path in shipped:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not calls & {"exec", "eval", "compile", "__import__"}, path


def test_comfyignore_keeps_the_runtime_files():
    with open(os.path.join(REPO_ROOT, ".comfyignore"), encoding="utf-8") as f:
        ignored = {line.strip().rstrip("/") for line in f if line.strip() and not line.startswith("#")}
    assert {"tests", "bench"} <= ignored
    assert not ignored & {"nodes", "multilora", "js", "example_workflows", "__init__.py", "pyproject.toml", "README.md",
                          "LICENSE"}
