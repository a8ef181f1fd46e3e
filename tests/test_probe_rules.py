"""Which transformers the linear probe may read: an unconditional one (start token) or a conditional one whose
null class label dropout trained. Anything else is refused, by the config when it loads and by the evaluate
stage against the trained model's own settings. No Ray: the checks run before any work."""
import pytest

from pipeline.config import ConfigError, build_config, load_config
from pipeline.models.settings import TransformerSettings

PROBE_ON = "evaluate.probe_train_images=1000"


@pytest.mark.parametrize("preset", ["imagenet256-base.yaml", "imagenet256-large.yaml"])
def test_a_conditional_model_without_label_dropout_is_refused_when_the_config_loads(preset):
    with pytest.raises(ConfigError) as error:
        load_config(f"configs/{preset}", [PROBE_ON])
    text = str(error.value)
    for named in ("transformer.conditional", "transformer.label_dropout", "transformer.conditional=false",
                  "transformer.label_dropout > 0", "evaluate.probe_train_images=0"):
        assert named in text


def test_the_defaults_probe_nothing_and_probing_them_is_refused():
    assert build_config({}).evaluate.probe_train_images == 0  # conditional, label_dropout 0: no probe
    with pytest.raises(ConfigError, match=r"transformer.label_dropout=0"):
        build_config({}, [PROBE_ON])


@pytest.mark.parametrize("overrides", [
    ["transformer.conditional=false"],  # the paper's probe: pretrained without labels
    ["transformer.label_dropout=0.1"],  # the null class is trained one step in ten
])
def test_a_model_with_a_trained_class_position_may_be_probed(overrides):
    assert build_config({}, [PROBE_ON, *overrides]).evaluate.probe_on


@pytest.mark.parametrize("preset", ["imagenet256-base.yaml", "imagenet256-large.yaml"])
def test_the_imagenet_presets_evaluate_without_the_probe(preset):
    cfg = load_config(f"configs/{preset}")
    assert cfg.transformer.conditional and cfg.transformer.label_dropout == 0 and not cfg.evaluate.probe_on
    unconditional = load_config(f"configs/{preset}", ["transformer.conditional=false",
                                                      "evaluate.probe_train_images=100000"])
    assert unconditional.evaluate.probe_on


def test_a_probe_too_small_to_fit_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"evaluate.probe_train_images.*0 \(no probe\) or at least 10"):
        build_config({}, ["evaluate.probe_train_images=5", "transformer.label_dropout=0.1"])


def _trained(num_classes: int, label_dropout: float) -> TransformerSettings:
    return TransformerSettings(size="pico", vocab_size=32, grid=(4, 4), num_classes=num_classes,
                               label_dropout=label_dropout)


def test_the_stage_refuses_a_trained_conditional_model_without_label_dropout():
    from pipeline.stage import StageInputError
    from stages.evaluate.probe import probe_token

    source = "the transformer at gs://b/run/transformer/config.json"  # trained under another config
    with pytest.raises(StageInputError) as error:
        probe_token(_trained(num_classes=10, label_dropout=0.0), source)
    text = str(error.value)
    assert text.startswith(f"{source} (num_classes 10, label_dropout 0): the linear probe")
    assert "transformer.conditional=false" in text and "transformer.label_dropout > 0" in text


def test_the_stage_reads_the_trained_model_file_before_any_feature(tmp_path):
    """A transformer trained under another config: its own config.json decides, whatever this config says."""
    import json

    from pipeline.stage import StageContext, StageInputError
    from pipeline.storage import Manifest, RunDir
    from stages import STAGES, spec
    from stages.evaluate.probe import probed_transformer

    def context(trained: TransformerSettings) -> StageContext:
        (tmp_path / "transformer").mkdir(exist_ok=True)
        (tmp_path / "transformer" / "config.json").write_text(json.dumps(trained.model_dump(mode="json")))
        manifest = Manifest(stage="transformer", config={}, config_hash="", inputs={}, fingerprint="",
                            outputs={"config": "config.json"})
        allowed = build_config({}, [PROBE_ON, "transformer.label_dropout=0.1"])  # the config passes its check
        return StageContext(spec=spec("evaluate"), cfg=allowed, run_dir=RunDir(str(tmp_path)), fingerprint="",
                            inputs={"transformer": manifest}, folders={stage.name: stage.folder for stage in STAGES})

    with pytest.raises(StageInputError, match=r"transformer/config.json \(num_classes 10, label_dropout 0\)"):
        probed_transformer(context(_trained(10, 0.0)))
    settings, fed = probed_transformer(context(_trained(10, 0.25)))
    assert settings.label_dropout == 0.25 and settings.shape.depth == 2  # pico: the probe's blocks come from here
    assert fed == "null-class token, trained by label dropout p=0.25"


def test_the_stage_says_which_token_it_feeds():
    from stages.evaluate.probe import probe_token

    assert probe_token(_trained(0, 0.0), "x") == "start token of an unconditional model"
    assert probe_token(_trained(10, 0.1), "x") == "null-class token, trained by label dropout p=0.1"
