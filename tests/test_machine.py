"""`--precision auto`: the machine probe's decision rule, its per-machine cache, the training commands resolving
auto through it, and the routed experts following the chosen autocast dtype."""

import dataclasses
import json

import pytest
import torch

import nanoseek
from nanoseek import machine
from nanoseek.cli import main as cli_main
from nanoseek.machine import MachineProfile, machine_profile, resolve_precision


def profile(dense=(100.0, 100.0), grouped=(100.0, 100.0), attention_ms=(10.0, 10.0)) -> MachineProfile:
    return MachineProfile(cpu=machine.cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                          dense_fp32=dense[0], dense_bf16=dense[1], grouped_fp32=grouped[0], grouped_bf16=grouped[1],
                          attention_fp32_ms=attention_ms[0], attention_bf16_ms=attention_ms[1])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder; `cache(p)` stores profile p as this machine's measurement."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def store(p: MachineProfile) -> None:
        (tmp_path / "nanoseek").mkdir(exist_ok=True)
        key = machine.cache_key(p.cpu, p.threads, p.torch)
        (tmp_path / "nanoseek" / "machine.json").write_text(json.dumps({key: dataclasses.asdict(p)}))
    return store


def test_the_two_machine_kinds_of_the_issue_get_their_faster_precision():
    # an AMX-less Xeon: bf16 GEMMs at half the fp32 rate; an EPYC with AVX512-BF16: four times faster
    assert profile(dense=(386, 190), grouped=(300, 150)).precision == "float32"
    assert profile(dense=(183, 739), grouped=(150, 500)).precision == "bf16"
    # the AMX Xeon of benchmarks/README.md: experts no faster in bf16, the dense GEMMs 5x: the step's matmuls 1.9x
    amx = profile(dense=(201, 1094), grouped=(102, 100))
    assert amx.precision == "bf16" and amx.bf16_speedup == pytest.approx(1.94, abs=0.01)
    # the experts follow the choice: bf16 must pay for the step's matmuls as a whole
    assert profile(dense=(183, 739), grouped=(150, 30)).precision == "float32"


def test_auto_uses_the_cached_measurement_and_explicit_choices_win(cache):
    cache(profile(dense=(100, 400), grouped=(100, 300)))
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("float32", "cpu") == "float32" and resolve_precision("fp8", "cpu") == "fp8"
    cache(profile(dense=(400, 100), grouped=(300, 100)))
    assert resolve_precision("auto", "cpu") == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_a_missing_or_corrupted_cache_is_measured_again_and_rewritten(cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "probe", lambda: calls.append(1) or profile(dense=(1, 2), grouped=(1, 2)))
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    (tmp_path / "nanoseek").mkdir()
    (tmp_path / "nanoseek" / "machine.json").write_text("{not json")
    assert machine_profile().precision == "bf16" and len(calls) == 1
    assert machine_profile().dense_bf16 == 2 and len(calls) == 1          # now from the cache
    machine_profile(remeasure=True)
    assert len(calls) == 2


def test_probe_measures_positive_rates():
    p = machine.probe(seconds=0.05)
    assert p.cpu and p.threads >= 1
    assert min(p.dense_fp32, p.dense_bf16, p.grouped_fp32, p.grouped_bf16) > 0
    assert min(p.attention_fp32_ms, p.attention_bf16_ms) > 0


def test_info_machine_prints_the_rates_and_the_choice(cache, capsys):
    cache(profile(dense=(100, 400), grouped=(100, 300)))
    assert cli_main(["info", "--machine"]) in (0, None)
    out = capsys.readouterr().out
    assert "dense GEMM" in out and "bf16 4.00x" in out and "--precision auto: bf16" in out


def test_train_with_auto_takes_the_machine_choice_and_the_experts_follow_it(cache, tmp_path):
    from nanoseek.train import TrainConfig, Trainer
    cache(profile(dense=(100, 400), grouped=(100, 300)))
    cfg = TrainConfig(preset="tiny", corpus_docs=100, vocab_size=300, seq_len=16, batch_size=2, max_steps=1,
                      save_every=0, val_every=0, peak_gflops=1.0, precision="auto")
    trainer = Trainer(cfg, str(tmp_path / "run"), progress=False)
    assert trainer.precision == "bf16"
    seen = []
    experts = trainer.model.moe_layers()[0][1].experts
    experts.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    trainer.train_step()                                   # the step under autocast, then validation without
    assert seen[0] == (torch.bfloat16, torch.bfloat16) and seen[-1] == (torch.float32, torch.float32)


