"""The loader in multi-process training: rank shares, set_epoch, resuming mid-epoch (threads and
worker processes), and prefetching that runs across epoch boundaries. Real caches, real gloo ranks."""

from __future__ import annotations

import gc
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from preprocessed_dataloader import CacheError, create_preprocessed_dataloader

# 3 volumes x 4 crops = 12 samples per epoch
CROPS = dict(crop_size=(4, 4, 4), samples_per_volume=4, shuffle=True, seed=3, return_metadata=True, num_threads=2)


def identities(batch) -> list[tuple]:
    """What each sample of a batch is: (volume index, crop origin, epoch)."""
    return [(m["volume_index"], tuple(m["sample"]["offset"]), m["sample"]["epoch"]) for m in batch[3]]


def epoch_identities(loader, epoch: int) -> list[tuple]:
    loader.set_epoch(epoch)
    return [i for batch in loader for i in identities(batch)]


def tensors(batch) -> tuple:
    return tuple(t for t in batch[:3])


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert identities(x) == identities(y)
        assert all((p is None and q is None) or torch.equal(p, q) for p, q in zip(tensors(x), tensors(y), strict=True))


# ----------------------------------------------------------------------------- ranks


def _rank_main(rank: int, world_size: int, init_file: str, cache: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loader = create_preprocessed_dataloader(cache, batch_size=2, **CROPS)  # ranks from torch.distributed
        seen = {epoch: epoch_identities(loader, epoch) for epoch in (0, 1)}
        state = loader.state_dict()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"batches": len(loader), "seen": seen, "state": state}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_read_disjoint_equal_shares_whose_union_is_the_epoch(built_cache, tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(built_cache), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)  # one process: the whole epoch
    assert ranks[0]["batches"] == ranks[1]["batches"] == 3
    assert [r["state"]["rank"] for r in ranks] == [0, 1] and {r["state"]["world_size"] for r in ranks} == {2}
    for epoch in (0, 1):
        shares = [[tuple(map(_tuple, i)) for i in r["seen"][str(epoch)]] for r in ranks]
        assert len(shares[0]) == len(shares[1]) == 6
        assert not set(shares[0]) & set(shares[1])
        assert Counter(shares[0]) + Counter(shares[1]) == Counter(epoch_identities(whole, epoch))
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # set_epoch decides the order and crops


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def test_rank_keywords_pad_by_repeating_the_epoch_start_or_drop_the_tail(built_cache):
    options = dict(batch_size=1, shuffle=True, seed=8, return_metadata=True)  # 3 whole volumes
    order = [i[0] for i in epoch_identities(create_preprocessed_dataloader(built_cache, **options), 0)]
    shares = [[i[0] for i in epoch_identities(create_preprocessed_dataloader(built_cache, rank=r, world_size=2, **options), 0)]
              for r in (0, 1)]
    assert shares == [[order[0], order[2]], [order[1], order[0]]]  # the padding repeats the order's start
    dropped = [[i[0] for i in epoch_identities(
        create_preprocessed_dataloader(built_cache, rank=r, world_size=2, drop_last=True, **options), 0)] for r in (0, 1)]
    assert dropped == [[order[0]], [order[1]]]


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        (dict(rank=2, world_size=2), r"rank must be an integer in \[0, 1\] for world_size 2, got 2"),
        (dict(rank=-1, world_size=2), "rank must be"),
        (dict(rank=0, world_size=0), "world_size must be a positive integer, got 0"),
        (dict(rank=1), r"rank must be an integer in \[0, 0\]"),
        (dict(rank=0, world_size=4, drop_last=True), "drop_last with 3 samples leaves nothing for each of 4 ranks"),
    ],
)
def test_bad_rank_or_world_size_is_one_clear_error(built_cache, keywords, message):
    with pytest.raises(CacheError, match=message):
        create_preprocessed_dataloader(built_cache, **keywords)


# ----------------------------------------------------------------------------- epochs and prefetching


def test_set_epoch_decides_the_order_and_crops_deterministically(built_cache):
    a = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)
    b = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)
    assert epoch_identities(a, 5) == epoch_identities(b, 5)
    assert epoch_identities(a, 5) != epoch_identities(a, 6)
    assert epoch_identities(a, 0) == epoch_identities(b, 0)


