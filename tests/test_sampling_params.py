"""SamplingParams: defaults, normalisation and one rejection per rule, each naming its field."""

import pytest

from vattn.sampling_params import SamplingParams


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    q = SamplingParams(temperature=0, top_k=-1, max_tokens=None, seed=-3, logprobs=0)
    assert q.greedy and isinstance(q.temperature, float) and q.max_tokens is None
    assert SamplingParams(temperature=5e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"n": 0}, "n", ">= 1"),
        ({"n": 1.0}, "n", "int"),
        ({"n": True}, "n", "int"),
        ({"temperature": -1}, "temperature", ">= 0, got -1"),
        ({"temperature": "0.5"}, "temperature", "number"),
        ({"temperature": float("nan")}, "temperature", "finite"),
        ({"temperature": True}, "temperature", "number"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", ">= 1"),
        ({"top_k": 2.5}, "top_k", "int"),
        ({"min_p": 1.1}, "min_p", "[0, 1]"),
        ({"min_p": -0.1}, "min_p", "[0, 1]"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
        ({"frequency_penalty": "1"}, "frequency_penalty", "number"),
        ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
        ({"seed": 1.5}, "seed", "int"),
        ({"seed": False}, "seed", "int"),
        ({"seed": 2**64}, "seed", "2**64"),
        ({"stop": ""}, "stop", "non-empty"),
        ({"stop": ["ok", ""]}, "stop", "non-empty"),
        ({"stop": [1]}, "stop", "str"),
        ({"stop": 5}, "stop", "str"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
        ({"stop_token_ids": [True]}, "stop_token_ids", "int"),
        ({"stop_token_ids": 7}, "stop_token_ids", "list"),
        ({"ignore_eos": 1}, "ignore_eos", "bool"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens", "bool"),
        ({"include_stop_str_in_output": None}, "include_stop_str_in_output", "bool"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_tokens": "16"}, "max_tokens", "int"),
        ({"min_tokens": -1}, "min_tokens", ">= 0"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "<= max_tokens"),
        ({"logprobs": 21}, "logprobs", "[0, 20]"),
        ({"logprobs": -1}, "logprobs", "[0, 20]"),
        ({"prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
        ({"prompt_logprobs": 1.0}, "prompt_logprobs", "int"),
        ({"beam_width": 0}, "beam_width", ">= 1"),
        ({"use_beam_search": 1}, "use_beam_search", "bool"),
        ({"use_beam_search": True, "beam_width": 2, "n": 3}, "n", "beam_width"),
        ({"length_penalty": "x"}, "length_penalty", "number"),
    ],
)
def test_rejects_bad_values_naming_the_field(kwargs, field, fragment):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert message.startswith(field), message
    assert fragment in message, message


def test_accepts_edges():
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2, logprobs=20)
    SamplingParams(min_tokens=16, max_tokens=16, prompt_logprobs=0, top_k=1)
    SamplingParams(min_tokens=1000, max_tokens=None)
    SamplingParams(use_beam_search=True, beam_width=4, n=4, temperature=0)
