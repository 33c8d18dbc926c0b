"""FLOPs of a compiled program with every loop counted once per iteration.

XLA's ``compiled.cost_analysis()`` counts the body of a ``while`` (``lax.scan``,
``fori_loop``) once, not once per iteration: a scan of ten 256^3 matmuls reports 0.034
GFLOP, not 0.34. fedvp_jax's local update is a scan over local steps, so its FLOPs came out
about ``local_steps`` times too low. This module counts them three independent ways:

* :func:`hlo_flops` walks the optimised HLO text of a compiled program and multiplies every
  ``while`` body by its ``known_trip_count`` (XLA records it for scans). Matrix products
  (``dot``) are counted exactly as ``2 * prod(output) * prod(contracted dims)``; other
  arithmetic as XLA's cost model does (one FLOP per output element of an elementwise op,
  one per input element of a reduction; transcendentals apart). A loop without a known trip
  count, a convolution or a custom call raises instead of being miscounted.
* :func:`analytic_step_flops` derives one local step's matrix-product FLOPs (forward and
  backward) from the model's parameter shapes, by hand.
* Compiling a single local step (a scan of length 1, which XLA turns into straight-line
  code) lets XLA's own cost analysis count it correctly; times the number of steps.

``python benchmarks/flops.py`` prints the three side by side for the four rounds' local
training, with XLA's loop-blind number for contrast.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

_HEADER = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.-]+) \(.*\) -> .*\{$")
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT )?%(?P<name>[\w.-]+) = (?P<type>.*?) (?P<op>[a-z][\w-]*)\((?P<args>.*)$"
)
_ARRAY = re.compile(r"^[a-z]\w*\[(?P<dims>[\d,]*)\]")
_TRANSCENDENTAL = {
  "exponential",
  "exponential-minus-one",
  "log",
  "log-plus-one",
  "power",
  "sqrt",
  "cbrt",
  "rsqrt",
  "tanh",
  "sine",
  "cosine",
  "tan",
  "logistic",
  "atan2",
  "erf",
}
_ELEMENTWISE = {
  "add",
  "subtract",
  "multiply",
  "divide",
  "maximum",
  "minimum",
  "negate",
  "abs",
  "sign",
  "compare",
  "select",
  "clamp",
  "remainder",
  "floor",
  "ceil",
  "round-nearest-even",
  "round-nearest-afz",
  "and",
  "or",
  "xor",
  "not",
  "convert",
  "is-finite",
}


@dataclasses.dataclass(frozen=True)
class Flops:
  """FLOPs of a program: matrix products, other arithmetic, transcendental evaluations."""

  dot: float = 0.0
  other: float = 0.0
  transcendental: float = 0.0

  @property
  def total(self) -> float:
    """Matrix products plus other arithmetic (XLA's ``flops``; transcendentals apart)."""
    return self.dot + self.other

  def __add__(self, other: Flops) -> Flops:
    return Flops(
      self.dot + other.dot,
      self.other + other.other,
      self.transcendental + other.transcendental,
    )

  def __mul__(self, factor: float) -> Flops:
    return Flops(self.dot * factor, self.other * factor, self.transcendental * factor)


@dataclasses.dataclass
class _Instruction:
  name: str
  dims: list[int] | None  # None for a tuple
  op: str
  operands: list[str]
  attributes: str


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """Computations by name, and the entry computation's name."""
  computations: dict[str, list[_Instruction]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header["name"], [])
      if line.startswith("ENTRY"):
        entry = header["name"]
      continue
    if line.strip() == "}":
      current = None
      continue
    instruction = _INSTRUCTION.match(line)
    if current is None or not instruction:
      continue
    array = _ARRAY.match(instruction["type"])
    dims = [int(d) for d in array["dims"].split(",") if d] if array else None
    # Operands are the %names before the closing parenthesis of the argument list.
    args = instruction["args"]
    depth, end = 1, len(args)
    for i, char in enumerate(args):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        end = i
        break
    operands = re.findall(r"%([\w.-]+)", args[:end])
    current.append(_Instruction(instruction["name"], dims, instruction["op"], operands, args[end:]))
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _attribute(attributes: str, key: str) -> str | None:
  found = re.search(rf"\b{key}=%?([\w.-]+)", attributes)
  return found.group(1) if found else None


def _called(attributes: str, *keys: str) -> list[str]:
  names = [n for key in keys if (n := _attribute(attributes, key))]
  listed = re.search(r"branch_computations=\{([^}]*)\}", attributes)
  if listed:
    names += re.findall(r"%([\w.-]+)", listed.group(1))
  return names


def hlo_flops(hlo_text: str, branches: str = "max") -> Flops:
  """FLOPs of the optimised HLO module ``hlo_text`` (``compiled.as_text()``), loops unrolled.

  Args:
    hlo_text: the compiled program's HLO.
    branches: how a ``conditional`` counts: ``"max"`` (its most expensive branch; an upper
      bound) or ``"min"`` (its cheapest).

  Raises:
    ValueError: for a loop without a known trip count, a convolution or a custom call, which
      this counter cannot price.
  """
  computations, entry = _parse(hlo_text)
  pick = {"max": max, "min": min}[branches]
  memo: dict[str, Flops] = {}

  def cost(name: str) -> Flops:  # noqa: PLR0912 (one branch per kind of instruction)
    if name in memo:
      return memo[name]
    shapes = {i.name: i.dims for i in computations[name]}
    total = Flops()
    for ins in computations[name]:
      out = math.prod(ins.dims) if ins.dims is not None else 0
      if ins.op == "dot":
        lhs = shapes[ins.operands[0]] or []
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attributes)
        dims = [int(d) for d in contracted.group(1).split(",") if d] if contracted else []
        total += Flops(dot=2.0 * out * math.prod(lhs[d] for d in dims))
      elif ins.op in ("convolution", "custom-call"):
        raise ValueError(f"cannot count the FLOPs of {ins.op} {ins.name}")
      elif ins.op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attributes)
        if not trips:
          raise ValueError(f"while loop {ins.name} has no known trip count")
        body = _attribute(ins.attributes, "body")
        condition = _attribute(ins.attributes, "condition")
        assert body and condition
        total += (cost(body) + cost(condition)) * int(trips.group(1))
      elif ins.op == "conditional":
        options = [
          cost(c) for c in _called(ins.attributes, "true_computation", "false_computation")
        ]
        total += pick(options, key=lambda f: f.total)
      elif ins.op in ("fusion", "call", "async-start"):
        for called in _called(ins.attributes, "calls", "to_apply"):
          total += cost(called)
      elif ins.op == "reduce":
        reducer = _attribute(ins.attributes, "to_apply")
        inputs = math.prod(shapes[ins.operands[0]] or [])
        total += cost(reducer) * inputs if reducer else Flops()
      elif ins.op == "reduce-window":
        reducer = _attribute(ins.attributes, "to_apply")
        size = re.search(r"window=\{size=([\dx]+)", ins.attributes)
        window = math.prod(int(s) for s in size.group(1).split("x")) if size else 1
        total += cost(reducer) * (out * window) if reducer else Flops()
      elif ins.op in _TRANSCENDENTAL:
        total += Flops(transcendental=out)
      elif ins.op in _ELEMENTWISE:
        total += Flops(other=out)
    memo[name] = total
    return total

  return cost(entry)


