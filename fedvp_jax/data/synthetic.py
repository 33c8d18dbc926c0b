"""Synthetic head-motion traces: the built-in, file-free dataset ``Synthetic``.

Generative model (angles in degrees, times in seconds, one sample every ``SAMPLE_PERIOD``):

* **Videos.** Each video has ``3`` salient regions ("attractors") shared by all of its viewers.
  Attractor ``k`` moves smoothly: ``lon(t) = lon0 + drift * t + A sin(2 pi f t + phi)`` and
  ``lat(t) = lat0 + B sin(2 pi f' t + phi')``, with ``lon0 ~ U(-180, 180)``,
  ``lat0 ~ -2 + Laplace(3)``, ``drift ~ N(0, 12 / s)``, ``A ~ U(0, 40)``, ``B ~ U(0, 10)`` and
  frequencies ``~ U(0.03, 0.12) Hz``. The attractors have Dirichlet(1) salience weights.
* **Viewers** (the non-IID part: the same for a viewer across all videos): a longitude offset
  ``~ N(0, 10)`` and a latitude bias ``~ N(-2, 6)`` from every attractor they follow, a
  favourite attractor rank (its salience weight tripled), a speed gain ``exp(U(-0.5, 0.5))`` and
  an exploration tendency ``U(0.4, 1.6)``. Gains and tendencies are stratified draws, so every
  seed gets the same spread of viewer types and the dataset statistics hardly depend on it.
* **Head motion.** The head follows a target point as a damped second-order system: the
  desired velocity is ``gain * 2 / s`` times the great-circle error plus the target's own
  velocity (smooth pursuit), capped at ``gain * 100 / s``; the head velocity relaxes towards it
  with a 0.5 s time constant, plus velocity noise of ``4 / s / sqrt(s)``. The target is an
  attractor plus the viewer's offsets plus a slow Ornstein-Uhlenbeck wander (std
  ``exploration * 26`` east and ``exploration * 3`` north, time constant 1.5 s): looking around
  within a region.
* **Saccades** at ``exploration * 0.5 / s`` (about ten target draws per 20 s trace, some of
  which redraw the current attractor): the target switches, with probability
  ``exploration * 0.35`` to a free-look point (longitude the current one
  ``+ N(0, 130)``, latitude the viewer's bias ``+ Laplace(30)``), otherwise to an attractor
  drawn by salience times preference. The speed cap makes a saccade a fast turn over several
  samples, as real head turns are, rather than a jump.
* **Fixations** at ``0.15 / s``, lasting ``Exp(1.5 s)``: the head stops (desired velocity zero),
  which produces the many near-still steps of real traces.
* Every trace starts near the front (longitude and latitude ``~ N(0, 8)``).

Statistics of the great-circle step between consecutive samples (0.2 s apart, in degrees) and
of the latitude, measured on David_MMSys_18 (19 videos x 57 users x 100 samples) and on this
dataset with the default arguments (12 videos x 24 users x 100 samples; seed 0, and the range
over seeds 0-7)::

                                     David_MMSys_18   Synthetic, seed 0   seeds 0-7
    mean step                        6.78             6.84                6.53 - 7.02
    median step                      5.22             5.16                5.00 - 5.44
    10th percentile step             0.63             0.78                0.74 - 0.84
    90th percentile step             14.66            15.46               14.45 - 15.69
    99th percentile step             29.8             24.2                23.1 - 24.8
    steps below 1 degree             14.3 %           13.5 %              12.5 - 14.3 %
    steps above 20 degrees           4.0 %            3.5 %               2.6 - 4.1 %
    latitude mean                    -4.6             -4.5                -5.3 - -1.7
    latitude std                     19.9             19.0                19.0 - 20.1
    median |latitude|                8.3              9.2                 7.3 - 10.0
    mean displacement in 1 / 2 / 5 s 31 / 53 / 83     31 / 50 / 74        29-32 / 47-52 / 70-78
    cosine of consecutive steps      0.77             0.79                0.78 - 0.79

Viewers of one video are nearer each other at the same time than viewers of different videos
(mean distance 82.6 vs 88.1 degrees on David, 70.8 vs 85.7 here: the shared regions are more
salient here), and viewers differ (one-way ANOVA F over users of the per-trace mean latitude:
David 10.0, here 7.3; of the per-trace mean step: 16.3 and 18.1). Both datasets are learnable
in the same way: on the last third of the videos, a linear map of the last 2 s in the head's
local frame, fitted on the first two thirds, beats repeating the last position and constant
angular velocity at every horizon up to 5 s (mean error at 1 s: David 23.8 vs 31.8 and 29.2
degrees, Synthetic 20.6 vs 29.4 and 26.0), and on both constant velocity beats repeating the
last position at 1 s but not at 2 s.
"""

