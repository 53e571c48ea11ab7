"""Assemble the MetaGraphDef: graph, stripped op list, signature, saver and variable collections."""

from __future__ import annotations

from tensorboard.compat.proto import meta_graph_pb2

from lightning_saver.formats import tf_layouts
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.op_defs import op_def, shape_proto
from lightning_saver.graph.tf_export.variables import VariableStore

SERVING_KEY = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"


def _tensor_info(tensor: TfTensor) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(name=tensor.tensor_name, dtype=tensor.dtype,  # type: ignore[arg-type]
                                     tensor_shape=shape_proto(tensor.shape))


def build_meta_graph(g: GraphBuilder, inputs: dict[str, TfTensor], outputs: list[TfTensor],
                     store: VariableStore | None, *, tags: tuple[str, ...] = ("serve",)
                     ) -> meta_graph_pb2.MetaGraphDef:
    """A MetaGraphDef around ``g``'s graph; adds the Saver subgraph when there are variables."""
    meta = meta_graph_pb2.MetaGraphDef()
    if store is not None and store.variables:
        meta.saver_def.CopyFrom(store.add_saver())
        for collection, wanted in (("variables", None), ("trainable_variables", True)):
            values = meta.collection_def[collection].bytes_list.value
            values.extend(v.proto.SerializeToString() for v in store.variables
                          if wanted is None or v.trainable)
        # how each variable is laid out relative to the state_dict (formats/tf_layouts.py)
        meta.collection_def[tf_layouts.COLLECTION].bytes_list.value.append(store.layouts())
    info = meta.meta_info_def
    info.tags.extend(tags)
    info.stripped_default_attrs = True  # true: no node carries an attr at its default (see op_defs.py)
    info.stripped_op_list.op.extend(op_def(op) for op in sorted(g.ops_used))
    meta.graph_def.CopyFrom(g.graph)
    signature = meta.signature_def[SERVING_KEY]
    signature.method_name = PREDICT_METHOD
    for name, tensor in inputs.items():
        signature.inputs[name].CopyFrom(_tensor_info(tensor))
    for i, tensor in enumerate(outputs):
        signature.outputs[f"output_{i}"].CopyFrom(_tensor_info(tensor))
    return meta
