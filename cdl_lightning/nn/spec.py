"""Modules that remember their constructor arguments, so a checkpoint can name and rebuild them without pickling."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, TypeVar

T = TypeVar("T")


class RecordsInitArgs:
    """Mixin: records the arguments of ``__init__`` at construction; `spec` returns them with the class path, in the
    ``{"class_path", "init_args"}`` form that YAML configs and jsonargparse use."""

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            if args or kwargs:
                raise
            return obj  # a bare ``__new__`` (copy.deepcopy, pickle): ``__dict__``, ``_init_args`` too, is restored next
        obj._init_args = dict(list(bound.arguments.items())[1:])
        return obj

    def spec(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` (tuples as lists); ``exclude`` drops arguments supplied at build time."""
        cls = type(self)
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in self._init_args.items() if k not in exclude}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def build_from_spec(spec: dict[str, Any], base: type[T], **extra: Any) -> T:
    """Instantiate ``spec["class_path"]`` (a subclass of ``base``) with ``spec["init_args"]`` and ``extra``."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{spec['class_path']} is not a {base.__name__}")
    return cls(**spec.get("init_args", {}), **extra)
