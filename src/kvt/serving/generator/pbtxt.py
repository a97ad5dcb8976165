"""A minimal protobuf text-format writer for ``config.pbtxt``.

Configs are built as plain Python structures and rendered here, so the generator never glues strings
by hand and the output always parses with Triton's ``model_config.proto`` (the tests check that).

Structure: a message is a list of ``(field, value)`` pairs (a field may repeat) or a dict; a value is a
scalar, an :class:`Enum` (written bare), a list of scalars (``dims: [1, 2]``) or a nested message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


class Enum(str):
    """An enum value (``TYPE_FP32``, ``KIND_GPU``): written without quotes."""


Message = Mapping[str, Any] | list


def _items(message: Message) -> Iterable[tuple[str, Any]]:
    return message.items() if isinstance(message, Mapping) else message


def _is_message(value: Any) -> bool:
    """A dict, or a non-empty list of (field, value) pairs (an empty list is an empty repeated scalar)."""
    return isinstance(value, Mapping) or (isinstance(value, list) and bool(value)
                                          and all(isinstance(v, tuple) and len(v) == 2 for v in value))


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid text-format literal (UTF-8 kept as is)
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) in a config.pbtxt")


def render(message: Message, indent: int = 0) -> str:
    """Text format of ``message`` (top level: no braces)."""
    pad = "  " * indent
    lines = []
    for name, value in _items(message):
        if _is_message(value):
            lines.append(f"{pad}{name} {{")
            lines.append(render(value, indent + 1))
            lines.append(f"{pad}}}")
        elif isinstance(value, list) and value and all(_is_message(v) for v in value):
            for item in value:  # repeated message
                lines.append(f"{pad}{name} {{")
                lines.append(render(item, indent + 1))
                lines.append(f"{pad}}}")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{name}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)
