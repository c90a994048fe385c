"""Bad inputs, class by class: how many were tried, how many failed clearly, how many crashed.

Runs every public entry point and ``keras-mpq`` command on inputs that are
wrong in one way each (missing and damaged model files, model files carrying
code, unsupported models, bad data and data files, bad budgets and settings,
bad flags, unwritable outputs, damaged and random .tflite files), classifies
each outcome, and writes the table to RELIABILITY.md:

- clear: a `KerasMpqError` (command: exit status 2, one error line, no traceback);
- accepted: no error, where the input was still usable (a damaged .tflite
  whose damage did not matter); counted apart, never as a clear error;
- crash: any other exception, exit status 1, a traceback, a dead process, code
  from a model file that ran, or no error where one was required.

Usage:
  .venv/bin/python benchmarks/bench_reliability.py [--fuzz 300] [--out RELIABILITY.md]
"""

import argparse
import collections
import contextlib
import dataclasses
import io
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Callable, Dict, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # pylint: disable=g-import-not-at-top

import keras_mpq  # pylint: disable=g-import-not-at-top
from keras_mpq import cli as cli_lib  # pylint: disable=g-import-not-at-top
from keras_mpq.base.errors import KerasMpqError  # pylint: disable=g-import-not-at-top
from keras_mpq.base.types import QuantizationPlan  # pylint: disable=g-import-not-at-top

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclasses.dataclass
class Case:
  group: str
  name: str
  run: Callable[[], str]  # returns "clear", "accepted" or "crash: ..."


# --------------------------------------------------------------------------- runners


def api(fn: Callable[[], object], must_fail: bool = True) -> Callable[[], str]:
  def run():
    try:
      fn()
    except KerasMpqError:
      return "clear"
    except Exception as e:  # pylint: disable=broad-except
      return f"crash: {type(e).__name__}: {str(e)[:160]}"
    return "crash: no error" if must_fail else "accepted"
  return run


def command(argv: List[str], subprocess_: bool = False) -> Callable[[], str]:
  """``keras-mpq ARGV`` in process (via cli.main) or in a child process."""
  argv = [str(a) for a in argv]

  def run():
    if subprocess_:
      proc = subprocess.run([sys.executable, "-m", "keras_mpq.cli", *argv], env=ENV,
                            capture_output=True, text=True, timeout=300)
      code, err = proc.returncode, proc.stderr
    else:
      out, errio = io.StringIO(), io.StringIO()
      try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errio):
          code = cli_lib.main(["keras-mpq", *argv])
      except Exception as e:  # pylint: disable=broad-except
        return f"crash: {type(e).__name__} escaped cli.main: {e}"
      err = errio.getvalue()
    lines = [l for l in err.splitlines() if l.startswith("keras-mpq: error:")]
    if code == 2 and len(lines) == 1 and "Traceback" not in err:
      return "clear"
    return f"crash: exit {code}: {err.strip()[-200:]}"
  return run


def with_marker(run: Callable[[], str], marker: pathlib.Path) -> Callable[[], str]:
  """A clear error only counts if the model file's code never ran."""
  def wrapped():
    result = run()
    if marker.exists():
      marker.unlink()
      return "crash: the model file's code ran"
    return result
  return wrapped


# --------------------------------------------------------------------------- inputs


def tiny(classes=3, nan=None, no_quantizable=False, out_3d=False):
  from keras_mpq.base.compat import keras, set_global_seed  # pylint: disable=g-import-not-at-top
  set_global_seed(0)
  inp = keras.Input((8, 8, 1))
  if no_quantizable:
    return keras.Model(inp, keras.layers.Softmax()(keras.layers.Flatten()(inp)))
  h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
  if out_3d:
    return keras.Model(inp, keras.layers.Reshape((36, 4))(h))
  model = keras.Model(inp, keras.layers.Dense(classes, name="fc")(keras.layers.Flatten()(h)))
  if nan is not None:
    w = model.get_layer("conv").get_weights()
    w[0][0, 0, 0, 0] = nan
    model.get_layer("conv").set_weights(w)
  return model


