"""fastcomer.ops.arm_attention and patch() compiled for a CUDA GPU, at the published shapes
(d_model 256, nhead 8, dc 32, 16 sequences): the same checks as tests/interpreter, against
the plain path in float64. Skipped without CUDA."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastcomer.shapes import DC, HEAD_DIM, NHEAD, TRAIN_BATCH as BATCH
from support.asserts import assert_close_rel, assert_gradients_close
from support.tolerances import GRADIENT_FLOOR, RTOL, RTOL_ARM_LAYER, RTOL_FLOAT32_CHAIN, RTOL_FLOAT32_GOLDEN

from support.markers import requires_gpu

pytestmark = requires_gpu


@pytest.fixture(autouse=True)
def exact_float32():
    """Eager float32 without TF32 (cuBLAS and cuDNN: CoMER's conv runs on cuDNN, TF32 by default),
    so the plain paths compared at float32 tolerances compute what they claim; restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved



@pytest.mark.parametrize("coverage", ["cross", "self", "both"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("t, h, w", [(32, 8, 32), (64, 16, 78), (1, 7, 13)])
def test_float32_matches_plain_path(coverage, training, t, h, w):
    from support.arm_cases import check_layer

    check_layer(BATCH, t, h, w, coverage, training, NHEAD, HEAD_DIM, DC, RTOL[torch.float32], device="cuda")


@pytest.mark.parametrize("dtype, precision", list(RTOL_ARM_LAYER))
def test_reduced_precision(dtype, precision):
    from support.arm_cases import check_layer

    check_layer(BATCH, 32, 16, 64, "both", True, NHEAD, HEAD_DIM, DC, RTOL_ARM_LAYER[dtype, precision], device="cuda", dtype=dtype,
                precision=precision)


def test_dropout_statistics_and_replay():
    from fastcomer.ops.arm_attention import ARMWeights, arm_attention
    from support.arm_cases import make_arm, make_inputs, make_mask

    b, t, h, w, p = BATCH, 32, 16, 64, 0.3
    mask = make_mask(b, h, w, "cuda")
    (q, k, v, prev), (grad_out, _) = make_inputs(b, NHEAD, HEAD_DIM, t, h, w)
    q, k, v, prev, grad_out = (x.cuda() for x in (q, k, v, prev, grad_out))
    v.requires_grad_()
    weights = ARMWeights.from_module(make_arm(NHEAD, DC, "both", True).cuda())
    out, attn = arm_attention(q, k, v, mask, h, w, prev, weights, bn_training=True, dropout_p=p, seed=11)
    unmasked = (~mask).view(b, 1, 1, -1).expand(b, NHEAD, t, h * w).reshape(attn.shape)
    dropped = (attn[unmasked] == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / unmasked.sum().item()) ** 0.5
    (grad_v,) = torch.autograd.grad((out * grad_out).sum(), [v])
    assert_close_rel(grad_v, torch.bmm(attn.detach().transpose(1, 2), grad_out), RTOL[torch.float32], "dV with dropout")


def test_patched_golden_training_step(golden, golden_model):
    import fastcomer
    from fastcomer.vocab import PAD_IDX

    def step(model):
        feature = torch.cat((golden["feature"], golden["feature"])).float().cuda()
        mask = torch.cat((golden["feature_mask"], golden["feature_mask"])).cuda()
        logits = model.decoder(feature, mask, golden["tgt"].cuda())
        loss = F.cross_entropy(logits.flatten(0, 1), golden["out"].cuda().flatten(), ignore_index=PAD_IDX)
        loss.backward()
        return logits.detach().cpu(), {k: p.grad.cpu() for k, p in model.decoder.named_parameters()}

    plain = golden_model.float().cuda().train()
    patched = fastcomer.patch(copy.deepcopy(plain), backend="auto")
    logits, grads = step(patched)
    ref_logits, ref_grads = step(plain)
    assert_close_rel(logits, ref_logits, RTOL_FLOAT32_CHAIN, "logits vs plain float32")
    assert_close_rel(logits, golden["logits_train"], RTOL_FLOAT32_GOLDEN, "logits vs golden")
    assert_gradients_close(grads, golden["grads_train"], 10 * RTOL_FLOAT32_GOLDEN, GRADIENT_FLOOR, "vs golden", ref_grads)


def test_fused_layer_uses_less_memory_than_plain():
    """The fused layer never holds the coverage image or the conv output: its forward+backward
    peak stays below the plain path's (its backward still holds several [B*H, T, L] float32 tensors)."""
    import functools

    from fastcomer.model.arm import AttentionRefinementModule
    from fastcomer.model.attention import MultiheadAttention
    from fastcomer.modules import FusedARMAttention

    b, t, h, w = BATCH, 64, 16, 64
    attn = MultiheadAttention(NHEAD * HEAD_DIM, NHEAD).cuda().train()
    arm = AttentionRefinementModule(NHEAD, DC, True, True).cuda().train()
    fused = FusedARMAttention.from_module(attn, backend="triton")
    query = torch.randn(b, t, NHEAD * HEAD_DIM, device="cuda", requires_grad=True)
    memory = torch.randn(b, h * w, NHEAD * HEAD_DIM, device="cuda", requires_grad=True)
    mask = torch.zeros(b, h * w, dtype=torch.bool, device="cuda")
    prev = torch.softmax(torch.randn(b * NHEAD, t, h * w, device="cuda"), -1).requires_grad_()

    def peak(module):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, returned = module(query, memory, mask, None, functools.partial(arm, prev, mask, h))
        (out.square().mean() + returned.square().mean()).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain_peak, fused_peak = peak(attn), peak(fused)
    assert fused_peak < 0.75 * plain_peak, (fused_peak, plain_peak)