from __future__ import annotations

import numpy as np

from fedvp_jax.data.traces import SAMPLE_PERIOD, TraceSet
from fedvp_jax.errors import DataError

NAME = "Synthetic"
"""Name of the generated ``TraceSet``."""

TRAIN_VIDEO_FRACTION = 2 / 3
"""Fraction of the videos (rounded) that are train videos in ``TraceSet.split``."""

_NUM_ATTRACTORS = 3
# Attractors, per video; angles in radians, rates per second.
_ATTRACTOR_LAT_MEAN = np.radians(-2.0)
_ATTRACTOR_LAT_SCALE = np.radians(3.0)  # Laplace: most regions near the horizon, a few far off
_ATTRACTOR_DRIFT_STD = np.radians(12.0)
_ATTRACTOR_SWAY = np.radians((40.0, 10.0))  # largest amplitude in longitude, latitude
_ATTRACTOR_SWAY_FREQ = (0.03, 0.12)
# Viewers.
_USER_LON_OFFSET_STD = np.radians(10.0)
_USER_LAT_BIAS_MEAN = np.radians(-2.0)  # real viewers look slightly down on average
_USER_LAT_BIAS_STD = np.radians(6.0)
_USER_LOG_GAIN = (-0.5, 0.5)
_USER_EXPLORATION = (0.4, 1.6)
_FAVOURITE_WEIGHT = 3.0
# Head motion.
_PURSUIT_GAIN = 2.0
_MAX_SPEED = np.radians(100.0)
_VELOCITY_TAU = 0.5
_VELOCITY_NOISE = np.radians(4.0)
_WANDER_STD = np.radians((26.0, 3.0))  # east, north: people look around more than up and down
_WANDER_TAU = 1.5
_SACCADE_RATE = 0.5
_FREE_LOOK_PROB = 0.35
_FREE_LOOK_LON_STD = np.radians(130.0)
_FREE_LOOK_LAT_SCALE = np.radians(30.0)
_FIXATION_RATE = 0.15
_FIXATION_DURATION = 1.5
_START_STD = np.radians(8.0)
_MAX_LAT = np.radians(80.0)  # keeps longitude steps (divided by cos(lat)) finite


def synthetic_traces(
  *, num_users: int = 24, num_videos: int = 12, num_samples: int = 100, seed: int = 0
) -> TraceSet:
  """Generates the Synthetic dataset: every user watches every video.

  Args:
    num_users: viewers, named ``"0"`` .. ``"<num_users - 1>"``.
    num_videos: videos, named ``"1_synthetic"`` .. ``"<num_videos>_synthetic"``.
    num_samples: samples per trace, ``SAMPLE_PERIOD`` seconds apart.
    seed: the random seed; the same seed gives identical traces.

  Returns:
    A ``TraceSet`` named ``"Synthetic"`` of ``f32[num_samples, 3]`` unit vectors, whose split
    has the first ``round(2/3 * num_videos)`` videos as train videos and the rest as test
    videos, each with every user.

  Raises:
    DataError: when an argument is not an integer or is below its minimum (1 user, 2 videos,
      2 samples, seed 0).
  """
  for arg, value, low in (
    ("num_users", num_users, 1),
    ("num_videos", num_videos, 2),
    ("num_samples", num_samples, 2),
    # numpy would reject a negative or fractional seed with its own ValueError or TypeError,
    # and take None as "fresh entropy", which breaks "the same seed gives identical traces".
    ("seed", seed, 0),
  ):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
      raise DataError(f"Synthetic dataset: {arg} must be an integer >= {low}, got {value!r}")
  rng = np.random.default_rng(seed)
  att_lon, att_lat, salience = _attractors(rng, num_videos, num_samples)
  lon, lat = _simulate(rng, att_lon, att_lat, salience, num_users)

  cos_lat = np.cos(lat)
  vecs = np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=-1)
  vecs = vecs.astype(np.float32).reshape(num_videos, num_users, num_samples, 3)
  videos = tuple(f"{i + 1}_synthetic" for i in range(num_videos))
  users = tuple(str(i) for i in range(num_users))
  traces = {(v, u): vecs[i, j] for i, v in enumerate(videos) for j, u in enumerate(users)}
  num_train = round(TRAIN_VIDEO_FRACTION * num_videos)
  split = {
    "train": tuple((u, v) for v in videos[:num_train] for u in users),
    "test": tuple((u, v) for v in videos[num_train:] for u in users),
  }
  return TraceSet(NAME, videos, users, traces, split)


