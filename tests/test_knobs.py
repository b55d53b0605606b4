"""Sampling knobs declared by each prior, the shared sampling command line, and the method registry."""
from __future__ import annotations

import pytest

import methods
from common.errors import ConfigError
from common.knobs import given_knobs, resolve_knobs
from common.sampler import parse_sampling_args, sampling_parser
from npp.gpt import GPT
from rqvae.transformer import RQTransformer

SCHEMAS = methods.sampling_knob_schemas()


def given(*argv: str) -> tuple:
    args, assignments = parse_sampling_args(sampling_parser("", SCHEMAS), ["-v", "T", "-a", "P", *argv])
    return given_knobs(args, assignments)


def test_command_line_then_checkpoint_then_knob_defaults():
    defaults = {"temperature": 0.7, "top_k": 3}
    knobs = resolve_knobs(RQTransformer.SAMPLING_KNOBS, given("--top-p", "0.9", "0.8", "0.7"), defaults, depth=3)
    assert knobs == {"temperature": 0.7, "top_k": [3, 3, 3], "top_p": [0.9, 0.8, 0.7], "cfg_scale": 1.0}
    knobs = resolve_knobs(RQTransformer.SAMPLING_KNOBS, given("-t", "1.2", "top_k=[5,6,7]", "--cfg", "2"), defaults,
                          depth=3)
    assert knobs == {"temperature": 1.2, "top_k": [5, 6, 7], "top_p": [None] * 3, "cfg_scale": 2.0}


def test_an_assignment_after_a_flag_of_several_values_is_its_own_knob():
    assert given("--top-k", "4", "5", "cfg_interval=10") == {"--top-k": [4, 5], "cfg_interval": 10}


def test_gpt_knobs_are_single_values_and_name_their_folder():
    knobs = resolve_knobs(GPT.SAMPLING_KNOBS, given("--top-k", "100", "cfg_interval=4", "--cfg-scale", "1.5"), {})
    assert knobs == {"temperature": 1.0, "top_k": 100, "top_p": None, "cfg_scale": 1.5, "cfg_interval": 4}
    assert GPT.knob_folder_name(knobs) == "temp_1.0_top_k_100_top_p_None_cfg_1.5_cfg_interval_4"
    assert RQTransformer.knob_folder_name({"temperature": 1.0, "top_k": [8, 8], "top_p": [0.9, 1.0],
                                           "cfg_scale": 1.0}) == "temp_1.0_top_k_8_top_p_0.9_1.0"


@pytest.mark.parametrize("argv, schema, message", [
    (("num_iter=8",), GPT.SAMPLING_KNOBS, "num_iter: not a sampling knob of this prior (its knobs: temperature"),
    (("--cfg-interval", "3"), RQTransformer.SAMPLING_KNOBS, "--cfg-interval: not a sampling knob"),
    (("--top-k", "4", "5"), GPT.SAMPLING_KNOBS, "--top-k takes one value, got 2"),
    (("-t", "0"), GPT.SAMPLING_KNOBS, "--temp must be > 0, got 0.0"),
    (("top_p=1.5",), RQTransformer.SAMPLING_KNOBS, "--top-p must be in (0, 1], got 1.5"),
    (("cfg_interval=-3",), GPT.SAMPLING_KNOBS, "--cfg-interval must be >= -1, got -3"),
])
def test_a_knob_the_prior_does_not_take_is_refused(argv, schema, message):
    with pytest.raises(ConfigError) as error:
        resolve_knobs(schema, given(*argv), {}, depth=3)
    assert message in str(error.value)


def test_registry_types_are_unique_and_found_by_arch_type():
    tokenizers = [t.arch_type for m in methods.METHODS for t in m.tokenizers]
    priors = [p.arch_type for m in methods.METHODS for p in m.priors]
    assert len(set(tokenizers)) == len(tokenizers) and len(set(priors)) == len(priors)
    assert {"rq-vae", "lfq", "vq16"} <= set(tokenizers) and {"rq-transformer", "llamagen-gpt"} <= set(priors)
    assert methods.stage2_type({"arch": {"type": "llamagen-gpt"}}, "x.yaml").prior_class is GPT
    with pytest.raises(ConfigError, match="x.yaml: arch.type must name a prior this codebase trains"):
        methods.stage2_type({"arch": {"type": "pixelcnn"}}, "x.yaml")
    with pytest.raises(ConfigError, match="must name a tokenizer this codebase trains"):
        methods.stage1_type({"arch": {"type": "pixelcnn"}}, "x.yaml")
    assert methods.stage1_type({"arch": {"type": "vq16"}}, "x.yaml").arch_type == "vq16"  # trained here too now
