"""The method registry (``otprune.methods``) as a plugin's author and a user meet it: a package that
registers a selector or merger by entry point is listed, loaded and checked by name; a broken one is
refused by name before any model loads; its options are read and checked from the environment; and
what it returns while the model runs is checked against the contract (``otprune.selection``).

Plugins are faked without pip: a module and a ``<name>-<version>.dist-info`` folder in a folder put
on ``sys.path``, which ``importlib.metadata`` finds as an installed distribution.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import uuid

import pytest
import torch

from otprune.contract import CONTEXT, PatchGrid
from otprune.methods import GROUPS, PluginError, get_method, method_names
from otprune.prune_config import PruneConfig, config_from_env
from otprune.selection import Kept, PluginFault, select_per_image
from otprune.selectors import SELECTORS, budget

SELECTORS_GROUP = GROUPS["selector"]
MERGERS_GROUP = GROUPS["merger"]
PACKAGE = "fakeplug-xyz"
VERSION = "0.1"
ORIGIN = f"{PACKAGE} {VERSION}"


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(source, {group: {NAME: attribute}}, package=..., module=...)`` fakes an installed
    distribution whose entry points name ``<module>:<attribute>``; returns the module's name.

    Each package gets its own folder on ``sys.path`` (so the metadata lookup of one is never a
    cached listing of another) and a module name of its own (so ``sys.modules`` never hands a test
    another's module). ``source=None`` writes no module: the entry point names a missing one.
    """
    modules = []

    def install(source, entries, package=PACKAGE, version=VERSION, module=None):
        module = module or f"fakeplug_{uuid.uuid4().hex[:12]}"
        root = tmp_path / f"site{len(modules)}"
        root.mkdir()
        if source is not None:
            (root / f"{module}.py").write_text(textwrap.dedent(source))
        dist_info = root / f"{package.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        lines = []
        for group, names in entries.items():
            lines.append(f"[{group}]")
            lines += [f"{name} = {module}:{attribute}" for name, attribute in names.items()]
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(root))  # also invalidates the import system's caches
        modules.append(module)
        get_method.cache_clear()
        return module

    get_method.cache_clear()
    yield install
    get_method.cache_clear()
    for module in modules:
        sys.modules.pop(module, None)


def selector(name="FAKESEL", attribute="select"):
    """Entries registering ``attribute`` as the selector ``name``."""
    return {SELECTORS_GROUP: {name: attribute}}


def merger(name="FAKEMERGE", attribute="merge"):
    return {MERGERS_GROUP: {name: attribute}}


GOOD_SELECTOR = textwrap.dedent(
    """
    import torch

    calls = []

    def select(tokens, k, *, scale=1.0):
        calls.append({"n": tokens.shape[0], "k": k, "scale": scale})
        return torch.arange(k, device=tokens.device)
    """
)


def env(method, **more):
    """A complete environment for ``config_from_env`` (no ``OTPRUNE_*`` from the caller's shell)."""
    return {"BASELINE": method, "SUBSET_RATIO": "0.25", **more}


# ---------------------------------------------------------------------------------------------
# A plugin is listed, loaded by name in any case, and accepted wherever a built-in is


def test_a_plugin_selector_is_listed_without_being_imported(install):
    module = install(GOOD_SELECTOR, selector())
    names = method_names()
    assert "FAKESEL" in names
    assert names[: len(SELECTORS)] == tuple(SELECTORS), "the built-ins come first, in their order"
    assert module not in sys.modules, "listing the methods must not import a plugin"


@pytest.mark.parametrize("spelling", ["fakesel", "FAKESEL", "FakeSel", "  fakesel "])
def test_a_plugin_selector_loads_by_name_in_any_case(install, spelling):
    source = """
        import torch

        def select(tokens, k, *, text, layer_index, scale=1.0, bias):
            return torch.arange(k)
    """
    module = install(source, selector())
    method = get_method(spelling)
    assert method.name == "FAKESEL"
    assert method.kind == "selector"
    assert method.function is sys.modules[module].select
    assert method.context == ("text", "layer_index")
    assert method.options == ("scale", "bias")
    assert method.required == ("bias",)
    assert method.origin == ORIGIN
    assert method.plugin
    assert not method.accepts_batches


def test_a_plugin_selector_is_accepted_in_code_and_from_the_environment(install):
    install(GOOD_SELECTOR, selector())
    in_code = PruneConfig("FAKESEL", 0.25)
    assert (in_code.method, in_code.ratio, in_code.layer_index, dict(in_code.options)) == ("FAKESEL", 0.25, 0, {})
    assert in_code.enabled and in_code.spec.origin == ORIGIN and not in_code.from_environment
    assert PruneConfig("fakesel", 0.25).method == "FAKESEL"

    from_env = config_from_env(env("fakesel"))
    assert (from_env.method, from_env.ratio, from_env.layer_index, dict(from_env.options)) == ("FAKESEL", 0.25, 0, {})
    assert from_env.from_environment


