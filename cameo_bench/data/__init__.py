"""Data, from disk to the batch format: `batch` (format, checks), `synthetic` (embedded scenes),
`scene_format` (the on-disk scene folder), `scene_dataset` (items from scene folders), `converters/`.

Only the batch helpers and the synthetic scenes are re-exported: the rest imports PIL and is
needed only by runs on real data.
"""
from cameo_bench.data.batch import BatchFormatError, batch_to, collate, validate_batch
from cameo_bench.data.synthetic import SceneConfig, SyntheticScenes

__all__ = ["BatchFormatError", "batch_to", "collate", "validate_batch", "SceneConfig", "SyntheticScenes"]
