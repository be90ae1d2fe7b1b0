"""Run in a Python that has mlx[cpu] and mlx-lm: load BASE (a Hugging Face checkpoint folder) in
mlx-lm, apply the mlx-lm adapter ADAPTER, and write the logits for IDS (JSON) to OUT (JSON).

    python tests/runtimes/mlx_logits.py BASE ADAPTER OUT '[[1, 2, 3]]'
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load_model

base, adapter, out, ids = sys.argv[1:5]
model, _ = load_model(Path(base))
model = load_adapters(model, adapter)
model.eval()
logits = model(mx.array(json.loads(ids))).astype(mx.float32)
Path(out).write_text(json.dumps(logits.tolist()))
