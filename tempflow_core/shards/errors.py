"""The errors of the shard format: every one names the stage, shard, sample or field at fault."""

from __future__ import annotations

from tempflow_core.storage import ObjectNotFound, StoreError


class ShardError(StoreError):
    """Base of the shard-format errors."""


class ShardIntegrityError(ShardError):
    """An object's bytes differ from its manifest entry (sha256 or size); names the object."""


class UnsafeMemberError(ShardError):
    """A sample holds a pickle-based member; reading it could execute code."""


class SchemaError(ShardError, ValueError):
    """A sample, manifest or batch does not follow the schema; names the field."""


class StageNotFound(ShardError, ObjectNotFound):
    """No manifest at the prefix: the stage never ran or was interrupted."""


class StageExists(ShardError):
    """A complete stage output (manifest present) would be overwritten."""
