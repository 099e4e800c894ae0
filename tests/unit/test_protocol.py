import pytest
from pydantic import ValidationError

from hypergen.errors import validation_error_to_openai
from hypergen.protocol import ALLOWED, ImageGenerationRequest, ModelLimits, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [("512x512", (512, 512)), ("64X128", (64, 128)), (" 768 x 512 ", (768, 512)), ("1024×1024", (1024, 1024))],
)
def test_parse_size_reads_width_then_height(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("big", "not of the form WIDTHxHEIGHT"),
        ("512", "not of the form"),
        ("0x512", "positive"),
        ("1001x1001", "try '1000x1000'"),
        ("513x512", "not a multiple of 8"),
        ("-64x64", "not of the form"),
    ],
)
def test_parse_size_explains_what_is_wrong(text, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        parse_size(text)


def test_model_limits_resolve_auto_and_omitted_to_native_size():
    limits = ModelLimits(id="m", native_width=512, native_height=768, max_side=1024)
    assert limits.resolve_size(None) == (512, 768)
    assert limits.resolve_size("auto") == (512, 768)
    assert limits.resolve_size("1024x64") == (1024, 64)
    with pytest.raises(ValueError, match="from 64 to 1024"):
        limits.resolve_size("2048x512")


def test_a_model_whose_sides_must_be_multiples_of_16_names_the_nearest_size_that_fits():
    """FLUX.1 and SD 3.5 pack or patch latents 2×2: 1000 (a multiple of 8) would be cut to 992 or refused by the pipeline."""
    limits = ModelLimits(id="flux", native_width=1024, native_height=1024, max_side=2048, size_multiple=16)
    assert limits.resolve_size("1024x1008") == (1024, 1008)
    with pytest.raises(ValueError, match="multiples of 16; try '1008x1024'"):
        limits.resolve_size("1000x1016")


def test_request_defaults_follow_openai():
    request = ImageGenerationRequest(prompt="a cat")
    assert request.n == 1 and request.output_format == "png" and request.stream is False
    assert request.response_format is None  # resolved by HYPERGEN_DEFAULT_RESPONSE_FORMAT


def test_unknown_fields_are_ignored_and_openai_extras_accepted():
    request = ImageGenerationRequest(
        prompt="a cat", quality="hd", style="vivid", background="opaque", moderation="low", user="u1", future_field=3
    )
    assert request.quality == "hd" and not hasattr(request, "future_field")


@pytest.mark.parametrize(
    "field, value, allowed_fragment",
    [
        ("n", 11, "1 to 10"),
        ("n", 0, "1 to 10"),
        ("num_inference_steps", 151, "1 to 150"),
        ("guidance_scale", 25.0, "1.0 to 20.0"),
        ("lora_scale", 2.5, "0.0 to 2.0"),
        ("response_format", "jpeg", "'url' or 'b64_json'"),
        ("output_format", "gif", "'png', 'jpeg' or 'webp'"),
        ("seed", -1, "0 to 2**63"),
        ("n", "many", "1 to 10"),
    ],
)
def test_validation_errors_name_the_field_and_the_allowed_values(field, value, allowed_fragment):
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest(prompt="a cat", **{field: value})
    error = validation_error_to_openai(caught.value, ALLOWED)
    assert error.status_code == 400
    assert error.param == field
    assert allowed_fragment in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", ["", "   "])
def test_blank_prompt_is_rejected(prompt):
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest(prompt=prompt)
    assert validation_error_to_openai(caught.value, ALLOWED).param == "prompt"


def test_missing_prompt_is_a_missing_parameter():
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest.model_validate({"n": 1})
    error = validation_error_to_openai(caught.value, ALLOWED)
    assert error.param == "prompt" and error.code == "missing_required_parameter"
