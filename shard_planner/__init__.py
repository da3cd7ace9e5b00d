"""Pure planning: model accounting, node resources, the layer split and its predicted speed.

No mlx, grpc or numpy here: `clusterd plan` runs anywhere, before anything is downloaded.
"""

from shard_planner.hardware import NodeSpec, hypothetical_node, parse_node_arg
from shard_planner.links import LinkMeasurements, load_links, parse_links
from shard_planner.model_spec import (
    ModelSpec,
    Quantization,
    model_spec_from_config,
    model_spec_from_dir,
)
from shard_planner.multi import AlsoModel, MultiPlan, plan_many
from shard_planner.planner import Plan, StagePlan, plan
from shard_planner.serving import ServingPrediction, predict_serving
from shard_planner.simulate import Prediction, simulate

__all__ = [
    "AlsoModel", "LinkMeasurements", "ModelSpec", "MultiPlan", "NodeSpec", "Plan", "Prediction",
    "Quantization", "ServingPrediction", "StagePlan", "hypothetical_node", "load_links",
    "model_spec_from_config", "model_spec_from_dir", "parse_links", "parse_node_arg", "plan",
    "plan_many", "predict_serving", "simulate",
]
