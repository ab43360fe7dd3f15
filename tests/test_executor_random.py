"""Random ops, checked by distribution: Core ML's generator cannot be matched bit for bit.

One program holds a large draw of each op (fixed seeds), converted once; each statistic is
checked against a bound of about five standard errors, so a correct sampler fails with
negligible probability and a wrong distribution (rate, scale, shift, class weights) fails.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402

from publisher.executor import load_program, run  # noqa: E402

N = 40_000
LOGITS = np.log(np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], np.float32))


@pytest.fixture(scope="module")
def draws(tmp_path_factory) -> dict[str, np.ndarray]:
    @mb.program(input_specs=[mb.TensorSpec(shape=LOGITS.shape)], opset_version=ct.target.iOS16)
    def prog(logits):
        shape = np.array([N], np.int32)
        return (
            mb.random_bernoulli(shape=shape, prob=0.3, seed=1, name="bernoulli"),
            mb.random_normal(shape=shape, mean=2.0, stddev=3.0, seed=2, name="normal"),
            mb.random_uniform(shape=shape, low=-1.0, high=3.0, seed=3, name="uniform"),
            mb.random_categorical(x=logits, size=N, seed=4, name="categorical"),
            mb.random_normal(shape=np.array([4], np.int32), name="unseeded"),
        )

    package = tmp_path_factory.mktemp("random") / "random.mlpackage"
    ct.convert(
        prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16, pass_pipeline=ct.PassPipeline.EMPTY
    ).save(str(package))
    program = load_program(package)
    first, second = (run(program, {"logits": LOGITS}) for _ in range(2))
    return {**first, "again": second}


def _within(value: float, expected: float, standard_error: float) -> None:
    assert abs(value - expected) < 5 * standard_error, (value, expected)


def test_bernoulli_rate(draws):
    x = draws["bernoulli"]
    assert set(np.unique(x)) <= {0.0, 1.0}
    _within(x.mean(), 0.3, np.sqrt(0.3 * 0.7 / N))


def test_normal_mean_and_variance(draws):
    x = draws["normal"]
    _within(x.mean(), 2.0, 3.0 / np.sqrt(N))
    _within(x.var(), 9.0, 9.0 * np.sqrt(2 / N))


def test_uniform_range_mean_and_variance(draws):
    x = draws["uniform"]
    assert x.min() >= -1.0 and x.max() < 3.0
    _within(x.mean(), 1.0, np.sqrt(16 / 12 / N))
    _within(x.var(), 16 / 12, 16 / 12 * np.sqrt(0.8 / N))


def test_categorical_frequencies(draws):
    x = draws["categorical"]
    assert x.shape == (2, N)
    probs = np.exp(LOGITS)
    for row, p in zip(x, probs, strict=True):
        frequencies = np.bincount(row.astype(np.int64), minlength=3) / N
        for f, q in zip(frequencies, p, strict=True):
            _within(f, q, np.sqrt(q * (1 - q) / N))


def test_a_seeded_op_repeats_its_draw_and_an_unseeded_one_does_not(draws):
    again = draws["again"]
    for name in ("bernoulli", "normal", "uniform", "categorical"):
        np.testing.assert_array_equal(draws[name], again[name])
    assert not np.array_equal(draws["unseeded"], again["unseeded"])
