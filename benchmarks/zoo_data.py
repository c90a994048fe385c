"""Real inputs for the pretrained zoo in ``../shared/models`` (models trained by others).

The project judges a quantized file of a pretrained classifier by its top-1
agreement with the float model on *real* inputs. The training sets are not
here, so the inputs are made from real sources:

* **speech** (``keyword_spotting``, ``keyword_spotting_mobilenetv2``,
  ``tflite_micro_speech``): words spoken by ``espeak-ng`` (several voices,
  speeds, pitches and loudnesses; the model's keywords and other words),
  resampled to 16 kHz, placed at a random offset in the model's clip length,
  a little Gaussian background noise added, then TensorFlow's audio front end
  (``audio_microfrontend_op``: 30 ms windows, 20 ms steps, the model's number
  of filterbank channels and band limits) and the model's scaling (below);
* **photos** (``rock_paper_scissors``): random square crops of natural photos
  (scikit-learn's two sample images; scikit-image's bundled photos when
  scikit-image is importable; any ``*.png``/``*.jpg`` in the folder named by
  ``KERAS_MPQ_ZOO_PHOTOS``), resized to 84x84, converted to gray and
  normalized per sample to mean 0, std 1 (what the model was trained on).

The zoo has few photo models, so four natural-image classifiers are also
trained here (`photo_model`, cached under ``KERAS_MPQ_ZOO_CACHE``) on a
10-class "which photo is this crop from" task (`photo_crops`: crops of ten
colour photos bundled with scikit-image and scikit-learn; training crops from
the left 70% of each photo, held-out crops from the right 30%):

* ``photo_resnet_s0`` / ``_s1``: a small residual CNN with a BatchNorm after
  every convolution that takes *raw* 0..255 pixels (no Rescaling layer);
* ``photo_mobilenetv2_s0`` / ``_s1``: a stock ``MobileNetV2(alpha=0.35)`` at
  32x32 fed ``x / 127.5 - 1`` (its documented preprocessing, applied outside
  the model), BatchNorm statistics recalibrated after training.

Their real inputs are held-out crops (0..255, resp. [-1, 1]).

The other zoo files (gesture time series, autoencoders, fingerprints) have no
real source here: `available` says False and `why_unavailable` says why.

    import zoo_data                       # benchmarks/ on sys.path
    x = zoo_data.real_inputs("tflite_micro_speech", n=200, seed=0)
    model = zoo_data.load_model("tflite_micro_speech")

Generated WAV files and features are cached under ``KERAS_MPQ_ZOO_CACHE``
(default ``/tmp/keras_mpq_zoo``); nothing is written into the repository or
into ``shared/``. The models are read from ``KERAS_MPQ_ZOO_MODELS`` (default
``../shared/models`` next to the repository root).

How each speech model's input scale was found
---------------------------------------------
The front-end settings (channels, band limits, PCAN, noise reduction, clip
length) are those in the models' MLTK 0.20.0 specifications (the release the
files come from); ``keyword_spotting``'s spec names only 30/20 ms, 10 bins
and a 4 kHz upper limit. The scale of the front end's output in the model's
input is documented nowhere for these files, so it was measured.
The front end returns uint16 log filterbank energies ("raw", about 0..920).
Candidate scalings of raw into the model's input were compared (i) with the
model's first BatchNormalization: the first convolution was run on the
candidate inputs and its per-channel output mean and variance compared with
the BN's ``moving_mean`` / ``moving_variance``: ``dmean2`` = mean over channels
of (mean - moving_mean)^2 / moving_variance, ``logvar`` = mean over channels of
log(var / moving_variance), both 0 for a perfect match; and (ii) by the float
model's agreement with the spoken word: ``kw`` = share of keyword clips
classified as that keyword (chance: 1 / classes), ``other`` = share of other
words classified as the unknown class. Figures below: this module's own
recipe, 300 clips, seed 7 (225 keywords, 75 other words); seed 0 with 200
clips gives the same ranking (within 0.05 in kw).

* ``tflite_micro_speech`` (PCAN on, 40 channels, 125..7500 Hz, 1 s, noise std
  1e-3): **int8** = ``floor((raw * 256 + 333) / 666) - 128`` clipped to
  [-128, 127], the TFLite Micro "micro features" int8 convention (MLTK trained
  this model with ``dtype=int8``). int8: dmean2 0.064, logvar +0.09, kw 0.87,
  other 0.96, mean confidence 0.93. raw/25.6 (the ``(feature * 10) / 256``
  convention): dmean2 0.72, logvar -4.32 (variance 75x too small), other 0.17,
  confidence 0.33. raw: dmean2 6.1, logvar +2.16, kw 0.03. uint8 (int8 + 128):
  dmean2 2.0, kw 0.34. A free affine fit ``a * raw + c`` to the BN statistics
  (an earlier 120-clip scratch set, noise std 3e-3) gave a = 0.363, c = -147,
  near int8's a = 0.384, c = -128; /25.6 is a = 0.039, c = 0.
* ``keyword_spotting_mobilenetv2`` (PCAN off, 49 channels, 125..3999 Hz,
  minimum signal remaining 0.03, 1.2 s): **int8** as above. Without PCAN the
  features follow the loudness and the noise floor; noise std 1e-4 matched
  the BN best (an earlier scratch set, int8: dmean2 0.001 at 1e-4, 0.19 at
  1e-3, 0.45 at 3e-3). int8: dmean2 0.001, logvar -0.19, kw 0.71 (left,
  right, up, down, stop, go), other 0.92. raw/25.6:
  dmean2 0.26, logvar -4.64, every clip "_unknown_". raw: dmean2 8.2, logvar
  +1.85, kw 0.19. uint8: dmean2 1.78, kw 0.46. raw/5: dmean2 0.82, logvar -1.37.
* ``keyword_spotting`` (the MLPerf-Tiny DS-CNN, 50x10): MLTK trained it on a
  preprocessed set of spectrogram *images* whose pixel mapping is not
  published, so this is the least certain of the three. PCAN off and a
  4 kHz upper band limit (as its documentation says) fit far better than PCAN
  on (kw at most 0.22 under any scaling tried) or 7.5 kHz (at most 0.28);
  1.01 s of audio gives the 50 frames; noise std 1e-3. Scaling **raw / 5**:
  dmean2 0.006, logvar -0.09 (the best BN match tried), kw 0.52, other 0.96,
  11 of 12 classes predicted. raw/4: dmean2 0.064, logvar +0.36, kw 0.48;
  raw/6: dmean2 0.019, logvar -0.45, kw 0.63; per-sample min-max to 0..255:
  dmean2 0.030, logvar +0.90, kw 0.44; int8: dmean2 0.23, logvar +0.30, kw
  0.28; raw/25.6: logvar -3.35, every clip "_background_noise_"; raw: dmean2
  12, logvar +3.13.

Synthetic speech is not the Speech Commands recordings: the float models'
accuracy on it is lower than their published accuracy, which is expected.
What matters here is that the inputs are on the scale and in the region the
models were trained on, so agreement of a quantized file with its float model
is measured where the model is actually used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import shutil
import subprocess
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
# Bump when the recipe changes, so stale cached features are not reused.
FEATURE_VERSION = 1
SAMPLE_RATE = 16000


# --------------------------------------------------------------------------- the zoo


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  """One pretrained file and how its real inputs are made (``source`` None: no real source)."""
  file: str
  kind: str                       # 'speech', 'photo', 'time_series', 'autoencoder', 'embedding'
  input_shape: Tuple[int, ...]
  classes: Tuple[str, ...] = ()
  source: Optional[str] = None    # 'espeak-ng' or 'photos'; None: no real source here
  how: str = ""
  frontend: Optional[Dict[str, float]] = None  # audio_microfrontend settings
  clip_samples: int = 0           # audio length fed to the front end
  scaling: str = ""               # 'int8' (TFLM micro-features), 'raw/5', 'samplewise'
  noise_std: float = 0.0          # background noise (fraction of full scale)
  no_source_reason: str = ""
  trained: Optional[Tuple[str, int]] = None  # (kind, seed) of a model trained here (`photo_model`)
  # The input range the model documents (its preprocessing's output), where one is known.
  documented_range: Optional[Tuple[float, float]] = None


_OTHER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila",
                "tree", "wow", "learn", "follow", "forward", "backward", "visual")
_KWS10 = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")

# The ten photos of the "which photo" task (`photo_crops`); label = index here.
# scikit-image's ``cat()`` is the same array as ``chelsea()`` (two identical
# classes would leave the float model's logits tied between them, so agreement
# would measure coin flips): its stereo motorcycle (left view) replaces it.
PHOTO_CLASSES = ("astronaut", "motorcycle_left", "chelsea", "coffee", "hubble_deep_field",
                 "immunohistochemistry", "retina", "rocket", "china", "flower")
PHOTO_KINDS = ("photo_resnet", "photo_mobilenetv2")
PHOTO_SEEDS = (0, 1)
_PHOTO_HOW = {
    "photo_resnet": ("trained here (`zoo_data.photo_model`): residual CNN, BatchNorm after every "
                     "conv, raw 0..255 RGB input (no Rescaling layer), 12000 training crops, "
                     "8 epochs Adam 2e-3; inputs = held-out 32x32 crops (right 30% of each of "
                     "10 photos), raw 0..255"),
    "photo_mobilenetv2": ("trained here (`zoo_data.photo_model`): keras.applications MobileNetV2 "
                          "alpha 0.35, 32x32x3, weights=None, 12000 training crops given as "
                          "x/127.5-1, 8 epochs Adam 2e-3, BatchNorm statistics recalibrated on "
                          "2000 training crops; inputs = held-out 32x32 crops, x/127.5-1 "
                          "(in [-1, 1])"),
}

ZOO: Dict[str, ZooEntry] = {
    "keyword_spotting": ZooEntry(
        file="keyword_spotting.h5", kind="speech", input_shape=(50, 10, 1),
        classes=_KWS10 + ("unknown", "_background_noise_"), source="espeak-ng",
        how=("espeak-ng words (yes..go and others), 1.01 s at 16 kHz, microfrontend 10 "
             "channels 125-4000 Hz, PCAN off, noise reduction on; input = raw uint16 / 5 "
             "(chosen from the first BatchNorm's statistics; see the module docstring)"),
        frontend=dict(num_channels=10, upper_band_limit=4000.0, lower_band_limit=125.0,
                      min_signal_remaining=0.05, enable_pcan=False),
        clip_samples=16160, scaling="raw/5", noise_std=1e-3),
    "keyword_spotting_mobilenetv2": ZooEntry(
        file="keyword_spotting_mobilenetv2.h5", kind="speech", input_shape=(59, 49, 1),
        classes=("left", "right", "up", "down", "stop", "go", "_unknown_", "_silence_"),
        source="espeak-ng",
        how=("espeak-ng words, 1.2 s at 16 kHz, microfrontend 49 channels 125-3999 Hz, "
             "PCAN off, min signal remaining 0.03; input = TFLM int8 micro features "
             "floor((raw*256+333)/666)-128 as float"),
        frontend=dict(num_channels=49, upper_band_limit=3999.0, lower_band_limit=125.0,
                      min_signal_remaining=0.03, enable_pcan=False),
        clip_samples=19200, scaling="int8", noise_std=1e-4),
    "tflite_micro_speech": ZooEntry(
        file="tflite_micro_speech.h5", kind="speech", input_shape=(49, 40, 1),
        classes=("yes", "no", "_unknown_", "_silence_"), source="espeak-ng",
        how=("espeak-ng words, 1 s at 16 kHz, microfrontend 40 channels 125-7500 Hz, "
             "PCAN on; input = TFLM int8 micro features floor((raw*256+333)/666)-128 "
             "as float"),
        frontend=dict(num_channels=40, upper_band_limit=7500.0, lower_band_limit=125.0,
                      min_signal_remaining=0.05, enable_pcan=True),
        clip_samples=16000, scaling="int8", noise_std=1e-3),
    "rock_paper_scissors": ZooEntry(
        file="rock_paper_scissors.h5", kind="photo", input_shape=(84, 84, 1),
        classes=("rock", "paper", "scissor", "_unknown_"), source="photos",
        how=("random square crops of natural photos (scikit-learn's sample images, "
             "scikit-image's bundled photos when installed, KERAS_MPQ_ZOO_PHOTOS), "
             "84x84 gray, per-sample mean 0 std 1"),
        scaling="samplewise",
        # Per-sample mean 0, std 1 (the shared README): mean +- 4 std is what a user would
        # pass; low-contrast crops reach beyond it and are clipped by the file.
        documented_range=(-4.0, 4.0)),
    "tflite_micro_magic_wand": ZooEntry(
        file="tflite_micro_magic_wand.h5", kind="time_series", input_shape=(128, 3, 1),
        no_source_reason="accelerometer gestures: no real source here"),
    "anomaly_detection": ZooEntry(
        file="anomaly_detection.h5", kind="autoencoder", input_shape=(5, 128, 1),
        no_source_reason="not a classifier (machine-sound autoencoder); no real source here"),
    "autoencoder_example": ZooEntry(
        file="autoencoder_example.h5", kind="autoencoder", input_shape=(140,),
        no_source_reason="not a classifier (ECG-like autoencoder); no real source here"),
    "fingerprint_signature_generator": ZooEntry(
        file="fingerprint_signature_generator.h5", kind="embedding", input_shape=(180, 180, 1),
        no_source_reason="not a classifier (fingerprint embedding); no real source here"),
}
for _kind in PHOTO_KINDS:
  for _seed in PHOTO_SEEDS:
    ZOO[f"{_kind}_s{_seed}"] = ZooEntry(
        file=f"{_kind}_s{_seed}", kind="photo", input_shape=(32, 32, 3), classes=PHOTO_CLASSES,
        source="photo-crops", how=_PHOTO_HOW[_kind],
        scaling="raw" if _kind == "photo_resnet" else "[-1,1]", trained=(_kind, _seed),
        documented_range=(0.0, 255.0) if _kind == "photo_resnet" else (-1.0, 1.0))
del _kind, _seed

CLASSIFIERS = tuple(n for n, e in ZOO.items() if e.source is not None)

# espeak-ng voices (language + variant) used for variety.
VOICES = ("en-us+m3", "en-us+f3", "en+m1", "en+f2", "en-gb-scotland+m4", "en-029+f4",
          "en-gb-x-rp+m2", "en-us-nyc+f1", "en-gb+m7", "en-us+f5", "en+klatt", "en-us+croak")


def models_dir() -> pathlib.Path:
  """Where the .h5 files are: ``KERAS_MPQ_ZOO_MODELS``, else ``../shared/models``."""
  env = os.environ.get("KERAS_MPQ_ZOO_MODELS")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "models"


def cache_dir() -> pathlib.Path:
  """Where generated WAVs and features go: ``KERAS_MPQ_ZOO_CACHE``, else /tmp/keras_mpq_zoo."""
  return pathlib.Path(os.environ.get("KERAS_MPQ_ZOO_CACHE", "/tmp/keras_mpq_zoo"))


def model_path(name: str) -> pathlib.Path:
  entry = _entry(name)
  if entry.trained is not None:
    return photo_model_path(*entry.trained)
  return models_dir() / entry.file


def range_how(info) -> str:
  """How keras_mpq got a model's input range (``report['input_range']``, or one input's entry).

  'estimated' (from the first BatchNorm), 'given' (``input_range``), 'assumed'
  (the [0, 1] default) or 'layer' (read off a Rescaling/Normalization layer).
  """
  source = str(info.get("source", ""))
  if source.startswith("estimated"):
    return "estimated"
  if source == "input_range argument":
    return "given"
  if info.get("assumed"):
    return "assumed"
  return "layer"


def _entry(name: str) -> ZooEntry:
  if name not in ZOO:
    raise KeyError(f"Expected a zoo model in {sorted(ZOO)}. Received: {name!r}")
  return ZOO[name]


def why_unavailable(name: str) -> Optional[str]:
  """None when `real_inputs(name)` can run here, else the reason in words."""
  entry = _entry(name)
  if entry.source is None:
    return entry.no_source_reason or "no real source here"
  if entry.source == "photo-crops":
    return _photo_set_missing()
  if not model_path(name).exists():
    return f"model file not found: {model_path(name)}"
  if entry.source == "espeak-ng":
    if shutil.which("espeak-ng") is None:
      return ("espeak-ng is not installed (Debian: apt-get update && "
              "apt-get install -y espeak-ng)")
    try:
      from tensorflow.lite.experimental.microfrontend.python.ops import (  # pylint: disable=g-import-not-at-top,unused-import
          audio_microfrontend_op)
    except Exception as e:  # pylint: disable=broad-except
      return f"TensorFlow's audio_microfrontend_op does not import: {e}"
  if entry.source == "photos" and not _photo_files():
    return "no photos found (scikit-learn's sample images are missing)"
  return None


def available(name: str) -> bool:
  """Whether real inputs for ``name`` can be made here (`why_unavailable` says why not)."""
  return why_unavailable(name) is None


def load_model(name: str):
  """The float model (tf_keras, ``compile=False``; models trained here: trained on first use)."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  entry = _entry(name)
  if entry.trained is not None:
    return photo_model(*entry.trained)
  return tf_keras.models.load_model(str(model_path(name)), compile=False)