def test_bf16_training_runs_the_attention_core_in_fp32_where_the_probe_found_it_faster(cache, tmp_path, monkeypatch):
    import nanoseek.model.mla as mla
    from nanoseek.train import TrainConfig, Trainer
    cores = []
    sdpa = mla.F.scaled_dot_product_attention
    monkeypatch.setattr(mla.F, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: cores.append(q.dtype) or sdpa(q, *args, **kwargs))

    def run(precision: str, attention_ms: tuple[float, float]) -> tuple[list, list]:
        """The core's input dtypes in a training step's forward, and in a bf16 forward without grad."""
        cache(profile(dense=(100, 400), grouped=(100, 300), attention_ms=attention_ms))
        cfg = TrainConfig(preset="tiny", corpus_docs=100, vocab_size=300, seq_len=16, batch_size=2, max_steps=1,
                          save_every=0, val_every=0, peak_gflops=1.0, precision=precision, mtp_lambda=0.0,
                          model={"num_nextn_predict_layers": 0})
        trainer = Trainer(cfg, str(tmp_path / f"{precision}{attention_ms}"), progress=False)
        cores.clear()
        trainer.train_step()
        step = cores[:layers]
        cores.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            trainer.model(torch.ones(1, 4, dtype=torch.long))
        return step, list(cores)

    layers = nanoseek.ModelConfig.preset("tiny").num_hidden_layers
    fp32, bf16 = [torch.float32] * layers, [torch.bfloat16] * layers
    assert run("auto", (10.0, 20.0)) == (fp32, bf16)     # bf16's core 2x slower: fp32 in training only
    assert run("bf16", (10.0, 10.5)) == (bf16, bf16)     # within ATTENTION_MARGIN: it follows autocast
    assert run("float32", (10.0, 20.0)) == (fp32, bf16)  # no autocast to leave in the step
    assert machine.attention_core_dtype("bf16", "cuda") is None


def test_sft_config_accepts_auto():
    from nanoseek.rl.sft import SFTConfig
    assert SFTConfig(precision="auto").precision == "auto"
    with pytest.raises(nanoseek.ConfigError, match="precision"):
        SFTConfig(precision="half")


def test_a_probe_on_a_busy_machine_is_used_but_not_cached(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "probe", lambda: profile(dense=(1, 2), grouped=(1, 2)))
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    with pytest.warns(UserWarning, match="busy machine"):
        assert machine_profile().precision == "bf16"
    assert not (tmp_path / "nanoseek" / "machine.json").exists()


def test_commands_default_to_auto_while_config_files_and_flags_win(tmp_path):
    from nanoseek.rl.grpo import GRPOConfig
    from nanoseek.rl.pipeline import R1Config
    from nanoseek.rl.sft import SFTConfig
    from nanoseek.train import TrainConfig
    assert TrainConfig().precision == "float32"                       # the API keeps fp32: same numbers everywhere
    fp32_file = tmp_path / "fp32.json"
    fp32_file.write_text('{"precision": "float32"}')
    for cls in (TrainConfig, SFTConfig, GRPOConfig, R1Config):
        assert cls.load(None, defaults=machine.COMMAND_DEFAULTS).precision == "auto"
        assert cls.load(str(fp32_file), defaults=machine.COMMAND_DEFAULTS).precision == "float32"
        assert cls.load(str(fp32_file), defaults=machine.COMMAND_DEFAULTS, precision="bf16").precision == "bf16"


