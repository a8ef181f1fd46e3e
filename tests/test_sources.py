import numpy as np
import pytest
import scipy.io

from imagegen import WNIDS, make_imagenet
from pipeline.config import build_config
from pipeline.data.sources import SampleReader, SourceError, build_index, read_val_labels


def _cfg(**ingest):
    return build_config({"ingest": ingest}).ingest


def test_imagenet_tar_of_tars_is_indexed_without_extracting(tmp_path):
    fake = make_imagenet(tmp_path, "tar")
    index = build_index(_cfg(source="imagenet_tar", root=str(tmp_path),
                             val_labels=str(tmp_path / "LOC_val_solution.csv"),
                             synsets=str(tmp_path / "LOC_synset_mapping.txt")))
    assert [c["wnid"] for c in index.classes] == WNIDS
    assert index.classes[1]["name"] == "fish number 1"
    train, val = index.splits["train"].table, index.splits["val"].table
    assert train.num_rows == fake.train_count and val.num_rows == fake.val_count
    assert set(train.column("kind").to_pylist()) == {"range"}
    assert len(set(train.column("key").to_pylist())) == train.num_rows
    # Byte ranges point at the exact member bytes inside the outer tar.
    row = train.slice(0, 1).to_pylist()[0]
    data = SampleReader().read(row["kind"], row["path"], row["offset"], row["size"])
    assert data[:2] == b"\xff\xd8" or data[:4] == b"\x89PNG" or row["origin"].endswith(
        ("corrupt.JPEG", "empty.JPEG"))
    labels = dict(zip(val.column("key").to_pylist(), val.column("label").to_pylist()))
    assert all(WNIDS[labels[s]] == w for s, w in fake.val_truth.items())


def test_imagenet_folders_with_flat_val_and_label_list(tmp_path):
    fake = make_imagenet(tmp_path, "folder")
    index = build_index(_cfg(source="imagenet_folder", root=str(tmp_path),
                             val_labels=str(tmp_path / "val_labels.txt")))
    assert index.splits["train"].table.num_rows == fake.train_count
    val = index.splits["val"].table
    labels = dict(zip(val.column("key").to_pylist(), val.column("label").to_pylist()))
    assert all(WNIDS[labels[s]] == w for s, w in fake.val_truth.items())


def test_devkit_ground_truth_with_meta_mat(tmp_path):
    fake = make_imagenet(tmp_path, "folder")
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    ids = {w: i + 1 for i, w in enumerate(reversed(WNIDS))}  # devkit ids are not sorted-wnid order
    synsets = np.array([(ids[w], w, f"words {w}") for w in WNIDS],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")])
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    truth = [ids[fake.val_truth[s]] for s in sorted(fake.val_truth)]
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, truth)) + "\n")
    labels, names = read_val_labels(str(tmp_path / "devkit"))
    assert labels == fake.val_truth and names[WNIDS[0]] == f"words {WNIDS[0]}"


def test_class_folder_val_and_generic_image_folder(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / "a.b.png").write_bytes(b"x")  # dots cannot stay in keys
            (tmp_path / split / cls / "a_b.png").write_bytes(b"x")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    index = build_index(_cfg(source="image_folder", root=str(tmp_path)))
    keys = index.splits["train"].table.column("key").to_pylist()
    assert len(keys) == 4 == len(set(keys)) and all("." not in k for k in keys)
    assert index.splits["train"].ignored == ["cat/.DS_Store"]
    assert sorted(index.splits["val"].table.column("label").to_pylist()) == [0, 0, 1, 1]


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        build_index(_cfg(source="image_folder", root=str(tmp_path / "nowhere")))


def test_empty_split_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(SourceError, match="holds no files"):
        build_index(_cfg(source="image_folder", root=str(tmp_path), splits={"train": "train"}))


def test_label_file_that_does_not_match_is_a_clear_error(tmp_path):
    make_imagenet(tmp_path, "folder")
    lines = (tmp_path / "val_labels.txt").read_text().splitlines()
    (tmp_path / "short.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(SourceError, match="1 of 9 images have no label"):
        build_index(_cfg(source="imagenet_folder", root=str(tmp_path), val_labels=str(tmp_path / "short.txt")))
    (tmp_path / "alien.txt").write_text(lines[0].split()[0] + " n99999999\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(SourceError, match="n99999999"):
        build_index(_cfg(source="imagenet_folder", root=str(tmp_path), val_labels=str(tmp_path / "alien.txt")))


def test_flat_val_without_labels_is_a_clear_error(tmp_path):
    make_imagenet(tmp_path, "folder")
    with pytest.raises(SourceError, match="set ingest.val_labels"):
        build_index(_cfg(source="imagenet_folder", root=str(tmp_path)))


def test_fashion_mnist_from_the_debian_package():
    cfg = _cfg(source="fashion_mnist")
    index = build_index(cfg)
    assert index.splits["train"].table.num_rows == 60000 and index.splits["val"].table.num_rows == 10000
    row = index.splits["val"].table.slice(5, 1).to_pylist()[0]
    image = SampleReader().read(row["kind"], row["path"], row["offset"], row["size"])
    assert image.size == (28, 28)
