"""The Flower apps (fedvp_jax.flower): a lone client draws and trains what it would in the
vmapped round; Flower's simulation ends with the vmapped rounds' server model and metrics;
params cross the wire checked; a client with other settings is refused; the core never needs
flwr. Tests that run Flower skip, saying so, when the ``flower`` extra is not installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import chex
import filelock
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN, write_dataset

from fedvp_jax.algorithms.core import clients_state, plan_round
from fedvp_jax.config import RunConfig, to_record
from fedvp_jax.data.datasets import load_traces, parse_spec
from fedvp_jax.data.federated import sample_batches, sample_final_targets
from fedvp_jax.errors import DataError
from fedvp_jax.experiment import prepare
from fedvp_jax.flower.setup import build_setup, catalogue, own_data, run_dataset, run_users
from fedvp_jax.flower.wire import WireError, from_named, named_arrays
from fedvp_jax.rounds import iterate_rounds
from fedvp_jax.rundir import RunDir
from fedvp_jax.runner import run as engine_run_dir
from fedvp_jax.summaries import round_record

REPO = Path(__file__).resolve().parents[1]

needs_flwr = pytest.mark.skipif(
  importlib.util.find_spec("flwr") is None,
  reason="flwr is not installed: pip install -e '.[flower]' (CI installs it through .[dev])",
)

SMALL = TINY_RUN.replace(num_clients=4, validation_fraction=0.2)
"""4 clients, 3 rounds of a tiny LSTM on synthetic traces (FedGen: tiny generator)."""


def flower_lock() -> filelock.FileLock:
  """Held while a test runs Flower's processes (a Ray cluster, a SuperLink and SuperNodes), so
  that pytest-xdist's workers run one such test at a time: two at once on CI's 2 cores would
  slow the deployed rounds towards their timeout."""
  return filelock.FileLock(Path(tempfile.gettempdir()) / "fedvp_jax-flower-tests.lock")


def test_core_and_api_docs_work_without_flwr():
  # flwr made unimportable: the core, the CLI and the API reference must not notice.
  code = (
    "import sys, importlib.util; sys.modules['flwr'] = None\n"
    "import fedvp_jax, fedvp_jax.algorithms, fedvp_jax.experiment, fedvp_jax.runner\n"
    "import fedvp_jax.cli, fedvp_jax.cli.train, fedvp_jax.flower.cli, fedvp_jax.flower.server\n"
    "spec = importlib.util.spec_from_file_location('g', 'scripts/gen_api_docs.py')\n"
    "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n"
    "assert g.render() == open('docs/api.md').read(), 'api.md differs'\n"
    "assert not [m for m in sys.modules if m.startswith('flwr.')], 'flwr was imported'\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
  )
  assert done.returncode == 0, done.stderr[-2000:]


def test_a_client_alone_holds_its_row_of_the_vmapped_data():
  experiment = prepare(SMALL)
  for k, user in enumerate(experiment.users):
    row = jax.tree.map(lambda leaf: leaf[k : k + 1], experiment.data)
    chex.assert_trees_all_equal(own_data(SMALL, user), row)


def test_a_lone_client_draws_its_row_of_the_vmapped_draw():
  # Client k alone with its own unpadded windows and its row of the round's keys draws the
  # minibatches and labels that row k of the padded, all-clients draw holds. Clients get
  # different window counts, so that all but the largest are padded in the stack.
  data = prepare(SMALL).data
  n = data.train_mask.shape[1]
  lengths = [n, n // 2, n // 3, 7]
  mask = jnp.arange(n)[None, :] < jnp.asarray(lengths)[:, None]
  padded = data.replace(train_mask=mask)
  selected, keys = plan_round(jax.random.key(5), data.num_clients, None)
  all_x, all_y = sample_batches(keys.batches, padded, 3, 8, selected)
  all_labels = sample_final_targets(keys.labels, padded, 3, 8, selected)
  for k, length in enumerate(lengths):
    alone = data.replace(
      train_x=data.train_x[k : k + 1, :length],
      train_y=data.train_y[k : k + 1, :length],
      train_mask=jnp.ones((1, length), bool),
    )
    row = lambda tree: jax.tree.map(lambda leaf: leaf[k : k + 1], tree)
    zero = jnp.zeros((1,), jnp.int32)
    x, y = sample_batches(row(keys.batches), alone, 3, 8, zero)
    labels = sample_final_targets(row(keys.labels), alone, 3, 8, zero)
    chex.assert_trees_all_equal(
      (x, y, labels), (all_x[k : k + 1], all_y[k : k + 1], row(all_labels))
    )


def test_wire_round_trip_and_a_clear_error_for_another_model():
  setup = build_setup(SMALL)
  params = setup.model.init(jax.random.key(0))
  named = named_arrays(params)
  assert all("/" in name for name in named) and any(name.startswith("head/") for name in named)
  chex.assert_trees_all_equal(from_named(named, setup.params_like()), params)
  other = build_setup(SMALL.replace(latent_dim=16)).model.init(jax.random.key(0))
  with pytest.raises(WireError) as err:
    from_named(named_arrays(other), setup.params_like(), "server's params")
  message = str(err.value)
  assert "\n" not in message and "server's params" in message and "expected float32" in message
  with pytest.raises(WireError, match="missing head/"):
    from_named({n: a for n, a in named.items() if not n.startswith("head/")}, params)


def engine_run(config: RunConfig) -> tuple[object, list[dict]]:
  """The vmapped rounds' final state and their round records. The seed runs as a seeds axis
  of 1, the program `fedvp train` compiles (:func:`fedvp_jax.runner.run`), so that the
  persistent compilation cache compiles it once for both."""
  experiment = prepare(config)
  first = lambda tree: jax.tree.map(lambda x: x[0] if np.ndim(x) else x, jax.device_get(tree))
  records, state = [], None
  rounds = iterate_rounds(
    experiment.algorithm, experiment.data, (config.seed,), config.total_rounds
  )
  for r, (state, metrics) in enumerate(rounds):
    records.append(round_record(r, first(metrics)))
    state = first(state)
  return state, records


@needs_flwr
@pytest.mark.slow
@pytest.mark.parametrize(
  "settings",
  [
    {"algorithm": "fedavg"},
    {"algorithm": "partial-fedavg", "beta": 0.5},
    {"algorithm": "fedgen", "pretrain_rounds": 2, "rounds": 1},
  ],
  ids=["fedavg", "partial-fedavg-beta0.5", "fedgen-pretrained"],
)
def test_flower_simulation_ends_with_the_vmapped_rounds_server_model(settings, tmp_path):
  from fedvp_jax.flower.simulation import simulate

  config = SMALL.replace(**settings)
  assert config.total_rounds == 3
  state, records = engine_run(config)
  with flower_lock():  # one Ray actor with 2 CPUs, clients in turn
    result = simulate(config, cpus_per_client=2, out=tmp_path / "flower")
  # Its run directory is what `fedvp train` leaves, the same summary to float rounding.
  engine_run_dir(config, tmp_path / "engine")
  flower, engine = RunDir(tmp_path / "flower"), RunDir(tmp_path / "engine")
  assert flower.is_finished() and flower.read_config() == config
  assert flower.read_metrics(config.seed) == json.loads(json.dumps(result.records))
  assert flower.read_summary() == json.loads(json.dumps(result.summary))
  assert_same_summary(flower.read_summary(), engine.read_summary())
  assert_same_summary(flower.read_baselines(), engine.read_baselines(), "baselines")
  assert result.users == run_users(config)
  server = clients_state(state).server_params
  chex.assert_trees_all_close(result.params, server, rtol=1e-5, atol=1e-6)
  # and it moved: the engine's model is not the initial one
  initial = build_setup(config).model.init(jax.random.split(jax.random.key(config.seed))[0])
  if "pretrain_rounds" not in settings:
    assert not np.allclose(
      named_arrays(initial)["head/out/kernel"], named_arrays(server)["head/out/kernel"]
    )
  if config.uses_generator:
    chex.assert_trees_all_close(result.generator, state.generator_params, rtol=1e-5, atol=1e-6)
  # The server keeps the vmapped state's Selected: where an earlier round than the final one
  # validated best (FedGen's case here), the same round and server model.
  engine_selected = clients_state(state).selected
  assert not config.uses_generator or int(result.selected.from_round) < config.total_rounds
  if int(result.selected.from_round) < config.total_rounds:
    assert int(result.selected.from_round) == int(engine_selected.from_round)
    chex.assert_trees_all_close(
      result.selected.server_params, engine_selected.server_params, rtol=1e-5, atol=1e-6
    )
  assert [r["missing_clients"] for r in result.records] == [[], [], []]
  for ours, theirs in zip(result.records, records, strict=True):
    assert ours.keys() - {"missing_clients", "seconds"} == theirs.keys()
    for name in ("train_loss", "test_loss", "validation_loss", "teacher_loss"):
      if name in theirs:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5), name


def assert_same_summary(ours, theirs, path="summary"):
  """Every entry of ``theirs`` (a vmapped run's summary.json) but timings is in ``ours``, equal
  to float rounding: relative 1e-5, and 1e-3 percentage points for gains (a gain is a
  difference of two near errors, which takes their rounding to absolute terms)."""
  if isinstance(theirs, dict):
    for key, value in theirs.items():
      if not key.endswith("seconds"):
        assert key in ours, f"{path}/{key} is missing"
        assert_same_summary(ours[key], value, f"{path}/{key}")
  elif isinstance(theirs, list):
    assert len(ours) == len(theirs), path
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
      assert_same_summary(a, b, f"{path}[{k}]")
  elif isinstance(theirs, float):
    absolute = 1e-3 if "gain_percent" in path else 1e-7
    assert ours == pytest.approx(theirs, rel=1e-5, abs=absolute), path
  else:
    assert ours == theirs, path


def identity_for_messages(monkeypatch):
  """Messages made outside a Flower process need the task identity Flower's runtimes set."""
  from flwr.supercore.task_identity import TaskIdentity

  for name in ("_task_id", "_run_id", "_node_id"):
    monkeypatch.setattr(TaskIdentity, name, 1)


def viewer_folder(root: Path, dataset: str, user: str, to: Path, split_files: bool) -> Path:
  """A data root ``to`` holding ONE viewer's trace files of ``dataset`` under ``root``
  (symbolic links, nothing copied) and, with ``split_files``, the dataset's split files."""
  source = root / dataset
  for video in (source / "sampled_dataset").iterdir():
    if (video / user).is_file():
      (to / dataset / "sampled_dataset" / video.name).mkdir(parents=True)
      (to / dataset / "sampled_dataset" / video.name / user).symlink_to(video / user)
  if split_files:
    for name in ("train_set", "test_set"):
      (to / dataset / name).symlink_to(source / name)
  return to


def real_windows(data, k: int) -> dict:
  """Client ``k``'s real (unpadded) train, validation and test windows."""
  parts = {"train": "train", "val": "val", "test": "test"}
  return {
    f"{p}_{xy}": np.asarray(getattr(data, f"{p}_{xy}")[k])[
      np.asarray(getattr(data, f"{p}_mask")[k])
    ]
    for p in parts
    for xy in ("x", "y")
  }


def test_a_client_with_only_its_viewers_folder_splits_as_the_vmapped_run(tmp_path):
  # A dataset without split files: the video split is drawn from ALL videos, which a client
  # holding only its own viewer's traces does not see (viewer 0 never watched video 2), so it
  # needs the server's catalogue.
  root = tmp_path / "all"
  write_dataset(root, videos=6, users=4, length=40)
  (root / "Tiny" / "sampled_dataset" / "2_video" / "0").unlink()
  config = TINY_RUN.replace(
    dataset="Tiny-m4-h2", data_dir=str(root), num_clients=4, validation_fraction=0.3
  )
  data = prepare(config).data
  traces, users = run_dataset(config)
  for k, user in enumerate(users):
    folder = str(viewer_folder(root, "Tiny", user, tmp_path / f"viewer{user}", False))
    chex.assert_trees_all_equal(
      real_windows(own_data(config, user, folder, catalogue(traces)), 0), real_windows(data, k)
    )
  # what the folder alone would give (its own 5 videos split with the seed): other windows
  alone = own_data(config, "0", str(tmp_path / "viewer0"))
  assert not np.array_equal(real_windows(alone, 0)["test_x"], real_windows(data, 0)["test_x"])
  # a folder of another viewer, or of another dataset, is refused in one line
  with pytest.raises(DataError, match="no trace of viewer '1'"):
    own_data(config, "1", str(tmp_path / "viewer0"), catalogue(traces))


def test_a_viewers_folder_with_the_datasets_split_files_splits_as_the_vmapped_run(
  tiny_root, tmp_path
):
  # Split files copied along name other viewers' pairs, absent here: loading the folder as a
  # dataset refuses them; the client reads its own traces only, split as the server's are.
  config = TINY_RUN.replace(dataset="Tiny-m4-h2", data_dir=str(tiny_root), num_clients=4)
  folder = viewer_folder(tiny_root, "Tiny", "2", tmp_path / "viewer2", True)
  with pytest.raises(DataError, match="has no trace"):
    load_traces(parse_spec(config.dataset), folder)
  traces, users = run_dataset(config)
  assert traces.split is not None
  chex.assert_trees_all_equal(
    real_windows(own_data(config, "2", str(folder), catalogue(traces)), 0),
    real_windows(prepare(config).data, users.index("2")),
  )


@needs_flwr
@pytest.mark.real_data
def test_clients_each_given_only_their_viewers_folder_run_as_the_vmapped_run(
  david_root, tmp_path, monkeypatch
):
  # David_MMSys_18 has split files: copied into a viewer's folder they name pairs whose traces
  # are elsewhere, which loading the folder as a dataset refuses. Each client reads only its
  # own viewer's traces, with the dataset's split from the server, and the run (server and
  # clients in this process) leaves the summary the vmapped run leaves.
  identity_for_messages(monkeypatch)
  from fedvp_jax.flower.server import run_server

  config = TINY_RUN.replace(
    dataset="David-m5-h5",
    data_dir=str(david_root),
    num_clients=2,
    rounds=2,
    validation_fraction=0.2,
  )
  users = run_users(config)
  folders = {
    user: viewer_folder(david_root, "David_MMSys_18", user, tmp_path / f"viewer{user}", True)
    for user in users
  }
  with pytest.raises(DataError, match="has no trace"):
    load_traces(parse_spec(config.dataset), folders[users[0]])
  grid = DirectGrid({20 + i: {"user": u, "data-dir": str(folders[u])} for i, u in enumerate(users)})
  result = run_server(grid, config, out=tmp_path / "flower")
  engine_run_dir(config, tmp_path / "engine")
  ours = RunDir(tmp_path / "flower").read_summary()
  assert ours["seeds"][0]["missing_clients"] == [] and "new_viewers" in ours
  assert_same_summary(ours, RunDir(tmp_path / "engine").read_summary())
  assert [r["round"] for r in result.records] == [0, 1]


class DirectGrid:
  """A stand-in for Flower's Grid that hands each message to the client app's handler in this
  process, as node ``dst_node_id`` with the given node config."""

  def __init__(self, node_configs):
    from flwr.app import RecordDict

    self.node_configs = node_configs
    self.states = {node: RecordDict() for node in node_configs}  # each node's context.state

  def get_node_ids(self):
    return list(self.node_configs)

  def send_and_receive(self, messages, timeout=None):
    from flwr.app import Context

    from fedvp_jax.flower import client

    handlers = {"query": client.hello, "train": client.train, "evaluate": client.evaluate}
    for msg in messages:
      node = msg.metadata.dst_node_id
      context = Context(1, node, self.node_configs[node], self.states[node], {})
      yield handlers[msg.metadata.message_type](msg, context)


@needs_flwr
def test_a_client_with_other_settings_is_refused_with_a_clear_message(tmp_path, monkeypatch):
  identity_for_messages(monkeypatch)
  from fedvp_jax.errors import FedVPError
  from fedvp_jax.flower.server import RefusedError, roll_call, run_server

  setup = build_setup(SMALL)
  traces, users = run_dataset(SMALL)
  own = tmp_path / "config.json"
  own.write_text(json.dumps(to_record(SMALL.replace(model="transformer"))))
  grid = DirectGrid(
    {10 + i: {"partition-id": i} for i in range(len(users) - 1)}
    | {99: {"partition-id": len(users) - 1, "config": str(own)}}
  )
  with pytest.raises(RefusedError) as err:
    roll_call(grid, setup, users, grid.get_node_ids(), catalogue(traces))
  message = str(err.value)
  assert "\n" not in message
  assert "client node 99 refused the run" in message and "model: 'transformer' -> 'lstm'" in message
  assert isinstance(err.value, FedVPError)  # so the commands print it as one line
  # the same settings in the client's own config.json: accepted, and the run goes through
  one_round = SMALL.replace(rounds=1)
  own.write_text(json.dumps(to_record(one_round)))
  result = run_server(grid, one_round)
  assert len(result.records) == 1 and result.records[0]["missing_clients"] == []


@pytest.mark.parametrize(
  "args, expected",
  [
    (["client", "--superlink", "127.0.0.1:1", "--user", "3"], "or --insecure for plain HTTP"),
    (
      ["client", "--superlink", "127.0.0.1:1", "--user", "3", "--root-certificates", "/nope"],
      "--ssl-ca-certfile /nope: no such file",
    ),
    (["simulate", "--noise-multiplier", "1.0"], "differential privacy is not supported"),
  ],
  ids=["no-tls-choice", "missing-ca-file", "dp-refused"],
)
def test_fedvp_flower_refuses_bad_input_in_one_line(args, expected):
  done = subprocess.run(
    [sys.executable, "-m", "fedvp_jax.flower", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr
