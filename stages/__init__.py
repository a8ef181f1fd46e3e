"""The pipeline's stages, in order. Each later stage plugs in here with its folder and its inputs."""
from pipeline.stage import StageSpec

STAGES: tuple[StageSpec, ...] = (
    StageSpec(name="ingest", folder="shards", upstream=(), entry="stages.ingest:run"),
    StageSpec(name="tokenizer", folder="tokenizer", upstream=("ingest",), entry="stages.tokenizer:run"),
    StageSpec(name="pretokenize", folder="codes", upstream=("ingest", "tokenizer"), entry="stages.pretokenize:run"),
    StageSpec(name="transformer", folder="transformer", upstream=("ingest", "pretokenize"),
              entry="stages.transformer:run"),
    StageSpec(name="evaluate", folder="eval", upstream=("ingest", "tokenizer", "pretokenize", "transformer"),
              entry="stages.evaluate:run"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def spec(name: str) -> StageSpec:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage '{name}'; stages: {', '.join(STAGE_NAMES)}")
