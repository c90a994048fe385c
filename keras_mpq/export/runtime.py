"""Runs an exported .tflite file on real data and compares it with Keras.

Runtimes: ai-edge-litert first (``ai_edge_litert.interpreter``), then
``tflite_runtime`` and ``tf.lite.Interpreter`` as fallbacks; TFLite Micro's
Python interpreter for microcontroller files (``runtime="tflm"``). Input and
output quantization (scale, zero point) is applied here, and batch-1 files are
fed one sample at a time.

Example:

>>> r = validate_tflite("model.tflite", x_test, y_test, reference=model)  # doctest: +SKIP
>>> r.accuracy, r.agreement, r.runtime                                  # doctest: +SKIP
(0.968, 0.995, 'litert')
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from keras_mpq.base.errors import InvalidInputError, MissingDependencyError
from keras_mpq.export import feed as feed_lib
from keras_mpq.export import reader as reader_lib

RUNTIMES = ("auto", "litert", "tflite_runtime", "tf", "tflm")
# Inputs may stray this share of the width of an integer input's range
# outside it (its quantization clips them) before they count as data on the
# wrong scale: pixels 0..255 for a file quantized for [0, 1] go 254 widths out.
INPUT_SCALE_TOLERANCE = 0.25


# --------------------------------------------------------------------------- interpreters


def _litert_class(runtime):
  """The Interpreter class for ``runtime`` and the name actually used."""
  order = {"auto": ("litert", "tflite_runtime", "tf"), "litert": ("litert",),
           "tflite_runtime": ("tflite_runtime",), "tf": ("tf",)}[runtime]
  for name in order:
    try:
      if name == "litert":
        from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
      elif name == "tflite_runtime":
        from tflite_runtime.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
      else:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        Interpreter = tf.lite.Interpreter  # pylint: disable=invalid-name
      return Interpreter, name
    except (ImportError, AttributeError):
      continue
  raise MissingDependencyError(
      f"Expected a TFLite runtime for runtime={runtime!r}. Install one with: "
      "pip install 'ai-edge-litert==2.3.*'")


def _tflm_class():
  try:
    from tflite_micro.python.tflite_micro import runtime as tflm  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingDependencyError(
        "Expected the TFLite Micro Python interpreter for runtime='tflm'. "
        "Install it with: pip install tflite-micro") from None
  return tflm.Interpreter


def _quantize_input(x, detail):
  dtype = np.dtype(detail["dtype"])
  if np.issubdtype(dtype, np.floating):
    return x.astype(dtype)
  scale, zero = detail["quantization"]
  if scale == 0:
    raise InvalidInputError("The model's integer input has no quantization scale.")
  info = np.iinfo(dtype)
  return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _check_input_scale(x, detail) -> None:
  """Raises when float inputs ``x`` lie far outside what an integer input can hold.

  An int8 input with scale ``s`` and zero point ``z`` holds
  ``[(-128 - z) s, (127 - z) s]``; values outside it are clipped, so data on
  another scale (0..255 for a file quantized for [0, 1]) would silently give
  near-constant outputs. Float inputs are not checked.

  >>> detail = {"dtype": np.int8, "quantization": (1 / 255, -128)}
  >>> _check_input_scale(np.array([[0.0, 0.5, 1.0]]), detail)  # inside [0, 1]
  >>> _check_input_scale(np.array([[0.0, 255.0]]), detail)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  keras_mpq.base.errors.InvalidInputError: Expected inputs inside the file's input range [0, 1]...
  """
  dtype = np.dtype(detail["dtype"])
  scale, zero = detail["quantization"]
  if np.issubdtype(dtype, np.floating) or not scale:
    return
  info = np.iinfo(dtype)
  low, high = (info.min - zero) * scale, (info.max - zero) * scale
  lo, hi = float(np.min(x)), float(np.max(x))
  slack = INPUT_SCALE_TOLERANCE * (high - low)
  if lo < low - slack or hi > high + slack:
    raise InvalidInputError(
        f"Expected inputs inside the file's input range [{low:.4g}, {high:.4g}] (its "
        f"{dtype.name} input: scale {scale:.4g}, zero point {zero}; values outside are "
        f"clipped). Received: inputs in [{lo:.4g}, {hi:.4g}]. Rescale them to the range the "
        "model was quantized for (QuantizeResult.report['input_range']; pixels 0..255 "
        "become [0, 1] by dividing by 255), or quantize again with input_range=(lo, hi).")


def dequantize_output(y, detail):
  y = np.asarray(y)
  if np.issubdtype(y.dtype, np.floating):
    return y.astype(np.float32)
  scale, zero = detail["quantization"]
  return ((y.astype(np.float32) - zero) * (scale if scale else 1.0)).astype(np.float32)


def _tflm_detail(d):
  """TFLM details use 'quantization_parameters'; normalize to LiteRT's keys."""
  qp = d.get("quantization_parameters") or {}
  scales = np.asarray(qp.get("scales", [0.0])).reshape(-1)
  zeros = np.asarray(qp.get("zero_points", [0])).reshape(-1)
  return {"dtype": d["dtype"], "shape": np.asarray(d["shape"]),
          "quantization": (float(scales[0]) if scales.size else 0.0,
                           int(zeros[0]) if zeros.size else 0)}


