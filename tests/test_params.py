"""--model_args parsing: lmms-eval hands over str/int/float; bad values fail with the valid set."""

import pytest

from methods.params import ModelArgsError, Param, parse_params

PARAMS = (
    Param("alpha", float, 0.2, "boost", low=0.0),
    Param("start_layer", int, 2, "first layer"),
    Param("end_layer", int, None, "end", optional=True),
    Param("use_cfg", bool, False, "cfg"),
    Param("mode", str, "once", "mode", choices=("once", "every_token")),
)


def test_lmms_eval_value_types_are_converted():
    got = parse_params(
        PARAMS, {"alpha": "0.5", "start_layer": -2.0, "end_layer": "None", "use_cfg": "true", "mode": "every_token"}
    )
    assert got == {"alpha": 0.5, "start_layer": -2, "end_layer": None, "use_cfg": True, "mode": "every_token"}
    assert isinstance(got["start_layer"], int)
    assert parse_params(PARAMS, {"use_cfg": 1, "alpha": 3})["use_cfg"] is True


def test_defaults_presets_and_explicit_values_in_that_order():
    presets = {"strong": {"alpha": 0.9, "start_layer": 4}}
    got = parse_params(PARAMS, {"preset": "strong", "start_layer": 5}, presets)
    assert got["alpha"] == 0.9 and got["start_layer"] == 5 and got["mode"] == "once"


@pytest.mark.parametrize(
    "given,message",
    [
        ({"alhpa": 1}, "unknown model_args alhpa. Valid: alpha, end_layer, mode, start_layer, use_cfg"),
        ({"alpha": -0.1}, "alpha=-0.1 is out of range"),
        ({"start_layer": 2.5}, "start_layer=2.5 is not a valid int"),
        ({"use_cfg": "maybe"}, "use_cfg='maybe' is not a valid bool"),
        ({"mode": "sometimes"}, "mode='sometimes' is not one of once, every_token"),
        ({"preset": "nope"}, "unknown preset 'nope'"),
        ({"alpha": "none"}, "alpha needs a value"),
    ],
)
def test_bad_values_fail_with_a_message(given, message):
    with pytest.raises(ModelArgsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_params(PARAMS, given, {"strong": {}})


def test_no_parameter_name_is_redacted_by_lmms_eval():
    """lmms-eval 0.7 writes model_args into the results with anything named like a secret
    (`*token=`, `*_secret=`, ...) replaced by [REDACTED]: a parameter so named would vanish
    from the recorded recipe."""
    import importlib

    from lmms_eval.evaluator import _redact_eval_config_secrets

    from lmms_eval_plugins.models import MODELS

    for module, cls, _ in MODELS.values():
        spec = getattr(importlib.import_module(f"lmms_eval_plugins.models.{module}"), cls).spec
        for param in spec.params:
            arg = f"{param.name}=1"
            assert _redact_eval_config_secrets(arg) == arg, f"{spec.name}: {param.name} would be redacted"
