"""The shapes prompt sets: committed files, split, vocabulary and the builtin loaders."""

from __future__ import annotations

import json
import re

from tempflow_core.policies.tiny_parts import TINY_VOCAB_WORDS
from tempflow_core.prompts import PromptRecord, load_prompts
from tempflow_core.shapes.prompts import (DATA_DIR, generate_records, load_split, record_for_prompt,
                                          split_records, to_jsonl)
from tempflow_core.shapes.world import TAGS


def test_committed_files_equal_generator_output():
    splits = split_records()
    for name in ("train", "test"):
        committed = (DATA_DIR / f"{name}.jsonl").read_text()
        assert committed == to_jsonl(splits[name]), (
            f"{name}.jsonl is stale: run python -m tempflow_core.shapes.prompts and commit the files")


def test_split_is_disjoint_complete_and_covers_every_tag():
    train, test = load_split("train"), load_split("test")
    train_p, test_p = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert not train_p & test_p
    assert train_p | test_p == {r["prompt"] for r in generate_records()}
    for tag in TAGS:
        n_tr = sum(r["tag"] == tag for r in train)
        n_te = sum(r["tag"] == tag for r in test)
        assert n_tr >= 1 and n_te >= 1, tag
        assert 0.15 <= n_te / (n_tr + n_te) <= 0.4, (tag, n_tr, n_te)
    # the grammar's size, worked out by hand: 3 + 6 + 3*4*3 + 4*3 + 4*6 + 6*12
    assert len(train) + len(test) == 3 + 6 + 36 + 12 + 24 + 72


def test_prompts_use_tiny_vocabulary_and_fit_the_tokenizer():
    vocab = set(TINY_VOCAB_WORDS)
    for rec in generate_records():
        words = rec["prompt"].split()
        assert set(words) <= vocab, (rec["prompt"], set(words) - vocab)
        assert len(words) + 2 <= 16  # BOS/EOS + words within TinyModelConfig.max_tokens


def test_metadata_follows_geneval_format_and_matches_the_text():
    numbers = {"two": 2, "three": 3, "four": 4}
    for rec in generate_records():
        assert set(rec) <= {"id", "tag", "include", "exclude", "prompt"}
        assert rec["tag"] in TAGS
        text = rec["prompt"]
        for clause in rec["include"]:
            assert clause["class"] in text
            if "color" in clause:
                assert clause["color"] in text
        if rec["tag"] == "counting":
            (clause,) = rec["include"]
            assert clause["count"] == numbers[text.split()[0]]
            assert rec["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
        if rec["tag"] == "position":
            ref, obj = rec["include"]
            rel, idx = obj["position"]
            assert idx == 0 and text == f"a {obj['class']} {rel} a {ref['class']}"
        if rec["tag"] in ("single_object", "two_object", "position"):
            assert all("color" not in c for c in rec["include"])  # GenEval names no colour there
        if rec["tag"] == "color_attr":
            a, b = rec["include"]
            assert a["class"] != b["class"] and a["color"] != b["color"]


def test_builtin_loaders_give_stable_ids_and_records():
    train = load_prompts("builtin:shapes_train")
    test = load_prompts("builtin:shapes_test")
    assert all(isinstance(r, PromptRecord) for r in train + test)
    ids = [r.id for r in train + test]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z_]+", i) for i in ids)
    assert train == load_prompts("builtin:shapes_train")  # deterministic
    for r in train[:5] + test[:5]:
        assert r.metadata["prompt"] == r.text and r.metadata["id"] == r.id
    # the JSONL route of load_prompts gives the same records as the builtin one
    path = DATA_DIR / "test.jsonl"
    assert load_prompts(str(path)) == test


def test_record_for_prompt_inverts_the_grammar():
    rec = record_for_prompt("Three  GREEN triangles")
    assert rec["include"] == [{"class": "triangle", "count": 3, "color": "green"}]
    try:
        record_for_prompt("a purple star")
    except KeyError as e:
        assert "a purple star" in str(e)
    else:
        raise AssertionError("unknown prompt accepted")
    assert json.loads(json.dumps(rec)) == rec


def test_tag_filter_keeps_exactly_the_named_categories_in_order(tmp_path):
    import pytest

    from tempflow_core.run.preflight import PreflightError, check_prompts

    wanted = {"single_object", "two_object", "colors"}
    full = load_prompts("builtin:shapes_train")
    small = load_prompts("builtin:shapes_train?tags=single_object,two_object,colors")
    assert small == [r for r in full if r.metadata["tag"] in wanted]  # same records, same order
    assert {r.metadata["tag"] for r in small} == wanted and 0 < len(small) < len(full)
    path = DATA_DIR / "train.jsonl"  # the file route filters alike
    assert load_prompts(f"{path}?tags=colors") == [r for r in full if r.metadata["tag"] == "colors"]
    with pytest.raises(ValueError, match="no record has tag 'colour'.*tags present: color_attr, colors"):
        load_prompts("builtin:shapes_train?tags=colors,colour")
    with pytest.raises(PreflightError) as e:  # refused before any work, naming the field
        check_prompts("builtin:shapes_train?tags=countng", "prompts.source")
    assert "prompts.source" in str(e.value) and "countng" in str(e.value)
    assert check_prompts(f"{path}?tags=counting", "prompts.source", roots=[DATA_DIR]) == 27


def test_a_filtered_file_source_fingerprints_the_file_it_reads():
    from tempflow_core.config import load_config
    from tempflow_core.run.fingerprints import input_paths

    path = DATA_DIR / "train.jsonl"
    cfg = load_config(None, [f"prompts.source={path}?tags=colors", "model.path="])
    assert input_paths(cfg) == [path]
