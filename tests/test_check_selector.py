"""``otprune check-selector`` and its battery (``otprune.contract_check``): every built-in and
peer method passes, each faulty method of ``faulty_methods`` fails the checks it breaks, and the
command's exit status is 0 / 1 / 2."""

import json
import subprocess
import sys

import faulty_methods
import pytest
import torch
from conftest import ROOT

from otprune import check_selector, cli, contract_check
from otprune.contract_check import CHECKS, run_battery
from otprune.methods import get_method, load_function
from otprune.selectors import SELECTORS

PEERS = ("CDPRUNER", "POOL")


def statuses(results):
    assert [r.name for r in results] == list(CHECKS)
    return {r.name: r.status for r in results}


def failed(results):
    return {r.name for r in results if r.status == "fail"}


def battery(function_name, kind="selector", **kwargs):
    return run_battery(load_function(f"faulty_methods:{function_name}", kind), **kwargs)


@pytest.mark.parametrize("name", list(SELECTORS))
def test_every_built_in_selector_passes(name):
    results = run_battery(get_method(name))
    assert not failed(results), [r for r in results if r.status == "fail"]
    seen = statuses(results)
    assert seen["host-sync"] == "skip" or torch.cuda.is_available()
    # Built-ins take batches; TRIM asks for the prompt's text, so it is called image by image.
    assert seen["batch"] == ("skip" if name == "TRIM" else "pass")


@pytest.mark.parametrize("name", PEERS)
def test_the_peer_plugins_pass(name):
    method = get_method(name)
    assert method.kind == ("merger" if name == "POOL" else "selector")
    results = run_battery(method)
    assert not failed(results), [r for r in results if r.status == "fail"]


@pytest.mark.parametrize(
    "function, kind, expected",
    [
        ("select_unsorted", "selector", {"basic", "dtypes", "extreme-scales", "k-bounds", "determinism", "device", "no-grad"}),
        ("select_int32", "selector", {"basic", "dtypes", "extreme-scales", "k-bounds", "determinism", "device", "no-grad"}),
        ("select_short", "selector", {"basic", "dtypes", "extreme-scales", "k-bounds", "determinism", "device", "no-grad"}),
        ("select_accepts_nan", "selector", {"nan-refused"}),
        ("select_claims_batches", "selector", {"batch"}),
        ("select_via_numpy", "selector", {"no-grad"}),
        ("select_nan_crashes", "selector", {"nan-refused"}),
        ("select_nondeterministic", "selector", {"determinism"}),
        ("select_crashes_at_k_equals_n", "selector", {"k-bounds"}),
        ("merge_float32", "merger", {"dtypes"}),
        ("merge_keeps_grad", "merger", {"no-grad"}),
    ],
)
def test_a_faulty_method_fails_the_checks_it_breaks(function, kind, expected):
    results = battery(function, kind)
    assert failed(results) == expected, results


def test_fault_details_name_the_fault():
    details = {r.name: r.detail for r in battery("select_unsorted")}
    assert "not sorted ascending" in details["basic"]
    assert "float16: returned indices that are not sorted" in details["dtypes"]
    assert "dtype torch.int32" in {r.name: r.detail for r in battery("select_int32")}["basic"]
    assert "returned shape (15,), not (16,)" in {r.name: r.detail for r in battery("select_short")}["basic"]
    assert {r.name: r.detail for r in battery("select_accepts_nan")}["nan-refused"].startswith("accepted NaN")
    # NumPy refuses a tensor that requires grad: an exception named, not a crash of the battery.
    assert "RuntimeError" in {r.name: r.detail for r in battery("select_via_numpy")}["no-grad"]
    # A NaN refused by accident (not a ValueError or TypeError) fails, naming the exception.
    detail = {r.name: r.detail for r in battery("select_nan_crashes")}["nan-refused"]
    assert "raised RuntimeError" in detail and "with a ValueError" in detail
    assert "k = N = 64: raised RuntimeError" in {r.name: r.detail for r in battery("select_crashes_at_k_equals_n")}["k-bounds"]
    assert "(3, 64, 32) batch: returned shape (16,), not (3, 16)" in {r.name: r.detail for r in battery("select_claims_batches")}["batch"]


def test_good_functions_pass_and_get_the_context_they_ask_for():
    for function, kind in [("select_good", "selector"), ("select_good_batched", "selector"), ("merge_good", "merger"), ("select_with_context", "selector")]:
        results = battery(function, kind)
        assert not failed(results), (function, results)
    seen = statuses(battery("select_good"))
    assert seen["batch"] == "skip" and seen["host-sync"] == "skip"
    assert statuses(battery("select_good_batched"))["batch"] == "pass"
    assert "extreme-scales" in statuses(battery("merge_good"))


def test_required_options_must_be_given():
    method = load_function("faulty_methods:select_needs_option", "selector")
    with pytest.raises(ValueError, match="needs the option"):
        run_battery(method)
    with pytest.raises(ValueError, match="takes no option"):
        run_battery(method, options={"strength": 1, "other": 2})
    assert not failed(run_battery(method, options={"strength": 1}))


