"""Rollout shards, manifests and scores over both stores: exact round trips and failure modes."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from dp_helpers import assert_batches_identical, assert_tensor_identical, make_branch_batch, make_plain_batch

from tempflow_core import shards
from tempflow_core.shards import (
    SCHEMA_VERSION,
    Manifest,
    SchemaError,
    ShardInfo,
    ShardIntegrityError,
    StageExists,
    StageNotFound,
    UnsafeMemberError,
    iter_samples,
    read_manifest,
    read_rollouts,
    read_scores,
    scores_complete,
    shard_urls,
    stage_complete,
    write_manifest,
    write_rollouts,
    write_scores,
    writing,
)
from tempflow_core.shards.png import decode_png, encode_png

PREFIX = "run-a/iter-000003/rollouts"
PRODUCER = {"checkpoint_uri": "s3://ckpts/run-a/iter-000002/adapter", "config_hash": "cfg123", "iteration": 3}


def shard_names(store, prefix=PREFIX):
    return [k.rsplit("/", 1)[1] for k in store.list(prefix) if k.endswith(".tar")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_branch_roundtrip_exact(store, dtype):
    batch = make_branch_batch(prompts=3, steps=(0, 1, 3), k=4, dtype=dtype)  # 9 branch points
    m = write_rollouts(batch, store, PREFIX, samples_per_shard=4, producer=PRODUCER, extra={"note": "x"})

    assert [s.samples for s in m.shards] == [4, 4, 1]  # no empty shard
    assert shard_names(store) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert (m.schema_version, m.kind, m.rollout_kind) == (SCHEMA_VERSION, "rollouts", "branch")
    assert (m.num_samples, m.num_keys) == (9, 36)
    assert (m.checkpoint_uri, m.config_hash, m.producer["iteration"]) == (PRODUCER["checkpoint_uri"], "cfg123", 3)
    assert m.shards[0].keys == [bp.group_id for bp in batch.branch_points[:4]]
    assert read_manifest(store, PREFIX) == m and stage_complete(store, PREFIX)

    back = read_rollouts(store, PREFIX)
    assert_batches_identical(batch, back)
    assert back.sample_keys() == batch.sample_keys() == [k for bp in batch.branch_points for k in bp.child_keys]

    no_images = read_rollouts(store, PREFIX, images=False)
    assert all(bp.images is None for bp in no_images.branch_points)
    assert_batches_identical(batch, no_images, images=False)


def test_plain_roundtrip_exact(store):
    batch = make_plain_batch(prompts=2, group=3, dtype=torch.bfloat16)
    m = write_rollouts(batch, store, PREFIX, samples_per_shard=2, producer=PRODUCER)
    assert [s.samples for s in m.shards] == [2, 2, 2]
    assert_batches_identical(batch, read_rollouts(store, PREFIX))


def test_shard_members_and_keys(store):
    batch = make_branch_batch(prompts=1, steps=(2,), k=2)
    write_rollouts(batch, store, PREFIX)
    data = store.get_bytes(f"{PREFIX}/shard-000000.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert names == ["000000_k02.c00.png", "000000_k02.c01.png", "000000_k02.meta.json",
                     "000000_k02.tensors.safetensors"]
    meta = json.loads(tarfile.open(fileobj=io.BytesIO(data)).extractfile("000000_k02.meta.json").read())
    assert meta["child_keys"] == ["000000_k02_c00", "000000_k02_c01"]
    assert (meta["step"], meta["group_id"], meta["prompt_id"], meta["schema_version"]) == (2, "000000_k02", "000000",
                                                                                          SCHEMA_VERSION)
    # embeddings once per stage output, not per sample
    assert sorted(k.rsplit("/", 1)[1] for k in store.list(PREFIX)) == [
        "embeds.safetensors", "manifest.json", "prompts.json", "shard-000000.tar"]


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 1), (3, 9, 2), (16, 16, 3), (5, 4, 4)])
def test_png_encoder_is_lossless(shape):
    from PIL import Image

    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    for level in (0, 1, 9):
        with Image.open(io.BytesIO(encode_png(img, "test", level))) as im:
            im.load()
            assert im.format == "PNG"
            assert np.array_equal(np.asarray(im), img[..., 0] if shape[-1:] == (1,) else img)
    with pytest.raises(SchemaError, match="uint8"):
        encode_png(img.astype(np.float32), "test image", 1)


@pytest.mark.parametrize("shape", [(7, 5), (3, 9, 2), (16, 16, 3), (5, 4, 4)])
def test_png_decoder_reads_ours_and_pils_alike(shape):
    """The fast path (our unfiltered PNGs) and PIL's (filtered PNGs from PIL) give the pixels
    and the array shape that PIL gives; a 16-bit or palette PNG still decodes (through PIL)."""
    from PIL import Image

    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    img[:2] = 7  # flat rows: PIL's adaptive filter picks a non-None filter for them
    for level in (0, 1, 9):
        assert np.array_equal(decode_png(encode_png(img, "test", level), "test"), img)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    assert np.array_equal(decode_png(buf.getvalue(), "test"), img)
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.ndim == 3 else img).convert("P").save(buf, format="PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert np.array_equal(decode_png(buf.getvalue(), "test"), np.asarray(im))


def test_png_decoder_refuses_damaged_bytes():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    good = bytearray(encode_png(img, "test", 0))
    idat = good.index(b"IDAT")
    crc = bytearray(good)
    crc[idat + 10] ^= 0xFF  # a pixel byte: the chunk's CRC no longer matches
    with pytest.raises(SchemaError, match=r"shard s member c00.png: undecodable PNG .*CRC"):
        decode_png(bytes(crc), "shard s member c00.png")
    with pytest.raises(SchemaError, match="undecodable PNG"):
        decode_png(bytes(good[:idat + 20]), "cut")  # truncated inside IDAT
    with pytest.raises(SchemaError, match="undecodable PNG"):
        decode_png(b"GIF89a" + bytes(good[8:]), "not a png")


def test_shards_are_byte_identical_to_webdataset_tarwriter(tmp_path):
    """The fast tar writer emits exactly what webdataset.TarWriter(mtime=0) would."""
    batch = make_branch_batch(prompt_ids=["000000", "p" * 120])  # a member name > 100 bytes too
    m = write_rollouts(batch, str(tmp_path), "s", samples_per_shard=100)
    ours = (tmp_path / "s" / "shard-000000.tar").read_bytes()
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as tw:
        for bp in batch.branch_points:
            tw.write(shards.encode_branch_point(bp, png_level=shards.auto_png_level(bp.images[0])))
    assert ours == buf.getvalue()
    assert m.shards[0].bytes == len(ours)


def test_same_batch_gives_same_shard_bytes(tmp_path):
    batch = make_branch_batch()
    a = write_rollouts(batch, str(tmp_path / "a"), "s")
    b = write_rollouts(batch, str(tmp_path / "b"), "s")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_dotted_key_refused(store):
    batch = make_branch_batch(prompt_ids=["bad.id", "ok"])
    with pytest.raises(SchemaError, match=r"BranchPoint.group_id 'bad.id_k00'.*no dots"):
        write_rollouts(batch, store, PREFIX)
    assert not stage_complete(store, PREFIX)


def test_empty_batch_has_no_shards(store):
    batch = make_branch_batch(steps=())
    m = write_rollouts(batch, store, PREFIX)
    assert m.shards == [] and m.num_samples == 0 and shard_names(store) == []
    assert read_rollouts(store, PREFIX).branch_points == []


def test_corrupted_shard_detected_and_named(store):
    write_rollouts(make_branch_batch(prompts=2, steps=(0, 1)), store, PREFIX, samples_per_shard=2)
    key = f"{PREFIX}/shard-000001.tar"
    data = bytearray(store.get_bytes(key))
    data[700] ^= 0x01
    store.put_bytes(key, bytes(data))
    with pytest.raises(ShardIntegrityError) as err:
        read_rollouts(store, PREFIX)
    assert store.uri_for(key) in str(err.value) and "shard-000001.tar" in str(err.value)
    # a corrupted side object is named too
    store.put_bytes(f"{PREFIX}/embeds.safetensors", b"garbage")
    with pytest.raises(ShardIntegrityError, match="embeds.safetensors"):
        read_rollouts(store, PREFIX)


def test_shards_without_manifest_are_absent(store):
    write_rollouts(make_branch_batch(), store, PREFIX, samples_per_shard=2)
    store.delete(f"{PREFIX}/manifest.json")
    assert shard_names(store)  # shards are there ...
    assert read_manifest(store, PREFIX) is None and not stage_complete(store, PREFIX)  # ... but no stage
    with pytest.raises(StageNotFound, match=store.uri_for(PREFIX)):
        read_rollouts(store, PREFIX)
    with pytest.raises(StageNotFound):
        iter_samples(store, PREFIX)


def test_interrupted_encode_leaves_no_manifest(store, monkeypatch):
    calls = {"n": 0}
    real = shards.encode_branch_point

    def failing(bp, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("rollout worker died")
        return real(bp, **kw)

    monkeypatch.setattr(writing, "encode_branch_point", failing)
    with pytest.raises(RuntimeError, match="worker died"):
        write_rollouts(make_branch_batch(), store, PREFIX, samples_per_shard=1)
    assert not stage_complete(store, PREFIX)
    monkeypatch.setattr(writing, "encode_branch_point", real)
    batch = make_branch_batch()
    write_rollouts(batch, store, PREFIX, samples_per_shard=1)  # the redo completes the stage
    assert_batches_identical(batch, read_rollouts(store, PREFIX))


def test_interrupted_upload_leaves_shards_but_no_manifest(store, monkeypatch):
    real_put_file = store.put_file

    def put_file(key, path):
        if key.endswith("shard-000001.tar"):
            raise OSError(f"upload of {key} failed")
        return real_put_file(key, path)

    monkeypatch.setattr(store, "put_file", put_file)
    with pytest.raises(OSError, match="shard-000001.tar"):
        write_rollouts(make_branch_batch(), store, PREFIX, samples_per_shard=1, upload_workers=1)
    assert "shard-000000.tar" in shard_names(store)  # a half-written stage ...
    assert not stage_complete(store, PREFIX)  # ... is not a stage


def test_overwrite_policy(store):
    write_rollouts(make_branch_batch(seed=1), store, PREFIX)
    with pytest.raises(StageExists, match="overwrite=True"):
        write_rollouts(make_branch_batch(seed=2), store, PREFIX)
    batch = make_branch_batch(seed=2)
    write_rollouts(batch, store, PREFIX, overwrite=True)
    assert_batches_identical(batch, read_rollouts(store, PREFIX))


def _write_raw_stage(store, members: dict[str, bytes]) -> None:
    """A stage whose single shard holds the given members (with a correct manifest)."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as tw:
        tw.write({"__key__": "000000_k00", **members})
    data = buf.getvalue()
    import hashlib

    store.put_bytes(f"{PREFIX}/shard-000000.tar", data)
    write_manifest(store, PREFIX, Manifest(kind="rollouts", rollout_kind="branch", num_samples=1, shards=[
        ShardInfo("shard-000000.tar", hashlib.sha256(data).hexdigest(), len(data), 1, ["000000_k00"])]))


