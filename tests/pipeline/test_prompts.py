"""Prompt files: kohya's .txt/.json/.toml, EveryDream2's .txt/.json and .yaml lists, each as its tool
documents it, and every bad input as one line naming the file and the line or entry."""

import pytest

from pipeline.errors import KilnError
from pipeline.params import SamplePrompt
from pipeline.prompts import FilePrompt, load_sample_prompts


def load(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    return load_sample_prompts(name, tmp_path)


def error(tmp_path, name, text):
    with pytest.raises(KilnError) as caught:
        load(tmp_path, name, text)
    return str(caught.value)


def test_a_list_passes_through():
    prompts = [SamplePrompt(prompt="a", seed=2)]
    loaded = load_sample_prompts(prompts)
    assert loaded.prompts == prompts and loaded.every_n_steps is None


def test_kohya_txt_reads_every_option(tmp_path):
    # kohya's docs: `masterpiece, 1girl --n low quality --w 768 --h 512 --d 1 --l 7.5 --s 28`, and --ss.
    loaded = load(tmp_path, "prompts.txt", "a sks dog, best quality --n low quality, blurry --w 768 --h 512 --d 42 --l 5.5 --s 28 --ss k_euler_a\n")
    assert loaded.prompts == [
        FilePrompt(prompt="a sks dog, best quality", negative_prompt="low quality, blurry", width=768, height=512, seed=42, cfg=5.5, steps=28, sampler="euler_a")
    ]


def test_kohya_txt_skips_comments_and_blank_lines_and_reads_options_in_any_case(tmp_path):
    text = "# samples for the sks run\r\n\r\na sks cat --W 256 --D 7\r\n   \r\n  # indented comment\r\na dog\r\n"
    assert load(tmp_path, "prompts.txt", text).prompts == [
        FilePrompt(prompt="a sks cat", width=256, seed=7), FilePrompt(prompt="a dog"),
    ]


def test_everydream_txt_is_one_prompt_a_line_with_kilns_defaults(tmp_path):
    loaded = load(tmp_path, "sample_prompts.txt", "a photo of ted bennet\nted bennet riding a bicycle\n")
    assert loaded.prompts == [FilePrompt(prompt="a photo of ted bennet"), FilePrompt(prompt="ted bennet riding a bicycle")]
    assert loaded.prompts[0].seed == 0 and loaded.prompts[0].steps == 20 and loaded.prompts[0].sampler is None


def test_kohya_json_reads_lines_and_mappings(tmp_path):
    text = '["a cat --w 256 --d 3", {"prompt": "a dog", "negative_prompt": "ugly", "width": 320, "height": 256, "seed": 5, "sample_steps": 12, "scale": 4.5, "sample_sampler": "ddim"}]'
    assert load(tmp_path, "prompts.json", text).prompts == [
        FilePrompt(prompt="a cat", width=256, seed=3),
        FilePrompt(prompt="a dog", negative_prompt="ugly", width=320, height=256, seed=5, steps=12, cfg=4.5, sampler="ddim"),
    ]


def test_kohya_toml_takes_the_prompt_tables_keys_as_defaults(tmp_path):
    text = (
        '[prompt]\nnegative_prompt = "lowres"\nwidth = 512\nheight = 512\nscale = 7.5\nsample_steps = 28\n\n'
        '[[prompt.subset]]\nprompt = "a sks cat"\nseed = 1\n\n[[prompt.subset]]\nprompt = "a sks dog"\nwidth = 768\nsample_sampler = "dpmsolver++"\n'
    )
    assert load(tmp_path, "prompts.toml", text).prompts == [
        FilePrompt(prompt="a sks cat", negative_prompt="lowres", seed=1, cfg=7.5, steps=28),
        FilePrompt(prompt="a sks dog", negative_prompt="lowres", width=768, cfg=7.5, steps=28, sampler="dpmsolver++"),
    ]


def test_everydream_json_draws_each_sample_at_each_cfg(tmp_path):
    # EveryDream2's shipped sample_prompts.json, with fixed prompts and seeds.
    text = """{
      "batch_size": 3, "seed": 555, "cfgs": [7, 4], "scheduler": "dpm++", "num_inference_steps": 15,
      "show_progress_bars": true, "generate_samples_every_n_steps": 200,
      "samples": [
        {"prompt": "ted bennet and a man sitting on a sofa", "negative_prompt": "distorted, deformed"},
        {"prompt": "a photograph of ted bennet riding a bicycle", "seed": 9, "cfgs": [1, 11], "size": [640, 384]}
      ]
    }"""
    loaded = load(tmp_path, "sample_prompts.json", text)
    sofa = {"prompt": "ted bennet and a man sitting on a sofa", "negative_prompt": "distorted, deformed", "seed": 555, "steps": 15, "sampler": "dpmsolver++"}
    bike = {"prompt": "a photograph of ted bennet riding a bicycle", "seed": 9, "steps": 15, "width": 640, "height": 384, "sampler": "dpmsolver++"}
    assert loaded.prompts == [FilePrompt(**sofa, cfg=7), FilePrompt(**sofa, cfg=4), FilePrompt(**bike, cfg=1), FilePrompt(**bike, cfg=11)]
    assert (loaded.every_n_steps, loaded.every_n_epochs) == (200, None)


def test_everydream_json_resolution_sets_every_size(tmp_path):
    loaded = load(tmp_path, "sample_prompts.json", '{"resolution": 768, "samples": [{"prompt": "a"}]}')
    assert loaded.prompts == [FilePrompt(prompt="a", width=768, height=768)]


def test_a_yaml_list_of_prompts(tmp_path):
    text = "- {prompt: a sks circle, seed: 1, steps: 4, width: 64, height: 64}\n- prompt: a square\n  sampler: euler_a\n"
    assert load(tmp_path, "prompts.yaml", text).prompts == [
        FilePrompt(prompt="a sks circle", seed=1, steps=4, width=64, height=64), FilePrompt(prompt="a square", sampler="euler_a"),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.txt", "a cat\na dog --w abc\n", "p.txt:2: --w: must be an integer (got 'abc')"),
        ("p.txt", "a dog --w 100\n", "p.txt:1: --w: Input should be a multiple of 8 (got 100)"),
        ("p.txt", "a dog --l much\n", "p.txt:1: --l: must be a number (got 'much')"),
        ("p.txt", "a dog --s 0\n", "p.txt:1: --s: Input should be greater than or equal to 1 (got 0)"),
        ("p.txt", "a dog --q 1\n", "p.txt:1: unknown option --q; use --n --w --h --d --l --s --ss"),
        ("p.txt", "a dog --cn pose.png\n", "p.txt:1: --cn (a ControlNet image) is not supported by Kiln's sampler"),
        ("p.txt", "a dog --n\n", "p.txt:1: --n needs a value"),
        ("p.txt", "a dog --w 64 --w 128\n", "p.txt:1: --w given twice"),
        ("p.txt", "a dog --ss k_dpmpp_sde\n", "p.txt:1: --ss: Input should be 'ddim', 'pndm', 'lms', 'euler', 'euler_a', 'heun', 'dpm_2', 'dpm_2_a', 'dpmsolver', 'dpmsolver++' or 'dpmsingle' (got 'k_dpmpp_sde')"),
        ("p.txt", "", "p.txt: no prompts in the file (it is empty, or holds only comments and blank lines)"),
        ("p.txt", "# only a comment\n\n", "p.txt: no prompts in the file (it is empty, or holds only comments and blank lines)"),
        ("p.json", '[\n  "a cat",\n  "a dog",\n]', "p.json:4:1: not valid JSON: Expecting value"),
        ("p.json", '[{"prompt": "a", "scale": 7, "cfg_scale": 5}]', "p.json: [0]: unknown key 'cfg_scale'; did you mean 'scale'?"),
        ("p.json", '[{"prompt": "a", "width": 70}]', "p.json: [0]: width: Input should be a multiple of 8 (got 70)"),
        ("p.json", '"a cat"', "p.json: must be a list of prompts (kohya) or a mapping with `samples` (EveryDream2), not str"),
        ("p.json", '{"samples": [{"prompt": "a"}, {"random_caption": true}]}',
         "p.json: samples[1]: random_caption draws a caption from the training data at random, which Kiln's sampler cannot; write a fixed prompt instead"),
        ("p.json", '{"samples": [{"prompt": "a", "seed": -1}]}',
         "p.json: samples[0]: seed -1 (a new random seed at every sampling) is not supported: a fixed seed keeps the grids comparable; give a number"),
        ("p.json", '{"samples": [{"prompt": "a", "size": [640, 380]}]}', "p.json: samples[0]: size: Input should be a multiple of 8 (got 380)"),
        ("p.json", '{"samples": [{"prompt": "a", "size": 640}]}', "p.json: samples[0]: size: must be [width, height] (got 640)"),
        ("p.json", '{"samples": [{"prompt": "a", "aspect_ratio": 1.5}]}', "p.json: samples[0]: aspect_ratio is not supported; give size: [width, height]"),
        ("p.json", '{"scheduler": "dpm++_2m_k", "samples": [{"prompt": "a"}]}',
         "p.json: scheduler: 'dpm++_2m_k' has no Kiln sampler; use one of ddim, pndm, lms, euler, euler_a, kdpm2, dpm++, dpm++_2m, dpm++_2s, or drop the key and set train.sample_sampler"),
        ("p.json", '{"generate_pretrain_samples": true, "samples": [{"prompt": "a"}]}',
         "p.json: generate_pretrain_samples: Kiln draws no samples before the first step; remove it or set it to false"),
        ("p.json", '{"generate_samples_every_n_steps": 0, "samples": [{"prompt": "a"}]}',
         "p.json: generate_samples_every_n_steps: must be a whole number of at least 1 (got 0)"),
        ("p.json", '{"cfg": [7], "samples": [{"prompt": "a"}]}', "p.json: unknown key 'cfg'; did you mean 'cfgs'?"),
        ("p.json", '{"samples": []}',
         "p.json: samples: no prompts (EveryDream2 then draws random training captions, which Kiln does not); list {\"prompt\": ...} entries"),
        ("p.toml", "[prompt]\nwidth = \n", "p.toml:2:9: not valid TOML: Invalid value"),
        ("p.toml", 'prompt = "a cat"\n', "p.toml: needs a [prompt] table and [[prompt.subset]] entries (kohya's prompt file)"),
        ("p.yaml", "- {prompt: a}\n- prompt: b\n  width: 65\n", "p.yaml:3: width: Input should be a multiple of 8 (got 65)"),
        ("p.yaml", "- {prompt: a}\n- {prompt: b, colour: red}\n", "p.yaml:2: unknown key 'colour'; valid keys: prompt, negative_prompt, seed, steps, cfg, width, height, sampler"),
        ("p.yaml", "- {seed: 1}\n", "p.yaml:1: prompt: missing"),
        ("p.yaml", "prompt: a\n", "p.yaml: must be a list of prompts, each a mapping such as {prompt: ..., seed: 1} (not dict)"),
        ("p.csv", "a,b\n", "p.csv: train.sample_prompts: not a prompt file (.csv); use .txt, .json, .toml, .yaml, .yml"),
    ],
)
def test_each_bad_input_is_one_line_naming_the_file_and_the_line_or_entry(tmp_path, name, text, message):
    assert error(tmp_path, name, text) == f"{tmp_path}/{message}"


def test_a_missing_file_and_text_that_is_not_utf8(tmp_path):
    with pytest.raises(KilnError) as caught:
        load_sample_prompts("prompts/samples.txt", tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}/prompts/samples.txt: sample prompt file not found (train.sample_prompts; a relative path is relative to the project folder)"
    )
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9\n".encode("latin-1"))
    with pytest.raises(KilnError) as caught:
        load_sample_prompts("latin1.txt", tmp_path)
    assert str(caught.value) == f"{tmp_path}/latin1.txt:1: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_an_absolute_path_ignores_the_root(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    assert load_sample_prompts(str(tmp_path / "p.txt"), tmp_path / "elsewhere").prompts == [FilePrompt(prompt="a cat")]
