"""The house as built: the import layers of pyproject.toml's import-linter contracts hold, every
foundation module is inside them, plugins reach inspector only through the plugin contract, and the
things there is one of (the log throttle, the verdicts, the way to S3) stay one."""

import ast
import importlib
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

import inspector

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_the_import_contracts_hold():
    run = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_every_module_of_inspector_is_in_a_layer():
    layers = contracts()["layers"]["layers"]
    named = {name.strip() for layer in layers for name in layer.split(":")}
    top = {f"inspector.{m.name}" for m in pkgutil.iter_modules(inspector.__path__)}
    assert top == named, f"not in a layer: {sorted(top - named)}; named but absent: {sorted(named - top)}"


def test_the_rooms_are_what_ls_shows():
    packages = {m.name for m in pkgutil.iter_modules(inspector.__path__) if m.ispkg}
    assert packages == {"worker", "tools", "stores"}


BUILT_IN_PLUGINS = ("inspector_dfkde", "inspector_null")


def test_plugins_import_only_the_plugin_contract_and_errors():
    graph = grimp.build_graph(*BUILT_IN_PLUGINS, "inspector")
    reached = set()
    for module in (m for plugin in BUILT_IN_PLUGINS for m in graph.find_descendants(plugin)):
        reached |= {m for m in graph.find_modules_directly_imported_by(module) if m.split(".")[0] == "inspector"}
    assert reached <= {"inspector.plugin", "inspector.errors"}, sorted(reached)


def test_every_package_folder_is_installed_under_its_own_name():
    """A package folder the setuptools table forgets is missing from every wheel and image; the plugins/
    folder is not itself a package, so no distribution installs a top-level `plugins`."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {str(init.parent.relative_to(ROOT)) for init in ROOT.glob("inspector/**/__init__.py")}
    expected = {folder.replace("/", ".") for folder in folders}
    expected |= {f"inspector_{init.parent.name}" for init in ROOT.glob("plugins/*/__init__.py")}
    assert set(setuptools["packages"]) == expected
    assert setuptools["package-dir"] == {f"inspector_{init.parent.name}": f"plugins/{init.parent.name}"
                                         for init in ROOT.glob("plugins/*/__init__.py")}
    assert not (ROOT / "plugins" / "__init__.py").exists()
    for plugin in BUILT_IN_PLUGINS:
        assert importlib.import_module(plugin).__file__.startswith(str(ROOT / "plugins")), plugin


def _sources() -> dict[str, ast.Module]:
    return {str(path.relative_to(ROOT)): ast.parse(path.read_text(), str(path))
            for path in sorted((ROOT / "inspector").rglob("*.py"))}


def test_the_things_there_is_one_of_are_defined_once():
    classes, verdicts, s3_requests = [], [], []
    for path, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.lstrip("_") == "Throttle":
                classes.append(path)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id in ("VERDICTS", "Verdict") for t in targets):
                verdicts.append(path)
            if isinstance(node, ast.Constant) and node.value in ("list_objects_v2", "delete_objects"):
                s3_requests.append(path)
            if isinstance(node, ast.Attribute) and node.attr in ("list_objects_v2", "delete_objects"):
                s3_requests.append(path)
    assert classes == ["inspector/logs.py"]
    assert verdicts == ["inspector/messages.py", "inspector/messages.py"]  # Verdict, and VERDICTS from it
    assert set(s3_requests) == {"inspector/stores/s3client.py"}
