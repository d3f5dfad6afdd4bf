#!/usr/bin/env python
"""Held-out loss of LRC's starting points, before any training.

For a training config (default: the tiny profile's), build the student at every `lrc.init`
(normal = the paper's N(0, 0.02); prune; prune_scaled; pca with the tied and with an untied head),
export it, and score it on the same held-out blocks the trainer uses (train.eval_batches x
train.batch_size). Writes a tidy CSV: init, untie_lm_head, metric, value (+ the teacher's row).

    python benchmarks/init_starts.py --config config/tiny.yaml --output results/tiny/tables/init_starts.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrc_src.cli import int_at_least

ROOT = Path(__file__).resolve().parents[1]
STARTS = [("normal", False), ("prune", False), ("prune_scaled", False), ("pca", False), ("pca", True)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/init_starts.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "config" / "tiny.yaml"), help="training config (teacher, data, d_S)")
    p.add_argument("--output", required=True, help="CSV to write")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    args = p.parse_args(argv)

    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from lrc_src.analysis import heldout_loss
    from lrc_src.assets import load_inputs
    from lrc_src.config import load_config
    from lrc_src.factory import build_method
    from lrc_src.fileio import write_csv_atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        base = load_config(args.config)
        inputs = load_inputs(base)
        teacher, train_blocks, held = inputs.teacher, inputs.train, inputs.heldout
    except (FileNotFoundError, ValueError) as e:
        print(f"init_starts.py: error: {e}", file=sys.stderr)
        return 2
    acc = Accelerator(cpu=True, mixed_precision="no")
    n, bs = base.train.eval_batches * base.train.batch_size, base.train.batch_size
    rows = [
        {
            "init": "teacher",
            "untie_lm_head": "",
            "metric": "heldout_loss",
            "value": heldout_loss(teacher, held[:n], bs, acc),
        }
    ]
    for init, untie in tqdm(STARTS, desc="starts"):
        cfg = load_config(args.config, [f"lrc.init={init}", f"lrc.untie_lm_head={str(untie).lower()}"])
        method = build_method(cfg, teacher, train_blocks)  # lrc: the clone at its start
        rows.append(
            {
                "init": init,
                "untie_lm_head": untie,
                "metric": "heldout_loss",
                "value": heldout_loss(method.eval_model(), held[:n], bs, acc),
            }
        )
        print(f"{init:13s} untie={untie!s:5s} held-out loss {rows[-1]['value']:.3f}", flush=True)
    import pandas as pd

    write_csv_atomic(pd.DataFrame(rows), args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
