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