def make_cases(d: pathlib.Path) -> List[Case]:
  from keras_mpq.base.compat import keras  # pylint: disable=g-import-not-at-top
  import keras as keras3  # pylint: disable=g-import-not-at-top
  good = d / "good.h5"
  tiny().save(good)
  x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
  y = np.arange(16) % 3
  tfl = pathlib.Path(keras_mpq.export_tflite(tiny(), d / "good.tflite",
                                             QuantizationPlan({"conv": 8, "fc": 8}), "mobile",
                                             calibration_data=x).path)
  out = d / "out"
  regular = d / "regular_file"
  regular.write_text("x")

  def q(**kw):
    args = dict(model=str(good), budget="4bit", num_samples=16, seed=0, progress=False)
    args.update(kw)
    return lambda: keras_mpq.quantize(**args)

  qa = ["quantize", good, "--budget", "4bit", "--out", out, "--samples", "16", "--noprogress"]
  cases: List[Case] = []
  add = lambda group, name, run: cases.append(Case(group, name, run))  # pylint: disable=unnecessary-lambda-assignment

  # Missing or unreadable model paths.
  g = "missing model path"
  for name in ("x.h5", "x.keras", "nodir/m"):
    add(g, f"api {name}", api(q(model=str(d / name))))
    add(g, f"cli {name}", command(["quantize", d / name] + qa[2:]))
  add(g, "api /proc path", api(q(model="/proc/nope/m.h5")))
  add(g, "api not a path", api(q(model=42)))

  # Files that are not models.
  g = "file that is not a model"
  blobs = {"empty.h5": b"", "empty.keras": b"", "text.h5": b"hello\n" * 50,
           "text.keras": b"hello\n" * 50, "random.h5": os.urandom(4000),
           "truncated.h5": good.read_bytes()[:3000]}
  for name, blob in blobs.items():
    (d / name).write_bytes(blob)
    add(g, f"api {name}", api(q(model=str(d / name))))
  with zipfile.ZipFile(d / "noconfig.keras", "w") as z:
    z.writestr("metadata.json", "{}")
  add(g, "api zip without config", api(q(model=str(d / "noconfig.keras"))))
  add(g, "api .tflite as model", api(q(model=str(tfl))))
  (d / "emptydir").mkdir()
  add(g, "api empty directory", api(q(model=str(d / "emptydir"))))
  add(g, "cli text.keras", command(["quantize", d / "text.keras"] + qa[2:]))

  # Model files carrying code: refused, and the code never runs.
  g = "model file carrying code (Lambda, custom layer)"
  marker = d / "code_ran"
  code = f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]"
  inp = keras.Input((8, 8, 1))
  h = keras.layers.Lambda(eval(code), name="evil")(inp)  # pylint: disable=eval-used
  keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(h))).save(d / "lambda.h5")
  inp = keras3.Input((8, 8, 1))
  h = keras3.layers.Lambda(eval(code), name="evil")(inp)  # pylint: disable=eval-used
  keras3.Model(inp, keras3.layers.Dense(3)(keras3.layers.Flatten()(h))).save(d / "lambda.keras")

  @keras3.saving.register_keras_serializable(package="bench_evil")
  class Evil(keras3.layers.Layer):

    def call(self, t):
      open(marker, "w").close()  # pylint: disable=consider-using-with
      return t

  inp = keras3.Input((8, 8, 1))
  keras3.Model(inp, keras3.layers.Dense(3)(keras3.layers.Flatten()(Evil()(inp)))).save(
      d / "custom.keras")
  marker.unlink()
  for name in ("lambda.h5", "lambda.keras", "custom.keras"):
    add(g, f"api {name}", with_marker(api(q(model=str(d / name))), marker))
    add(g, f"cli {name}", with_marker(command(["quantize", d / name] + qa[2:]), marker))

  # Models keras_mpq cannot quantize.
  g = "unsupported model (no quantizable layer, NaN/Inf weights, not a classifier)"
  add(g, "no quantizable layer", api(q(model=tiny(no_quantizable=True))))
  add(g, "NaN weight", api(q(model=tiny(nan=np.nan))))
  add(g, "Inf weight", api(q(model=tiny(nan=np.inf))))
  add(g, "3-D output", api(q(model=tiny(out_3d=True))))
  tiny(nan=np.nan).save(d / "nan.h5")
  add(g, "cli NaN .h5", command(["quantize", d / "nan.h5"] + qa[2:]))

  # Data given to quantize and validate.
  g = "bad data (empty, wrong shape, NaN, wrong labels)"
  bad_data = {
      "empty": np.zeros((0, 8, 8, 1), np.float32), "wrong shape": np.zeros((4, 5, 5, 1)),
      "no batch axis": x[0], "NaN": np.full((4, 8, 8, 1), np.nan, np.float32),
      "Inf": np.full((4, 8, 8, 1), np.inf, np.float32), "strings": np.array([["a"]] * 4),
      "dict": {"x": x}, "string labels": (x, np.array(["a"] * 16)),
      "labels out of range": (x, np.full(16, 9)), "label count": (x, y[:3]),
      "fractional labels": (x, np.full(16, 0.5)),
  }
  for name, data in bad_data.items():
    add(g, f"quantize {name}", api(q(data=data)))
  for name, (xx, yy) in {"string labels": (x, np.array(["a"] * 16)), "label count": (x, y[:3]),
                         "wrong shape": (np.zeros((4, 5, 5, 1)), y[:4]),
                         "NaN": (np.full((16, 8, 8, 1), np.nan), y)}.items():
    add(g, f"validate {name}", api(lambda xx=xx, yy=yy: keras_mpq.validate_tflite(tfl, xx, yy)))

  # Data files for the command line.
  g = "bad data file (--data, --eval_data)"
  files = {"no_x.npz": dict(images_wrong=x), "empty.npz": dict(x=x[:0]),
           "shape.npz": dict(x=np.zeros((4, 5, 5, 1), np.float32)),
           "object.npz": dict(x=np.array([object()] * 4, dtype=object)),
           "unlabeled.npz": dict(x=x), "str_labels.npz": dict(x=x, y=np.array(["a"] * 16))}
  for name, arrays in files.items():
    np.savez(d / name, **arrays)
  (d / "notnpz.npz").write_text("a,b\n")
  for name in list(files) + ["notnpz.npz", "missing.npz"]:
    if name != "unlabeled.npz":
      add(g, f"quantize --data {name}", command(qa + ["--data", d / name]))
    add(g, f"validate --data {name}", command(["validate", tfl, "--data", d / name]))
  add(g, "quantize --eval_data unlabeled", command(qa + ["--eval_data", d / "unlabeled.npz"]))

  # Budgets and settings.
  g = "bad budget or setting (impossible budget, unknown target/metric, bad pins)"
  for name, kw in {
      "0.5bit": dict(budget="0.5bit"), "10B": dict(budget="10B"), "-3bit": dict(budget="-3bit"),
      "4 parsecs": dict(budget="4 parsecs"), "bare number": dict(budget=4),
      "dict without kind": dict(budget={"value": 3}), "latency without table": dict(budget="5ms"),
      "target gpu": dict(target="gpu"), "metric": dict(metric="nope"),
      "synthesis": dict(synthesis="nope"), "rounds 0": dict(rounds=0),
      "bits 1": dict(weight_bits=(1, 4)), "bits empty": dict(weight_bits=()),
      "activation 4": dict(activation_bits=4), "pin unknown": dict(pinned={"nope": 8}),
      "pin 3 bits": dict(pinned={"conv": 3}), "seed 'a'": dict(seed="a"),
      "samples 0": dict(num_samples=0)}.items():
    add(g, f"api {name}", api(q(**kw)))
  for name, extra in {"--budget 10B": ["--budget", "10B"], "--rounds 0": ["--rounds", "0"],
                      "--bits a,b": ["--bits", "a,b"], "--pin conv1": ["--pin", "conv1"],
                      "--metric nope": ["--metric", "nope"]}.items():
    add(g, f"cli {name}", command(qa + extra))
  add(g, "cli no --budget", command(["quantize", good, "--out", out]))
  add(g, "cli unknown command", command(["frobnicate", good]))

  # Flags the parser refuses, in a real process (argparse exits before the command runs).
  g = "bad flag (unknown, wrong type, not in enum)"
  for name, extra in {"--target gpu": ["--target", "gpu"], "--samples many": ["--samples", "x"],
                      "--budgt": ["--budgt", "4bit"], "--activation_bits x": [
                          "--activation_bits", "x"]}.items():
    add(g, f"cli {name}", command(qa + extra, subprocess_=True))

  # Outputs.
  g = "unwritable output (under a regular file, /proc, a file as directory)"
  for where in (regular / "sub", "/proc/keras_mpq_out", good):
    add(g, f"cli --out {where}", command(["quantize", good, "--budget", "4bit", "--out", where]))
  add(g, "api cache_dir under a file", api(q(cache_dir=str(regular / "cache"), data=x)))
  add(g, "export under a file", api(lambda: keras_mpq.export_tflite(
      tiny(), regular / "m.tflite", QuantizationPlan({"conv": 8, "fc": 8}), "mobile",
      calibration_data=x)))
  add(g, "export to /proc", api(lambda: keras_mpq.export_tflite(
      tiny(), "/proc/keras_mpq/m.tflite", QuantizationPlan({"conv": 8, "fc": 8}), "mobile",
      calibration_data=x)))

  # Plans.
  g = "bad plan file (inspect --plan)"
  (d / "garbage.json").write_text("{no")
  (d / "list.json").write_text("[1]")
  (d / "nobits.json").write_text('{"weight_bits": {"conv": 1}}')
  for name in ("garbage.json", "list.json", "nobits.json", "missing.json"):
    add(g, f"inspect --plan {name}", command(["inspect", tfl, "--plan", d / name]))
  return cases