@pytest.mark.parametrize("command", ["train", "sft", "grpo", "r1"])
def test_every_training_command_passes_the_auto_default(command, monkeypatch, tmp_path):
    """Each command builds its config with COMMAND_DEFAULTS: stop it right there and read what it built."""
    from nanoseek.rl.grpo import GRPOConfig
    from nanoseek.rl.pipeline import R1Config
    from nanoseek.rl.sft import SFTConfig
    from nanoseek.train import TrainConfig
    built = []

    class Built(Exception):
        pass

    def stop_after(load):
        def spy(*args, **kwargs):
            built.append(load(*args, **kwargs))
            raise Built
        return spy

    for cls in (TrainConfig, SFTConfig, GRPOConfig, R1Config):
        monkeypatch.setattr(cls, "load", stop_after(cls.load))
    out = str(tmp_path / "out")
    argv = {"train": ["train", "--out", out], "sft": ["sft", "--init", out, "--data", out, "--out", out],
            "grpo": ["grpo", "--init", out, "--out", out], "r1": ["r1", "--out", out]}[command]
    with pytest.raises(Built):
        cli_main(argv)
    assert [cfg.precision for cfg in built] == ["auto"]


# ---- compiled rollouts: --compile auto ----------------------------------------------------------------------

def decode(eager_ms=20.0, compiled_ms=10.0, compile_s=60.0) -> machine.DecodeProfile:
    return machine.DecodeProfile(cpu=machine.cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                                 eager_ms=eager_ms, compiled_ms=compiled_ms, compile_s=compile_s)


def test_compiling_pays_only_when_faster_and_the_run_recoups_the_compile():
    fast = decode(20.0, 10.0, 60.0)                 # saves 10 ms per step: breaks even at 6,000 steps
    assert not fast.compile_pays(5_000) and fast.compile_pays(7_000)
    assert not decode(20.0, 18.0, 1.0).compile_pays(10**9)   # 1.11x: below COMPILE_MARGIN however long the run
    assert "6,001 decode steps" in fast.describe() and "never" in decode(20.0, 19.0).describe()


def test_auto_probes_only_for_long_cpu_runs_and_explicit_choices_win(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    probes = []
    monkeypatch.setattr(machine, "decode_probe", lambda: probes.append(1) or decode(20.0, 10.0, 60.0))
    resolve = machine.resolve_compile_rollouts
    assert resolve(True, "cpu", 10) is True and resolve(False, "cpu", 10**6) is False
    assert resolve("auto", "cpu", machine.MIN_DECODE_STEPS - 1) is False and not probes   # too short: no probe
    assert resolve("auto", "cuda", 10**6) is False and not probes                       # not measured there
    assert resolve("auto", "cpu", 5_000) is False and resolve("auto", "cpu", 7_000) is True
    assert probes == [1]                                    # measured once, then read from the cache
    key = machine.cache_key(machine.cpu_model(), torch.get_num_threads(), torch.__version__) + " | decode"
    assert json.loads((tmp_path / "nanoseek" / "machine.json").read_text())[key]["compile_s"] == 60.0


@pytest.mark.parametrize("flag,expected", [([], "auto"), (["--compile"], True), (["--compile", "off"], False)])
@pytest.mark.parametrize("command", ["grpo", "r1"])
def test_rollout_commands_default_to_compile_auto(command, flag, expected, monkeypatch, tmp_path):
    from nanoseek.rl.grpo import GRPOConfig
    from nanoseek.rl.pipeline import R1Config
    built = []

    class Built(Exception):
        pass

    for cls in (GRPOConfig, R1Config):
        def spy(*args, load=cls.load, **kwargs):
            built.append(load(*args, **kwargs))
            raise Built
        monkeypatch.setattr(cls, "load", spy)
    out = str(tmp_path / "out")
    with pytest.raises(Built):
        cli_main({"grpo": ["grpo", "--init", out, "--out", out], "r1": ["r1", "--out", out]}[command] + flag)
    assert built[0].compile_rollouts == expected
    with pytest.raises(nanoseek.ConfigError, match="compile_rollouts"):
        (GRPOConfig if command == "grpo" else R1Config)(compile_rollouts="maybe")


@pytest.mark.slow
def test_decode_probe_times_both_paths():
    p = machine.decode_probe()
    assert p.eager_ms > 0 and p.compiled_ms > 0 and p.compile_s > 0
