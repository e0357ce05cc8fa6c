"""Prompt sets: built-in lists, text files and GenEval-style JSONL with metadata.

A source may end in `?tags=a,b`: only the records whose metadata `tag` (the GenEval category)
is one of those, in the source's order, e.g. `builtin:shapes_train?tags=single_object,colors`.
"""

from __future__ import annotations

import json
import unicodedata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_COLORS = ["red", "green", "blue", "yellow"]
_SHAPES = ["circle", "square", "triangle"]

BUILTIN: dict[str, list[str]] = {
    "colors": [f"a {c} {s}" for c in _COLORS for s in _SHAPES],
}


@dataclass(frozen=True)
class PromptRecord:
    id: str  # stable id: rewards, seeds and shards refer to prompts by it (no dots)
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


_TAG_FILTER = re.compile(r"\?tags=([A-Za-z0-9_,-]+)$")


def split_source(source: str) -> tuple[str, tuple[str, ...]]:
    """'SOURCE?tags=a,b' -> ('SOURCE', ('a', 'b')); a source without a filter -> (source, ())."""
    m = _TAG_FILTER.search(source)
    if m is None:
        return source, ()
    return source[:m.start()], tuple(t for t in m.group(1).split(",") if t)


def load_prompts(source: str) -> list[PromptRecord]:
    """Resolve a PromptsConfig source, with its `?tags=` filter if it has one.

    Raises:
        FileNotFoundError / ValueError: naming the source (and a tag no record has).
    """
    base, tags = split_source(source)
    records = _load(base)
    if not tags:
        return records
    present = sorted({str(r.metadata.get("tag")) for r in records if r.metadata.get("tag") is not None})
    for tag in tags:
        if tag not in present:
            raise ValueError(f"prompt source {source!r}: no record has tag {tag!r} "
                             f"(tags present: {', '.join(present) or 'none'})")
    return [r for r in records if r.metadata.get("tag") in tags]


def _load(source: str) -> list[PromptRecord]:
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        loader = _builtin_loaders().get(name)
        if loader is None:
            raise ValueError(f"unknown builtin prompt set {source!r}; available: "
                             + ", ".join(f"builtin:{n}" for n in sorted(_builtin_loaders())))
        return loader()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} does not exist")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"prompt file {source!r} is {path.stat().st_size:,} bytes, over {MAX_FILE_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")  # no newline translation: a bare \r is a character, refused below
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {source!r} is not UTF-8 text (byte {e.start})") from None
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]  # "\n" ends a line, nothing else
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{n + 1}: not valid JSON: {e}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{source}:{n + 1}: record is a JSON {type(rec).__name__}, not an object "
                                 "with a 'prompt' field")
            if not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{source}:{n + 1}: record has no 'prompt' string")
            check_prompt(rec["prompt"], f"{source}:{n + 1}")
            out.append(PromptRecord(str(rec.get("id", f"{len(out):06d}")).replace(".", "_"), rec["prompt"], rec))
        return out
    prompts = [(n, check_prompt(ln.strip(), f"{source}:{n + 1}")) for n, ln in enumerate(lines) if ln.strip()]
    return [PromptRecord(f"{i:06d}", t) for i, (_, t) in enumerate(prompts)]


MAX_FILE_BYTES = 64 * 1024 * 1024  # a prompt file (GenEval's training set is ~50 kB)
MAX_PROMPT_CHARS = 4096  # far past what a text encoder reads (CLIP 77 tokens, T5 512); the rest is cut


def check_prompt(text: str, where: str) -> str:
    """`text` when it is one prompt: at most MAX_PROMPT_CHARS characters and no control, format
    or line-separator characters (NUL, ESC, CR, form feed, U+0085, U+2028/9, the bidirectional
    overrides U+202A-E and U+2066-9 ...), which would be stored silently or split it. Raises
    ValueError naming `where` and the character."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{where}: a prompt of {len(text):,} characters, over {MAX_PROMPT_CHARS:,}")
    for i, ch in enumerate(text):
        if ch != "\t" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise ValueError(f"{where}: character {i + 1} is U+{ord(ch):04X} ({unicodedata.name(ch, 'a control')}), "
                             "not allowed in a prompt (one prompt a line; a line ends with \\n)")
    return text


def _builtin_loaders():
    loaders = {name: (lambda items=items: [PromptRecord(f"{i:06d}", t) for i, t in enumerate(items)])
               for name, items in BUILTIN.items()}
    from tempflow_core.shapes.prompts import BUILTIN_SPLITS, load_split

    for split in BUILTIN_SPLITS:  # the shapes benchmark's splits: builtin:shapes_train, _test, _eval
        loaders[f"shapes_{split}"] = lambda split=split: [PromptRecord(r["id"], r["prompt"], r)
                                                          for r in load_split(split)]
    return loaders


class PromptStream:
    """An endless, seeded, resumable stream of prompt batches: a shuffled pass over the set,
    reshuffled each epoch. `position` is all a checkpoint needs to continue exactly."""

    def __init__(self, records: list[PromptRecord], seed: int, position: int = 0):
        if not records:
            raise ValueError("the prompt set is empty")
        self.records = records
        self.seed = seed
        self.position = position

    def _order(self, epoch: int) -> list[int]:
        import torch

        from tempflow_core.seeding import derive_seed

        g = torch.Generator().manual_seed(derive_seed(self.seed, "prompt-epoch", epoch))
        return torch.randperm(len(self.records), generator=g).tolist()

    def next_batch(self, n: int) -> list[PromptRecord]:
        out = []
        for _ in range(n):
            epoch, idx = divmod(self.position, len(self.records))
            out.append(self.records[self._order(epoch)[idx]])
            self.position += 1
        return out
