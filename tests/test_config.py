import pytest

from pipeline.config import ConfigError, build_config, load_config, parse_override


def test_demo_preset_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.ingest.source == "fashion_mnist" and cfg.ingest.resolution == 32


def test_unknown_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError) as error:
        build_config({"ingest": {"shard_sise": 10}})
    text = str(error.value)
    assert "ingest.shard_sise" in text and "shard_size" in text and "resolution" in text


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'tokeniser'.*ingest"):
        build_config({}, ["tokeniser.codebook_dim=8"])


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError) as error:
        build_config({}, ["ingest.source=mnist"])
    assert "ingest.source" in str(error.value) and "'image_folder'" in str(error.value)


def test_bad_number_names_the_key_and_bound():
    with pytest.raises(ConfigError, match=r"ingest.jpeg_quality.*less than or equal to 100"):
        build_config({}, ["ingest.jpeg_quality=101"])


def test_overrides_are_typed_by_yaml():
    assert parse_override("ingest.resolution=null") == ("ingest.resolution", None)
    cfg = build_config({}, ["ingest.shard_size=7", "ingest.image_format=jpg"])
    assert cfg.ingest.shard_size == 7 and cfg.ingest.image_format == "jpg"


def test_root_is_required_where_there_is_no_default():
    with pytest.raises(ConfigError, match="ingest.root is required"):
        build_config({"ingest": {"source": "image_folder"}})


def test_split_names_are_checked():
    with pytest.raises(ConfigError, match="unknown split"):
        build_config({"ingest": {"source": "image_folder", "root": "/x", "splits": {"test": "t"}}})


def test_hash_ignores_runtime_only_fields_and_follows_output_fields():
    base = build_config({})
    assert build_config({}, ["ingest.cpus_per_task=0.5"]).ingest.hash() == base.ingest.hash()
    assert build_config({}, ["ingest.seed=1"]).ingest.hash() != base.ingest.hash()


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("preset", ["demo.yaml", "cifar10.yaml", "imagenet256-base.yaml", "imagenet256-large.yaml"])
def test_every_preset_is_valid(preset):
    cfg = load_config(f"configs/{preset}")
    assert cfg.tokenizer.image_size % cfg.tokenizer.patch_size == 0


def test_model_sections_inherit_the_model_settings_and_stay_torch_free():
    import subprocess
    import sys

    from pipeline.config import TokenizerConfig, TransformerConfig
    from pipeline.models.settings import TokenizerSettings, TransformerArchitecture

    assert set(TokenizerSettings.model_fields) < set(TokenizerConfig.model_fields)
    assert set(TransformerArchitecture.model_fields) < set(TransformerConfig.model_fields)
    with pytest.raises(ConfigError, match=r"tokenizer.codebook_size.*less than or equal to 32767"):
        build_config({}, ["tokenizer.codebook_size=40000"])
    with pytest.raises(ConfigError, match=r"unknown key 'transformer.vocab_size'; allowed keys here: .*label_dropout"):
        build_config({}, ["transformer.vocab_size=10"])  # the data decides it, not the config
    code = "import sys, pipeline.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- issue #22: malformed YAML, non-UTF-8, duplicate keys, strict numbers, inconsistent sizes ----------


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_malformed_yaml_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingest:\n  shard_size: 10\ntokenizer:\n  steps: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = _one_line(error)
    assert str(path) in text and "line " in text and "column " in text


def test_malformed_override_is_one_line_naming_the_override():
    with pytest.raises(ConfigError) as error:
        parse_override("tokenizer.betas=[0.9, 0.99")
    text = _one_line(error)
    assert "tokenizer.betas" in text and "column" in text