def xla_flops(compiled: Any) -> float:
  """XLA's own count (``cost_analysis()["flops"]``): loop bodies counted once."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def _dense(kernel: Any) -> tuple[int, int]:
  """``(inputs, outputs)`` of a Dense kernel, flattening flax's multi-axis attention kernels."""
  shape = kernel.shape
  return (shape[0], math.prod(shape[1:])) if len(shape) == 3 else (shape[0], shape[1])


def analytic_step_flops(model: str, params: Mapping[str, Any], batch: int, history: int) -> float:
  """Matrix-product FLOPs of one client's training step (forward and backward), by hand.

  The backward pass of a product ``y = x W`` costs two more products of the same size
  (``dW = x^T dy`` and ``dx = dy W^T``), except that ``dx`` is skipped where ``x`` does not
  depend on the params (the data, the LSTM's zero initial state). Elementwise work
  (activations, layer norms, the optimizer) is not counted.

  Args:
    model: ``"transformer"`` or ``"lstm"``.
    params: one client's params (``build_model(...).init``).
    batch: windows per step.
    history: M, steps of history per window.
  """
  encoder, head = params["encoder"], params["head"]
  # (forward FLOPs per window, whether the product's input needs a gradient)
  products: list[tuple[int, bool]] = [
    (2 * math.prod(encoder["out"]["kernel"].shape), True),  # on the last step only
    (2 * math.prod(head["hidden"]["kernel"].shape), True),
    (2 * math.prod(head["out"]["kernel"].shape), True),
  ]
  if model == "transformer":
    products.append((2 * history * math.prod(encoder["embed"]["kernel"].shape), False))
    blocks = list(encoder["blocks"].values())
    for index, block in enumerate(blocks):
      # The last block computes the last position's query, attention output and MLP only;
      # keys and values still come from every position.
      queries = 1 if index == len(blocks) - 1 else history
      attention = block["attention"]
      for p, positions in (("query", queries), ("key", history), ("value", history)):
        products.append((2 * positions * math.prod(attention[p]["kernel"].shape), True))
      products.append((2 * queries * math.prod(attention["out"]["kernel"].shape), True))
      heads_width = math.prod(attention["query"]["kernel"].shape[1:])
      # Scores q k^T and their mix with v: both operands need gradients. With one query, dk of
      # the scores and dv of the mix contract over that one position: outer products, which
      # XLA writes as broadcast multiplies, so they are elementwise work here too.
      product = 2 * queries * history * heads_width
      products += [(product, True)] * 2 if queries > 1 else [(product, False)] * 2
      for p in ("mlp_in", "mlp_out"):
        products.append((2 * queries * math.prod(block[p]["kernel"].shape), True))
  elif model == "lstm":
    # flax's OptimizedLSTMCell: the four gates' input and hidden kernels, each fused into one.
    cell = encoder["cell"]
    recurrent = 2 * math.prod(cell["dense_h"]["kernel"].shape)
    products.append((2 * history * math.prod(cell["dense_i"]["kernel"].shape), False))
    # The model multiplies its zero initial state too; only that product's dx is skipped.
    products += [(recurrent, False)] + [(recurrent, True)] * (history - 1)
  else:
    raise ValueError(f"unknown model {model!r}")
  return batch * sum(forward * (3 if input_grad else 2) for forward, input_grad in products)


