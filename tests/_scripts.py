"""Imports a file of ``scripts/`` as a module, so tests can call its functions (``main(cfg)`` among them)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def import_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass annotations are resolved through sys.modules
    spec.loader.exec_module(module)
    return module
