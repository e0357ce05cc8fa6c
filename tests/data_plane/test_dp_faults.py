"""S3 through a fault-injecting proxy: transient faults are survived, persistent ones reported
clearly, and credentials never show up in logs, errors or manifests."""

from __future__ import annotations

import logging
import os
import traceback

import numpy as np
import pytest
from dp_helpers import TEST_KEY_ID, TEST_SECRET, assert_batches_identical, make_branch_batch, new_bucket

from tempflow_core.shards import read_rollouts, read_scores, stage_complete, write_rollouts, write_scores
from tempflow_core.storage import StoreUnavailable, open_store

pytestmark = pytest.mark.usefixtures("fast_botocore_backoff")

KEY_ID = "AKIDEXPLICITOPTION01"
SECRET = "explicit-secret-must-never-appear-5678"
PREFIX = "run-f/iter-000001/rollouts"


def _stores(endpoint: str, proxy_url: str, **opts):
    """(direct store, store through the proxy) on one fresh bucket, explicit credentials."""
    bucket = new_bucket()
    creds = {"aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET}
    direct = open_store(f"s3://{bucket}/r", endpoint_url=endpoint, create_bucket=True, **creds)
    faulty = open_store(f"s3://{bucket}/r", endpoint_url=proxy_url, max_attempts=3, backoff=0.01,
                        multipart_threshold=5 << 20, multipart_chunksize=5 << 20, **creds, **opts)
    return direct, faulty


def test_transient_faults_are_survived(s3_endpoint, fault_proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    direct, faulty = _stores(s3_endpoint, fault_proxy.url)
    fault_proxy.fail_rate = 0.35  # 500 / 503 / dropped before answering / body cut in the middle

    batch = make_branch_batch(prompts=3, steps=(0, 1, 2), k=3)
    write_rollouts(batch, faulty, PREFIX, samples_per_shard=2, producer={"iteration": 1})
    keys = batch.sample_keys()
    reward = np.arange(len(keys), dtype=np.float32)
    write_scores(faulty, "run-f/iter-000001/rewards", "r", keys, {"reward": reward})
    big = os.urandom(11 << 20)  # multipart upload and a long body to cut
    (tmp_path / "big").write_bytes(big)
    faulty.put_file("big.bin", tmp_path / "big")

    assert_batches_identical(batch, read_rollouts(faulty, PREFIX))
    assert np.array_equal(read_scores(faulty, "run-f/iter-000001/rewards", "r").values["reward"], reward)
    fault_proxy.force("500", "503", "drop", "drop_mid")  # every kind, whatever the random draws were
    assert faulty.get_bytes("big.bin") == big
    fault_proxy.fail_rate = 0.0
    assert_batches_identical(batch, read_rollouts(direct, PREFIX))  # what landed on the server is intact
    assert direct.get_bytes("big.bin") == big

    stats = fault_proxy.stats
    assert fault_proxy.failures >= 10, stats
    assert all(stats[m] > 0 for m in ("500", "503", "drop", "drop_mid")), stats
    assert "resuming" in caplog.text  # a body cut mid-way was resumed by a Range GET
    _assert_no_secret(caplog, SECRET)


def test_persistent_failure_is_clear(s3_endpoint, fault_proxy, caplog):
    caplog.set_level(logging.DEBUG)
    direct, faulty = _stores(s3_endpoint, fault_proxy.url, retries=2)
    batch = make_branch_batch()
    write_rollouts(batch, direct, PREFIX)
    fault_proxy.fail_rate, fault_proxy.max_consecutive, fault_proxy.modes = 1.0, None, ("503", "drop")

    with pytest.raises(StoreUnavailable) as err:
        read_rollouts(faulty, PREFIX)
    msg = str(err.value)
    assert faulty.uri_for(f"{PREFIX}/manifest.json") in msg and "after 2 attempts" in msg
    with pytest.raises(StoreUnavailable) as err2:
        write_rollouts(batch, faulty, "run-f/iter-000002/rollouts")
    assert "s3://" in str(err2.value) and "run-f/iter-000002/rollouts" in str(err2.value)
    # bounded retries: every request failed, and the attempts stop (no endless retry loop)
    assert fault_proxy.stats["ok"] == 0 and 2 * 3 <= fault_proxy.failures <= 200

    fault_proxy.fail_rate = 0.0
    assert not stage_complete(direct, "run-f/iter-000002/rollouts")  # nothing half-published
    for e in (err.value, err2.value):
        text = "".join(traceback.format_exception(e))
        assert SECRET not in text and KEY_ID not in text
    _assert_no_secret(caplog, SECRET)


def test_env_credentials_never_logged(s3_store, caplog):
    """Default chain (env) credentials: not in logs, reprs, errors or manifests."""
    caplog.set_level(logging.DEBUG)
    m = write_rollouts(make_branch_batch(), s3_store, PREFIX)
    read_rollouts(s3_store, PREFIX)
    with pytest.raises(FileNotFoundError) as err:
        s3_store.get_bytes("missing")
    for text in (repr(s3_store), str(err.value), m.to_json().decode(), caplog.text):
        assert TEST_SECRET not in text
    _assert_no_secret(caplog, TEST_SECRET)


def _assert_no_secret(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    """No log record of any logger (ours, botocore, urllib3, s3transfer), at any level down to
    DEBUG, carries the secret or an access key id (botocore's request dumps are redacted)."""
    assert caplog.records
    for rec in caplog.records:
        text = rec.getMessage()
        for value in (secret, KEY_ID, TEST_KEY_ID):
            assert value not in text, (rec.name, text[:300])
