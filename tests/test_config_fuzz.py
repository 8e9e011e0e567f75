"""Any JSON document either validates or fails with a ConfigError naming fields — never a traceback."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_core.config import ConfigError, TrainConfig
from lora_core.configfile import parse_config

FIELDS = list(TrainConfig.model_fields) + ["training_params", "bogus"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), children, max_size=4),
    max_leaves=12,
)
documents = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=10) | json_values


def check(document) -> None:
    try:
        config = parse_config(document)
    except ConfigError as error:
        assert error.problems, "an error must name at least one field"
        for field, message in error.problems:
            assert field and message
        return
    assert isinstance(config, TrainConfig)
    json.dumps(config.model_dump(mode="json"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_json_document_validates_or_names_a_field(document):
    check(document)


VALID = {"dataset_path": "d", "base_model": "m", "output_path": "o", "trigger_words": ["t"]}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(TrainConfig.model_fields)), json_values, st.booleans())
def test_one_bad_field_in_a_good_config_is_named(field, value, nested):
    document = dict(VALID)
    if nested and field not in VALID:
        document["training_params"] = {field: value}
    else:
        document[field] = value
    try:
        parse_config(document)
    except ConfigError as error:
        named = {problem[0].split(".")[-1] if problem[0].startswith("training_params.") else problem[0].split(".")[0]
                 for problem in error.problems}
        assert field in named, (field, error.problems)
