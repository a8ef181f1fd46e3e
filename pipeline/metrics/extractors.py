"""Batch callables for evaluation: class-balanced samples, image features, transformer block features.

Plain classes, free of Ray: each loads its models once in `__init__` from folder locations (a local path
or a bucket URI) and maps a batch dict of numpy arrays to another. The evaluate stage runs them as Ray Data
actor pools (`map_batches(SampleImages, fn_constructor_kwargs=...)`); tests call them directly.
`use_gpu` asks for CUDA; it is used only when one is visible.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.transforms import center, to_float
from pipeline.device import inference_device
from pipeline.metrics.image_quality import psnr, ssim
from pipeline.metrics.inception import InceptionFeatures
from pipeline.models.domain_classifier import DomainClassifier
from pipeline.models.code_models import load_code_model, sample_codes
from pipeline.models.rq_transformer import RQSamplingSettings
from pipeline.models.sampling import SamplingSettings, sample_tokens
from pipeline.models.tokenizer import load_tokenizer
from pipeline.storage import local_folder


def stack_codes(column) -> np.ndarray:
    """A (rows, tokens) array from a codes column (object arrays of per-row arrays are stacked)."""
    return np.stack(list(column)) if getattr(column, "dtype", None) == object else np.asarray(column)


def load_domain_classifier(state: dict) -> DomainClassifier:
    """The domain classifier from the state the evaluate stage trains or caches, in eval mode."""
    model = DomainClassifier(state["num_classes"], state["width"], state["feature_dim"])
    model(torch.zeros(1, 3, state["size"], state["size"]))  # builds the lazily sized layers
    model.load_state_dict(state["weights"])
    return model.eval()


def sampling_settings(settings: dict) -> SamplingSettings | RQSamplingSettings:
    """The sampler's settings from their JSON form: per-depth lists (RQ-Transformer) become tuples."""
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    per_depth = any(isinstance(v, tuple) for v in settings.values())
    return (RQSamplingSettings if per_depth else SamplingSettings)(**settings)


