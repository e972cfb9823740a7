"""What a model reads from an HF checkpoint directory: its parameters as `WeightSpec`s and
its weight files, safetensors only (a pickle checkpoint is refused, never loaded).

The lean model asks for parameters as `WeightSpec(name, sources)`: one HF tensor name, or
several that are concatenated along dim 0 (fused q/k/v, fused gate/up); the engine's
loader (slotserve.engine.weights.load_weights) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slotserve.bundles.source import model_weight_files


@dataclass(frozen=True)
class WeightSpec:
    name: str                          # the lean model's parameter name
    sources: tuple[str, ...]           # HF tensor names, concatenated along dim 0
    optional: bool = False             # absent in the files -> parameter is None


class WeightsError(ValueError):
    pass


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF model directory; refuses anything but safetensors."""
    model_dir = Path(model_dir)
    files = model_weight_files(model_dir)
    if not files:
        present = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
        raise WeightsError(
            f"no *.safetensors weights in {model_dir} (found: {present or 'nothing'}); "
            "slotserve loads safetensors only, never pickle checkpoints (.bin/.pt)")
    return files
