import pytest

from common.config import ANY, OPEN, Field, load_config, parse_overrides, save_config, read_yaml
from common.errors import ConfigError

SCHEMA = {
    "arch": {
        "n_embed": Field(int),
        "code_shape": Field(list, items=int),
        "decay": Field(float, 0.99),
        "bottleneck_type": Field(str, "rq", choices=("rq",)),
    },
    "optimizer": {"init_lr": Field(float), "betas": Field(list, [0.9, 0.95], items=float)},
    "runtime": ANY,
    "extras": dict(OPEN),
}


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_valid_config_fills_defaults_and_attribute_access(tmp_path):
    path = write(tmp_path, "arch: {n_embed: 16, code_shape: [8, 8, 4]}\noptimizer: {init_lr: 1e-4}\n")
    cfg = load_config(path, SCHEMA)
    assert cfg.arch.n_embed == 16 and cfg.arch.decay == 0.99
    assert cfg.optimizer.init_lr == pytest.approx(1e-4)  # '1e-4' is a string in YAML 1.1, coerced
    assert cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.to_dict()["arch"]["code_shape"] == [8, 8, 4]


def test_overrides_apply_with_yaml_types(tmp_path):
    path = write(tmp_path, "arch: {n_embed: 16, code_shape: [8, 8, 4]}\noptimizer: {init_lr: 1e-4}\n")
    cfg = load_config(path, SCHEMA, ["optimizer.init_lr=2e-4", "arch.n_embed=32", "arch.code_shape=[4,4,2]",
                                     "arch.decay=0.5"])
    assert cfg.optimizer.init_lr == pytest.approx(2e-4)
    assert cfg.arch.n_embed == 32 and cfg.arch.code_shape == [4, 4, 2] and cfg.arch.decay == 0.5


@pytest.mark.parametrize("text, message", [
    ("arch: {n_embed: 16, code_shape: [8], foo: 1}\noptimizer: {init_lr: 1}\n", "unknown key 'arch.foo'"),
    ("arch: {n_embed: abc, code_shape: [8]}\noptimizer: {init_lr: 1}\n", "arch.n_embed must be an int, got 'abc'"),
    ("arch: {code_shape: [8]}\noptimizer: {init_lr: 1}\n", "missing required key 'arch.n_embed'"),
    ("arch: {n_embed: 3, code_shape: [8, x]}\noptimizer: {init_lr: 1}\n", "arch.code_shape[1] must be an int"),
    ("arch: {n_embed: 3, code_shape: [8], bottleneck_type: vq}\noptimizer: {init_lr: 1}\n", "must be one of rq"),
    ("arch: {n_embed: 3, code_shape: [8]}\noptimizer: {init_lr: fast}\n", "optimizer.init_lr must be a number"),
])
def test_bad_configs_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, SCHEMA)
    assert message in str(info.value) and path in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_override_key_is_refused(tmp_path):
    path = write(tmp_path, "arch: {n_embed: 16, code_shape: [8]}\noptimizer: {init_lr: 1}\n")
    with pytest.raises(ConfigError, match="unknown override key 'optimizer.lr'"):
        load_config(path, SCHEMA, ["optimizer.lr=3"])
    with pytest.raises(ConfigError, match="key.subkey=value"):
        parse_overrides(["optimizer.init_lr"])


def test_open_sections_and_any_keep_extra_keys(tmp_path):
    path = write(tmp_path, "arch: {n_embed: 16, code_shape: [8]}\noptimizer: {init_lr: 1}\n"
                           "runtime: {args: {seed: 3}}\nextras: {whatever: [1, 2]}\n")
    cfg = load_config(path, SCHEMA, ["extras.more=5"])
    assert cfg.runtime.args.seed == 3 and cfg.extras.whatever == [1, 2] and cfg.extras.more == 5


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"), SCHEMA)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "arch: [1, 2\n"), SCHEMA)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"), SCHEMA)


def test_folders_text_in_another_encoding_and_unknown_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        read_yaml(str(tmp_path))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("arch: {n_embed: 16}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not a text file"):
        read_yaml(str(latin1))
    with pytest.raises(ConfigError, match="--lr: unknown option"):
        parse_overrides(["arch.n_embed=8", "--lr=3"])


def test_counts_and_sizes_below_their_minimum_are_refused(tmp_path):
    schema = {"batch_size": Field(int, 8, minimum=1), "shape": Field(list, [1], items=int, minimum=1),
              "workers": Field(int, None, minimum=0)}
    path = write(tmp_path, "workers: 0\n")
    assert load_config(path, schema) == {"batch_size": 8, "shape": [1], "workers": 0}
    with pytest.raises(ConfigError, match="batch_size must be at least 1, got 0"):
        load_config(path, schema, ["batch_size=0"])
    with pytest.raises(ConfigError, match="shape must be at least 1, got -4"):
        load_config(path, schema, ["shape=[8,-4]"])
    with pytest.raises(ConfigError, match="workers must be at least 0, got -1"):
        load_config(path, schema, ["workers=-1"])


def test_save_config_round_trips(tmp_path):
    path = write(tmp_path, "arch: {n_embed: 16, code_shape: [8]}\noptimizer: {init_lr: 1}\n")
    cfg = load_config(path, SCHEMA)
    out = str(tmp_path / "saved.yaml")
    save_config(cfg, out)
    assert read_yaml(out) == cfg.to_dict()


def test_grad_accm_steps_is_the_accumulation_of_priors_and_refused_for_tokenizers(tmp_path, capsys):
    from common.config import Config
    from common.prior_task import accumulation_steps
    import main_stage1
    from tests.helpers import refused_in_process

    def config(batch, total=None, accm=1):
        return Config({"experiment": {"batch_size": batch, "total_batch_size": total},
                       "optimizer": {"grad_accm_steps": accm}})

    assert accumulation_steps(config(8), world_size=2) == 1
    assert accumulation_steps(config(8, accm=4), world_size=2) == 4  # the official RQ-VAE key
    assert accumulation_steps(config(8, total=64), world_size=2) == 4
    assert accumulation_steps(config(8, total=64, accm=4), world_size=2) == 4  # both, and they agree
    with pytest.raises(ConfigError, match="total_batch_size 64 and optimizer.grad_accm_steps 2 disagree"):
        accumulation_steps(config(8, total=64, accm=2), world_size=2)
    line = refused_in_process(capsys, main_stage1.main, ["-m", "configs/shapes/stage1/rqvae.yaml", "-r", str(tmp_path),
                                                         "optimizer.grad_accm_steps=2"])
    assert "optimizer.grad_accm_steps: tokenizers take one optimizer step per batch" in line
