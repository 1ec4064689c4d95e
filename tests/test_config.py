"""Tests for npllm/config.py: presets, validation (one ValueError naming the bad value), --key=value parsing."""

import dataclasses

import pytest

from npllm.config import PRESETS, ModelConfig, TrainConfig, field_types, get_preset, parse_options, parse_value


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_config(name):
    cfg = get_preset(name)
    assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0
    assert cfg.head_dim == cfg.dim // cfg.n_heads


def test_the_two_small_presets_are_the_two_families():
    llama, gpt2 = get_preset("nano"), get_preset("nano-gpt2")
    assert (llama.norm, llama.mlp, llama.pos, llama.bias, llama.tie_embeddings) == (
        "rmsnorm", "swiglu", "rope", False, False)
    assert llama.n_kv_heads < llama.n_heads  # grouped-query attention
    assert (gpt2.norm, gpt2.mlp, gpt2.pos, gpt2.bias, gpt2.tie_embeddings) == (
        "layernorm", "gelu", "learned", True, True)


def test_overrides_replace_fields_and_configs_are_frozen():
    cfg = get_preset("nano", dim=64, n_layers=2)
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size) == (64, 2, PRESETS["nano"]["vocab_size"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 32


@pytest.mark.parametrize("overrides, message", [
    (dict(dim=130), r"dim=130 must be divisible by n_heads=4"),
    (dict(n_heads=4, n_kv_heads=3), r"n_heads=4 must be divisible by n_kv_heads=3"),
    (dict(dim=12, n_heads=4, n_kv_heads=2), r"RoPE needs an even head size, got dim/n_heads=3"),
    (dict(norm="batchnorm"), r"norm='batchnorm' is not allowed; choose one of: rmsnorm, layernorm"),
    (dict(mlp="tanh"), r"mlp='tanh' is not allowed; choose one of: swiglu, gelu"),
    (dict(pos="alibi"), r"pos='alibi' is not allowed; choose one of: rope, learned"),
    (dict(vocab_size=0), r"vocab_size=0 is not allowed; use a positive integer"),
    (dict(dim=-8), r"dim=-8 is not allowed; use a positive integer"),
    (dict(n_layers=0), r"n_layers=0 is not allowed; use a positive integer"),
    (dict(n_heads=0), r"n_heads=0 is not allowed; use a positive integer"),
    (dict(n_kv_heads=0), r"n_kv_heads=0 is not allowed; use a positive integer"),
    (dict(ffn_dim=0), r"ffn_dim=0 is not allowed; use a positive integer"),
    (dict(max_seq_len=0), r"max_seq_len=0 is not allowed; use a positive integer"),
    (dict(n_layers=2.0), r"n_layers=2.0 is not allowed; use a positive integer"),
    (dict(n_layers=True), r"n_layers=True is not allowed; use a positive integer"),
    (dict(norm_eps=0.0), r"norm_eps=0.0 is not allowed; use a finite number in \(0, inf\]"),
    (dict(rope_theta=-1.0), r"rope_theta=-1.0 is not allowed; use a finite number in \(0, inf\]"),
])
def test_each_broken_rule_raises_a_value_error_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_preset("nano", **overrides)


def test_odd_head_size_is_fine_without_rope():
    cfg = get_preset("nano", dim=12, n_heads=4, n_kv_heads=2, pos="learned")
    assert cfg.head_dim == 3


def test_unknown_preset_and_unknown_override_key():
    with pytest.raises(ValueError, match=r"unknown preset 'tiny'; choose one of: nano, nano-gpt2, gpt2-124m"):
        get_preset("tiny")
    with pytest.raises(ValueError, match=r"unknown model option 'n_embd'; allowed: .*dim"):
        get_preset("nano", n_embd=64)


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="n_heads=3"):
        ModelConfig(dim=12, n_heads=3, n_kv_heads=2)


@pytest.mark.parametrize("annotation, text, expected", [
    (int, "42", 42), ("int", "-3", -3), (float, "1e-5", 1e-5), ("float", "3", 3.0),
    (bool, "true", True), (bool, "Yes", True), ("bool", "1", True), (bool, "off", False), (bool, "0", False),
    (str, "rmsnorm", "rmsnorm"), ("int", "2e3", 2000), ("int", "1_000", 1000), (int, "-4.0", -4),
    ("int | None", "none", None), ("int | None", "7", 7), ("float | None", "NONE", None), ("float | None", "0.5", 0.5),
    ("str | None", "None", None), ("str | None", "data/x", "data/x"),
])
def test_parse_value(annotation, text, expected):
    # annotations arrive as strings (config.py uses `from __future__ import annotations`), or as plain types
    value = parse_value("key", annotation, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("annotation, text, message", [
    (int, "4.5", r"--dim='4.5' is not an integer"),
    (int, "", r"--dim= is empty; give a value or leave the option out"),
    ("str | None", "", r"--dim= is empty; give a value \(or none\) or leave the option out"),
    (int, "2.5e0", r"--dim='2.5e0' is not an integer"),
    (float, "fast", r"--dim='fast' is not a number"),
    (bool, "maybe", r"--dim='maybe' is not a boolean; use true or false"),
    ("int | None", "x", r"--dim='x' is not an integer"),
])
def test_parse_value_errors_name_the_option_and_the_text(annotation, text, message):
    with pytest.raises(ValueError, match=message):
        parse_value("dim", annotation, text)


def test_every_model_field_parses_from_its_own_text():
    types = field_types(ModelConfig)
    assert set(types) == {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = get_preset("nano-gpt2")
    parsed = {name: parse_value(name, types[name], str(getattr(cfg, name))) for name in types}
    assert ModelConfig(**parsed) == cfg


@pytest.mark.parametrize("overrides, message", [
    (dict(lr=-1.0), r"lr=-1.0 is not allowed; use a finite number in \[0, inf\]"),
    (dict(lr=float("nan")), r"lr=nan is not allowed"),
    (dict(min_lr=2e-3), r"min_lr=0.002 is not allowed; use a finite number in \[0, 0.001\]"),
    (dict(beta1=1.0), r"beta1=1.0 is not allowed; use a finite number in \[0, 1\)"),
    (dict(beta2=-0.1), r"beta2=-0.1 is not allowed"),
    (dict(eps=0.0), r"eps=0.0 is not allowed; use a finite number in \(0, inf\]"),
    (dict(weight_decay=-0.1), r"weight_decay=-0.1 is not allowed"),
    (dict(grad_clip=float("nan")), r"grad_clip=nan is not allowed"),
    (dict(grad_clip=float("inf")), r"grad_clip=inf is not allowed"),
    (dict(warmup_steps=-1), r"warmup_steps=-1 is not allowed; use an integer >= 0 or None"),
    (dict(warmup_steps=50, lr_decay_steps=10), r"warmup_steps=50 must be <= lr_decay_steps=10"),
    (dict(seed=-1), r"seed=-1 is not allowed; use an integer >= 0"),
    (dict(zero=2), r"zero=2 is not allowed; choose one of: 0, 1"),
    (dict(steps=1.5), r"steps=1.5 is not allowed; use a positive integer"),
    (dict(row_groups=0), r"row_groups=0 is not allowed; use a positive integer or None"),
    (dict(batch_size=8, micro_batches=4, row_groups=3),
     r"row_groups=3 is more than the 2 rows of a micro-batch \(batch_size / micro_batches\); use at most that many"),
])
def test_train_config_checks_every_hyperparameter_once_where_it_enters(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_parse_options_takes_both_spellings_and_suggests_the_nearest_name():
    model, train = parse_options(["--preset", "nano", "--steps", "2e3", "--dim=64", "--dry_run"], ModelConfig,
                                 TrainConfig)
    assert model == {"dim": 64} and train == {"preset": "nano", "steps": 2000, "dry_run": True}
    with pytest.raises(ValueError, match=r"unknown option --step; did you mean --steps"):
        parse_options(["--step=3"], ModelConfig, TrainConfig)
    assert parse_options(["--steps=3", "--steps", "4"], ModelConfig, TrainConfig)[1] == {"steps": 4}  # last wins
    with pytest.raises(ValueError, match=r"option --lr needs a value"):
        parse_options(["--lr", "--steps=3"], ModelConfig, TrainConfig)
    with pytest.raises(ValueError, match=r"unexpected argument 'nano'"):
        parse_options(["nano"], ModelConfig, TrainConfig)


def test_config_files_toml_and_yaml_with_command_line_overrides(tmp_path):
    (tmp_path / "run.toml").write_text('preset = "nano-gpt2"\n[train]\nsteps = 2e3\nlr = 3e-4\n[model]\ndim = 64\n')
    (tmp_path / "run.yaml").write_text("preset: nano-gpt2\nsteps: 2000\nlr: 3.0e-4\ndim: 64\nwarmup_steps: null\n")
    for name in ("run.toml", "run.yaml"):
        model, train = parse_options([f"--config={tmp_path / name}", "--lr", "1e-3"], ModelConfig, TrainConfig)
        assert model == {"dim": 64}
        assert {k: v for k, v in train.items() if k != "warmup_steps"} == {"preset": "nano-gpt2", "steps": 2000,
                                                                           "lr": 1e-3}
    (tmp_path / "typo.toml").write_text("stepz = 3\n")
    with pytest.raises(ValueError, match=r"typo.toml: unknown option 'stepz'; did you mean --steps"):
        parse_options([f"--config={tmp_path / 'typo.toml'}"], ModelConfig, TrainConfig)
    (tmp_path / "bad.toml").write_text('steps = "many"\n')
    with pytest.raises(ValueError, match=r"bad.toml: --steps='many' is not an integer"):
        parse_options([f"--config={tmp_path / 'bad.toml'}"], ModelConfig, TrainConfig)
    (tmp_path / "broken.toml").write_text("steps = = 3\n")
    with pytest.raises(ValueError, match=r"broken.toml: not valid TOML"):
        parse_options([f"--config={tmp_path / 'broken.toml'}"], ModelConfig, TrainConfig)
    with pytest.raises(ValueError, match=r"use a .toml, .yaml or .yml file"):
        parse_options([f"--config={tmp_path / 'x.ini'}"], ModelConfig, TrainConfig)


def test_a_written_config_file_reads_back_as_the_same_configs(tmp_path):
    from npllm.config import write_config_file

    cfg = get_preset("nano-gpt2", dim=64)
    tc = TrainConfig(preset="nano-gpt2", steps=7, lr=3e-4, data="some dir/with \"quotes\"", warmup_steps=0)
    write_config_file(tmp_path / "config.toml", cfg, tc)
    model, train = parse_options([f"--config={tmp_path / 'config.toml'}"], ModelConfig, TrainConfig)
    assert ModelConfig(**model) == cfg and TrainConfig(**train) == tc
