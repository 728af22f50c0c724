"""pathdino.data end to end on small real-tissue stores: validation, batches, exactly-once, resume, failures."""

from __future__ import annotations

import collections
import importlib.resources
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pathdino.data import AugmentConfig, DataConfig, MaskConfig, MultiCropBatch, build_train_loader, validate_stores
from tiling.store import StoreError, encode_tile
from tiling.store_write import TileStoreWriter

TILE_PX = 48
AUG = AugmentConfig(global_crop_px=32, local_crop_px=16, n_local_crops=3)
PATCH = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tissue_tiles() -> list[np.ndarray]:
    """120 real H&E tiles of 48 px from the bundled slide."""
    import openslide

    path = importlib.resources.files("pathdino") / "sample_data" / "CMU-1-Small-Region.svs"
    with openslide.OpenSlide(str(path)) as slide:
        region = np.array(slide.read_region((600, 800), 0, (480, 576)).convert("RGB"))
    return [
        np.ascontiguousarray(region[y : y + TILE_PX, x : x + TILE_PX])
        for y in range(0, 576, TILE_PX)
        for x in range(0, 480, TILE_PX)
    ]


def write_store(
    url: Path | str, slides: dict[str, list[bytes]], tile_px: int = TILE_PX, tiles_per_shard: int = 16
) -> str:
    writer = TileStoreWriter(url)
    for slide_id, encoded in slides.items():
        w = writer.begin_slide(slide_id, tile_px, tiles_per_shard=tiles_per_shard, tiles_per_chunk=8)
        if encoded:
            w.add(encoded, np.zeros((len(encoded), 2), np.int64), np.ones(len(encoded)))
        w.commit({"source_path": "CMU-1-Small-Region.svs"})
    return str(url)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tissue_tiles) -> str:
    enc = [encode_tile(t) for t in tissue_tiles]
    return write_store(
        tmp_path_factory.mktemp("data") / "tiles.zarr", {"a": enc[:50], "b": enc[50:80], "c": enc[80:87]}
    )  # 87 tiles in shards of 16


def loader(store: str, rank: int = 0, world_size: int = 1, batch: int = 4, seed: int = 0, **data_kw):
    data = DataConfig(
        stores=(store,),
        num_workers=data_kw.pop("num_workers", 0),
        shuffle_buffer_tiles=data_kw.pop("shuffle_buffer_tiles", 12),
        **data_kw,
    )
    return build_train_loader(
        data,
        data_kw.pop("aug", AUG),
        MaskConfig(),
        patch_size=PATCH,
        batch_size_per_process=batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )


def identities(batch: MultiCropBatch) -> list[tuple[int, str, int]]:
    return list(zip(batch.store_indices.tolist(), batch.slide_ids, batch.tile_indices.tolist()))


def take(it, n: int) -> list[MultiCropBatch]:
    return [next(it) for _ in range(n)]


def same(a: MultiCropBatch, b: MultiCropBatch) -> bool:
    return (
        identities(a) == identities(b)
        and torch.equal(a.global_crops, b.global_crops)
        and torch.equal(a.local_crops, b.local_crops)
        and torch.equal(a.masks, b.masks)
    )


# -- validation ----------------------------------------------------------------------------------------------------


def test_bad_stores_fail_before_training_with_the_store_or_slide_named(tmp_path, tissue_tiles, store):
    enc = [encode_tile(t) for t in tissue_tiles[:5]]
    with pytest.raises(StoreError, match="no tile store at"):
        validate_stores(DataConfig(stores=(str(tmp_path / "missing.zarr"),)), AUG)
    empty = str(tmp_path / "empty.zarr")
    TileStoreWriter(empty)
    with pytest.raises(StoreError, match=f"tile store {empty} holds no complete slides"):
        validate_stores(DataConfig(stores=(empty,)), AUG)
    holes = write_store(tmp_path / "holes.zarr", {"full": enc, "blank": []})
    with pytest.raises(StoreError, match="slide 'blank' in tile store .*holes.zarr has no tiles"):
        validate_stores(DataConfig(stores=(holes,)), AUG)
    assert validate_stores(DataConfig(stores=(holes,), skip_empty_slides=True), AUG).slide_ids == ("full",)
    with pytest.raises(StoreError, match=r"data.slides entries \['TCGA-\*'\] match no complete slide"):
        validate_stores(DataConfig(stores=(store,), slides=("a", "TCGA-*")), AUG)
    assert validate_stores(DataConfig(stores=(store,), slides=("[ab]",)), AUG).slide_ids == ("a", "b")
    with pytest.raises(StoreError, match="global_crop_px=64 is larger than the 48-px tiles of slide 'a'"):
        validate_stores(DataConfig(stores=(store,)), AugmentConfig(global_crop_px=64, local_crop_px=16))
    future = write_store(tmp_path / "future.zarr", {"x": enc})
    root = zarr.open_group(future, mode="r+")
    root.attrs["pathdino"] = {**root.attrs["pathdino"], "format_version": 99}
    with pytest.raises(StoreError, match="format version 99"):
        validate_stores(DataConfig(stores=(future,)), AUG)


