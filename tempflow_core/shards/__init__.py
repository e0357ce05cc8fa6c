"""Rollout shards: a versioned webdataset schema on the object store, manifests and scores.

A stage output is a prefix holding webdataset tar shards (one sample per branch point or plain
trajectory), the prompt embeddings once, and a manifest written last: without the manifest the
output does not exist. Rewards and advantages live beside the shards as small manifest-backed
score objects keyed by the child keys, so scoring never rewrites a shard. Nothing is pickled.

Modules: `schema` (layout, names, key rules), `manifest` (Manifest, provenance), `samples`
(sample <-> BranchPoint / Trajectory), `png` and `tar` (the fast encoders), `writing`
(write_rollouts), `reading` (iter_samples, read_rollouts), `gopen` (s3:// for stock
webdataset), `scores` (write_scores, read_scores), `errors`.
"""

from tempflow_core.storage import StoreLike
from tempflow_core.shards.errors import SchemaError, ShardError, ShardIntegrityError, StageExists, StageNotFound, UnsafeMemberError
from tempflow_core.shards.gopen import S3GopenHandler, register_s3_gopen
from tempflow_core.shards.manifest import (
    Manifest, ObjectInfo, ShardInfo, manifest_key, read_manifest, require_manifest, stage_complete, write_manifest,
)
from tempflow_core.shards.png import auto_png_level
from tempflow_core.shards.reading import iter_samples, read_embeds, read_rollouts, shard_urls
from tempflow_core.shards.samples import decode_sample, encode_branch_point, encode_trajectory, sample_to_dataclass
from tempflow_core.shards.schema import (
    EMBEDS_NAME, FORBIDDEN_EXTENSIONS, MANIFEST_NAME, PROMPTS_NAME, SCHEMA_VERSION, SCORES_NAME, SHARD_PATTERN,
)
from tempflow_core.shards.scores import Scores, read_scores, scores_complete, write_scores
from tempflow_core.shards.writing import RolloutPart, publish_rollouts, write_rollout_part, write_rollouts, write_shards

__all__ = [
    "EMBEDS_NAME", "FORBIDDEN_EXTENSIONS", "MANIFEST_NAME", "PROMPTS_NAME", "SCHEMA_VERSION", "SCORES_NAME",
    "SHARD_PATTERN", "Manifest", "ObjectInfo", "S3GopenHandler", "SchemaError", "Scores", "ShardError",
    "ShardInfo", "ShardIntegrityError", "StageExists", "StageNotFound", "StoreLike", "UnsafeMemberError",
    "auto_png_level", "decode_sample", "encode_branch_point", "encode_trajectory", "iter_samples", "manifest_key",
    "read_embeds", "read_manifest", "read_rollouts", "read_scores", "register_s3_gopen", "require_manifest",
    "sample_to_dataclass", "scores_complete", "shard_urls", "stage_complete", "write_manifest", "write_rollouts",
    "write_scores", "write_shards", "RolloutPart", "publish_rollouts", "write_rollout_part",
]
