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


def _image_folder(root, classes=("cat", "dog"), per_class=2):
    from imagegen import picture, png

    for n, cls in enumerate(classes):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / "train" / cls / f"img{i}.png").write_bytes(png(picture(10 * n + i, (8, 8))))
    return root


def test_symlink_loops_and_dangling_links_are_reported_not_followed(tmp_path):
    _image_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "extra.png").write_bytes((tmp_path / "train" / "cat" / "img0.png").read_bytes())
    (tmp_path / "train" / "cat" / "loop").symlink_to(tmp_path / "train" / "cat")  # a loop
    (tmp_path / "train" / "dog" / "up").symlink_to(tmp_path / "train")  # a loop through the split
    (tmp_path / "train" / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # dangling
    (tmp_path / "train" / "dog" / "more").symlink_to(outside)  # followed, once
    (tmp_path / "train" / "dog" / "more2").symlink_to(outside)  # the same folder again
    (tmp_path / "train" / "dog" / "again.png").symlink_to(tmp_path / "train" / "dog" / "img0.png")
    index = build_index(_cfg(source="image_folder", root=str(tmp_path), splits={"train": "train"}))
    table = index.splits["train"].table
    origins = sorted(table.column("origin").to_pylist())
    assert origins == ["cat/img0.png", "cat/img1.png", "dog/img0.png", "dog/img1.png", "dog/more/extra.png"]
    assert max(len(k) for k in table.column("key").to_pylist()) < 40
    ignored = " | ".join(index.splits["train"].ignored)
    for name, why in (("cat/loop", "loop"), ("dog/up", "loop"), ("dog/gone.png", "dangling"),
                      ("dog/more2", "already"), ("dog/again.png", "already")):
        assert f"{name} " in ignored and why in ignored.split(f"{name} ", 1)[1].split(" | ")[0], (name, ignored)


def test_hidden_class_folders_are_not_classes(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "train" / ".hidden_cls").mkdir()
    (tmp_path / "train" / ".hidden_cls" / "x.png").write_bytes((tmp_path / "train" / "cat" / "img0.png").read_bytes())
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "v.png").write_bytes(b"x")
    (tmp_path / "val" / ".cache").mkdir()
    (tmp_path / "val" / ".cache" / "v.png").write_bytes(b"x")
    index = build_index(_cfg(source="image_folder", root=str(tmp_path)))
    assert [c["wnid"] for c in index.classes] == ["cat", "dog"]
    assert sorted(index.splits["train"].table.column("label").to_pylist()) == [0, 0, 1, 1]
    assert any(i.startswith(".hidden_cls") for i in index.splits["train"].ignored)
    assert index.splits["val"].table.column("label").to_pylist() == [0]


def test_empty_val_folder_is_reported_as_empty(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(SourceError, match="split 'val' .* is empty") as error:
        build_index(_cfg(source="image_folder", root=str(tmp_path)))
    assert "val_labels" not in str(error.value)


def test_source_listing_names_what_changed(tmp_path):
    from pipeline.data.sources import describe_changes

    _image_folder(tmp_path)
    cfg = _cfg(source="image_folder", root=str(tmp_path), splits={"train": "train"})
    before = build_index(cfg)
    assert build_index(cfg).fingerprint == before.fingerprint
    (tmp_path / "train" / "cat" / "img1.png").unlink()
    (tmp_path / "train" / "dog" / "img0.png").write_bytes(b"changed")
    (tmp_path / "train" / "dog" / "new.png").write_bytes(b"new")
    after = build_index(cfg)
    assert after.fingerprint != before.fingerprint
    text = describe_changes(before.files, after.files)
    assert "removed" in text and "cat/img1.png" in text
    assert "added" in text and "dog/new.png" in text
    assert "modified" in text and "dog/img0.png" in text
