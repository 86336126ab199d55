"""Packaging: a slim core, extras that name themselves when missing, lazy imports, a torch-free CLI front.

Import costs are checked by the modules a fresh interpreter loads (a subprocess each), not by timings:
the test machines are too noisy for timed assertions.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradflow_agent
from gradflow_agent import _optional
from gradflow_agent._optional import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_TOP = {"tensorboard", "mlflow", "wandb",
                "rich", "tqdm", "matplotlib", "nbformat", "nbclient", "ipykernel", "IPython", "transformers",
                "accelerate", "lightning", "pytorch_lightning", "grafana_foundation_sdk", "scipy"}
NOT_CORE = ("gradflow_agent.analyze", "gradflow_agent.report", "gradflow_agent.dynamics", "gradflow_agent.initcheck",
            "gradflow_agent.integrations", "gradflow_agent.alerting", "gradflow_agent.demo")
CORE_DEPS = {"torch", "numpy", "pyyaml", "prometheus-client", "opentelemetry-sdk",
             "opentelemetry-exporter-otlp-proto-http", "bcrypt", "requests", "urllib3"}
MODULE_DIST = {"grafana_foundation_sdk": "grafana-foundation-sdk",
               "mlflow": "mlflow-skinny"}  # import name -> distribution, where they differ


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)


def _imported(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and "|" in line} - {"package"}


def _new_modules(code: str) -> set[str]:
    """Modules that `code` imports on top of torch, in a fresh interpreter."""
    probe = ("import sys, torch\nbase = set(sys.modules)\n" + code +
             "\nprint('\\n'.join(sorted(set(sys.modules) - base)))")
    out = _python(probe)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# -- import cost ---------------------------------------------------------------------------------------------------

def test_import_gradflow_agent_loads_nothing_heavy():
    out = _python("import sys, gradflow_agent\nprint('\\n'.join(sorted(sys.modules)))")
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "torch" not in loaded
    assert not {m for m in loaded if m.split(".")[0] in OPTIONAL_TOP}
    assert {m for m in loaded if m.startswith("gradflow_agent")} == {"gradflow_agent"}


def test_attach_loads_only_the_core():
    new = _new_modules("import gradflow_agent\ngradflow_agent.attach\nfrom gradflow_agent import Agent, Snapshot")
    assert "gradflow_agent.agent" in new
    assert not {m for m in new if m.split(".")[0] in OPTIONAL_TOP}, "an optional package in the core"
    assert not {m for m in new if m.startswith(NOT_CORE)}, "a non-core gradflow_agent module in the core"
    assert "opentelemetry" not in {m.split(".")[0] for m in new}, "exporters are imported only when configured"
    heavy = {"torch.distributed.tensor", "torch._dynamo.convert_frame"}  # 0.5 s each; only FSDP2 / compile need them
    assert not heavy & set(new), heavy & set(new)


def test_the_live_agent_runs_on_a_core_install():
    """attach, steps, a scrape of /metrics and detach with every optional package absent."""
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in sorted(OPTIONAL_TOP)) +
            "import urllib.request, torch, gradflow_agent\n"
            "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
            "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
            "cfg = {'exporters': {'prometheus': {'port': 0, 'addr': '127.0.0.1'}}}\n"
            "agent = gradflow_agent.attach(model, cfg, optimizer=opt)\n"
            "for _ in range(5):\n"
            "    loss = model(torch.randn(16, 4)).pow(2).mean()\n"
            "    loss.backward(); opt.step(); opt.zero_grad(); agent.step(loss=loss)\n"
            "body = urllib.request.urlopen(agent.prometheus_url, timeout=30).read().decode()\n"
            "agent.detach()\n"
            "print('gradflow_agent_' in body)")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "True\n"


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_cli_front_does_not_import_torch(argv):
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradflow_agent", *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = _imported(out.stderr)
    assert "gradflow_agent.cli" in loaded
    assert not {m for m in loaded if m.split(".")[0] in OPTIONAL_TOP | {"torch", "numpy", "yaml"}}
    assert not {m for m in loaded if m.startswith(("gradflow_agent.agent", *NOT_CORE))}


def test_console_script_front_does_not_import_torch():
    code = ("import sys\nfrom gradflow_agent.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            "print('torch' in sys.modules, 'gradflow_agent.demo' in sys.modules)")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"gradflow-agent {gradflow_agent.__version__}", "False False"]


# -- version -------------------------------------------------------------------------------------------------------

def test_version_has_one_source(pyproject):
    project = pyproject["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gradflow_agent.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev)?\d*", gradflow_agent.__version__)


def test_python_m_version():
    out = subprocess.run([sys.executable, "-m", "gradflow_agent", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"gradflow-agent {gradflow_agent.__version__}\n"


def test_cli_pathologies_match_the_demo():
    from gradflow_agent import cli, demo

    assert cli.PATHOLOGIES == demo.PATHOLOGIES


# -- dependencies and extras ---------------------------------------------------------------------------------------

def test_core_dependencies_are_the_live_agent(pyproject):
    deps = pyproject["project"]["dependencies"]
    assert {_name(d) for d in deps} == CORE_DEPS
    torch_req = next(d for d in deps if _name(d) == "torch")
    assert "==" not in torch_req and ">=" in torch_req, "torch stays a range: never pin another torch build"


def test_extras_table(pyproject):
    extras = {name: set(reqs) for name, reqs in pyproject["project"]["optional-dependencies"].items()}
    features = set(extras) - {"all", "test"}
    assert features == set(_optional.EXTRA_MODULES)
    for extra in features:
        assert extras[extra] <= extras["all"], f"[all] lacks part of [{extra}]"
        assert {_name(r) for r in extras[extra]} == {
            _name(MODULE_DIST.get(m, m)) for m in _optional.EXTRA_MODULES[extra]}, extra
    assert extras["all"] <= extras["test"]
    assert set().union(*(extras[e] for e in features)) == extras["all"]
    test_tools = {"pytest", "pytest-timeout", "scipy", "ruff", "opentelemetry-proto",
                  "opentelemetry-exporter-prometheus", "kubernetes-validate", "cloudcoil-models-prometheus-operator",
                  "check-jsonschema"}
    assert test_tools <= {_name(r) for r in extras["test"]}
    assert not {_name(r) for r in extras["all"]} & CORE_DEPS


def test_project_urls_and_license(pyproject):
    project = pyproject["project"]
    assert {"Homepage", "Repository", "Issues", "Changelog"} <= set(project["urls"])
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and "## [0.1.0]" in changelog


def test_install_script_installs_every_extra():
    script = (ROOT / "scripts" / "install.sh").read_text(encoding="utf-8")
    assert re.search(r"pip install .*torch==", script), "torch first, pinned"
    assert '-e ".[test]"' in script


# -- a missing extra is one line -----------------------------------------------------------------------------------

def _without(modules: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run `code` as if `modules` were not installed (a None entry makes their import raise ImportError)."""
    hide = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return _python("import sys\n" + hide + code)


