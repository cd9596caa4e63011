"""The plain-PyTorch decode step (the reference of the fused kernels) against the plain
decoder's cross-attention + ARM over a whole teacher-forced sequence, step by step."""
import pytest
import torch

from fastcomer import CoMER
from fastcomer.benchmarking import scale_weights
from fastcomer.model.arm import AttentionRefinementModule, conv_memory_format, folded_copy
from fastcomer.ops.cross_attention_step.reference import grouped_cross_attention_step, refine_folded

from support.asserts import assert_close_rel
from support.tolerances import RTOL_SAME_MATH_FLOAT64, rtol
from support.random_models import random_images

RTOL = RTOL_SAME_MATH_FLOAT64


@pytest.mark.parametrize("cross, self_", [(True, True), (True, False), (False, True)])
def test_step_matches_teacher_forced_decoder(cross, self_):
    torch.manual_seed(0)
    model = CoMER(d_model=32, growth_rate=4, num_layers=1, nhead=4, num_decoder_layers=3, dim_feedforward=64,
                  dropout=0.0, dc=8, cross_coverage=cross, self_coverage=self_)
    model = scale_weights(model.double(), 0, end_bias=0.0, end_scale=1.0)
    images, group, steps = 2, 3, 9
    img, img_mask = random_images(0, [(48, 64), (32, 80)])
    with torch.no_grad():
        feature, mask = model.encoder(img, img_mask)
    _, h, w, d = feature.shape
    L, nhead = h * w, model.config.nhead
    assert mask.any(), "the batch must have padded positions"
    # Rows grouped by image: `group` different sequences per image.
    tgt = torch.randint(3, model.config.vocab_size, (images * group, steps))
    layers = model.decoder.model.layers
    captured = [{} for _ in layers]
    hooks = [
        layer.multihead_attn.register_forward_hook(lambda m, args, out, c=c: c.update(query=args[0], out=out[0], attn=out[1]))
        for layer, c in zip(layers, captured)
    ]
    with torch.no_grad():
        model.decoder(feature.repeat_interleave(group, dim=0), mask.repeat_interleave(group, dim=0), tgt)
    for hook in hooks:
        hook.remove()

    arm = model.decoder.model.arm.fold()
    memory, memory_mask = feature.reshape(images, L, d), mask.reshape(images, L)
    kv = [
        [x.view(images, L, nhead, -1).transpose(1, 2) for x in layer.multihead_attn.project_key_value(memory)]
        for layer in layers
    ]
    channels = nhead * (int(cross) + int(self_))
    coverage = [None] + [torch.zeros(images * group, channels, L, dtype=torch.float64) for _ in layers[1:]]
    with torch.no_grad():
        for t in range(steps):
            returned = None
            for j, (layer, c) in enumerate(zip(layers, captured)):
                mha = layer.multihead_attn
                q = mha.project_query(c["query"][:, t]).view(images, group, nhead, -1)
                out, returned = grouped_cross_attention_step(q, *kv[j], memory_mask, h, arm, coverage[j], returned)
                assert_close_rel(mha.out_proj(out.reshape(images * group, d)), c["out"][:, t], RTOL, f"output, step {t}, layer {j}")
                expected = c["attn"].view(images * group, nhead, steps, L)[:, :, t]
                assert_close_rel(returned, expected, RTOL, f"attention, step {t}, layer {j}")


def test_folded_copy_convolves_in_the_machines_faster_layout():
    """The engine's folded ARM has its conv weight in `conv_memory_format`'s layout (channels-last
    on an AVX-512 CPU, whose oneDNN convolution is faster so), the module's own weight stays
    contiguous, and the refinement is the one of a contiguous weight: float32 to its tolerance, on
    odd map sizes with padding."""
    generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    module = AttentionRefinementModule(8, 32, True, True).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    folded = folded_copy(module)
    layout = conv_memory_format(torch.device("cpu"))
    assert folded.conv_weight.is_contiguous(memory_format=layout) and module.conv.weight.is_contiguous()
    if layout == torch.channels_last:
        assert not folded.conv_weight.is_contiguous()
    rows, height, width = 13, 5, 11
    coverage = torch.rand(rows, 16, height * width, generator=generator) * 3
    mask = torch.rand(rows, height * width, generator=generator) < 0.2
    for weight in (folded.conv_weight.contiguous(), folded.conv_weight.contiguous(memory_format=torch.channels_last)):
        assert_close_rel(refine_folded(folded, coverage, mask, height), refine_folded(folded._replace(conv_weight=weight),
                         coverage, mask, height), rtol(torch.float32), "refinement")


def test_conv_layout_follows_the_instruction_set(monkeypatch):
    """Channels-last exactly on CPUs with AVX-512 that oneDNN may use; contiguous on AVX2, when
    ONEDNN_MAX_CPU_ISA caps oneDNN below AVX-512, and off the CPU."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for avx512, expected in ((True, torch.channels_last), (False, torch.contiguous_format)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda avx512=avx512: avx512)
        assert conv_memory_format(torch.device("cpu")) == expected
        assert conv_memory_format(torch.device("meta")) == torch.contiguous_format
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    for isa, expected in (("AVX2", torch.contiguous_format), ("sse41", torch.contiguous_format),
                          ("AVX512_CORE_BF16", torch.channels_last), ("ALL", torch.channels_last)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert conv_memory_format(torch.device("cpu")) == expected, isa
