"""The dependency rules of the code base, checked on the import statements of every module."""
import ast
from pathlib import Path

from conftest import REPO

# The data path: loaders and the modules they use. They deliver `cskd.batch.Batch` and must not
# know the methods that consume it.
LOADER_MODULES = ("batch", "dataset", "ffcv_loader", "device_loader", "loaders", "augment", "orders")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_trainer_package_never_imports_launchers_or_converters():
    files = sorted((REPO / "cskd").rglob("*.py"))
    assert len(files) > 20
    offending = {str(f.relative_to(REPO)): sorted(m for m in imported_modules(f)
                                                  if m.split(".")[0] in ("launch", "datasets_prep"))
                 for f in files}
    assert {f: m for f, m in offending.items() if m} == {}


def test_loaders_do_not_import_methods():
    for name in LOADER_MODULES:
        modules = imported_modules(REPO / "cskd" / f"{name}.py")
        assert not any(m == "cskd.methods" or m.startswith("cskd.methods.") for m in modules), name
    # and the check itself sees imports where they are: the trainer does import the methods
    assert "cskd.methods" in imported_modules(REPO / "cskd" / "train.py")
