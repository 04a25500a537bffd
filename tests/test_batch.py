"""The batch format: validation names the key, the expected and the actual shape; collate stacks."""
from __future__ import annotations

import pytest
import torch

from cameo_bench.data.batch import BatchFormatError, batch_to, collate, validate_batch

B, V, H, W = 2, 3, 8, 12


def _batch(**overrides):
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(B, V, 3, H, W, generator=g),
        "intrinsics": torch.eye(3).expand(B, V, 3, 3).clone(),
        "cam2world": torch.eye(4).expand(B, V, 4, 4).clone(),
        "depth": torch.rand(B, V, H, W, generator=g) + 1,
        "point_map": torch.rand(B, V, 3, H, W, generator=g),
        "num_ref": 1,
    }
    batch.update(overrides)
    return {k: v for k, v in batch.items() if v is not None}


def _item(n: int, num_ref: int = 1):
    batch = _batch()
    item = {k: (v[n] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    item["num_ref"] = num_ref
    return item


def test_valid_batches_pass_and_are_returned():
    batch = _batch()
    assert validate_batch(batch) is batch
    validate_batch(_batch(depth=None, point_map=None))  # optional keys
    validate_batch(_batch(extra=["anything"]))  # extra keys pass through
    validate_batch(_batch(num_ref=torch.tensor(2)))  # a 0-d integer tensor is an int
    validate_batch(_item(0), batched=False)
    validate_batch(_batch(image=torch.rand(B, V, 3, H, W, dtype=torch.float64)))


@pytest.mark.parametrize(
    "key, bad, expected, actual",
    [
        ("image", torch.rand(B, V, H, W), "[B, V, 3, H, W]", "[2, 3, 8, 12]"),
        ("image", torch.rand(B, V, 1, H, W), "[B, V, 3, H, W]", "[2, 3, 1, 8, 12]"),
        ("intrinsics", torch.rand(B, V, 4, 4), "[B=2, V=3, 3, 3]", "[2, 3, 4, 4]"),
        ("cam2world", torch.rand(B, 4, 4), "[B=2, V=3, 4, 4]", "[2, 4, 4]"),
        ("depth", torch.rand(B, V, H, W + 1), "[B=2, V=3, H=8, W=12]", "[2, 3, 8, 13]"),
        ("depth", torch.rand(B, V, 1, H, W), "[B=2, V=3, H=8, W=12]", "[2, 3, 1, 8, 12]"),
        ("point_map", torch.rand(B, V, H, W, 3), "[B=2, V=3, 3, H=8, W=12]", "[2, 3, 8, 12, 3]"),
        ("point_map", torch.rand(B + 1, V, 3, H, W), "[B=2, V=3, 3, H=8, W=12]", "[3, 3, 3, 8, 12]"),
    ],
)
def test_shape_errors_name_key_expected_and_actual(key, bad, expected, actual):
    with pytest.raises(BatchFormatError) as err:
        validate_batch(_batch(**{key: bad}))
    message = str(err.value)
    assert f"'{key}'" in message and expected in message and actual in message, message


def test_unbatched_shape_error_uses_item_layout():
    item = _item(0)
    item["depth"] = torch.rand(V + 1, H, W)
    with pytest.raises(BatchFormatError, match=r"'depth'.*\[V=3, H=8, W=12\].*\[4, 8, 12\]"):
        validate_batch(item, batched=False)
    with pytest.raises(BatchFormatError, match=r"'image'"):
        validate_batch(_batch(), batched=False)  # a batch is not an item


def test_missing_keys_and_wrong_types():
    with pytest.raises(BatchFormatError, match=r"missing required key\(s\) \['cam2world'\]"):
        validate_batch(_batch(cam2world=None))
    with pytest.raises(BatchFormatError, match="'depth'.*floating"):
        validate_batch(_batch(depth=torch.ones(B, V, H, W, dtype=torch.int64)))
    with pytest.raises(BatchFormatError, match="'intrinsics'.*tensor"):
        validate_batch(_batch(intrinsics=[[1, 0, 0]]))
    with pytest.raises(BatchFormatError, match="'cam2world'.*non-finite"):
        cam2world = torch.eye(4).expand(B, V, 4, 4).clone()
        cam2world[1, 2, 0, 3] = float("nan")
        validate_batch(_batch(cam2world=cam2world))
    with pytest.raises(BatchFormatError):
        validate_batch([1, 2, 3])


@pytest.mark.parametrize("image", [torch.rand(B, V, 3, H, W) * 255, torch.rand(B, V, 3, H, W) * 2 - 1])
def test_image_range_is_checked(image):
    with pytest.raises(BatchFormatError, match=r"'image'.*\[0, 1\]"):
        validate_batch(_batch(image=image))


def test_nan_image_is_rejected():
    image = torch.rand(B, V, 3, H, W)
    image[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(BatchFormatError, match="'image'"):
        validate_batch(_batch(image=image))


@pytest.mark.parametrize("num_ref", [0, V, -1, 1.0, True, "1", torch.tensor([1, 1])])
def test_num_ref_is_checked(num_ref):
    with pytest.raises(BatchFormatError, match="num_ref"):
        validate_batch(_batch(num_ref=num_ref))


def test_collate_stacks_items_and_keeps_num_ref_an_int():
    items = [_item(0, num_ref=2), _item(1, num_ref=2)]
    items[0]["name"], items[1]["name"] = "a", "b"
    batch = collate(items)
    reference = _batch()
    for key in ("image", "intrinsics", "cam2world", "depth", "point_map"):
        assert torch.equal(batch[key], reference[key]), key
    assert batch["num_ref"] == 2 and type(batch["num_ref"]) is int
    assert batch["name"] == ["a", "b"]
    validate_batch(batch)


def test_collate_rejects_inconsistent_items():
    with pytest.raises(BatchFormatError, match="num_ref"):
        collate([_item(0, num_ref=1), _item(1, num_ref=2)])
    other = _item(1)
    del other["depth"]
    with pytest.raises(BatchFormatError, match="keys"):
        collate([_item(0), other])
    other = _item(1)
    other["depth"] = torch.rand(V, H + 1, W)
    with pytest.raises(BatchFormatError, match=r"'depth'.*shapes"):
        collate([_item(0), other])
    with pytest.raises(BatchFormatError, match="no items"):
        collate([])


def test_batch_to_moves_and_casts_only_floating_tensors():
    batch = _batch(ids=torch.arange(3))
    out = batch_to(batch, "cpu", dtype=torch.float64)
    assert out["image"].dtype == torch.float64 and out["ids"].dtype == torch.int64
    assert out["num_ref"] == 1
    torch.testing.assert_close(out["image"].float(), batch["image"])
