"""The plain-PyTorch path against the golden file made by the public CoMER code (float64)."""
import torch
import torch.nn.functional as F

from fastcomer.vocab import PAD_IDX

from support.asserts import assert_close_rel, assert_gradients_close
from support.tolerances import GRADIENT_FLOOR_FLOAT64, RTOL as RTOLS, RTOL_GOLDEN_SCORES

RTOL = RTOLS[torch.float64]


def test_encoder(golden, golden_model):
    with torch.no_grad():
        feature, mask = golden_model.encoder(golden["imgs"], golden["img_mask"])
    assert torch.equal(mask, golden["feature_mask"])
    assert_close_rel(feature, golden["feature"], RTOL, "encoder output")


def eval_inputs(golden):
    feature = torch.cat((golden["feature"], golden["feature"]))
    mask = torch.cat((golden["feature_mask"], golden["feature_mask"]))
    return feature, mask


def test_decoder_eval_logits_and_attention(golden, golden_model):
    feature, mask = eval_inputs(golden)
    with torch.no_grad():
        logits, attns = golden_model.decoder(feature, mask, golden["tgt"], return_attention=True)
        whole = golden_model(golden["imgs"], golden["img_mask"], golden["tgt"])
    assert_close_rel(logits, golden["logits_eval"], RTOL, "logits_eval")
    assert_close_rel(whole, golden["logits_eval"], RTOL, "CoMER.forward")
    assert len(attns) == len(golden["cross_attn_eval"])
    for j, (attn, expected) in enumerate(zip(attns, golden["cross_attn_eval"])):
        assert_close_rel(attn, expected, RTOL, f"cross_attn_eval layer {j}")


def test_decoder_training_step(golden, golden_model):
    model = golden_model.train()
    feature, mask = eval_inputs(golden)
    logits = model.decoder(feature, mask, golden["tgt"])
    assert_close_rel(logits, golden["logits_train"], RTOL, "logits_train")
    loss = F.cross_entropy(logits.flatten(0, 1), golden["out"].flatten(), ignore_index=PAD_IDX)
    assert_close_rel(loss, golden["loss_train"], RTOL, "loss_train")
    loss.backward()
    params = dict(model.decoder.named_parameters())
    assert set(golden["grads_train"]) == {k for k, p in params.items() if p.requires_grad}
    assert_gradients_close({name: p.grad for name, p in params.items()}, golden["grads_train"], RTOL,
                           GRADIENT_FLOOR_FLOAT64)


def test_reference_beam_search(golden, golden_reference_search):
    out = golden_reference_search
    assert out.first_pass_hyps == golden["first_pass_hyps"]
    assert out.first_pass_scores.dtype == torch.float32
    assert_close_rel(out.first_pass_scores, golden["first_pass_scores"], RTOL_GOLDEN_SCORES, "first-pass scores")
    # The golden rescoring is in CoMER's batch order: right-to-left hypotheses first.
    half = len(out.rescore) // 2
    expected_rescore = torch.cat((golden["rescore"][half:], golden["rescore"][:half]))
    assert_close_rel(out.rescore, expected_rescore, RTOL, "rescore")
    assert [h.seq for h in out.hyps] == golden["beam_hyps"]
    assert_close_rel([h.score for h in out.hyps], golden["beam_scores"], RTOL_GOLDEN_SCORES, "final scores")
