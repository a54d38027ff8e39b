"""Shim for scripts that still import from the old benchmark scripts (scripts/gpu_run.sh): the harness is vattn.bench."""

from __future__ import annotations

import torch

from vattn.bench.models import PRESETS, preset_dir
from vattn.bench.report import machine_label, results_dir
from vattn.cli import parse_size

__all__ = ["PRESETS", "model_dir", "machine_label", "results_dir", "parse_size"]


def model_dir(preset: str, dtype: torch.dtype = torch.float32):
    """Directory of the random-weight `preset` model (vattn.bench.models.preset_dir)."""
    return preset_dir(preset, dtype)
