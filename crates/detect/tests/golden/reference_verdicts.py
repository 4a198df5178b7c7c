"""What the reference libraries say about each adversarial case: `safetensors` for the
.safetensors cases, gguf-py's GGUFReader for the .gguf cases.

The cases are detect::corpus::cases(), as `cargo xtask fixtures` writes them to
fixtures/adversarial/. Run with a Python that has `safetensors` and `gguf` (the project uses /work/pyref):

    /work/pyref/bin/python crates/detect/tests/golden/reference_verdicts.py fixtures/adversarial

Writes reference_verdicts.json next to this script: {case name: "rejected" | "accepted"}.
"""

import json
import os
import sys

from gguf import GGUFReader
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))


def main(corpus_dir):
    with open(os.path.join(corpus_dir, "expected.json")) as f:
        cases = json.load(f)
    verdicts = {}
    for name in cases:
        path = os.path.join(corpus_dir, name)
        if os.path.isdir(path) or not name.endswith((".safetensors", ".gguf")):
            continue
        try:
            if name.endswith(".gguf"):
                GGUFReader(path)
            else:
                with safe_open(path, "np") as f:
                    list(f.keys())
            verdicts[name] = "accepted"
        except Exception:  # noqa: BLE001 - any refusal counts
            verdicts[name] = "rejected"
    with open(os.path.join(HERE, "reference_verdicts.json"), "w") as f:
        json.dump(verdicts, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
