#!/usr/bin/env python3
"""Viewer heatmaps of one real video over time, with fedvp_jax's heatmap functions alone.

For one video, every viewer's head directions in a few consecutive time windows become one
heatmap per window: ``fedvp_jax.heatmaps`` is batched over windows where FedGen batches it
over clients. The heatmaps are drawn as a row of equirectangular images (longitude on x,
eastwards; latitude on y, north up) and saved to a PNG. This is where a saliency-map input
("salmap") starts: ``heat[w]`` is ``f32[grain/2, grain]``, the share of viewpoints per cell.

Run (the data root holds ``David_MMSys_18/``)::

    python examples/heatmap_only.py --data-dir ../shared/data --out /tmp/heatmaps.png
    FEDVP_DATA=../shared/data python examples/heatmap_only.py --video 2_Diner --grain 128 \\
        --sigma 5 --windows 6 --window-seconds 3 --points
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import matplotlib
import numpy as np

import fedvp_jax as fv
from fedvp_jax.data import SAMPLE_PERIOD

matplotlib.use("Agg")  # files only, no display needed
from matplotlib import pyplot as plt


def window_points(
  traces: list[np.ndarray], start: int, length: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
  """Every viewer's samples in ``count`` consecutive windows of ``length`` samples.

  Args:
    traces: the viewers' traces, ``f32[T_u, 3]`` each (lengths may differ).
    start: the first window's first sample.
    length: samples per window.
    count: number of windows.

  Returns:
    ``points: f32[count, viewers * length, 3]`` and ``mask: bool[count, viewers * length]``,
    False where a trace has ended (those points are padding).
  """
  points = np.zeros((count, len(traces), length, 3), np.float32)
  points[..., 0] = 1.0  # padding stays a unit vector
  mask = np.zeros((count, len(traces), length), bool)
  for w in range(count):
    lo = start + w * length
    for u, trace in enumerate(traces):
      part = trace[lo : lo + length]
      points[w, u, : len(part)], mask[w, u, : len(part)] = part, True
  return points.reshape(count, -1, 3), mask.reshape(count, -1)


def draw(
  heat: np.ndarray, titles: list[str], path: str, suptitle: str, points=None, dpi: int = 100
) -> None:
  """Saves a row of equirectangular heatmaps ``heat: f32[W, G/2, G]`` to ``path``.

  The figure is exactly ``(3.5 * W + 1) x 2.6`` inches at ``dpi``. ``points``, if given, is a
  list of ``(lon_deg, lat_deg)`` arrays drawn over each panel.
  """
  fig, axes = plt.subplots(
    1, len(heat), figsize=(3.5 * len(heat) + 1, 2.6), dpi=dpi, squeeze=False, layout="constrained"
  )
  vmax = float(heat.max())
  for w, ax in enumerate(axes[0]):
    # Row 0 of a heatmap is the northernmost: origin="upper" puts it at the top.
    image = ax.imshow(
      heat[w],
      extent=(-180, 180, -90, 90),
      origin="upper",
      cmap="inferno",
      vmin=0.0,
      vmax=vmax,
      interpolation="nearest",
    )
    if points is not None:
      ax.scatter(*points[w], s=0.5, c="cyan", alpha=0.3, linewidths=0)
    ax.set(
      title=titles[w],
      xlabel="longitude (°)",
      xticks=range(-180, 181, 90),
      yticks=range(-90, 91, 45),
      xlim=(-180, 180),
      ylim=(-90, 90),
    )
  axes[0, 0].set_ylabel("latitude (°)")
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of viewpoints per cell")
  fig.suptitle(suptitle)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=None, help="data root (default: $FEDVP_DATA)")
  parser.add_argument("--dataset", default="David", help="trace collection under the data root")
  parser.add_argument("--video", default=None, help="video name (default: the first video)")
  parser.add_argument("--grain", type=int, default=64, help="grid of grain/2 x grain cells")
  parser.add_argument("--sigma", type=float, default=10.0, help="Gaussian blur, degrees")
  parser.add_argument("--windows", type=int, default=4, help="number of time windows")
  parser.add_argument("--window-seconds", type=float, default=5.0, help="length of each window")
  parser.add_argument("--start-seconds", type=float, default=0.0, help="start of the first window")
  parser.add_argument("--points", action="store_true", help="draw the viewpoints over the heatmaps")
  parser.add_argument("--dpi", type=int, default=100)
  parser.add_argument("--out", default="viewer_heatmaps.png", help="PNG to write")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> np.ndarray:
  """Computes, prints and draws the heatmaps.

  Returns:
    The heatmaps ``f32[windows, grain/2, grain]``.

  Raises:
    DataError: for a missing data root, dataset or video.
    ConfigError: for an invalid grain, sigma or window.
  """
  args = parse_args(argv)
  fv.heatmap.check_grain(args.grain)
  length = round(args.window_seconds / SAMPLE_PERIOD)
  start = round(args.start_seconds / SAMPLE_PERIOD)
  if args.windows < 1 or length < 1 or start < 0:
    raise fv.ConfigError("--windows and --window-seconds must be positive, --start-seconds >= 0")
  # load_traces takes a full dataset spec; the window shape (m, h) plays no part here.
  traces = fv.load_traces(fv.parse_spec(f"{args.dataset}-m1-h1"), args.data_dir)
  video = args.video or traces.videos[0]
  if video not in traces.videos:
    raise fv.DataError(
      f"dataset {traces.name} has no video {video!r}; its videos are {', '.join(traces.videos)}"
    )
  viewers = [u for u in traces.users if (video, u) in traces.traces]
  points, mask = window_points(
    [traces.traces[video, u] for u in viewers], start, length, args.windows
  )
  if not mask.any(axis=1).all():
    raise fv.ConfigError(
      f"video {video} has no samples in some windows: its traces end before "
      f"{(start + args.windows * length) * SAMPLE_PERIOD:g} s"
    )

  heat = np.asarray(fv.heatmaps(jnp.asarray(points), args.grain, args.sigma, jnp.asarray(mask)))

  lon_c, lat_c = (np.degrees(np.asarray(c)) for c in fv.heatmap.cell_centers(args.grain))
  titles, overlay = [], []
  print(f"{traces.name}/{video}: {len(viewers)} viewers, grain {args.grain}, sigma {args.sigma:g}°")
  print(
    f"{'window':>6} {'seconds':>13} {'viewers':>7} {'points':>6} {'peak lon':>9} {'peak lat':>9} "
    f"{'cells for 50%':>13}"
  )
  for w in range(args.windows):
    t0 = (start + w * length) * SAMPLE_PERIOD
    row, col = np.unravel_index(np.argmax(heat[w]), heat[w].shape)
    half = int(np.searchsorted(np.cumsum(np.sort(heat[w], axis=None)[::-1]), 0.5)) + 1
    seen = int(mask[w].reshape(len(viewers), length).any(axis=1).sum())
    print(
      f"{w:>6} {t0:>6.1f}-{t0 + length * SAMPLE_PERIOD:<6.1f} {seen:>7} {int(mask[w].sum()):>6} "
      f"{lon_c[col]:>8.1f}° {lat_c[row]:>8.1f}° {half:>13}"
    )
    titles.append(f"{t0:g}-{t0 + length * SAMPLE_PERIOD:g} s")
    lon, lat = fv.vec_to_lonlat(jnp.asarray(points[w][mask[w]]))
    overlay.append((np.degrees(np.asarray(lon)), np.degrees(np.asarray(lat))))

  draw(
    heat,
    titles,
    args.out,
    f"{video}: where {len(viewers)} viewers look",
    overlay if args.points else None,
    args.dpi,
  )
  print(f"wrote {args.out}")
  return heat


if __name__ == "__main__":
  try:
    main()
  except fv.SettingError as err:  # a setting is named as this script's flag
    sys.exit(f"error: --{err.setting.replace('_', '-')}: {err.reason}")
  except fv.FedVPError as err:
    sys.exit(f"error: {err}")
