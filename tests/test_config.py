import importlib.util
import os
import subprocess
import sys

import pytest

from otprune.prune_config import PruneConfig, check_runnable_here, config_from_env


def test_unset_and_orig_mean_no_pruning():
    assert not config_from_env({}).enabled
    assert not config_from_env({"BASELINE": "orig"}).enabled
    assert not config_from_env({"BASELINE": ""}).enabled
    # The reference scripts set a ratio and K on every run, the unpruned one too.
    assert not config_from_env({"BASELINE": "ORIG", "SUBSET_RATIO": "0.098", "LAYER_INDEX": "2"}).enabled


def test_full_setting_is_read_case_insensitively():
    config = config_from_env({"BASELINE": "ours", "SUBSET_RATIO": "0.098", "LAYER_INDEX": "3", "OTPRUNE_GAMMA": "0.5", "OTPRUNE_LOG": "1"})
    assert config == PruneConfig("OURS", 0.098, 3, {"gamma": 0.5}, log=True)


def test_defaults_and_method_specific_options():
    assert config_from_env({"BASELINE": "FASTV", "SUBSET_RATIO": "0.25"}).layer_index == 2
    assert config_from_env({"BASELINE": "VTW"}).layer_index == 4
    assert config_from_env({"BASELINE": "VTW", "LAYER_INDEX": "2"}).ratio is None
    # K = 0 withdraws every visual token before the LLM: the no-image control.
    assert config_from_env({"BASELINE": "VTW", "LAYER_INDEX": "0"}) == PruneConfig("VTW", None, 0)
    assert config_from_env({"BASELINE": "RANDOM", "SUBSET_RATIO": "0.1", "OTPRUNE_SEED": "4"}).options == {"seed": 4}


@pytest.mark.parametrize(
    "env,message",
    [
        ({"BASELINE": "OTPRUNE"}, r"BASELINE='OTPRUNE' is not a method; allowed: ORIG, OURS"),
        ({"BASELINE": "OURS"}, r"BASELINE=OURS needs SUBSET_RATIO, a number in \(0, 1\]; it is not set"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0"}, r"SUBSET_RATIO=0.0 is not allowed; it must be a number in \(0, 1\]"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "1.5"}, r"SUBSET_RATIO=1.5 is not allowed"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "ten"}, r"SUBSET_RATIO='ten' is not allowed; it must be a number"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "nan"}, r"SUBSET_RATIO='nan' is not allowed; it must be a finite number"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "LAYER_INDEX": "-1"}, r"LAYER_INDEX=-1 is not allowed; it must be an integer >= 0"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "LAYER_INDEX": "two"}, r"LAYER_INDEX='two' is not allowed; it must be an integer"),
        ({"BASELINE": "FASTV", "SUBSET_RATIO": "0.1", "LAYER_INDEX": "0"}, r"LAYER_INDEX=0 is not allowed with BASELINE=FASTV"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "OTPRUNE_GAMMA": "0"}, r"OTPRUNE_GAMMA \(gamma\) must be a number in \[2.94e-39, 8.51e\+37\]"),
        (
            {"BASELINE": "RANDOM", "SUBSET_RATIO": "0.1", "OTPRUNE_SEED": str(2**64)},
            r"OTPRUNE_SEED \(seed\) must be an int in \[0, 2\*\*64 - 1\]; got 18446744073709551616",
        ),
        ({"BASELINE": "RANDOM", "SUBSET_RATIO": "0.1", "OTPRUNE_SEED": "-1"}, r"OTPRUNE_SEED \(seed\) must be an int in \[0, 2\*\*64 - 1\]; got -1"),
        ({"BASELINE": "STP", "SUBSET_RATIO": "0.1", "OTPRUNE_STP_ALPHA": "2"}, r"OTPRUNE_STP_ALPHA \(alpha\) must be a number in \[0, 1\]"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "OTPRUNE_GAMA": "1"}, r"unknown variable\(s\) OTPRUNE_GAMA"),
        # An option variable of a method that has no such option is refused, as OTPRUNE_OPTIONS is.
        (
            {"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.1", "OTPRUNE_GAMMA": "0.5"},
            r"OTPRUNE_GAMMA='0.5' does not apply to BASELINE=DIVPRUNE: it takes no option 'gamma' \(its options: none\)",
        ),
        (
            {"BASELINE": "CDPRUNER", "SUBSET_RATIO": "0.1", "OTPRUNE_SEED": "3"},
            r"OTPRUNE_SEED='3' does not apply to BASELINE=CDPRUNER: it takes no option 'seed'",
        ),
        ({"BASELINE": "DIVPRUNE", "SUBSET_RATIO": "0.1", "OTPRUNE_OPTIONS": '{"gamma": 0.5}'}, r"option\(s\) gamma do not apply to BASELINE=DIVPRUNE"),
        # No pruning still checks what is set.
        ({"BASELINE": "ORIG", "SUBSET_RATIO": "1.5"}, r"SUBSET_RATIO=1.5 is not allowed; it must be a number in \(0, 1\]"),
        ({"SUBSET_RATIO": "ten"}, r"SUBSET_RATIO='ten' is not allowed; it must be a number"),
        ({"BASELINE": "ORIG", "LAYER_INDEX": "-2"}, r"LAYER_INDEX=-2 is not allowed"),
        ({"BASELINE": "ORIG", "OTPRUNE_GAMMA": "0.5"}, r"OTPRUNE_GAMMA='0.5' does not apply to BASELINE=ORIG"),
        ({"BASELINE": "ORIG", "OTPRUNE_OPTIONS": '{"gamma": 0.5}'}, r"OTPRUNE_OPTIONS sets gamma, which BASELINE=ORIG does not take"),
        ({"BASELINE": "ORIG", "OTPRUNE_GAMA": "1"}, r"unknown variable\(s\) OTPRUNE_GAMA"),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "OTPRUNE_LOG": "yes"}, r"OTPRUNE_LOG='yes' is not allowed; use 1 \(on\) or 0"),
        (
            {"BASELINE": "DPP", "SUBSET_RATIO": "0.1", "OTPRUNE_GREEDY": "fast"},
            r"OTPRUNE_GREEDY='fast' is not allowed: greedy path must be one of host, batched, triton",
        ),
    ],
)
def test_bad_values_name_the_variable_and_what_is_allowed(env, message):
    with pytest.raises(ValueError, match=message):
        config_from_env(env)