# -- batches -------------------------------------------------------------------------------------------------------


def test_batches_follow_the_trainer_contract(store):
    ld = loader(store, batch=5)
    assert ld.batches_per_epoch == 87 // 5 and ld.samples_per_epoch == 85
    batch = next(iter(ld))
    assert isinstance(batch, MultiCropBatch) and batch.batch_size == 5
    assert batch.global_crops.shape == (2 * 5, 3, 32, 32) and batch.global_crops.dtype == torch.float32
    assert batch.local_crops.shape == (3 * 5, 3, 16, 16) and batch.n_local == 3 and batch.n_global == 2
    assert batch.masks.shape == (2 * 5, (32 // PATCH) ** 2) and batch.masks.dtype == torch.bool
    assert batch.masks.any(dim=1).sum() == 5  # half of the 10 global crops
    mean, std = torch.tensor(AUG.mean).view(1, 3, 1, 1), torch.tensor(AUG.std).view(1, 3, 1, 1)
    pixels = batch.global_crops * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.05
    assert batch.tile_indices.dtype == torch.int64 and set(batch.slide_ids) <= {"a", "b", "c"}


def test_every_tile_once_per_epoch_across_ranks(store):
    loaders = [loader(store, rank=r, world_size=3, batch=4) for r in range(3)]
    counts = collections.Counter()
    per_rank = []
    for ld in loaders:
        batches = take(iter(ld), ld.batches_per_epoch)
        per_rank.append(len(batches))
        for b in batches:
            counts.update(identities(b))
        assert ld.state_dict()["epoch"] == 1
    assert len(set(per_rank)) == 1 and per_rank[0] == 87 // 12  # same count on every rank
    assert max(counts.values()) == 1 and len(counts) == per_rank[0] * 12  # 87 - 84: 3 draws wait for next epoch
    wrap = [loader(store, rank=r, world_size=3, batch=4, epoch_remainder="wrap") for r in range(3)]
    seen = collections.Counter(i for ld in wrap for b in take(iter(ld), ld.batches_per_epoch) for i in identities(b))
    assert len(seen) == 87 and sum(seen.values()) == 96  # everything, 9 draws twice


def test_same_seed_same_batches_and_another_seed_differs(store):
    a, b, c = (take(iter(loader(store, seed=s)), 2) for s in (4, 4, 5))
    assert all(same(x, y) for x, y in zip(a, b))
    assert identities(a[0]) != identities(c[0])


def test_resume_gives_the_batches_of_the_uninterrupted_run(store):
    reference = take(iter(loader(store, batch=6)), 20)  # 14 batches per epoch: crosses into epoch 1
    for stop in (3, 13, 15):
        first = loader(store, batch=6)
        it = iter(first)
        take(it, stop)
        state = first.state_dict()
        resumed = loader(store, batch=6)
        resumed.load_state_dict(state)
        for want, got in zip(reference[stop:], take(iter(resumed), 20 - stop)):
            assert same(want, got)


def test_resume_with_another_world_size_skips_no_tile(store):
    olds = [loader(store, rank=r, world_size=2, batch=3, shuffle_buffer_tiles=6) for r in range(2)]
    seen = collections.Counter()
    for ld in olds:
        for b in take(iter(ld), 5):
            seen.update(identities(b))
    state = olds[0].state_dict()
    new = loader(store, rank=0, world_size=1, batch=3, shuffle_buffer_tiles=6)
    new.load_state_dict(state)
    assert new.state_dict()["epoch"] == 0
    it = iter(new)
    while new.state_dict()["epoch"] == 0:
        seen.update(identities(next(it)))
    assert len(seen) >= 87 - 2  # every tile but the new layout's remainder (< 3)
    assert sum(seen.values()) - len(seen) <= 2 * 2 * 6  # repeats: at most one old round


def test_changed_stores_refuse_an_exact_resume(store, tmp_path, tissue_tiles):
    state = loader(store).state_dict()
    other = write_store(tmp_path / "other.zarr", {"a": [encode_tile(t) for t in tissue_tiles[:40]]})
    ld = loader(other)
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        ld.load_state_dict(state)
    ld.load_state_dict({**state, "epoch": 3}, strict=False)
    assert ld.state_dict()["epoch"] == 3
    with pytest.raises(ValueError, match="seed"):
        ld.load_state_dict({**state, "seed": 9})


def test_workers_cover_every_tile_once_and_resume_exactly(store):
    """Two ranks x two DataLoader workers started with forkserver (zarr is opened inside the workers)."""
    counts = collections.Counter()
    for rank in (1, 0):
        ld = loader(store, rank=rank, world_size=2, batch=4, num_workers=2)
        it = iter(ld)
        batches = take(it, 3)
        state = ld.state_dict()  # taken mid-run, as a checkpoint would be
        batches += take(it, ld.batches_per_epoch - 1)
        for b in batches[: ld.batches_per_epoch]:
            counts.update(identities(b))
        if rank == 1:
            ld.close()
    assert max(counts.values()) == 1 and len(counts) == (87 // 8) * 8
    # Restoring rewinds the running (persistent) workers to the checkpoint.
    ld.load_state_dict(state)
    for want, got in zip(batches[3:], take(iter(ld), len(batches) - 3)):
        assert same(want, got)
    ld.close()


def test_fsspec_url_stores_are_read_like_local_ones(tissue_tiles):
    url = write_store(
        "memory://pathdino-data-test/tiles.zarr",
        {"a": [encode_tile(t) for t in tissue_tiles[:20]], "b": [encode_tile(t) for t in tissue_tiles[20:33]]},
    )
    ld = loader(url, batch=4)
    seen = [i for b in take(iter(ld), ld.batches_per_epoch) for i in identities(b)]
    assert len(seen) == len(set(seen)) == 32


@pytest.mark.parametrize("path,decode_device", [("cpu", "cpu"), ("gpu", "gpu")])
def test_undecodable_tiles_are_skipped_counted_and_logged(tmp_path, tissue_tiles, caplog, path, decode_device):
    enc = [encode_tile(t) for t in tissue_tiles[:30]]
    bad = {3, 17, 18}
    for i in bad:
        enc[i] = b"\xff\xd8 this is not a jpeg"
    url = write_store(tmp_path / "broken.zarr", {"s": enc})
    ld = loader(url, batch=5, path=path, decode_device=decode_device)
    with caplog.at_level(logging.WARNING, logger="pathdino.data"):
        batches = take(iter(ld), ld.batches_per_epoch)
    assert all(b.global_crops.shape[0] == 10 and torch.isfinite(b.global_crops).all() for b in batches)
    used = {t for b in batches for t in b.tile_indices.tolist()}
    assert not used & bad and len(used) == 27
    assert ld.stats["failed_tiles"] == 3 and ld.stats["decode_failures"] == 3 and ld.stats["batches"] == 6
    assert sum("skipped tile" in r.message and "decode failed" in r.message for r in caplog.records) == 3


def test_slide_sampling_balances_slides(store):
    ld = loader(store, batch=3, sampling="slide")
    counts = collections.Counter(s for b in take(iter(ld), ld.batches_per_epoch) for s in b.slide_ids)
    assert sum(counts.values()) == 87
    assert max(counts.values()) - min(counts.values()) <= 1  # 29 each although the slides hold 50, 30, 7 tiles


@pytest.mark.parametrize("decode_device", ["cpu", "gpu"])
def test_gpu_path_runs_on_cpu_tensors_like_the_cpu_path(store, decode_device):
    cpu = take(iter(loader(store, batch=4)), 2)
    gpu = take(iter(loader(store, batch=4, path="gpu", decode_device=decode_device)), 2)
    std = torch.tensor(AUG.std).view(1, 3, 1, 1) * 255
    for a, b in zip(cpu, gpu):
        assert identities(a) == identities(b) and torch.equal(a.masks, b.masks)
        assert b.global_crops.shape == a.global_crops.shape and b.local_crops.shape == a.local_crops.shape
        assert ((a.global_crops - b.global_crops) * std).abs().mean() < 1.0