def test_a_plugin_registered_as_a_merger_is_a_merger(install):
    source = """
        def merge(tokens, k, *, grid, size=2):
            return tokens[:k], None
    """
    install(source, merger())
    assert "FAKEMERGE" in method_names()
    method = get_method("fakemerge")
    assert method.kind == "merger"
    assert (method.context, method.options, method.required) == (("grid",), ("size",), ())
    assert method.origin == ORIGIN
    assert PruneConfig("FakeMerge", 0.5).spec.kind == "merger"
    assert config_from_env(env("FAKEMERGE")).method == "FAKEMERGE"


def test_a_batching_plugin_says_so(install):
    source = GOOD_SELECTOR + "\nselect.accepts_batches = True\n"
    install(source, selector())
    assert get_method("FAKESEL").accepts_batches


TEXT_SELECTOR = """
import torch

def select(tokens, k, *, text):
    return torch.arange(k, device=tokens.device)
"""


def test_a_plugin_leaving_words_out_of_its_question_says_so():
    assert get_method("CDPRUNER").text_leaves_out == ("\nAnswer the question using a single word or phrase.",)
    assert get_method("OURS").text_leaves_out == ()


def test_a_plugin_leaving_phrases_out_of_its_question_keeps_them(install):
    install(TEXT_SELECTOR + "\nselect.text_leaves_out = ('Answer briefly.', ' Be short.')\n", selector())
    assert get_method("FAKESEL").text_leaves_out == ("Answer briefly.", " Be short.")


@pytest.mark.parametrize("value", ["'Answer briefly.'", "['Answer briefly.']", "('',)", "('  ',)", "('Answer briefly.', 3)", "None"])
def test_a_bad_text_leaves_out_is_refused_naming_it(install, value):
    install(TEXT_SELECTOR + f"\nselect.text_leaves_out = {value}\n", selector(name="BADLEAVE"))
    with pytest.raises(PluginError) as raised:
        get_method("BADLEAVE")
    message = str(raised.value)
    assert_names_the_entry_point(message, "BADLEAVE")
    assert "text_leaves_out" in message and repr(eval(value)) in message


def test_leaving_words_out_of_a_question_not_asked_for_is_refused(install):
    install(GOOD_SELECTOR + "\nselect.text_leaves_out = ('Answer briefly.',)\n", selector(name="NOTEXT"))
    with pytest.raises(PluginError, match="text_leaves_out") as raised:
        get_method("NOTEXT")
    assert_names_the_entry_point(str(raised.value), "NOTEXT")


@pytest.mark.parametrize(
    "context, mark, why",
    [
        ("vision, attention", "", "asks for vision"),
        ("vision, text_attention, visual_attention", "", "asks for vision"),
        ("attention", "\nselect.before_projector = True\n", "runs before the projector"),
    ],
)
def test_a_plugin_asking_for_the_tower_and_the_llms_attention_is_refused(install, context, mark, why):
    """The tower's context exists at LAYER_INDEX = 0 only and the LLM's attention at K >= 1 only:
    no run could give both, so the plugin is refused when it loads, not by whichever K is tried."""
    install(f"import torch\n\ndef select(tokens, k, *, {context}):\n    return torch.arange(k)\n{mark}", selector(name="BOTHENDS"))
    with pytest.raises(PluginError) as raised:
        get_method("BOTHENDS")
    message = str(raised.value)
    assert_names_the_entry_point(message, "BOTHENDS")
    asked = [name for name in context.split(", ") if name != "vision"]
    assert f"it {why} (LAYER_INDEX = 0 only) and asks for {', '.join(sorted(asked))} (LAYER_INDEX >= 1 only)" in message


@pytest.mark.parametrize("stages", ["lambda: ((2, 0.5), (4, 0.25))", "lambda *, ratio: ((2, ratio), (4, ratio / 2))"])
def test_a_plugin_asking_for_adaptive_with_a_schedule_is_refused(install, stages):
    """``adaptive`` leaves one stage's count (k = N) to the method; a schedule sets each stage's."""
    install(f"import torch\n\ndef select(tokens, k, *, adaptive):\n    return torch.arange(k)\n\nselect.stages = {stages}\n", selector(name="ADAPTSTAGES"))
    with pytest.raises(PluginError) as raised:
        get_method("ADAPTSTAGES")
    message = str(raised.value)
    assert_names_the_entry_point(message, "ADAPTSTAGES")
    assert "asks for adaptive" in message and "has stages" in message


def test_the_installed_peer_plugins_are_listed_after_the_built_ins():
    get_method.cache_clear()
    names = method_names()
    assert names[: len(SELECTORS) + 2] == (*SELECTORS, "FASTV", "VTW")
    assert {"CDPRUNER", "POOL"} <= set(names)


# ---------------------------------------------------------------------------------------------
# A broken plugin is refused by name, with its package, before any model


def assert_names_the_entry_point(message, name, package=PACKAGE):
    assert repr(name) in message, message
    assert f"package {package}" in message, message


