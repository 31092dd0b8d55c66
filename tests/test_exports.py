"""Every module's `__all__` names exist, and every package declares one (STYLE.md 7)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest

import defiwatch

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(defiwatch.__path__, "defiwatch.")
    if ".migrations" not in m.name and not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_public_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    for public in getattr(module, "__all__", ()):
        assert hasattr(module, public), f"{name}.__all__ names {public!r}, which is missing"


def is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


@pytest.mark.parametrize("name", [m for m in MODULES if is_package(m)])
def test_packages_declare_their_public_names(name: str) -> None:
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list | tuple), f"{name} has no __all__"
