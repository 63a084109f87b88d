# Ray runtime image for FineTune jobs: the operator's Ray image plus LLaMA-Factory 0.9.4, the versions the operator
# would otherwise install through the runtime env (Settings.finetune_pip), and flash-attn for FA2 varlen attention.
# Build from the repository root:
#   docker build -f docker/ray-runtime.Dockerfile -t llmops/ray-llamafactory:2.60.0-0.9.4 .
# Then point the operator at it (Helm values):
#   settings.finetune_image: llmops/ray-llamafactory:2.60.0-0.9.4
#   settings.finetune_pip: []
#   settings.finetune_flash_attention: true
# tests/unit/test_chart.py keeps the pins equal to pyproject.toml's `training` extra and Settings.finetune_pip.

FROM rayproject/ray:2.60.0-py311-cu128
RUN python -m pip install --no-cache-dir "ray[train]==2.60.0" "llamafactory==0.9.4" "peft==0.17.1" \
      "transformers==4.52.4" "liger-kernel==0.5.10" "torch==2.11.0" "torchaudio==2.11.0" "torchvision==0.26.0"
# flash-attn compiles against the torch above unless its setup finds a prebuilt wheel for this torch/CUDA/Python
# (a source build needs the CUDA toolkit's nvcc and takes long: MAX_JOBS bounds its memory).
RUN MAX_JOBS=4 python -m pip install --no-cache-dir --no-build-isolation "flash-attn==2.8.3.post2" \
 && python -c "import flash_attn, liger_kernel, llamafactory, peft"
# The Ray image's own non-root user (uid 1000).
USER 1000