@pytest.mark.parametrize("builtin", ["ours", "OURS", "DivPrune", "fastv", "VTW"])
@pytest.mark.parametrize("group", [SELECTORS_GROUP, MERGERS_GROUP])
def test_a_plugin_named_as_a_built_in_is_refused(install, builtin, group):
    install(GOOD_SELECTOR, {group: {builtin: "select"}})
    key = builtin.upper()
    with pytest.raises(PluginError) as raised:
        get_method(key)
    message = str(raised.value)
    assert_names_the_entry_point(message, builtin)
    assert group in message and "built-in" in message and "rename" in message
    # Even asked for by the built-in's own name: the run never silently takes one of the two.
    with pytest.raises(PluginError, match="built-in"):
        config_from_env(env(key, LAYER_INDEX="2"))
    with pytest.raises(PluginError, match="built-in"):
        PruneConfig(key.lower(), 0.25, layer_index=2)
    # Listed once, as the built-in.
    assert method_names().count(key) == 1


def test_a_plugin_named_orig_is_refused(install):
    install(GOOD_SELECTOR, selector(name="orig"))
    with pytest.raises(PluginError) as raised:
        get_method("ORIG")
    assert_names_the_entry_point(str(raised.value), "orig")
    # BASELINE=ORIG still means no pruning.
    assert config_from_env({"BASELINE": "orig"}).method is None


def test_a_plugin_named_orig_is_not_listed(install):
    install(GOOD_SELECTOR, selector(name="orig"))
    assert "ORIG" not in method_names()


def test_a_name_in_two_packages_is_refused_naming_both(install):
    install(GOOD_SELECTOR, selector(name="TWICE"), package="fakeplug-one")
    install(GOOD_SELECTOR, selector(name="twice"), package="fakeplug-two")
    assert method_names().count("TWICE") == 1
    for read in (lambda: get_method("twice"), lambda: config_from_env(env("TWICE"))):
        with pytest.raises(PluginError) as raised:
            read()
        message = str(raised.value)
        assert_names_the_entry_point(message, "TWICE", "fakeplug-one")
        assert_names_the_entry_point(message, "twice", "fakeplug-two")
        assert "more than once" in message


def test_a_name_in_both_groups_is_refused_naming_both(install):
    source = GOOD_SELECTOR + "\ndef merge(tokens, k):\n    return tokens[:k], torch.arange(k)\n"
    install(source, {SELECTORS_GROUP: {"BOTH": "select"}, MERGERS_GROUP: {"BOTH": "merge"}})
    with pytest.raises(PluginError) as raised:
        get_method("both")
    message = str(raised.value)
    assert SELECTORS_GROUP in message and MERGERS_GROUP in message and "more than once" in message
    assert message.count(f"package {PACKAGE}") == 2


def test_a_missing_module_is_refused(install):
    module = install(None, selector(name="GONE"))
    with pytest.raises(PluginError) as raised:
        config_from_env(env("gone"))
    message = str(raised.value)
    assert_names_the_entry_point(message, "GONE")
    assert f"{module}:select" in message and "ModuleNotFoundError" in message and module in message


def test_a_module_failing_to_import_is_refused_with_its_error(install):
    source = """
        raise ImportError("fakeplug needs libfoo >= 3")

        def select(tokens, k):
            return None
    """
    install(source, selector(name="NOLIB"))
    with pytest.raises(PluginError) as raised:
        get_method("NOLIB")
    message = str(raised.value)
    assert_names_the_entry_point(message, "NOLIB")
    assert "ImportError: fakeplug needs libfoo >= 3" in message


def test_a_module_raising_anything_at_import_is_refused(install):
    install("x = 1 / 0\n", selector(name="DIVZERO"))
    with pytest.raises(PluginError, match="ZeroDivisionError"):
        get_method("DIVZERO")


def test_a_missing_attribute_is_refused(install):
    module = install(GOOD_SELECTOR, selector(name="NOATTR", attribute="select_nothing"))
    with pytest.raises(PluginError) as raised:
        get_method("noattr")
    message = str(raised.value)
    assert_names_the_entry_point(message, "NOATTR")
    assert f"{module}:select_nothing" in message and "AttributeError" in message


@pytest.mark.parametrize("value", ["3", "'select'", "None"])
def test_something_not_callable_is_refused(install, value):
    install(f"select = {value}\n", selector(name="NOTFN"))
    with pytest.raises(PluginError) as raised:
        get_method("NOTFN")
    message = str(raised.value)
    assert_names_the_entry_point(message, "NOTFN")
    assert "not a function" in message


@pytest.mark.parametrize(
    "signature, says",
    [
        ("tokens", "two positional"),
        ("tokens, k, extra", "two positional"),
        ("tokens, k=4", "two positional"),
        ("tokens=None, k=4", "two positional"),
        ("tokens, /, k, extra", "two positional"),
        ("", "two positional"),
        ("tokens, k, *args", "*args"),
        ("*args", "two positional"),
        ("tokens, k, **kwargs", "**kwargs"),
        ("tokens, k, *, gamma=1.0, **options", "**options"),
    ],
)
def test_a_signature_outside_the_contract_is_refused(install, signature, says):
    install(f"def select({signature}):\n    return None\n", selector(name="BADSIG"))
    with pytest.raises(PluginError) as raised:
        get_method("badsig")
    message = str(raised.value)
    assert_names_the_entry_point(message, "BADSIG")
    assert "bad signature" in message and says in message
    with pytest.raises(PluginError, match="bad signature"):
        config_from_env(env("BADSIG"))