def _line(extra: str, feature: str) -> str:
    return f"{feature} needs the {extra} extra: pip install 'gradflow-agent[{extra}]'"


@pytest.mark.parametrize(("missing", "argv", "extra", "feature"), [
    (("nbformat",), ["init-check", "list"], "initcheck", "gradflow-agent init-check"),
    (("tqdm",), ["init-check", "list"], "initcheck", "gradflow-agent init-check"),
    (("rich",), ["demo", "--steps", "1", "--port", "0", "--quiet"], "demo", "gradflow-agent demo"),
    (("grafana_foundation_sdk",), ["dashboards", "--check"], "dashboards", "gradflow-agent dashboards"),
])
def test_cli_names_the_missing_extra(missing, argv, extra, feature):
    out = _without(missing, f"from gradflow_agent.cli import main\nraise SystemExit(main({argv!r}))")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [_line(extra, feature)]
    assert out.stdout == ""


def test_cli_debug_shows_the_traceback():
    out = _without(("nbformat",), "from gradflow_agent.cli import main\nmain(['--debug', 'init-check', 'list'])")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "MissingExtraError" in out.stderr


@pytest.mark.parametrize(("missing", "code", "extra", "feature"), [
    (("tqdm",), "import gradflow_agent.initcheck", "initcheck", "gradflow_agent.initcheck"),
    (("nbformat",), "import gradflow_agent.initcheck.notebook", "initcheck", "gradflow_agent.initcheck"),
    (("transformers",), "from gradflow_agent.integrations import GradflowCallback", "hf",
     "gradflow_agent.integrations.GradflowCallback"),
    (("lightning", "pytorch_lightning"), "from gradflow_agent.integrations import GradflowLightningCallback",
     "lightning", "gradflow_agent.integrations.GradflowLightningCallback"),
    (("rich",), "from gradflow_agent.report import ConsoleReporter\nConsoleReporter()", "report",
     "ConsoleReporter (console and text reports)"),
    (("rich",), "import gradflow_agent.report.live", "demo", "gradflow_agent.report.live (the demo's tables)"),
])
def test_library_names_the_missing_extra(missing, code, extra, feature):
    probe = ("import torch\nfrom gradflow_agent._optional import MissingExtraError\n" +
             "".join(f"sys.modules[{m!r}] = None\n" for m in missing) +
             "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
             "except MissingExtraError as exc:\n    assert isinstance(exc, ImportError)\n    print(exc)\n"
             "else:\n    print('imported')")
    out = _python("import sys\n" + probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [_line(extra, feature)]


def test_html_report_needs_no_extra():
    out = _without(("rich",), "import gradflow_agent.report.html, gradflow_agent.report.flow_report\nprint('ok')")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"


def test_require_names_a_broken_package(tmp_path, monkeypatch):
    (tmp_path / "gf_broken_pkg").mkdir()
    (tmp_path / "gf_broken_pkg" / "__init__.py").write_text("import gf_absent_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as info:
        require("gf_broken_pkg", "initcheck", "thing")
    message = str(info.value)
    assert message.startswith(_line("initcheck", "thing") + " (gf_broken_pkg: ")
    assert "gf_absent_dependency_xyz" in message and "\n" not in message


def test_require_takes_alternatives():
    assert require(("gf_no_such_module_xyz", "json"), "report", "thing").__name__ == "json"
    with pytest.raises(ImportError, match=re.escape(_line("report", "thing"))):
        require(("gf_no_such_module_xyz", "gf_no_such_module_abc"), "report", "thing")


def test_is_installed(monkeypatch):
    assert _optional.is_installed("json")
    assert not _optional.is_installed("gf_no_such_module_xyz")
    monkeypatch.setitem(sys.modules, "gf_hidden_xyz", None)
    assert not _optional.is_installed("gf_hidden_xyz.sub")


# -- lazy public names ---------------------------------------------------------------------------------------------

def test_public_names_resolve_lazily():
    code = ("import sys, gradflow_agent as g\n"
            "assert 'gradflow_agent.analyze' not in sys.modules\n"
            "g.Snapshot\n"
            "assert 'gradflow_agent.snapshot' in sys.modules and 'gradflow_agent.analyze' not in sys.modules\n"
            "from gradflow_agent import attach_dynamics\n"
            "assert 'gradflow_agent.dynamics' in sys.modules and 'gradflow_agent.analyze' not in sys.modules\n"
            "cls = g.TransformerAnalyzer\n"
            "from gradflow_agent.analyze.transformer import TransformerAnalyzer\n"
            "assert cls is TransformerAnalyzer\n"
            "print('ok')")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"


def test_every_public_name_resolves():
    from gradflow_agent.analyze.transformer import TransformerAnalyzer
    from gradflow_agent.dynamics import AnalysisConfig

    assert set(gradflow_agent.__all__) == set(gradflow_agent._WHERE) | {"__version__"}
    for name in gradflow_agent.__all__:
        assert getattr(gradflow_agent, name) is not None, name
        assert name in dir(gradflow_agent)
    assert gradflow_agent.TransformerAnalyzer is TransformerAnalyzer
    assert gradflow_agent.AnalysisConfig is AnalysisConfig  # the dynamics one, as before
    assert callable(gradflow_agent.attach)
    assert gradflow_agent.hooks.__name__ == "gradflow_agent.hooks"  # submodules as attributes, as before


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        gradflow_agent.no_such_name  # noqa: B018
    assert not hasattr(gradflow_agent, "__wrapped__")


def test_report_names_resolve_lazily():
    import gradflow_agent.report as report
    from gradflow_agent.report.flow_report import FlowReport

    assert report.FlowReport is FlowReport
    assert set(report.__all__) == set(report._WHERE)
    with pytest.raises(AttributeError):
        report.NoSuchReport  # noqa: B018
