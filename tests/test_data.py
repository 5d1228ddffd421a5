"""IDX parsing, deterministic order, eval coverage and the offline data search."""

import ml_collections
import numpy as np
import pytest
from conftest import FASHION_MNIST_DIR, write_idx

from scaling.data import dataset as dataset_lib
from scaling.data import idx, idx_read_ahead, images
from scaling.data import loader as loader_lib
from scaling.errors import UserError


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "a.gz"), array)


def test_truncated_idx_is_a_user_error(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((4, 5), np.uint8))
    import gzip
    data = gzip.open(tmp_path / "a.gz").read()[:-3]
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(data)
    with pytest.raises(UserError, match="truncated or corrupt"):
        idx.read_idx(tmp_path / "b.gz")


def test_gzip_of_several_members_reads_whole_and_a_bad_checksum_is_refused(tmp_path):
    import gzip
    array = np.arange(6 * 7, dtype=np.uint8).reshape(6, 7)
    write_idx(tmp_path / "a.gz", array)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    # Concatenated gzip files are one valid file of two members.
    (tmp_path / "two.gz").write_bytes(gzip.compress(raw[:20]) + gzip.compress(raw[20:]))
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "two.gz"), array)
    corrupt = bytearray(gzip.compress(raw))
    corrupt[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    (tmp_path / "bad.gz").write_bytes(bytes(corrupt))
    with pytest.raises(UserError, match="bad.gz: cannot read IDX file"):
        idx.read_idx(tmp_path / "bad.gz")


def test_manual_dir_loads_all_splits(tiny_idx_dir):
    config = ml_collections.ConfigDict(
        {"name": "mnist", "manual_dir": str(tiny_idx_dir), "tfds_data_dir": ""})
    data = images.load_image_dataset(config)
    assert data.train["image"].shape == (512, 28, 28, 1)
    assert data.train["label"].dtype == np.int32
    assert data.eval_splits["test"]["image"].shape == (300, 28, 28, 1)


def test_manual_dir_without_files_names_the_flag(tmp_path):
    config = ml_collections.ConfigDict(
        {"name": "mnist", "manual_dir": str(tmp_path), "tfds_data_dir": ""})
    with pytest.raises(UserError, match="--config.data.manual_dir=.*four IDX files"):
        images.load_image_dataset(config)


def test_debian_fashion_mnist_is_found(fashion_mnist_available):
    config = ml_collections.ConfigDict(
        {"name": "fashion_mnist", "manual_dir": "", "tfds_data_dir": ""})
    data = images.load_image_dataset(config)
    assert str(FASHION_MNIST_DIR) in data.source
    assert data.num_train == 60000 and len(data.eval_splits["test"]["label"]) == 10000
    assert data.label_names[9] == "Ankle boot"


def test_missing_data_lists_every_option(monkeypatch, tmp_path):
    monkeypatch.setattr(idx, "WELL_KNOWN_DIRS", {})
    monkeypatch.setattr(images, "network_reachable", lambda *a, **k: False)
    config = ml_collections.ConfigDict(
        {"name": "mnist", "manual_dir": "", "tfds_data_dir": str(tmp_path)})
    with pytest.raises(UserError) as error:
        images.load_image_dataset(config)
    message = str(error.value)
    for option in ("network", "--config.data.tfds_data_dir", "--config.data.manual_dir"):
        assert option in message


def test_order_is_a_pure_function_of_seed_and_step():
    a = dataset_lib.train_indices(seed=3, step=1000, batch_size=32, num_examples=500)
    b = dataset_lib.train_indices(seed=3, step=1000, batch_size=32, num_examples=500)
    c = dataset_lib.train_indices(seed=4, step=1000, batch_size=32, num_examples=500)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_an_epoch_visits_distinct_examples_and_reshuffles():
    per_epoch = dataset_lib.steps_per_epoch(100, 8)
    epoch0 = np.concatenate([dataset_lib.train_indices(0, s, 8, 100) for s in range(per_epoch)])
    epoch1 = np.concatenate([dataset_lib.train_indices(0, s, 8, 100)
                             for s in range(per_epoch, 2 * per_epoch)])
    assert len(set(epoch0)) == len(epoch0) == 96
    assert not np.array_equal(epoch0, epoch1)


def in_memory(data, eval_data=None):
    return dataset_lib.ArrayDataset(name="toy", train=data, eval_splits={"test": eval_data},
                                    label_names=(), source="")


def test_the_loader_stacks_consecutive_steps_of_the_local_rows():
    dataset = in_memory({"x": np.arange(50)})
    rows = np.array([0, 3, 4])
    loader = loader_lib.TrainLoader(dataset, 1, 5, rows, 7, 10, prefetch_steps=2)
    chunk = loader.next(3)
    assert chunk["x"].shape == (3, 3)
    np.testing.assert_array_equal(chunk["x"][2], dataset_lib.train_indices(1, 9, 5, 50)[rows])


def test_eval_chunks_cover_every_example_exactly_once():
    dataset = in_memory({"x": np.arange(3)},
                        {"x": np.arange(1, 1001), "label": np.zeros(1000, np.int32)})
    chunks = list(loader_lib.eval_chunks(dataset, "test", 64, np.arange(64)))
    assert [c["x"].shape for c in chunks] == [(16, 64)]
    real = chunks[0]["x"][chunks[0]["mask"]]
    np.testing.assert_array_equal(np.sort(real), np.arange(1, 1001))


def test_read_ahead_gives_the_same_arrays_and_is_claimed_once(tiny_idx_dir):
    config = ml_collections.ConfigDict({"name": "mnist", "manual_dir": str(tiny_idx_dir),
                                        "tfds_data_dir": ""})
    direct = images.load_image_dataset(config)
    idx_read_ahead.read_ahead(config)
    assert len(idx.pending_reads) == 4
    ahead = images.load_image_dataset(config)
    assert not idx.pending_reads  # every file claimed; a later load reads from disk again
    for split in ("train", "test"):
        want = direct.train if split == "train" else direct.eval_splits["test"]
        got = ahead.train if split == "train" else ahead.eval_splits["test"]
        for key in ("image", "label"):
            np.testing.assert_array_equal(got[key], want[key])


def test_read_ahead_errors_surface_where_the_file_is_read(tmp_path):
    for name in idx.ALL_IDX_FILES:
        (tmp_path / name).write_bytes(b"not gzip")
    config = ml_collections.ConfigDict({"name": "mnist", "manual_dir": str(tmp_path),
                                        "tfds_data_dir": ""})
    idx_read_ahead.read_ahead(config)
    with pytest.raises(UserError, match="cannot read IDX file"):
        images.load_image_dataset(config)
    idx.pending_reads.clear()  # the files the failed load never reached