@pytest.mark.parametrize("signature", ["tokens, k", "x, budget", "tokens, /, k", "tokens, k, *, text, gamma=0.5", "tokens, k, *, g"])
def test_signatures_inside_the_contract_are_accepted(install, signature):
    install(f"def select({signature}):\n    return None\n", selector(name="OKSIG"))
    assert get_method("OKSIG").kind == "selector"


def test_a_name_that_is_no_identifier_is_refused(install):
    install(GOOD_SELECTOR, selector(name="my-sel"))
    with pytest.raises(PluginError) as raised:
        get_method("MY-SEL")
    assert_names_the_entry_point(str(raised.value), "my-sel")


@pytest.mark.parametrize("read", [get_method, lambda name: config_from_env(env(name)), lambda name: PruneConfig(name, 0.25)])
def test_an_unknown_name_lists_the_allowed_ones_plugins_included(install, read):
    install(GOOD_SELECTOR, selector())
    with pytest.raises(ValueError) as raised:
        read("NOSUCHMETHOD")
    message = str(raised.value)
    assert "NOSUCHMETHOD" in message and "allowed" in message
    for name in ("ORIG", *SELECTORS, "FASTV", "VTW", "CDPRUNER", "POOL", "FAKESEL"):
        assert name in message, name


def test_a_broken_plugin_stops_only_the_runs_that_use_it(install):
    install(None, selector(name="GONE"))
    assert "GONE" in method_names()
    assert config_from_env(env("OURS")).method == "OURS"
    assert config_from_env({}).method is None
    assert config_from_env({"BASELINE": "ORIG"}).method is None
    with pytest.raises(PluginError):
        config_from_env(env("GONE"))


def test_a_plugin_fixed_after_a_failed_load_loads(install, tmp_path):
    """A failed load is not remembered: the cache holds only methods that loaded."""
    module = install(None, selector(name="LATER"))
    with pytest.raises(PluginError):
        get_method("LATER")
    (tmp_path / "site0" / f"{module}.py").write_text(GOOD_SELECTOR)
    importlib.invalidate_caches()
    assert get_method("LATER").kind == "selector"


# ---------------------------------------------------------------------------------------------
# Options: OTPRUNE_OPTIONS (and the legacy variables), checked against the signature

OPTIONS_SELECTOR = textwrap.dedent(
    """
    import torch

    def select(tokens, k, *, text=None, grid=None, layer_index=0, scale=1.0, gamma=0.5, seed=0):
        return torch.arange(k)
    """
)

REQUIRED_SELECTOR = textwrap.dedent(
    """
    import torch

    def select(tokens, k, *, scale=1.0, bias):
        return torch.arange(k)
    """
)

ATTENTION_SELECTOR = textwrap.dedent(
    """
    import torch

    def select(tokens, k, *, attention, text, grid, layer_index, text_attention, visual_attention, scale=1.0):
        return attention.argsort(descending=True)[:k].sort().values
    """
)


def test_options_reach_the_config(install):
    install(OPTIONS_SELECTOR, selector())
    config = config_from_env(env("fakesel", OTPRUNE_OPTIONS='{"scale": 2, "seed": 7}'))
    assert dict(config.options) == {"scale": 2, "seed": 7}
    assert get_method("FAKESEL").options == ("scale", "gamma", "seed")
    assert dict(config_from_env(env("fakesel", OTPRUNE_OPTIONS="  ")).options) == {}
    assert dict(PruneConfig("FAKESEL", 0.25, options={"scale": 3.0}).options) == {"scale": 3.0}


def test_legacy_option_variables_reach_a_plugin_that_takes_them(install):
    install(OPTIONS_SELECTOR, selector())
    config = config_from_env(env("FAKESEL", OTPRUNE_GAMMA="0.25", OTPRUNE_SEED="3", OTPRUNE_OPTIONS='{"scale": 2}'))
    assert dict(config.options) == {"scale": 2, "gamma": 0.25, "seed": 3}


@pytest.mark.parametrize("in_code", [False, True])
def test_an_unknown_option_is_refused_listing_what_the_method_takes(install, in_code):
    install(OPTIONS_SELECTOR, selector())
    with pytest.raises(ValueError) as raised:
        if in_code:
            PruneConfig("FAKESEL", 0.25, options={"shift": 1})
        else:
            config_from_env(env("FAKESEL", OTPRUNE_OPTIONS='{"shift": 1, "scale": 2}'))
    message = str(raised.value)
    assert "shift" in message and "FAKESEL" in message
    assert "it takes: scale, gamma, seed" in message


def test_an_option_of_a_method_without_options_is_refused(install):
    install("def select(tokens, k):\n    return None\n", selector())
    with pytest.raises(ValueError, match="it takes: none"):
        config_from_env(env("FAKESEL", OTPRUNE_OPTIONS='{"scale": 2}'))


