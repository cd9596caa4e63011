"""The model as graphs for torch.export and ONNX: the encoder (image -> features and every
layer's cross-attention K/V) and the engine's incremental decoder step with its caches as
inputs and outputs, plus a greedy search that drives the ONNX step with onnxruntime.

Both graphs reuse the decoding engine's code (`DecodingState.start` and `.step`, on the
plain-PyTorch backend), so they compute what `fastcomer.greedy_search` computes. Shapes are
static: one batch size, image size and max_len per export (pad images to that size; the
mask keeps padding out of the answers' attention as in any padded batch).
"""
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .extras import require
from .model.arm import FoldedARM
from .ops.beam_scorer_step.finished_lists import length_penalty
from .ops.dispatch import DispatchPlan
from .search.decoding_state import DecodingState
from .search.hypotheses import Hypothesis
from .search.options import search_directions
from .vocab import EOS_IDX, PAD_IDX, SOS_IDX

ENCODER_FILE = "encoder.onnx"
STEP_FILE = "decoder_step.onnx"
ENCODER_OUTPUTS = ("memory_kv", "memory_mask")
STEP_CACHES = ("self_keys", "self_values", "coverage")  # inputs and outputs of the step, in this order
_STARTED_BUFFERS = ("memory_kv", "memory_mask", "coverage", "tokens", "position", "first_position")  # what DecodingState.start writes


def _plain_state(decoder: nn.Module, rows: int, height: int, width: int, max_len: int, like: Tensor) -> DecodingState:
    """A DecodingState of `rows` images, one row each, on the plain-PyTorch backend (the one
    backend that traces into graph operations an exporter can write)."""
    return DecodingState(decoder, rows, 1, height, width, max_len, like.dtype, like.device,
                         DispatchPlan.of("torch", like.dtype, graphs=False))


@contextlib.contextmanager
def _buffers_replaced(state: DecodingState, tensors: Dict[str, object]) -> Iterator[None]:
    """The state reads `tensors` as its buffers inside the block and its own ones after it
    (so that no traced tensor stays behind in it)."""
    kept = {name: getattr(state, name) for name in tensors}
    for name, tensor in tensors.items():
        setattr(state, name, tensor)
    try:
        yield
    finally:
        for name, tensor in kept.items():
            setattr(state, name, tensor)


class EncoderWithMemory(nn.Module):
    """img [b, 1, H, W], img_mask [b, H, W] -> memory_kv [layers, 2, b, nhead, h*w, head_dim]
    (every decoder layer's cross-attention keys and values) and memory_mask [b, h*w]."""

    def __init__(self, model: nn.Module, batch: int, feature_size: Tuple[int, int], max_len: int):
        super().__init__()
        self.model = model
        like = next(model.parameters())
        # kept outside the module tree; built here, as it folds the ARM, which tracing cannot
        object.__setattr__(self, "state", _plain_state(model.decoder, batch, *feature_size, max_len, like))
        self.train(model.training)

    def forward(self, img: Tensor, img_mask: Tensor) -> Tuple[Tensor, Tensor]:
        feature, mask = self.model.encoder(img, img_mask)
        state = self.state
        # start() overwrites these in place; new ones per call, so a traced graph mutates no constant
        fresh = {name: torch.empty_like(getattr(state, name)) for name in _STARTED_BUFFERS
                 if getattr(state, name) is not None}
        if state.arm is not None:  # start() refreshes the folded ARM in place too
            fresh["arm"] = state.arm._replace(**{name: torch.empty_like(getattr(state.arm, name))
                                                 for name in FoldedARM._fields[:4]})
        with _buffers_replaced(state, fresh):
            state.start(feature, mask, torch.full((state.slots,), SOS_IDX, device=feature.device))
            return state.memory_kv, state.memory_mask


