"""`twist plan`: check a TwIST layout and size it per GPU before any job is queued.

Imports point one way, down this list:

* :mod:`.sizes`      - what a subnet keeps per layer; parameters, FLOPs, activation bytes per shard and stage
* :mod:`.checks`     - the layout's checks and refusals (reason + suggested fix)
* :mod:`.arithmetic` - ``make_plan -> Plan``: memory, compute and traffic per pipeline stage kind (the
  formulas are in its docstring); pure arithmetic, no argparse, no files, no printing
* :mod:`.report`     - ``format_plan(plan) -> str`` (the JSON form is ``Plan.to_dict``)
* :mod:`.cli_args`   - ``add_plan_args``, ``plan_from_args`` (train's flags + the machines -> a Plan)
"""

from .arithmetic import PATHS, Plan, StagePlan, make_plan
from .cli_args import add_plan_args, plan_from_args
from .report import format_plan
from .sizes import GIB, LayerShape, activation_bytes, forward_flops, layer_params, stage_params, subnet_layer_shapes

__all__ = [
    "LayerShape",
    "StagePlan",
    "Plan",
    "make_plan",
    "format_plan",
    "subnet_layer_shapes",
    "add_plan_args",
    "plan_from_args",
    "layer_params",
    "stage_params",
    "activation_bytes",
    "forward_flops",
    "GIB",
    "PATHS",
]