def _attractors(
  rng: np.random.Generator, num_videos: int, num_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Attractor longitudes and latitudes ``f64[V, K, T]`` (radians) and saliences ``f64[V, K]``."""
  shape = (num_videos, _NUM_ATTRACTORS, 1)
  t = np.arange(num_samples) * SAMPLE_PERIOD
  lon0 = rng.uniform(-np.pi, np.pi, shape)
  lat0 = rng.laplace(_ATTRACTOR_LAT_MEAN, _ATTRACTOR_LAT_SCALE, shape)
  drift = rng.normal(0.0, _ATTRACTOR_DRIFT_STD, shape)
  amp = rng.uniform(0.0, 1.0, (2, *shape)) * _ATTRACTOR_SWAY[:, None, None, None]
  freq = rng.uniform(*_ATTRACTOR_SWAY_FREQ, (2, *shape))
  phase = rng.uniform(0.0, 2 * np.pi, (2, *shape))
  sway = amp * np.sin(2 * np.pi * freq * t + phase)
  att_lon = lon0 + drift * t + sway[0]
  att_lat = np.clip(lat0 + sway[1], -_MAX_LAT, _MAX_LAT)
  # Sorted so that rank 0 is each video's most salient region, which makes a viewer's
  # favourite rank mean the same kind of region in every video.
  salience = -np.sort(-rng.dirichlet(np.ones(_NUM_ATTRACTORS), num_videos), axis=-1)
  return att_lon, att_lat, salience


def _simulate(
  rng: np.random.Generator,
  att_lon: np.ndarray,
  att_lat: np.ndarray,
  salience: np.ndarray,
  num_users: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Simulates every trace at once, one time step at a time.

  Returns:
    Head longitudes and latitudes ``f64[V * U, T]`` in radians; trace ``i`` is video ``i // U``
    and user ``i % U``.
  """
  num_videos, k, num_samples = att_lon.shape
  dt = SAMPLE_PERIOD
  att_vlon = np.gradient(att_lon, dt, axis=-1)
  att_vlat = np.gradient(att_lat, dt, axis=-1)

  lon_offset = rng.normal(0.0, _USER_LON_OFFSET_STD, num_users)
  lat_bias = rng.normal(_USER_LAT_BIAS_MEAN, _USER_LAT_BIAS_STD, num_users)
  log_gain = _stratified(rng, num_users, *_USER_LOG_GAIN)
  exploration = _stratified(rng, num_users, *_USER_EXPLORATION)
  favourite = rng.integers(0, k, num_users)

  n = num_videos * num_users
  vid = np.repeat(np.arange(num_videos), num_users)
  usr = np.tile(np.arange(num_users), num_videos)
  lon_offset, lat_bias, expl = lon_offset[usr], lat_bias[usr], exploration[usr]
  gain = np.exp(log_gain)[usr, None]
  pref = salience[vid] * np.where(np.arange(k) == favourite[usr, None], _FAVOURITE_WEIGHT, 1.0)
  cum_pref = np.cumsum(pref / pref.sum(axis=-1, keepdims=True), axis=-1)

  def draw_attractor() -> np.ndarray:
    # Rounding can leave cum_pref[-1] a hair below 1, hence the clamp.
    return np.minimum((rng.random((n, 1)) > cum_pref).sum(axis=-1), k - 1)

  wander_std = _WANDER_STD * expl[:, None]
  wander_decay = np.exp(-dt / _WANDER_TAU)
  wander_kick = wander_std * np.sqrt(1 - wander_decay**2)
  velocity_blend = 1 - np.exp(-dt / _VELOCITY_TAU)
  saccade_p = 1 - np.exp(-_SACCADE_RATE * expl * dt)
  free_look_p = _FREE_LOOK_PROB * expl
  fixation_start_p = 1 - np.exp(-_FIXATION_RATE * dt)
  fixation_end_p = 1 - np.exp(-dt / _FIXATION_DURATION)

  target = draw_attractor()
  free = np.zeros(n, bool)
  free_lon = np.zeros(n)
  free_lat = np.zeros(n)
  fixating = np.zeros(n, bool)
  wander = rng.normal(0.0, wander_std)
  velocity = np.zeros((n, 2))  # east, north; radians per second
  lon = rng.normal(0.0, _START_STD, n)
  lat = rng.normal(0.0, _START_STD, n)
  out_lon = np.empty((n, num_samples))
  out_lat = np.empty((n, num_samples))
  for step in range(num_samples):
    out_lon[:, step], out_lat[:, step] = lon, lat
    saccade = rng.random(n) < saccade_p
    go_free = saccade & (rng.random(n) < free_look_p)
    target = np.where(saccade & ~go_free, draw_attractor(), target)
    free = np.where(saccade, go_free, free)
    free_lon = np.where(go_free, lon + rng.normal(0.0, _FREE_LOOK_LON_STD, n), free_lon)
    free_lat = np.where(go_free, lat_bias + rng.laplace(0.0, _FREE_LOOK_LAT_SCALE, n), free_lat)

    tgt_lon = np.where(free, free_lon, att_lon[vid, target, step] + lon_offset) + wander[:, 0]
    tgt_lat = np.where(free, free_lat, att_lat[vid, target, step] + lat_bias) + wander[:, 1]
    tgt_lat = np.clip(tgt_lat, -_MAX_LAT, _MAX_LAT)
    cos_lat = np.cos(lat)
    error = np.stack([_wrap(tgt_lon - lon) * cos_lat, tgt_lat - lat], axis=-1)
    # Feed-forward of the attractor's velocity is what makes pursuit lag-free, as in real
    # smooth pursuit; free-look points do not move.
    target_velocity = np.stack(
      [att_vlon[vid, target, step] * cos_lat, att_vlat[vid, target, step]], axis=-1
    )
    desired = gain * _PURSUIT_GAIN * error + np.where(free[:, None], 0.0, target_velocity)
    fixating = np.where(fixating, rng.random(n) >= fixation_end_p, rng.random(n) < fixation_start_p)
    desired[fixating] = 0.0
    speed = np.linalg.norm(desired, axis=-1, keepdims=True)
    desired *= np.minimum(1.0, gain * _MAX_SPEED / np.maximum(speed, 1e-12))

    velocity += velocity_blend * (desired - velocity)
    velocity += rng.normal(0.0, _VELOCITY_NOISE * np.sqrt(dt), (n, 2))
    lat = np.clip(lat + velocity[:, 1] * dt, -_MAX_LAT, _MAX_LAT)
    lon = lon + velocity[:, 0] * dt / np.cos(lat)
    wander = wander * wander_decay + rng.normal(0.0, wander_kick)
  return out_lon, out_lat


def _stratified(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
  """``n`` draws from ``U(low, high)``, one in each of ``n`` equal strata, in random order."""
  return low + (high - low) * (rng.permutation(n) + rng.random(n)) / n


def _wrap(angle: np.ndarray) -> np.ndarray:
  """``angle`` wrapped into ``[-pi, pi)``."""
  return (angle + np.pi) % (2 * np.pi) - np.pi
