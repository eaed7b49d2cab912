"""The layout's promises: imports run one way, and our `kernels` package does not fool transformers."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["pipelines", "speculative", "rewards", "actors", "quant", "kernels"]


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


def test_our_kernels_package_does_not_enable_hub_kernels():
    code = (
        "import kernels, transformers, torch\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert kernels.__file__.startswith(%r), kernels.__file__\n"
        "assert not is_kernels_available()\n"
        "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1)\n"
        "m = transformers.AutoModelForCausalLM.from_config(cfg)\n"
        "assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)\n"
        "print('ok')\n" % str(ROOT / "kernels")
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
