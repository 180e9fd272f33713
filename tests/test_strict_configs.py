"""Every configuration field with a fixed set of values refuses anything else, in Python (not only in the CLI),
with one error naming the field and the allowed values — read from the field's own ``Literal`` type."""

import dataclasses
import typing

import pytest

from parcae.errors import ConfigError
from parcae.model import DepthSampler, ModelConfig
from parcae.training.optim import OptimizerConfig, ScheduleConfig
from parcae.validation import allowed_values

CONFIGS = (ModelConfig, OptimizerConfig, ScheduleConfig, DepthSampler)
CHOICE_FIELDS = [(cls, f.name, allowed_values(typing.get_type_hints(cls)[f.name]))
                 for cls in CONFIGS for f in dataclasses.fields(cls)
                 if allowed_values(typing.get_type_hints(cls)[f.name]) is not None]


def test_the_fields_with_fixed_values_are_found():
    names = {(cls.__name__, name) for cls, name, _ in CHOICE_FIELDS}
    assert {("ModelConfig", "mlp"), ("ModelConfig", "block"), ("ModelConfig", "init"), ("ModelConfig", "state_init"),
            ("ModelConfig", "injection"), ("ModelConfig", "depth_scheme"), ("ModelConfig", "depth_granularity"),
            ("OptimizerConfig", "name"), ("ScheduleConfig", "name"), ("DepthSampler", "scheme"),
            ("DepthSampler", "granularity")} <= names


@pytest.mark.parametrize("cls, field, choices", CHOICE_FIELDS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_bad_value_is_refused_naming_field_and_choices(cls, field, choices):
    with pytest.raises(ConfigError) as info:
        cls(**{field: "not-a-choice"})
    message = str(info.value)
    assert f"{cls.__name__}.{field}" in message and "'not-a-choice'" in message and "\n" not in message
    assert all(repr(c) in message for c in choices)


@pytest.mark.parametrize("cls, field, choices", CHOICE_FIELDS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_allowed_value_is_accepted(cls, field, choices):
    for value in choices:
        extra = {"mean_recurrence": 8, "backprop_depth": 4} if value == "poisson_lognormal" else {}
        cls(**{field: value}, **extra)


def test_the_issue_example_no_longer_builds_a_different_model():
    with pytest.raises(ConfigError, match=r"ModelConfig\.block must be one of 'prenorm', 'sandwich'; got 'postnorm'"):
        ModelConfig(mlp="swiglu", block="postnorm")
    for field, value in (("mlp", "gelu"), ("init", "xavier"), ("state_init", "random")):
        with pytest.raises(ConfigError, match=f"ModelConfig.{field} must be one of"):
            ModelConfig(**{field: value})