def test_layer_methods_have_nothing_to_check():
    with pytest.raises(ValueError, match="acts inside the LLM"):
        run_battery(get_method("FASTV"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cuda_without_cuda_skips_the_cuda_checks_and_runs_the_rest_on_the_cpu():
    results = run_battery(get_method("OURS"), device="cuda")
    seen = statuses(results)
    assert seen["device"] == "skip" and seen["host-sync"] == "skip"
    assert all("no CUDA" in r.detail for r in results if r.name in ("device", "host-sync"))
    assert seen["basic"] == "pass"


@pytest.mark.filterwarnings("ignore:called a synchronizing CUDA operation")
def test_host_sync_counts_the_sync_warnings(monkeypatch):
    """The counting of the CUDA check, on the CPU: a function warning as torch's sync debug mode does."""
    import warnings

    def syncs(times):
        def select(tokens, k):
            for _ in range(times):
                warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
            return faulty_methods.select_good(tokens, k)

        return select

    modes = []
    monkeypatch.setattr(contract_check, "_resolve_device", lambda device: (torch.device("cpu"), None))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    for times, status in [(0, "pass"), (1, "pass"), (3, "fail")]:
        monkeypatch.setattr(faulty_methods, "select_counted", syncs(times), raising=False)
        result = {r.name: r for r in battery("select_counted")}["host-sync"]
        assert result.status == status, result
        assert result.detail.startswith(f"{times} host synchronisation")
    assert modes[-2:] == ["warn", 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_built_ins_keep_their_host_sync_budget_on_cuda():
    for name in SELECTORS:
        results = run_battery(get_method(name), device="cuda")
        assert not failed(results), (name, results)
        assert statuses(results)["host-sync"] == "pass"


def test_command_exit_status(capsys):
    assert cli.main(["check-selector", "OURS"]) == 0
    out = capsys.readouterr().out
    assert "PASS  basic" in out and "SKIP  host-sync" in out and "0 failed" in out

    assert cli.main(["check-selector", "faulty_methods:select_unsorted"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  basic" in out and "not sorted ascending" in out

    assert cli.main(["check-selector", "faulty_methods:merge_good", "--merger", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "merger" and report["failed"] == 0
    assert [r["name"] for r in report["results"]] == list(CHECKS)

    assert check_selector.main(["faulty_methods:select_needs_option", "--options", '{"strength": 2}']) == 0
    capsys.readouterr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_the_command_on_cuda_without_cuda_exits_2_and_reports_no_cuda_result(capsys, json_flag):
    assert cli.main(["check-selector", "OURS", "--device", "cuda", *json_flag]) == 2
    captured = capsys.readouterr()
    assert "--device cuda is not allowed here: torch sees no CUDA GPU" in captured.err and '"device"' not in captured.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["FASTV"], "FASTV acts inside the LLM and has no standalone function"),
        (["VTW"], "VTW acts inside the LLM"),
        (["NOPE"], "is not a method"),
        (["ORIG"], "no pruning method"),
        (["no_such_module_xyz:select"], "cannot be loaded: ModuleNotFoundError"),
        (["faulty_methods:missing"], "cannot be loaded: AttributeError"),
        (["faulty_methods:bad_signature"], "bad signature"),
        (["faulty_methods:NOT_A_FUNCTION"], "not a function"),
        (["OURS", "--merger"], "OURS is a selector, not a merger"),
        (["faulty_methods:select_needs_option"], "needs the option(s) strength"),
        (["OURS", "--options", "{nope"], "--options is not JSON"),
        (["OURS", "--options", "[1]"], "must be a JSON object"),
    ],
)
def test_what_cannot_be_checked_exits_2_with_the_reason(capsys, argv, message):
    assert cli.main(["check-selector", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_the_command_runs_as_python_m_otprune():
    done = subprocess.run([sys.executable, "-m", "otprune", "check-selector", "OURS"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PASS  nan-refused" in done.stdout
    assert "check-selector" in subprocess.run([sys.executable, "-m", "otprune", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout


def test_a_schedule_is_checked_from_the_options_given_and_skipped_naming_what_it_lacks(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"kind": "otprune fitprune recipe", "visual_tokens": 576, "drops": [288, 144, 0, 0]}))
    assert cli.main(["check-selector", "FITPRUNE", "--options", json.dumps({"recipe": str(recipe)})]) == 0
    # 576 - 288 = 288 kept from layer 1 (0.5), 144 from layer 2 (0.25): by hand.
    assert "PASS  schedule        0.5 kept from layer 1, 0.25 kept from layer 2" in capsys.readouterr().out
    assert cli.main(["check-selector", "FITPRUNE"]) == 0
    assert (
        "SKIP  schedule        not made without its options (give them with --options): ValueError: FITPRUNE needs the option 'recipe'"
        in capsys.readouterr().out
    )
    assert cli.main(["check-selector", "FITPRUNE", "--options", json.dumps({"recipe": str(tmp_path / "none.json")})]) == 1
    assert "none.json' is not a file" in capsys.readouterr().out
