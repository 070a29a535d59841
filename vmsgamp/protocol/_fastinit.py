"""Cheaper construction for the protocol's frozen dataclasses.

A frozen dataclass's generated ``__init__`` stores every field through
``object.__setattr__`` (its own ``__setattr__`` refuses), about 0.1 us a
field on CPython 3.11: more than the whole wire encoding of a PING.  The
classes that go through here keep everything ``@dataclass(frozen=True)``
gives them (``fields()``, ``replace()``, ``==``, ``hash``, ``repr``,
``FrozenInstanceError`` on assignment); only ``__init__`` is replaced by one
with the same signature that writes the new instance's ``__dict__``
directly, and ``_make(*values)`` is added: a positional constructor taking
every field in declaration order, for decoders.

The functions are generated from ``dataclasses.fields()`` the way
dataclasses itself generates ``__init__``.
"""
from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar

__all__ = ["fast_init"]

T = TypeVar("T", bound=type)


def fast_init(cls: T) -> T:
    """Give the frozen dataclass ``cls`` a direct-store ``__init__`` and a
    positional ``_make``.  Fields with ``default_factory`` or ``init=False``
    are refused (none of the protocol's classes has one)."""
    if not is_dataclass(cls) or "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: fast_init needs a dataclass with an instance __dict__")
    flds = fields(cls)
    namespace: dict[str, Any] = {"_cls": cls, "_new": object.__new__}
    positional: list[str] = []
    keyword: list[str] = []
    for f in flds:
        if not f.init or f.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: fast_init supports plain defaults only")
        param = f.name
        if f.default is not MISSING:
            namespace[f"_dflt_{f.name}"] = f.default
            param += f"=_dflt_{f.name}"
        (keyword if f.kw_only else positional).append(param)
    params = ", ".join(["self", *positional] + (["*", *keyword] if keyword else []))
    stores = "".join(f"    _d[{f.name!r}] = {f.name}\n" for f in flds)
    names = ", ".join(f.name for f in flds)
    src = (f"def __init__({params}):\n    _d = self.__dict__\n{stores}"
           f"def _make({names}):\n    self = _new(_cls)\n    _d = self.__dict__\n{stores}    return self\n")
    exec(compile(src, f"<fast_init {cls.__qualname__}>", "exec"), namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init
    make = namespace["_make"]
    make.__qualname__ = f"{cls.__qualname__}._make"
    cls._make = staticmethod(make)
    return cls
