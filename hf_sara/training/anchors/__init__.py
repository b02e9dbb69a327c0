"""Offline anchors: the anchors' routing under the model before training, computed once and memory-mapped.

- [`identity`]: what identifies a file's anchors ([`AnchorIdentity`]: router checksum, layout, pooling, datasets).
- [`file`]: the safetensors file, written row by row and read memory-mapped.
- [`offline`]: [`OfflineAnchors`], computed across ranks, loaded, verified and looked up by row.
- [`cache`]: a run's cache policy ([`open_offline_anchors`]): read the file, or compute it, or refuse.
"""

from .cache import ANCHORS_FILE_NAME, default_anchor_path, open_offline_anchors
from .identity import ANCHORS_FORMAT, AnchorIdentity, DatasetIdentity, anchor_tokens_digest, router_checksum
from .offline import AnchorTable, OfflineAnchors, distributions_key, flags_key

__all__ = [
    "ANCHORS_FILE_NAME",
    "ANCHORS_FORMAT",
    "AnchorIdentity",
    "AnchorTable",
    "DatasetIdentity",
    "OfflineAnchors",
    "anchor_tokens_digest",
    "default_anchor_path",
    "distributions_key",
    "flags_key",
    "open_offline_anchors",
    "router_checksum",
]
