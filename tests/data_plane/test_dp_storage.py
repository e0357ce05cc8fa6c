"""Object store contract, over a local folder and a real S3 API (moto server)."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace

import pytest

from tempflow_core.storage import (
    InvalidKey,
    InvalidStoreURI,
    LocalStore,
    ObjectNotFound,
    S3Store,
    open_store,
    redact_uri,
)


def test_put_get_list_delete(store, tmp_path):
    store.put_bytes("run/iter-000001/a.bin", b"one")
    store.put_bytes("run/iter-000001/sub/b.bin", b"two")
    store.put_bytes("run/iter-000010/c.bin", b"three")
    src = tmp_path / "file.bin"
    src.write_bytes(os.urandom(3000))
    store.put_file("run/f.bin", src)

    assert store.get_bytes("run/iter-000001/a.bin") == b"one"
    assert store.get_bytes("run/f.bin") == src.read_bytes()
    with store.open_read("run/iter-000001/sub/b.bin") as f:
        assert f.read(1) == b"t" and f.read() == b"wo"
    assert store.exists("run/f.bin") and not store.exists("run/nope")
    assert store.size("run/f.bin") == 3000
    # folder semantics: iter-000001 does not match iter-000010
    assert store.list("run/iter-000001") == ["run/iter-000001/a.bin", "run/iter-000001/sub/b.bin"]
    assert store.list("run/iter-00001") == []
    assert len(store.list()) == 4
    assert store.key_for(store.uri_for("run/f.bin")) == "run/f.bin"

    store.put_bytes("run/iter-000001/a.bin", b"replaced")
    assert store.get_bytes("run/iter-000001/a.bin") == b"replaced"
    assert store.delete_prefix("run/iter-000001") == 2
    assert store.list("run") == ["run/f.bin", "run/iter-000010/c.bin"]
    with pytest.raises(ObjectNotFound, match=store.uri_for("run/iter-000001/a.bin")):
        store.get_bytes("run/iter-000001/a.bin")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "a/./b", "/etc/passwd", "a//b", "a\\b", "", "nul\x00"])
def test_bad_keys_refused(store, key):
    with pytest.raises(InvalidKey) as err:
        store.put_bytes(key, b"x")
    assert "key" in str(err.value)
    with pytest.raises(InvalidKey):
        store.get_bytes(key)


def test_uri_outside_root_refused(store):
    with pytest.raises(InvalidKey, match="outside the store root"):
        store.key_for("s3://other-bucket/x" if isinstance(store, S3Store) else "file:///etc/passwd")


def test_local_symlink_escape_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStore(tmp_path / "root")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(outside)
    with pytest.raises(InvalidKey, match="outside the store root"):
        store.put_bytes("link/evil.bin", b"x")
    assert not (outside / "evil.bin").exists()


def test_open_store_uris(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path
    for bad, needle in [("gs://bucket/x", "'gs'"), ("http://127.0.0.1/x", "'http'"), ("ftp://h/x", "'ftp'"),
                        ("file://remotehost/x", "remote host"), ("file:relative/path", "absolute"),
                        ("s3://bucket/a/../b", ".."), ("s3://B_/x", "bucket name")]:
        with pytest.raises(InvalidStoreURI, match=needle):
            open_store(bad)


def test_credentials_in_uri_refused_without_echo():
    with pytest.raises(InvalidStoreURI) as err:
        open_store("s3://AKIDX:supersecretvalue@bucket/prefix")
    assert "supersecretvalue" not in str(err.value) and "AKIDX" not in str(err.value)
    assert "supersecretvalue" not in redact_uri("https://h/x?X-Amz-Signature=supersecretvalue&a=1")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.put_bytes("obj", b"old")
    real_replace = os.replace

    def crash(*args, **kw):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        store.put_bytes("obj", b"new" * 1000)
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.get_bytes("obj") == b"old"
    assert store.list() == ["obj"]
    assert sorted(os.listdir(tmp_path)) == ["obj"]  # no temp file left behind


def test_s3_multipart_upload(s3_store, tmp_path):
    s3_store = S3Store(s3_store.bucket, s3_store.prefix, replace(s3_store.settings, multipart_threshold=5 << 20,
                                                                 multipart_chunksize=5 << 20))
    data = os.urandom(11 << 20)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    s3_store.put_file("big/file.bin", path)
    s3_store.put_bytes("big/bytes.bin", data)
    for key in ("big/file.bin", "big/bytes.bin"):
        head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=f"root/{key}")
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts
        assert s3_store.get_bytes(key) == data


def test_s3_repr_and_pickle_hide_nothing_they_should_not(s3_endpoint):
    store = open_store("s3://tf-repr-bucket/p", endpoint_url=s3_endpoint, aws_access_key_id="AKIDEXPLICIT",
                       aws_secret_access_key="explicit-secret-xyz", create_bucket=True)
    assert "explicit-secret-xyz" not in repr(store) and "AKIDEXPLICIT" not in repr(store)
    assert "explicit-secret-xyz" not in str(vars(store))
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers under spawn receive the store this way
    clone.put_bytes("x", b"1")
    assert store.get_bytes("x") == b"1"


def test_missing_bucket_is_an_error_not_an_absent_stage(s3_endpoint):
    from tempflow_core.shards import read_manifest
    from tempflow_core.storage import StoreError

    store = open_store("s3://tf-no-such-bucket-here/x", endpoint_url=s3_endpoint)
    with pytest.raises(StoreError, match="bucket does not exist: s3://tf-no-such-bucket-here") as err:
        read_manifest(store, "run/iter-000001/rollouts")
    assert not isinstance(err.value, ObjectNotFound)
