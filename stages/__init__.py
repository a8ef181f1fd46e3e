"""The pipeline's stages, in order. Each later stage plugs in here with its folder and its inputs.

The config's `tokens` picks the graph: `vq` (VIM: the Transformer models the pixel tokenizer's codes) or
`ssl_kmeans` (DiGIT: an SSL encoder and K-means make the tokens the Transformer models, and a second-stage
Transformer renders them as pixel codes). Both keep one order, so `--from`, `--only` and sweeps read the same."""
from pipeline.stage import StageSpec

_INGEST = StageSpec(name="ingest", folder="shards", upstream=(), entry="stages.ingest:run")
_TOKENIZER = StageSpec(name="tokenizer", folder="tokenizer", upstream=("ingest",), entry="stages.tokenizer:run")
_TRANSFORMER = StageSpec(name="transformer", folder="transformer", upstream=("ingest", "pretokenize"),
                         entry="stages.transformer:run")

GRAPHS: dict[str, tuple[StageSpec, ...]] = {
    "vq": (
        _INGEST, _TOKENIZER,
        StageSpec(name="pretokenize", folder="codes", upstream=("ingest", "tokenizer"), entry="stages.pretokenize:run"),
        _TRANSFORMER,
        StageSpec(name="evaluate", folder="eval", upstream=("ingest", "tokenizer", "pretokenize", "transformer"),
                  entry="stages.evaluate:run"),
    ),
    "ssl_kmeans": (
        _INGEST, _TOKENIZER,
        StageSpec(name="ssl", folder="ssl", upstream=("ingest",), entry="stages.ssl:run"),
        StageSpec(name="kmeans", folder="kmeans", upstream=("ingest", "ssl"), entry="stages.kmeans:run"),
        StageSpec(name="pretokenize", folder="codes", upstream=("ingest", "tokenizer", "ssl", "kmeans"),
                  entry="stages.pretokenize:run"),
        _TRANSFORMER,
        StageSpec(name="render", folder="render", upstream=("ingest", "pretokenize"), entry="stages.render:run"),
        StageSpec(name="evaluate", folder="eval", upstream=("ingest", "tokenizer", "pretokenize", "transformer", "render"),
                  entry="stages.evaluate:run"),
    ),
}
STAGES = GRAPHS["vq"]  # the default graph
# Every stage of any graph, in the one order they share: what `--from/--only/--to` accept.
STAGE_NAMES = ("ingest", "tokenizer", "ssl", "kmeans", "pretokenize", "transformer", "render", "evaluate")


def graph(tokens: str = "vq") -> tuple[StageSpec, ...]:
    """The stages of the graph `tokens` (the config's `tokens`) picks, in order."""
    if tokens not in GRAPHS:
        raise KeyError(f"unknown tokens '{tokens}'; choose one of {', '.join(GRAPHS)}")
    return GRAPHS[tokens]


def names(tokens: str = "vq") -> tuple[str, ...]:
    return tuple(stage.name for stage in graph(tokens))


def spec(name: str, tokens: str | None = None) -> StageSpec:
    """A stage of the graph `tokens`; without it, of the first graph that has one of that name (a stage's
    name and folder are the same in every graph)."""
    for stage in (graph(tokens) if tokens else [s for g in GRAPHS.values() for s in g]):
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage '{name}'; stages: {', '.join(names(tokens) if tokens else STAGE_NAMES)}")


def folders() -> dict[str, str]:
    """Every stage's run-directory folder, by name."""
    return {name: spec(name).folder for name in STAGE_NAMES}
