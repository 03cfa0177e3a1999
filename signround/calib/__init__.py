"""Calibration data: dataset specs, sources, and tokenized ``[nsamples, seqlen]`` batches."""

from .build import build_calibration
from .spec import DatasetSpec, parse_dataset_spec

DEFAULT_DATASET = "signround-default"

__all__ = ["DEFAULT_DATASET", "DatasetSpec", "build_calibration", "parse_dataset_spec"]
