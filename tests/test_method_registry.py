"""Methods declare themselves; the command line's flags, checks and notes derive from the declarations."""

from __future__ import annotations

import math

import click
import pytest
import torch
from click.testing import CliRunner

import vitlens
from factories import hf_vit
from vitlens.cli.explain import explain as explain_command
from vitlens.cli.methods import build_method, declared_options, map_methods, method_options, pop_options
from vitlens.errors import VitlensError
from vitlens.methods import METHODS, Method, Option, register
from vitlens.methods.base import GradientMethod


def test_every_method_declares_itself():
    assert {"attention", "rollout", "grad_rollout", "lime", "occlusion"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.description, name
        assert cls.families, name
        for o in cls.options:
            assert o.help and isinstance(o.name, str), (name, o)
            if o.default is not None and o.parse is None and o.type in (int, float, bool, str):
                assert o.check(o.default) == o.default, (name, o.name)  # defaults satisfy their own ranges


@pytest.mark.parametrize(("option", "value", "ok"), [
    (Option("r", float, 0.0, "h", lo=0.0, hi=1.0, hi_open=True), 0.999, True),
    (Option("r", float, 0.0, "h", lo=0.0, hi=1.0, hi_open=True), 1.0, False),
    (Option("r", float, 0.0, "h", lo=0.0, hi=1.0), 1.0, True),
    (Option("r", float, 0.0, "h", lo=0.0, hi=1.0), -0.0001, False),
    (Option("r", float, 0.0, "h"), math.nan, False),
    (Option("r", float, 0.0, "h"), math.inf, False),
    (Option("n", int, 0, "h", lo=0), 3, True),
    (Option("n", int, 0, "h", lo=0), 2.5, False),
    (Option("n", int, 0, "h", lo=0), -1, False),
    (Option("c", str, "a", "h", choices=("a", "b")), "b", True),
    (Option("c", str, "a", "h", choices=("a", "b")), "z", False),
    (Option("f", bool, True, "h"), "yes", False),
])
def test_option_checks_by_hand(option, value, ok):
    if ok:
        assert option.check(value) == value
    else:
        with pytest.raises(VitlensError, match=f"^{option.name} must be"):
            option.check(value)


def test_flags_follow_declarations():
    assert Option("normalize", bool, True, "h").flag == "--no-normalize"
    assert Option("per_layer", bool, False, "h").flag == "--per-layer"
    assert Option("discard_ratio", float, 0.0, "h").flag == "--discard-ratio"
    text = CliRunner().invoke(explain_command, ["--help"]).output
    for name, (o, _users) in declared_options(map_methods()).items():
        assert o.flag in text, name
        assert name != "per_layer"  # cli=False options stay off the command line
    for name in map_methods():
        assert name in text


class _Toy(Method):
    """A toy method: the map is a constant ``level``; it exists only in this test."""

    name = "toy_constant"
    description = "a constant map"
    options = (Option("level", float, 1.0, "The constant.", lo=0.0, hi=10.0),
               Option("head_fusion", str, "mean", "Shared name with rollout.", choices=("mean", "max")))

    def __init__(self, model, level: float = 1.0, head_fusion: str = "mean") -> None:
        super().__init__(model)
        self.set_options(level=level, head_fusion=head_fusion)


@pytest.fixture
def toy():
    register(_Toy)
    yield _Toy
    METHODS.pop(_Toy.name)


def test_a_new_method_is_one_class_and_its_registration(toy):
    model = vitlens.wrap(hf_vit())
    m, notes = build_method(model, "toy_constant", {"level": 2.5, "discard_ratio": 0.3})
    assert isinstance(m, _Toy) and m.level == 2.5 and m.params == {"level": 2.5, "head_fusion": "mean"}
    assert notes == ["note: --discard-ratio does not apply to toy_constant; ignored"]
    with pytest.raises(VitlensError, match=r"level must be in \[0, 10\]"):
        build_method(model, "toy_constant", {"level": 11})

    @click.command()
    @method_options(["toy_constant", "rollout"])
    def cmd(**kw):
        click.echo(repr(sorted(pop_options(kw, ["toy_constant", "rollout"]).items())))

    out = CliRunner().invoke(cmd, ["--level", "3", "--head-fusion", "max", "--no-normalize"]).output
    assert out.strip() == repr([("head_fusion", "max"), ("level", 3.0), ("normalize", False)])
    assert "(toy_constant)" in CliRunner().invoke(cmd, ["--help"]).output


def test_unknown_method_and_class_specific_on_a_backbone():
    backbone = vitlens.wrap(hf_vit(head=False))
    with pytest.raises(VitlensError, match="unknown method 'nope'"):
        build_method(backbone, "nope", {})
    with pytest.raises(VitlensError, match="backbone without a classification head"):
        build_method(backbone, "grad_rollout", {})


def test_gradient_targets_index_list_and_callable():
    torch.manual_seed(0)
    model = vitlens.wrap(hf_vit())
    x = torch.randn(3, 3, 32, 32)
    by_index = vitlens.GradRollout(model).explain(x, target=2)
    by_list = vitlens.GradRollout(model).explain(x, target=[2, 2, 2])
    by_callable = vitlens.GradRollout(model).explain(x, target=lambda out: out[:, 2])
    torch.testing.assert_close(by_index.maps, by_list.maps)
    torch.testing.assert_close(by_index.maps, by_callable.maps)
    assert by_callable.target is None and by_index.target.tolist() == [2, 2, 2]
    mixed = vitlens.GradRollout(model).explain(x, target=[0, 1, 4])
    for i, t in enumerate([0, 1, 4]):
        torch.testing.assert_close(mixed.maps[i], vitlens.GradRollout(model).explain(x[i : i + 1], target=t).maps[0])


def test_callable_target_explains_a_backbone():
    """A backbone has no classes, but a score of its pooled features (here their norm) can still be explained."""
    torch.manual_seed(0)
    backbone = vitlens.wrap(hf_vit(head=False))
    x = torch.randn(2, 3, 32, 32)
    exp = vitlens.GradRollout(backbone).explain(x, target=lambda feats: feats.norm(dim=-1))
    assert exp.maps.shape == (2, 4, 4) and torch.isfinite(exp.maps).all()
    # the same score through a gradient computed by hand: d ||f|| / d attention, block by block
    with backbone.record(grads=True) as rec:
        feats = backbone(x)
        grads = rec.grads(feats.norm(dim=-1))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(VitlensError, match="one score per image"):
        vitlens.GradRollout(backbone).explain(x, target=lambda feats: feats)


def test_gradient_base_is_shared():
    assert issubclass(vitlens.GradRollout, GradientMethod) and vitlens.GradRollout.class_specific
    assert not vitlens.Rollout.class_specific
