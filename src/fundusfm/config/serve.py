"""Typed settings of the local web app and JSON API (`fundusfm serve`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fundusfm.config.core import Strict
from fundusfm.config.screen import QualityConfig


class ServeConfig(Strict):
    """Where `fundusfm serve` listens, what it accepts and how much it scores at once.

    `quality` is `fundusfm predict`'s gate, so that an upload gets the row `predict` gives the
    same file with the same settings.
    """

    host: str = Field(
        "127.0.0.1",
        description="address to listen on; anything but loopback is reachable "
        "from the network (there is no authentication)",
    )
    port: int = Field(8000, ge=0, le=65535)
    max_upload_bytes: int = Field(
        20_000_000, ge=1, description="largest request body accepted (413 above it)"
    )
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="largest image accepted, in pixels (width x height, read from its "
        "header before decoding; 413 above it): each pixel decodes to 3 bytes or more",
    )
    gradcam: bool = Field(True, description="allow `gradcam=true` (Grad-CAM overlays)")
    engine: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="what scores: auto (ONNX Runtime on the CPU when installed, else PyTorch), "
        "torch or onnxruntime; Grad-CAM maps always come from PyTorch",
    )
    device: Literal["cpu", "cuda", "mps"] = "cpu"
    max_concurrent: int = Field(
        2, ge=1, le=64, description="uploads decoded and scored at once; the others wait"
    )
    max_waiting: int = Field(
        256, ge=1, description="uploads allowed to wait for scoring; more get 503 (busy)"
    )
    quality: QualityConfig = QualityConfig()
