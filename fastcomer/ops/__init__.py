"""Fused ops, one package each (the table: `registry.OPS`): `arm_attention` (training: the ARM
cross-attention) and the decoding steps `self_attention_step`, `cross_attention_step`,
`feed_forward_step`, `beam_scorer_step`; `dispatch` picks each one's backend. Each package's
entry is the function of its name (`from fastcomer.ops.arm_attention import arm_attention`);
this package re-exports none of them, so that `fastcomer.ops.<name>` stays the package.
Importing them does not import triton; the Triton kernels are imported when first launched
(set TRITON_INTERPRET=1 before that to run them on the CPU)."""