class IncrementalDecoderStep(nn.Module):
    """`DecodingState.step` as a pure function of the state: (tokens [b, max_len] (PAD past
    the prefix), position [] int64 (index of the newest token), memory_kv, memory_mask,
    self_keys [layers, b, nhead, head_dim, max_len], self_values [layers, b, nhead, max_len, head_dim],
    coverage [layers - 1, b, C, h*w]) -> (logits [b, vocab] of the newest token, self_keys,
    self_values, coverage updated with this step).

    The self-attention always reads the whole max_len window: positions past the prefix hold
    PAD tokens, which it masks, so the result is the engine's for any window."""

    def __init__(self, decoder: nn.Module, batch: int, feature_size: Tuple[int, int], max_len: int):
        super().__init__()
        self.decoder = decoder
        like = next(decoder.parameters())
        # kept outside the module tree; it reads the inputs as its buffers at every call
        object.__setattr__(self, "state", _plain_state(decoder, batch, *feature_size, max_len, like))
        self.train(decoder.training)

    def forward(self, tokens: Tensor, position: Tensor, memory_kv: Tensor, memory_mask: Tensor, self_keys: Tensor,
                self_values: Tensor, coverage: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        state = self.state
        if (coverage is None) != (state.coverage is None):
            raise ValueError("coverage must be given exactly when the decoder has an ARM")
        # copies of the caches: the step updates them in place, the graph returns them as outputs
        inputs = dict(tokens=tokens, position=position, memory_kv=memory_kv, memory_mask=memory_mask,
                      self_keys=self_keys.clone(), self_values=self_values.clone(),
                      coverage=None if coverage is None else coverage.clone())
        with _buffers_replaced(state, inputs):
            logits = state.step(state.max_len)
            caches = (state.self_keys, state.self_values)
            return (logits, *caches) if coverage is None else (logits, *caches, state.coverage)

    def initial_caches(self) -> Tuple[Tensor, ...]:
        """Zero self-attention caches (and coverage) for the first step, the step's cache inputs."""
        state = self.state
        caches = (torch.zeros_like(state.self_keys), torch.zeros_like(state.self_values))
        return caches if state.coverage is None else caches + (torch.zeros_like(state.coverage),)


@dataclass(frozen=True)
class ExportedGraphs:
    """An encoder and a decoder step of one batch size, image size and max_len."""

    encoder: EncoderWithMemory
    step: IncrementalDecoderStep
    example_image: Tuple[Tensor, Tensor]  # (img, img_mask)
    example_step: Tuple[Tensor, ...]  # the step's inputs at its first call


def export_modules(model: nn.Module, batch: int = 1, image_size: Tuple[int, int] = (64, 256),
                   max_len: int = 200) -> ExportedGraphs:
    """The two graph modules of an eval-mode CoMER model for images [batch, 1, *image_size]
    and up to max_len tokens (start token included), with example inputs for tracing."""
    if model.training:
        raise ValueError("export needs the model in eval mode (model.eval())")
    if batch < 1 or max_len < 2 or len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"batch >= 1, max_len >= 2 and a positive (H, W) image_size expected, "
                         f"got {batch}, {max_len}, {image_size}")
    param = next(model.parameters())
    img = torch.zeros(batch, 1, *image_size, dtype=param.dtype, device=param.device)
    img_mask = torch.zeros(batch, *image_size, dtype=torch.bool, device=param.device)
    with torch.no_grad():
        feature, _ = model.encoder(img, img_mask)
    feature_size = tuple(feature.shape[1:3])
    encoder = EncoderWithMemory(model, batch, feature_size, max_len)
    step = IncrementalDecoderStep(model.decoder, batch, feature_size, max_len)
    with torch.no_grad():
        memory_kv, memory_mask = encoder(img, img_mask)
    tokens = torch.full((batch, max_len), PAD_IDX, dtype=torch.long, device=param.device)
    tokens[:, 0] = SOS_IDX
    position = torch.zeros((), dtype=torch.long, device=param.device)
    return ExportedGraphs(encoder, step, (img, img_mask),
                          (tokens, position, memory_kv, memory_mask, *step.initial_caches()))