def test_a_missing_required_option_is_refused_naming_it(install):
    install(REQUIRED_SELECTOR, selector())
    for read in (lambda: config_from_env(env("FAKESEL", OTPRUNE_OPTIONS='{"scale": 2}')), lambda: PruneConfig("FAKESEL", 0.25)):
        with pytest.raises(ValueError) as raised:
            read()
        message = str(raised.value)
        assert "bias" in message and "OTPRUNE_OPTIONS" in message and "FAKESEL" in message
        assert "scale" not in message
    assert dict(config_from_env(env("FAKESEL", OTPRUNE_OPTIONS='{"bias": 0}')).options) == {"bias": 0}


@pytest.mark.parametrize("raw", ["{scale: 2}", "{'scale': 2}", '{"scale": 2', "scale=2", '["scale", 2]', "2", '"scale"', "null"])
def test_options_that_are_no_json_object_are_refused(install, raw):
    install(OPTIONS_SELECTOR, selector())
    with pytest.raises(ValueError) as raised:
        config_from_env(env("FAKESEL", OTPRUNE_OPTIONS=raw))
    assert "OTPRUNE_OPTIONS" in str(raised.value) and raw in str(raised.value)


@pytest.mark.parametrize("method", ["FAKESEL", "OURS"])
def test_an_option_given_twice_is_refused(install, method):
    install(OPTIONS_SELECTOR, selector())
    with pytest.raises(ValueError) as raised:
        config_from_env(env(method, OTPRUNE_GAMMA="0.5", OTPRUNE_OPTIONS='{"gamma": 0.1}'))
    message = str(raised.value)
    assert "gamma" in message and "OTPRUNE_GAMMA" in message and "OTPRUNE_OPTIONS" in message


def test_builtin_options_through_json_keep_their_range_checks():
    get_method.cache_clear()
    with pytest.raises(ValueError, match=r"gamma\)? must be a number in .*got -1$"):
        config_from_env(env("OURS", OTPRUNE_OPTIONS='{"gamma": -1}'))
    with pytest.raises(ValueError, match=r"gamma\)? must be a number in .*got -1$"):
        PruneConfig("OURS", 0.25, options={"gamma": -1})
    with pytest.raises(ValueError, match="gamma"):
        config_from_env(env("OURS", OTPRUNE_OPTIONS='{"gamma": "big"}'))
    with pytest.raises(ValueError, match="seed"):
        config_from_env(env("RANDOM", OTPRUNE_OPTIONS='{"seed": -1}'))
    with pytest.raises(ValueError, match="do not apply to BASELINE=DIVPRUNE"):
        config_from_env(env("DIVPRUNE", OTPRUNE_OPTIONS='{"gamma": 0.1}'))
    assert dict(config_from_env(env("OURS", OTPRUNE_OPTIONS='{"gamma": 0.1}')).options) == {"gamma": 0.1}


def test_a_plugin_asking_for_attention_needs_a_layer_after_the_first(install):
    install(ATTENTION_SELECTOR, selector())
    for read in (
        lambda: config_from_env(env("FAKESEL")),
        lambda: config_from_env(env("FAKESEL", LAYER_INDEX="0")),
        lambda: PruneConfig("FAKESEL", 0.25),
    ):
        with pytest.raises(ValueError) as raised:
            read()
        message = str(raised.value)
        assert "LAYER_INDEX=0" in message and "FAKESEL" in message and "attention" in message
    assert config_from_env(env("FAKESEL", LAYER_INDEX="2")).layer_index == 2
    assert PruneConfig("FAKESEL", 0.25, layer_index=1).layer_index == 1


@pytest.mark.parametrize("name", sorted(CONTEXT))
def test_context_parameters_are_no_options(install, name):
    install(f"def select(tokens, k, *, {name}, scale=1.0):\n    return tokens[:k, 0].argsort()[:k].sort().values\n", selector())
    method = get_method("FAKESEL")
    assert method.context == (name,) and method.options == ("scale",)
    with pytest.raises(ValueError) as raised:
        config_from_env(env("FAKESEL", LAYER_INDEX="2", OTPRUNE_OPTIONS=f'{{"{name}": 1}}'))
    assert name in str(raised.value) and "it takes: scale" in str(raised.value)


# ---------------------------------------------------------------------------------------------
# lmms-eval start-up: a broken plugin stops the process (lmms-eval swallows exceptions)