def test_explicit_config_checks_options():
    with pytest.raises(ValueError, match="option\\(s\\) alpha do not apply to BASELINE=OURS; it takes: gamma, greedy"):
        PruneConfig("OURS", 0.1, options={"alpha": 0.3})
    assert config_from_env({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "OTPRUNE_GREEDY": "Batched"}).options == {"greedy": "batched"}
    with pytest.raises(ValueError, match="option\\(s\\) gamma do not apply to BASELINE=VTW; it takes: none"):
        PruneConfig("VTW", None, 1, options={"gamma": 1.0})


def test_triton_greedy_is_refused_where_triton_cannot_run(monkeypatch):
    import otprune.prune_config as config_module

    config = config_from_env({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "OTPRUNE_GREEDY": "triton"})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(config_module, "_cuda_available", lambda: False)
    with pytest.raises(ValueError, match=r"OTPRUNE_GREEDY='triton' is not allowed here: Triton kernels need a CUDA GPU"):
        check_runnable_here(config)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_runnable_here(config)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(config_module, "_cuda_available", lambda: True)
    check_runnable_here(config)


def test_dump_folder_must_be_writable(tmp_path):
    a_file = tmp_path / "tokens.pt"
    a_file.write_bytes(b"")
    for folder in (a_file, a_file / "dump"):
        config = config_from_env({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "OTPRUNE_DUMP": str(folder)})
        with pytest.raises(ValueError, match=rf"OTPRUNE_DUMP='{folder}' is not allowed: {a_file} is not a folder"):
            check_runnable_here(config)
    for folder in (tmp_path, tmp_path / "new" / "dump"):
        check_runnable_here(config_from_env({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "OTPRUNE_DUMP": str(folder)}))
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_transformers_outside_the_tested_range_is_refused():
    from otprune.patches.hf import SUPPORTED_TRANSFORMERS, check_transformers_version

    assert SUPPORTED_TRANSFORMERS == ("5.17", "6")
    for version in ("5.17.0", "5.23.0", "5.99.1.dev0"):
        check_transformers_version(version)
    for version in ("4.57.1", "5.16.0", "6.0.0"):
        with pytest.raises(ValueError, match=rf"transformers {version} is not supported by otprune's patch; it needs transformers >= 5.17, < 6"):
            check_transformers_version(version)


needs_lmms_eval = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None or importlib.util.find_spec("llava") is None,
    reason="needs lmms-eval and llava-torch",
)
CHECK_PATCHED = (
    "import lmms_eval.models\n"
    "from llava.model.llava_arch import LlavaMetaForCausalLM as M\n"
    "print('patched' if hasattr(M.prepare_inputs_labels_for_multimodal, 'otprune_original') else 'unpatched')\n"
)


def run_lmms_eval_start_up(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("BASELINE", "SUBSET_RATIO", "LAYER_INDEX")}
    return subprocess.run([sys.executable, "-c", CHECK_PATCHED], env={**clean, **env}, capture_output=True, text=True, timeout=300)


@needs_lmms_eval
def test_lmms_eval_start_up_activates_through_the_entry_point():
    on = run_lmms_eval_start_up(BASELINE="OURS", SUBSET_RATIO="0.098")
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip().endswith("patched") and "unpatched" not in on.stdout
    off = run_lmms_eval_start_up()
    assert off.stdout.strip().endswith("unpatched"), off.stderr


@needs_lmms_eval
def test_lmms_eval_start_up_fails_on_a_bad_value():
    bad = run_lmms_eval_start_up(BASELINE="OURS", SUBSET_RATIO="2")
    assert bad.returncode != 0
    assert "otprune: SUBSET_RATIO=2.0 is not allowed; it must be a number in (0, 1]" in bad.stderr


@needs_lmms_eval
def test_lmms_eval_start_up_fails_on_an_unwritable_dump_folder(tmp_path):
    a_file = tmp_path / "not_a_folder"
    a_file.write_bytes(b"")
    bad = run_lmms_eval_start_up(BASELINE="OURS", SUBSET_RATIO="0.098", OTPRUNE_DUMP=str(a_file))
    assert bad.returncode != 0
    assert f"otprune: OTPRUNE_DUMP='{a_file}' is not allowed: {a_file} is not a folder" in bad.stderr