def _check_x(x, shape, dtype_name):
  try:
    x = np.asarray(x, dtype=np.float32)
  except (TypeError, ValueError):
    raise InvalidInputError(
        f"Expected numeric input data. Received: dtype {np.asarray(x).dtype}") from None
  want = tuple(int(s) for s in shape[1:])
  if x.shape[1:] != want:
    if x.shape == want:
      raise InvalidInputError(
          f"Expected a batch of inputs of shape (n, {', '.join(map(str, want))}). "
          f"Received: a single sample of shape {x.shape}; add a batch axis (x[None]).")
    raise InvalidInputError(
        f"Expected inputs of shape (n, {', '.join(map(str, want))}) for this "
        f"{dtype_name} model. Received: x.shape={x.shape}")
  if not np.all(np.isfinite(x)):
    raise InvalidInputError("Expected finite input data. Received: NaN or Inf values")
  return x


def _check_references(reader) -> None:
  """Raises unless every tensor, buffer and operator-code index in subgraph 0 is in range.

  LiteRT refuses such a file, but (ai-edge-litert 2.3) an interpreter built
  from one whose subgraph output index is -1 aborts the process with a double
  free when it is destroyed; TFLite Micro segfaults. So the indices are
  checked here, in Python, before either runtime sees the file.
  """
  def damaged(what):
    return InvalidInputError(
        f"Expected an intact TFLite flatbuffer. Received: {what}; the file is damaged. "
        "Re-export the model.")
  try:
    sg, n = reader.sg, reader.n_tensors
    for role, count, get in (("input", sg.InputsLength(), sg.Inputs),
                             ("output", sg.OutputsLength(), sg.Outputs)):
      for i in range(count):
        if not 0 <= get(i) < n:
          raise damaged(f"model {role} {i} refers to tensor {get(i)} of {n}")
    n_codes = reader.model.OperatorCodesLength()
    for op in reader.ops:
      code = sg.Operators(op.index).OpcodeIndex()
      if not 0 <= code < n_codes:
        raise damaged(f"operator {op.index} has operator code {code} of {n_codes}")
      if any(not -1 <= t < n for t in op.inputs) or any(not 0 <= t < n for t in op.outputs):
        raise damaged(f"operator {op.index} ({op.op}) refers to tensors "
                      f"{list(op.inputs)} -> {list(op.outputs)} of {n}")
    for t in range(n):
      if not 0 <= reader.tensors[t].Buffer() < reader.n_buffers:
        raise damaged(f"tensor {t} refers to buffer {reader.tensors[t].Buffer()} of "
                      f"{reader.n_buffers}")
  except InvalidInputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # damaged offsets raise anything
    raise damaged(f"{type(e).__name__} while reading it ({str(e)[:100]})") from None


