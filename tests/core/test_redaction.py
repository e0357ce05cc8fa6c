"""tempflow_core.redaction: literal inputs, literal expected outputs."""

from __future__ import annotations

import logging

import pytest

from tempflow_core.redaction import (
    is_secret_key,
    is_secret_query_param,
    redact_text,
    redact_uri,
    redact_uris,
    scrub_mapping,
    secret_key_paths,
)


@pytest.mark.parametrize("name", [
    "password", "db.password", "passwd", "DB_PASSWORD", "secret", "client_secret", "aws_secret_access_key",
    "AWS_SECRET_ACCESS_KEY", "aws_access_key_id", "AccessKeyId", "access_key", "api_key", "apiKey", "private_key",
    "s3.key_id", "token", "api_token", "auth_token", "session_token", "authToken", "hf_token", "hftoken",
    "credential", "credentials", "credentials_file", "authorization", "Authorization", "cookie",
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "awssecretaccesskey",
])
def test_secret_keys(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", [
    "max_tokens", "num_tokens", "tokens", "tokenizer", "model.tokenizer", "lr", "model.key_frames", "key",
    "sample_key", "keys", "monkey", "uri", "endpoint", "checkpoint_uri", "config_hash", "iteration",
    "X-Amz-Expires", "X-Amz-SignedHeaders",
])
def test_plain_keys(name):
    assert not is_secret_key(name)


def test_query_params():
    # 'key' and 'sig' carry credentials in a URL (API keys, SAS signatures), not as config fields
    assert is_secret_query_param("key") and is_secret_query_param("sig") and is_secret_query_param("token")
    assert is_secret_query_param("X-Amz-Signature") and is_secret_query_param("AWSAccessKeyId")
    assert not is_secret_query_param("X-Amz-Expires") and not is_secret_query_param("partNumber")


@pytest.mark.parametrize("uri, expected", [
    # untouched (the very same string)
    ("s3://bucket/run-a/iter-000001/rollouts", "s3://bucket/run-a/iter-000001/rollouts"),
    ("http://127.0.0.1:9000/x?a=1&b=2", "http://127.0.0.1:9000/x?a=1&b=2"),
    ("file:///tmp/store", "file:///tmp/store"),
    ("/plain/path", "/plain/path"),
    ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
    # password masked, user kept
    ("http://minio:pa55word@127.0.0.1:9000", "http://minio:***@127.0.0.1:9000"),
    ("postgresql://tf:hunter2@db:5432/mlflow", "postgresql://tf:***@db:5432/mlflow"),
    # s3 user info is an access key pair: all of it masked
    ("s3://AKIDLEAK:secretleak@ckpts/a", "s3://***@ckpts/a"),
    # a bare user may be a token
    ("https://ghp_abc123@github.com/o/r.git", "https://***@github.com/o/r.git"),
    # credential query values masked, others kept
    ("https://h/x?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20240101&X-Amz-Expires=60"
     "&X-Amz-Signature=abcdef",
     "https://h/x?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Expires=60&X-Amz-Signature=***"),
    ("https://api.example.com/v1?token=t0k3n&page=2", "https://api.example.com/v1?token=***&page=2"),
    ("https://maps.example.com/q?key=k3y", "https://maps.example.com/q?key=***"),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_uri_unparseable():
    assert redact_uri("http://[::1") == "<unparseable uri>"


def test_redact_uris():
    assert redact_uris("a photo of a red circle") == "a photo of a red circle"
    assert redact_uris("backend http://tf:pw99@db:5432/x and s3://b/k failed") == \
        "backend http://tf:***@db:5432/x and s3://b/k failed"
    assert redact_uris("AKIAIOSFODNN7EXAMPLE") == "AKIAIOSFODNN7EXAMPLE"  # only URIs: see redact_text


def test_redact_text():
    assert redact_text("plain message, nothing to hide") == "plain message, nothing to hide"
    assert redact_text("cannot reach http://minio:pw1234@127.0.0.1:9000 (timeout)") == \
        "cannot reach http://minio:***@127.0.0.1:9000 (timeout)"
    assert redact_text("GET https://b.s3.amazonaws.com/k?X-Amz-Signature=0a1b2c&x=1 failed") == \
        "GET https://b.s3.amazonaws.com/k?X-Amz-Signature=***&x=1 failed"
    # a SigV4 Authorization header, as botocore logs it
    assert redact_text("{'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/s3/"
                       "aws4_request, SignedHeaders=host'}") == \
        "{'Authorization': b'AWS4-HMAC-SHA256 Credential=***/20240101/us-east-1/s3/aws4_request, SignedHeaders=host'}"
    assert redact_text("{'X-Amz-Security-Token': b'FwoGZXIvYXdzEBYaDH'}") == "{'X-Amz-Security-Token': b'***'}"
    # the shapes of AWS credentials (the documentation's example pair)
    assert redact_text("id AKIAIOSFODNN7EXAMPLE here") == "id *** here"
    assert redact_text("key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY end") == "key *** end"
    # a 40-character hex digest (a git commit) is not a secret key
    assert redact_text("commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904") == \
        "commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904"
    # secret values the caller knows; too short ones are ignored
    assert redact_text("sent env-secret-1234 and abc", ["env-secret-1234", "abc", None]) == "sent *** and abc"


def test_scrub_mapping():
    producer = {
        "checkpoint_uri": "s3://AKIDLEAK:secretleak@ckpts/a",
        "aws_secret_access_key": "secretleak",
        "max_tokens": 77,
        "tokenizer": "clip",
        "iteration": 1,
        "nested": {"hf_token": "hf_x", "endpoint": "http://u:p4ss@h:9000", "steps": (1, 2)},
    }
    assert scrub_mapping(producer) == {
        "checkpoint_uri": "s3://***@ckpts/a",
        "aws_secret_access_key": "***",
        "max_tokens": 77,
        "tokenizer": "clip",
        "iteration": 1,
        "nested": {"hf_token": "***", "endpoint": "http://u:***@h:9000", "steps": [1, 2]},
    }
    assert producer["aws_secret_access_key"] == "secretleak"  # the input is not modified
    assert secret_key_paths(producer, "producer") == ["producer.aws_secret_access_key", "producer.nested.hf_token"]


def test_manifest_keeps_max_tokens_and_drops_secrets(caplog):
    """The manifest scrubber follows the same rules (it used to blank every key holding 'token')."""
    from tempflow_core.shards.manifest import provenance

    caplog.set_level(logging.WARNING, logger="tempflow.shards")
    prod, ckpt, cfg = provenance({"max_tokens": 77, "session_token": "abcd", "config_hash": "c1"},
                                 "s3://AKID:SECRET@b/ckpt", None)
    assert prod == {"max_tokens": 77, "session_token": "***", "config_hash": "c1"}
    assert (ckpt, cfg) == ("s3://***@b/ckpt", "c1")
    assert "producer.session_token" in caplog.text and "abcd" not in caplog.text


def test_split_credentials_takes_the_user_info_out_of_a_uri():
    from tempflow_core.redaction import split_credentials

    assert split_credentials("http://ml:p%40ss+w@host:5000/x?a=1") == ("http://host:5000/x?a=1", "ml", "p@ss+w")
    assert split_credentials("https://tok@h/") == ("https://h/", "tok", None)
    assert split_credentials("http://host:5000") == ("http://host:5000", None, None)
    assert split_credentials("sqlite:////abs/mlflow.db") == ("sqlite:////abs/mlflow.db", None, None)
