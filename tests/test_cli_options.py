"""KEY=VALUE options shared by `vladva caption --vllm-arg` and `vladva analyze --model-option`."""
import pytest

from vladva_openclip.cli_options import key_values


def test_values_are_json_when_they_parse_else_text():
    got = key_values(["max_model_len=4096", "enforce_eager=true", "dtype=bfloat16", "ids=[1, 2]", "empty="],
                     "--vllm-arg")
    assert got == {"max_model_len": 4096, "enforce_eager": True, "dtype": "bfloat16", "ids": [1, 2], "empty": ""}


@pytest.mark.parametrize("bad", ["novalue", "=1"])
def test_a_malformed_item_names_the_flag(bad):
    with pytest.raises(ValueError, match=rf"--model-option '{bad}': write KEY=VALUE"):
        key_values([bad], "--model-option")
