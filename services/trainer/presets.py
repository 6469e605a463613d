"""Named augmentation policies for camera-trap crops (torchvision references style).

Camera-trap crops differ from ImageNet photos in known ways, and the training policy mirrors them:
animals face either way (horizontal flip), lighting swings between dawn, noon and flash (colour jitter),
night frames are infrared and grey (random grayscale), cameras tilt a little (small rotation) and the
detector's box is loose or tight (random resized crop with a mild scale range). Vertical flips are not
used: camera traps do not see animals upside down.

Both presets take RGB uint8 arrays [H, W, 3] and return normalized float tensors [3, S, S], with the
exact resizing/normalization that the embedder applies (see ``Preprocessing`` in ``models``).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from trapline.embedder.preprocess import pixels_to_tensor

from .models import Preprocessing


class TrainPreset:
    """Augmenting transform for fine-tuning; pass a ``torch.Generator``-seeded global RNG for determinism."""

    def __init__(self, pre: Preprocessing = Preprocessing(), *, hflip: float = 0.5, jitter: float = 0.3,
                 grayscale: float = 0.2, rotation: float = 10.0, scale: tuple[float, float] = (0.7, 1.0)) -> None:
        self.transform = T.Compose([
            T.RandomResizedCrop(pre.size, scale=scale, ratio=(0.85, 1.18), antialias=True),
            T.RandomHorizontalFlip(hflip),
            T.RandomApply([T.ColorJitter(jitter, jitter, jitter, 0.03)], p=0.8),
            T.RandomGrayscale(grayscale),
            T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(pre.mean), list(pre.std)),
        ])

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        image = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
        return self.transform(tv_tensors.Image(image))


class EvalPreset:
    """The embedder's own preprocessing (bilinear resize to ``size``, scale, normalize), as a torch tensor."""

    def __init__(self, pre: Preprocessing = Preprocessing()) -> None:
        self.pre = pre.as_dict()

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels_to_tensor(pixels, self.pre))