@pytest.fixture
def lmms_eval_start_up(monkeypatch):
    """``lmms_eval_plugin`` as lmms-eval calls it, with nothing installed into any model class:
    returns the list of ``install`` calls made (none, when start-up is refused)."""
    patches = pytest.importorskip("otprune.patches")
    from otprune import stack

    for name in list(os.environ):
        if name.startswith("OTPRUNE_") or name in ("BASELINE", "SUBSET_RATIO", "LAYER_INDEX"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(stack, "known_breaks", list)
    installed = []
    for adapter in (patches.llava, patches.hf, patches.vlm, patches.generate_timing):
        monkeypatch.setattr(adapter, "install", lambda adapter=adapter: installed.append(adapter.__name__))
    monkeypatch.setattr(patches.llava, "install_cache_keyword", lambda: installed.append("install_cache_keyword"))
    monkeypatch.setattr(patches, "_env_config", patches._env_config)
    return patches, installed


def test_lmms_eval_start_up_stops_on_a_plugin_whose_module_is_missing(install, monkeypatch, lmms_eval_start_up):
    patches, installed = lmms_eval_start_up
    before = patches._env_config
    module = install(None, selector(name="GONE"))
    monkeypatch.setenv("BASELINE", "gone")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    with pytest.raises(SystemExit) as raised:
        patches.lmms_eval_plugin()
    message = str(raised.value.code)
    assert message.startswith("otprune: ")
    assert_names_the_entry_point(message, "GONE")
    assert module in message and "ModuleNotFoundError" in message
    assert installed == [] and patches._env_config is before


@pytest.mark.parametrize(
    "variables, says",
    [
        ({"BASELINE": "OURS"}, "built-in"),
        ({"BASELINE": "FAKESEL", "OTPRUNE_OPTIONS": "[1]"}, "OTPRUNE_OPTIONS"),
        ({"BASELINE": "FAKESEL", "OTPRUNE_OPTIONS": '{"nope": 1}'}, "nope"),
        ({"BASELINE": "NOSUCHMETHOD"}, "FAKESEL"),
    ],
)
def test_lmms_eval_start_up_stops_on_other_plugin_faults(install, monkeypatch, lmms_eval_start_up, variables, says):
    patches, installed = lmms_eval_start_up
    install(GOOD_SELECTOR, {SELECTORS_GROUP: {"FAKESEL": "select", "ours": "select"}})
    for name, value in {"SUBSET_RATIO": "0.25", **variables}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as raised:
        patches.lmms_eval_plugin()
    assert str(raised.value.code).startswith("otprune: ") and says in str(raised.value.code)
    assert installed == []


# ---------------------------------------------------------------------------------------------
# While the model runs: every answer of a plugin is checked against the contract

N, D, RATIO = 16, 8, 0.25
K = budget(RATIO, N)

FAULTY_SELECTORS = textwrap.dedent(
    """
    import torch

    def unsorted(tokens, k):
        return torch.arange(k).flip(0)

    def duplicate(tokens, k):
        return torch.zeros(k, dtype=torch.long)

    def out_of_range(tokens, k):
        return torch.arange(tokens.shape[0] - k + 1, tokens.shape[0] + 1)

    def negative(tokens, k):
        return torch.arange(-1, k - 1)

    def int32(tokens, k):
        return torch.arange(k, dtype=torch.int32)

    def float_indices(tokens, k):
        return torch.arange(k, dtype=torch.float32)

    def too_many(tokens, k):
        return torch.arange(k + 1)

    def too_few(tokens, k):
        return torch.arange(k - 1)

    def two_d(tokens, k):
        return torch.arange(k)[None]

    def a_list(tokens, k):
        return list(range(k))

    def raising(tokens, k):
        raise RuntimeError("the plugin blew up")
    """
)

SELECTOR_FAULTS = {
    "unsorted": "not sorted ascending",
    "duplicate": "an index twice",
    "out_of_range": f"outside [0, {N})",
    "negative": f"outside [0, {N})",
    "int32": "dtype torch.int32, not torch.long",
    "float_indices": "dtype torch.float32, not torch.long",
    "too_many": f"shape ({K + 1},), not ({K},)",
    "too_few": f"shape ({K - 1},), not ({K},)",
    "two_d": f"shape (1, {K}), not ({K},)",
    "a_list": "returned list, not a torch.Tensor",
    "raising": "raised RuntimeError: the plugin blew up",
}

FAULTY_MERGERS = textwrap.dedent(
    """
    import torch

    def too_many(tokens, k):
        return tokens[: k + 1].clone(), torch.arange(k + 1)

    def wrong_width(tokens, k):
        return torch.zeros(k, tokens.shape[1] + 1, dtype=tokens.dtype), torch.arange(k)

    def nan_tokens(tokens, k):
        merged = tokens[:k].clone()
        merged[0, 0] = float("nan")
        return merged, torch.arange(k)

    def inf_tokens(tokens, k):
        merged = tokens[:k].clone()
        merged[-1, -1] = float("inf")
        return merged, torch.arange(k)

    def unsorted_positions(tokens, k):
        return tokens[:k].clone(), torch.arange(k).flip(0)

    def duplicate_positions(tokens, k):
        return tokens[:k].clone(), torch.zeros(k, dtype=torch.long)

    def positions_out_of_range(tokens, k):
        return tokens[:k].clone(), torch.arange(k) + tokens.shape[0]

    def wrong_count(tokens, k):
        return tokens[:k].clone(), torch.arange(k - 1)

    def wrong_dtype(tokens, k):
        return tokens[:k].double(), torch.arange(k)

    def no_tokens(tokens, k):
        return tokens[:0].clone(), torch.arange(0)

    def no_pair(tokens, k):
        return tokens[:k].clone()

    def raising(tokens, k):
        raise ValueError("cannot merge")
    """
)

MERGER_FAULTS = {
    "too_many": f"shape ({K + 1}, {D}), not (m, {D}) with 1 <= m <= k = {K}",
    "wrong_width": f"shape ({K}, {D + 1}), not (m, {D})",
    "nan_tokens": "not all finite",
    "inf_tokens": "not all finite",
    "unsorted_positions": "positions that are not sorted ascending",
    "duplicate_positions": "a position twice",
    "positions_out_of_range": f"positions outside [0, {N})",
    "wrong_count": f"positions of shape ({K - 1},), not ({K},), one per merged token",
    "wrong_dtype": "dtype torch.float64, not the tokens' torch.float32",
    "no_tokens": "1 <= m <= k",
    "no_pair": "not a (merged_tokens, positions) pair",
    "raising": "raised ValueError: cannot merge",
}


def images(*sizes):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, D, generator=generator) for n in sizes]


