"""`vitlens finetune` and `vitlens finetune-compare` (issue 15) on a tiny transformers ViT and an ImageFolder of PNGs:
the saved folder explains at once, the grid writes its table, and every bad input is one `error:` line, exit 2, with
nothing written."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("circle", "stripe", "plain")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder layout: 3 classes x 5 PNGs of 32 px."""
    root = tmp_path_factory.mktemp("ftdata") / "data"
    rng = np.random.default_rng(0)
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(5):
            img = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8)
            img[:, 10 * k: 10 * k + 8] = 240
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def swin_dir(tmp_path_factory) -> Path:
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(2)
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                     num_labels=3)
    path = tmp_path_factory.mktemp("models") / "swin3"
    SwinForImageClassification(cfg).save_pretrained(path)
    return path


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_finetune_writes_a_model_that_explains(tmp_path, vit3_dir, folder, capsys):
    out = tmp_path / "tuned"
    code, stdout, err = _run(["finetune", "--model", vit3_dir, "--data", folder, "--method", "adapter",
                              "--adapter-placement", "parallel", "--epochs", "2", "--batch-size", "4",
                              "--rollout-images", "2", "--out", out], capsys)
    assert code == 0, err
    assert "trainable parameters" in stdout
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "adapters.safetensors", "preprocessor_config.json", "metrics.json",
            "rollout_before_after.png"} <= names
    info = json.loads((out / "metrics.json").read_text())
    assert info["settings"]["method"] == "adapter" and info["settings"]["placement"] == "parallel"
    assert len(info["epochs"]) == 2 and info["data"]["classes"] == list(sorted(CLASSES))
    assert info["data"]["train"] == 12 and info["data"]["held_out"] == 3  # one of five per class held out
    roll = info["rollout_before_after"]
    assert roll["images"] == 3 and len(roll["per_image_correlation"]) == 3  # every held-out image, up to 64
    assert -1 <= roll["mean_correlation"] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vitlens_adapters"] == {"placement": "parallel", "dim": 64}
    png = tmp_path / "explained.png"
    code, _, err = _run(["explain", "--model", out, folder / "circle" / "0.png", "--out", png], capsys)
    assert code == 0, err
    assert png.is_file()


def test_finetune_compare_writes_its_table(tmp_path, vit3_dir, swin_dir, folder, capsys):
    out = tmp_path / "grid"
    args = ["finetune-compare", "--models", f"{vit3_dir},{swin_dir}", "--methods", "head,lora", "--seeds", "2",
            "--data", folder, "--epochs", "1", "--batch-size", "4", "--out", out]
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    assert {"results.md", "results.csv", "accuracy_vs_params.png", "runs.jsonl", "summary.json"} <= set(os.listdir(out))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(Path(r["model"]).name, r["method"]) for r in rows] == [("vit3", "head"), ("vit3", "lora"),
                                                                     ("swin3", "head"), ("swin3", "lora")]
    assert all(int(r["seeds"]) == 2 and len(r["per_seed"].split()) == 2 for r in rows)
    # oracle: a new linear head of 3 classes on the ViT's 32-wide CLS token and the Swin's 16-wide pooled tokens
    assert int(rows[0]["trainable_params"]) == 32 * 3 + 3
    assert int(rows[2]["trainable_params"]) == 16 * 3 + 3
    # LoRA rank 8 on q and v of each of the ViT's 2 blocks (32 -> 32): 2 x 2 x (8 x 32 + 32 x 8), plus the head
    assert int(rows[1]["trainable_params"]) == 2 * 2 * (8 * 32 + 32 * 8) + 32 * 3 + 3
    for r in rows:
        scores = [float(s) for s in r["per_seed"].split()]
        assert float(r["min"]) == pytest.approx(min(scores), abs=1e-4) and float(r["mean"]) == pytest.approx(
            np.mean(scores), abs=1e-4)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 4 and "ran on" in md  # one row per (model, method) below the header
    assert len((out / "runs.jsonl").read_text().splitlines()) == 8
    # a rerun resumes: nothing is trained again, the log keeps its 8 runs
    code, _, err = _run(args, capsys)
    assert code == 0, err
    assert len((out / "runs.jsonl").read_text().splitlines()) == 8


def _bad_inputs(tmp_path: Path, folder: Path) -> list[tuple[list[str], str]]:
    empty_class = tmp_path / "empty_class"
    (empty_class / "a").mkdir(parents=True)
    (empty_class / "b").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32)).save(empty_class / "a" / f"{i}.png")
    one_class = tmp_path / "one_class"
    (one_class / "a").mkdir(parents=True)
    corrupt = tmp_path / "corrupt"
    for c in "ab":
        (corrupt / c).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(corrupt / c / "0.png")
        (corrupt / c / "1.png").write_bytes(b"not a png")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        (["--data", tmp_path / "missing"], "not found"),
        (["--data", a_file], "not a folder"),
        (["--data", empty_class], "holds 0 image"),
        (["--data", one_class], "at least 2"),
        (["--data", corrupt], "1.png"),
        (["--data", folder, "--method", "prompt"], "unknown fine-tuning method"),
        (["--data", folder, "--method", "adapter:sideways"], "unknown adapter placement"),
        (["--data", folder, "--epochs", "0"], "--epochs"),
        (["--data", folder, "--epochs", "100000"], "--epochs"),
        (["--data", folder, "--lr", "nan"], "--lr"),
        (["--data", folder, "--lr", "-0.1"], "--lr"),
        (["--data", folder, "--weight-decay", "inf"], "--weight-decay"),
        (["--data", folder, "--adapter-dim", "0"], "--adapter-dim"),
        (["--data", folder, "--lora-rank", "-2"], "--lora-rank"),
        (["--data", folder, "--batch-size", "0"], "--batch-size"),
        (["--data", folder, "--n-train", "0"], "--n-train"),
        (["--data", folder, "--eval-fraction", "1.5"], "--eval-fraction"),
        (["--data", folder, "--out", a_file], "is a file"),
        (["--data", folder, "--out", a_file / "sub"], "cannot write"),
    ]


@pytest.mark.parametrize("command", ["finetune", "finetune-compare"])
def test_hostile_inputs_are_one_line_and_write_nothing(tmp_path, vit3_dir, folder, command, capsys):
    cases = _bad_inputs(tmp_path, folder)
    if command == "finetune":
        cases.append((["--data", folder, "--method", "adapter", "--adapter-placement", "inside"],
                      "unknown adapter placement"))
        cases.append((["--data", folder, "--model", tmp_path / "nomodel"], "nomodel"))
    else:
        cases.append((["--data", folder, "--models", f"{vit3_dir},{vit3_dir}"], "twice"))
        cases.append((["--data", folder, "--image-size", "32,32,32"], "one per model"))
        cases.append((["--data", folder, "--seeds", "0"], "--seeds"))
    before = _tree(tmp_path)
    for extra, match in cases:
        out = tmp_path / "out"
        opts = {"--model" if command == "finetune" else "--models": str(vit3_dir), "--epochs": "1",
                "--method" if command == "finetune" else "--methods": "adapter", "--out": str(out)}
        args = [str(a) if a != "--method" or command == "finetune" else "--methods" for a in extra]
        for k in list(opts):
            if k in args:
                opts.pop(k)
        argv = [command, *[x for kv in opts.items() for x in kv], *args]
        code, stdout, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (extra, err)
        assert len(lines) == 1 and lines[0].startswith("error:"), (extra, err)
        assert match in lines[0], (extra, lines[0])
        assert "Traceback" not in err
        assert _tree(tmp_path) == before, (extra, "wrote something")
