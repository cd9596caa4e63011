"""The encoder's dense blocks computed into one buffer (fastcomer.model.encoder.DenseBlock): the
same numbers as the plain units' concatenations, no concatenation at all, the same parameter
names, the public code's blocks swapped by patch(), and in training, gradients equal to
autograd's with a fraction of the bytes kept for backward."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastcomer import patch, unpatch
from fastcomer.model.encoder import DenseBlock, DenseNet, bottleneck_branch

from support.asserts import assert_close_rel
from support.public_comer import standin_lit_comer
from support.random_models import random_images, random_model

RTOL = 1e-9


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class PoisonedEmpty(TorchDispatchMode):
    """Fresh floating-point tensors from empty / new_empty / empty_like / empty_strided come
    filled with NaN, as reused memory may hold: what reads them before writing them gives NaN."""

    EMPTY = {"empty", "new_empty", "empty_like", "empty_strided"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.EMPTY and out.is_floating_point():
            out.fill_(float("nan"))
        return out


def published_densenet(dtype=torch.float64) -> DenseNet:
    """The published DenseNet (growth 24, 16 units a block) with random BatchNorm statistics."""
    torch.manual_seed(0)
    net = DenseNet(growth_rate=24, num_layers=16).to(dtype).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return net


def test_buffer_equals_plain_units():
    net = published_densenet()
    x = torch.rand(2, 48, 9, 13, dtype=torch.float64)
    with torch.no_grad():
        for block in (net.dense1, net.dense2):
            width = block[0].conv1.in_channels
            x = torch.rand(2, width, 9, 13, dtype=torch.float64)
            got, want = block(x), nn.Sequential.forward(block, x)
            assert got.shape == want.shape == (2, width + 16 * 24, 9, 13)
            torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blocks_read_no_unwritten_memory(dtype):
    # A unit's input is a channel prefix of the block's buffer, a GEMM operand of a longer row
    # stride; torch's CPU bfloat16 GEMM reads the element past a row of odd width (times 0), so
    # a NaN left in reused memory there made a bfloat16 encoder's output NaN, now and then.
    model = random_model(4, torch.float32).to(dtype).eval()  # growth 7: odd prefixes
    assert any(unit.conv1.in_channels % 2 for unit in model.encoder.model.dense1)
    img, mask = random_images(4, [(16, 32)], torch.float32)
    with torch.no_grad():
        expected, _ = model.encoder(img.to(dtype), mask)
        with PoisonedEmpty():
            got, _ = model.encoder(img.to(dtype), mask)
    assert torch.isfinite(expected).all() and torch.equal(got, expected)


def test_inference_concatenates_nothing():
    model = random_model(3)
    img, mask = random_images(0, [(40, 56), (33, 48)])
    counter = OpCounter()
    with torch.inference_mode(), counter:
        model.encoder.model(img, mask)  # the DenseNet (the position encoding concatenates its sines and cosines)
    assert "cat" not in counter.ops


def plain_densenet(net: DenseNet, img: torch.Tensor) -> torch.Tensor:
    """The DenseNet's features computed by its modules one after another (nn.Sequential units,
    BatchNorm modules, concatenations), as CoMER computes them."""
    out = F.max_pool2d(F.relu(net.norm1(net.conv1(img))), 2, ceil_mode=True)
    for block, transition in ((net.dense1, net.trans1), (net.dense2, net.trans2)):
        out = nn.Sequential.forward(block, out)
        out = F.avg_pool2d(F.relu(transition.bn1(transition.conv1(out))), 2, ceil_mode=True)
    return net.post_norm(nn.Sequential.forward(net.dense3, out))


def test_eval_batch_norm_is_folded_into_the_convolutions():
    """In eval mode each convolution's BatchNorm is folded into its weight and bias: the DenseNet
    runs only its post-norm's BatchNorm, with outputs and gradients (of a step that fine-tunes
    with frozen BatchNorm statistics) equal to the plain modules' (float64)."""
    net = published_densenet()
    img = torch.rand(2, 1, 35, 70, dtype=torch.float64)
    mask = torch.zeros(2, 35, 70, dtype=torch.bool)
    counter = OpCounter()
    with torch.no_grad(), counter:
        got, _ = net(img, mask)
    assert sum("batch_norm" in op for op in counter.ops) == 1  # the post-norm, which follows no convolution
    upstream = torch.rand_like(got)
    params = [p for p in net.parameters()]
    got, _ = net(img, mask)
    got_grads = torch.autograd.grad(got, params, upstream)
    want = plain_densenet(net, img)
    want_grads = torch.autograd.grad(want, params, upstream)
    assert_close_rel(got, want, RTOL, "features")
    for (name, _), g, w in zip(net.named_parameters(), got_grads, want_grads):
        assert_close_rel(g, w, RTOL, f"gradient of {name}")


