"""Code that runs inside the Ray pods, shipped by the operator as flat modules under /opt/llmops/payloads.

Only the standard library and what a Ray LLM image provides (ray[data], pyarrow, pandas, numpy, vllm,
transformers) may be imported here; the operator itself never imports this package. See docs/payloads.md.
"""
