"""fastrit._args: the one rule for scalar arguments (bools are not integers; messages name the argument)."""

import math

import pytest

from fastrit import _args


@pytest.mark.parametrize("value", [1, 7, 10**12])
def test_positive_accepts_positive_ints(value):
    assert _args.positive("n", value) == value


@pytest.mark.parametrize("value", [0, -1, True, 1.0, "3", None])
def test_positive_refuses_the_rest_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^batch_size: expected a positive integer, got "):
        _args.positive("batch_size", value)


def test_optional_and_custom_wording():
    assert _args.positive("top_n", None, optional=True) is None
    with pytest.raises(ValueError, match=r"top_n: expected None or a positive integer, got 0"):
        _args.positive("top_n", 0, optional=True)
    with pytest.raises(ValueError, match=r"chunk_bytes: expected a positive number of bytes, got -3"):
        _args.positive("chunk_bytes", -3, what="a positive number of bytes")


def test_integer_bounds_and_type_error():
    assert _args.integer("layer", 0, low=0, high=3) == 0
    assert _args.integer("layer", 2, low=0, high=3) == 2
    with pytest.raises(ValueError, match=r"layer: expected an integer in \[0, 3\), got 3"):
        _args.integer("layer", 3, low=0, high=3)
    with pytest.raises(ValueError, match=r"n: expected a non-negative integer, got -1"):
        _args.integer("n", -1, low=0)
    with pytest.raises(TypeError, match=r"steps: expected an integer, got str"):
        _args.integer("steps", "20", type_error=True)


@pytest.mark.parametrize("value", [1e-9, 0.5, 1, 1.0])
def test_number_default_interval_is_open_left_closed_right(value):
    assert _args.number("share", value, low=0, high=1) == value


@pytest.mark.parametrize("value", [0, -0.1, 1.0000001, math.nan, True, "0.5", None])
def test_number_refuses_outside_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"share: expected a number in \(0, 1\], got "):
        _args.number("share", value, low=0, high=1)


def test_number_other_ends_and_optional():
    assert _args.number("tol", 0, low=0, high=1, low_open=False, high_open=True) == 0
    with pytest.raises(ValueError, match=r"tol: expected None or a number in \[0, 1\), got 1"):
        _args.number("tol", 1, low=0, high=1, low_open=False, high_open=True, optional=True)
    assert _args.number("tol", None, low=0, high=1, optional=True) is None


def test_one_of_and_flag():
    assert _args.one_of("train", "mlp", ("mlp", "lora")) == "mlp"
    with pytest.raises(ValueError, match=r"train: expected one of \('mlp', 'lora'\), got 'x'"):
        _args.one_of("train", "x", ("mlp", "lora"))
    with pytest.raises(ValueError, match=r"loss: expected 'chunked' or 'model', got 3"):
        _args.one_of("loss", 3, ("chunked", "model"), what="'chunked' or 'model'")
    assert _args.flag("quantized", False) is False
    with pytest.raises(ValueError, match=r"quantized: expected True or False, got 1"):
        _args.flag("quantized", 1)
    with pytest.raises(TypeError, match=r"master_weights: expected True or False, got None"):
        _args.flag("master_weights", None, type_error=True)