def test_parameter_names_are_a_sequentials():
    net = published_densenet()
    names = [name for name, _ in net.state_dict().items() if name.startswith("dense1.")]
    plain = nn.Sequential(*net.dense1)
    assert isinstance(net.dense1, DenseBlock)
    assert names == ["dense1." + name for name in plain.state_dict()]
    assert "dense1.15.bn2.running_var" in names


class PublicDenseNet(nn.Module):
    """The public code's DenseNet as patch() sees it: class name DenseNet, dense blocks that are
    nn.Sequential of Bottleneck units (these carry the public code's use_dropout flag)."""

    def __init__(self, source: DenseNet):
        super().__init__()
        for name, child in source.named_children():
            if isinstance(child, DenseBlock):
                child = nn.Sequential(*child)
                for unit in child:
                    unit.use_dropout = True
            self.add_module(name, child)

    def forward(self, x, x_mask):
        out = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2, ceil_mode=True)
        out = self.trans2(self.dense2(self.trans1(self.dense1(out))))
        return self.post_norm(self.dense3(out)), x_mask[:, 0::16, 0::16]


PublicDenseNet.__name__ = "DenseNet"


def test_patch_swaps_the_public_dense_blocks():
    lit = standin_lit_comer(5, torch.float64)
    encoder = lit.comer_model.encoder
    encoder.model = PublicDenseNet(encoder.model)
    img, mask = random_images(1, [(48, 64), (40, 50)])
    before = {k: v for k, v in lit.state_dict().items()}
    with torch.no_grad():
        want = encoder(img, mask)[0]
    patch(lit)
    assert all(type(getattr(encoder.model, f"dense{i}")) is DenseBlock for i in (1, 2, 3))
    after = lit.state_dict()
    assert list(after) == list(before) and all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    with torch.no_grad():
        got = encoder(img, mask)[0]
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())
    unpatch(lit)
    assert all(type(getattr(encoder.model, f"dense{i}")) is nn.Sequential for i in (1, 2, 3))


def training_block(dropout: float):
    torch.manual_seed(0)
    block = DenseNet(growth_rate=6, num_layers=4).double().train().dense1
    for unit in block:
        unit.dropout.p = dropout
    return block, copy.deepcopy(block)


def gradients(block, forward, x, upstream, seed=1):
    torch.manual_seed(seed)
    out = forward(block, x)
    return out, torch.autograd.grad((out * upstream).sum(), [x, *block.parameters()])


def concatenating(block, x):
    """The buffer's math with autograd's own concatenations (dropout drawn in the same layouts)."""
    for unit in block:
        x = torch.cat((x, bottleneck_branch(unit, x)), dim=1)
    return x


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recomputed_gradients_equal_autograds(dropout):
    block, reference = training_block(dropout)
    x = torch.rand(3, 12, 9, 13, dtype=torch.float64, requires_grad=True)
    upstream = torch.rand(3, 12 + 4 * 6, 9, 13, dtype=torch.float64)
    # without dropout the plain units are the reference; with it, the same math whose dropout
    # masks are drawn in the buffer path's layouts (the plain units draw theirs in others)
    plain = nn.Sequential.forward if dropout == 0 else concatenating
    want, want_grads = gradients(reference, plain, x, upstream)
    got, got_grads = gradients(block, DenseBlock.__call__, x, upstream)
    assert got.grad_fn is not None and type(got.grad_fn).__name__ == "_RecomputedBlockBackward"
    assert_close_rel(got, want, RTOL, "output")
    for g, w in zip(got_grads, want_grads):
        assert_close_rel(g, w, RTOL, "gradient")
    for (name, b), w in zip(block.named_buffers(), reference.buffers()):  # running statistics updated once
        assert_close_rel(b.double(), w.double(), RTOL, name)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while fn runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_training_keeps_a_fraction_of_the_bytes():
    block, reference = training_block(0.2)
    x = torch.rand(2, 12, 16, 24, dtype=torch.float64, requires_grad=True)
    plain = saved_bytes(lambda: nn.Sequential.forward(reference, x))
    buffered = saved_bytes(lambda: block(x))
    assert buffered <= 0.3 * plain, (buffered, plain)
