"""The report page in a real browser (headless Chromium through Playwright, the system's /usr/bin/chromium): what the
page shows is checked against the library, and the page makes no network request.

`make test` runs scripts/ensure_chromium.sh first, which installs Debian's chromium when it is missing; these tests
skip (loudly) only when no Chromium can be found after that.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import factories
from test_report import stored_rollout
from test_swin import hf_swin
from vitlens.methods import GradRollout, Rollout
from vitlens.models.loading import load_model
from vitlens.viz.report import build, report
from vitlens.viz.report.attention import Encoding
from vitlens.viz.report.precision import CHECKS

CHROMIUM = next((p for p in (os.environ.get("VITLENS_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"))
                 if p and os.path.exists(p)), None)
if CHROMIUM is None:
    MESSAGE = ("NO CHROMIUM FOUND: the report's browser tests are SKIPPED. Run scripts/ensure_chromium.sh (apt-get "
               "install chromium chromium-driver) or set VITLENS_CHROMIUM to a Chromium binary.")
    warnings.warn(MESSAGE, stacklevel=1)
    print(f"\n*** {MESSAGE} ***\n")
    pytest.skip(MESSAGE, allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

CAT = "src/vitlens/assets/demo_cat.png"
EVIL = "<script>window.pwned=1</script>"
LABELS = [EVIL, "cat & dog", "tabby", "<b>bold</b>", "plain"]
ALLOWED = ("data:", "about:")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, path):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    url = path.resolve().as_uri()
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    assert page.evaluate("document.body.dataset.ready") == "1", page.inner_text("#status")
    page.requests, page.errors, page.own_url = requests, errors, url
    return page


def _no_network(page):
    """Every request after the document itself is a data: or about: URL; no script error happened."""
    others = [u for u in page.requests if u != page.own_url]
    assert all(u.startswith(ALLOWED) for u in others), [u[:80] for u in others if not u.startswith(ALLOWED)]
    assert page.requests.count(page.own_url) == 1
    assert not page.errors


def _current(page):
    cur = page.evaluate("vitlensReport.current()")
    return cur, np.array(cur["values"], dtype=np.float64).reshape(cur["grid"])


def _click_patch(page, r, c, grid):
    box = page.locator("#canvas").bounding_box()
    page.mouse.click(box["x"] + (c + 0.5) * box["width"] / grid[1], box["y"] + (r + 0.5) * box["height"] / grid[0])


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(0)
    names = dict(enumerate(LABELS))
    model = load_model(factories.hf_vit(id2label=names, label2id={v: k for k, v in names.items()}))
    view = model.preprocess.view(Image.open(CAT))
    x = model.preprocess.tensor(view)[None]
    rep = report(CAT, model, title=f"{EVIL}.png")
    path = rep.save(tmp_path_factory.mktemp("report") / "vit.html")
    with torch.no_grad(), model.record() as rec:
        model(x)
    return model, x, rep, path, [p[0].double() for p in rec.probs]


@pytest.fixture(scope="module")
def vit_page(browser, vit):
    page = _open(browser, vit[3])
    yield page
    page.close()


def test_click_a_patch_shows_its_attention_row_for_any_block_and_head(vit, vit_page):
    model, _, rep, _, probs = vit
    page = vit_page
    page.check("#view-attention")
    gh, gw = model.layout((32, 32)).grid
    for block, head, (r, c) in [(2, "mean", (1, 2)), (0, "3", (3, 0)), (1, "0", (2, 2))]:
        page.fill("#block", str(block))
        page.select_option("#head", head)
        _click_patch(page, r, c, (gh, gw))
        cur, shown = _current(page)
        assert (cur["view"], cur["block"], cur["query"]) == ("attention", block, {"kind": "patch", "r": r, "c": c})
        token = 1 + r * gw + c
        rows = probs[block][:, token, 1:]  # [H, patches]
        want = rows.mean(0) if head == "mean" else rows[int(head)]
        # the float32 values themselves: max_error is 0
        assert np.abs(shown - want.reshape(gh, gw).numpy()).max() <= rep.info["max_error"] + 1e-7
        _click_patch(page, r, c, (gh, gw))  # click again: the patch is let go
    page.click("#query-cls")
    cur, shown = _current(page)
    assert np.abs(shown.reshape(-1) - probs[1][0, 0, 1:].numpy()).max() <= rep.info["max_error"] + 1e-7
    _no_network(page)


def test_block_slider_shows_the_library_rollout_after_each_block(vit, vit_page):
    model, x, rep, _, _ = vit
    page = vit_page
    page.check("#view-rollout")
    for fusion, discard in [("mean", "0"), ("max", "0"), ("min", "0"), ("mean", "0.5"), ("max", "0.9")]:
        page.select_option("#fusion", fusion)
        page.fill("#discard", discard)
        # the page holds the float32 attention itself: the library's Rollout on the model, discarding included
        assert rep.info["bits"] == 32
        want = Rollout(model, head_fusion=fusion, discard_ratio=float(discard), per_layer=True).explain(x)
        want = want.extras["per_layer"][0].numpy()
        for block in range(model.num_blocks):
            page.fill("#block", str(block))
            cur, shown = _current(page)
            assert (cur["view"], cur["block"], cur["fusion"], cur["discard"]) == ("rollout", block, fusion,
                                                                                  float(discard))
            assert np.abs(shown - want[block]).max() < 1e-6, (fusion, discard, block)
    page.select_option("#fusion", "mean")
    page.fill("#discard", "0")
    _no_network(page)


def test_switch_method_and_class_shows_the_library_maps_and_escapes_labels(vit, vit_page):
    model, x, rep, _, _ = vit
    page = vit_page
    classes = rep.info["classes"]
    assert len(classes) == 5
    buttons = page.locator("#classes button .label")
    assert buttons.all_text_contents() == [c["label"] for c in classes]  # '<script>' shown as text
    assert page.evaluate("window.pwned") is None
    assert page.inner_text("#title") == f"{EVIL}.png"
    for k in (0, 3):
        page.locator("#classes button").nth(k).click()
        page.check("#view-grad_rollout")
        cur, shown = _current(page)
        c = classes[k]["index"]
        assert cur["view"] == "grad_rollout" and cur["cls"] == c and classes[k]["label"] in cur["caption"]
        want = GradRollout(model).explain(x, target=c).maps[0].numpy()
        assert np.abs(shown - want).max() < 1e-4
    _no_network(page)


def test_display_controls_screenshot_and_png(vit_page):
    page = vit_page
    page.check("#view-rollout")
    page.fill("#opacity", "0.8")
    page.select_option("#cmap", "viridis")
    shot = np.asarray(Image.open(io.BytesIO(page.locator("#canvas").screenshot())).convert("RGB"), dtype=np.float32)
    assert shot.std() > 5 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # an image, not a blank canvas
    assert page.evaluate("[vitlensReport.state.opacity, vitlensReport.state.cmap]") == [0.8, "viridis"]
    assert page.evaluate("vitlensReport.pngSize()") > 1000
    assert page.evaluate("vitlensReport.fileName()") == "_script_window.pwned_1_script__rollout_block2.png"
    _no_network(page)


@pytest.mark.parametrize("enc", [Encoding(16, relative=True), Encoding(16), Encoding(8, sqrt=True),
                                 Encoding(8, 2.0 ** -12)], ids=lambda e: e.name)
def test_coded_pages_read_their_codes_and_roll_out_as_the_library_on_them(browser, vit, tmp_path, monkeypatch, enc):
    """Each coding read back by the page: rows equal the stored values, which are within the coding's bound of the
    model's; the page's rollout is the library's on the stored attention, and the report's measured rollout error
    is the distance of that rollout to the library's on the model."""
    model, x, _, _, probs = vit
    monkeypatch.setattr(build, "ENCODINGS", (enc,))
    rep = report(CAT, model, methods=[], top_k=1, max_bytes=None)
    assert rep.info["encoding"] == enc.name and rep.info["bits"] == enc.bits
    gh, gw = model.layout((32, 32)).grid
    page = _open(browser, rep.save(tmp_path / "coded.html"))
    stored = rep.stored_attention()
    page.check("#view-attention")
    page.fill("#block", "1")
    page.select_option("#head", "2")
    page.click("#query-cls")  # the CLS row: 16-bit codes at every width
    _, shown = _current(page)
    np.testing.assert_allclose(shown.reshape(-1), stored[1][2, 0, 1:].numpy(), rtol=0, atol=1e-12)
    cls = probs[1][2, 0].numpy().astype(np.float64)
    err = np.abs(shown.reshape(-1) - cls[1:])
    if enc.relative:
        assert (err <= 2.0 ** -12 * cls[1:] + 2.0 ** -31 * cls.max() + 1e-12).all()
    else:
        assert err.max() <= 0.5 / 65535 * cls.max() + 1e-7
    _click_patch(page, 1, 2, (gh, gw))  # a patch's row
    _, shown = _current(page)
    np.testing.assert_allclose(shown.reshape(-1), stored[1][2, 1 + gw + 2, 1:].numpy(), rtol=0, atol=1e-12)
    for fusion, discard in CHECKS:
        got = np.array(page.evaluate(f"vitlensReport.rollout('{fusion}', {discard})"))
        want = stored_rollout(model, stored, fusion, discard).reshape(got.shape)
        assert np.abs(got - want).max() < 1e-9
        lib = Rollout(model, head_fusion=fusion, discard_ratio=discard, per_layer=True).explain(x)
        measured = np.abs(want - lib.extras["per_layer"][0].flatten(1).numpy()).max()
        assert measured == pytest.approx(rep.info["rollout_error"][f"{fusion}/{discard:g}"], abs=1e-6)
    assert "rollout within" in page.text_content("#subtitle")
    _no_network(page)
    page.close()


