"""Plugin discovery with real third-party distributions.

Each test builds genuine installed-distribution metadata in ``tmp_path`` (a ``.dist-info``
folder with METADATA and an ``entry_points.txt`` in the ``[kdbench]`` group) next to the plugin
module files, puts that folder on ``sys.path`` and lets :func:`kdbench.registry.load_registry`
find them through ``importlib.metadata`` exactly as it finds pip-installed plugins.
``KDBENCH_ONLY_DISTS`` is set to ``kdbench`` plus the fake distributions, so plugins installed
in the developer's own environment cannot leak in.
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

import kdbench
from conftest import write_tiny_recipe
from kdbench.api import Params, StudentMethod, UserError
from kdbench.recipe import RecipeError, load_recipe
from kdbench.registry import ONLY_DISTS_ENV, Plugin, load_registry

MOD_PREFIX = "kdbt_"  # every fake plugin module starts with this (removed from sys.modules after)

BUILTIN = {
    "model": {"resnet50", "resnet34", "resnet18", "wrn", "wrn_40_2", "wrn_16_2", "vgg13", "vgg8",
              "mobilenetv2", "shufflenetv2", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
              "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_40_1", "vgg11",
              "vgg16", "vgg19", "mobilenetv2_w1", "shufflenetv1"},
    "dataset": {"synthetic", "cifar10", "cifar100", "tiny_imagenet", "fashion_mnist", "mnist", "kmnist"},
    "teacher_objective": {"ce", "intra_class", "margin_intra"},
    "student_method": {"ce", "kd", "fitnet", "rkd", "crd", "ofd", "reviewkd", "vid", "mlld", "at", "sp",
                       "cc", "pkt", "nst", "kdsvd", "dkd", "dist", "ctkd", "ab", "ft", "fsp"},
    "view": {"second", "strong"},
}


# ------------------------------------------------------------------------------------ helpers
class FakeSite:
    """A folder on sys.path holding fake installed distributions and their modules."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root, self.mp, self.dists = root, monkeypatch, []
        root.mkdir(parents=True, exist_ok=True)
        monkeypatch.syspath_prepend(str(root))
        self.only()

    def add(self, name: str, version: str, entry_points: dict[str, str],
            modules: dict[str, str]) -> None:
        """One distribution: ``entry_points`` name -> module, ``modules`` name -> source."""
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(
            "[kdbench]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()),
            encoding="utf-8")
        for module, source in modules.items():
            assert module.startswith(MOD_PREFIX)
            (self.root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        self.dists.append(name)
        self.only()
        importlib.invalidate_caches()

    def only(self, *dists: str) -> None:
        keep = ["kdbench", *(dists or self.dists)]
        self.mp.setenv(ONLY_DISTS_ENV, ",".join(keep))


@pytest.fixture
def site(tmp_path, monkeypatch):
    yield FakeSite(tmp_path / "site", monkeypatch)
    for name in [m for m in sys.modules if m.startswith(MOD_PREFIX)]:
        del sys.modules[name]
    importlib.invalidate_caches()


def method_module(*names: str, help: str = "", extra: str = "") -> str:
    """Source of a plugin module registering one trivial student method per name."""
    regs = "".join(f"    register({n!r}, Method, help={help!r})\n" for n in names)
    return ("from kdbench.api import StudentMethod, hookimpl\n\n"
            "class Method(StudentMethod):\n"
            "    def __init__(self, params, setup):\n"
            "        super().__init__()\n\n"
            f"{extra}\n"
            "@hookimpl\n"
            "def kdbench_register_student_methods(register):\n" + regs)


def broken_by_dist(reg) -> dict[str, list]:
    out: dict[str, list] = {}
    for b in reg.broken:
        out.setdefault(b.dist, []).append(b)
    return out


# ------------------------------------------------------------------------------- (a) found
ALPHA = '''
"""Alpha: squared logit difference (test plugin)."""
import torch.nn.functional as F
from pydantic import Field

from kdbench.api import Params, StudentMethod, hookimpl


class AlphaParams(Params):
    scale: float = Field(2.0, gt=0, description="multiplies the MSE")
    squared: bool = True


class Alpha(StudentMethod):
    default_weight = 0.7

    def __init__(self, params, setup):
        super().__init__()
        self.scale = params.scale

    def forward(self, student, teacher, batch, extra):
        return {"alpha": self.scale * F.mse_loss(student.logits, teacher.logits)}


@hookimpl
def kdbench_register_student_methods(register):
    register("alpha_mse", Alpha, params=AlphaParams, help="alpha: scaled logit MSE")
'''


def test_third_party_student_method_is_found(site):
    site.add("kdbt-alpha", "1.2.3", {"alpha": "kdbt_alpha"}, {"kdbt_alpha": ALPHA})
    reg = load_registry()

    assert reg.broken == []
    assert "alpha_mse" in reg.names("student_method")
    plugin = reg.find("student_method", "alpha_mse")
    assert isinstance(plugin, Plugin)
    assert (plugin.kind, plugin.name, plugin.dist, plugin.version) == (
        "student_method", "alpha_mse", "kdbt-alpha", "1.2.3")
    assert plugin.qualified_name == "kdbt-alpha:alpha_mse"
    assert plugin.help == "alpha: scaled logit MSE"
    # The factory is the plugin's own class, from the module the entry point names.
    assert plugin.factory.__module__ == "kdbt_alpha" and plugin.factory.__name__ == "Alpha"
    assert issubclass(plugin.factory, StudentMethod) and plugin.factory.default_weight == 0.7
    # Params: the plugin's own model, validated with its defaults, unknown keys rejected.
    assert issubclass(plugin.params, Params)
    assert set(plugin.params.model_fields) == {"scale", "squared"}
    assert plugin.params.model_validate({}).scale == 2.0
    assert plugin.params.model_validate({"scale": 0.5}).scale == 0.5
    with pytest.raises(Exception):
        plugin.params.model_validate({"scael": 1.0})
    # The qualified name finds the same plugin; provenance knows the distribution's version.
    assert reg.find("student_method", "kdbt-alpha:alpha_mse") is plugin
    assert reg.versions()["kdbt-alpha"] == "1.2.3"
    assert reg.versions()["kdbench"] == kdbench.__version__
    # It is a student method only.
    for kind in ("model", "dataset", "teacher_objective"):
        assert "alpha_mse" not in reg.names(kind)


def test_only_dists_keeps_other_distributions_out(site):
    site.add("kdbt-alpha", "1.2.3", {"alpha": "kdbt_alpha"}, {"kdbt_alpha": ALPHA})
    site.only("kdbench")  # the fake dist is installed, but not selected
    reg = load_registry()
    assert "alpha_mse" not in reg.names("student_method")
    assert {p.dist for k in BUILTIN for p in reg.all(k)} == {"kdbench"}
    with pytest.raises(UserError, match="alpha_mse"):
        reg.find("student_method", "alpha_mse")


def test_unknown_name_suggests_the_close_one(site):
    site.add("kdbt-alpha", "1.2.3", {"alpha": "kdbt_alpha"}, {"kdbt_alpha": ALPHA})
    reg = load_registry()
    with pytest.raises(UserError, match=r"unknown student method 'alpha_mes'.*did you mean 'alpha_mse'"):
        reg.find("student_method", "alpha_mes")
    with pytest.raises(UserError, match="unknown student method"):
        reg.find("student_method", "kdbt-nobody:alpha_mse")


# ----------------------------------------------------------------------- (b) import fails
def test_import_error_is_recorded_and_the_rest_loads(site):
    site.add("kdbt-crash", "0.1", {"crash": "kdbt_crash"}, {"kdbt_crash": """
        from kdbench.api import hookimpl
        raise ImportError("kdbt_crash needs libwhatever >= 9")
        """})
    site.add("kdbt-missing", "0.2", {"gone": "kdbt_not_a_module"}, {})
    site.add("kdbt-fine", "0.3", {"fine": "kdbt_fine"}, {"kdbt_fine": method_module("fine_m")})
    reg = load_registry()

    broken = broken_by_dist(reg)
    assert set(broken) == {"kdbt-crash", "kdbt-missing"}
    (crash,) = broken["kdbt-crash"]
    assert "ImportError" in crash.error and "libwhatever >= 9" in crash.error
    assert "kdbt_crash" in crash.entry_point and "\n" not in crash.error
    (missing,) = broken["kdbt-missing"]
    assert "ModuleNotFoundError" in missing.error and "kdbt_not_a_module" in missing.error
    # Everything else still loads: the good third-party dist and every built-in.
    assert reg.find("student_method", "fine_m").dist == "kdbt-fine"
    for kind, names in BUILTIN.items():
        assert names <= set(reg.names(kind)), kind


# ------------------------------------------------------------------ (c) register hook fails
def test_register_hook_error_is_recorded(site):
    site.add("kdbt-hookfail", "0.1", {"hf": "kdbt_hookfail"}, {"kdbt_hookfail": """
        from kdbench.api import hookimpl

        @hookimpl
        def kdbench_register_student_methods(register):
            raise RuntimeError("hook exploded")
        """})
    site.add("kdbt-badparams", "0.1", {"bp": "kdbt_badparams"}, {"kdbt_badparams": """
        from kdbench.api import StudentMethod, hookimpl

        @hookimpl
        def kdbench_register_student_methods(register):
            register("bad_params", StudentMethod, params=dict)
        """})
    site.add("kdbt-badsig", "0.1", {"bs": "kdbt_badsig"}, {"kdbt_badsig": """
        from kdbench.api import hookimpl

        @hookimpl
        def kdbench_register_models(reg):  # wrong argument name: pluggy rejects it
            pass
        """})
    site.add("kdbt-fine", "0.3", {"fine": "kdbt_fine"}, {"kdbt_fine": method_module("fine_m")})
    reg = load_registry()

    broken = broken_by_dist(reg)
    assert set(broken) == {"kdbt-hookfail", "kdbt-badparams", "kdbt-badsig"}
    assert "RuntimeError: hook exploded" in broken["kdbt-hookfail"][0].error
    assert "params must be a kdbench.api.Params subclass" in broken["kdbt-badparams"][0].error
    assert "reg" in broken["kdbt-badsig"][0].error
    assert "bad_params" not in reg.names("student_method")
    assert reg.find("student_method", "fine_m").dist == "kdbt-fine"
    for kind, names in BUILTIN.items():
        assert names <= set(reg.names(kind)), kind


def test_registering_a_name_twice_in_one_dist_is_recorded(site):
    site.add("kdbt-twice", "0.1", {"t": "kdbt_twice"},
             {"kdbt_twice": method_module("twice_m", "twice_m")})
    reg = load_registry()
    (b,) = reg.broken
    assert b.dist == "kdbt-twice" and "registered twice" in b.error


# ------------------------------------------------------------------------ (d) name clash
def test_two_dists_same_name_need_the_qualified_name(site, tmp_path):
    site.add("kdbt-one", "1.0", {"one": "kdbt_one"},
             {"kdbt_one": method_module("twin", help="twin from one")})
    site.add("kdbt-two", "2.0", {"two": "kdbt_two"},
             {"kdbt_two": method_module("twin", help="twin from two")})
    reg = load_registry()
    assert reg.broken == []

    with pytest.raises(UserError) as exc:
        reg.find("student_method", "twin")
    msg = str(exc.value)
    assert "kdbt-one:twin" in msg and "kdbt-two:twin" in msg and "several distributions" in msg
    one = reg.find("student_method", "kdbt-one:twin")
    two = reg.find("student_method", "kdbt-two:twin")
    assert (one.dist, one.version, one.help) == ("kdbt-one", "1.0", "twin from one")
    assert (two.dist, two.version, two.help) == ("kdbt-two", "2.0", "twin from two")
    assert one.factory.__module__ == "kdbt_one" and two.factory.__module__ == "kdbt_two"
    assert [p.dist for p in reg.all("student_method") if p.name == "twin"] in (
        ["kdbt-one", "kdbt-two"], ["kdbt-two", "kdbt-one"])
    with pytest.raises(UserError, match="unknown student method"):
        reg.find("student_method", "kdbt-three:twin")

    # A recipe that uses the bare name gets the same error, located; the qualified one loads.
    def recipe(name: str) -> Path:  # the tiny recipe with one method set, which uses `name`
        return write_tiny_recipe(tmp_path / f"{name.replace(':', '_')}.toml",
                                 method_sets=[{"methods": [{"name": "ce", "weight": 0.1}, {"name": name}]}])

    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe("twin"), reg)
    (problem,) = exc.value.problems
    assert "method_sets[0].methods[1].name" in problem
    assert "kdbt-one:twin" in problem and "kdbt-two:twin" in problem
    loaded = load_recipe(recipe("kdbt-two:twin"), reg)
    assert loaded.recipe.method_sets[0].methods[1].name == "kdbt-two:twin"


