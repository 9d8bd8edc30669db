"""The report's data without a browser: lossless capture of every block's rows (ViT and Swin windows), per-row
quantisation against hand-worked codes, the size budget for a random-weight ViT-B/16, escaping, LIME's per-class
maps, the CLI, and Jupyter's inline view. (tests/test_report_browser.py checks the page itself.)"""

from __future__ import annotations

import base64
import html
import json
import re
import zlib

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import factories
from test_swin import hf_swin
from vitlens.errors import VitlensError
from vitlens.explanation import max_normalize
from vitlens.methods import Lime, Rollout
from vitlens.methods.rollout import RolloutAccumulator, fuse_heads
from vitlens.models.loading import load_model
from vitlens.viz.report import report
from vitlens.viz.report.attention import BlockAttention, capture, dequantise, group_entries, max_error, quantise
from vitlens.viz.report.page import pack, safe_json

CAT = "src/vitlens/assets/demo_cat.png"


def _x(model):
    return model.preprocess.tensor(model.preprocess.view(Image.open(CAT).convert("RGB")))[None]


def stored_rollout(model, stored, fusion, discard):
    """The library's rollout (its accumulator: fusion, discard_lowest, residual, products, readout) of stored
    attention [H, N, N] per block (what the page holds), max-normalised after every block: [L, gh, gw]."""
    plan = model.stage_plan(tuple(model.preprocess.size))
    acc = RolloutAccumulator(plan, 0, discard, 0.5, True, True)
    for i, a in enumerate(stored):
        acc.add(i, fuse_heads(a[None], fusion))
    return max_normalize(torch.stack(acc.depth_maps, 1)[0]).numpy()


