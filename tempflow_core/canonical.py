"""Byte-deterministic safetensors: the same tensors and metadata give the same file bytes.

safetensors keeps `__metadata__` in a Rust HashMap, whose iteration order is seeded per
process: a file with two or more metadata entries (diffusers' LoRA files hold "format" and
"lora_adapter_metadata"; score objects hold "schema_version" and "keys") comes out with its
header in a different order in each process. A resumed run then writes different bytes
than an uninterrupted one for identical tensors, and a recomputed stage output cannot
reproduce the sha256 its manifest recorded. `canonical_safetensors` rewrites the header
with the metadata keys sorted (tensor entries and data untouched; readers see the same file).
"""

from __future__ import annotations

import json
from pathlib import Path

_ALIGN = 8  # safetensors pads its JSON header with spaces so that the data starts 8-aligned


def canonical_safetensors(data: bytes) -> bytes:
    """`data` (a safetensors file) with its `__metadata__` keys in sorted order, first."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    raw = json.dumps(ordered, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def canonicalize_file(path: str | Path) -> Path:
    """Rewrite a safetensors file in place with a canonical header (see canonical_safetensors)."""
    path = Path(path)
    path.write_bytes(canonical_safetensors(path.read_bytes()))
    return path