def run_tflite(path_or_bytes, x, runtime: str = "auto", batch_size: int = 256,
               preserve_all_tensors: bool = False, return_interpreter: bool = False,
               input_names: Optional[Sequence[str]] = None):
  """Runs the model on ``x``; returns float outputs (dequantized), shape (n, ...).

  A model with several outputs returns a list of them, in the Keras model's
  order (`keras_mpq.export.convert.order_outputs` put them so). A model with
  several inputs takes ``x`` as a list in the Keras model's input order or a
  dict by input name (`keras_mpq.export.feed.match_inputs`; ``input_names``,
  the Keras model's input names, match a dict for a file whose names were
  stripped).

  Example:

  >>> y = run_tflite("model.tflite", x_test[:10])               # doctest: +SKIP
  """
  if runtime not in RUNTIMES:
    raise InvalidInputError(f"Expected runtime in {RUNTIMES}. Received: runtime={runtime!r}")
  data = reader_lib.read_bytes(path_or_bytes)
  _check_references(reader_lib.parse(data))  # a damaged file fails here, clearly
  xs = _match_inputs(data, x, input_names)
  if runtime == "tflm":
    return _run_tflm(data, xs)
  if reader_lib.has_cut_zero_points(data):  # an mcu file: LiteRT wants one per scale
    try:
      data = reader_lib.restore_zero_points(data)
    except Exception:  # pylint: disable=broad-except  # damaged: LiteRT refuses it below
      pass
  Interpreter, name = _litert_class(runtime)  # pylint: disable=invalid-name
  try:
    kwargs = {"model_content": data, "num_threads": 1}
    if preserve_all_tensors:
      kwargs["experimental_preserve_all_tensors"] = True
    interp = Interpreter(**kwargs)
    interp.allocate_tensors()
    ins = interp.get_input_details()  # tensor names are decoded here
    outs = interp.get_output_details()
  except (ValueError, RuntimeError, IndexError) as e:  # UnicodeDecodeError is a ValueError
    hint = (" It is a Vela-compiled Ethos-U file: those run only on the NPU; validate "
            "the TFLite Micro file (ExportResult.mcu_path) instead."
            if b"ethos-u" in bytes(data) else " Re-export the model.")
    raise InvalidInputError(
        f"{name} could not load this .tflite file: "
        f"{str(e).strip().splitlines()[0][:200]}.{hint}") from None
  xs = _checked_inputs(xs, ins, "TFLite", [d["name"] for d in ins])
  inp = ins[0]
  n_all = len(xs[0])
  fixed = int(inp["shape"][0])
  dynamic = int(inp.get("shape_signature", inp["shape"])[0]) == -1
  step = min(batch_size, n_all) if dynamic else fixed
  outputs: List[List[np.ndarray]] = [[] for _ in outs]
  current = fixed
  for i in range(0, n_all, max(step, 1)):
    chunks = [v[i:i + step] for v in xs]
    n = len(chunks[0])
    if dynamic and n != current:
      for detail in ins:
        interp.resize_tensor_input(detail["index"], [n] + list(detail["shape"][1:]))
      interp.allocate_tensors()
      current = n
    if not dynamic and n != fixed:  # last partial batch of a fixed-batch model
      chunks = [np.concatenate([c, np.repeat(c[-1:], fixed - n, axis=0)]) for c in chunks]
    try:
      for chunk, detail in zip(chunks, ins):
        interp.set_tensor(detail["index"], _quantize_input(chunk, detail))
      interp.invoke()
      for parts, out in zip(outputs, outs):
        parts.append(dequantize_output(interp.get_tensor(out["index"]), out)[:n])
    except (RuntimeError, ValueError, IndexError) as e:  # e.g. "Input tensor 4 lacks data"
      raise InvalidInputError(
          f"{name} failed to run this .tflite file: {str(e).strip()[:200]}. The file is "
          "damaged or not a model keras_mpq exported; re-export it.") from None
  result = _joined(outputs)
  if return_interpreter:
    return result, interp, name
  return result


def _match_inputs(data: bytes, x, input_names) -> List[Any]:
  """``x`` as one entry per file input (`keras_mpq.export.feed.match_inputs`); one array
  stays one entry, and a file with several inputs refuses it when run (`_checked_inputs`)."""
  if not isinstance(x, (list, tuple, Mapping)):
    return [x]
  return feed_lib.match_inputs(x, feed_lib.file_input_names(data), input_names)


