"""The plain model under torch.compile and torch.export: one graph (no break at the ARM's
masked BatchNorm), compiled output equal to eager, training statistics updated as in eager,
and the eval model (encoder + teacher-forced decoder) exported and matching eager."""
import copy

import torch

from support.compile_cases import graph_breaks, tiny_batch, tiny_model


def test_model_forward_is_one_graph():
    model = tiny_model()
    assert graph_breaks(model, *tiny_batch()) == 1


def test_compiled_training_forward_matches_eager():
    """aot_eager traces through AOTAutograd (functionalization of the BatchNorm buffer updates)
    without inductor's C++ build; fullgraph=True fails on any graph break."""
    model = tiny_model().train()
    for module in model.modules():  # the encoder's DenseNet has CoMER's fixed dropout 0.2
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    compiled_model = copy.deepcopy(model)
    img, img_mask, tgt = tiny_batch()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the running statistics accumulate across calls in both
        want, got = model(img, img_mask, tgt), compiled(img, img_mask, tgt)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    bn, compiled_bn = model.decoder.model.arm.post_norm.bn, compiled_model.decoder.model.arm.post_norm.bn
    assert int(compiled_bn.num_batches_tracked) == int(bn.num_batches_tracked) == 2 * (model.config.num_decoder_layers - 1)
    torch.testing.assert_close(compiled_bn.running_mean, bn.running_mean)
    torch.testing.assert_close(compiled_bn.running_var, bn.running_var)
    want_grads = torch.autograd.grad(model(img, img_mask, tgt).square().sum(), list(model.parameters()))
    got_grads = torch.autograd.grad(compiled(img, img_mask, tgt).square().sum(), list(compiled_model.parameters()))
    # eager's dense blocks recompute their units in backward, the compiled ones run the plain
    # units: float32 sums in other orders, so the absolute tolerance grows with a gradient's scale
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_export_eval_model_matches_eager():
    model = tiny_model()
    batch = tiny_batch()
    program = torch.export.export(model, batch)
    with torch.no_grad():
        want = model(*batch)
    torch.testing.assert_close(program.module()(*batch), want, rtol=1e-6, atol=1e-6)
    other = tiny_batch(seed=1)  # the program is the model's function, not a recording of one input
    torch.testing.assert_close(program.module()(*other), model(*other), rtol=1e-6, atol=1e-6)
