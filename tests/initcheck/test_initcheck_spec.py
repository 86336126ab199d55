"""Parsing of module specs, kwargs and shapes, device/dtype resolution, JSON-safe values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradflow_agent.initcheck import AnalysisConfig, AnalysisResult
from gradflow_agent.initcheck.context import resolve_device
from gradflow_agent.initcheck.errors import (
    DeviceError,
    DtypeError,
    InitCheckError,
    KwargsError,
    ShapeError,
    SpecError,
)
from gradflow_agent.initcheck.result import json_safe
from gradflow_agent.initcheck.spec import (
    build_module,
    load_module_class,
    normalize_shapes,
    parse_module_kwargs,
    parse_module_spec,
    parse_named_shapes,
    parse_shape,
)


@pytest.mark.parametrize(
    ("text", "module_path", "class_name"),
    [
        ("torch.nn@Linear", "torch.nn", "Linear"),
        ("torch.nn.Linear", "torch.nn", "Linear"),
        (" torch.nn.modules.linear@Linear ", "torch.nn.modules.linear", "Linear"),
        ("pkg/my_layers.py@Block", "pkg/my_layers.py", "Block"),
    ],
)
def test_parse_module_spec(text, module_path, class_name):
    spec = parse_module_spec(text)
    assert (spec.module_path, spec.class_name) == (module_path, class_name)


@pytest.mark.parametrize(
    "text", ["", "Linear", "@Linear", "torch.nn@", "torch nn@Linear", "torch.nn@Lin-ear"]
)
def test_parse_module_spec_rejects(text):
    with pytest.raises(SpecError):
        parse_module_spec(text)


def test_load_module_class_finds_torch_and_suggests_typos():
    assert load_module_class("torch.nn@Linear") is nn.Linear
    assert load_module_class("torch.nn@MultiheadAttention") is nn.MultiheadAttention
    with pytest.raises(SpecError, match="did you mean 'Linear'"):
        load_module_class("torch.nn@Linearr")
    with pytest.raises(SpecError, match="no module named 'no_such_pkg'"):
        load_module_class("no_such_pkg.layers@Block")
    with pytest.raises(SpecError, match="not a torch.nn.Module subclass"):
        load_module_class("collections@OrderedDict")
    with pytest.raises(SpecError, match="not a class"):
        load_module_class("torch.nn@functional")


def test_load_module_class_from_file(tmp_path):
    path = tmp_path / "my_layers.py"
    path.write_text(
        "import torch\n\n\nclass Double(torch.nn.Module):\n    def forward(self, x):\n        return 2 * x\n"
    )
    cls = load_module_class(f"{path}@Double")
    assert issubclass(cls, nn.Module)
    assert torch.equal(cls()(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(SpecError, match="no such file"):
        load_module_class(f"{tmp_path / 'missing.py'}@Double")


def test_parse_module_kwargs_literals_and_strings():
    kwargs = parse_module_kwargs(
        [
            "in_features=16",
            "bias=False",
            "shape=(4, 16)",
            "eps=1e-5",
            "mode=fan_in",
            "x=None",
            "names=['a','b']",
        ]
    )
    assert kwargs == {
        "in_features": 16,
        "bias": False,
        "shape": (4, 16),
        "eps": 1e-5,
        "mode": "fan_in",
        "x": None,
        "names": ["a", "b"],
    }
    assert parse_module_kwargs(None) == {}


@pytest.mark.parametrize(
    ("items", "match"),
    [(["in_features"], "key=value"), (["1x=2"], "valid keyword"), (["a=1", "a=2"], "given twice")],
)
def test_parse_module_kwargs_errors(items, match):
    with pytest.raises(KwargsError, match=match):
        parse_module_kwargs(items)


@pytest.mark.parametrize(
    ("text", "shape"), [("2,16", (2, 16)), ("(2, 8, 32)", (2, 8, 32)), ("16,", (16,)), ("[3]", (3,))]
)
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "2,x", "0,4", "-1,3", "2,,3", "2.5"])
def test_parse_shape_errors(text):
    with pytest.raises(ShapeError, match="bad shape"):
        parse_shape(text)


def test_parse_named_shapes_keeps_order_and_validates():
    shapes = parse_named_shapes(["query:2,8,32", "key:2,8,32", "value:2,8,32"])
    assert list(shapes) == ["query", "key", "value"] and shapes["key"] == (2, 8, 32)
    for bad in (["query2,8"], ["1q:2"], ["q:2", "q:3"], ["q:a"]):
        with pytest.raises(ShapeError):
            parse_named_shapes(bad)


def test_normalize_shapes_api_forms():
    assert normalize_shapes((2, 16)) == {"x": (2, 16)}
    assert normalize_shapes({"x": [2, 16], "y": "3,4"}) == {"x": (2, 16), "y": (3, 4)}
    with pytest.raises(ShapeError):
        normalize_shapes({})
    with pytest.raises(ShapeError):
        normalize_shapes({"x": (2, 0)})


def test_build_module_reports_rejected_kwargs():
    with pytest.raises(
        KwargsError, match=r"Linear\(in_features=16, out_features=4, foo=1\) failed: TypeError"
    ):
        build_module(nn.Linear, {"in_features": 16, "out_features": 4, "foo": 1})
    with pytest.raises(KwargsError, match="embed_dim must be divisible by num_heads"):
        build_module(nn.MultiheadAttention, {"embed_dim": 32, "num_heads": 5})
    a = build_module(nn.Linear, {"in_features": 4, "out_features": 3}, seed=7)
    b = build_module(nn.Linear, {"in_features": 4, "out_features": 3}, seed=7)
    assert torch.equal(a.weight, b.weight)  # the seed makes the initialization reproducible


def test_resolve_device():
    assert resolve_device("cpu") == (torch.device("cpu"), None)
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        device, notice = resolve_device("cuda")
        assert device == torch.device("cpu") and "CUDA is not available" in notice


def test_config_validation():
    with pytest.raises(InitCheckError, match="unknown loss function 'l1'"):
        AnalysisConfig(loss_fns=["l1"])
    with pytest.raises(DtypeError, match="unknown dtype 'float64'"):
        AnalysisConfig(dtype="float64")
    with pytest.raises(InitCheckError, match="n-samples"):
        AnalysisConfig(n_samples=0)
    assert AnalysisConfig(loss_fns="sum").loss_fns == ("sum",)


def test_json_safe_values():
    value = {
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "t": torch.tensor([1.0, float("nan")]),
        "s": torch.tensor(2.5),
        "np": np.float32(0.5),
        "arr": np.arange(3),
        "tuple": (1, 2),
        "dtype": torch.float16,
    }
    safe = json_safe(value)
    assert safe == {
        "nan": "nan",
        "inf": "inf",
        "ninf": "-inf",
        "t": [1.0, "nan"],
        "s": 2.5,
        "np": 0.5,
        "arr": [0, 1, 2],
        "tuple": [1, 2],
        "dtype": "torch.float16",
    }
    json.dumps(safe, allow_nan=False)
    result = AnalysisResult("spectral.weight", {"condition_number": math.inf}, False, "singular", "warning")
    assert result.analysis == "spectral"
    assert AnalysisResult.from_dict(result.to_dict()).to_dict() == result.to_dict()
    with pytest.raises(ValueError):
        AnalysisResult("x", None, True, "", "fatal")
