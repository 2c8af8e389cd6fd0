"""Run in a FRESH process: reload a saved checkpoint with plain transformers while ``optimum_a3`` is unimportable.

Usage: python reload_check.py CHECKPOINT_DIR REFERENCE.pt  — prints a JSON line with the results.
"""

import json
import sys


class _BlockOptimumA3:
    def find_spec(self, name, path=None, target=None):
        if name == "optimum_a3" or name.startswith("optimum_a3."):
            raise ImportError("optimum_a3 is blocked in this process")
        return None


sys.meta_path.insert(0, _BlockOptimumA3())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

checkpoint, reference = sys.argv[1], sys.argv[2]
ref = torch.load(reference)
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
try:
    import optimum_a3  # noqa: F401

    importable = True
except ImportError:
    importable = False
with torch.no_grad():
    logits = model(ref["input_ids"]).logits
prompt = ref["input_ids"][:1, :6]
cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
print(json.dumps({
    "class_module": type(model).__module__,
    "optimum_a3_importable": importable,
    "max_abs_diff": (logits - ref["logits"]).abs().max().item(),
    "logits_equal": bool(torch.equal(logits, ref["logits"])),
    "generate_cached_equals_uncached": bool(torch.equal(cached, uncached)),
    "generated_equals_in_memory": bool(torch.equal(cached, ref["generated"])),
}))
