"""Trained models as MLflow models: each tokenizer and Transformer (VIM or RQ) a pyfunc (encode/decode, or sample)
logged on its stage run beside its safetensors folder, and registered under a name per experiment.

    model = mlflow.pyfunc.load_model("models:/vim-demo-tokenizer/latest")
    codes = model.predict(images_uint8)                       # (N, h, w) codes ((N, h, w, D) under RQ)
    images = model.predict(codes, params={"mode": "decode"})  # uint8 (N, H, W, 3)

The pyfunc carries this package (`code_paths`), so it loads where the project is not installed.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

PACKAGE = Path(__file__).resolve().parent
REGISTERED_SUFFIX = {"tokenizer": "tokenizer", "transformer": "transformer"}


class TokenizerModel(mlflow.pyfunc.PythonModel):
    """predict(images) -> codes; predict(codes, params={"mode": "decode"}) -> images.

    Images: uint8 (N, H, W) or (N, H, W, C), any size: centred and resized to the tokenizer's input exactly
    as pretokenize's plain view is, so the codes equal the stage's. Codes: (N, h, w) or (N, h*w); under
    residual quantization (N, h, w, D) or (N, h*w*D)."""

    def load_context(self, context) -> None:
        from pipeline.models.tokenizer import load_tokenizer

        self.model = load_tokenizer(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        mode = (params or {}).get("mode", "encode")
        if mode == "encode":
            return encode_images(self.model, np.asarray(model_input))
        if mode == "decode":
            return decode_codes(self.model, np.asarray(model_input))
        raise ValueError(f"mode must be encode or decode, not {mode!r}")


class TransformerModel(mlflow.pyfunc.PythonModel):
    """predict(labels) -> sampled codes (N, h, w) ((N, h, w, D) from an RQ-Transformer), or images with
    params={"output": "images"} (the run's tokenizer travels with the model). Params: temperature, top_k, top_p,
    guidance_scale, seed."""

    def load_context(self, context) -> None:
        from pipeline.models.code_models import load_code_model
        from pipeline.models.tokenizer import load_tokenizer

        self.transformer = load_code_model(context.artifacts["transformer"])
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        from pipeline.models.code_models import sample_codes
        from pipeline.models.sampling import SamplingSettings

        params = dict(params or {})
        labels = torch.as_tensor(np.asarray(model_input).reshape(-1), dtype=torch.long)
        settings = SamplingSettings(temperature=float(params.get("temperature", 1.0)),
                                    top_k=int(params.get("top_k", 0)), top_p=float(params.get("top_p", 1.0)),
                                    guidance_scale=float(params.get("guidance_scale", 1.0)))
        generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
        codes = sample_codes(self.transformer, labels, settings, generator)
        codes = codes.view(len(labels), *self.tokenizer.settings.code_shape)
        if params.get("output", "codes") == "images":
            return decode_codes(self.tokenizer, codes.numpy())
        return codes.numpy()


def encode_images(model, images: np.ndarray) -> np.ndarray:
    import torch

    from pipeline.data.transforms import to_float
    from pipeline.data.views import as_rgb, cut_view

    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W[, C]), got {images.dtype}")
    plain = cut_view(as_rgb(images), "plain", model.settings.image_size)  # pretokenize's plain view
    with torch.inference_mode():
        return model.encode(to_float(torch.from_numpy(plain))).numpy()


def decode_codes(model, codes: np.ndarray) -> np.ndarray:
    import torch

    codes = torch.as_tensor(np.asarray(codes, np.int64)).reshape(-1, *model.settings.code_shape)
    with torch.inference_mode():
        images = model.decode(codes)
    return images.mul(255).round().byte().permute(0, 2, 3, 1).numpy()


def registered_name(experiment: str, stage: str) -> str:
    """A registry name per experiment and stage, in the characters every MLflow store accepts."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{experiment}-{REGISTERED_SUFFIX[stage]}").strip("-")


def _requirements() -> list[str]:
    import pydantic
    import safetensors
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
            f"pydantic=={pydantic.__version__}", f"safetensors=={safetensors.__version__}",
            f"mlflow=={mlflow.__version__}"]


def _signature(params: dict[str, Any]):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    kinds = {str: "string", int: "long", float: "double"}
    return ModelSignature(params=ParamSchema([ParamSpec(name, kinds[type(value)], value)
                                              for name, value in params.items()]))


def log_stage_model(tracking_uri: str, run_id: str, stage: str, folders: dict[str, dict[str, bytes]],
                    experiment: str, tags: dict[str, str]) -> str:
    """Log `stage`'s model as a pyfunc from run `run_id` (an MLflow 3 logged model) and register it; returns
    the registered name. Through `MlflowClient` alone: no global tracking URI or active run is touched.

    `folders`: artifact name -> {file name: bytes} (the model's two files, and the tokenizer's for a
    Transformer), read from the run directory by the caller so a remote run directory works too."""
    import mlflow.pyfunc

    if stage == "tokenizer":
        python_model, params = TokenizerModel(), {"mode": "encode"}
    else:
        python_model, params = TransformerModel(), {"temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                                    "guidance_scale": 1.0, "seed": 0, "output": "codes"}
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=stage, source_run_id=run_id, tags=tags,
                                        model_type="pyfunc")
    with tempfile.TemporaryDirectory() as temp:
        artifacts = {}
        for artifact, files in folders.items():
            folder = Path(temp) / "files" / artifact
            folder.mkdir(parents=True)
            for file_name, data in files.items():
                (folder / file_name).write_bytes(data)
            artifacts[artifact] = str(folder)
        saved = Path(temp) / "model"
        mlflow.pyfunc.save_model(saved, python_model=python_model, artifacts=artifacts, code_paths=[str(PACKAGE)],
                                 pip_requirements=_requirements(), signature=_signature(params))
        client.log_model_artifacts(logged.model_id, str(saved))
    client.finalize_logged_model(logged.model_id, "READY")
    name = registered_name(experiment, stage)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, tags={"vim.stage": stage})
    # The artifact location, not models:/<id>: a registry store resolves that through the global tracking URI.
    client.create_model_version(name, logged.artifact_location, run_id=run_id, tags=tags,
                                model_id=logged.model_id)
    return name
