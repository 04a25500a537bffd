"""Data: the batch format every loader produces, and the embedded synthetic scenes."""
from cameo_bench.data.batch import BatchFormatError, batch_to, collate, validate_batch
from cameo_bench.data.synthetic import SceneConfig, SyntheticScenes

__all__ = ["BatchFormatError", "batch_to", "collate", "validate_batch", "SceneConfig", "SyntheticScenes"]
