"""Image decoding (16-bit aware, pixel-limited) and the medical image transform.

The transform follows what medical VLMs do to keep anatomy intact: grayscale is repeated to
three channels, the image is resized so its longer side fits, then padded to a square with the
normalisation mean (LLaVA's ``expand2square``: the pad becomes exactly 0 after normalisation),
then normalised. Nothing is cropped, so a lesion at the border is never cut away.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# CLIP's statistics; BiomedCLIP and most open_clip towers use these too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTooLarge(ValueError):
    pass


@dataclass
class ImageConfig:
    """How images are decoded and transformed for a model."""

    size: int = 224  # output side in pixels (square)
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    pad_to_square: bool = True  # False: resize to size x size, ignoring aspect ratio
    max_pixels: int = 64_000_000  # images above this are rejected before decoding
    # tensor: (3, size, size) normalised (our models) | pil: 8-bit RGB PIL images, for a stock VLM's
    # processor, which resizes and normalises itself (size, mean, std and pad_to_square then do not apply)
    output: str = "tensor"

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"image.size must be >= 8, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("image.mean and image.std must have 3 values")
        if any(s <= 0 for s in self.std):
            raise ValueError("image.std values must be > 0")
        if self.output not in ("tensor", "pil"):
            raise ValueError(f"image.output must be tensor or pil, got {self.output!r}")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (lazily) and check the size from the header before any pixel is decoded."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    return img


def decode_image(data: bytes, max_pixels: int = 64_000_000, target: int | None = None) -> torch.Tensor:
    """Bytes -> float tensor (C, H, W) in [0, 1]; C is 1 or 3. 16-bit PNGs keep their depth.

    ``target`` lets JPEG decode at reduced scale (DCT scaling) when the output is much smaller.
    """
    img = open_image(data, max_pixels)
    if target is not None and img.format == "JPEG":
        img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (target, target))
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        if mode == "I" and arr.max(initial=0) > 65535:
            scale = float(arr.max())
        t = torch.from_numpy(arr / scale)[None]
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        t = torch.from_numpy((arr - lo) / max(hi - lo, 1e-6))[None]
    else:
        if mode not in ("L", "RGB"):
            img = img.convert("RGB")
        arr = np.asarray(img)
        t = torch.from_numpy(arr.copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        t = t.float().div_(255.0)
    return t.clamp_(0.0, 1.0)


def pil_rgb(data: bytes, max_pixels: int = 64_000_000) -> Image.Image:
    """Encoded image -> 8-bit RGB PIL image (what VLM processors take). 16-bit and float images are
    scaled to their full range first (decode_image), never clipped at 255."""
    img = open_image(data, max_pixels)
    if img.mode in ("L", "RGB", "P", "RGBA", "LA", "CMYK", "YCbCr"):
        return img.convert("RGB")
    t = decode_image(data, max_pixels)
    arr = (t.expand(3, -1, -1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


class PILImages:
    """The transform of ``image.output: pil``: bytes -> 8-bit RGB PIL image (picklable, for loader workers)."""

    def __init__(self, cfg: ImageConfig):
        self.max_pixels = cfg.max_pixels

    def from_bytes(self, data: bytes, out=None) -> Image.Image:
        return pil_rgb(data, self.max_pixels)


class MedicalImageTransform:
    """(C, H, W) in [0, 1] -> (3, size, size) normalised. Picklable, so it runs in loader workers.

    ``from_bytes`` is the fast path for encoded images: 8-bit images are resized in PIL on
    uint8 (antialiased, several times cheaper than float interpolation) and normalised in one
    fused multiply-add; 16-bit and float images take the exact float path.
    """

    def __init__(self, cfg: ImageConfig):
        self.size = cfg.size
        self.pad = cfg.pad_to_square
        self.max_pixels = cfg.max_pixels
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)
        self._scale = (1.0 / (255.0 * self.std))  # x_uint8 * scale - mean / std
        self._shift = -self.mean / self.std

    def _target(self, h: int, w: int) -> tuple[int, int]:
        s = self.size
        if not self.pad:
            return s, s
        scale = s / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def _pad(self, img: torch.Tensor) -> torch.Tensor:
        s = self.size
        nh, nw = img.shape[-2:]
        if (nh, nw) != (s, s):  # pad with the mean colour, which is 0 after normalisation
            top, left = (s - nh) // 2, (s - nw) // 2
            img = F.pad(img, (left, s - nw - left, top, s - nh - top), value=0.0)
        return img

    def from_bytes(self, data: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded image -> (3, size, size) normalised, written into ``out`` (zeros) when given.

        Writing straight into a slot of the batch tensor saves a copy of every image.
        """
        img = open_image(data, self.max_pixels)
        if img.mode not in ("L", "RGB", "P", "RGBA", "LA", "CMYK", "YCbCr"):
            result = self(decode_image(data, self.max_pixels))  # 16-bit / float: exact path
            return result if out is None else out.copy_(result)
        if img.format == "JPEG":
            img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (self.size, self.size))
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        nh, nw = self._target(img.height, img.width)
        if (img.height, img.width) != (nh, nw):
            img = img.resize((nw, nh), Image.BILINEAR)
        arr = np.asarray(img)
        if not arr.flags.writeable:
            arr = arr.copy()
        t = torch.from_numpy(arr)
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        s = self.size
        if out is None:
            out = torch.zeros(3, s, s)
        top, left = (s - nh) // 2, (s - nw) // 2  # the rest stays 0: the mean colour, normalised
        torch.addcmul(self._shift, t, self._scale, out=out[:, top:top + nh, left:left + nw])
        return out

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        h, w = img.shape[-2:]
        nh, nw = self._target(h, w)
        if (nh, nw) != (h, w):
            img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        img = (img - self.mean) / self.std
        return self._pad(img).contiguous()