def export_onnx(model: nn.Module, out_dir: Union[str, Path], batch: int = 1, image_size: Tuple[int, int] = (64, 256),
                max_len: int = 200, opset: Optional[int] = None) -> Tuple[Path, Path]:
    """Write the encoder and the incremental decoder step of an eval-mode CoMER model as ONNX
    (ENCODER_FILE, STEP_FILE in out_dir) with torch.onnx.export's dynamo exporter; returns
    their paths. Inputs: img, img_mask -> memory_kv, memory_mask; tokens, position,
    memory_kv, memory_mask, self_keys, self_values[, coverage] -> logits, new_self_keys,
    new_self_values[, new_coverage] (ONNX names are unique: a step's new caches are the next
    step's inputs)."""
    require("onnx", "onnx", "onnxscript", purpose="exporting ONNX graphs")  # torch.onnx's dynamo exporter
    graphs = export_modules(model, batch, image_size, max_len)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_coverage = graphs.step.state.coverage is not None
    caches = STEP_CACHES if has_coverage else STEP_CACHES[:2]
    jobs = (
        (graphs.encoder, graphs.example_image, ("img", "img_mask"), ENCODER_OUTPUTS, ENCODER_FILE),
        (graphs.step, graphs.example_step, ("tokens", "position", *ENCODER_OUTPUTS, *caches), ("logits", *(f"new_{name}" for name in caches)),
         STEP_FILE),
    )
    paths = []
    for module, inputs, input_names, output_names, name in jobs:
        path = out_dir / name
        with torch.no_grad():
            torch.onnx.export(module, inputs, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamo=True, opset_version=opset,
                              external_data=False)
        paths.append(path)
    return paths[0], paths[1]


def onnx_greedy_search(encoder_path: Union[str, Path], step_path: Union[str, Path], img, img_mask,
                       alpha: float = 1.0, temperature: float = 1.0, direction: str = "l2r",
                       providers: Sequence[str] = ("CPUExecutionProvider",)) -> List[Hypothesis]:
    """`fastcomer.greedy_search` over the ONNX graphs of `export_onnx`, in onnxruntime and
    numpy (no torch at run time): img [b, 1, H, W] float, img_mask [b, H, W] bool (numpy
    arrays, or tensors), the sizes the graphs were exported for. Same answers and scores
    as greedy_search up to float rounding; max_len is the exported one."""
    require("onnx", "onnxruntime", purpose="running ONNX graphs")
    import numpy as np
    import onnxruntime

    (forward,) = search_directions(direction, ("l2r", "r2l"))
    start, end = (SOS_IDX, EOS_IDX) if forward else (EOS_IDX, SOS_IDX)
    as_array = lambda x: x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    encoder = onnxruntime.InferenceSession(str(encoder_path), providers=list(providers))
    step = onnxruntime.InferenceSession(str(step_path), providers=list(providers))
    memory_kv, memory_mask = encoder.run(None, {"img": as_array(img), "img_mask": as_array(img_mask)})
    inputs = {i.name: i for i in step.get_inputs()}
    batch, max_len = inputs["tokens"].shape
    caches = {name: np.zeros(inputs[name].shape, dtype=memory_kv.dtype) for name in STEP_CACHES if name in inputs}
    tokens = np.full((batch, max_len), PAD_IDX, dtype=np.int64)
    tokens[:, 0] = start
    sums = np.zeros(batch, dtype=np.float64)
    ended = np.zeros(batch, dtype=bool)
    lengths = np.full(batch, max_len)
    length = 1  # tokens per row
    while length < max_len:
        logits, *updated = step.run(None, {"tokens": tokens, "position": np.array(length - 1, dtype=np.int64),
                                           "memory_kv": memory_kv, "memory_mask": memory_mask, **caches})
        caches = dict(zip(caches, updated))
        scaled = logits / temperature
        shifted = scaled - scaled.max(axis=1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        chosen = logprobs.argmax(axis=1)
        sums += np.where(ended, 0.0, logprobs[np.arange(batch), chosen])
        ends_now = (chosen == end) & ~ended
        lengths[ends_now] = length
        ended |= ends_now
        if ended.all():
            break
        tokens[:, length] = np.where(ended, PAD_IDX, chosen)
        length += 1
    answers = []
    for row in range(batch):
        seq = tokens[row, 1 : lengths[row]].tolist()
        answers.append(Hypothesis(seq if forward else seq[::-1], float(sums[row]) / length_penalty(int(lengths[row]), alpha)))
    return answers
