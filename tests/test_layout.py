"""The layout's promises: imports run one way, and our packages shadow nothing transformers imports.

transformers (5.2x) depends on the hub `kernels` distribution and imports it when a model module loads; a
top-level `kernels` package of ours would shadow it from the repository root and break every model import
(the CI failure of 2026-12-03). Ours is `qkernels`."""

import ast
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