class SampleImages:
    """Per chunk {labels: list of label lists, seed}: codes from the transformer (VIM or RQ), decoded to uint8
    images by the tokenizer. With `render_uri` (DiGIT) the transformer's codes are SSL tokens: the render
    model turns them into pixel codes first (the SSL tokens carry the class: it samples at guidance 1)."""

    def __init__(self, transformer_uri: str, tokenizer_uri: str, settings: dict, threads: int, use_gpu: bool,
                 render_uri: str | None = None):
        device = inference_device(threads, use_gpu)
        self.transformer = load_code_model(local_folder(transformer_uri), device)
        self.tokenizer = load_tokenizer(local_folder(tokenizer_uri), device)
        self.settings = sampling_settings(settings)
        self.render = load_code_model(local_folder(render_uri), device) if render_uri else None

    def _pixel_codes(self, ssl_tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        settings = self.settings
        plain = SamplingSettings(settings.temperature, settings.top_k, settings.top_p, 1.0)
        conditional = self.render.settings.num_classes > 0
        return sample_tokens(self.render, labels if conditional else None, plain, generator, condition=ssl_tokens)

    def __call__(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, labels, codes = [], [], []
        for chunk_labels, seed in zip(chunk["labels"], chunk["seed"]):
            label_tensor = torch.as_tensor(np.asarray(chunk_labels), dtype=torch.long)
            conditional = self.transformer.settings.num_classes > 0
            generator = torch.Generator().manual_seed(int(seed))
            tokens = sample_codes(self.transformer, label_tensor if conditional else None, self.settings,
                                  generator, batch=len(label_tensor))
            if self.render is not None:
                tokens = self._pixel_codes(tokens, label_tensor, generator)
            pixels = self.tokenizer.decode(tokens)
            images.append(pixels.mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
            labels.append(label_tensor.numpy())
            codes.append(tokens.cpu().numpy().astype(np.int16))
        return {"image": np.concatenate(images), "label": np.concatenate(labels), "codes": np.concatenate(codes)}


class ImageFeatures:
    """Per uint8 image, the feature sets named in `parts`: "domain" (domain-classifier features and
    probabilities), "inception" (TF-Inception pool3). With `recon_parts` (not None), the reconstruction by
    the tokenizer at `tokenizer_uri` too: those feature sets of it, PSNR, SSIM and the codes. With
    `rejection` (a second classifier's state), its probabilities as `rejection_probs`. `keep_images` passes
    the images through; a `key` column always passes through."""

    def __init__(self, domain: dict | None, inception_path: str | None, parts: list[str],
                 recon_parts: list[str] | None, keep_images: bool, image_size: int, threads: int, use_gpu: bool,
                 tokenizer_uri: str | None = None, rejection: dict | None = None):
        self.device = inference_device(threads, use_gpu)
        wanted = set(parts) | set(recon_parts or ())
        self.domain = load_domain_classifier(domain).to(self.device) if "domain" in wanted else None
        self.rejection = load_domain_classifier(rejection).to(self.device) if rejection is not None else None
        self.inception = InceptionFeatures(inception_path, self.device) if "inception" in wanted else None
        if recon_parts is not None and tokenizer_uri is None:
            raise ValueError("reconstruction features need the tokenizer's folder (tokenizer_uri)")
        self.tokenizer = (load_tokenizer(local_folder(tokenizer_uri), self.device)
                          if recon_parts is not None else None)
        self.parts, self.recon_parts = set(parts), set(recon_parts or ())
        self.keep_images, self.image_size = keep_images, image_size

    def _features(self, images: torch.Tensor, prefix: str, parts: set[str], out: dict) -> None:
        if "domain" in parts:
            with torch.no_grad():
                features = self.domain.features(images)
                out[f"{prefix}domain_features"] = features.cpu().numpy()
                out[f"{prefix}domain_probs"] = self.domain.classifier(features).softmax(-1).cpu().numpy()
        if "inception" in parts:
            out[f"{prefix}inception"] = self.inception(images).astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = center(to_float(torch.from_numpy(np.ascontiguousarray(batch["image"]))), self.image_size)
        images = images.to(self.device)
        out = {"label": np.asarray(batch["label"])}
        if "key" in batch:
            out["key"] = np.asarray(batch["key"])
        if self.keep_images:
            out["image"] = np.asarray(batch["image"])
        if self.rejection is not None:
            with torch.no_grad():
                out["rejection_probs"] = self.rejection(images).softmax(-1).cpu().numpy()
        if "codes" in batch:
            out["codes"] = stack_codes(batch["codes"])
        self._features(images, "", self.parts, out)
        if self.tokenizer is not None:
            with torch.no_grad():
                codes = self.tokenizer.encode(images)
                reconstruction = self.tokenizer.decode(codes)
            self._features(reconstruction, "recon_", self.recon_parts, out)
            out["psnr"] = psnr(reconstruction, images).cpu().numpy()
            out["ssim"] = ssim(reconstruction, images).cpu().numpy()
            out["codes"] = codes.flatten(1).cpu().numpy().astype(np.int16)
        return out


class BlockFeatures:
    """Per row of codes, the average-pooled features of the given transformer blocks (the RQ-Transformer's
    spatial ones) over the image's positions, shape (rows, len(blocks), dim); the class slot holds the null
    class, so no label leaks in."""

    def __init__(self, transformer_uri: str, blocks: list[int], threads: int, use_gpu: bool):
        self.device = inference_device(threads, use_gpu)
        self.model = load_code_model(local_folder(transformer_uri), self.device)
        self.blocks = blocks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = torch.as_tensor(stack_codes(batch["codes"]), dtype=torch.long, device=self.device)
        pooled = self.model.pooled_block_features(tokens, self.blocks)
        return {"label": np.asarray(batch["label"]), "split": np.asarray(batch["split"]),
                "features": pooled.cpu().numpy()}
