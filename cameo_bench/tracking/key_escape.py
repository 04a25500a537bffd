"""How a metric name is spelled inside MLflow, which accepts only `[/\\w.\\- :]` in metric keys.

The engine's names use "@" and "+" (`zdiag/attn/<layer>/pck@1/90+`). The writer escapes them on the way in
and the reader unescapes them on the way out, so that everything outside `tracking/` sees the engine's
names; both sides use this one table, so the two directions cannot drift apart. Pure strings.
"""
from __future__ import annotations

_KEY_ESCAPES = (("@", "_at_"), ("+", "_plus"))


def to_mlflow_key(key: str) -> str:
    for raw, escaped in _KEY_ESCAPES:
        key = key.replace(raw, escaped)
    return key


def from_mlflow_key(key: str) -> str:
    for raw, escaped in reversed(_KEY_ESCAPES):
        key = key.replace(escaped, raw)
    return key