# --------------------------------------------------------------- (e) clash with a built-in
def test_third_party_kd_clashes_with_the_builtin(site):
    site.add("kdbt-kd", "0.9", {"kd": "kdbt_kd"}, {"kdbt_kd": method_module("kd", help="my kd")})
    reg = load_registry()
    assert reg.broken == []

    with pytest.raises(UserError) as exc:
        reg.find("student_method", "kd")
    assert "kdbench:kd" in str(exc.value) and "kdbt-kd:kd" in str(exc.value)
    builtin = reg.find("student_method", "kdbench:kd")
    assert builtin.dist == "kdbench" and builtin.factory.__module__ == "kdbench_plugins.students.kd"
    mine = reg.find("student_method", "kdbt-kd:kd")
    assert mine.dist == "kdbt-kd" and mine.help == "my kd"
    # Only the clashing name is affected.
    assert reg.find("student_method", "fitnet").dist == "kdbench"


def test_same_name_in_another_kind_is_no_clash(site):
    site.add("kdbt-model-kd", "0.1", {"m": "kdbt_model_kd"}, {"kdbt_model_kd": """
        from kdbench.api import hookimpl

        @hookimpl
        def kdbench_register_models(register):
            register("kd", lambda num_classes, params: None, help="a model called kd")
        """})
    reg = load_registry()
    assert reg.find("model", "kd").dist == "kdbt-model-kd"
    assert reg.find("student_method", "kd").dist == "kdbench"


