"""Every `vitlens` command in the README's bash blocks runs as shown (from a folder laid out like the repository) and
writes what it says; the demo command is run in full by test_embedded.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from vitlens.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The `vitlens ...` commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "vitlens":
                commands.append(argv[1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_every_command():
    shown = {argv[0] for argv in COMMANDS}
    assert {"explain", "heads", "layers", "compare", "swin", "lime", "occlusion", "whatif", "models", "demo",
            "finetune", "run"} <= shown


@pytest.mark.parametrize("argv", [a for a in COMMANDS if a[0] != "demo"], ids=lambda a: " ".join(a)[:60])
def test_readme_command_runs_as_shown(argv, tmp_path, monkeypatch, capsys):
    (tmp_path / "src").symlink_to(ROOT / "src")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the DINOv2 conversion stays out of ~/.cache
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "error" not in err.lower()
    written = [Path(w) for w in re.findall(r"wrote (\S+\.(?:png|npy|csv|md|html))", out.replace(",", ""))]
    found = re.findall(r"wrote \d+ files to (\S+)|wrote (\S+) \(\d+ images listed\)", out)  # output folders
    folders = [Path(name) for pair in found for name in pair if name]
    if "--out" in argv:
        assert written or folders or "figures to" in out, out
    for folder in folders:
        assert any((tmp_path / folder).iterdir()), folder
    for path in written:
        assert (tmp_path / path).is_file(), path
        if path.suffix == ".png":
            with Image.open(tmp_path / path) as im:
                assert im.format == "PNG" and min(im.size) >= 100


def test_the_readme_describes_every_registered_method():
    from vitlens.methods import METHODS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Methods"):text.index("## Swin Transformer")]
    for name in METHODS:
        assert f"`{name}`" in section, name
