"""A prompt file is one prompt a line, and a line ends with \\n alone: characters that would be
stored silently (NUL, ESC, bidirectional overrides) or split a prompt in two (CR, form feed,
U+0085, U+2028) are refused, naming the file, the line, the character's position and code."""

from __future__ import annotations

import pytest

from tempflow_core.prompts import load_prompts


@pytest.mark.parametrize("raw, message", [
    (b"a red circle\na\x00b\n", "p.txt:2: character 2 is U+0000"),
    (b"a \x1b[31mred\n", "p.txt:1: character 3 is U+001B"),
    ("a \u202ered circle\n".encode(), "p.txt:1: character 3 is U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("a \u2066b\u2069\n".encode(), "U+2066"),
    (b"a red\rcircle\n", "p.txt:1: character 6 is U+000D"),
    (b"a red\x0ccircle\n", "U+000C"),
    ("a red\u0085circle\n".encode(), "U+0085"),
    ("a red\u2028circle\n".encode(), "U+2028 (LINE SEPARATOR)"),
    (b"x" * 4097 + b"\n", "a prompt of 4,097 characters, over 4,096"),
    ("caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 3)"),
])
def test_a_prompt_file_with_what_a_prompt_cannot_hold_is_refused_naming_the_line(tmp_path, raw, message):
    (tmp_path / "p.txt").write_bytes(raw)
    with pytest.raises(ValueError) as e:
        load_prompts(str(tmp_path / "p.txt"))
    assert message in str(e.value) and "\n" not in str(e.value)  # one line


def test_lines_end_with_newline_alone_and_windows_line_ends_are_fine(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"a red circle\r\n\r\ntwo blue squares\n  \n\tthree green cubes\n")
    assert [r.text for r in load_prompts(str(tmp_path / "p.txt"))] == ["a red circle", "two blue squares",
                                                                     "three green cubes"]
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "a\\u0000b"}\n')  # escaped in JSON, a NUL all the same
    with pytest.raises(ValueError, match=r"p.jsonl:1: character 2 is U\+0000"):
        load_prompts(str(tmp_path / "p.jsonl"))