def test_config_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("ingest:\n  seed: 1\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = _one_line(error)
    assert str(path) in text and "line 3" in text and "UTF-8" in text


@pytest.mark.parametrize("text, key, line", [
    ("ingest:\n  seed: 1\n  seed: 2\n", "ingest.seed", 3),
    ("ingest:\n  seed: 1\ntokenizer:\n  steps: 3\ningest:\n  seed: 2\n", "ingest", 5),
    ("tokenizer:\n  resources:\n    num_workers: 1\n    num_workers: 2\n", "tokenizer.resources.num_workers", 4),
])
def test_duplicate_keys_are_refused_at_any_depth(tmp_path, text, key, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = _one_line(error)
    assert str(path) in message and f"line {line}" in message and f"duplicate key '{key}'" in message


def test_duplicate_keys_in_an_override_are_refused():
    with pytest.raises(ConfigError, match="duplicate key"):
        parse_override("ingest.splits={train: a, train: b}")


@pytest.mark.parametrize("override", ["tokenizer.steps=true", "tokenizer.lr=false", "ingest.resolution=true",
                                      "tokenizer.betas=[true, 0.99]", "evaluate.probe_blocks=[0, true]",
                                      "tokenizer.codebook_dim=true", "tokenizer.steps=2.5",
                                      "tokenizer.steps='30'"])
def test_numbers_are_strict(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        build_config({}, [override])


def test_an_int_still_passes_for_a_float_and_keeps_the_hash():
    cfg = build_config({}, ["tokenizer.lr=1", "tokenizer.betas=[1, 0.99]"])
    assert cfg.tokenizer.lr == 1.0 and isinstance(cfg.tokenizer.lr, float) and cfg.tokenizer.betas == (1.0, 0.99)
    assert build_config({}, ["tokenizer.lr=1"]).tokenizer.hash() == build_config({}, ["tokenizer.lr=1.0"]).tokenizer.hash()
    assert build_config({}).tokenizer.hash() == "5426b20473fd54af"  # the hash before strict types


def test_codebook_dim_wider_than_the_encoder_is_refused():
    with pytest.raises(ConfigError, match=r"tokenizer.codebook_dim 128.*tokenizer.encoder 'tiny'.*64"):
        build_config({}, ["tokenizer.codebook_dim=128"])
    assert build_config({}, ["tokenizer.codebook_dim=128", "tokenizer.encoder=mini"]).tokenizer.codebook_dim == 128
    assert build_config({}, ["tokenizer.codebook_dim=64"]).tokenizer.codebook_dim == 64


def test_image_size_different_from_the_ingest_resolution_is_refused_for_image_stages():
    from pipeline.config import check_stage_consistency

    cfg = build_config({}, ["ingest.resolution=16"])  # tokenizer.image_size stays 32
    check_stage_consistency(cfg, ["ingest"])  # ingest alone writes 16 px shards: fine
    for stage in ("tokenizer", "pretokenize", "evaluate"):
        with pytest.raises(ConfigError, match=r"tokenizer.image_size 32.*ingest.resolution 16"):
            check_stage_consistency(cfg, [stage])
    check_stage_consistency(build_config({}, ["ingest.resolution=16", "tokenizer.image_size=16"]), ["tokenizer"])


def test_native_resolution_logs_where_images_are_resized(caplog):
    from pipeline.config import check_stage_consistency

    cfg = build_config({}, ["ingest.resolution=null"])
    with caplog.at_level("INFO"):
        check_stage_consistency(cfg, ["tokenizer", "pretokenize"])
    resized = [r for r in caplog.records if "pipeline/data/transforms.py" in r.getMessage()]
    assert len(resized) == 1 and "32" in resized[0].getMessage()


def test_exponent_floats_without_a_dot_still_read_as_numbers(tmp_path):
    # YAML 1.1 leaves `3e-3` a string; strict floats would refuse it, so the config reader takes it as a number
    assert build_config({}, ["transformer.lr=3e-3"]).transformer.lr == 0.003
    path = tmp_path / "lr.yaml"
    path.write_text("tokenizer:\n  lr: 1e-4\n  lr_floor: 1.0e-5\n")
    assert load_config(path).tokenizer.lr == 1e-4
    assert parse_override("run.experiment=e5") == ("run.experiment", "e5")
