"""Reward `ocr` (Flow-GRPO's OCR reward with RapidOCR): rendered text of known content, the
edit-distance rule, no network at load or inference, and the reward behind a reward server."""

from __future__ import annotations

import socket

import numpy as np
import pytest

rapidocr = pytest.importorskip("rapidocr", reason="the ocr extra (pip install -e '.[ocr]') is not installed")

from tempflow_core.rewards import build_reward  # noqa: E402
from tempflow_core.rewards.ocr import levenshtein, ocr_distance, target_text  # noqa: E402
from tempflow_core.rewards.remote import RemoteRewardError  # noqa: E402

from servers import reward_server  # noqa: E402


def render(text: str, side: int = 256, size: int = 40) -> np.ndarray:
    """Black text centred on white with Pillow's bundled font (Aileron Regular), uint8 [side, side, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (side, side), "white")
    ImageDraw.Draw(img).text((side // 2, side // 2), text, fill="black", font=ImageFont.load_default(size=size),
                             anchor="mm")
    return np.asarray(img)


def says(text: str) -> str:
    return f'A wooden sign in a park that says "{text}"'


class _NoNetwork:
    """Every socket connect and name lookup fails while active (what the run machines allow, and less)."""

    def __enter__(self):
        self.saved = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo, socket.create_connection

        def refuse(*args, **kwargs):
            raise OSError("network disabled by the test: the OCR reward must not download anything")

        socket.socket.connect = socket.socket.connect_ex = refuse
        socket.getaddrinfo = socket.create_connection = refuse
        return self

    def __exit__(self, *exc):
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo, socket.create_connection = self.saved


@pytest.fixture(scope="module")
def ocr():
    with _NoNetwork():  # the models load from the wheel's own files
        fn = build_reward("ocr", options={"ocr": {"threads": 1}})
        fn(render("OK")[None], [says("OK")], [{}])  # and the first inference needs nothing either
    return fn


def test_models_come_from_the_wheel():
    from pathlib import Path

    from tempflow_core.rewards.ocr import WHEEL_MODELS

    models = Path(rapidocr.__file__).parent / "models"
    assert all((models / name).stat().st_size > 1_000_000 for name in WHEEL_MODELS.values())
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_reward("ocr", options={"ocr": {"det_model": str(models / "missing.onnx")}})


def test_rendered_text_scores_near_one(ocr):
    texts = ["HELLO", "TempFlow", "Open 24h"]
    scores, details = ocr(np.stack([render(t) for t in texts]), [says(t) for t in texts], [{}] * 3)
    assert scores.dtype == np.float32 and np.all(scores >= 0.9), (scores, details)
    assert np.array_equal(details["target_length"], [5, 8, 7])  # spaces do not count


def test_blank_and_wrong_text_score_near_zero(ocr):
    images = np.stack([np.full((256, 256, 3), 255, np.uint8), render("QUIZ"), render("12345")])
    scores, details = ocr(images, [says("HELLO"), says("MEADOW"), says("TempFlow")], [{}] * 3)
    assert np.all(scores <= 0.1), (scores, details)
    assert details["distance"][0] == 5  # nothing read: the distance is the whole target


def test_the_edit_distance_rule():
    assert target_text(says("Hello World")) == "Hello World"
    assert target_text("a poster reading \u201cNo Parking\u201d") == "No Parking"
    assert target_text("no quotes here", {"text": "from metadata"}) == "from metadata"
    with pytest.raises(ValueError, match="no text in double quotes"):
        target_text("a sign with no quoted text")
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_distance("hello world", "Hello World") == (0, 10)  # spaces and case are ignored
    assert ocr_distance("STOP here please", "stop") == (0, 4)  # the target inside the read text: 0
    assert ocr_distance("hellp", "hello") == (1, 5)  # reward 1 - 1/5 = 0.8
    assert ocr_distance("a much longer unrelated text", "cat") == (3, 3)  # capped at the target's length


def test_ocr_behind_the_reward_server(ocr):
    images = np.stack([render("HELLO"), render("QUIZ")])
    prompts = [says("HELLO"), says("HELLO")]
    local, local_details = ocr(images, prompts, [{}, {}])
    with reward_server("ocr", "threads=1") as url:
        remote = build_reward("remote", options={"remote": {"url": url, "retries": 2}})
        scores, details = remote(images, prompts, [{}, {}])
        with pytest.raises(RemoteRewardError, match=rf"reward server {url}: .*HTTP 422.*no text in double quotes"):
            remote(images[:1], ["a sign without quotes"], [{}])
    assert np.array_equal(scores, local) and scores[0] >= 0.9 and scores[1] <= 0.5
    assert all(np.array_equal(details[k], v) for k, v in local_details.items())
