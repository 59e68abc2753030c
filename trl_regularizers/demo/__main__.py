"""``python -m trl_regularizers.demo``: run experiments (a)-(e) and write the report folder."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m trl_regularizers.demo", description=__doc__)
    parser.add_argument("--out", default="reports/demo", help="Report folder (created).")
    parser.add_argument("--quick", action="store_true", help="CI-sized runs (a few steps each).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: the tiny model's ops are too small to split, and on a loaded 2-core "
        "machine two threads made the GRPO runs several times slower). The numbers can differ slightly with it.",
    )
    parser.add_argument("--base", default=None, help="A folder written by `python -m trl_regularizers.demo.pretrain` (default: the embedded model).")
    args = parser.parse_args(argv)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)

    import torch
    from transformers.utils import logging as hf_logging

    from trl_regularizers.demo.pretrain import INFO_FILE, base_model_path
    from trl_regularizers.demo.report import summarize, write_report
    from trl_regularizers.demo.runs import DemoSize, drift_vs_forgetting, run_dpo, run_grpo, run_reward, run_reward_aware

    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        size = DemoSize.named(args.quick)
        timings: dict[str, float] = {}

        def timed(part: str, fn, *fn_args):
            print(f"[demo] {part} ...", flush=True)
            started = time.time()
            result = fn(*fn_args)
            timings[part] = time.time() - started
            return result

        base = args.base or timed("pretrained model", base_model_path)
        base_info = json.loads((Path(base) / INFO_FILE).read_text())
        dpo = timed("(a) DPO", run_dpo, base, out / "a_dpo", size, args.seed)
        grpo = timed("(b) GRPO", run_grpo, base, out / "b_grpo", size, args.seed)
        fit = drift_vs_forgetting(dpo + grpo)
        reward = timed("(d) reward model", run_reward, base, out / "d_reward", size, args.seed)
        reward_aware = timed("(e) reward-aware DPO", run_reward_aware, base, out / "e_reward_aware", size, args.seed)
        summary = summarize(base_info, dpo, grpo, fit, reward, timings, reward_aware)
        report = write_report(out, summary, dpo, grpo, reward, args.quick, reward_aware)
        print(f"[demo] report: {report}  (total {sum(timings.values()):.0f} s)", flush=True)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)
    return report


if __name__ == "__main__":
    main()