def expect_fault(kind, method, fault, run):
    """``run(config)`` raises ``PluginFault`` for a setting made in code and ``SystemExit`` for one
    read from the environment, each naming the plugin, its package and the fault."""
    label = f"{kind} plugin {method} ({ORIGIN})"
    with pytest.raises(PluginFault) as raised:
        run(PruneConfig(method, RATIO))
    message = str(raised.value)
    assert label in message and fault in message, message
    config = config_from_env(env(method.lower()))
    assert config.from_environment
    with pytest.raises(SystemExit) as exited:
        run(config)
    message = str(exited.value.code)
    assert message.startswith("otprune: ") and label in message and fault in message, message


@pytest.mark.parametrize("function", sorted(SELECTOR_FAULTS))
def test_a_faulty_selector_stops_the_run(install, function):
    install(FAULTY_SELECTORS, selector(name="FAULTY", attribute=function))
    expect_fault("selector", "FAULTY", SELECTOR_FAULTS[function], lambda config: select_per_image(config, images(N)))


@pytest.mark.parametrize("function", sorted(MERGER_FAULTS))
def test_a_faulty_merger_stops_the_run(install, function):
    install(FAULTY_MERGERS, merger(name="FAULTY", attribute=function))
    expect_fault("merger", "FAULTY", MERGER_FAULTS[function], lambda config: select_per_image(config, images(N)))


def test_a_fault_in_any_image_stops_the_run(install):
    """Only the second image (N = 20, k = 5) gets an unsorted answer."""
    source = """
        import torch

        def select(tokens, k):
            kept = torch.arange(k)
            return kept.flip(0) if tokens.shape[0] == 20 else kept
    """
    install(source, selector())
    with pytest.raises(PluginFault, match=r"not sorted ascending \(N = 20 tokens, k = 5\)"):
        select_per_image(PruneConfig("FAKESEL", RATIO), images(N, 20))


def test_a_good_plugin_selector_is_called_image_by_image_with_its_options(install):
    module = install(GOOD_SELECTOR, selector())
    kept = select_per_image(PruneConfig("FAKESEL", RATIO, options={"scale": 2.0}), images(N, N, 20))
    assert [type(k) for k in kept] == [Kept] * 3
    assert [k.indices.tolist() for k in kept] == [list(range(K))] * 2 + [list(range(budget(RATIO, 20)))]
    assert all(k.tokens is None for k in kept)
    assert sys.modules[module].calls == [
        {"n": N, "k": K, "scale": 2.0},
        {"n": N, "k": K, "scale": 2.0},
        {"n": 20, "k": budget(RATIO, 20), "scale": 2.0},
    ]


def test_a_good_merger_s_tokens_and_positions_are_returned(install):
    source = """
        import torch

        def merge(tokens, k, *, layer_index, groups=2):
            # k - 1 tokens, each the mean of `groups` neighbours, standing at the first of them
            merged = tokens[: (k - 1) * groups].reshape(k - 1, groups, -1).mean(1)
            return merged, torch.arange(k - 1) * groups
    """
    install(source, merger())
    tokens = images(N)
    [kept] = select_per_image(PruneConfig("FAKEMERGE", RATIO, options={"groups": 3}), tokens)
    assert isinstance(kept, Kept)
    assert kept.indices.tolist() == [0, 3, 6]
    assert kept.indices.dtype == torch.long
    torch.testing.assert_close(kept.tokens, tokens[0][:9].reshape(3, 3, D).mean(1))
    # through the environment too
    [again] = select_per_image(config_from_env(env("FAKEMERGE", OTPRUNE_OPTIONS='{"groups": 3}')), tokens)
    assert torch.equal(again.indices, kept.indices) and torch.equal(again.tokens, kept.tokens)


GRID_SELECTOR = textwrap.dedent(
    """
    import torch

    seen = []

    def select(tokens, k, *, grid):
        seen.append(grid)
        return torch.arange(k)
    """
)


def test_a_plugin_asking_for_a_grid_the_model_does_not_give_is_told_so(install):
    module = install(GRID_SELECTOR, selector())
    config = PruneConfig("FAKESEL", RATIO)
    for context in ({"grid": [None]}, {}, None):
        with pytest.raises(ValueError) as raised:
            select_per_image(config, images(N), context)
        message = str(raised.value)
        assert "FAKESEL" in message and "asks for grid" in message and "do not give" in message
        assert not isinstance(raised.value, PluginFault)
    assert sys.modules[module].seen == [], "the plugin must not be called without its context"


def test_a_plugin_asking_for_a_grid_gets_each_image_s_grid(install):
    module = install(GRID_SELECTOR, selector())
    grids = [(PatchGrid(0, 4, 4),), (PatchGrid(0, 2, 3), PatchGrid(6, 2, 2, newlines=True))]
    select_per_image(PruneConfig("FAKESEL", RATIO), images(16, 12), {"grid": grids})
    assert sys.modules[module].seen == grids
    with pytest.raises(ValueError, match="span past"):
        select_per_image(PruneConfig("FAKESEL", RATIO), images(16), {"grid": [(PatchGrid(0, 4, 5),)]})


def test_a_plugin_gets_text_and_layer_index(install):
    source = """
        import torch

        seen = []

        def select(tokens, k, *, text, layer_index):
            seen.append((text, layer_index))
            return torch.arange(k)
    """
    module = install(source, selector())
    text = [torch.zeros(3, D), torch.ones(5, D)]
    select_per_image(PruneConfig("FAKESEL", RATIO, layer_index=3), images(N, 20), {"text": text})
    seen = sys.modules[module].seen
    assert [t is given for (t, _), given in zip(seen, text)] == [True, True]
    assert [layer for _, layer in seen] == [3, 3]
    with pytest.raises(ValueError, match="asks for text"):
        select_per_image(PruneConfig("FAKESEL", RATIO), images(N), {"text": [torch.zeros(0, D)]})


# A plugin that declares ``accepts_batches`` is handed images of equal N as one (B, N, d) batch;
# its answer must be checked like any other plugin answer ("A plugin's every answer is checked
# against its contract before the model reads it", otprune/selection.py). Only selectors batch
# (otprune/contract.py): a merger saying ``accepts_batches`` must still be run image by image.

BATCHING_SELECTORS = textwrap.dedent(
    """
    import torch

    def good(tokens, k):
        kept = torch.arange(k, device=tokens.device)
        return kept.expand(tokens.shape[0], k).clone() if tokens.dim() == 3 else kept

    def unsorted(tokens, k):
        return good(tokens, k).flip(-1)

    def wrong_shape(tokens, k):
        return good(tokens, k)[..., :-1]

    def raising(tokens, k):
        raise RuntimeError("the batch blew up")

    def merge(tokens, k):
        return tokens[..., :k, :] * 2, torch.arange(k, device=tokens.device)

    for function in (good, unsorted, wrong_shape, raising, merge):
        function.accepts_batches = True
    """
)


def test_a_good_batching_plugin_selector_works(install):
    install(BATCHING_SELECTORS, selector(attribute="good"))
    assert get_method("FAKESEL").accepts_batches
    kept = select_per_image(PruneConfig("FAKESEL", RATIO), images(N, N, 20))
    assert [k.indices.tolist() for k in kept] == [list(range(K))] * 2 + [list(range(budget(RATIO, 20)))]


@pytest.mark.parametrize(
    "function, fault",
    [
        ("unsorted", "not sorted ascending"),
        ("wrong_shape", f"shape (2, {K - 1}), not (2, {K})"),
        ("raising", "raised RuntimeError: the batch blew up"),
    ],
)
def test_a_faulty_batching_plugin_selector_stops_the_run(install, function, fault):
    install(BATCHING_SELECTORS, selector(name="FAULTY", attribute=function))
    expect_fault("selector", "FAULTY", fault, lambda config: select_per_image(config, images(N, N)))


def test_a_merger_that_says_it_batches_is_still_a_merger(install):
    install(BATCHING_SELECTORS, merger(attribute="merge"))
    tokens = images(N, N)
    kept = select_per_image(PruneConfig("FAKEMERGE", RATIO), tokens)
    for image, one in zip(tokens, kept):
        assert one.indices.tolist() == list(range(K))
        assert one.tokens is not None and torch.equal(one.tokens, image[:K] * 2)


def test_doctor_lists_each_plugin_and_names_a_broken_one_with_its_fault(install):
    from otprune.doctor import method_states

    install(GOOD_SELECTOR, selector())
    install(None, merger(name="GONE"), package="gone-plugin")
    lines = method_states()
    assert f"  FAKESEL: selector from {ORIGIN}; asks no context; options scale" in lines
    assert "  POOL: merger from otprune (bundled); asks grid; options none" in lines
    broken = [line for line in lines if line.startswith("  GONE: BROKEN: ")]
    assert len(broken) == 1 and "gone-plugin" in broken[0] and "ModuleNotFoundError" in broken[0]
