"""Lazy re-exports for the core's packages (PEP 562 module ``__getattr__``).

Each package of ``ca/`` names its public API in its ``__init__``; a name is imported from its
module on first use. Importing every module eagerly from ``__init__`` would tie the packages
into import cycles (issuance needs the authorities, which create CAs by issuing).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` whose public ``names`` live in its modules."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__, sorted(names)
