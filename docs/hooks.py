"""MkDocs hooks: the site also carries the files the pages link to outside docs/ (the
experiments' records and figures under results/, the base models' cards and samples), and a
page's links to them, written relative to the page's file in the checkout (so they work when
the Markdown is read on the repository), are rewritten to the same files on the site.
Model weights and other large binaries stay out."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CARRIED = ("results", "models")  # folders beside docs/ the pages link into
SKIP = {".safetensors", ".bin", ".pt", ".onnx"}
LINK = re.compile(r"(\]\()(\.\./[^)\s#]+)")  # ](../path) of a Markdown link or image


def on_files(files: Files, config) -> Files:
    for folder in CARRIED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix not in SKIP:
                files.append(File(path.relative_to(ROOT).as_posix(), src_dir=str(ROOT), dest_dir=config["site_dir"],
                                  use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    page_dir = (DOCS / page.file.src_uri).parent

    def site_link(m: re.Match) -> str:
        target = (page_dir / m.group(2)).resolve()
        rel = target.relative_to(ROOT).as_posix() if target.is_relative_to(ROOT) else ""
        if not rel.startswith(tuple(f"{c}/" for c in CARRIED)):
            return m.group(0)  # a link inside docs/ (or one mkdocs will report)
        return m.group(1) + os.path.relpath(rel, start=Path(page.file.src_uri).parent.as_posix() or ".")

    return LINK.sub(site_link, markdown)