@pytest.mark.parametrize("member", ["x.pth", "state.pickle", "obj.pyd"])
def test_pickle_member_refused(store, member, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    sample = shards.encode_branch_point(make_branch_batch().branch_points[0])
    pickled_none = b"\x80\x04N."
    _write_raw_stage(store, {**{k: v for k, v in sample.items() if k != "__key__"}, member: pickled_none})
    with pytest.raises(UnsafeMemberError) as err:
        list(iter_samples(store, PREFIX, nodesplitter=None))
    assert member in str(err.value) and "shard-000000.tar" in str(err.value)


def test_writer_refuses_pickle_members_and_bad_keys(store):
    sample = shards.encode_branch_point(make_branch_batch().branch_points[0])
    with pytest.raises(SchemaError, match="'x.pth' is not allowed"):
        shards.write_shards([{**sample, "x.pth": b"..."}], store, PREFIX)
    with pytest.raises(SchemaError, match="'a.b'.*no dots"):
        shards.write_shards([{**sample, "__key__": "a.b"}], store, PREFIX)
    assert store.list(PREFIX) == []


def test_missing_member_named(store):
    sample = shards.encode_branch_point(make_branch_batch().branch_points[0])
    _write_raw_stage(store, {"meta.json": sample["meta.json"]})
    with pytest.raises(SchemaError, match="lacks member 'tensors.safetensors'"):
        list(iter_samples(store, PREFIX, nodesplitter=None))


def test_producer_credentials_scrubbed(store):
    m = write_rollouts(make_branch_batch(), store, PREFIX, producer={
        "checkpoint_uri": "s3://AKIDLEAK:secretleak@ckpts/a", "aws_secret_access_key": "secretleak", "iteration": 1})
    raw = store.get_bytes(f"{PREFIX}/manifest.json").decode()
    assert "secretleak" not in raw and "AKIDLEAK" not in raw
    assert m.checkpoint_uri == "s3://***@ckpts/a"


def test_scores_roundtrip(store):
    batch = make_branch_batch(prompts=2, steps=(0, 1), k=3)
    m = write_rollouts(batch, store, PREFIX)
    keys = batch.sample_keys()
    n = len(keys)
    rng = np.random.default_rng(0)
    values = {"reward": rng.random(n).astype(np.float32), "advantage": rng.standard_normal(n),
              "pickscore.details": rng.random((n, 3)), "valid": np.ones(n, dtype=np.bool_)}
    rewards = "run-a/iter-000003/rewards"
    assert not scores_complete(store, rewards, "pickscore")
    sm = write_scores(store, rewards, "pickscore", keys, values, meta={"model": "tiny"}, producer=PRODUCER)
    assert sm.kind == "scores" and sm.num_keys == n and scores_complete(store, rewards, "pickscore")

    s = read_scores(store, rewards, "pickscore")
    assert s.keys == keys and s.meta == {"model": "tiny"}
    for f, v in values.items():
        assert s.values[f].dtype == v.dtype and np.array_equal(s.values[f], v)
    assert s.mapping("reward")[keys[4]] == values["reward"][4]
    order = list(reversed(keys))
    assert np.array_equal(s.aligned(order, "advantage"), values["advantage"][::-1])
    with pytest.raises(KeyError, match="no value"):
        s.aligned(["000009_k00_c00"], "reward")
    assert read_manifest(store, PREFIX) == m  # the rollout stage is untouched
    with pytest.raises(StageNotFound):
        read_scores(store, rewards, "other")
    with pytest.raises(SchemaError, match="first dimension"):
        write_scores(store, rewards, "bad", keys, {"reward": np.zeros(n + 1)})


def _tag_worker(src):
    info = torch.utils.data.get_worker_info()
    for d in src:
        d["worker"] = info.id if info is not None else -1
        yield d


def test_dataloader_two_workers_each_sample_once(store):
    batch = make_branch_batch(prompts=3, steps=(0, 1, 2, 3), k=2, images=False)  # 12 samples
    write_rollouts(batch, store, PREFIX, samples_per_shard=2)  # 6 shards
    ds = iter_samples(store, PREFIX, images=False)
    ds.append(_tag_worker)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    items = list(loader)
    assert {d["worker"] for d in items} == {0, 1}
    seen = [(d["__key__"], d["x_k"]) for d in items]
    keys = [k for k, _ in seen]
    assert sorted(keys) == sorted(bp.group_id for bp in batch.branch_points)
    assert len(set(keys)) == len(keys)
    by_key = {bp.group_id: bp for bp in batch.branch_points}
    for k, x_k in seen:
        assert_tensor_identical(x_k, by_key[k].x_k, k)


def test_dataloader_spawn_workers_get_the_store_settings(s3_store):
    """Workers started by spawn rebuild the S3 client from the pickled pipeline: same endpoint."""
    batch = make_branch_batch(prompts=2, steps=(0, 1), k=2, images=False)
    write_rollouts(batch, s3_store, PREFIX, samples_per_shard=2)
    loader = torch.utils.data.DataLoader(iter_samples(s3_store, PREFIX, images=False), batch_size=None,
                                         num_workers=2, multiprocessing_context="spawn")
    assert sorted(d["__key__"] for d in loader) == sorted(bp.group_id for bp in batch.branch_points)


def test_split_by_node_each_sample_once(store, monkeypatch):
    batch = make_branch_batch(prompts=3, steps=(0, 1, 2), k=2, images=False)  # 9 samples
    write_rollouts(batch, store, PREFIX, samples_per_shard=2)  # 5 shards
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append([d.group_id for d in iter_samples(store, PREFIX, images=False, as_dataclass=True)])
    assert per_rank[0] and per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(bp.group_id for bp in batch.branch_points)
    # read_rollouts ignores the split: a single reader gets everything
    assert len(read_rollouts(store, PREFIX, images=False).branch_points) == 9


def test_plain_webdataset_reads_shard_urls(store):
    """Shard URLs work in a stock wds.WebDataset too (s3:// via the registered boto3 handler)."""
    batch = make_branch_batch()
    write_rollouts(batch, store, PREFIX, samples_per_shard=3)
    urls = shard_urls(store, PREFIX)
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
    keys = [s["__key__"] for s in ds]
    assert keys == [bp.group_id for bp in batch.branch_points]


def test_real_tiny_rollout_roundtrip(tmp_path):
    """One real (small) branched rollout of the tiny model survives the store exactly."""
    from tempflow_core.policies.models import build_tiny_pipeline
    from tempflow_core.policies.sd3 import SD3Policy
    from tempflow_core.algorithm.rollout import branched_rollout
    from tempflow_core.algorithm.schedule import make_schedule

    policy = SD3Policy(build_tiny_pipeline(workdir=tmp_path / "tok"), None, device="cpu")
    batch = branched_rollout(policy, ["a red circle", "a blue square"], ["000000", "000001"], make_schedule(3),
                             [0, 1], group_size=2, guidance_scale=4.5, seed=0)
    write_rollouts(batch, str(tmp_path / "store"), PREFIX, samples_per_shard=3, producer=PRODUCER)
    assert_batches_identical(batch, read_rollouts(str(tmp_path / "store"), PREFIX))


def test_shards_hold_no_final_latents_and_shards_written_with_them_are_still_read(store):
    """The children's final latents were written until only their images were kept: a new
    sample holds x_k, x_next, log_prob and seeds; an old one (with final_latents) reads back whole."""
    import safetensors.torch

    from tempflow_core.shards.samples import tensor_bytes

    bp = make_branch_batch().branch_points[0]
    new = shards.encode_branch_point(bp)
    assert set(safetensors.torch.load(new["tensors.safetensors"])) == {"x_k", "x_next", "log_prob", "seeds"}
    old = {**new, "__url__": "old.tar", "tensors.safetensors": tensor_bytes(
        {"x_k": bp.x_k, "x_next": bp.x_next, "log_prob": bp.log_prob, "seeds": bp.seeds,
         "final_latents": bp.final_latents}, "old")}
    got = shards.sample_to_dataclass(shards.decode_sample(old))
    assert_tensor_identical(got.final_latents, bp.final_latents, "final_latents")
    assert_tensor_identical(got.x_next, bp.x_next, "x_next")
    assert shards.sample_to_dataclass(shards.decode_sample({**new, "__url__": "new.tar"})).final_latents is None


def test_version_1_outputs_written_before_model_families_are_still_read_exactly(tmp_path):
    """tests/data_plane/fixtures/schema-v1: a branched and a plain rollout stage as tempflow wrote them
    at schema version 1 (committed bytes). They read back as the batches they were written from; a
    mask-bearing (version 2) stage round-trips its masks; a newer version is refused in one line."""
    from pathlib import Path

    from tempflow_core.batches import PromptEmbeds
    from tempflow_core.storage import open_store

    old = open_store(str(Path(__file__).parent / "fixtures" / "schema-v1"))
    for prefix, batch in (("run/iter-000000/rollout", make_branch_batch(prompts=2, steps=(0, 2), k=3, seed=11,
                                                                        image_side=8)),
                          ("run/iter-000001/rollout", make_plain_batch(prompts=2, group=2, steps=3, seed=12))):
        assert read_manifest(old, prefix).schema_version == 1 != SCHEMA_VERSION
        got = read_rollouts(old, prefix)
        assert got.embeds.mask is None
        assert_batches_identical(got, batch)
    masked = make_branch_batch(prompts=2, steps=(0, 2), k=3, seed=11)
    e = masked.embeds
    masked.embeds = PromptEmbeds(e.embeds, e.pooled[:, :0], e.neg_embeds, e.neg_pooled[:, :0],
                                 torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.tensor([[1, 1, 0, 0, 0]]))
    new = open_store(str(tmp_path))
    assert write_rollouts(masked, new, "run/iter-000002/rollout").schema_version == SCHEMA_VERSION == 2
    assert_batches_identical(read_rollouts(new, "run/iter-000002/rollout"), masked)
    manifest = json.loads(new.get_bytes("run/iter-000002/rollout/manifest.json"))
    with pytest.raises(SchemaError, match="has schema_version 3; this tempflow reads up to 2 \\(upgrade tempflow\\)"):
        Manifest.from_json(json.dumps({**manifest, "schema_version": 3}).encode(), "m")