def _checked_inputs(xs, details, dtype_name: str, names) -> List[np.ndarray]:
  """Each input's array checked against its file input (shape, finite, scale), same length."""
  if len(xs) != len(details):  # one array for a file with several inputs: say what it takes
    feed_lib.match_inputs(xs[0] if len(xs) == 1 else xs, list(names))
  xs = [_check_x(v, d["shape"], dtype_name) for v, d in zip(xs, details)]
  for v, d in zip(xs, details):
    _check_input_scale(v, d)
  if len({len(v) for v in xs}) > 1:
    raise InvalidInputError(
        "Expected the same number of samples in every input. Received: "
        f"{[len(v) for v in xs]} samples for the file's inputs.")
  return xs


def _joined(outputs: List[List[np.ndarray]]):
  """Each output's batches joined; one array for one output, else a list."""
  joined = [np.concatenate(parts, axis=0) for parts in outputs]
  return joined[0] if len(joined) == 1 else joined


def _verify_for_tflm(data: bytes) -> None:
  """Has LiteRT check the flatbuffer before TFLite Micro reads it.

  TFLite Micro trusts its model (no flatbuffer verifier): a damaged file made
  its Python wrapper raise struct errors and its native code segfault
  (tests/test_fuzz.py). LiteRT verifies the flatbuffer and the tensor and
  buffer references while it builds an interpreter, so a file it refuses is
  never handed to TFLite Micro. (Building alone missed files whose operators
  have the wrong number of inputs, and LiteRT recomputes shapes that TFLite
  Micro takes as stored: a stored output shape of [2**31 - 1, 4] crashed it.
  So the file must also allocate, and every stored shape must equal the
  shape LiteRT computes.)
  """
  try:
    Interpreter, name = _litert_class("auto")  # pylint: disable=invalid-name
  except MissingDependencyError:
    return  # nothing to verify with; TFLite Micro reads the file unchecked
  try:
    interp = Interpreter(model_content=data, num_threads=1)
    interp.allocate_tensors()
    interp.get_input_details()
    interp.get_output_details()
    computed = {d["index"]: tuple(int(v) for v in d["shape"])
                for d in interp.get_tensor_details()}
  except (ValueError, RuntimeError, IndexError) as e:
    raise InvalidInputError(
        f"Expected an intact TFLite flatbuffer; {name} refused this file "
        f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}). "
        "Re-export the model.") from None
  reader = reader_lib.parse(data)
  for t, shape in computed.items():
    if 0 <= t < reader.n_tensors and tuple(reader.shape(t)) != shape:
      raise InvalidInputError(
          f"Expected an intact TFLite flatbuffer. Received: tensor {reader.name(t)!r} "
          f"is stored with shape {list(reader.shape(t))} but its operators give "
          f"{list(shape)}; the file is damaged. Re-export the model.")


def _verify_stripped_for_tflm(data: bytes) -> None:
  """`_verify_for_tflm`, on a copy with cut zero points restored when LiteRT wants them.

  An mcu file stripped of its all-zero per-channel zero points (the export's
  'zero_points' step) is one TFLite Micro runs but LiteRT refuses ("N
  zero_point values and M scale values"); a lookup-table compressed file
  (DECODE operators, which LiteRT lacks) gets only `_check_references`.
  """
  if any("DECODE" in op.op for op in reader_lib.parse(data).ops):
    return  # lookup-table compressed: LiteRT has no DECODE; indices were checked in Python
  try:
    _verify_for_tflm(data)
  except InvalidInputError as e:
    if "zero_point values and" not in str(e):
      raise
    _verify_for_tflm(reader_lib.restore_zero_points(data))


def _capture_stderr(fn) -> str:
  """Runs ``fn()`` and returns what it (or native code) wrote to file descriptor 2."""
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  with tempfile.TemporaryFile() as tmp:
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    try:
      fn()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    tmp.seek(0)
    return tmp.read().decode("utf-8", "replace")