# ---------------------------------------------------------------------------- (f) built-ins
def test_builtin_plugins_all_present_and_none_broken(site):
    site.only("kdbench")
    reg = load_registry()
    assert [b for b in reg.broken if b.dist == "kdbench"] == []
    assert reg.broken == []
    for kind, names in BUILTIN.items():
        missing = names - set(reg.names(kind))
        assert not missing, f"{kind}: missing {sorted(missing)}"
    for kind in BUILTIN:
        for plugin in reg.all(kind):
            assert plugin.dist == "kdbench" and plugin.version == kdbench.__version__
            assert plugin.help, f"{kind} {plugin.name} has no help line"
            assert issubclass(plugin.params, Params)
            assert reg.find(kind, plugin.name) is plugin
            assert reg.find(kind, plugin.qualified_name) is plugin
    assert reg.versions() == {"kdbench": kdbench.__version__}


# ------------------------------------------------------- known gaps (see the helper's report)
def test_a_failing_register_hook_contributes_nothing(site):
    site.add("kdbt-partial", "0.1", {"p": "kdbt_partial"}, {"kdbt_partial": """
        from kdbench.api import StudentMethod, hookimpl

        @hookimpl
        def kdbench_register_student_methods(register):
            register("partial_ok", StudentMethod)
            raise RuntimeError("failed after registering one name")
        """})
    reg = load_registry()
    assert [b.dist for b in reg.broken] == ["kdbt-partial"]
    assert "partial_ok" not in reg.names("student_method")


