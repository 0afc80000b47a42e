"""A small YAML writer for the generated rule and provisioning files.

The package must not depend on PyYAML at run time, and the files are read by people: block
scalars for PromQL, plain scalars where YAML reads them back unchanged, JSON quoting elsewhere
(a JSON string is a valid YAML double-quoted scalar).
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./:-]*( [A-Za-z0-9_./-]+)*$")
# Words YAML 1.1 (PyYAML, Grafana, Prometheus) reads as something other than a string.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _RESERVED and ":" not in text.replace("://", ""):
        return text
    return json.dumps(text, ensure_ascii=False)


def _block(text: str, indent: int) -> str:
    pad = " " * indent
    chomp = "|" if text.endswith("\n") else "|-"
    lines = text.rstrip("\n").split("\n")
    return chomp + "\n" + "\n".join(pad + line if line else "" for line in lines)


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(_entry(pad + _scalar(key) + ":", item, indent))
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                first, *rest = _lines(item, indent + 2)
                out.append(pad + "- " + first[indent + 2 :])
                out.extend(rest)
            else:
                out.extend(_entry(pad + "-", item, indent))
    else:
        raise TypeError(f"cannot write {type(value).__name__} as a YAML document")
    return out


def _entry(head: str, item: Any, indent: int) -> list[str]:
    if isinstance(item, (dict, list)) and item:
        return [head, *_lines(item, indent + 2)]
    if isinstance(item, dict):
        return [head + " {}"]
    if isinstance(item, list):
        return [head + " []"]
    if isinstance(item, str) and "\n" in item:
        return [head + " " + _block(item, indent + 2)]
    return [head + " " + _scalar(item)]


def dump(document: dict[str, Any], header: str = "") -> str:
    """``document`` as YAML text; ``header`` lines become comments at the top."""
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + "\n".join(_lines(document, 0)) + "\n"
