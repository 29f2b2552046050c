"""The quality protocol every peer runs, in its own venv: fxpress is not importable there (other pins).

`benchmarks/bench_peers.py prepare` writes the token windows once (eval windows of both texts, the
64 x 128 calibration windows of the "calib" split) and the SmolLM2 HF directory; a peer script loads
them from that file, quantizes a fresh copy of the model per setting with the peer's own API, and
writes the summed NLL of every eval window (tokens 1..L-1, no BOS: the protocol of bench_quality.py)
to one JSON per peer, so `bench_peers.py table` can bootstrap paired over windows against fxpress.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(peer: str, settings: dict, argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"{peer} on SmolLM2-135M with fxpress's quality protocol")
    ap.add_argument("--windows", required=True, help="the JSON written by `bench_peers.py prepare`")
    ap.add_argument("--settings", default=",".join(settings), help=f"comma list of {', '.join(settings)}")
    ap.add_argument("--out", required=True, help="JSON of per-window NLLs (merged with what is already there)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-fp32", action="store_true",
                    help="skip the fp32 run (the table then pairs against fxpress's fp32 windows: same weights)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.settings.split(",") if s not in settings]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}: choose from {', '.join(settings)}")
    return args


def load_inputs(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    data["eval"] = {name: torch.tensor(w) for name, w in data["eval"].items()}
    data["calib"] = torch.tensor(data["calib"])
    return data


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids -> logits for a Hugging Face model (its output object) or anything already returning logits."""
    if hasattr(model, "config") and isinstance(model, torch.nn.Module):
        return lambda ids: model(input_ids=ids).logits
    return model


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Summed next-token NLL of each window, in float64 sums of float32 log-probabilities."""
    fn, out = logits_fn(model), []
    for batch in windows.split(batch_size):
        logits = fn(batch).float()
        logp = F.log_softmax(logits[:, :-1], -1)
        nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        out += [float(x) for x in nll.double().sum(1)]
    return out


def score(model, inputs: dict) -> dict[str, list[float]]:
    return {name: window_nlls(model, w) for name, w in inputs["eval"].items()}


def write_atomic(path: str, payload: dict | str) -> None:
    """Write text (a dict as JSON) beside the target and rename it over: a killed run leaves no half file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=1))
    os.replace(tmp, target)


def run(peer: str, version: str, settings: dict[str, Callable], argv: list[str] | None = None) -> None:
    """Score fp32 once and every requested setting; a setting that fails is recorded with its error."""
    args = parse_args(peer, settings, argv)
    torch.set_num_threads(args.threads)
    inputs = load_inputs(args.windows)
    old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    payload = {"peer": peer, "version": version, "tokens_per_window": inputs["seq_len"] - 1,
               "rows": old.get("rows", {})}
    payload["fp32"] = old.get("fp32") if args.no_fp32 else score(load_model(inputs["model_dir"]), inputs)
    for name in args.settings.split(","):
        start = time.perf_counter()
        torch.manual_seed(0)
        try:
            model = settings[name](load_model(inputs["model_dir"]), inputs["calib"])
            row = {"nll": score(model, inputs)}
        except Exception as err:  # the table says which setting a peer cannot run, and why
            traceback.print_exc()
            row = {"error": f"{err.__class__.__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        payload["rows"][name] = row
        print(f"{peer} {name}: " + (row.get("error") or " ".join(
            f"{t} ppl {torch.tensor(v).sum().div(len(v) * payload['tokens_per_window']).exp():.3f}"
            for t, v in row["nll"].items())) + f" ({row['seconds']} s)", file=sys.stderr, flush=True)
        write_atomic(args.out, payload)