def local_training_flops(built: Any, steps: int, batch: int) -> dict[str, Any]:
  """Local training's FLOPs, every way: see the module docstring. ``built`` is a
  :class:`workload.Built`; returns GFLOP counts and the compiled scanned update."""
  import jax

  from fedvp_jax.algorithms import local_update, prediction_loss
  from fedvp_jax.algorithms.client import stack
  from fedvp_jax.data.federated import sample_batches

  clients = built.data.num_clients
  one = built.net.init(jax.random.key(0))
  optimizer = built.workload.optimizer()
  params = stack(one, clients)
  opt_state = jax.vmap(optimizer.init)(params)
  update = jax.jit(local_update(prediction_loss(built.net, "mse"), optimizer))

  def compile_for(num_steps: int) -> Any:
    batches = sample_batches(jax.random.key(2), built.data, num_steps, batch)
    return update.lower(params, opt_state, batches, jax.random.key(3), None).compile(), batches

  scanned, batches = compile_for(steps)
  single, _ = compile_for(1)
  if " while(" in single.as_text():
    raise AssertionError("the one-step update still has a loop; XLA would count it once")
  analytic = analytic_step_flops(built.workload.model, one, batch, built.history)
  return {
    "analytic": analytic * steps * clients / 1e9,
    "hlo": hlo_flops(scanned.as_text()),
    "single_xla": xla_flops(single) * steps / 1e9,
    "single_hlo": hlo_flops(single.as_text()) * steps,
    "xla_scanned": xla_flops(scanned) / 1e9,
    "compiled": scanned,
    "inputs": (params, opt_state, batches),
  }


def main(argv: list[str] | None = None) -> int:
  import argparse

  from workload import Workload, build

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", help="data root (default: $FEDVP_DATA)")
  parser.add_argument("--dataset", default="David-m10-h1")
  args = parser.parse_args(argv)
  print(
    "| model | analytic (matmuls) | HLO x trip counts: matmuls | HLO x trip counts: all "
    "| one step x steps, XLA: all | one step x steps, HLO: all | XLA on the scan (loop once) |"
  )
  print("|---|---|---|---|---|---|---|")
  for model in ("transformer", "lstm"):
    built = build(Workload(model=model, dataset=args.dataset, data_dir=args.data_dir))
    f = local_training_flops(built, built.workload.local_steps, built.workload.batch_size)
    print(
      f"| {model} | {f['analytic']:.2f} | {f['hlo'].dot / 1e9:.2f} | {f['hlo'].total / 1e9:.2f} "
      f"| {f['single_xla']:.2f} | {f['single_hlo'].total / 1e9:.2f} | {f['xla_scanned']:.2f} |"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