def test_swin_patch_rows_per_stage_windows_and_rollout(browser, tmp_path):
    torch.manual_seed(0)
    model = load_model(hf_swin(36, 4))  # grids 18, 9, 5 with window 4: padded, shifted windows in every stage
    rep = report(Image.open(CAT), model, methods=[], title="swin.png")
    path = rep.save(tmp_path / "swin.html")
    x = model.preprocess.tensor(model.preprocess.view(Image.open(CAT).convert("RGB")))[None]
    with torch.no_grad(), model.record() as rec:
        model(x)
    page = _open(browser, path)
    page.check("#view-attention")
    grids = [lay.grid for lay in model.stage_plan((36, 36)).layouts]
    r, c = 13, 5
    for block in (1, 3, 4):  # stage 0 shifted, stage 1 shifted, stage 2 unshifted
        stage = model.stage_plan((36, 36)).block_stage[block]
        page.fill("#block", str(block))
        page.select_option("#head", "mean")
        _click_patch(page, r, c, grids[0])
        cur, shown = _current(page)
        assert cur["grid"] == list(grids[stage])
        token = (r >> stage) * grids[stage][1] + (c >> stage)
        want = rec.probs[block][0, :, token].double().mean(0).reshape(grids[stage]).numpy()
        assert np.abs(shown - want).max() <= rep.info["max_error"] + 1e-7
        window = rec.meta[block]["window_id"]
        assert ((shown > 0) == (window == window.reshape(-1)[token]).numpy()).all()  # its window, shift undone
        _click_patch(page, r, c, grids[0])
    for fusion in ("mean", "max", "min"):
        want = Rollout(model, head_fusion=fusion, per_layer=True).explain(x).extras["per_layer"][0]
        got = np.array(page.evaluate(f"vitlensReport.rollout('{fusion}', 0)"))
        assert np.abs(got - want.flatten(1).numpy()).max() < 1e-3, fusion
    for fusion, discard in [("mean", 0.5), ("max", 0.97), ("min", 0.995)]:  # 0.97: window entries discarded
        got = np.array(page.evaluate(f"vitlensReport.rollout('{fusion}', {discard})"))
        want = stored_rollout(model, rep.stored_attention(), fusion, discard).reshape(got.shape)
        assert np.abs(got - want).max() < 1e-3, (fusion, discard)
    page.check("#view-rollout")
    page.fill("#block", "5")
    cur, shown = _current(page)
    assert np.abs(shown - Rollout(model, per_layer=True).explain(x).extras["per_layer"][0, 5].numpy()).max() < 1e-3
    _no_network(page)
    page.close()
