"""The distribution: one import namespace, a console script, and no clash with the ML stack.

The folders ``model/``, ``kernels/``, ``actors/``, ``jobs/`` and ``cluster/`` install as
``griffin_batch.<name>``. Hugging Face's ``kernels`` package (a dependency of current
transformers) must win the bare name ``kernels`` everywhere, the repository root included,
so ``kernels/`` has no ``__init__.py``. The slow test builds the wheel and installs it into
a fresh venv beside transformers, as a user would; with uv, reading pip's own configuration
(indexes, find-links, constraints), because pip takes minutes to unpack the ML stack.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ("model", "kernels", "actors", "jobs", "cluster")
BIN = pathlib.Path(sys.executable).parent


def _run(cmd, *, cwd=ROOT, env=None, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _uv_env() -> dict[str, str]:
    """This environment, plus pip's configuration (files and ``PIP_*``) as uv reads it.

    Resolving like pip: every index, best version across them.
    """
    config = _run([sys.executable, "-m", "pip", "config", "list"]).stdout
    pip = {}
    for line in config.splitlines():
        key, _, value = line.partition("=")
        pip[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    for name in ("index-url", "extra-index-url", "find-links", "constraint"):
        env_value = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env_value:
            pip[name] = env_value
    uv = {"index-url": "UV_DEFAULT_INDEX", "extra-index-url": "UV_INDEX",
          "find-links": "UV_FIND_LINKS", "constraint": "UV_CONSTRAINT"}
    env = {**os.environ, "UV_INDEX_STRATEGY": "unsafe-best-match"}
    env.update({uv[k]: v for k, v in pip.items() if k in uv and v})
    return env


def test_lint_passes_and_bans_bare_folder_imports():
    """``ruff`` (flake8-tidy-imports) rejects ``import kernels`` & co.; the tree has none."""
    _run([str(BIN / "ruff"), "check", "--quiet", "."])
    for line in ("import kernels", "from model import engine", "from jobs.config import JobConfig"):
        proc = subprocess.run(
            [str(BIN / "ruff"), "check", "--stdin-filename", "x.py", "-"],
            cwd=ROOT, input=line + "\n", capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 1 and "TID251" in proc.stdout, (line, proc.stdout)


def test_kernels_folder_yields_the_name_to_hugging_face():
    """From the repository root, ``import kernels`` is the installed package, not our folder."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    for name in FOLDERS:
        if name != "kernels":
            assert (ROOT / name / "__init__.py").exists(), name
    proc = _run([sys.executable, "-c", "import kernels; print(kernels.__file__)"])
    where = proc.stdout.strip()
    assert where != "None" and not where.startswith(str(ROOT / "kernels")), where
    # Hugging Face's package, the one transformers imports from.
    from kernels import CUDAProperties  # noqa: F401, TID251


