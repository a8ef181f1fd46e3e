"""Issue #22: the run directory is checked before Ray starts, and run_stage.py never creates one. No Ray here:
`connect_ray` is replaced by a function that fails the test if it is reached."""
import os

import full_pipeline
import pytest
import run_stage

import orchestration.runner as runner


class RayStarted(AssertionError):
    pass


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise RayStarted("connect_ray was reached: the check did not run before Ray")
    monkeypatch.setattr(runner, "connect_ray", refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return err


def test_a_run_directory_that_is_a_file_fails_before_ray(no_ray, tmp_path, capsys):
    path = tmp_path / "run"
    path.write_text("not a folder")
    assert full_pipeline.main(["--config", "configs/demo.yaml", "--run-dir", str(path), "--only", "ingest"]) == 2
    err = _error_line(capsys)
    assert str(path) in err and "is a file" in err


def test_a_run_directory_under_a_file_fails_before_ray(no_ray, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "run"
    assert full_pipeline.main(["--config", "configs/demo.yaml", "--run-dir", str(path), "--only", "ingest"]) == 2
    err = _error_line(capsys)
    assert str(path) in err and str(tmp_path / "file") in err


def test_an_unwritable_run_directory_is_named(tmp_path, monkeypatch):
    from pipeline.storage import check_run_dir

    path = tmp_path / "run"
    path.mkdir()
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # root may write anywhere: simulate
    with pytest.raises(Exception, match=f"{path}.*not writable"):
        check_run_dir(str(path))
    with pytest.raises(Exception, match=f"{path / 'sub'}.*{path}.*not writable"):
        check_run_dir(str(path / "sub"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_a_read_only_run_directory_fails_before_ray(no_ray, tmp_path, capsys):
    path = tmp_path / "run"
    path.mkdir(mode=0o500)
    assert full_pipeline.main(["--config", "configs/demo.yaml", "--run-dir", str(path), "--only", "ingest"]) == 2
    assert str(path) in _error_line(capsys)


def test_uris_and_new_local_folders_pass(tmp_path):
    from pipeline.storage import check_run_dir

    check_run_dir("gs://bucket/run")  # no local checks on a bucket
    check_run_dir(str(tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()  # the check creates nothing


@pytest.mark.parametrize("extra", [[], ["--config", "configs/demo.yaml"]])
def test_run_stage_refuses_a_missing_run_directory_without_creating_it(no_ray, tmp_path, capsys, extra):
    path = tmp_path / "missing"
    assert run_stage.main(["ingest", "--run-dir", str(path), *extra]) == 2
    err = _error_line(capsys)
    assert str(path) in err and "does not exist" in err
    assert not path.exists()


def test_image_stages_with_a_mismatched_resolution_fail_before_ray(no_ray, tmp_path, capsys):
    args = ["--config", "configs/demo.yaml", "--run-dir", str(tmp_path / "run"), "--set", "ingest.resolution=16",
            "--set", "tokenizer.perceptual_weight=0"]
    assert full_pipeline.main(args + ["--only", "tokenizer"]) == 2
    assert "ingest.resolution 16" in _error_line(capsys)
    assert not (tmp_path / "run").exists()