def real_inputs(name: str, n: int = 200, seed: int = 0) -> np.ndarray:
  """``n`` real inputs for zoo model ``name``: float32, shape (n, *input_shape).

  Deterministic in (name, n, seed); cached under `cache_dir`. Raises
  RuntimeError with the reason when `available` is False.
  """
  reason = why_unavailable(name)
  if reason is not None:
    raise RuntimeError(f"No real inputs for {name!r}: {reason}")
  entry = _entry(name)
  tag = ""
  if entry.source == "photos":  # which photos are installed changes the crops
    tag = "_p%08x" % zlib.crc32("|".join(label for label, _ in _photo_files()).encode())
  path = cache_dir() / "features" / f"{name}_n{n}_s{seed}_v{FEATURE_VERSION}{tag}.npy"
  if path.exists():
    x = np.load(path)
    if x.shape == (n,) + entry.input_shape:
      return x
  if entry.source == "espeak-ng":
    x, _ = _speech_inputs(name, n, seed)
  elif entry.source == "photo-crops":
    x = photo_preprocess(photo_crops(n, "test", seed)[0], entry.trained[0])
  else:
    x = _photo_inputs(name, n, seed)
  x = x.astype(np.float32).reshape((n,) + entry.input_shape)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
  np.save(tmp, x)
  os.replace(tmp, path)
  return x