def test_prefetch_across_epoch_boundaries_delivers_the_same_batches_as_without_prefetch(built_cache):
    def one_loader_per_epoch(epoch):  # nothing is read ahead across a boundary
        loader = create_preprocessed_dataloader(built_cache, batch_size=2, prefetch_batches=0, **CROPS)
        loader.set_epoch(epoch)
        return list(loader)

    expected = [one_loader_per_epoch(epoch) for epoch in range(3)]
    with_set_epoch = create_preprocessed_dataloader(built_cache, batch_size=2, prefetch_batches=2, **CROPS)
    without_set_epoch = create_preprocessed_dataloader(built_cache, batch_size=2, prefetch_batches=2, **CROPS)
    threads = []
    for epoch in range(3):
        with_set_epoch.set_epoch(epoch)
        passes = [iter(with_set_epoch), iter(without_set_epoch)]  # the second advances its epoch by itself
        threads.append(passes[0].thread)
        for p in passes:
            assert_same_batches(list(p), expected[epoch])
    assert threads[0] is threads[1] is threads[2] and threads[0].is_alive()  # one stream read all three epochs


def test_an_unpredicted_set_epoch_discards_the_batches_read_ahead(built_cache):
    loader = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)
    first = iter(loader)
    list(first)  # the stream has read ahead into epoch 1
    loader.set_epoch(7)
    second = iter(loader)
    assert second.thread is not first.thread and not first.thread.is_alive()
    fresh = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)
    fresh.set_epoch(7)
    assert_same_batches(list(second), list(fresh))


# ----------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_run_delivers_the_remaining_batches_bit_for_bit(built_cache, num_workers):
    options = dict(CROPS, samples_per_volume=2, batch_size=2, num_workers=num_workers)  # 3 batches an epoch
    uninterrupted = create_preprocessed_dataloader(built_cache, **options)
    expected = [batch for epoch in range(3) for batch in (uninterrupted.set_epoch(epoch), list(uninterrupted))[1]]

    interrupted = create_preprocessed_dataloader(built_cache, **options)
    delivered = list(interrupted)  # epoch 0, without set_epoch
    for batch in interrupted:  # epoch 1: killed after its second batch
        delivered.append(batch)
        if len(delivered) == 5:
            state = json.loads(json.dumps(interrupted.state_dict()))
            break
    assert (state["epoch"], state["batches_delivered"]) == (1, 2)
    del interrupted

    resumed = create_preprocessed_dataloader(built_cache, **dict(options, seed=None))  # the state brings the seed
    resumed.load_state_dict(state)
    for epoch in range(state["epoch"], 3):
        resumed.set_epoch(epoch)
        delivered.extend(resumed)
    assert_same_batches(delivered, expected)


def test_state_after_a_finished_pass_points_at_the_next_epoch(built_cache):
    loader = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_delivered"]) == (0, 0)
    list(loader)
    state = loader.state_dict()
    assert (state["epoch"], state["batches_delivered"], state["seed"], state["world_size"]) == (1, 0, 3, 1)
    assert state["volume_indices"] == [0, 1, 2] and len(state["fingerprint"]) == 16
    assert json.loads(json.dumps(state)) == state


def test_a_state_from_another_dataset_or_world_size_is_refused(built_cache):
    state = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS).state_dict()
    others = {
        "volume_indices [0, 1, 2] saved, [0, 1] here": dict(volume_indices=[0, 1]),
        "world_size 1 saved, 2 here": dict(rank=0, world_size=2),
        "batch_size 2 saved, 3 here": dict(batch_size=3),
    }
    for message, change in others.items():
        loader = create_preprocessed_dataloader(built_cache, **{**CROPS, "batch_size": 2, **change})
        with pytest.raises(CacheError, match=message.replace("[", r"\[").replace("]", r"\]")):
            loader.load_state_dict(state)
    loader = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)
    with pytest.raises(CacheError, match="not a loader state"):
        loader.load_state_dict({"epoch": 1})
    with pytest.raises(CacheError, match="invalid position"):
        loader.load_state_dict(dict(state, epoch=-1))


def test_a_dropped_loader_stops_the_stream_it_carried_into_the_next_epoch(built_cache):
    loader = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)
    epoch_pass = iter(loader)
    list(epoch_pass)
    thread = epoch_pass.thread
    assert thread.is_alive()  # reading epoch 1 ahead
    del loader, epoch_pass
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_interpreter_exit_stops_a_stream_still_reading_the_next_epoch(built_cache):
    """A script that ends right after its last epoch leaves the loader reading ahead; the exit
    hook stops and joins that thread before the interpreter tears TensorStore down."""
    from dinov3_cache.loader.prefetch import _stop_every_prefetcher

    loader = create_preprocessed_dataloader(built_cache, batch_size=2, **CROPS)
    epoch_pass = iter(loader)
    list(epoch_pass)
    assert epoch_pass.thread.is_alive()  # reading epoch 1 ahead, the loader still referenced
    _stop_every_prefetcher()
    assert not epoch_pass.thread.is_alive()