def tflm_arena_bytes(path_or_bytes, x=None) -> int:
  """The TFLite Micro tensor arena this model needs, in bytes, as its interpreter measures it.

  Loads the file in TFLite Micro's Python interpreter (recording allocator),
  runs one inference (``x[:1]``, or zeros), and reads the allocator's
  "Arena allocation total". An interpreter given exactly that many bytes
  runs the model (tests/test_validate.py checks it).

  Example:

  >>> tflm_arena_bytes("model_mcu.tflite")                   # doctest: +SKIP
  4064
  """
  import re  # pylint: disable=g-import-not-at-top
  data = reader_lib.read_bytes(path_or_bytes)
  _check_references(reader_lib.parse(data))
  Interpreter = _tflm_class()  # pylint: disable=invalid-name
  _verify_stripped_for_tflm(data)
  interp = _tflm_interpreter(Interpreter, data)
  n_inputs = max(1, reader_lib.parse(data).sg.InputsLength())
  ins = [_tflm_detail(interp.get_input_details(k)) for k in range(n_inputs)]
  if x is None:
    samples = [np.zeros(d["shape"], dtype=d["dtype"]) for d in ins]
  else:
    xs = feed_lib.match_inputs(x, feed_lib.file_input_names(data))
    samples = [_quantize_input(_check_x(v, d["shape"], "TFLite Micro")[:1], d)
               for v, d in zip(xs, ins)]
  try:
    for k, sample in enumerate(samples):
      interp.set_input(sample, k)
    interp.invoke()
  except (RuntimeError, ValueError, IndexError) as e:
    raise InvalidInputError(f"TFLite Micro failed to run this model: {str(e)[:200]}") from None
  text = _capture_stderr(interp.print_allocations)
  m = re.search(r"Arena allocation total (\d+) bytes", text)
  if not m:
    raise InvalidInputError(
        "TFLite Micro did not report its arena use for this model (print_allocations "
        f"printed {text.strip()[:120]!r}).")
  return int(m.group(1))


def _tflm_interpreter(Interpreter, data: bytes, arena_size: Optional[int] = None):  # pylint: disable=invalid-name
  try:
    return Interpreter.from_bytes(
        data, arena_size=arena_size or max(len(data) * 10, 1 << 20))
  except Exception as e:  # pylint: disable=broad-except  # its Python reader raises struct errors
    if isinstance(e, MissingDependencyError):
      raise
    text = str(e).strip()
    hint = ("Export it with target='mcu' (full integer, batch 1; every operator is checked "
            "against TFLite Micro's kernels before export).")
    try:
      mcu_style = is_full_integer_batch1(data)
    except InvalidInputError:
      mcu_style = False
    if mcu_style:  # already what 'mcu' writes: a kernel refused one of its tensors
      hint = ("The file is full-integer and batch 1, so one operator's kernel refused its "
              "tensors (TFLite Micro names the node on stderr). Please report it with the "
              "model.")
    raise InvalidInputError(
        f"TFLite Micro could not allocate this model: {text[:200]}. {hint}") from None


TFLM_ISOLATED = True
"""Run TFLite Micro in a forked child process, so that a native abort in one of its
kernels (MobileNetV2 at 224x224 aborted inside ``invoke``) becomes an error
naming the model instead of killing the caller's Python process."""


