"""The plain model's behaviour beyond the golden values: training mode, padding, dtypes, argument checks."""
import pytest
import torch

from fastcomer import CoMER, reference_beam_search, vocab
from fastcomer.vocab import EOS_IDX, PAD_IDX, SOS_IDX

from support.asserts import assert_close_rel
from support.tolerances import RTOL, RTOL_SAME_MATH_FLOAT64
from support.markers import requires_gpu

SMALL = dict(d_model=32, growth_rate=4, num_layers=2, nhead=4, num_decoder_layers=3, dim_feedforward=48, dc=8)


def random_decoder_inputs(b=2, h=3, w=5, t=6, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    feature = torch.randn(b, h, w, d, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[0, :, w - 2 :] = True  # padding on the right of image 0
    mask[1, h - 1 :, :] = True  # padding at the bottom of image 1
    tgt = torch.randint(3, len(vocab), (b, t), generator=g)
    tgt[:, 0] = SOS_IDX
    tgt[1, t - 2 :] = PAD_IDX
    return feature, mask, tgt


def model64(seed=0, **overrides):
    torch.manual_seed(seed)
    return CoMER(**{**SMALL, "dropout": 0.0, **overrides}).double()


def test_masked_batchnorm_statistics_in_training():
    """The ARM BatchNorm sees exactly the unmasked (b, t, l) positions, once per refining
    layer, and updates its running statistics as BatchNorm1d does (unbiased variance)."""
    model = model64().train()
    feature, mask, tgt = random_decoder_inputs()
    post_norm = model.decoder.model.arm.post_norm
    bn = post_norm.bn
    seen = []  # the unmasked positions as BatchNorm1d rows [positions, nhead]
    post_norm.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().permute(0, 2, 3, 1)[~args[1]]))
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    model.decoder(feature, mask, tgt)
    assert len(seen) == SMALL["num_decoder_layers"] - 1
    assert bn.num_batches_tracked.item() == len(seen)
    unmasked = int((~mask).sum()) * tgt.shape[1]
    for x in seen:
        assert x.shape == (unmasked, SMALL["nhead"])
        mean = 0.9 * mean + 0.1 * x.mean(0)
        var = 0.9 * var + 0.1 * x.var(0, unbiased=True)
    assert_close_rel(bn.running_mean, mean, RTOL_SAME_MATH_FLOAT64, "running_mean")
    assert_close_rel(bn.running_var, var, RTOL_SAME_MATH_FLOAT64, "running_var")


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("coverage", [(True, True), (True, False), (False, True)])
def test_padding_invariance(training, coverage):
    """Extra padded rows and columns of the feature map change nothing at real positions,
    in eval and in training (batch statistics over unmasked positions only)."""
    model = model64(cross_coverage=coverage[0], self_coverage=coverage[1]).train(training)
    feature, mask, tgt = random_decoder_inputs()
    logits, attns = model.decoder(feature, mask, tgt, return_attention=True)
    b, h, w, d = feature.shape
    big = torch.randn(b, h + 2, w + 3, d, dtype=torch.float64)  # junk features at padding
    big[:, :h, :w] = feature
    big_mask = torch.ones(b, h + 2, w + 3, dtype=torch.bool)
    big_mask[:, :h, :w] = mask
    big_logits, big_attns = model.decoder(big, big_mask, tgt, return_attention=True)
    real = tgt != PAD_IDX
    assert_close_rel(big_logits[real], logits[real], RTOL_SAME_MATH_FLOAT64, "logits")
    for attn, big_attn in zip(attns, big_attns):
        big_attn = big_attn.view(-1, tgt.shape[1], h + 2, w + 3)[:, :, :h, :w].reshape(attn.shape)
        assert_close_rel(big_attn, attn, RTOL_SAME_MATH_FLOAT64, "attention")


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = CoMER(**SMALL, dropout=0.3).double()
    img = torch.randn(2, 1, 48, 64, dtype=torch.float64)
    img_mask = torch.zeros(2, 48, 64, dtype=torch.bool)
    tgt = torch.tensor([[SOS_IDX, 5, 6, 7], [EOS_IDX, 7, 6, 5], [SOS_IDX, 5, 6, 7], [EOS_IDX, 7, 6, 5]])
    model.eval()
    assert torch.equal(model(img, img_mask, tgt), model(img, img_mask, tgt))
    model.train()
    assert not torch.equal(model(img, img_mask, tgt), model(img, img_mask, tgt))
    # Encoder dropout (0.2 inside the dense blocks) is on in training too.
    model.decoder.eval()
    assert not torch.equal(model.encoder(img, img_mask)[0], model.encoder(img, img_mask)[0])


