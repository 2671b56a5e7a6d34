"""The import rules of ARCHITECTURE.md, checked on the source tree with `ast` (not regexes).

Every module of `nbdsrv/`, `postcopy/` and `plugin/` (installed as `postcopy_plugin`) is parsed;
its imports are every `import` and `from ... import` anywhere in it (also inside functions),
relative ones resolved, plus `importlib.import_module("literal")` calls and every string literal
that is exactly a dotted name in postcopy (a table of modules loaded by name).  The rules:

- `nbdsrv` never imports `postcopy` (nor the plugin): the NBD library stands alone;
- a module named `*_core` (a sans-IO protocol core) never imports trio;
- nothing outside `postcopy.kit` imports `postcopy.kit`, except the doors in `KIT_DOORS` (the
  `postcopy demo` command, loaded by name from `postcopy.cli`); tests and bench may;
- `postcopy.destination` never imports `postcopy.cli` or `postcopy.commands`.

The checker is also run on synthetic trees that break each rule, so that it is known to fail.
A last test keeps pyproject's explicit package list equal to the packages in the tree."""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
# top-level source folder -> the package name it is installed as
SOURCE_PACKAGES = {"nbdsrv": "nbdsrv", "postcopy": "postcopy", "plugin": "postcopy_plugin"}
# (importer, imported): the documented entry points from the product into the kit
KIT_DOORS = {("postcopy.cli", "postcopy.kit.demo_command")}
DOTTED_POSTCOPY_NAME = re.compile(r"(postcopy|postcopy_plugin)(\.[A-Za-z_]\w*)+")


@dataclass(frozen=True)
class Violation:
    module: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.module} imports {self.imported}: {self.rule}"


def modules_of(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) of every Python module under the source folders of `root`."""
    for folder, package in SOURCE_PACKAGES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join([package, *parts]), path


def imports_of(module: str, path: Path) -> set[str]:
    """Every module name `module` imports (for `from a import b`: both `a` and `a.b`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and DOTTED_POSTCOPY_NAME.fullmatch(node.value)
        ):
            found.add(node.value)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def rule_violations(module: str, imported: set[str]) -> Iterator[Violation]:
    last = module.rsplit(".", 1)[-1]
    for name in sorted(imported):
        if within(module, "nbdsrv") and (within(name, "postcopy") or within(name, "postcopy_")):
            yield Violation(module, name, "nbdsrv never imports postcopy")
        if last.endswith("_core") and within(name, "trio"):
            yield Violation(module, name, "a sans-IO *_core module never imports trio")
        if (
            within(name, "postcopy.kit")
            and not within(module, "postcopy.kit")
            and (module, name) not in KIT_DOORS
        ):
            yield Violation(module, name, "product code never imports the kit")
        if within(module, "postcopy.destination") and (
            within(name, "postcopy.cli") or within(name, "postcopy.commands")
        ):
            yield Violation(module, name, "the destination never imports the CLI")


def check_tree(root: Path) -> list[Violation]:
    return [
        violation
        for module, path in modules_of(root)
        for violation in rule_violations(module, imports_of(module, path))
    ]


def test_the_tree_keeps_the_import_rules() -> None:
    modules = dict(modules_of(CHECKOUT))
    assert "postcopy.destination.engine" in modules and "postcopy_plugin.postcopy_plugin" in modules
    violations = check_tree(CHECKOUT)
    assert violations == [], "\n".join(map(str, violations))


def test_the_kit_door_is_used_as_documented() -> None:
    """The exception is real (else it is a stale allowance): the CLI loads the demo by name."""
    cli = imports_of("postcopy.cli", CHECKOUT / "postcopy" / "cli.py")
    assert {imported for importer, imported in KIT_DOORS if importer == "postcopy.cli"} <= cli


def write_module(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if parent != Path("."):
            (root / parent / "__init__.py").touch()
    path.write_text(text)


@pytest.mark.parametrize(
    ("relative", "text", "rule"),
    [
        ("nbdsrv/wire.py", "import postcopy.units\n", "nbdsrv never imports postcopy"),
        ("nbdsrv/x.py", "def f():\n    from postcopy import units\n",
         "nbdsrv never imports postcopy"),
        ("nbdsrv/server_core.py", "import trio\n", "a sans-IO *_core module never imports trio"),
        ("postcopy/destination/plan_core.py", "from trio import sleep\n",
         "a sans-IO *_core module never imports trio"),
        ("postcopy/destination/engine.py", "from postcopy.kit import workload\n",
         "product code never imports the kit"),
        ("postcopy/commands/serve.py", "from postcopy import kit\n",
         "product code never imports the kit"),
        ("plugin/postcopy_plugin.py", "import importlib\nimportlib.import_module('postcopy.kit')\n",
         "product code never imports the kit"),
        ("postcopy/cli.py", "COMMANDS = ('postcopy.commands.serve', 'postcopy.kit.vm_demo')\n",
         "product code never imports the kit"),
        ("postcopy/destination/receive.py", "from ..commands import receive\n",
         "the destination never imports the CLI"),
        ("postcopy/destination/status.py", "import postcopy.cli\n",
         "the destination never imports the CLI"),
        ("postcopy/kit/demo.py", "from postcopy.kit import netns\nimport trio\n", None),
        ("postcopy/cli.py", "KIT_COMMANDS = ('postcopy.kit.demo_command',)\n", None),
    ],
)  # fmt: skip
def test_the_checker_catches_a_broken_rule(
    tmp_path: Path, relative: str, text: str, rule: str | None
) -> None:
    write_module(tmp_path, relative, text)
    found = {violation.rule for violation in check_tree(tmp_path)}
    assert found == ({rule} if rule else set()), found


def test_pyproject_lists_every_package_of_the_tree() -> None:
    """pyproject names its packages one by one (plugin/ is installed as postcopy_plugin)."""
    config = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    in_tree = {
        module
        for module, path in modules_of(CHECKOUT)
        if path.name == "__init__.py"
    }
    assert listed == in_tree
    assert config["tool"]["setuptools"]["package-dir"] == {"postcopy_plugin": "plugin"}
