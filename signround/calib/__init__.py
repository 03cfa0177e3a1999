"""Calibration data: dataset specs, sources, and tokenized ``[nsamples, seqlen]`` batches (image-text
samples of a vision-language model carry their other model inputs beside)."""

from .build import build_calibration, build_image_text_calibration, uses_images
from .spec import DatasetSpec, parse_dataset_spec

DEFAULT_DATASET = "signround-default"

__all__ = ["DEFAULT_DATASET", "DatasetSpec", "build_calibration", "build_image_text_calibration",
           "parse_dataset_spec", "uses_images"]