def test_every_package_folder_is_listed_for_the_wheel():
    """``packages`` in pyproject.toml is an explicit list: a new subpackage missing from it
    works in an editable install and is absent from the wheel."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {(ROOT / d).resolve(): name for name, d in setuptools["package-dir"].items()}
    found = set()
    for folder, name in folders.items():
        for init in folder.rglob("__init__.py"):
            sub = init.parent
            # The nearest mapped folder above (or at) this one names it.
            base = max((f for f in folders if sub == f or f in sub.parents),
                       key=lambda f: len(f.parts))
            if base == folder and "__pycache__" not in sub.parts:
                found.add(".".join([name, *sub.relative_to(folder).parts]))
    assert found - set(setuptools["packages"]) == set(), "add these to pyproject.toml's packages"


def test_console_script_and_module_entry_points():
    top = _run([str(BIN / "griffin-batch"), "--help"]).stdout
    assert "generate" in top
    sub = _run([str(BIN / "griffin-batch"), "generate", "--help"]).stdout
    assert sub.startswith("usage: griffin-batch generate") and "--max-prompt-tokens" in sub
    mod = _run([sys.executable, "-m", "griffin_batch.jobs.generate", "--help"]).stdout
    assert "--input" in mod and "python -m griffin_batch.jobs.generate" in mod


# What the command line imports before it runs: the subcommand's module, never the others'.
_IMPORTS_FOR = """
import contextlib, io, json, sys
from griffin_batch.jobs import cli
argv = json.loads(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    cli.main(argv)
print(json.dumps(sorted(m for m in ("ray", "pandas", "jax", "ml_dtypes") if m in sys.modules)))
"""


@pytest.mark.parametrize("argv, heavy", [
    (["--help"], []),  # names the subcommands only
    (["status", "--help"], ["pandas", "ray"]),  # row ids (pandas), the fault classes (Ray)
])
def test_command_line_imports_only_what_its_subcommand_needs(argv, heavy):
    # All five subcommands' modules took 2.1 s to import, paid by every `--help` and `status`.
    out = _run([sys.executable, "-c", _IMPORTS_FOR, json.dumps(argv)]).stdout
    assert json.loads(out) == heavy


# One process: transformers loads the demo checkpoint with hub kernels at their default
# (USE_HUB_KERNELS unset), then griffin_batch samples from the same files. Logits of the two
# must agree to 1e-4, both computing in float32 on CPU.
_BOTH_IN_ONE_PROCESS = """
import json, sys
import numpy as np, torch, transformers, kernels
from griffin_batch import model
from griffin_batch.model import demo
ckpt, tok_path = demo.demo_checkpoint_path(), demo.demo_tokenizer_path()
hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(str(ckpt), torch_dtype=torch.float32)
config, params = model.load_checkpoint(str(ckpt), dtype="float32")  # stored as bfloat16
tokenizer = model.load_tokenizer(str(tok_path))
ids = tokenizer.encode("The capital of France is", add_bos=True)
with torch.no_grad():
    theirs = hf(torch.tensor([ids])).logits.float().numpy()
ours = np.asarray(model.forward_logits(config, params, np.asarray([ids], np.int32)))
out = model.sample(config, params, tokenizer, ["The capital of France is"], max_tokens=8)
print(json.dumps({
    "kernels": kernels.__file__, "griffin_batch": model.__file__,
    "max_abs_diff": float(np.abs(theirs - ours).max()),
    "tokens": out[0].tokens, "finish_reason": out[0].finish_reason,
}))
"""


@pytest.mark.slow
def test_wheel_installs_beside_transformers(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)])
    (wheel,) = dist.glob("griffin_batch-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"griffin_batch", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    assert "griffin_batch/model/assets/demo/checkpoint/model.safetensors" in names
    assert "griffin_batch/kernels/__init__.py" not in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    # Current transformers (it brings Hugging Face's `kernels`) and the CPU torch on local disk.
    _run([str(BIN / "uv"), "pip", "install", "-q", "--python", str(py), str(wheel),
          "transformers", "torch==2.13.0"], env=_uv_env(), timeout=900)
    site = pathlib.Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    assert (site / "kernels" / "__init__.py").exists(), "transformers' kernels dependency missing"
    for name in FOLDERS:
        if name != "kernels":
            assert not (site / name).exists(), f"{name} at the top level of site-packages"

    env = {k: v for k, v in os.environ.items() if k not in ("USE_HUB_KERNELS", "PYTHONPATH")}
    # From the repository root, where `-c` puts our own `kernels/` folder first on sys.path, as
    # `python -m pytest` does: the case that broke. Run elsewhere, only the console script below.
    proc = _run([str(py), "-c", _BOTH_IN_ONE_PROCESS], cwd=ROOT, env=env, timeout=600)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"max abs diff of logits vs transformers {got['max_abs_diff']:.3g}")
    assert got["kernels"].startswith(str(site)), got
    assert got["griffin_batch"].startswith(str(site)), got
    assert got["max_abs_diff"] < 1e-4, got
    assert len(got["tokens"]) == 8 and got["finish_reason"] == "length", got
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = shutil.which("griffin-batch", path=str(venv / "bin"))
    assert script is not None
    assert "generate" in _run([script, "--help"], cwd=elsewhere).stdout
