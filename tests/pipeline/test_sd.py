"""Text conditioning: clip_skip, embedding perturbation, and the empty caption of caption dropout."""

import pytest
import torch

from pipeline.params import validate_params
from pipeline.sd import encode_text, load_components


@pytest.fixture(scope="module")
def sd15():
    return load_components("tiny-sd15")


@pytest.fixture(scope="module")
def sdxl():
    return load_components("tiny-sdxl")


def token_ids(components, captions, index=0):
    tokenizer = components.tokenizers[index]
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_clip_skip_takes_the_penultimate_layer_through_the_final_layer_norm(sd15):
    captions = ["a photo of sks circle", ""]
    encoder = sd15.text_encoders[0]
    with torch.no_grad():
        default, _ = encode_text(sd15, captions, "cpu")
        skipped, _ = encode_text(sd15, captions, "cpu", clip_skip=2)
        # Independently: run the layers by hand and apply the final layer norm, as A1111 does.
        model = getattr(encoder, "text_model", encoder)
        outputs = encoder(token_ids(sd15, captions), output_hidden_states=True)
        expected_last = model.final_layer_norm(outputs.hidden_states[-1])
        expected_penultimate = model.final_layer_norm(outputs.hidden_states[-2])
    torch.testing.assert_close(default, expected_last)
    torch.testing.assert_close(skipped, expected_penultimate)
    assert not torch.allclose(default, skipped)


def test_sdxl_clip_skip_counts_back_from_the_penultimate_layer(sdxl):
    with torch.no_grad():
        default, pooled = encode_text(sdxl, ["sks"], "cpu")
        skipped, _ = encode_text(sdxl, ["sks"], "cpu", clip_skip=2)
        first = sdxl.text_encoders[0](token_ids(sdxl, ["sks"]), output_hidden_states=True).hidden_states
        second = sdxl.text_encoders[1](token_ids(sdxl, ["sks"], 1), output_hidden_states=True).hidden_states
    torch.testing.assert_close(default, torch.cat([first[-2], second[-2]], dim=-1))
    torch.testing.assert_close(skipped, torch.cat([first[-3], second[-3]], dim=-1))
    assert default.shape[-1] == 32 + 48 and pooled.shape == (1, 32)


def test_an_empty_caption_is_encoded_as_each_pipeline_encodes_an_empty_prompt(sd15, sdxl):
    from diffusers import StableDiffusionXLPipeline

    from pipeline.presets import preset_dir

    with torch.no_grad():
        states, pooled = encode_text(sdxl, ["sks circle", ""], "cpu")
        # SDXL's pipeline gives zeros for no negative prompt (force_zeros_for_empty_prompt): the unconditional input.
        pipeline = StableDiffusionXLPipeline.from_pretrained(preset_dir("tiny-sdxl"))
        _, negative, _, negative_pooled = pipeline.encode_prompt("sks circle", negative_prompt=None, do_classifier_free_guidance=True)
        sd_states, _ = encode_text(sd15, [""], "cpu")
    torch.testing.assert_close(states[1:], negative)
    torch.testing.assert_close(pooled[1:], negative_pooled)
    assert states[1].abs().sum() == 0 and states[0].abs().sum() > 0
    # SD 1.x encodes the empty prompt's tokens (BOS, EOS, padding), as its pipeline does for "".
    assert sd_states.abs().sum() > 0


def test_embedding_perturbation_has_std_gamma_over_root_d(sd15):
    captions = ["sks"] * 64
    with torch.no_grad():
        clean, _ = encode_text(sd15, captions, "cpu")
        noisy, _ = encode_text(sd15, captions, "cpu", perturbation=0.5, generator=torch.Generator().manual_seed(0))
        again, _ = encode_text(sd15, captions, "cpu", perturbation=0.5, generator=torch.Generator().manual_seed(0))
    delta = noisy - clean
    expected = 0.5 / clean.shape[-1] ** 0.5
    assert delta.std().item() == pytest.approx(expected, rel=0.02)  # 64 x 77 x 32 draws
    assert abs(delta.mean().item()) < 3 * expected / delta.numel() ** 0.5
    torch.testing.assert_close(noisy, again)  # seeded by the step's generator: resumable


def test_cond_dropout_default_and_kohya_alias():
    assert validate_params({}).train.cond_dropout == 0.04
    assert validate_params({"train": {"caption_dropout_rate": 0.1}}).train.cond_dropout == 0.1
    assert validate_params({"train": {"clip_skip": 2}}).train.clip_skip == 2


def test_attention_types():
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    from pipeline.errors import KilnError
    from pipeline.sd import set_attention

    unet = load_components("tiny-sd15").unet.eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)

    def output():
        with torch.no_grad():
            return unet(latents, torch.tensor([10, 900]), encoder_hidden_states=states).sample

    set_attention(unet, "sdp")
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    fused = output()
    set_attention(unet, "slice")
    # Sliced attention: every attention computes in slices, and the result is the same attention.
    assert all(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(output(), fused, atol=1e-5, rtol=1e-4)
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(KilnError, match="train.attn_type: xformers is not installed"):
            set_attention(unet, "xformers")


def test_the_model_version_is_told_from_the_text_encoder():
    from types import SimpleNamespace

    from pipeline.sd import model_version

    def encoder(width):
        return SimpleNamespace(config=SimpleNamespace(hidden_size=width))

    assert model_version("sd", [encoder(768)]) == "sd1"
    assert model_version("sd", [encoder(1024)]) == "sd2"  # OpenCLIP ViT-H: kohya's ss_v2
    assert model_version("sdxl", [encoder(768), encoder(1280)]) == "sdxl"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_text_embedding_cache_gives_what_encoding_gives(family, request):
    from pipeline.sd import TextEmbeddingCache

    components = request.getfixturevalue(family)
    captions = ["a photo of sks circle", "", "a red square, blue", "a photo of sks circle"]
    cache = TextEmbeddingCache(components, "cpu", clip_skip=2, batch_size=2)
    assert cache.warm(captions[:2]) == 2 and cache.warm(captions) == 1  # each text encoded once
    with torch.no_grad():
        expected_states, expected_pooled = encode_text(components, captions, "cpu", clip_skip=2)
    states, pooled = cache(captions)
    torch.testing.assert_close(states, expected_states)
    if family == "sdxl":
        torch.testing.assert_close(pooled, expected_pooled)
        assert not states[1].any() and not pooled[1].any()  # SDXL's empty prompt: zeros, as encoding gives
    else:
        assert pooled is None
    cache.reset(1)
    assert cache.rows == {} and cache.clip_skip == 1


def test_caching_text_encoder_outputs_is_refused_when_the_encoder_trains():
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError, match=r"train.cache_text_encoder_outputs: the text encoder trains in this run"):
        validate_params({"train": {"cache_text_encoder_outputs": True, "network_train_text_encoder": True}})
    # A full fine-tune's switch is train_text_encoder; network_train_text_encoder is a LoRA's.
    assert validate_params({"train": {"cache_text_encoder_outputs": True, "mode": "full", "network_train_text_encoder": True}})


def test_caching_text_encoder_outputs_is_refused_with_shuffled_or_dropped_tags():
    from pipeline.errors import ParamsError

    for key, value in (("shuffle_tags", True), ("caption_tag_dropout_rate", 0.1)):
        with pytest.raises(ParamsError, match=r"train.cache_text_encoder_outputs: shuffle_tags and caption_tag_dropout_rate"):
            validate_params({"train": {"cache_text_encoder_outputs": True, key: value}})