def fuzz_rows(d: pathlib.Path, n: int) -> List[Dict[str, object]]:
  """Damaged and random .tflite files through every reader (tests/test_fuzz.py's harness)."""
  import test_fuzz  # pylint: disable=g-import-not-at-top
  originals = test_fuzz.export_originals(d / "fuzz")
  paths = test_fuzz.write_cases(d / "fuzz" / "cases", originals, n, seed=2026)
  plan_json = d / "fuzz" / "plan.json"
  plan_json.write_text(test_fuzz.PLAN.to_json())
  rng = np.random.default_rng(5)
  rand = []
  for i in range(max(n // 10, 10)):
    p = d / "fuzz" / f"random-{i}.tflite"
    p.write_bytes(rng.bytes(int(rng.integers(0, 6000))))
    rand.append(p)
  rows = []
  for label, group in (("damaged .tflite (flip, truncate, splice, field, random body)", paths),
                       ("random bytes as .tflite", rand)):
    inspected = [test_fuzz.inspect_outcome(p, plan_json) for p in group]
    validated = test_fuzz.validate_outcomes(group, originals["data"])
    for reader, outcomes, cmd in (
        ("inspect_tflite, check_against_plan, `keras-mpq inspect --plan`", inspected,
         "pytest tests/test_fuzz.py"),
        ("validate_tflite (LiteRT)", [r for (s, _), r in validated.items() if s == "litert"],
         "pytest tests/test_fuzz.py"),
        ("validate_tflite (TFLite Micro), `keras-mpq validate --runtime tflm`",
         [r for (s, _), r in validated.items() if s in ("tflm", "cli")],
         "pytest tests/test_fuzz.py")):
      counts = collections.Counter("accepted" if r == "ok" else r.split(":")[0]
                                   for r in outcomes)
      rows.append({"group": f"{label}: {reader}", "tried": len(outcomes),
                   "clear": counts["clear"], "accepted": counts["accepted"],
                   "crash": len(outcomes) - counts["clear"] - counts["accepted"],
                   "examples": [r for r in outcomes if r not in ("ok", "clear")][:3],
                   "command": cmd})
  return rows


COMMANDS = {
    "missing model path": "pytest tests/test_cli.py -k errors_are_one_line",
    "file that is not a model": "pytest tests/test_reliability.py -k damaged_model",
    "model file carrying code (Lambda, custom layer)":
        "pytest tests/test_reliability.py -k 'lambda or custom'",
    "unsupported model (no quantizable layer, NaN/Inf weights, not a classifier)":
        "pytest tests/test_load.py -k check_model",
    "bad data (empty, wrong shape, NaN, wrong labels)":
        "pytest tests/test_reliability.py -k labels",
    "bad data file (--data, --eval_data)": "pytest tests/test_reliability.py -k validate_refuses",
    "bad budget or setting (impossible budget, unknown target/metric, bad pins)":
        "pytest tests/test_reliability.py -k before_synthesis",
    "bad flag (unknown, wrong type, not in enum)":
        "pytest tests/test_reliability.py -k flag_and_plan",
    "unwritable output (under a regular file, /proc, a file as directory)":
        "pytest tests/test_reliability.py -k unwritable",
    "bad plan file (inspect --plan)": "pytest tests/test_reliability.py -k bad_plan",
}


def write_markdown(rows, path: pathlib.Path, seconds: float, argv: List[str]) -> str:
  lines = [
      "# Reliability",
      "",
      "What keras_mpq does with inputs that are wrong in one way each, and with runs",
      "that are killed. Every number below comes from",
      "`" + " ".join([".venv/bin/python benchmarks/bench_reliability.py", *argv]) + "`" +
      f" ({seconds:.0f} s on {platform.machine()}, Python {platform.python_version()}).",
      "",
      "**clear**: a `KerasMpqError` naming what was expected (the command: exit status 2",
      "and one `keras-mpq: error:` line, no traceback). **accepted**: no error because",
      "the input was still usable (a damaged .tflite whose damage did not matter).",
      "**crash**: any other exception, exit status 1, a traceback, a dead process,",
      "code from a model file that ran, or no error where one was required.",
      "",
      "| class of bad input | cases tried | clear error | accepted | crash | command |",
      "|---|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    lines.append(f"| {r['group']} | {r['tried']} | {r['clear']} | {r['accepted']} | "
                 f"{r['crash']} | `{r['command']}` |")
  crashes = [(r["group"], e) for r in rows for e in r["examples"]]
  lines += ["", f"Total: {sum(r['tried'] for r in rows)} cases, "
            f"{sum(r['crash'] for r in rows)} crashes."]
  if crashes:
    lines += ["", "Crashes (first three per class):", ""]
    lines += [f"- {g}: {e}" for g, e in crashes]
  lines += [
      "",
      "## Killed runs",
      "",
      "`tests/test_reliability.py::test_killed_run_leaves_outputs_whole_and_resumes_to_the_same_plan`",
      "runs `keras-mpq quantize` on a plain CNN (1 epoch on 1000 MNIST images, .h5) to",
      "completion, then the same command into a directory holding those outputs, killed",
      "with SIGKILL right after its synthetic-data cache is renamed into place, then",
      "again killed while report.json's temporary file is written and not yet renamed,",
      "then to completion. The kills are injected at those points by a test-only hook in",
      "the atomic writer (`KERAS_MPQ_TEST_SIGNAL`, see `keras_mpq/fileio.py`), not by",
      "racing a poll, so the test cannot flake. After each kill every visible file is",
      "the previous one or a whole new one (JSON parses, PNG ends with IEND, the .tflite",
      "parses); the only leftovers are the hidden `.NAME.*.tmp*` file of the atomic",
      "writer (SIGKILL gives it no chance to remove it) and the dead run's lock file. The",
      "resumed run removes both, reuses the cache and returns the reference plan. Ctrl-C",
      "(SIGINT, injected the same way) ends with one line and exit status 130 and leaves",
      "no temporary file (`test_ctrl_c_is_one_line_exit_130_and_leaves_no_partial_output`).",
      "",
      "What is cached (`cache_dir`, `OUT/cache` for the command): the synthetic data",
      "and the search result (sensitivity and plan), keyed by the model's fingerprint",
      "and the settings. A damaged or mismatched cache file is recomputed, not trusted",
      "(`test_damaged_caches_are_recomputed_not_trusted`). Not cached: the rounds inside",
      "one search (a kill during sensitivity measurement repeats that stage; caching per",
      "round needs a hook in `sensitivity.search`).",
      "",
      "## Defects these checks found, and their fixes",
      "",
      "- TFLite Micro trusts its input: of 200 damaged files, 50 made its Python",
      "  wrapper raise `struct.error`/`TypeError`/`IndexError` and 3 killed the",
      "  validating process (2 SIGSEGV, 1 SIGABRT). `validate` now checks tensor, buffer and",
      "  operator-code references in Python, has LiteRT build and allocate the file,",
      "  and compares every stored shape with LiteRT's before TFLite Micro sees it.",
      "- LiteRT (ai-edge-litert 2.3) raised a clear error on a file whose model output",
      "  index is -1, then aborted the process with a double free when the",
      "  interpreter was destroyed; the reference check refuses such files first.",
      "- LiteRT `invoke` errors (`Input tensor 4 lacks data`) and undecodable tensor",
      "  names escaped `validate_tflite` as RuntimeError/UnicodeDecodeError; a damaged",
      "  output shape gave a NumPy broadcast error. Now clear errors.",
      "- `validate` with string labels reported accuracy 0.0 (a number that lied), and",
      "  without labels exit 0 with `accuracy: None`; both are refused now.",
      "- `quantize` read `--eval_data` only after the whole run, and refused",
      "  `--rounds 0`, unknown metrics, bad pins, latency budgets without a table and",
      "  impossible budgets only after synthesis (34 s for `--rounds 0` at the default",
      "  256 samples); all are checked before synthesis now.",
      "- Flag errors exited with status 1 (absl's), the code of an internal error; now 2.",
      "- `inspect --plan` with a missing, unreadable or non-JSON plan, string labels in",
      "  `quantize` data, and a non-integer seed were internal errors; now clear.",
      "- A damaged cache file (cut short, garbage) made the resumed run an internal",
      "  error; now it is recomputed.",
  ]
  text = "\n".join(lines) + "\n"
  from keras_mpq.base import fileio as fileio_lib  # pylint: disable=g-import-not-at-top
  fileio_lib.write_text(path, text)
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fuzz", type=int, default=300, help="damaged .tflite files")
  parser.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
  args = parser.parse_args(argv)
  start = time.perf_counter()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    by_group: Dict[str, List[str]] = collections.OrderedDict()
    for case in make_cases(d):
      result = case.run()
      by_group.setdefault(case.group, []).append(result if result in ("clear", "accepted")
                                                 else f"{case.name}: {result}")
      print(f"{case.group[:40]:40s} {case.name[:40]:40s} {result[:100]}", flush=True)
    for group, results in by_group.items():
      clear = sum(r == "clear" for r in results)
      accepted = sum(r == "accepted" for r in results)
      rows.append({"group": group, "tried": len(results), "clear": clear,
                   "accepted": accepted, "crash": len(results) - clear - accepted,
                   "examples": [r for r in results if r not in ("clear", "accepted")][:3],
                   "command": COMMANDS.get(group, "pytest tests/test_reliability.py")})
    rows += fuzz_rows(d, args.fuzz)
  shown = [] if args.fuzz == 300 else [f"--fuzz {args.fuzz}"]
  print(write_markdown(rows, pathlib.Path(args.out), time.perf_counter() - start, shown))
  return 0 if all(r["crash"] == 0 for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
