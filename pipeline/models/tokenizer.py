"""ViT-VQGAN: ViT encoder -> quantizer -> ViT decoder; saved and loaded by pipeline.models.io.

With `architecture: cnn` the encoder and decoder are the CNN-VQGAN baseline's (pipeline/models/cnn.py) around
the same quantizer and output heads, so the losses and the stages treat both alike.

Images enter and leave as RGB in [0, 1]. The decoder head is either the paper's logit-Laplace head (sigmoid
mean, 6 channels: location and log-scale per colour) or Parti's plain linear head (3 channels, no
sigmoid, no logit-Laplace loss). A grey model (`channels: 1`) reads the luma and predicts one plane, which
R, G and B share.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models.cnn import CNNDecoder, CNNEncoder
from pipeline.models.cpu_linear import Linear
from pipeline.models.io import load_model, save_model
from pipeline.models.losses import from_laplace_space
from pipeline.models.noble import Noble
from pipeline.models.quantize import QuantizerOutput
from pipeline.models.residual_quantize import make_quantizer
from pipeline.models.settings import VIT_SIZES, TokenizerSettings
from pipeline.models.vit import ViTDecoder, ViTEncoder, init_weights

LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601: R, G, B weights summing to 1


class ViTVQGAN(nn.Module):
    def __init__(self, settings: TokenizerSettings):
        super().__init__()
        self.settings = settings
        # The logit-Laplace head predicts a location and a log-scale per channel.
        out_channels = settings.channels * (2 if settings.output_head == "logit_laplace" else 1)
        if settings.architecture == "cnn":
            self._build_cnn(settings, out_channels)
        else:
            self._build_vit(settings, out_channels)
        # The projections around the codebook keep unit-scale signals: a 0.02-std proj_out would drown
        # the codes under the decoder's position embeddings, and a random proj_in bias would point every
        # latent the same way; either collapses the codebook onto one code.
        for layer in (self.quantizer.proj_in, self.quantizer.proj_out, self.bridge):
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    # The modules are made in this order (encoder, quantizer, bridge, decoder) for both: the ViT's
    # parameters, state-dict keys and seeded initial weights stay what they were before the CNN came.
    def _build_vit(self, settings: TokenizerSettings, out_channels: int) -> None:
        enc, dec = VIT_SIZES[settings.encoder], VIT_SIZES[settings.decoder]
        noble = Noble.of(settings)  # NOBLE branches in the encoder's and decoder's blocks (rank 0: none)
        self.encoder = ViTEncoder(enc, settings.image_size, settings.patch_size, settings.channels, noble=noble)
        self.quantizer = make_quantizer(enc.dim, settings, settings)
        self.bridge = nn.Identity() if enc.dim == dec.dim else Linear(enc.dim, dec.dim)
        self.decoder = ViTDecoder(dec, settings.image_size, settings.patch_size, out_channels, noble=noble)
        init_weights(self.encoder)
        init_weights(self.decoder)

    def _build_cnn(self, settings: TokenizerSettings, out_channels: int) -> None:
        # taming's default (PyTorch) conv initialisation; encoder and decoder meet at the same latent width.
        self.encoder = CNNEncoder(settings, settings.channels)
        self.quantizer = make_quantizer(settings.latent_width, settings, settings)
        self.bridge = nn.Identity()
        self.decoder = CNNDecoder(settings, out_channels)

    # ---- the training path ----------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], QuantizerOutput]:
        """images in [0, 1] -> (reconstruction in [0, 1], raw decoder outputs, quantizer output)."""
        quantized = self.quantizer(self.encoder(self._model_input(images)))
        raw = self.decoder(self.bridge(quantized.quantized))
        return self._pixels(raw), self._split(raw), quantized

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> the encoder's input in [-1, 1]: one channel (ITU-R 601 luma) for a grey model."""
        if self.settings.channels == 1:
            images = torch.einsum("bchw,c->bhw", images, LUMA.to(images)).unsqueeze(1)
        return images * 2 - 1

    def _as_rgb(self, planes: torch.Tensor) -> torch.Tensor:
        """A grey model's one predicted plane shared by R, G and B: its pictures have no colour to cast, and a
        loss over the three equals the loss over the one."""
        return planes.expand(-1, 3, -1, -1) if self.settings.channels == 1 else planes

    def _split(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        channels = self.settings.channels
        if self.settings.output_head == "logit_laplace":
            return {"mu": self._as_rgb(raw[:, :channels]),
                    "log_b": self._as_rgb(raw[:, channels:].clamp(-7.0, 3.0))}
        return {"pixels": self._as_rgb(raw)}

    def _pixels(self, raw: torch.Tensor) -> torch.Tensor:
        if self.settings.output_head == "logit_laplace":  # the sigmoid on the mean prediction
            raw = from_laplace_space(torch.sigmoid(raw[:, :self.settings.channels]))
        # Parti's linear head is unbounded: clamp only when turning into an image
        return self._as_rgb(raw).contiguous()

    # ---- codes in and out -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> codes (B, *settings.code_shape) int64: (B, h, w), or (B, h, w, D)
        under residual quantization."""
        codes = self.quantizer.encode(self.encoder(self._model_input(images)))
        return codes.view(images.shape[0], *self.settings.code_shape)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, *settings.code_shape), or the same flattened per image as the Parquet rows hold them ->
        images (B, 3, H, W) in [0, 1]."""
        per_position = self.settings.code_shape[2:]  # (D,) under residual quantization, else ()
        vectors = self.quantizer.embed(codes.reshape(codes.shape[0], self.settings.grid ** 2, *per_position))
        return self._pixels(self.decoder(self.bridge(vectors))).clamp(0, 1)


def save_tokenizer(model: ViTVQGAN, folder: str | Path) -> None:
    save_model(model, folder)


def load_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> ViTVQGAN:
    """A tokenizer from its two files (config.json + model.safetensors), in eval mode."""
    return load_model(ViTVQGAN, TokenizerSettings, folder, device)
