"""fastcomer: fused kernels and a fast decoding engine for CoMER."""
from ._version import __version__
from .ops.dispatch import env_report
from .checkpoint import CheckpointError, load_comer
from .model.comer import CoMER, CoMERConfig
from .patch import patch, unpatch
from .recognize import Recognition, RecognitionError, prepare_image, recognize
from .evaluation import CaptionError, Evaluation, evaluate
from .search.engine import beam_search, greedy_search
from .search.hypotheses import BeamSearchOutput, Hypothesis
from .search.images import decode_images
from .search.reference import reference_beam_search
from .vocab import Vocab, vocab
