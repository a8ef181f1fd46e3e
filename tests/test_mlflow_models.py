"""What a user browsing MLflow finds after a pipeline run (the shared tiny run of conftest.py): an experiment
named for people and of the model-development kind, runs with their source script, the data each stage read
as dataset inputs, and the tokenizer registered as a pyfunc that loads from the registry and encodes exactly
the codes pretokenize wrote. The registered Transformer: tests/test_transformer_stage.py."""
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from helpers import mlflow_at
from pipeline.data.codes import codes_matrix
from pipeline.data.shards import iter_samples, list_shards
from pipeline.mlflow_models import registered_name
from pipeline.models.tokenizer import load_tokenizer
from pipeline.storage import Manifest, RunDir
from pipeline.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, default_tracking_uri


@pytest.fixture(scope="module")
def store(coded_run):
    uri = default_tracking_uri(str(coded_run))
    with mlflow_at(uri):  # the registry URI follows the tracking URI
        yield MlflowClient(uri)


def _stage_run(client: MlflowClient, run_dir: Path, folder: str):
    return client.get_run(Manifest.read(RunDir(str(run_dir)), folder).mlflow_run_id)


def test_experiment_is_named_for_people_and_opens_on_training_runs(coded_run, store):
    run = _stage_run(store, coded_run, "tokenizer")
    experiment = store.get_experiment(run.info.experiment_id)
    assert experiment.name == f"vim {coded_run.name}"  # not the run directory's absolute path
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    for folder in ("shards", "tokenizer", "codes"):
        tags = _stage_run(store, coded_run, folder).data.tags
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"], folder
        assert tags["mlflow.source.git.commit"] == tags["vim.git_commit"]


def test_each_stage_records_the_data_it_read(coded_run, store):
    run_dir = RunDir(str(coded_run))
    manifests = {folder: Manifest.read(run_dir, folder) for folder in ("shards", "tokenizer", "codes")}
    expected = {"shards": {"fashion_mnist"}, "tokenizer": {"shards"}, "codes": {"shards", "tokenizer"}}
    for folder, names in expected.items():
        inputs = store.get_run(manifests[folder].mlflow_run_id).inputs.dataset_inputs
        assert {i.dataset.name for i in inputs} == names, folder
        for entry in inputs:
            if entry.dataset.name in manifests:  # an upstream stage's output: its manifest's checksum
                assert entry.dataset.digest == manifests[entry.dataset.name].sha256[:36]
                assert str(coded_run / entry.dataset.name) in entry.dataset.source
            assert entry.tags[0].key == "mlflow.data.context" and entry.tags[0].value


def test_registered_tokenizer_loads_from_the_registry_and_encodes_the_stage_codes(coded_run, store):
    run = _stage_run(store, coded_run, "tokenizer")
    name = registered_name(store.get_experiment(run.info.experiment_id).name, "tokenizer")
    versions = store.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    manifest = Manifest.read(RunDir(str(coded_run)), "tokenizer")
    assert versions[0].tags["vim.fingerprint"] == manifest.fingerprint

    model = mlflow.pyfunc.load_model(f"models:/{name}/{versions[0].version}")
    samples = [s for url in list_shards(str(coded_run / "shards" / "val")) for s in iter_samples(url)]
    images = np.stack([s["image"] for s in samples])
    codes = model.predict(images)

    stored = {}
    for part in Manifest.read(RunDir(str(coded_run)), "codes").outputs["codes"]["val"]:
        table = pq.read_table(coded_run / "codes" / part)
        for key, view, row in zip(table["key"].to_pylist(), table["view"].to_pylist(), codes_matrix(table)):
            if view == 0:
                stored[key] = row
    assert codes.shape == (len(samples), 4, 4)
    assert np.array_equal(codes.reshape(len(samples), -1), np.stack([stored[s["key"]] for s in samples]))

    # Decoding through the pyfunc is the tokenizer's own decode, as uint8 pictures.
    pictures = model.predict(codes[:4], params={"mode": "decode"})
    assert pictures.dtype == np.uint8 and pictures.shape == (4, 16, 16, 3)
    import torch

    direct = load_tokenizer(coded_run / "tokenizer").decode(torch.from_numpy(codes[:4]))
    assert np.array_equal(pictures, direct.mul(255).round().byte().permute(0, 2, 3, 1).numpy())
    with pytest.raises(Exception, match="mode must be encode or decode"):
        model.predict(codes[:1], params={"mode": "sample"})