def _data(page: str) -> dict:
    text = re.search(r'<script type="application/json" id="vitlens-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(text)


def _unpack(data: dict) -> dict[str, np.ndarray]:
    buf = zlib.decompress(base64.b64decode(data["blob"]))
    kinds = {"u8": "<u1", "u16": "<u2", "i32": "<i4", "f32": "<f4"}
    return {s["name"]: np.frombuffer(buf, kinds[s["dtype"]], s["length"], s["offset"]) for s in data["segments"]}


def test_group_entries_by_hand():
    rows, cols = group_entries(np.array([0, 1, 0, 1]))
    assert rows.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert cols.tolist() == [0, 2, 1, 3, 0, 2, 1, 3]


def test_quantise_rows_by_hand():
    # one block, one head, two tokens in one group: rows [0.5, 0.2] and [0.1, 0.0]
    b = BlockAttention(0, (1, 2), 0, np.zeros(2, np.int32), np.array([[0.5, 0.2, 0.1, 0.0]], np.float32))
    q = quantise([b], 8)
    assert q.codes.tolist() == [255, 102, 255, 0]  # 0.2 / (0.5 / 255) = 102
    assert np.allclose(q.scales, [0.5 / 255, 0.1 / 255])
    coarse = quantise([b], 8, floor=0.001)  # the floor raises the step of the small row only
    assert np.allclose(coarse.scales, [0.5 / 255, 0.001]) and coarse.codes.tolist() == [255, 102, 100, 0]
    q16 = quantise([b], 16)
    assert q16.codes.dtype == np.uint16 and q16.codes.tolist() == [65535, 26214, 65535, 0]
    exact = quantise([b], 32)  # the float32 values themselves
    assert exact.codes.dtype == np.float32 and exact.codes.tolist() == b.values[0].tolist()
    assert max_error(exact, [b]) == 0
    for qq in (q, coarse, q16, exact):
        back = dequantise(qq, [b])[0]
        assert max_error(qq, [b]) == pytest.approx(float(np.abs(back - b.values).max()), abs=1e-12)  # measured
        assert max_error(qq, [b]) <= float(qq.scales.max()) / 2 + 1e-9 and qq.wide.size == 0


def test_prefix_rows_are_stored_again_as_16_bit_codes_at_8_bits():
    # two tokens in one group, token 0 a prefix (CLS): its row [0.5, 0.2] is kept as 16-bit codes beside the 8-bit ones
    b = BlockAttention(0, (1, 1), 1, np.zeros(2, np.int32), np.array([[0.5, 0.2, 0.1, 0.0]], np.float32))
    q = quantise([b], 8)
    assert q.codes.tolist() == [255, 102, 255, 0]
    assert q.wide.dtype == np.uint16 and q.wide.tolist() == [65535, 26214]  # 0.2 / (0.5 / 65535) = 26214
    assert np.allclose(q.wide_scales, [0.5 / 65535])
    back = dequantise(q, [b])[0]
    step16 = float(np.float32(0.5 / 65535))
    assert np.allclose(back[0, :2], [65535 * step16, 26214 * step16], rtol=0, atol=1e-12)
    assert np.allclose(back[0, 2:], [255 * float(np.float32(0.1 / 255)), 0.0], rtol=0, atol=1e-12)
    assert quantise([b], 16).wide.size == 0  # 16 bits: one code per value already
    # square-root codes: scale = row max / 255^2, code = round(sqrt(value / scale)); the CLS row again at 16 bits
    sq = quantise([b], 8, sqrt=True)
    assert sq.sqrt and sq.codes.tolist() == [255, 161, 255, 0]  # sqrt(0.2 / (0.5 / 65025)) = 161.3
    assert np.allclose(sq.scales, [0.5 / 65025, 0.1 / 65025]) and sq.wide.tolist() == [65535, 26214]
    back = dequantise(sq, [b])[0]
    assert np.allclose(back[0, 2:], [255 ** 2 * float(np.float32(0.1 / 65025)), 0.0], rtol=0, atol=1e-12)
    assert max_error(sq, [b]) == pytest.approx(float(np.abs(back - b.values).max()), abs=1e-12)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_capture_keeps_every_row_exactly(kind):
    torch.manual_seed(0)
    model = load_model(factories.hf_vit() if kind == "vit" else hf_swin(36, 4))
    x = _x(model)
    got = capture(model, x)
    with torch.no_grad(), model.record() as rec:
        model(x)
    assert len(got.blocks) == model.num_blocks
    for i, b in enumerate(got.blocks):
        assert np.array_equal(b.dense(), rec.probs[i][0].numpy())  # nothing outside the windows is lost
        if kind == "swin":
            assert np.array_equal(b.groups, rec.meta[i]["window_id"].reshape(-1).numpy())
            assert b.window == tuple(rec.meta[i]["window"]) and b.shift == tuple(rec.meta[i]["shift"])


def test_vit_b16_report_fits_five_megabytes_and_holds_the_attention():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(num_labels=1000)  # ViT-B/16 at 224: 12 blocks x 12 heads, 197 tokens
    model = load_model(transformers.ViTForImageClassification(cfg).eval())
    rep = report(CAT, model, methods=[], top_k=2)
    assert rep.nbytes < 5_000_000 and rep.info["bytes"] == rep.nbytes
    data = _data(rep.html)
    segs = _unpack(data)
    assert segs["codes"].size == 12 * 12 * 197 * 197 and segs["scales"].size == 12 * 12 * 197
    assert segs["wide"].size == 12 * 12 * 197 and segs["wideScales"].size == 12 * 12  # every CLS row at 16 bits
    assert data["attention"]["bits"] == rep.info["bits"] == 8
    x = _x(model)
    with torch.no_grad(), model.record(blocks=[0, 11]) as rec:
        model(x)
    stored = rep.stored_attention()
    for i in (0, 11):
        err = (stored[i] - rec.probs[i][0].double()).abs().max()
        assert err <= rep.info["max_error"] + 1e-7
    # the page's data is exactly what stored_attention says: codes times their row's scale
    codes = segs["codes"][: 12 * 197 * 197].reshape(12, 197, 197).astype(np.float64)
    scales = segs["scales"][: 12 * 197].reshape(12, 197, 1).astype(np.float64)
    assert np.allclose((codes * scales)[:, 1:], stored[0].numpy()[:, 1:], rtol=0, atol=1e-12)
    wide = segs["wide"][: 12 * 197].reshape(12, 197).astype(np.float64) * segs["wideScales"][:12, None]
    assert np.allclose(wide, stored[0].numpy()[:, 0], rtol=0, atol=1e-12)  # the CLS rows come from the 16-bit codes
    # the rollout of the stored attention (what the page computes) against the library's on the model, every depth
    # (measured: mean 3.8e-4, max 1.0e-3, min 1.8e-3 at 4.7 MB; the 8-bit CLS rows of before: 1.2e-2, 1.4e-2, 4.9e-2)
    for fusion, bound in (("mean", 1e-3), ("max", 1.5e-3), ("min", 4e-3)):
        want = Rollout(model, head_fusion=fusion, per_layer=True).explain(x).extras["per_layer"][0].numpy()
        got = stored_rollout(model, stored, fusion, 0.0)
        assert np.abs(got - want).max() < bound, fusion


def test_budget_picks_the_finest_width_that_fits_then_the_closest_rollout(monkeypatch):
    from vitlens.viz.report import build
    from vitlens.viz.report.attention import Encoding

    torch.manual_seed(0)
    model = load_model(factories.hf_vit())
    small = report(CAT, model, methods=[], top_k=1)
    assert small.info["bits"] == 32 and small.info["max_error"] == 0.0  # tiny: the float32 values themselves
    assert set(small.info["rollout_error"].values()) == {0.0}
    alone = {}  # each 16-bit coding on its own
    for enc in (Encoding(16, relative=True), Encoding(16)):
        with monkeypatch.context() as m:
            m.setattr(build, "ENCODINGS", (enc,))
            alone[enc.name] = report(CAT, model, methods=[], top_k=1, max_bytes=None)
    budget = max(r.nbytes for r in alone.values()) + build.ERRORS_RESERVE
    tight = report(CAT, model, methods=[], top_k=1, max_bytes=budget)
    assert tight.info["bits"] == 16 and tight.nbytes <= budget
    worst = {name: max(r.info["rollout_error"].values()) for name, r in alone.items()}
    assert tight.info["encoding"] == min(worst, key=worst.get)  # both fit: the closer rollout
    assert tight.info["rollout_error"] == alone[tight.info["encoding"]].info["rollout_error"]
    smaller = min(alone.values(), key=lambda r: r.nbytes)
    one = report(CAT, model, methods=[], top_k=1, max_bytes=smaller.nbytes + build.ERRORS_RESERVE)
    if smaller.nbytes < max(r.nbytes for r in alone.values()):  # only the smaller one fits
        assert one.info["encoding"] == smaller.info["encoding"]
    eight = report(CAT, model, methods=[], top_k=1, max_bytes=smaller.nbytes - 1)
    assert eight.info["bits"] == 8 and eight.nbytes <= smaller.nbytes - 1
    too_small = report(CAT, model, methods=[], top_k=1, max_bytes=1000)
    assert too_small.info["floor"] == 2.0 ** -8 and any("over the" in n for n in too_small.notes)


def test_relative_codes_by_hand():
    from vitlens.viz.report.attention import RELATIVE_VALUES, relative_codes

    # 1 = 2^0 (1 + 0): e = 31, m = 0; 0.5: e = 30; 0.2 = 2^-3 (1 + 0.6): m = round(0.6 * 2048) = 1229
    codes = relative_codes(np.array([1.0, 0.5, 0.2, 0.0, 2.0 ** -33]))
    assert codes.tolist() == [31 * 2048, 30 * 2048, 28 * 2048 + 1229, 0, 0]
    assert RELATIVE_VALUES[codes].tolist() == [1.0, 0.5, 0.125 * (1 + 1229 / 2048), 0.0, 0.0]
    assert relative_codes(np.array([1 - 2.0 ** -14])).tolist() == [31 * 2048]  # rounds up across the octave
    ratio = np.random.default_rng(0).random(10_000) ** 6
    back = RELATIVE_VALUES[relative_codes(ratio)]
    assert (np.abs(back - ratio) <= 2.0 ** -12 * ratio + 2.0 ** -31).all()  # below 2^-31 of the maximum: 0
    b = BlockAttention(0, (1, 2), 0, np.zeros(2, np.int32), np.array([[0.5, 0.1, 0.1, 0.0]], np.float32))
    q = quantise([b], 16, relative=True)
    assert q.relative and np.allclose(q.scales, [0.5, 0.1]) and q.codes.tolist() == [63488, 58573, 63488, 0]
    assert np.allclose(dequantise(q, [b])[0], [[0.5, 0.5 * RELATIVE_VALUES[58573], 0.1, 0.0]], rtol=1e-7, atol=0)


def test_labels_title_and_json_are_escaped():
    evil = "</script><script>alert(1)</script><!--"
    torch.manual_seed(0)
    names = {i: f"{evil}{i} & more" for i in range(5)}
    model = load_model(factories.hf_vit(id2label=names, label2id={v: k for k, v in names.items()}))
    rep = report(CAT, model, methods=[], title=f"{evil}.png")
    page = rep.html
    assert page.count("</script") == 2 and page.count("<script") == 2  # only the page's own two elements
    assert "<!--" not in page
    assert f"<title>vitlens report: {html.escape(evil)}.png</title>" in page
    data = _data(page)
    assert data["title"] == f"{evil}.png"
    assert [c["label"] for c in data["classes"]] == [names[c["index"]] for c in data["classes"]]
    assert safe_json({"a": "</x>&"}) == '{"a":"\\u003c/x\\u003e\\u0026"}'
    assert json.loads(safe_json({"a": "</x>&"})) == {"a": "</x>&"}
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external resource anywhere
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_pack_aligns_and_round_trips():
    arrays = [("a", np.arange(3, dtype=np.uint8)), ("b", np.array([1.5, -2.0], np.float32)),
              ("c", np.array([7, 65535], np.uint16)), ("d", np.array([-1, 2**30], np.int32))]
    table, text = pack(arrays)
    segs = _unpack({"segments": table, "blob": text})
    assert all(s["offset"] % 8 == 0 for s in table)
    for name, arr in arrays:
        assert np.array_equal(segs[name], arr)


def test_lime_maps_per_class_are_lime_maps_for_that_class():
    torch.manual_seed(0)
    model = load_model(factories.hf_vit())
    opts = {"num_samples": 40, "n_segments": 8, "batch_size": 40}
    rep = report(CAT, model, methods=[], lime=True, top_k=2, method_options={"lime": opts})
    data = _data(rep.html)
    segs = _unpack(data)
    (lime,) = [m for m in data["methods"] if m["name"] == "lime"]
    x = _x(model)
    for entry in lime["maps"]:
        shown = entry["low"] + segs[entry["segment"]].astype(np.float64) * entry["step"]
        want = Lime(model, **opts).explain(x, target=entry["class"]).maps[0].numpy()
        assert np.abs(shown.reshape(want.shape) - want).max() < 1e-4


def test_methods_by_name_and_their_errors():
    torch.manual_seed(0)
    model = load_model(factories.hf_vit())
    rep = report(CAT, model, methods=["grad_rollout", "rollout", "occlusion"], top_k=2)
    assert rep.info["methods"] == ["grad_rollout", "occlusion"]
    assert any("rollout is computed in the page" in n for n in rep.notes)
    with pytest.raises(VitlensError, match="unknown method 'nope'"):
        report(CAT, model, methods=["nope"])
    backbone = load_model(factories.hf_vit(head=False))
    rep = report(CAT, backbone)
    assert rep.info["classes"] == [] and rep.info["methods"] == []


def test_cli_report_and_jupyter_view(tmp_path, capsys, monkeypatch):
    from vitlens import report as top_level_report
    from vitlens.cli import main
    from vitlens.viz.report import build
    from vitlens.viz.report.attention import Encoding

    torch.manual_seed(0)
    folder = tmp_path / "vit"
    factories.hf_vit().save_pretrained(folder)
    out = tmp_path / "r.html"
    assert main(["report", CAT, "--model", str(folder), "--out", str(out), "--top-k", "2"]) == 0
    assert "float32 values; rollout equal to the library's)" in capsys.readouterr().out
    with monkeypatch.context() as m:
        m.setattr(build, "ENCODINGS", (Encoding(8, sqrt=True),))
        assert main(["report", CAT, "--model", str(folder), "--out", str(tmp_path / "c.html")]) == 0
    line = capsys.readouterr().out
    assert "8-bit square-root codes per row" in line and "rollout within" in line and "largest at" in line
    data = _data(out.read_text(encoding="utf-8"))
    assert data["title"] == "demo_cat.png" and len(data["classes"]) == 2
    assert main(["report", CAT, "--model", str(folder), "--out", str(tmp_path / "r.png")]) == 2
    rep = top_level_report(CAT, str(folder), methods=[], top_k=1)
    frame = rep._repr_html_()
    assert frame.startswith("<iframe srcdoc=\"") and "<script" not in frame  # the page, attribute-escaped
    assert html.unescape(frame.split('srcdoc="', 1)[1].split('" style=', 1)[0]) == rep.html


def test_demo_writes_a_report_per_image_linked_from_its_index(tmp_path):
    from vitlens.cli.demo import run_demo

    torch.manual_seed(0)
    model = load_model(factories.hf_vit(id2label={i: f"<i>{i}</i>" for i in range(5)}))
    result = run_demo(tmp_path, model=model, images=[CAT], note="")
    assert [p.name for p in result.reports] == ["demo_cat_report.html"]
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<a href=\"demo_cat_report.html\">demo_cat: interactive report</a>" in index
    data = _data((tmp_path / "demo_cat_report.html").read_text(encoding="utf-8"))
    assert data["title"] == "demo_cat.png" and data["classes"][0]["label"].startswith("<i>")
    assert index.count("<img") == len(result.figures)  # the figures are unchanged