def test_a_plugin_module_without_hooks_is_reported(site):
    site.add("kdbt-nomark", "0.1", {"n": "kdbt_nomark"}, {"kdbt_nomark": """
        from kdbench.api import StudentMethod

        def kdbench_register_student_methods(register):  # forgot @hookimpl
            register("nomark", StudentMethod)
        """})
    site.add("kdbt-typo", "0.1", {"t": "kdbt_typo"}, {"kdbt_typo": """
        from kdbench.api import StudentMethod, hookimpl

        @hookimpl
        def kdbench_register_student_method(register):  # typo: no such hook
            register("typo", StudentMethod)
        """})
    reg = load_registry()
    assert {b.dist for b in reg.broken} == {"kdbt-nomark", "kdbt-typo"}


def test_distribution_names_are_normalised(site):
    site.add("Kdbt_Fancy.Name", "0.1", {"f": "kdbt_fancy"},
             {"kdbt_fancy": method_module("fancy_m")})
    site.only("kdbt-fancy-name")  # PEP 503 spelling of the same distribution
    reg = load_registry()
    assert reg.find("student_method", "kdbt-fancy-name:fancy_m").name == "fancy_m"


def test_unresolvable_names_are_rejected_at_registration(site):
    site.add("kdbt-colon", "0.1", {"c": "kdbt_colon"}, {"kdbt_colon": """
        from kdbench.api import StudentMethod, hookimpl

        @hookimpl
        def kdbench_register_student_methods(register):
            register("a:b", StudentMethod)  # find("a:b") looks for "b" in a dist called "a"
        """})
    reg = load_registry()
    assert [b.dist for b in reg.broken] == ["kdbt-colon"]
    assert "a:b" not in reg.names("student_method")