def true_labels(name: str, n: int = 200, seed: int = 0) -> Optional[np.ndarray]:
  """The true class of each of `real_inputs(name, n, seed)` where known (speech, photo crops), else None."""
  source = _entry(name).source
  if source == "espeak-ng":
    return word_labels(name, n, seed)
  if source == "photo-crops":
    return photo_crops_labels(n)
  return None


def spoken_words(name: str, n: int = 200, seed: int = 0) -> List[str]:
  """The word behind each of `real_inputs(name, n, seed)` (speech models only)."""
  return [item[0] for item in _speech_plan(name, n, seed)]


def word_labels(name: str, n: int = 200, seed: int = 0) -> np.ndarray:
  """Class index of each spoken word (non-keywords: the model's unknown class)."""
  classes = _entry(name).classes
  unknown = next(i for i, c in enumerate(classes) if "unknown" in c)
  return np.array([classes.index(w) if w in classes else unknown
                   for w in spoken_words(name, n, seed)], np.int64)


# --------------------------------------------------------------------------- speech


def _rng(name: str, seed: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _speech_plan(name: str, n: int, seed: int):
  """(word, voice, speed, pitch, peak, clip seed) per sample: 3/4 keywords, 1/4 others."""
  entry = _entry(name)
  keywords = [c for c in entry.classes if not c.startswith("_") and c != "unknown"]
  others = [w for w in _OTHER_WORDS if w not in keywords]
  rng = _rng(name, seed)
  plan = []
  n_kw = int(round(n * 0.75))
  order_kw = rng.permutation(n_kw) % len(keywords)
  order_other = rng.permutation(max(n - n_kw, 1)) % len(others)
  for i in range(n):
    word = keywords[order_kw[i]] if i < n_kw else others[order_other[i - n_kw]]
    plan.append((word, VOICES[rng.integers(len(VOICES))], int(rng.integers(110, 211)),
                 int(rng.integers(15, 86)), float(rng.uniform(0.1, 0.9)),
                 int(rng.integers(2**31))))
  perm = rng.permutation(n)  # keywords and others interleaved, so any prefix is a mix
  return [plan[i] for i in perm]


def _speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
  """espeak-ng's rendering of ``word`` at 16 kHz, float in [-1, 1], silence trimmed (cached)."""
  wav_dir = cache_dir() / "wav"
  wav_dir.mkdir(parents=True, exist_ok=True)
  key = f"{word}_{voice}_{speed}_{pitch}".replace("+", "-")
  path = wav_dir / f"{key}.wav"
  if not path.exists():
    tmp = wav_dir / f"{key}.{os.getpid()}.tmp.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                    "-w", str(tmp), word], check=True, capture_output=True)
    os.replace(tmp, path)
  from scipy.io import wavfile  # pylint: disable=g-import-not-at-top
  rate, data = wavfile.read(path)
  x = data.astype(np.float32) / 32768.0
  if x.ndim > 1:
    x = x.mean(axis=1)
  x = _resample(x, rate, SAMPLE_RATE)
  level = np.abs(x)
  loud = np.nonzero(level > 0.02 * level.max())[0] if level.max() > 0 else np.array([0])
  return x[loud[0]:loud[-1] + 1]


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
  if rate == target:
    return x
  try:
    from scipy import signal  # pylint: disable=g-import-not-at-top
    g = np.gcd(rate, target)
    return signal.resample_poly(x, target // g, rate // g).astype(np.float32)
  except ImportError:
    t = np.arange(int(len(x) * target / rate)) * (rate / target)
    return np.interp(t, np.arange(len(x)), x).astype(np.float32)


def _clip(word, voice, speed, pitch, peak, clip_seed, length, noise_std) -> np.ndarray:
  """One int16 clip of ``length`` samples: the word at a random offset, plus noise."""
  rng = np.random.default_rng(clip_seed)
  speech = _speak(word, voice, speed, pitch)[:length]
  out = np.zeros(length, np.float32)
  offset = int(rng.integers(0, length - len(speech) + 1))
  out[offset:offset + len(speech)] = speech / max(float(np.abs(speech).max()), 1e-6) * peak
  out += rng.normal(0.0, noise_std, length).astype(np.float32)
  return np.clip(np.round(out * 32767), -32768, 32767).astype(np.int16)


def frontend(audio: np.ndarray, settings: Dict[str, float]) -> np.ndarray:
  """TensorFlow's audio front end (16 kHz, 30 ms windows, 20 ms steps): uint16 (frames, channels)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.lite.experimental.microfrontend.python.ops import audio_microfrontend_op  # pylint: disable=g-import-not-at-top
  out = audio_microfrontend_op.audio_microfrontend(
      tf.constant(audio, tf.int16), sample_rate=SAMPLE_RATE, window_size=30, window_step=20,
      **settings)
  return out.numpy()


def scale_features(raw: np.ndarray, scaling: str) -> np.ndarray:
  """The model's input from the front end's uint16 output (see the module docstring)."""
  raw = raw.astype(np.int64)
  if scaling == "int8":  # TFLite Micro micro_features / MLTK dtype=int8
    return np.clip((raw * 256 + 333) // 666 - 128, -128, 127).astype(np.float32)
  if scaling == "raw/5":
    return (raw / 5.0).astype(np.float32)
  if scaling == "raw":
    return raw.astype(np.float32)
  raise ValueError(f"Unknown scaling {scaling!r}")


def _speech_inputs(name: str, n: int, seed: int):
  entry = _entry(name)
  frames, channels = entry.input_shape[:2]
  raws = []
  for word, voice, speed, pitch, peak, clip_seed in _speech_plan(name, n, seed):
    audio = _clip(word, voice, speed, pitch, peak, clip_seed, entry.clip_samples,
                  entry.noise_std)
    raw = frontend(audio, entry.frontend)
    if raw.shape[0] < frames:  # pad with the quietest frame value (never needed as set up)
      raw = np.concatenate([raw, np.repeat(raw[-1:], frames - raw.shape[0], 0)])
    raws.append(raw[:frames, :channels])
  raw = np.stack(raws)
  return scale_features(raw, entry.scaling)[..., None], raw


# --------------------------------------------------------------------------- photos

# scikit-image's bundled photos of real scenes (its synthetic test images left out).
_SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png",
                   "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
                   "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg",
                   "clock_motion.png", "cell.png", "microaneurysms.png", "ihc.png")


def _photo_files() -> List[Tuple[str, object]]:
  """(label, loader) for each available photo; loaders return RGB or gray uint8 arrays."""
  found: List[Tuple[str, object]] = []
  try:
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
    for i, img in enumerate(load_sample_images().images):
      found.append((f"sklearn:{i}", (lambda img=img: np.asarray(img))))
  except Exception:  # pylint: disable=broad-except
    pass
  spec = importlib.util.find_spec("skimage")
  if spec is not None and spec.submodule_search_locations:
    data = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"
    for f in _SKIMAGE_PHOTOS:
      if (data / f).exists():
        found.append((f"skimage:{f}", (lambda p=data / f: _read_image(p))))
  extra = os.environ.get("KERAS_MPQ_ZOO_PHOTOS")
  if extra and pathlib.Path(extra).is_dir():
    for p in sorted(pathlib.Path(extra).iterdir()):
      if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
        found.append((f"dir:{p.name}", (lambda p=p: _read_image(p))))
  return found


def _read_image(path) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _gray(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img, np.float32)
  if img.ndim == 3:
    img = img[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
  return img


# A crop whose gray levels (0..255) vary less than this is flat; another is drawn.
MIN_CROP_STD = 8.0
MAX_CROP_TRIES = 20


def _photo_inputs(name: str, n: int, seed: int) -> np.ndarray:
  """Random square crops (side 84 px .. the photo's short side), resized, gray, standardized."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  entry = _entry(name)
  h_out, w_out = entry.input_shape[:2]
  photos = [_gray(load()) for _, load in _photo_files()]
  rng = _rng(name, seed)
  out = np.empty((n, h_out, w_out), np.float32)
  for i in range(n):
    img = photos[i % len(photos)] if i < len(photos) else photos[rng.integers(len(photos))]
    h, w = img.shape
    for _ in range(MAX_CROP_TRIES):  # skip flat crops (clear sky, a blank page)
      side = int(rng.integers(min(h_out, h, w), min(h, w) + 1))
      top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
      crop = img[top:top + side, left:left + side]
      if crop.std() >= MIN_CROP_STD:
        break
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    crop = np.asarray(Image.fromarray(crop).resize((w_out, h_out), Image.BILINEAR),
                      np.float32)
    crop = crop - crop.mean()
    out[i] = crop / (crop.std() + 1e-6)
  return out[..., None]


# --------------------------------------------------------------------------- trained photo models

# Bump when the crops, the architectures or the training change (retrains, re-crops).
PHOTO_VERSION = 1
PHOTO_TRAIN_SHARE = 0.7       # training crops: left 70% of each photo's width; held out: the rest
PHOTO_CROP_SIDE = (0.08, 0.4)  # crop side, share of min(photo height, region width)
PHOTO_TRAIN_CROPS = 12000
PHOTO_EPOCHS = 8
PHOTO_LEARNING_RATE = 2e-3
PHOTO_RECALIBRATION_CROPS = 2000
_PHOTO_CACHE: Dict[str, np.ndarray] = {}


def _photo_set_missing() -> Optional[str]:
  try:
    import skimage.data  # pylint: disable=g-import-not-at-top,unused-import
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # pylint: disable=broad-except
    return f"scikit-image and scikit-learn are needed for the photo crops: {e}"
  return None


def photo_set() -> List[np.ndarray]:
  """The ten photos of `PHOTO_CLASSES`, uint8 RGB, in label order."""
  if not _PHOTO_CACHE:
    import skimage.data as skd  # pylint: disable=g-import-not-at-top
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
    china, flower = load_sample_images().images
    load = {"astronaut": skd.astronaut, "motorcycle_left": lambda: skd.stereo_motorcycle()[0],
            "chelsea": skd.chelsea, "coffee": skd.coffee,
            "hubble_deep_field": skd.hubble_deep_field,
            "immunohistochemistry": skd.immunohistochemistry, "retina": skd.retina,
            "rocket": skd.rocket, "china": lambda: china, "flower": lambda: flower}
    for label in PHOTO_CLASSES:
      _PHOTO_CACHE[label] = np.ascontiguousarray(np.asarray(load[label]())[..., :3], np.uint8)
  return [_PHOTO_CACHE[label] for label in PHOTO_CLASSES]


def photo_crops_labels(n: int) -> np.ndarray:
  """Labels of `photo_crops` (crop ``i`` is from photo ``i % 10``)."""
  return (np.arange(n) % len(PHOTO_CLASSES)).astype(np.int64)


def photo_crops(n: int, part: str = "train", seed: int = 0, size: int = 32):
  """``(x, y)``: ``n`` random square crops of the ten photos, float32 raw pixels 0..255.

  ``y[i]`` = which photo (``i % 10``, so every prefix is balanced). A crop's
  side is 8%..40% of min(photo height, region width), at least ``size``; it
  is resized to ``size`` x ``size`` (``tf.image.resize``, antialiased) and
  flipped left-right with probability 1/2. ``part='train'`` crops the left
  70% of each photo's width, ``part='test'`` the right 30% (held out).
  Deterministic in (n, part, seed, size).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if part not in ("train", "test"):
    raise ValueError(f"Expected part 'train' or 'test'. Received: {part!r}")
  ims = photo_set()
  rng = _rng(f"photo_crops:{part}", seed)
  y = photo_crops_labels(n)
  x = np.empty((n, size, size, 3), np.float32)
  u = rng.uniform(*PHOTO_CROP_SIDE, size=n)
  ty, tx, flip = rng.random(n), rng.random(n), rng.random(n) < 0.5
  # Crops of equal side are resized together (one call per distinct side).
  boxes = []
  for i in range(n):
    im = ims[y[i]]
    h, w = im.shape[:2]
    lo, hi = ((0, int(PHOTO_TRAIN_SHARE * w)) if part == "train"
              else (int(PHOTO_TRAIN_SHARE * w), w))
    side = min(max(int(min(h, hi - lo) * u[i]), size), h, hi - lo)
    top = int(ty[i] * (h - side + 1))
    left = lo + int(tx[i] * (hi - lo - side + 1))
    boxes.append((side, top, left))
  sides = np.array([b[0] for b in boxes])
  for side in np.unique(sides):
    idx = np.nonzero(sides == side)[0]
    batch = np.stack([ims[y[i]][boxes[i][1]:boxes[i][1] + side, boxes[i][2]:boxes[i][2] + side]
                      for i in idx])
    x[idx] = tf.image.resize(batch, (size, size), antialias=True).numpy()
  x[flip] = x[flip, :, ::-1]
  return np.clip(x, 0.0, 255.0), y


def photo_preprocess(x: np.ndarray, kind: str) -> np.ndarray:
  """Raw 0..255 crops as the trained model ``kind`` takes them."""
  if kind == "photo_resnet":
    return np.asarray(x, np.float32)
  if kind == "photo_mobilenetv2":  # keras.applications.mobilenet_v2.preprocess_input
    return (np.asarray(x, np.float32) / 127.5 - 1.0).astype(np.float32)
  raise ValueError(f"Expected a kind in {PHOTO_KINDS}. Received: {kind!r}")


def photo_model_path(kind: str, seed: int) -> pathlib.Path:
  return cache_dir() / "photo_models" / f"{kind}_s{seed}_v{PHOTO_VERSION}.h5"


def _photo_resnet(seed: int):
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers

  def block(h, filters, stride):
    s = h
    h = layers.Conv2D(filters, 3, stride, padding="same", use_bias=False)(h)
    h = layers.ReLU()(layers.BatchNormalization()(h))
    h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
    h = layers.BatchNormalization()(h)
    if stride != 1 or s.shape[-1] != filters:
      s = layers.BatchNormalization()(layers.Conv2D(filters, 1, stride, use_bias=False)(s))
    return layers.ReLU()(layers.Add()([h, s]))

  inp = keras.Input((32, 32, 3))  # raw 0..255 pixels, no Rescaling layer
  h = layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
  h = layers.ReLU()(layers.BatchNormalization()(h))
  h = block(h, 16, 1)
  h = block(h, 32, 2)
  h = block(h, 64, 2)
  out = layers.Dense(10)(layers.GlobalAveragePooling2D()(h))
  return keras.Model(inp, out, name=f"photo_resnet_s{seed}")


def photo_model(kind: str, seed: int = 0):
  """The trained photo classifier ``kind`` ('photo_resnet', 'photo_mobilenetv2'), training seed ``seed``.

  Trained on first use (12000 training crops, 8 epochs, Adam 2e-3, batch 128;
  a few minutes on 2 CPU cores) and cached as .h5 under `cache_dir`, with a
  .json of its held-out accuracy (1000 test crops) and training time.
  Returns a fresh tf_keras model (``compile=False``) on every call.
  """
  import json  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  from keras_mpq import model_zoo as model_zoo_lib  # pylint: disable=g-import-not-at-top
  if kind not in PHOTO_KINDS:
    raise ValueError(f"Expected a kind in {PHOTO_KINDS}. Received: {kind!r}")
  path = photo_model_path(kind, seed)
  if not path.exists():
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    x, y = photo_crops(PHOTO_TRAIN_CROPS, "train", seed)
    x = photo_preprocess(x, kind)
    if kind == "photo_resnet":
      model = _photo_resnet(seed)
    else:
      model = keras.applications.MobileNetV2(
          input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
          classifier_activation=None)
    model.compile(keras.optimizers.Adam(PHOTO_LEARNING_RATE),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=128, epochs=PHOTO_EPOCHS, verbose=0)
    if kind == "photo_mobilenetv2":  # applications' BN momentum 0.999: statistics near init
      model_zoo_lib.recalibrate_batchnorm(model, x[:PHOTO_RECALIBRATION_CROPS])
    seconds = time.perf_counter() - start
    xt, yt = photo_crops(1000, "test", 100 + seed)
    pred = np.asarray(model.predict(photo_preprocess(xt, kind), verbose=0, batch_size=250))
    info = {"kind": kind, "seed": seed, "version": PHOTO_VERSION,
            "train_seconds": round(seconds, 1), "train_crops": PHOTO_TRAIN_CROPS,
            "epochs": PHOTO_EPOCHS,
            "held_out_accuracy": float(np.mean(pred.argmax(1) == yt)),
            "held_out_crops": 1000, "held_out_seed": 100 + seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.h5")
    model.save(str(tmp))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
  return keras.models.load_model(str(path), compile=False)


def photo_model_info(kind: str, seed: int) -> Dict[str, object]:
  """The .json written next to the cached model (held-out accuracy, training time), or {}."""
  import json  # pylint: disable=g-import-not-at-top
  p = photo_model_path(kind, seed).with_suffix(".json")
  return json.loads(p.read_text()) if p.exists() else {}


def describe() -> str:
  """One line per zoo model: available or not, and how its inputs are made."""
  lines = []
  for name, entry in ZOO.items():
    reason = why_unavailable(name)
    lines.append(f"{name}: {'available' if reason is None else 'unavailable (' + reason + ')'}"
                 + (f"; {entry.how}" if entry.how else ""))
  return "\n".join(lines)


if __name__ == "__main__":
  print(describe())
