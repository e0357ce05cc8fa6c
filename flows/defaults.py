"""The two sets of defaults, side by side: the code's and the embedded demo's.

    the code's defaults   RunConfig() (tempflow_core/config.py): what a config file or the
                          Prefect form leaves unset falls back to; a random tiny model, the
                          brightness reward and the paper's recipe sizes (T = 10, K = 6, LoRA
                          rank 32, lr 3e-4), so that nothing is needed beyond the code.
    the embedded default  flows/configs/default.yaml: what `tempflow train` runs with no
                          --config (the shipped tiny base, the shapes reward, sizes for a CPU);
                          every setting it makes carries its reason as a comment there.

`tempflow show-config --defaults` prints `formatted()`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tempflow_core.config import RunConfig

EMBEDDED = Path(__file__).parent / "configs" / "default.yaml"
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s*(?P<why>.*))?$")


def reasons(path: Path = EMBEDDED) -> dict[str, str]:
    """Dotted setting -> the comment on its line ('' when it has none), for every value the file sets."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if m["value"].strip():
            out[".".join([k for _, k in stack] + [m["key"]])] = (m["why"] or "").strip()
        else:
            stack.append((indent, m["key"]))
    return out


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dump as {"section.field": value} (empty mappings stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def table(path: Path = EMBEDDED) -> list[tuple[str, str, str, str]]:
    """(setting, the code's default, the embedded default, why) for every setting the file makes."""
    code = flat(RunConfig().model_dump(mode="json"))
    embedded = flat(yaml.safe_load(path.read_text(encoding="utf-8")))
    return [(k, json.dumps(code.get(k)), json.dumps(embedded[k]), why) for k, why in reasons(path).items()]


def formatted(path: Path = EMBEDDED) -> str:
    """`table()` in aligned columns, under a header."""
    rows = [("setting", "code default", "embedded default", "why")] + table(path)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3] for row in rows)
