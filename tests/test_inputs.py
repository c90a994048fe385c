"""A model's inputs as data (model/inputs) and the per-input batching rules (base/batching)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from keras_mpq.base import batching
from keras_mpq.base.compat import keras
from keras_mpq.base.errors import InvalidInputError
from keras_mpq.model import inputs as inputs_lib

layers = keras.layers


def _two_inputs():
  a, b = keras.Input((4, 4, 1), name="image"), keras.Input((3,), name="table")
  h = layers.Concatenate()([layers.Flatten()(a), b])
  return keras.Model([a, b], layers.Dense(2, name="out")(h))


def _x(n=5, m=None):
  rng = np.random.default_rng(0)
  return rng.uniform(0, 1, (n, 4, 4, 1)), rng.uniform(0, 1, (n if m is None else m, 3))


def test_list_and_dict_in_any_order_give_the_list_in_model_order():
  model = _two_inputs()
  image, table = _x()
  assert inputs_lib.input_names(model) == ["image", "table"]
  from_list = inputs_lib.check_inputs(model, [image, table])
  from_dict = inputs_lib.check_inputs(model, {"table": table, "image": image})
  for got in (from_list, from_dict):
    assert isinstance(got, list) and [a.dtype for a in got] == [np.float32] * 2
    np.testing.assert_array_equal(got[0], image.astype(np.float32))
    np.testing.assert_array_equal(got[1], table.astype(np.float32))


def test_one_input_comes_back_as_one_array_as_before():
  model = keras.Sequential([keras.Input((3,), name="only"), layers.Dense(2)])
  x = np.zeros((4, 3))
  got = inputs_lib.check_inputs(model, x)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (4, 3)
  by_name = inputs_lib.check_inputs(model, {inputs_lib.input_names(model)[0]: x})
  assert isinstance(by_name, np.ndarray) and by_name.shape == (4, 3)


@pytest.mark.parametrize("make, match", [
    (lambda image, table: [image], r"2 arrays, one per model input in order \['image', "
                                   r"'table'\].*Received: 1 arrays.*'image' \(N, 4, 4, 1\)"),
    (lambda image, table: [image, table, table], r"Received: 3 arrays"),
    (lambda image, table: image, r"list of 2 arrays.*Received: one ndarray"),
    (lambda image, table: {"image": image, "tabel": table},
     r"dict keyed by the model's input names.*unknown \['tabel'\]; missing \['table'\]"),
    (lambda image, table: [image, table[:3]], r"same number of samples.*'image': 5, 'table': 3"),
    (lambda image, table: [image, np.zeros((5, 4))], r"data\['table'\] of shape \(N, 3\)"),
    (lambda image, table: [image, np.full((5, 3), np.nan)], r"data\['table'\] contains NaN"),
])
def test_mismatches_are_refused_saying_what_the_model_takes(make, match):
  with pytest.raises(InvalidInputError, match=match):
    inputs_lib.check_inputs(_two_inputs(), make(*_x()))


def test_split_data_tells_x_from_x_and_labels():
  model = _two_inputs()
  image, table = _x()
  y = np.arange(5)
  assert inputs_lib.split_data(model, [image, table])[1] is None
  x, labels = inputs_lib.split_data(model, ([image, table], y))
  assert labels is y and len(x) == 2
  x, labels = inputs_lib.split_data(model, ({"image": image, "table": table}, y))
  assert labels is y and set(x) == {"image", "table"}
  assert inputs_lib.split_data(model, {"image": image, "table": table})[1] is None


def test_batching_slices_counts_and_joins_one_array_or_a_list_alike():
  image, table = _x()
  x = [image, table]
  assert batching.num_samples(x) == 5 and batching.num_samples(image) == 5
  parts = list(batching.batches(x, 2))
  assert [batching.num_samples(p) for p in parts] == [2, 2, 1]
  joined = batching.concat(parts)
  np.testing.assert_array_equal(joined[1], table)
  np.testing.assert_array_equal(batching.concat(list(batching.batches(image, 2))), image)
  picked = batching.take(x, np.array([4, 0]))
  np.testing.assert_array_equal(picked[0], image[[4, 0]])
  assert batching.as_list(image)[0] is image and batching.map_inputs(len, x) == [5, 5]


def test_by_name_is_the_one_dict_rule_for_models_and_files():
  assert inputs_lib.by_name({"table": 2, "image": 1}, ["image", "table"]) == [1, 2]
  with pytest.raises(InvalidInputError, match=r"Expected rows as a dict keyed by the file's "
                                               r"input names \['image', 'table'\]\. Received: "
                                               r"keys \['img', 'table'\]; unknown \['img'\]; "
                                               r"missing \['image'\]\. Try again\.$"):
    inputs_lib.by_name({"img": 1, "table": 2}, ["image", "table"], "rows", "the file's",
                       "Try again.")
  # the model's and the file's matching both go through it: the same wording
  from keras_mpq.export import feed as feed_lib  # pylint: disable=g-import-not-at-top
  model = _two_inputs()
  image, table = _x()
  for call in (lambda x: inputs_lib.order_inputs(model, x, "x"),
               lambda x: feed_lib.match_inputs(x, ["image", "table"])):
    np.testing.assert_array_equal(call({"table": table, "image": image})[1], table)
    with pytest.raises(InvalidInputError, match=r"keys \['tabel', 'image'\]; unknown "
                                                 r"\['tabel'\]; missing \['table'\]"):
      call({"tabel": table, "image": image})
