"""Converting as a user does: ``adamoe-convert``'s own ``main`` called in this process (the
console script itself is run once, by tests/convert/test_roundtrip_and_errors.py), and the
exported model loaded as transformers loads remote code: in this process (its copied modeling
file, not this package's), or in a fresh interpreter that has only transformers."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import torch

from tests.runs import REPO, run_pretrain

TIMEOUT_S = 600


def convert(*args, check=True) -> subprocess.CompletedProcess:
    """``adamoe-convert ARGS`` through its ``main``: (status, stdout, stderr) as a process gives
    them."""
    from megatron_adamoe.hf.cli import main

    argv = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        returncode = main(argv)
    result = subprocess.CompletedProcess(argv, returncode, out.getvalue(), err.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"convert {argv} failed ({result.returncode}):\n{result.stderr}")
    return result


def convert_command(*args) -> subprocess.CompletedProcess:
    """The installed console script ``adamoe-convert ARGS`` in a process of its own."""
    script = os.path.join(os.path.dirname(sys.executable), "adamoe-convert")
    return subprocess.run(
        [script, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def remote_code_outputs(hf_dir, tokens, prompt, steps) -> dict:
    """Logits and greedy generation of the exported model, its classes imported by transformers
    from the files copied into ``hf_dir`` (what ``trust_remote_code=True`` loads; in this process
    the Auto classes would prefer the registered package classes, so the ``auto_map`` entries
    are resolved directly)."""
    import json

    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with open(os.path.join(hf_dir, "config.json")) as handle:
        model_ref = json.load(handle)["auto_map"]["AutoModelForCausalLM"]
    with open(os.path.join(hf_dir, "tokenizer_config.json")) as handle:
        tokenizer_ref = json.load(handle)["auto_map"]["AutoTokenizer"][0]
    model_class = get_class_from_dynamic_module(model_ref, str(hf_dir))
    tokenizer_class = get_class_from_dynamic_module(tokenizer_ref, str(hf_dir))
    model = model_class.from_pretrained(hf_dir, **_float32(torch.float32))
    tokenizer = tokenizer_class.from_pretrained(hf_dir)
    with torch.no_grad():
        logits = model.eval()(tokens).logits
    model.generation_config.eos_token_id = None  # all steps, even past an end-of-document
    generated = model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True)
    return {
        "logits": logits,
        "generated": generated,
        "model_class": type(model).__module__,
        "tokenizer_class": type(tokenizer).__module__,
    }


def _float32(dtype):
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


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
    """``remote_code_outputs`` in a fresh interpreter that has only transformers (it checks that
    no megatron module was imported)."""
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
