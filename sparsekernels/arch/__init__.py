"""The model map: where a model's attention, FFNs and residual stream live, found once.

    from sparsekernels.arch import describe, map_model
    describe(model)                      # print what was found (and what was not)
    m = map_model(model, dummy_input)    # layers, attention and FFN sites, streams, ties

Pruning, nn, attention, speedup and the recipes read the map; none of them looks for a
submodule by name. The names of transformers' submodules live in `arch.names` only.
Modules: `names` (the tables), `layers` (canonical [out, in] weight views), `sites`
(AttentionSite, FFNSite, AddNormSite, RMSNormSite), `find` (structural discovery), `trace`
(channel groups by one traced forward), `model_map` (ModelMap, map_model, describe),
`inputs` (running a model on a dummy input).
"""

from sparsekernels.arch.find import (StructureError, find_add_norm, find_attention, find_ffn,
                                    find_layers, find_rms_norms, layer_linears)
from sparsekernels.arch.model_map import LayerMap, ModelMap, Stream, describe, map_model
from sparsekernels.arch.sites import AddNormSite, AttentionSite, FFNSite, RMSNormSite
from sparsekernels.arch.trace import ChannelGroup, GroupMember, TracingError, find_channel_groups

__all__ = [
    "AddNormSite", "AttentionSite", "ChannelGroup", "FFNSite", "GroupMember", "LayerMap",
    "ModelMap", "Stream", "StructureError", "TracingError", "describe", "find_add_norm",
    "find_attention", "find_channel_groups", "find_ffn", "find_layers", "find_rms_norms",
    "layer_linears", "map_model", "RMSNormSite",
]
