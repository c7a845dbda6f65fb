"""The Hugging Face submodule and attribute names the package knows, and nothing else.

The model map (sparsekernels.arch) reads a model through these tables; no other module of
the package names a transformers submodule. A family whose parts are spelled differently
is one more row here (and, where its forward reads a different attribute, one more name in
the attribute tables), not a change in pruning, nn, attention or speedup.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- attention -------------------------------------------------------------------------
# Child names of separate Q, K, V projections under one attention module.
QKV_CHILDREN = (
    ("query", "key", "value"),       # BERT, RoBERTa
    ("q", "k", "v"),                 # T5
    ("q_proj", "k_proj", "v_proj"),  # BART, ViT (5.x), Llama, Mistral, Qwen2, Gemma2
    ("q_lin", "k_lin", "v_lin"),     # DistilBERT
)
# A fused QKV projection: child name -> its canonical rows. "blocked": [Q; K; V], each
# (heads or kv heads) x head_dim long. "interleaved": per kv head g, [q of its query heads;
# k_g; v_g] (GPT-NeoX / Falcon style).
FUSED_QKV_CHILDREN = {
    "c_attn": "blocked",             # GPT-2 (Conv1D)
    "qkv_proj": "blocked",           # Phi-3
    "Wqkv": "blocked",
    "query_key_value": "interleaved",
}
# Children that are not a fused QKV even though they sit beside c_proj (GPT-2 cross attention
# keeps its query apart and its key/value fused).
NOT_FUSED_QKV = ("q_attn",)
# The output projection: a child of the attention module...
OUTPUT_CHILDREN = ("o", "o_proj", "out_proj", "out_lin", "c_proj", "dense")
# ...or a sibling: BERT's attention.self is followed by attention.output.dense.
OUTPUT_SIBLING = ("output", "dense")
# Per-head or whole-width norms on queries and keys (Qwen3, Gemma3, OLMo2 style).
Q_NORM_CHILDREN = ("q_norm", "query_layernorm", "q_layernorm")
K_NORM_CHILDREN = ("k_norm", "key_layernorm", "k_layernorm")
# Attention modules that attend to another sequence (encoder-decoder cross attention).
CROSS_ATTENTION_NAMES = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn")

# Attributes an attention forward (or the model config) keeps its sizes in; read in order.
HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "attention_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv",
                 "multi_query_group_num")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
# Attributes holding heads x head_dim (rewritten when heads are removed).
HEAD_WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")
# The ratio query heads / kv heads, kept by grouped-query attention modules.
KV_GROUP_ATTRS = ("num_key_value_groups",)
# Rotary position embeddings: a model-level module class suffix, and the config fields that
# say how much of each head rotates.
ROTARY_CLASS_SUFFIX = "RotaryEmbedding"
ROTARY_CONFIG_ATTRS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim")
PARTIAL_ROTARY_ATTRS = ("partial_rotary_factor",)
# A model's own RMS norm classes (LlamaRMSNorm, Qwen2RMSNorm, ...) end with this; those that
# scale by (1 + weight) instead of weight (Gemma) are listed by name.
RMS_NORM_SUFFIX = "RMSNorm"
RMS_NORM_OFFSET_CLASSES = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "Gemma3nRMSNorm")
# Where an RMS norm keeps its epsilon, read in order (Llama-style: variance_epsilon).
RMS_NORM_EPS_ATTRS = ("variance_epsilon", "eps")
# RMS norms that multiply by the weight in fp32 and round once (torch.nn.RMSNorm; the offset
# classes above do too); the others round x / rms to the input dtype first, as Llama does.
RMS_NORM_FP32_PRODUCT_CLASSES = ("RMSNorm",)
# Attention features the block-sparse kernels do not run (the module keeps its own attention).
SOFTCAP_ATTRS = ("attn_logit_softcapping",)
# BERT's relative position scores (relative_key / relative_key_query): its embedding module.
RELATIVE_POSITION_EMBEDDING = "distance_embedding"
# A module built for T5's shared relative position bias (its heads are sliced per layer).
RELATIVE_BIAS_ATTR = "has_relative_attention_bias"


# --- feed-forward ------------------------------------------------------------------------
@dataclass(frozen=True)
class FFNPattern:
    """Where one FFN style keeps its parts, as paths relative to the module that owns them.

    up: the first layer (for a fused gate-up: the fused module, rows [gate; up]);
    gate: the gate layer of a gated FFN; down: the second layer; act: the activation
    (module or function attribute); dropout: what sits between the activation and down (a
    float attribute or a Dropout module), if anything.
    """

    up: str
    down: str
    act: str
    gate: str | None = None
    gate_up_fused: bool = False
    dropout: str | None = None
    families: str = ""


FFN_PATTERNS = (
    FFNPattern("intermediate.dense", "output.dense", "intermediate.intermediate_act_fn",
               families="BERT, RoBERTa, ViT (4.x)"),
    FFNPattern("c_fc", "c_proj", "act", families="GPT-2"),
    FFNPattern("fc1", "fc2", "activation_fn", dropout="activation_dropout",
               families="BART, ViT (5.x)"),
    FFNPattern("lin1", "lin2", "activation", families="DistilBERT"),
    FFNPattern("wi_1", "wo", "act", gate="wi_0", dropout="dropout", families="T5 v1.1"),
    FFNPattern("wi", "wo", "act", dropout="dropout", families="T5 v1.0"),
    FFNPattern("up_proj", "down_proj", "act_fn", gate="gate_proj",
               families="Llama, Mistral, Qwen2, Gemma2"),
    FFNPattern("gate_up_proj", "down_proj", "activation_fn", gate="gate_up_proj",
               gate_up_fused=True, families="Phi-3"),
)

# --- post-norm residual blocks -----------------------------------------------------------
@dataclass(frozen=True)
class AddNormPattern:
    """A module whose forward(hidden_states, input_tensor) returns
    norm(dropout(dense(hidden_states)) + input_tensor): child paths of its parts."""

    dense: str
    dropout: str
    norm: str
    families: str = ""


ADD_NORM_PATTERNS = (
    AddNormPattern("dense", "dropout", "LayerNorm",
                   families="BERT, RoBERTa, ELECTRA (attention and FFN outputs)"),
)

# transformers' activation classes (4.x and 5.x names) -> the kernels' activation names
ACTIVATION_CLASSES = {
    "GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh", "ReLU": "relu", "SiLUActivation": "silu", "SiLU": "silu",
}


# --- parameter paths by component (the recipe's parameter counts and per-layer times) -----
# recipes.profiling.component_of reads a parameter path part by part:
#   embedding  a part in EMBEDDING_PARTS or starting with "embed_", or any nn.Embedding
#   attention  a part in ATTENTION_PARTS, or a leaf in ATTENTION_LEAVES inside a numbered layer
#   ffn        a part in FFN_PARTS, FFN_OUTPUT_PART right after a layer index (BERT's
#              layer.N.output.dense and its LayerNorm), or a leaf in FFN_LEAVES in a layer
#   other      the rest (pooler, classifier, final norms); HEAD_MODULES are the model's head
EMBEDDING_PARTS = {"embeddings", "embedding", "wte", "wpe", "shared", "patch_embeddings"}
ATTENTION_PARTS = {"attention", "attn", "self_attn", "encoder_attn", "self_attention",
                   "selfattention", "encdecattention", "crossattention", "cross_attn"}
ATTENTION_LEAVES = {"query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj",
                    "out_proj", "q", "k", "v", "o", "c_attn", "qkv_proj"}
FFN_PARTS = {"intermediate", "mlp", "ffn", "feed_forward", "feedforward", "densereludense"}
FFN_LEAVES = {"fc1", "fc2", "c_fc", "wi", "wo", "wi_0", "wi_1", "gate_proj", "up_proj",
              "down_proj", "gate_up_proj"}
FFN_OUTPUT_PART = "output"
HEAD_MODULES = {"pooler", "classifier", "score", "lm_head", "qa_outputs", "pre_classifier",
                "cls", "head", "layernorm", "final_layer_norm", "ln_f"}
