"""Every pretrained file in ../shared/models: data-free quantize, both exports, each file run in its runtime.

Issue 30 asks that every zoo model exports for mobile and mcu at 8 and 4 bits
with no refusal, and that every file runs in its runtime. For each ``.h5``
in ``../shared/models`` (``KERAS_MPQ_ZOO_MODELS`` overrides) and each budget:
``keras_mpq.quantize(path, budget)`` with no data and no other argument
(data-free, keras_mpq's own input range), ``result.export`` for 'mobile'
and 'mcu', and ``keras_mpq.validate_tflite`` of each file in its runtime
(LiteRT, TFLite Micro) on ``--n`` inputs drawn uniformly in the input range
keras_mpq used, against the float model (``reference``): top-1 agreement for
a classifier, output correlation otherwise. Those inputs are not real data,
so the agreement is a check that the file computes the model, not a quality
figure (bench_zoo and bench_any have those, on real inputs). A failure is a
result: its row records the exception.

    .venv/bin/python benchmarks/bench_zoo_exports.py --out benchmarks/results/zoo_exports.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # pylint: disable=g-import-not-at-top

import zoo_data  # pylint: disable=g-import-not-at-top
from keras_mpq.export.targets import RUNTIME_OF_TARGET  # pylint: disable=g-import-not-at-top

TARGETS = ("mobile", "mcu")


def _short(e: BaseException, limit: int = 200) -> str:
  text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _inputs(model, info, n: int, seed: int):
  """``n`` inputs per model input, uniform in the range keras_mpq used for it."""
  rng = np.random.default_rng(seed)
  ranges = ([(r["low"], r["high"]) for r in info["inputs"].values()] if "inputs" in info
            else [(info["low"], info["high"])])
  xs = [rng.uniform(lo, hi, (n,) + tuple(t.shape[1:])).astype(np.float32)
        for (lo, hi), t in zip(ranges, model.inputs)]
  return xs[0] if len(xs) == 1 else xs


def _range_text(info) -> str:
  """'[lo, hi] estimated/assumed' (or one per input) as `quantize` reported it."""
  ranges = info["inputs"] if "inputs" in info else {"": info}
  return "; ".join(
      f"{name + ' ' if name else ''}[{r['low']:g}, {r['high']:g}] {zoo_data.range_how(r)}"
      for name, r in ranges.items())


def _fidelity(v) -> str:
  if v.agreement is not None:
    return f"agreement {100 * v.agreement:.1f}%"
  if v.fidelity:
    return "corr " + ", ".join(f"{d['correlation']:.3f}" for d in v.fidelity.values())
  return "-"


def run_model(path: pathlib.Path, budgets, n: int, seed: int, out_dir: pathlib.Path):
  import keras_mpq  # pylint: disable=g-import-not-at-top
  rows = []
  for budget in budgets:
    start = time.perf_counter()
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = keras_mpq.quantize(str(path), budget, seed=seed, progress=False)
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"model": path.stem, "budget": budget, "target": "-", "error": _short(e)})
      continue
    seconds = time.perf_counter() - start
    info = result.report["input_range"]
    float_model = keras_mpq.load_model(str(path))
    x = _inputs(float_model, info, n, seed)
    for target in TARGETS:
      runtime = RUNTIME_OF_TARGET[target]
      row = {"model": path.stem, "budget": budget, "target": target, "runtime": runtime,
             "quantize_s": seconds, "avg_bits": result.report["achieved"].get("avg_bits"),
             "range": _range_text(info)}
      file = out_dir / f"{path.stem}_{budget}_{target}.tflite"
      try:
        result.export(file, target=target)
        row["kb"] = file.stat().st_size / 1024
        v = keras_mpq.validate_tflite(str(file), x, reference=float_model, runtime=runtime)
        row["check"] = _fidelity(v)
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = _short(e)
      rows.append(row)
  return rows


def markdown(rows, args, started, minutes) -> str:
  ok = sum("error" not in r for r in rows)
  lines = [
      "# Every pretrained file exports and runs: data-free quantize, mobile and mcu, "
      "8 and 4 bits",
      "",
      f"- Command: `.venv/bin/python benchmarks/bench_zoo_exports.py {' '.join(args.argv)}`",
      f"- Date: {started:%Y-%m-%d %H:%M} (took {minutes:.1f} min); {platform.machine()}, "
      f"{os.cpu_count()} CPU cores shared with other jobs, no GPU",
      f"- Models: every .h5 in `{zoo_data.models_dir()}`. Each: `keras_mpq.quantize(path, "
      "budget)` (data-free, nothing else given), both exports, each file run by "
      "`validate_tflite` in its runtime on inputs drawn uniformly in the range keras_mpq "
      f"used ({args.n} per file), against the float model. Not real inputs: 'check' says "
      "the file computes the model; bench_zoo and bench_any measure quality on real inputs.",
      f"- **{ok} of {len(rows)} rows exported and ran**; a failed row names its exception.",
      "",
      "| model | budget | target | runtime | input range | avg bits | KB | quantize s | check "
      "| error |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['budget']} | {r['target']} | {r.get('runtime', '-')} | "
        f"{r.get('range', '-')} | "
        + (f"{r['avg_bits']:.2f}" if r.get("avg_bits") is not None else "-") + " | "
        + (f"{r['kb']:.1f}" if "kb" in r else "-") + " | "
        + (f"{r['quantize_s']:.0f}" if "quantize_s" in r else "-")
        + f" | {r.get('check', '-')} | {r.get('error', '')} |")
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=None,
                 help="comma-separated file stems (default: every .h5 there)")
  p.add_argument("--budgets", default="8bit,4bit")
  p.add_argument("--n", type=int, default=50, help="inputs per file")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(HERE / "results" / "zoo_exports.md"))
  args = p.parse_args(argv)
  args.argv = list(argv if argv is not None else sys.argv[1:])
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  paths = sorted(zoo_data.models_dir().glob("*.h5"))
  if args.models:
    wanted = set(args.models.split(","))
    paths = [p for p in paths if p.stem in wanted]
  if not paths:
    print(f"no .h5 files in {zoo_data.models_dir()}")
    return 1
  out_dir = zoo_data.cache_dir() / "zoo_exports"
  out_dir.mkdir(parents=True, exist_ok=True)
  started, t0 = datetime.datetime.now(), time.perf_counter()
  rows = []
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  for path in paths:
    print(f"[{path.stem}]", flush=True)
    rows += run_model(path, args.budgets.split(","), args.n, args.seed, out_dir)
    out.write_text(markdown(rows, args, started, (time.perf_counter() - t0) / 60))
  text = markdown(rows, args, started, (time.perf_counter() - t0) / 60)
  out.write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
