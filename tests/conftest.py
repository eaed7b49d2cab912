import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(os.cpu_count())


@pytest.fixture(scope="session")
def tiny_llama():
    from actors import zoo

    return zoo.load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def smollm():
    from actors import zoo

    return zoo.load_model(zoo.SMOLLM2, device="cpu")


@pytest.fixture(scope="session")
def chat_prompt(smollm):
    _, tok = smollm
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 17 * 23? Think step by step."}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


# CI run of 2026-12-04: all 215 tests passed, then the interpreter crashed while finalising (SIGSEGV, exit 139),
# which fails `make test`. By then this process holds daemon threads of native libraries: a GRPOTrainer-AsyncLoop
# thread per TRL GRPO trainer, W&B's service threads and its wandb-core child, tqdm's monitor; their teardown
# order at finalisation is not ours to fix. So once pytest has written its report, the W&B service is stopped
# and the process exits with pytest's status without running interpreter finalisation.
# SPECMOE_PYTEST_FINALIZE=1 keeps the normal exit (with `python -X faulthandler` to see where a crash is).
_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status[:] = [int(exitstatus)]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import sys

    if not _exit_status or os.environ.get("SPECMOE_PYTEST_FINALIZE") == "1":
        return
    if "wandb" in sys.modules:
        try:
            sys.modules["wandb"].teardown()
        except Exception as exc:  # the report is written; a failed teardown must not change the status
            print(f"wandb teardown: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[0])
