from __future__ import annotations

from pathlib import Path

import pytest

from symeq_dist.config import ConfigError, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo_mnist_mlp", "debug_cpu", "mnist_ladder", "mnist_reverse", "fmnist_ladder"])
def test_shipped_configs_load_and_round_trip(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert "train:" in dump_config(cfg)


def test_paper_settings_in_reference_configs() -> None:
    cfg = load_config(ROOT / "configs" / "fmnist_ladder.yaml")
    assert (cfg.model.num_z0, cfg.model.num_z1, cfg.model.trunk_width) == (50, 200, 1000)
    assert cfg.train.batch_size == 1024 and cfg.engines.encoder.lr == 1e-4
    assert cfg.data.binarize_threshold is None and cfg.data.noise == "gaussian"


def test_dotted_overrides_take_precedence() -> None:
    cfg = load_config(ROOT / "configs" / "mnist_ladder.yaml",
                      ["train.steps=200", "engines.decoder.lr=2e-4", "engines.encoder.betas=[0.5, 0.9]"])
    assert cfg.train.steps == 200
    assert cfg.engines.decoder.lr == 2e-4 and cfg.engines.encoder.lr == 1e-4
    assert cfg.engines.encoder.betas == (0.5, 0.9)


@pytest.mark.parametrize("override, expected", [
    ("train.stpes=200", "train.stpes: unknown key; did you mean 'train.steps'"),
    ("trian.steps=200", "trian: unknown key; did you mean 'train'"),
    ("engines.decoder.learning_rate=1e-3", "engines.decoder.learning_rate: unknown key"),
    ("train.steps=many", "train.steps: expected an integer"),
    ("engines.decoder.lr=-1", "engines.decoder.lr: must be > 0"),
    ("game.schedule=jacobi", "game.schedule: invalid value 'jacobi'; choose one of alternating, simultaneous"),
    ("model.kind=vdvae", "model.kind: invalid value 'vdvae'"),
    ("data.noise_level=0.9", "data.noise_level: a flip probability must be <= 0.5"),
    ("engines.encoder.zero_stage=4", "engines.encoder.zero_stage: must be 0, 1, 2, 3 or null"),
    ("train", "expected key=value"),
    ("model.x_offset=data_marginal model.x_dist=gaussian", "model.x_offset: data_marginal is the logit of a binary"),
    ("model.init_gain=1", "model.init_gain: unknown key for model.kind=mlp"),
])
def test_typos_and_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "debug_cpu.yaml", override.split(" "))
    assert expected in str(err.value)


def test_micro_batch_must_divide() -> None:
    cfg = load_config(None, ["train.batch_size=30", "train.grad_accumulation=2"])
    assert cfg.micro_batch_size(1) == 15
    with pytest.raises(ConfigError, match=r"not divisible by world size 2 x train\.grad_accumulation 2"):
        cfg.micro_batch_size(2)


def test_missing_config_file_names_configs_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_unknown_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="trainer: unknown key; did you mean 'train'"):
        load_config(path)


def test_config_is_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.train.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["ds_config_gpu_multinode.json", "ds_config_gpu_offload.json"])
def test_shipped_gpu_ds_configs_pass_our_checks(name: str) -> None:
    """The worked GPU configs (docs) hold no run numbers and are valid engine configs."""
    from symeq_dist.config import EngineConfig
    from symeq_dist.runtime.engines import engine_config, load_ds_config

    base = load_ds_config(ROOT / "configs" / name)
    assert base["bf16"]["enabled"] and base["gradient_clipping"] == 0.0
    cfg = engine_config(base, EngineConfig(lr=2e-4, zero_stage=1), micro_batch=16, grad_accumulation=2,
                        world_size=16)
    assert cfg["train_batch_size"] == 512 and cfg["zero_optimization"]["stage"] == 1
