"""SynthCOCO: an offline world of COCO categories and the tiny LVLM trained on it (see synth-world.md)."""
from vlmguard.synth.build import build_dataset, default_dataset

__all__ = ["build_dataset", "default_dataset"]
