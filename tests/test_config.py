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