def _run_tflm(data: bytes, xs):
  """`_run_tflm_here` in a forked child when `TFLM_ISOLATED` (and fork exists), else here."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  if not TFLM_ISOLATED or "fork" not in multiprocessing.get_all_start_methods():
    return _run_tflm_here(data, xs)
  _tflm_class()  # a missing runtime is an error here, not in the child
  context = multiprocessing.get_context("fork")
  receive, send = context.Pipe(duplex=False)
  child = context.Process(target=_tflm_child, args=(send, data, xs), daemon=True)
  child.start()
  send.close()
  try:
    status, value = receive.recv()
  except EOFError:  # the child died without an answer: a native crash
    child.join()
    code = child.exitcode
    raise InvalidInputError(
        f"TFLite Micro crashed running this model (its runtime process ended with "
        f"{'signal ' + str(-code) if code is not None and code < 0 else 'code ' + str(code)}, "
        f"model of {len(data) / 1024:.0f} KB). The file runs in LiteRT (target='mobile'); "
        "for a microcontroller, try a smaller input size or model, and please report it "
        "with the model.") from None
  finally:
    receive.close()
  child.join()
  if status == "error":
    raise value
  return value


def _tflm_child(send, data: bytes, xs) -> None:
  try:
    send.send(("ok", _run_tflm_here(data, xs)))
  except BaseException as e:  # pylint: disable=broad-except  # handed to the parent
    try:
      send.send(("error", e))
    except Exception:  # pylint: disable=broad-except  # an exception that does not pickle
      send.send(("error", InvalidInputError(f"TFLite Micro failed: {type(e).__name__}: {e}")))
  finally:
    send.close()


def _run_tflm_here(data: bytes, xs):
  """Runs TFLite Micro on ``xs`` (one array per file input, in its order), one sample at a time."""
  Interpreter = _tflm_class()  # pylint: disable=invalid-name
  _verify_stripped_for_tflm(data)
  interp = _tflm_interpreter(Interpreter, data)
  sg = reader_lib.parse(data).sg
  n_outputs = max(1, sg.OutputsLength())
  try:
    ins = [_tflm_detail(interp.get_input_details(k)) for k in range(max(1, sg.InputsLength()))]
    outs = [_tflm_detail(interp.get_output_details(i)) for i in range(n_outputs)]
  except (RuntimeError, ValueError, IndexError) as e:
    raise InvalidInputError(f"TFLite Micro could not read this model's input or output: "
                            f"{str(e)[:200]}") from None
  for inp in ins:
    if int(inp["shape"][0]) != 1:
      raise InvalidInputError(
          f"Expected a batch-1 model for TFLite Micro. Received: input shape "
          f"{list(inp['shape'])}; export with target='mcu'.")
  xs = _checked_inputs(xs, ins, "TFLite Micro", feed_lib.file_input_names(data))
  outputs: List[List[np.ndarray]] = [[] for _ in outs]
  for i in range(len(xs[0])):
    try:
      for k, (v, inp) in enumerate(zip(xs, ins)):
        interp.set_input(_quantize_input(v[i:i + 1], inp), k)
      interp.invoke()
      for k, (parts, out) in enumerate(zip(outputs, outs)):
        parts.append(dequantize_output(interp.get_output(k), out))
    except (RuntimeError, ValueError, IndexError) as e:
      raise InvalidInputError(f"TFLite Micro failed to run this model: {str(e)[:200]}") from None
  return _joined(outputs)


def is_full_integer_batch1(path_or_bytes) -> bool:
  """True for a microcontroller-style file: integer input and output, batch 1."""
  reader = reader_lib.parse(path_or_bytes)
  sg = reader.sg
  ins = [sg.Inputs(i) for i in range(sg.InputsLength())]
  outs = [sg.Outputs(i) for i in range(sg.OutputsLength())]
  for t in ins + outs:
    if reader.tensors[t].Type() not in (9, 7, 3):  # INT8, INT16, UINT8
      return False
  for t in ins:
    tensor = reader.tensors[t]
    sig = [tensor.ShapeSignature(i) for i in range(tensor.ShapeSignatureLength())]
    if reader.shape(t)[:1] != (1,) or (sig and sig[0] != 1):
      return False
  return True


def benchmark_latency(path_or_bytes, runs: int = 50, threads: int = 1, warmup: int = 5) -> float:
  """Median single-sample latency in ms in LiteRT (batch 1, ``threads`` threads).

  Example:

  >>> benchmark_latency("model.tflite", runs=20)             # doctest: +SKIP
  0.21
  """
  data = reader_lib.read_bytes(path_or_bytes)
  _check_references(reader_lib.parse(data))
  if reader_lib.has_cut_zero_points(data):
    data = reader_lib.restore_zero_points(data)
  Interpreter, _ = _litert_class("auto")  # pylint: disable=invalid-name
  try:
    interp = Interpreter(model_content=data, num_threads=threads)
    for inp in interp.get_input_details():
      if int(inp["shape"][0]) != 1:
        interp.resize_tensor_input(inp["index"], [1] + list(inp["shape"][1:]))
    interp.allocate_tensors()
  except (ValueError, RuntimeError) as e:
    raise InvalidInputError(f"LiteRT could not load this file: {str(e)[:200]}") from None
  feeds = [(inp["index"], np.zeros(inp["shape"], dtype=inp["dtype"]))
           for inp in interp.get_input_details()]
  times = []
  for i in range(warmup + runs):
    for index, x in feeds:
      interp.set_tensor(index, x)
    t0 = time.perf_counter()
    interp.invoke()
    if i >= warmup:
      times.append((time.perf_counter() - t0) * 1000.0)
  return float(statistics.median(times))


# --------------------------------------------------------------------------- deployment


def deployment_report(path_or_bytes, target: str, tflm_bytes=None, x=None,
                      vela: Optional[Mapping[str, Any]] = None,
                      steps: Optional[Mapping[str, int]] = None,
                      latency_runs: int = 20) -> Dict[str, Any]:
  """What a file needs on its device: flash, RAM (TFLite Micro arena), latency, NPU figures.

  Args:
    path_or_bytes: the file as written (for 'ethos-u', Vela's output).
    target: 'mobile', 'mcu' or 'ethos-u'.
    tflm_bytes: the TFLite Micro file ('ethos-u': Vela's input); default the file.
    x: a sample input for the arena measurement (zeros when None).
    vela: Vela's summary for 'ethos-u' (NPU cycles, SRAM, flash).
    steps: bytes saved per stripping or compression step, to include.

  Returns:
    ``{"flash_bytes", "arena_bytes", "ram_runtime", "latency_ms",
    "latency_runtime", "steps", "npu"}``: ``arena_bytes`` (TFLite Micro's
    recording allocator; None for 'mobile', whose files LiteRT sizes at run
    time) and ``latency_ms`` (median LiteRT single-sample latency on this
    machine's CPU; of the TFLite Micro file for 'ethos-u').

  Example:

  >>> deployment_report("m.tflite", "mcu")["arena_bytes"]     # doctest: +SKIP
  4064
  """
  data = reader_lib.read_bytes(path_or_bytes)
  report: Dict[str, Any] = {"target": target, "flash_bytes": len(data), "arena_bytes": None,
                            "ram_runtime": None, "latency_ms": None, "latency_runtime": None,
                            "steps": dict(steps or {}), "npu": None}
  micro = reader_lib.read_bytes(tflm_bytes) if tflm_bytes is not None else data
  if target in ("mcu", "ethos-u"):
    report["arena_bytes"] = tflm_arena_bytes(micro, x)
    report["ram_runtime"] = "tflm"
  runnable = data if target == "mobile" else micro
  try:
    report["latency_ms"] = round(benchmark_latency(runnable, runs=latency_runs), 4)
    report["latency_runtime"] = "litert (this machine's CPU, 1 thread)"
  except (InvalidInputError, MissingDependencyError) as e:
    report["latency_runtime"] = f"not measured: {str(e)[:120]}"
  if vela:
    report["npu"] = {k: vela.get(k) for k in ("accelerator", "npu_cycles", "total_cycles",
                                              "sram_kib", "flash_kib", "on_chip_flash_kib",
                                              "inference_ms", "npu_op_share", "macs")
                     if vela.get(k) is not None}
  return report


def format_deployment(report: Mapping[str, Any]) -> str:
  """The deployment report as a few text lines (the ``keras-mpq inspect --view deploy`` view)."""
  lines = [f"target {report.get('target')}: flash {report.get('flash_bytes')} bytes"]
  arena = report.get("arena_bytes")
  lines.append(f"RAM: TFLite Micro arena {arena} bytes" if arena is not None else
               "RAM: not measured (LiteRT sizes its arena at run time)")
  if report.get("latency_ms") is not None:
    lines.append(f"latency: {report['latency_ms']} ms median ({report.get('latency_runtime')})")
  steps = dict(report.get("steps") or {})
  if steps:
    start = steps.pop("quantized_file", None)
    parts = [f"{k} -{v} B" for k, v in steps.items()]
    lines.append("file steps: " + (f"quantized {start} B, " if start is not None else "")
                 + ", ".join(parts))
  npu = report.get("npu")
  if npu:
    lines.append("NPU (Vela): " + ", ".join(f"{k} {v}" for k, v in npu.items()))
  return "\n".join(lines)
