"""Property-based tests of the three parsers a careless or hostile input reaches first: the reward
protocol's request decoder, the config loader and the prompt reader. On generated inputs each
either returns a value that keeps its own rules or refuses with its documented error; nothing
else escapes (no RecursionError, MemoryError, KeyError, ...), and each example stays within a
deadline. Derandomized and without an example database, so a CI run is repeatable and reads
nothing from HOME."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tempflow_core.config import ConfigError, RunConfig, load_config
from tempflow_core.prompts import MAX_PROMPT_CHARS, check_prompt, load_prompts
from tempflow_core.rewards.protocol import Limits, ProtocolError, TooLarge, decode_request, encode_png

HOSTILE = settings(max_examples=120, deadline=5000, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LIMITS = Limits(max_body_bytes=1 << 20, max_images=8, max_image_pixels=64 * 64, max_request_pixels=4 * 64 * 64)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30)


def _png(width: int, height: int, body: bytes | None = None) -> bytes:
    """A PNG whose IHDR declares width x height (a valid CRC), with a small or lying IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64) if body is None else body
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _request(images: list[str], prompts: list[str] | None = None, **extra) -> bytes:
    n = len(images)
    return json.dumps({"protocol": 1, "batch_id": "b", "prompts": prompts if prompts is not None else ["p"] * n,
                       "metadata": [{}] * n, "images": images, **extra}).encode()


def _decodes_or_refuses(body: bytes) -> None:
    try:
        req = decode_request(body, LIMITS)
    except ProtocolError:
        return
    assert req.images.dtype == np.uint8 and req.images.ndim == 4 and req.images.shape[-1] == 3
    assert len(req.prompts) == len(req.metadata) == len(req.images) <= LIMITS.max_images
    assert req.images[0].shape[0] * req.images[0].shape[1] <= LIMITS.max_image_pixels if len(req.images) else True


@HOSTILE
@given(st.binary(max_size=2048))
@example(b"[" * 100_000)
@example(b'{"protocol": 1, "images": ' + b"[" * 5000 + b"]" * 5000 + b"}")
def test_any_bytes_decode_to_a_request_or_a_protocol_error(body):
    _decodes_or_refuses(body)


@HOSTILE
@given(json_values)
def test_any_json_decodes_to_a_request_or_a_protocol_error(value):
    _decodes_or_refuses(json.dumps(value).encode())
    if isinstance(value, dict):
        _decodes_or_refuses(json.dumps({**value, "protocol": 1}).encode())


@HOSTILE
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64))
@example(30000, 30000, zlib.compress(b"\0" * 1_000_000))  # the lying 30000 x 30000 header
@example(8000, 8000, zlib.compress(b"\0" * 100_000))
def test_a_png_header_over_the_limits_is_refused_before_anything_is_decompressed(width, height, idat):
    body = _request([base64.b64encode(_png(width, height, idat)).decode()])
    if width * height > LIMITS.max_image_pixels:
        with pytest.raises(TooLarge, match="declares"):
            decode_request(body, LIMITS)
    else:
        _decodes_or_refuses(body)


@HOSTILE
@given(st.lists(st.integers(1, 64), min_size=1, max_size=12))
def test_real_images_round_trip_within_the_limits_and_are_refused_beyond_them(sides):
    images = [encode_png(np.full((s, s, 3), s, np.uint8)) for s in sides]
    body = _request(images)
    over = len(sides) > LIMITS.max_images or sum(s * s for s in sides) > LIMITS.max_request_pixels
    if over:
        with pytest.raises(TooLarge):
            decode_request(body, LIMITS)
    elif len(set(sides)) > 1:
        with pytest.raises(ProtocolError, match="share a size"):
            decode_request(body, LIMITS)
    else:
        assert (decode_request(body, LIMITS).images == sides[0]).all()


YAML_ALPHABET = st.sampled_from(list("[]{}:&*!,-|>'\"# \n\tab01.") + ["train:", "lr:", "&a", "*a", "<<:", "!!", "\\"])


@HOSTILE
@given(st.lists(YAML_ALPHABET, max_size=80).map("".join))
@example("a: &x [*x]\n")  # a value that contains itself
@example("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
         "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n")
@example("[" * 10_000)
def test_any_config_file_loads_or_is_refused_with_a_config_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert "\n" not in str(e) or str(e).startswith("invalid run config:")
        return
    assert isinstance(cfg, RunConfig)


@HOSTILE
@given(st.sampled_from(["train.lr", "reward.options", "rollout.group_size", "model", "x.y.z", ""]),
       st.lists(YAML_ALPHABET, max_size=60).map("".join))
@example("reward.options", "&x [*x]")
@example("reward.options", "[" * 5000 + "]" * 5000)
def test_any_override_applies_or_is_refused_with_a_config_error(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError:
        pass


PROMPT_CHARS = st.characters(codec="utf-8") | st.sampled_from(list("\r\n\f\v\x00\x1b\u2028\u2029\u0085\u202e\ufeff"))


@HOSTILE
@given(st.sampled_from([".txt", ".jsonl"]), st.lists(PROMPT_CHARS, max_size=200).map("".join))
@example(".txt", "a red circle\rtwo blue squares\n")
@example(".jsonl", '{"prompt": "a\\u2028b"}\n')
def test_any_prompt_file_reads_as_valid_prompts_or_is_refused(tmp_path, suffix, text):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        records = load_prompts(str(path))
    except ValueError:
        return
    for r in records:
        assert check_prompt(r.text, "generated") == r.text and 0 < len(r.text) <= MAX_PROMPT_CHARS
    if suffix == ".txt":  # one prompt a line, a line ends with \n alone
        assert [r.text for r in records] == [ln.strip() for ln in text.split("\n") if ln.strip()]


@HOSTILE
@given(st.lists(st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cf", "Zl", "Zp", "Cs"]),
                        min_size=1, max_size=50).filter(str.strip), min_size=1, max_size=20))
def test_prompts_written_one_a_line_read_back_as_themselves(tmp_path, prompts):
    path = tmp_path / "p.txt"
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8", newline="\n")
    assert [r.text for r in load_prompts(str(path))] == [p.strip() for p in prompts]


def test_the_prompt_reader_refuses_an_oversized_file_before_reading_it(tmp_path, monkeypatch):
    import tempflow_core.prompts as prompts

    path = tmp_path / "p.txt"
    path.write_text("a red circle\n" * 100)
    monkeypatch.setattr(prompts, "MAX_FILE_BYTES", 1000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read before the size check"))
    with pytest.raises(ValueError, match="bytes, over 1,000"):
        load_prompts(str(path))
