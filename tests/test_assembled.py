"""Models shipped as fine-tuned tensors only (vitlens:scenes-dinov2): assembled over the cached backbone once, they
load as the classifier whose weights are the backbone's except the shipped ones."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.factories import hf_dinov2

import vitlens
from vitlens.errors import VitlensError
from vitlens.models import dinov2_onnx, zoo


@pytest.fixture()
def zoo_with_assembled(tmp_path, monkeypatch):
    """A zoo holding a converted-style backbone folder and a packaged folder with a head and the last block."""
    torch.manual_seed(0)
    backbone = hf_dinov2(head=False)
    torch.manual_seed(1)
    tuned = hf_dinov2(head=True)  # other random weights: the shipped ones must win where shipped
    tuned.config.problem_type = "multi_label_classification"
    tuned.config.architectures = ["Dinov2ForImageClassification"]
    last = tuned.config.num_hidden_layers - 1
    shipped = {k: v.contiguous() for k, v in tuned.state_dict().items()
               if k.startswith((f"dinov2.encoder.layer.{last}.", "classifier."))}
    packaged = tmp_path / "zoo" / "tiny-assembled"
    packaged.mkdir(parents=True)
    save_file(shipped, str(packaged / "finetuned.safetensors"), metadata={"format": "pt"})
    tuned.config.to_json_file(str(packaged / "config.json"))
    (packaged / "source.json").write_text(json.dumps({"kind": "assembled", "backbone": "tiny-backbone",
                                                      "weights": "finetuned.safetensors", "prefix": "dinov2."}))
    (packaged / "MODEL_CARD.md").write_text("# vitlens:tiny-assembled\n")
    backbone_pkg = tmp_path / "zoo" / "tiny-backbone"
    backbone.save_pretrained(backbone_pkg)
    (backbone_pkg / "NOTICE").write_text("backbone notice")
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return backbone, tuned, shipped, packaged


def test_assembled_model_holds_backbone_weights_overlaid_by_the_shipped_ones(zoo_with_assembled):
    backbone, tuned, shipped, packaged = zoo_with_assembled
    model = vitlens.load_model("vitlens:tiny-assembled")
    assert type(model.module).__name__ == "Dinov2ForImageClassification" and model.multi_label
    state = model.module.state_dict()
    for k, v in state.items():  # key by key: shipped tensors where shipped, the backbone's everywhere else
        expected = shipped[k] if k in shipped else backbone.state_dict()[k.removeprefix("dinov2.")]
        assert torch.equal(v, expected), k
    folder = zoo.model_folder("tiny-assembled")
    assert folder.parent == dinov2_onnx.cache_root() and (folder / "MODEL_CARD.md").is_file()
    assert (folder / "NOTICE").read_text() == "backbone notice"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert zoo.model_folder("tiny-assembled") == folder  # written once, then read
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_shipped_tensor_unknown_to_the_backbone_is_refused(zoo_with_assembled):
    _, _, shipped, packaged = zoo_with_assembled
    extra = {**shipped, "dinov2.encoder.layer.99.norm1.weight": torch.zeros(3)}
    save_file(extra, str(packaged / "finetuned.safetensors"))
    with pytest.raises(VitlensError, match="which the backbone .* lacks; reinstall vitlens"):
        vitlens.load_model("vitlens:tiny-assembled")


def test_missing_shipped_file_is_one_line(zoo_with_assembled):
    *_, packaged = zoo_with_assembled
    (packaged / "finetuned.safetensors").unlink()
    with pytest.raises(VitlensError, match="finetuned.safetensors is missing; reinstall vitlens"):
        vitlens.load_model("vitlens:tiny-assembled")