def test_float32_model_matches_float64(golden, golden_model):
    model32 = golden_model.float()
    feature = torch.cat((golden["feature"], golden["feature"])).float()
    mask = torch.cat((golden["feature_mask"], golden["feature_mask"]))
    with torch.no_grad():
        logits = model32.decoder(feature, mask, golden["tgt"])
    assert logits.dtype == torch.float32
    assert_close_rel(logits, golden["logits_eval"], RTOL[torch.float32], "float32 logits")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_golden(golden, golden_model, dtype):
    rtol = RTOL[dtype]
    model = golden_model.to("cuda", dtype)
    with torch.no_grad():
        logits = model(golden["imgs"].to("cuda", dtype), golden["img_mask"].cuda(), golden["tgt"].cuda())
    assert_close_rel(logits.cpu(), golden["logits_eval"], rtol, f"CUDA {dtype} logits")


def test_shape_errors():
    model = model64().eval()
    feature, mask, tgt = random_decoder_inputs()
    with pytest.raises(ValueError, match="feature_mask"):
        model.decoder(feature, mask[:, :-1], tgt)
    with pytest.raises(ValueError, match="tgt"):
        model.decoder(feature, mask, tgt[:1])
    with pytest.raises(ValueError, match="img_mask"):
        model.encoder(torch.zeros(1, 1, 32, 32), torch.zeros(1, 32, 31, dtype=torch.bool))


def test_beam_search_argument_errors(golden, golden_model):
    args = (golden["imgs"], golden["img_mask"])
    with pytest.raises(ValueError, match="beam_size"):
        reference_beam_search(golden_model, *args, beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        reference_beam_search(golden_model, *args, max_len=1)
    with pytest.raises(ValueError, match="temperature"):
        reference_beam_search(golden_model, *args, temperature=0.0)
    with pytest.raises(ValueError, match="eval mode"):
        reference_beam_search(golden_model.train(), *args)


def test_vocab():
    assert len(vocab) == 113
    assert vocab.indices2words([PAD_IDX, SOS_IDX, EOS_IDX]) == ["<pad>", "<sos>", "<eos>"]
    assert vocab.indices2label(vocab.words2indices(["\\frac", "{", "a", "}"])) == "\\frac { a }"
    assert vocab.word2idx["!"] == 3 and vocab.idx2word[-1] == "}"


@pytest.mark.parametrize("training", [False, True])
def test_arm_refinement_is_zero_at_padding(training):
    """R = 0 at masked positions (docs/function.md, 'The Attention Refinement Module'): the
    ReLU output is masked before the projection and BatchNorm leaves masked positions alone.
    Invisible in the logits (masked scores are -inf anyway), so checked on the ARM itself."""
    model = model64()
    arm = model.decoder.model.arm.train(training)
    torch.nn.init.uniform_(arm.conv.bias, 0.5, 1.0)  # a ReLU output that is non-zero where unmasked
    _, mask, _ = random_decoder_inputs()
    b, h, w = mask.shape
    t, n = 4, SMALL["nhead"]
    attn = torch.softmax(torch.randn(b, n, t, h * w, dtype=torch.float64).masked_fill(mask.view(b, 1, 1, -1), float("-inf")), -1)
    attn = attn.view(b * n, t, h * w)
    r = arm(attn, mask.view(b, -1), h, attn.flip(1)).view(b, n, t, h * w)
    padded = mask.view(b, 1, 1, -1).expand_as(r)
    assert torch.all(r[padded] == 0)
    assert torch.all(r[~padded][n * h * w :] != 0)  # beyond t = 0, where the coverage is still empty
