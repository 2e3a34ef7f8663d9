"""--streaming: a datasets IterableDataset split over processes and loader workers, ties dropped on the fly, and a
stream position in checkpoints that a resumed run continues from."""

from types import SimpleNamespace

import pytest
import tiny
import torch
from helpers import COLUMNS, SD15, cli, losses

import train_diffusion_rpo as rpo


# A streamed run without validation, 2 pairs per step (with train(..., dataset=sharded_pickapic)).
STREAMING = ("--validation_prompts", "--streaming", "--train_batch_size", "2")


@pytest.fixture(scope="module")
def sharded_pickapic(tmp_path_factory):
    """24 rows in 4 parquet files: 16 pairs after dropping the 8 ties."""
    return tiny.write_pickapic_dataset(str(tmp_path_factory.mktemp("sharded")), tiny.pickapic_rows(24), num_files=4)


@SD15
@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_resume_continues_at_the_saved_stream_position(train, sharded_pickapic, workers):
    # Shuffle buffer off (the shard order is then fixed): a resume must replay nothing and skip nothing. 10 steps of
    # 2 pairs cycle the 16 pairs into a second epoch (each of 2 readers holds 2 files: 4 batches an epoch).
    common = ["--shuffle_buffer_size", "0", "--dataloader_num_workers", str(workers), "--checkpointing_steps", "5"]
    straight, _ = train(
        *STREAMING, *common, "--max_train_steps", "10", output_dir="straight", dataset=sharded_pickapic
    )
    train(*STREAMING, *common, "--max_train_steps", "5", output_dir="split", dataset=sharded_pickapic)
    resumed, _ = train(
        *STREAMING,
        *common,
        "--max_train_steps",
        "10",
        "--resume_from_checkpoint",
        "latest",
        output_dir="split",
        dataset=sharded_pickapic,
    )
    assert len(resumed.history) == 5
    assert losses(resumed) == losses(straight)[5:]
    readers = reader_states(resumed.stream_states[0])
    assert len(readers) == max(1, workers)
    assert max(state["epoch"] for state in readers) == 1  # went round into epoch 1


def reader_states(process_state):
    """The `StreamingPairDataset` states inside one process's checkpointed StatefulDataLoader state."""
    loader = process_state["loader"]
    if "_snapshot" not in loader:  # no loader workers: the dataset state sits in the loader's own state
        return [loader["dataset_state"]]
    return [worker["dataset_state"] for worker in loader["_snapshot"]["_worker_snapshots"].values()]


def streaming_args(sd_pipeline_path, dataset, clip_model_path, *extra):
    return rpo.parse_args(cli(sd_pipeline_path, dataset, clip_model_path, "unused", "--streaming", *extra))


def test_streaming_drops_ties_and_reads_each_pair_once_per_epoch(sd_pipeline_path, sharded_pickapic, clip_model_path):
    extra = ["--shuffle_buffer_size", "4", "--train_batch_size", "2"]
    args = streaming_args(sd_pipeline_path, sharded_pickapic, clip_model_path, *extra)
    raw = rpo.load_raw_dataset(args.dataset_name, streaming=True)
    stream = rpo.prepare_streaming_dataset(raw, rpo.dataset_columns(args), 0, 4)
    pairs = rpo.PairMaker(rpo.dataset_columns(args), 32, 0)
    captions, indices = [], []
    for rank in (0, 1):
        reader = iter(rpo.StreamingPairDataset(stream, pairs, num_processes=2, process_index=rank))
        for _ in range(8):  # 8 pairs per reader in epoch 0
            pair = next(reader)
            assert pair["epoch"] == 0
            captions.append(pair["caption"])
            indices.append(pair["pair_index"])
    rows = tiny.pickapic_rows(24)
    expected = sorted(row["caption"] for row in rows if row["label_0"] != 0.5)
    assert sorted(captions) == expected
    assert sorted(indices) == list(range(16))  # position x readers + reader: unique across processes
    # One process, two loader workers: datasets splits the process's shards between them, nothing read twice.
    one = rpo.StreamingPairDataset(stream, pairs)
    loader = torch.utils.data.DataLoader(one, batch_size=2, num_workers=2, collate_fn=rpo.collate_pairs)
    batches = [batch for batch, _ in zip(loader, range(8))]
    assert sorted(c for batch in batches for c in batch["captions"]) == expected
    assert sorted(i for batch in batches for i in batch["pair_index"].tolist()) == list(range(16))


def test_a_resume_with_other_reader_numbers_is_refused(sd_pipeline_path, sharded_pickapic, clip_model_path):
    args = streaming_args(sd_pipeline_path, sharded_pickapic, clip_model_path, "--dataloader_num_workers", "0")
    progress = rpo.TrainingProgress(0)
    progress.stream_states = {0: {"reader": 0, "workers": 2, "loader": {}}}
    columns = rpo.dataset_columns(args)
    stream = rpo.prepare_streaming_dataset(rpo.load_raw_dataset(args.dataset_name, streaming=True), columns, 0, 0)
    batches = rpo.StreamingBatches(args, SimpleNamespace(num_processes=1, process_index=0), stream, None, {}, progress)
    with pytest.raises(
        ValueError, match=r"process count \(1\) and --dataloader_num_workers \(0\): resume with the numbers"
    ):
        next(iter(batches))


def test_streaming_needs_max_train_steps(capsys):
    with pytest.raises(SystemExit):
        rpo.parse_args(["--streaming", "--max_train_steps", "0"])
    assert "--streaming needs --max_train_steps" in capsys.readouterr().err


def test_a_loader_worker_without_a_shard_fails_instead_of_hanging(tmp_path):
    # One parquet file, two loader workers: `datasets` gives worker 1 no shard, so its reader would cycle empty epochs.
    path = tiny.write_pickapic_dataset(str(tmp_path / "one-file"), tiny.pickapic_rows(8), num_files=1)
    stream = rpo.prepare_streaming_dataset(rpo.load_raw_dataset(path, streaming=True), COLUMNS, 0, 0)
    pairs = rpo.StreamingPairDataset(stream, rpo.PairMaker(COLUMNS, 32, 0))
    loader = torch.utils.data.DataLoader(pairs, batch_size=2, num_workers=2, collate_fn=rpo.collate_pairs)
    with pytest.raises(ValueError, match="got no rows: lower --dataloader_num_workers"):
        list(zip(loader, range(10)))
