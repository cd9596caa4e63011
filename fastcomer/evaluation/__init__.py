"""Scoring a checkpoint on data sets in CoMER's layout, as CoMER's test loop does (docs/evaluate.md)."""
from .data import CaptionError, open_dataset
from .run import Evaluation, evaluate
