"""Converting as a user does (tools/convert_checkpoint.py), a checkpoint trained a few steps by
the real entry point, and the exported model run in a fresh interpreter that has only
transformers (remote code)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.runs import REPO, run_pretrain

TIMEOUT_S = 600


def convert(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"convert {args} failed ({result.returncode}):\n{result.stderr}")
    return result


_REMOTE_CODE_SCRIPT = """
import sys
import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer
hf_dir, inputs, outputs = sys.argv[1:4]
dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                             **{dtype_kwarg: torch.float32})
tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
assert not [m for m in sys.modules if m.startswith("megatron")], "remote code imported megatron"
tokens, prompt, steps = torch.load(inputs)
with torch.no_grad():
    logits = model.eval()(tokens).logits
model.generation_config.eos_token_id = None  # all steps, even past an end-of-document
generated = model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True)
torch.save({"logits": logits, "generated": generated, "model_class": type(model).__module__,
            "tokenizer_class": type(tokenizer).__module__}, outputs)
"""


def remote_code_run(hf_dir, tokens, prompt, steps, tmp_path) -> dict:
    """Logits and greedy generation of the exported model in a fresh interpreter that has only
    transformers (``trust_remote_code=True``, the files copied into ``hf_dir``)."""
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save((tokens, prompt, steps), inputs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_CODE_SCRIPT, str(hf_dir), str(inputs), str(outputs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(outputs)


def train_checkpoint(corpus, directory, *overrides, nproc=2):
    """A few training steps of the small model (EP = 2 unless overridden), saved under
    ``directory``."""
    run_pretrain(corpus, "--train-iters", "3", "--save", str(directory), *overrides, nproc=nproc)
    return directory
